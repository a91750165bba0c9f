"""Solver parameters are read with types: a wrong type, a value out of range or an unknown (misspelt) name is one
clear SolverInputError naming the parameter, for every solver, before any solving starts."""

from __future__ import annotations

import numpy as np
import pytest

from solvers import Options, Problem, SolverInputError, Topology, solve


@pytest.fixture(scope="module")
def problem():
    from placement.problem import build_problem
    from traces import datasets

    fit, _ = datasets.load().split_by_sequence(0.5, seed=0)
    return build_problem(fit, Topology.for_experts(64, 8))


@pytest.mark.parametrize("solver,params,match", [
    ("joint", {"smoothing": "abc"}, "parameter smoothing must be a number >= 0 and <= 1"),
    ("joint", {"smoothing": [1, 2]}, "parameter smoothing must be a number"),
    ("joint", {"sweeps": 2.5}, "parameter sweeps must be an integer >= 1"),
    ("joint", {"distinct_tokens": -1}, "parameter distinct_tokens must be an integer >= 1"),
    ("joint", {"migration_cost": float("inf")}, "parameter migration_cost must be a number >= 0"),
    ("joint", {"token_positions": "yes"}, "parameter token_positions must be true or false"),
    ("joint", {"caps": "abc", "dataflow": "standard"}, "parameter caps must be a JSON list of numbers"),
    ("joint", {"objective": "best"}, "parameter objective must be one of 'expected', 'worst'"),
    ("joint", {"afinity_weight": 1}, "no parameter 'afinity_weight'; did you mean 'affinity_weight'"),
    ("joint", {"model": "gpt-5"}, "unknown model preset 'gpt-5'"),
    ("joint", {"hidden_size": "abc"}, "hidden_size must be a positive number"),
    ("exflow", {"batch_tokens": "abc"}, "parameter batch_tokens must be an integer >= 1"),
    ("moetuner", {"stage1_share": 1.5}, "parameter stage1_share must be a number > 0 and < 1"),
    ("moetuner", {"stage1_share": 1.0}, "parameter stage1_share must be a number > 0 and < 1"),
    ("moetuner", {"mip_gap": "abc"}, "parameter mip_gap must be a number >= 0"),
    ("eplb", {"num_groups": 4}, "the eplb solver has no parameter 'num_groups'"),
    ("contiguous", {"sweeps": 3}, "the contiguous solver has no parameter 'sweeps'"),
])
def test_bad_parameters_are_one_clear_error(problem, solver, params, match):
    with pytest.raises(SolverInputError, match=match):
        solve(solver, problem, Options(time_limit=2, params=params))


def test_budget_solver_checks_its_parameters():
    load = np.ones((2, 8))
    problem = Problem(load=load, topology=Topology.for_experts(8, 2), budget_slots=12)
    for params, match in (({"swap_shares": [0.5, 2]}, "swap_shares must be a JSON list of numbers >= 0 and <= 1"),
                          ({"batch": 0}, "parameter batch must be an integer >= 1"),
                          ({"policy": "lazy"}, "parameter policy must be one of 'static', 'dynamic'")):
        with pytest.raises(SolverInputError, match=match):
            solve("budget", problem, Options(params=params))


def test_cost_fields_and_null_values_are_accepted(problem):
    """The CLI passes the cost model's fields to every solver; null means the default."""
    res = solve("eplb", problem, Options(params={"hidden_size": 7168, "dataflow": "standard"}))
    assert res.phy2log.shape == (problem.num_layers, 64)
    res = solve("joint", problem, Options(time_limit=1, params={"balance_weight": None, "exact_limit": 0}))
    assert res.gap is not None


@pytest.mark.parametrize("solver", ["joint", "eplb", "contiguous", "exflow"])
def test_unknown_backend_is_refused_by_every_solver(problem, solver):
    with pytest.raises(SolverInputError, match="unknown backend 'gurobi'; choose one of: cp-sat, highs, cbc"):
        solve(solver, problem, Options(time_limit=2, backend="gurobi"))
