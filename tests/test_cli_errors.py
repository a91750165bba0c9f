"""Bad input found by fuzzing the CLI: one sentence, exit code 2, no traceback, no output file left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from placement.cli import app
from placement.cli_common import user_errors

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_sentence(r, *words):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    for w in words:
        assert w in r.output, (w, r.output)


def test_messages_are_printed_without_markup(tmp_path):
    """File names and messages with brackets are printed as they are (rich markup would crash or delete them)."""
    assert_one_sentence(run("plan", "run[/x].npz", "--gpus", 4), "run[/x].npz")
    assert_one_sentence(run("evaluate", "plan[/].json"), "plan[/].json")
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"id": "r1", "choices": [{"routed_experts": [[[1, 2]], [[3]]]}]}))
    assert_one_sentence(run("import", "vllm", ragged, "--out", tmp_path / "x.npz"), "[tokens, layers, top_k]")
    assert not (tmp_path / "x.npz").exists()


def test_lazily_imported_input_errors_are_one_sentence():
    from placement.export import ExportError
    from placement.runtime import RuntimeInputError

    for cls in (RuntimeInputError, ExportError):
        @user_errors
        def command():
            raise cls("needs 8 GPUs [found 0]")

        with pytest.raises(typer.Exit) as exc:
            command()
        assert exc.value.exit_code == 2

    @user_errors
    def bug():
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError):
        bug()


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "p.json"
    r = run("plan", "deepseek-v2-lite-esft:law", "--gpus", 4, "--solver", "contiguous", "--out", path)
    assert r.exit_code == 0, r.output
    return path


def test_shared_options_are_checked_for_every_command(small_plan, tmp_path):
    """--seed (numpy refuses negative seeds), --threads and --time-limit are checked once for all commands."""
    o = tmp_path / "o.json"
    cases = [
        (("plan", "--gpus", 4, "--solver", "contiguous", "--holdout", 0.5, "--seed", -1, "-o", o), "--seed"),
        (("evaluate", small_plan, "--holdout", 0.5, "--seed", -1), "--seed"),
        (("report", small_plan, "--holdout", 0.5, "--seed", -1, "-o", tmp_path / "r", "--no-plots"), "--seed"),
        (("budget", "--gpus", 4, "-b", "25%", "--seed", -1), "--seed"),
        (("affinity", "deepseek-v2-lite-esft:summary", "--seed", -1), "--seed"),
        (("demo", "--no-plots", "--solver", "contiguous", "--seed", -1, "-o", tmp_path / "d"), "--seed"),
        (("bench", small_plan, "--seed", -1), "--seed"),
        (("plan", "--gpus", 4, "--solver", "contiguous", "--time-limit", -1, "-o", o), "--time-limit"),
        (("plan", "--gpus", 4, "--solver", "contiguous", "--time-limit", "nan", "-o", o), "--time-limit"),
        (("plan", "--gpus", 4, "--solver", "contiguous", "--time-limit", 0, "-o", o), "--time-limit"),
        (("plan", "--gpus", 4, "--solver", "contiguous", "--threads", 0, "-o", o), "--threads"),
        (("bench", small_plan, "--threads", -1), "--threads"),
        (("bench", small_plan, "-w", 0), "--world-size"),
    ]
    for args, word in cases:
        assert_one_sentence(run(*args), word)
    assert not o.exists() and not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


def test_sizes_and_rates_must_be_finite(small_plan):
    from placement.budget import parse_size
    from placement.cli_common import UserError

    assert parse_size("6GiB") == 6 * 2 ** 30 and parse_size("6.4GB") == 6_400_000_000
    for bad, word in (("1e400", "too large"), ("1e309", "too large"), ("10Gb", "bits"), ("0.5", "at least one")):
        with pytest.raises(UserError, match=word):
            parse_size(bad, "--x")
    cases = [
        (("plan", "--gpus", 4, "--solver", "contiguous", "--intra-node-bandwidth", "1e400"), "too large"),
        (("plan", "--gpus", 4, "--memory-budget", "6GiB", "--expert-bytes", "1e400"), "too large"),
        (("plan", "--gpus", 4, "--solver", "contiguous", "--gpu-flops", "1e400"), "--gpu-flops"),
        (("budget", "--gpus", 4, "-b", "25%", "--pcie-bandwidth", "1e400"), "--pcie-bandwidth"),
        (("budget", "--gpus", 4, "-b", "25%", "--prefetch-overlap-us", "nan"), "--prefetch-overlap-us"),
        (("evaluate", small_plan, "--inter-node-bandwidth", "1e400"), "--inter-node-bandwidth"),
    ]
    for args, word in cases:
        assert_one_sentence(run(*args), word)


def _plan_to(out):
    return run("plan", "deepseek-v2-lite-esft:law", "--gpus", 4, "--solver", "contiguous", "--out", out)


def test_output_paths_are_checked_and_named(small_plan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    afile = tmp_path / "afile.json"
    afile.write_text("{}")
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "fifo"
    import os

    os.mkfifo(fifo)
    cases = [(afile / "o.json", "afile.json is a file"), ("", "not a file name"), (folder, "is a folder"),
             (fifo, "not a regular file")]
    for out, word in cases:
        r = _plan_to(out)
        assert_one_sentence(r, word)
        assert ".tmp" not in r.output
    assert afile.read_text() == "{}" and fifo.exists() and not fifo.is_file()
    assert_one_sentence(run("report", small_plan, "-o", afile, "--no-plots"), "afile.json")
    law = Path(__file__).resolve().parents[1] / "traces/data/deepseek-v2-lite-esft/esft_law.npz"
    assert_one_sentence(run("merge", law, "--out", afile / "x.npz"), "afile.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.json", "fifo", "folder"]  # no temp files left


def test_a_long_file_name_the_os_accepts_works(tmp_path):
    out = tmp_path / ("b" * 250 + ".json")  # 255 bytes: the longest name Linux takes
    r = _plan_to(out)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["format"] == "moeplace.plan"


def test_no_output_replaces_an_input(small_plan, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_bytes(small_plan.read_bytes())
    assert_one_sentence(run("export", plan, "-f", "sglang", "-o", plan), "also an input")
    assert plan.read_bytes() == small_plan.read_bytes()
    trace = tmp_path / "t.npz"
    np.savez(trace, logical_count=np.ones((2, 26, 64)))
    before = trace.read_bytes()
    assert_one_sentence(run("plan", trace, "--gpus", 4, "--solver", "contiguous", "-o", trace), "also an input")
    assert trace.read_bytes() == before


def test_a_failing_command_leaves_no_new_file(small_plan, tmp_path):
    """export -f vllm writes two files: when the second cannot be written, the first is taken back (a new one
    removed, an old one restored)."""
    out = tmp_path / "exv.json"
    (tmp_path / "exv.expert_maps.json").mkdir()
    assert_one_sentence(run("export", small_plan, "-f", "vllm", "-o", out), "exv.expert_maps.json")
    assert not out.exists()
    out.write_text("old")
    assert_one_sentence(run("export", small_plan, "-f", "vllm", "-o", out), "exv.expert_maps.json")
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exv.expert_maps.json", "exv.json"]
    (tmp_path / "exv.expert_maps.json").rmdir()
    assert run("export", small_plan, "-f", "vllm", "-o", out).exit_code == 0
    assert out.read_text() != "old" and (tmp_path / "exv.expert_maps.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exv.expert_maps.json", "exv.json"]  # no backups left


def test_malformed_imports_and_plans_are_one_sentence(small_plan, tmp_path):
    out = tmp_path / "x.npz"
    choices = tmp_path / "choices.json"
    choices.write_text(json.dumps({"id": "r", "choices": 5}))
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    trunc = tmp_path / "trunc.npz"
    np.savez(trunc, a=np.zeros((4, 2, 2), dtype=np.int32))
    trunc.write_bytes(trunc.read_bytes()[:40])
    bad_cost = tmp_path / "plan.json"
    d = json.loads(small_plan.read_text())
    d["solver"]["options"]["params"]["hidden_size"] = "abc"
    bad_cost.write_text(json.dumps(d))
    sg = tmp_path / "sg.json"
    sg.write_text(json.dumps({"physical_to_logical_map": [list(range(64))] * 27}))
    cases = [
        (("import", "vllm", choices, "--num-experts", 64, "--out", out), "choices.json"),
        (("import", "vllm", binary, "--out", out), "UTF-8"),
        (("import", "vllm", trunc, "--out", out), "trunc.npz"),
        (("evaluate", bad_cost), "hidden_size"),
        (("report", bad_cost, "-o", tmp_path / "r", "--no-plots"), "hidden_size"),
        (("import-plan", sg, "--gpus", 4, "-o", tmp_path / "p.json", "--moe-layers=1-1000000000"), "--moe-layers"),
        (("import-plan", sg, "--gpus", 4, "-o", tmp_path / "p.json", "--moe-layers", "1,,2"), "--moe-layers"),
        (("import-plan", sg, "--gpus", 4, "-o", tmp_path / "p.json", "--moe-layers", "5-3"), "--moe-layers"),
        (("budget", "--gpus", 4, "-b", "25%", "--prefetch", 65), "--prefetch"),
    ]
    for args, word in cases:
        assert_one_sentence(run(*args), word)
    assert not out.exists() and not (tmp_path / "p.json").exists() and not (tmp_path / "r").exists()
    r = run("import-plan", sg, "--gpus", 4, "-o", tmp_path / "p.json", "--moe-layers", "1-26")
    assert r.exit_code == 0, r.output


def test_topology_bounds_holdout_and_current_plan(small_plan, tmp_path):
    o = tmp_path / "o.json"
    cases = [
        (("plan", "--gpus", 100000, "--solver", "contiguous", "-r", 99936, "-o", o), "--gpus"),
        (("plan", "--gpus", 4, "--solver", "eplb", "-r", 10 ** 23, "-o", o), "--redundant"),
        (("budget", "--gpus", 1000, "-b", "25%"), "--gpus"),
        (("evaluate", small_plan, "--holdout", 1.5), "got 1.5"),
        (("demo", "--gpus", 3, "--no-plots", "-o", tmp_path / "d"), "multiple of 3, e.g. --redundant 2"),
        # a plan for 4 GPUs is not the plan in service on 8 (same layers and slots, other GPUs)
        (("plan", "deepseek-v2-lite-esft:law", "--gpus", 8, "--solver", "contiguous", "--current", small_plan,
          "-o", o), "on 4 GPUs"),
    ]
    for args, word in cases:
        assert_one_sentence(run(*args), word)
    assert not o.exists() and not (tmp_path / "d").exists()


def test_inconsistent_plan_topology_names_the_file_fields(tmp_path):
    """A plan file whose topology does not hold together is blamed on its fields, not on CLI flags never given."""
    plan = tmp_path / "p.json"
    assert run("plan", "--gpus", 8, "--solver", "contiguous", "--gpus-per-node", 8, "--out", plan).exit_code == 0
    d = json.loads(plan.read_text())
    d["topology"]["num_gpus"] = 7
    plan.write_text(json.dumps(d))
    r = run("evaluate", plan)
    assert_one_sentence(r, "topology.gpus_per_node", "topology.num_gpus")
    assert "--gpus" not in r.output


def test_budget_sweep_errors_name_its_own_option():
    r = run("budget", "--gpus", 8, "--budgets", "abc")
    assert_one_sentence(r, "--budgets 'abc'")
    assert "--memory-budget" not in r.output


def test_import_plan_refuses_a_moeplace_plan(small_plan, tmp_path):
    r = run("import-plan", small_plan, "--gpus", 2, "-o", tmp_path / "x.json")
    assert_one_sentence(r, "already a moeplace plan")
    assert not (tmp_path / "x.json").exists()


# issue 22, items 11-13 and the SGLang import of README --------------------------------------------------------------
def test_merge_of_other_layouts_summarises_the_layers(tmp_path):
    """Traces of different MoE layers: one short sentence with counts and index runs, not two long lists."""
    from traces import RoutingTrace, datasets, save

    tr = datasets.load("deepseek-v2-lite-esft:law")
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    save(tr, a)
    save(RoutingTrace(expert_ids=tr.expert_ids[:50, :24], num_experts=64, moe_layer_index=np.arange(3, 27),
                      num_hidden_layers=27), b)
    r = run("merge", a, b, "--out", tmp_path / "m.npz")
    assert_one_sentence(r, "26 MoE layers (decoder layers 1-26)", "24 MoE layers (decoder layers 3-26)")
    assert len(r.output) < 300 and "np.int64" not in r.output
    from traces.merge import layer_summary

    assert layer_summary([1, 2, 3, 5, 7, 8, 10, 12, 14]) == \
        "9 MoE layers (decoder layers 1-3,5,7-8,10,... (2 more runs))"


def test_a_file_that_is_not_what_it_claims_gets_one_diagnosis(small_plan, tmp_path):
    """Random bytes named .npz are called random bytes by every command (import sglang used to advise
    --allow-pickle for them); a trace given where a plan goes is named as a trace."""
    rng = np.random.default_rng(0)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(rng.bytes(4096))
    pt = tmp_path / "garbage.pt"
    pt.write_bytes(rng.bytes(4096))
    trace = Path(__file__).resolve().parents[1] / "traces/data/deepseek-v2-lite-esft/esft_law.npz"
    o = tmp_path / "o"
    cases = [(("import", "sglang", garbage, "--out", o / "x.npz"), "garbage.npz is not a torch.save file"),
             (("import", "sglang", pt, "--out", o / "x.npz"), "garbage.pt is not a torch.save file"),
             (("import-plan", garbage, "--gpus", 8, "--out", o / "x.json"), "garbage.npz is not a .npz placement"),
             (("import-plan", pt, "--format", "eplb", "--gpus", 8, "--out", o / "x.json"), "is not a .pt placement"),
             (("plan", garbage, "--gpus", 8, "--out", o / "x.json"), "garbage.npz is not a NumPy .npz trace"),
             (("evaluate", garbage), "garbage.npz is not a plan file (JSON)")]
    for args, words in cases:
        r = run(*args)
        assert_one_sentence(r, words, "binary data in no format moeplace reads")
        assert "--allow-pickle" not in r.output and "pickled" not in r.output
    r = run("evaluate", trace)  # a trace where a plan is expected: no UTF-8 decode error
    assert_one_sentence(r, "esft_law.npz is not a plan file (JSON): it is a NumPy .npz archive", "--trace")
    assert "utf-8" not in r.output.lower()
    r = run("plan", small_plan, "--gpus", 4, "--out", o / "x.json")  # a plan where a trace is expected
    assert_one_sentence(r, "is not a NumPy .npz trace or counts file: it is a moeplace plan")
    assert not o.exists()


def test_out_dash_redundant_limit_and_few_fit_sequences(small_plan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (("plan", "--gpus", 8, "--solver", "eplb", "--out", "-"),
                 ("export", small_plan, "--format", "sglang", "--out", "-"),
                 ("merge", small_plan, "--out", "-"),
                 ("report", small_plan, "--no-plots", "--out", "-"),
                 ("demo", "--out", "-")):
        assert_one_sentence(run(*args), "--out -")
    assert not (tmp_path / "-").exists()
    # slots per GPU beyond one copy of every expert is nonsense: the limit follows the experts (64 x 7 on 8 GPUs)
    law = "deepseek-v2-lite-esft:law"
    assert_one_sentence(run("plan", law, "--gpus", 8, "--solver", "eplb", "-r", 65536, "-o", "o.json"), "at most 448")
    assert_one_sentence(run("plan", law, "--gpus", 8, "--solver", "eplb", "-r", 456, "-o", "o.json"), "at most 448")
    assert_one_sentence(run("demo", "--gpus", 8, "-r", 456, "-o", "d"), "at most 448")
    r = run("plan", law, "--gpus", 8, "--solver", "eplb", "-r", 448, "-o", "o.json")
    assert r.exit_code == 0, r.output  # every GPU holds every expert: the largest sensible plan
    from traces import datasets

    n = datasets.load(law).num_sequences
    r = run("plan", law, "--gpus", 8, "--solver", "eplb", "--holdout", 0.999, "-o", "few.json")
    assert r.exit_code == 0 and f"warning: --holdout 0.999 leaves 1 of {n} sequences" in " ".join(r.output.split())
    r = run("plan", law, "--gpus", 8, "--solver", "eplb", "--holdout", 0.5, "-o", "many.json")
    assert r.exit_code == 0 and "warning" not in r.output and n // 2 >= 16


def test_import_plan_reads_dense_rows_of_an_sglang_file(tmp_path):
    """README's 'import-plan current.json --format sglang --gpus 8': a DeepSeek file has 27 rows for 26 MoE
    layers; the dense row holds SGLang's trivial map and is recognised (with a note); a file of trivial rows only
    cannot say which are dense, and the note says how to tell it."""
    rng = np.random.default_rng(2)
    moe = np.stack([np.concatenate([rng.permutation(64), rng.integers(0, 64, 8)]) for _ in range(26)])
    trivial = np.arange(72) % 64
    sg = tmp_path / "current.json"
    sg.write_text(json.dumps({"physical_to_logical_map": np.vstack([trivial, moe]).tolist()}))
    r = run("import-plan", sg, "--format", "sglang", "--gpus", 8, "--out", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["moe_layer_index"] == list(range(1, 27)) and np.array_equal(plan["phy2log"], moe)
    assert "row 0 holds SGLang's trivial map" in " ".join(r.output.split())
    assert_one_sentence(run("import-plan", sg, "--format", "sglang", "--out", tmp_path / "q.json"), "--gpus 8")
    r = run("evaluate", tmp_path / "p.json", "--trace", "deepseek-v2-lite-esft:law")
    assert r.exit_code == 0, r.output  # fits the 26-layer trace as it is
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"physical_to_logical_map": [trivial.tolist()] * 27}))
    r = run("import-plan", flat, "--format", "sglang", "--gpus", 8, "--out", tmp_path / "f.json")
    assert r.exit_code == 0 and "--moe-layers (DeepSeek-V2-Lite: 1-26)" in " ".join(r.output.split())
    assert len(json.loads((tmp_path / "f.json").read_text())["phy2log"]) == 27
