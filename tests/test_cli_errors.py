"""Bad input found by fuzzing the CLI: one sentence, exit code 2, no traceback, no output file left behind."""

from __future__ import annotations

import json

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
