"""A small integer-programming layer: build a model once, solve it with OR-Tools CP-SAT, HiGHS or CBC.

A :class:`Model` holds integer variables with bounds (binaries are ``[0, 1]``), ranged linear rows
``lo <= sum(coef * x) <= hi`` and a linear objective to minimise, all with INTEGER coefficients, so that the same
model means exactly the same thing on every backend (CP-SAT only accepts integers). Solvers that start from
float data scale it with :func:`integerize` and convert objective and bound back to their own units.

Backends (``Options.backend``):

- ``"cp-sat"``: OR-Tools CP-SAT (default).
- ``"highs"``: HiGHS through ``highspy``, in a child process (``highspy`` and OR-Tools bundle incompatible
  builds of the HiGHS library that cannot share one process); the model is passed as a row-wise sparse matrix.
- ``"cbc"``: COIN-OR CBC through PuLP (``pulp.PULP_CBC_CMD``); the best bound is read from CBC's log.

:func:`solve` returns a :class:`Solution`: ``status`` is ``"optimal"`` (proved), ``"feasible"`` (stopped at a
limit with an incumbent), ``"infeasible"`` or ``"unknown"`` (stopped with no incumbent); ``objective`` and
``bound`` are in model units (``bound <= objective``); ``values`` is ``int64 [num_vars]``. A hint (warm start) is
passed to every backend; if a backend stops without an incumbent but the hint is feasible, the hint is returned as
a ``"feasible"`` solution, so a time-out always gives the best plan known with its gap.

Interrupts: Ctrl-C (or SIGTERM, which the CLI turns into the same ``KeyboardInterrupt``) stops every backend within
a moment and propagates; nothing is returned. CP-SAT searches in a helper thread while the main thread waits, so
the interrupt is seen at once and ends the search (``stop_search``); CP-SAT's own SIGINT handler, which would end
the search as if the time limit were reached and let the caller go on, is off. HiGHS and CBC run as child
processes, killed when the interrupt arrives (HiGHS by ``subprocess.run``, CBC by the CLI, which kills every
process a command started).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["BACKENDS", "Model", "Solution", "solve", "integerize", "Deadline"]

BACKENDS = ("cp-sat", "highs", "cbc")
_BIG = 2**53  # "unbounded" row side, exact in float64 for every backend


@dataclass
class Solution:
    """Outcome of one backend run (objective and bound in model units)."""

    status: str
    objective: float | None
    bound: float | None
    values: np.ndarray | None
    seconds: float
    backend: str

    @property
    def has_values(self) -> bool:
        return self.values is not None


class Model:
    """Integer variables, ranged linear rows and a linear objective (minimised); integer coefficients only."""

    def __init__(self) -> None:
        self.lb: list[int] = []
        self.ub: list[int] = []
        self.row_vars: list[list[int]] = []
        self.row_coefs: list[list[int]] = []
        self.row_lo: list[int] = []
        self.row_hi: list[int] = []
        self.obj_vars: np.ndarray = np.zeros(0, dtype=np.int64)
        self.obj_coefs: np.ndarray = np.zeros(0, dtype=np.int64)
        self.obj_const: int = 0
        self.hint: dict[int, int] = {}

    # building ------------------------------------------------------------------------------------------------
    @property
    def num_vars(self) -> int:
        return len(self.lb)

    @property
    def num_rows(self) -> int:
        return len(self.row_lo)

    def new_vars(self, shape, lb: int = 0, ub: int = 1) -> np.ndarray:
        """Variable indices of the given shape, each with bounds ``[lb, ub]`` (default binary)."""
        n = int(np.prod(shape))
        start = len(self.lb)
        self.lb.extend([int(lb)] * n)
        self.ub.extend([int(ub)] * n)
        return np.arange(start, start + n, dtype=np.int64).reshape(shape)

    def add(self, vars, coefs, lo=None, hi=None) -> None:
        """One row ``lo <= sum(coefs * x[vars]) <= hi`` (``None`` = unbounded side)."""
        vars = np.asarray(vars, dtype=np.int64)
        coefs = _as_int(np.broadcast_to(np.asarray(coefs), vars.shape)).ravel()
        vars = vars.ravel()
        self.row_vars.append(vars.tolist())
        self.row_coefs.append(coefs.tolist())
        self.row_lo.append(-_BIG if lo is None else _int(lo))
        self.row_hi.append(_BIG if hi is None else _int(hi))

    def add_rows(self, vars, coefs, lo=None, hi=None) -> None:
        """Many rows at once: ``vars [m, n]``, ``coefs [m, n]`` or ``[n]``, ``lo``/``hi`` scalars or ``[m]``."""
        vars = np.asarray(vars, dtype=np.int64)
        if vars.ndim != 2:
            raise ValueError("add_rows needs vars of shape [m, n]")
        m = vars.shape[0]
        coefs = _as_int(np.broadcast_to(np.asarray(coefs), vars.shape))
        lo = np.broadcast_to(np.asarray(-_BIG if lo is None else lo), (m,))
        hi = np.broadcast_to(np.asarray(_BIG if hi is None else hi), (m,))
        self.row_vars.extend(vars.tolist())
        self.row_coefs.extend(coefs.tolist())
        self.row_lo.extend(_as_int(lo).tolist())
        self.row_hi.extend(_as_int(hi).tolist())

    def minimize(self, vars, coefs, constant: int = 0) -> None:
        vars = np.asarray(vars, dtype=np.int64)
        self.obj_coefs = _as_int(np.broadcast_to(np.asarray(coefs), vars.shape)).ravel().copy()
        self.obj_vars = vars.ravel()
        self.obj_const = _int(constant)

    def set_hint(self, vars, values) -> None:
        """Warm start: a (partial or full) assignment the backends start from."""
        vars = np.asarray(vars, dtype=np.int64)
        values = _as_int(np.broadcast_to(np.asarray(values), vars.shape)).ravel()
        self.hint.update(zip(vars.ravel().tolist(), values.tolist()))

    # evaluation ----------------------------------------------------------------------------------------------
    def objective_of(self, values: np.ndarray) -> int:
        return int(np.dot(self.obj_coefs, np.asarray(values, dtype=np.int64)[self.obj_vars])) + self.obj_const

    def is_feasible(self, values: np.ndarray) -> bool:
        """Whether a full assignment satisfies every bound and row (exact integer arithmetic)."""
        v = np.asarray(values, dtype=np.int64)
        if v.shape != (self.num_vars,) or (v < np.array(self.lb)).any() or (v > np.array(self.ub)).any():
            return False
        vals = v.tolist()
        for vs, cs, lo, hi in zip(self.row_vars, self.row_coefs, self.row_lo, self.row_hi):
            s = sum(c * vals[i] for i, c in zip(vs, cs))
            if s < lo or s > hi:
                return False
        return True

    def full_hint(self) -> np.ndarray | None:
        """The hint as a full assignment, or None if it does not cover every variable."""
        if len(self.hint) < self.num_vars:
            return None
        out = np.empty(self.num_vars, dtype=np.int64)
        for i, v in self.hint.items():
            out[i] = v
        return out


def _int(x) -> int:
    xi = int(round(float(x)))
    if abs(float(x) - xi) > 1e-9 * max(1.0, abs(xi)):
        raise ValueError(f"model coefficients must be integers, got {x!r}; scale the data with integerize()")
    return xi


def _as_int(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind in "iub":
        return a.astype(np.int64)
    r = np.round(a)
    if np.any(np.abs(a - r) > 1e-9 * np.maximum(1.0, np.abs(r))):
        raise ValueError("model coefficients must be integers; scale the data with integerize()")
    return r.astype(np.int64)


def integerize(values: np.ndarray, max_int: int = 10**6) -> tuple[np.ndarray, float]:
    """Integer data for a model: ``(ints, scale)`` with ``ints ~= values * scale``.

    Integral data (token counts) is kept as is (scale 1); otherwise the largest magnitude is mapped to
    ``max_int`` and the rest rounded, so the rounding error per entry is at most ``0.5 / scale``.
    """
    v = np.asarray(values, dtype=np.float64)
    top = float(np.abs(v).max()) if v.size else 0.0
    if top == 0.0:
        return np.zeros(v.shape, dtype=np.int64), 1.0
    if np.all(np.abs(v - np.round(v)) < 1e-9) and top <= 2**40:
        return np.round(v).astype(np.int64), 1.0
    scale = max_int / top
    return np.round(v * scale).astype(np.int64), scale


class Deadline:
    """Wall-clock budget shared by the sub-solves of one solver call (``None`` = no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.perf_counter() + float(seconds)

    def left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.perf_counter())

    def share(self, parts_left: int, floor: float = 0.05) -> float | None:
        """An even share of the time left for one of ``parts_left`` remaining sub-solves."""
        left = self.left()
        return None if left is None else max(floor, left / max(1, parts_left))


# solving ---------------------------------------------------------------------------------------------------------
def solve(model: Model, backend: str = "cp-sat", time_limit: float | None = None, seed: int = 0,
          threads: int | None = None, gap: float | None = None) -> Solution:
    """Solve ``model`` on one backend; see the module docstring for what comes back."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MIP backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    if model.num_vars == 0:
        return Solution("optimal", float(model.obj_const), float(model.obj_const), np.zeros(0, dtype=np.int64),
                        0.0, backend)
    run = {"cp-sat": _solve_cpsat, "highs": _solve_highs, "cbc": _solve_cbc}[backend]
    sol = run(model, time_limit, seed, threads, gap)
    sol.seconds = time.perf_counter() - t0
    return _with_hint_fallback(model, sol)


def _with_hint_fallback(model: Model, sol: Solution) -> Solution:
    """Keep the better of the backend's incumbent and a feasible full hint; keep ``bound <= objective``."""
    hint = model.full_hint()
    if sol.status in ("unknown", "feasible") and hint is not None:
        h_obj = float(model.objective_of(hint))
        if (sol.values is None or h_obj < model.objective_of(sol.values)) and model.is_feasible(hint):
            sol.values, sol.status = hint, "feasible"
    if sol.bound is not None:  # integer data, integer variables: the optimum is an integer, round the bound up
        sol.bound = float(math.ceil(sol.bound - 1e-6))
    if sol.values is not None:
        sol.objective = float(model.objective_of(sol.values))  # exact, in model units
        if sol.status == "optimal":
            sol.bound = sol.objective if sol.bound is None else min(sol.bound, sol.objective)
        elif sol.bound is not None:
            sol.bound = min(sol.bound, sol.objective)
    return sol


def _workers(threads: int | None) -> int:
    return int(threads) if threads else max(1, min(8, os.cpu_count() or 1))


def _solve_cpsat(model: Model, time_limit, seed, threads, gap) -> Solution:
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    m = cp_model.CpModel()
    x = [m.new_int_var(lo, hi, "") for lo, hi in zip(model.lb, model.ub)]
    wsum = cp_model.LinearExpr.weighted_sum
    for vs, cs, lo, hi in zip(model.row_vars, model.row_coefs, model.row_lo, model.row_hi):
        m.add_linear_constraint(wsum([x[i] for i in vs], cs), max(lo, cp_model.INT_MIN), min(hi, cp_model.INT_MAX))
    m.minimize(wsum([x[i] for i in model.obj_vars.tolist()], model.obj_coefs.tolist()) + model.obj_const)
    for i, v in model.hint.items():
        m.add_hint(x[i], v)
    s = cp_model.CpSolver()
    if time_limit is not None:  # the limit covers building the CP-SAT model too
        s.parameters.max_time_in_seconds = max(0.01, float(time_limit) - (time.perf_counter() - t0))
    s.parameters.log_search_progress = bool(os.environ.get("MOEPLACE_MIP_LOG"))
    s.parameters.random_seed = int(seed)
    s.parameters.num_workers = _workers(threads)
    if gap is not None:
        s.parameters.relative_gap_limit = float(gap)
    code = _interruptible_solve(s, m)
    name = s.status_name(code)
    if name == "MODEL_INVALID":
        raise RuntimeError(f"CP-SAT rejected the model: {m.validate()}")
    status = {"OPTIMAL": "optimal", "FEASIBLE": "feasible", "INFEASIBLE": "infeasible"}.get(name, "unknown")
    if status in ("optimal", "feasible"):
        values = np.asarray(s.response_proto.solution, dtype=np.int64)
        if gap is not None and status == "optimal" and s.best_objective_bound < s.objective_value - 1e-9:
            status = "feasible"  # stopped at the gap limit, not proved optimal
        return Solution(status, float(s.objective_value), float(s.best_objective_bound), values, 0.0, "cp-sat")
    bound = float(s.best_objective_bound) if status == "unknown" and math.isfinite(s.best_objective_bound) else None
    return Solution(status, None, bound, None, 0.0, "cp-sat")


def _interruptible_solve(solver, model) -> int:
    """``solver.solve(model)`` in a helper thread (the search releases the GIL) while the main thread waits, so that
    a ``KeyboardInterrupt`` stops the search (``stop_search``) and propagates at once; outside the main thread,
    where no signal arrives, a plain solve.

    The main thread waits in ``select`` on a pipe the worker writes to when it is done: woken at once, and holding
    no lock. (An interrupt raised inside a lock operation, ``Thread.join`` or ``Event.wait``, can leave the lock held
    or a running thread marked finished, which deadlocks the worker or lets the process exit under CP-SAT, which
    aborts it.)"""
    import select

    solver.parameters.catch_sigint_signal = False
    if threading.current_thread() is not threading.main_thread():
        return solver.solve(model)
    box: dict = {}
    wake_r, wake_w = os.pipe()

    def run() -> None:
        try:
            box["code"] = solver.solve(model)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc
        os.write(wake_w, b"x")  # the last use of the pipe here: once "done" is set, the caller may close it
        box["done"] = True

    threading.Thread(target=run, name="cp-sat", daemon=True).start()
    try:
        while "done" not in box:
            select.select([wake_r], [], [], 1.0)
    except BaseException:
        while "done" not in box:  # the search must end before the interrupt goes on (exiting under CP-SAT aborts)
            solver.stop_search()
            try:
                select.select([wake_r], [], [], 0.1)
            except KeyboardInterrupt:
                continue
        raise
    finally:
        if "done" in box:  # the worker has written: both ends can go
            os.close(wake_r)
            os.close(wake_w)
    if "error" in box:
        raise box["error"]
    return box["code"]


def _csr(model: Model) -> dict[str, np.ndarray]:
    """The model as arrays (row-wise sparse matrix), for HiGHS."""
    lengths = np.fromiter((len(r) for r in model.row_vars), dtype=np.int64, count=model.num_rows)
    nnz = int(lengths.sum())
    cost = np.zeros(model.num_vars)
    np.add.at(cost, model.obj_vars, model.obj_coefs.astype(np.float64))
    hint = model.full_hint()
    return {
        "cost": cost, "offset": np.float64(model.obj_const),
        "col_lo": np.asarray(model.lb, dtype=np.float64), "col_hi": np.asarray(model.ub, dtype=np.float64),
        "row_lo": np.asarray(model.row_lo, dtype=np.float64), "row_hi": np.asarray(model.row_hi, dtype=np.float64),
        "start": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "index": np.fromiter((i for r in model.row_vars for i in r), dtype=np.int64, count=nnz),
        "value": np.fromiter((c for r in model.row_coefs for c in r), dtype=np.float64, count=nnz),
        "hint": np.zeros(0) if hint is None else hint.astype(np.float64),
    }


def _solve_highs(model: Model, time_limit, seed, threads, gap) -> Solution:
    """HiGHS (``highspy``) in a child process.

    ``highspy`` and OR-Tools each ship their own build of the HiGHS library and the two cannot be loaded into one
    process (whichever comes second fails to import), so HiGHS runs next door and CP-SAT stays usable here.
    """
    import subprocess
    import sys

    t0 = time.perf_counter()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "model.npz"), os.path.join(tmp, "result.npz")
        arrays = _csr(model)
        left = None if time_limit is None else max(0.01, float(time_limit) - (time.perf_counter() - t0) - 0.3)
        settings = {"time_limit": -1.0 if left is None else left,
                    "seed": float(seed), "threads": float(threads or 0), "gap": -1.0 if gap is None else float(gap)}
        np.savez(inp, **arrays, **{k: np.float64(v) for k, v in settings.items()})  # 0.3 s above: child start-up
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                "from solvers.mip import _highs_worker; _highs_worker(sys.argv[1], sys.argv[2])")
        wait = None if time_limit is None else float(time_limit) + 120.0
        proc = subprocess.run([sys.executable, "-c", code, inp, out], capture_output=True, text=True, timeout=wait)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"HiGHS failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        with np.load(out) as r:
            status = str(r["status"])
            bound = float(r["bound"]) if math.isfinite(float(r["bound"])) else None
            if status in ("optimal", "feasible"):
                values = np.round(r["values"]).astype(np.int64)
                return Solution(status, float(r["objective"]), bound, values, 0.0, "highs")
    return Solution(status, None, bound if status == "unknown" else None, None, 0.0, "highs")


def _highs_worker(inp: str, out: str) -> None:
    """Child-process side of :func:`_solve_highs` (imports ``highspy``, never OR-Tools)."""
    import highspy

    d = dict(np.load(inp))
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    lp = highspy.HighsLp()
    n, m = len(d["cost"]), len(d["row_lo"])
    lp.num_col_, lp.num_row_ = n, m
    lp.col_cost_, lp.offset_ = d["cost"], float(d["offset"])
    lp.col_lower_, lp.col_upper_ = d["col_lo"], d["col_hi"]
    inf = highspy.kHighsInf
    lp.row_lower_ = np.where(d["row_lo"] <= -_BIG, -inf, d["row_lo"])
    lp.row_upper_ = np.where(d["row_hi"] >= _BIG, inf, d["row_hi"])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, m
    lp.a_matrix_.start_ = d["start"].astype(np.int32)
    lp.a_matrix_.index_ = d["index"].astype(np.int32)
    lp.a_matrix_.value_ = d["value"]
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    h.passModel(lp)
    if d["time_limit"] >= 0:
        h.setOptionValue("time_limit", float(d["time_limit"]))
    h.setOptionValue("random_seed", int(d["seed"]))
    if d["threads"] > 0:
        h.setOptionValue("threads", int(d["threads"]))
    h.setOptionValue("mip_rel_gap", max(0.0, float(d["gap"])))  # default: prove optimality, as CP-SAT does
    if len(d["hint"]) == n:
        sol = highspy.HighsSolution()
        sol.col_value = d["hint"].tolist()
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    ms, info = h.getModelStatus(), h.getInfo()
    S = highspy.HighsModelStatus
    has = int(info.primal_solution_status) == 2  # feasible primal solution
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else np.inf
    if ms == S.kInfeasible:
        status = "infeasible"
    elif not has:
        status = "unknown"
    elif ms == S.kOptimal and (d["gap"] < 0 or info.mip_gap <= 1e-9):
        status = "optimal"
    else:
        status = "feasible"
    values = np.asarray(h.getSolution().col_value) if has else np.zeros(0)
    np.savez(out, status=np.str_(status), objective=np.float64(info.objective_function_value if has else np.nan),
             bound=np.float64(bound), values=values)


_CBC_BOUND = re.compile(r"^(?:Lower bound|Best possible):\s*(-?[\d.eE+-]+)", re.M)


def _solve_cbc(model: Model, time_limit, seed, threads, gap) -> Solution:
    # PuLP imports highspy when it is imported; OR-Tools must be loaded first or CP-SAT cannot load afterwards.
    from ortools.sat.python import cp_model  # noqa: F401
    import pulp

    t0 = time.perf_counter()
    prob = pulp.LpProblem("m", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x{i}", lo, hi, cat=pulp.LpInteger) for i, (lo, hi) in enumerate(zip(model.lb, model.ub))]
    prob += pulp.LpAffineExpression([(x[i], c) for i, c in zip(model.obj_vars.tolist(), model.obj_coefs.tolist())],
                                    constant=model.obj_const)
    for k, (vs, cs, lo, hi) in enumerate(zip(model.row_vars, model.row_coefs, model.row_lo, model.row_hi)):
        expr = pulp.LpAffineExpression([(x[i], c) for i, c in zip(vs, cs)])
        if lo == hi:
            prob += pulp.LpConstraint(expr, pulp.LpConstraintEQ, f"r{k}", lo)
            continue
        if lo > -_BIG:
            prob += pulp.LpConstraint(expr, pulp.LpConstraintGE, f"r{k}l", lo)
        if hi < _BIG:
            prob += pulp.LpConstraint(expr, pulp.LpConstraintLE, f"r{k}u", hi)
    for i, v in model.hint.items():
        x[i].setInitialValue(v)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        left = None if time_limit is None else max(1, math.ceil(float(time_limit) - (time.perf_counter() - t0)))
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=left,
                                threads=threads, gapRel=gap, warmStart=bool(model.hint), logPath=log_path,
                                options=[f"randomCbcSeed {int(seed) + 1}"])
        cmd.tmpDir = tmp  # PuLP's model and solution files go with the log (an interrupt leaves none behind)
        prob.solve(cmd)
        with open(log_path) as f:
            log = f.read()
    if prob.status == pulp.LpStatusInfeasible or "Result - Problem proven infeasible" in log:
        return Solution("infeasible", None, None, None, 0.0, "cbc")
    found = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if not found:
        return Solution("unknown", None, _cbc_bound(log), None, 0.0, "cbc")
    values = np.array([int(round(v.varValue or 0)) for v in x], dtype=np.int64)
    objective = float(model.objective_of(values))
    proved = "Result - Optimal solution found" in log and (gap is None or "Gap:" not in log or _cbc_gap(log) <= 1e-9)
    bound = objective if proved else _cbc_bound(log)
    return Solution("optimal" if proved else "feasible", objective, bound, values, 0.0, "cbc")


def _cbc_bound(log: str) -> float | None:
    found = _CBC_BOUND.findall(log)
    return float(found[-1]) if found else None


def _cbc_gap(log: str) -> float:
    found = re.findall(r"^Gap:\s*(-?[\d.eE+-]+)", log, re.M)
    return float(found[-1]) if found else 0.0
