"""Every plan the CLI writes follows the Plan v1 JSON Schema (placement/schemas/plan-v1.json), and the schema
rejects what the format forbids."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from placement.cli import app
from placement.plan import Plan, PlanError, plan_schema, validate_plan_dict

jsonschema = pytest.importorskip("jsonschema")
runner = CliRunner()


def _commands() -> set[str]:
    import typer.main

    return set(typer.main.get_command(app).commands)


@pytest.fixture(scope="module")
def cli_plans(tmp_path_factory):
    """Plans written by 'moeplace plan' in the shapes users ask for: held-out metrics, redundant slots, 2 nodes."""
    out = tmp_path_factory.mktemp("plans")
    requests = {
        "holdout": ["--gpus", "8", "--solver", "round-robin", "--holdout", "0.5"],
        "redundant-2-nodes": ["--gpus", "8", "--gpus-per-node", "4", "--redundant", "8", "--solver", "contiguous"],
    }
    if "--memory-budget" in runner.invoke(app, ["plan", "--help"]).output:
        requests["memory-budget"] = ["--gpus", "8", "--memory-budget", "25%", "--holdout", "0.5"]
    paths = {}
    for name, args in requests.items():
        paths[name] = out / f"{name}.json"
        res = runner.invoke(app, ["plan", *args, "--out", str(paths[name])])
        assert res.exit_code == 0, res.output
    return paths


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(plan_schema())


def test_plans_written_by_plan_command_validate(cli_plans):
    for name, path in cli_plans.items():
        d = json.loads(path.read_text())
        assert validate_plan_dict(d, str(path), require=True)
        # and every top-level field the writer emits is described by the schema (no undocumented keys)
        assert set(d) <= set(plan_schema()["properties"])
    d = json.loads(cli_plans["redundant-2-nodes"].read_text())
    assert d["topology"]["num_nodes"] == 2 and d["topology"]["num_redundant"] == 8
    if "memory-budget" in cli_plans:  # a plan under a memory budget has a memory record
        assert json.loads(cli_plans["memory-budget"].read_text())["memory"] is not None


def test_plans_read_back_from_serving_formats_validate(cli_plans, tmp_path):
    """'moeplace import-plan' (when installed) writes plans from serving-stack files; they follow the schema too."""
    if "import-plan" not in _commands():
        pytest.skip("this install has no 'moeplace import-plan'")
    src = cli_plans["holdout"]
    exported = tmp_path / "sglang.json"
    assert runner.invoke(app, ["export", str(src), "--format", "sglang", "--out", str(exported)]).exit_code == 0
    help_text = runner.invoke(app, ["import-plan", "--help"]).output
    args = ["import-plan", str(exported), "--format", "sglang", "--out", str(tmp_path / "imported.json")]
    if "--gpus" in help_text:
        args += ["--gpus", "8"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "imported.json").read_text())
    assert validate_plan_dict(d, "imported plan", require=True)


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["phy2log"][0].__setitem__(0, 1.5), "phy2log[0][0]"),
    (lambda d: d["phy2log"][2].__setitem__(5, -1), "phy2log[2][5]"),  # empty slot without a memory budget
    (lambda d: d.__setitem__("format", "something.else"), "format"),
    (lambda d: d.__setitem__("unknown_field", 1), "unknown_field"),
    (lambda d: d["topology"].pop("slots_per_gpu"), "slots_per_gpu"),
    (lambda d: d["heldout"].__setitem__("cross_gpu_fraction", "low"), "heldout.cross_gpu_fraction"),
    (lambda d: d["provenance"]["traces"].append({"path": "x.npz", "sha256": "not-a-hash"}), "sha256"),
])
def test_schema_rejects_malformed_plans(cli_plans, mutate, where):
    d = json.loads(cli_plans["holdout"].read_text())
    bad = copy.deepcopy(d)
    mutate(bad)
    with pytest.raises(PlanError) as exc:
        validate_plan_dict(bad, "bad.json", require=True)
    assert "bad.json" in str(exc.value)
    assert where.split(".")[-1].split("[")[0] in str(exc.value) or "format" in where


def test_loading_a_malformed_plan_is_one_sentence_exit_2(cli_plans, tmp_path):
    d = json.loads(cli_plans["holdout"].read_text())
    d["phy2log"][0][0] = "seven"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    res = runner.invoke(app, ["evaluate", str(bad)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and "phy2log[0][0]" in res.output


def test_memory_budget_plans_may_have_empty_slots(cli_plans):
    d = json.loads(cli_plans["holdout"].read_text())
    d["memory"] = {"note": "resident experts only"}
    d["phy2log"][0][0] = -1
    assert validate_plan_dict(d, require=True)
    assert Plan.from_dict(d).phy2log[0, 0] == -1
