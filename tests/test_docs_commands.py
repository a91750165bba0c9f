"""Every `moeplace` command in README.md and docs/ works as written, in the order the page gives it.

Each page runs in a fresh folder that holds what a user brings and no command makes: a checkpoint (`./my-moe`),
prompts, serving-stack dumps, trace shards (`dumps/`), the placement file a server runs (built here from a slice
of the bundled real trace, by the stacks' own formats). What belongs to the user's machine in the docs
(`/models/...`, `/data/...`, the Ray cluster of `--ray-address auto`) is mapped to that folder and a private Ray
cluster (:data:`USER_PATHS`); that and the time cap below are the only changes to the commands.

- default tier (:func:`test_documented_commands_run_in_order`): every command is parsed by the real CLI, every
  file it reads exists at that point of the page, and it runs in-process with solver time limits capped at 1 s,
  ``--workers 1`` and ``calibrate`` measuring its smallest sizes briefly;
  ``collect``, ``bench``, ``budget``, ``sglang-launch`` and ``--ray-address`` (a model forward, torch.distributed
  processes, a cache simulation, an SGLang server, a Ray cluster: run by their own tests) are parsed and checked
  only, ``bench``
  with the checks it makes before it launches ranks.
- slow tier (:func:`test_documented_commands_run_verbatim`, ``pytest -m slow``): every command exactly as written,
  through bash, in a subprocess, ``collect`` and ``bench`` included.

Not run: lines of other programs (pip, python -m sglang, vllm serve, trtllm-serve, torchrun, curl), blocks tagged
``text`` (usage synopses) and docs/benchmarks.md, whose commands regenerate measured tables (minutes each; the
page names the command and machine of each table). A command that needs CUDA is skipped without a GPU.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from placement.cli import app
from traces import datasets, layer_counts, save

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md")
                                      if p.name not in ("cli.md", "benchmarks.md"))
USER_PATHS = {"/models/Qwen3-30B-A3B": "my-moe", "/data/sglang-dumps/": "sglang-dumps/", "/data/trt-stats": "trt-stats",
              "--ray-address auto": "--ray-address local"}  # the user's machine: paths, the Ray cluster
NOT_COMMANDS = ("text", "json", "python", "yaml", "toml")
runner = CliRunner()


def documented_commands(page: Path) -> list[str]:
    """The `moeplace ...` lines of a page's code blocks, continuation lines joined, in order."""
    found, lang, inside, pending = [], "", False, ""
    for line in page.read_text().splitlines():
        fence = re.match(r"^```\s*([\w-]*)", line)
        if fence:
            inside, lang, pending = not inside, fence.group(1) if not inside else "", ""
            continue
        if not inside or lang in NOT_COMMANDS:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.startswith("moeplace "):
            for user, here in USER_PATHS.items():
                line = line.replace(user, here)
            found.append(line)
    return found


def test_pages_have_commands():
    """The parser finds the commands the pages show (a changed fence or prompt must not hide them)."""
    counts = {p.name: len(documented_commands(p)) for p in PAGES}
    assert counts["README.md"] >= 15 and counts["serving.md"] >= 8 and counts["collect.md"] >= 4, counts
    assert "moeplace budget [TRACE...]" not in " ".join(documented_commands(ROOT / "docs" / "memory-budget.md"))


# what a user brings ------------------------------------------------------------------------------------------------
def _slice(sequences: int):
    """Whole sequences of the bundled real trace."""
    tr = datasets.load()
    return tr.take(tr.sequence_index() < sequences)


def _sglang_dump(tr, path: Path, p2l: np.ndarray) -> None:
    """An SGLang per_token recorder dump of ``tr`` (one forward pass, first replica of each expert), as SGLang's
    recorder writes it (see tests/test_importers.py for the format's details)."""
    import torch

    tr = tr.take(np.lexsort((tr.pos_in_seq, tr.sequence_index())))
    L_all, P = p2l.shape
    n = tr.num_tokens
    topk = np.full((L_all, n, 8), -1, dtype=np.int32)
    for j, layer in enumerate(tr.moe_layer_index):
        first = np.array([np.flatnonzero(p2l[layer] == e)[0] for e in range(tr.num_experts)])
        topk[layer, :, :tr.top_k] = first[tr.expert_ids[:, j]]
    seq = tr.sequence_index()
    record = dict(forward_pass_id=0, rank=0, gatherer_key="primary", input_ids=list(range(n)),
                  positions=tr.pos_in_seq.tolist(), extend_seq_lens=np.bincount(seq).tolist(), forward_mode=1,
                  topk_ids_of_layer=torch.from_numpy(topk), misc_objects=[],
                  global_physical_count=torch.zeros((L_all, P), dtype=torch.int32))
    torch.save(dict(records=[record], last_physical_to_logical_map=torch.from_numpy(p2l)), path)


def _b64npy(a: np.ndarray) -> str:
    import base64
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def _plan_file(tr, gpus: int, redundant: int, solver: str = "eplb"):
    from placement.plan import Plan
    from placement.problem import build_problem
    from solvers import Options, Topology, solve

    topo = Topology.for_experts(tr.num_experts, gpus, redundant)
    res = solve(solver, build_problem(tr, topo), Options())
    return Plan.from_result(res, tr.num_experts, topo, tr.moe_layer_index, tr.decoder_layers, tr.model)


def _tiny_checkpoint(folder: Path, real_model: bool) -> None:
    """A Qwen2-MoE-layout checkpoint: config.json always; weights and a tokenizer when ``real_model``."""
    cfg = dict(model_type="qwen2_moe", vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=4,
               num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=64, num_experts=8,
               num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
               norm_topk_prob=False, torch_dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    if not real_model:
        (folder / "config.json").write_text(json.dumps(cfg))
        return
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).eval()
    model.save_pretrained(folder)
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>"] + [f"w{i}" for i in range(90)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)


def user_files(folder: Path, real_model: bool = False) -> Path:
    """The inputs a user brings (see the module docstring), from 96 sequences of the bundled trace."""
    import torch
    from safetensors.numpy import save_file

    from placement.export import exporters

    tr = _slice(96)
    seq = tr.sequence_index()
    (folder / "dumps").mkdir()
    for r in range(4):  # four ranks' traces; README merges two of them (48 sequences) and reads all from dumps/
        save(tr.take(seq % 4 == r), folder / f"rank{r}.npz")
        shutil.copy(folder / f"rank{r}.npz", folder / "dumps")
    half = tr.take(seq % 2 == 0)
    save(half, folder / "trace.npz")  # the user's trace, for the pages that start from one
    _tiny_checkpoint(folder / "my-moe", real_model)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 90}"
                                                                             for j in range(4 + i % 5))}) + "\n"
                                                  for i in range(12)))
    rng = np.random.default_rng(1)
    p2l = np.stack([np.concatenate([rng.permutation(64), rng.integers(0, 64, 8)]) for _ in range(tr.decoder_layers)])
    (folder / "sglang-dumps").mkdir()
    for r in range(2):
        part = half.take(half.sequence_index() % 2 == r)
        _sglang_dump(part, folder / f"expert_distribution_recorder_1700000000.0_{r}.pt", p2l)
        shutil.copy(folder / f"expert_distribution_recorder_1700000000.0_{r}.pt", folder / "sglang-dumps")
    with open(folder / "responses.jsonl", "w") as f:  # vLLM completions with routed_experts, one per request
        for s in np.unique(seq)[:8]:
            part = tr.expert_ids[seq == s]
            a = np.zeros((part.shape[0], tr.decoder_layers, tr.top_k), dtype=np.int32)
            a[:, tr.moe_layer_index] = part
            f.write(json.dumps({"id": f"cmpl-{s}", "choices": [{"index": 0, "routed_experts": _b64npy(a)}]}) + "\n")
    stats = folder / "trt-stats"  # TensorRT-LLM EXPERT_STATISTIC_PATH
    stats.mkdir()
    (stats / "meta_info.json").write_text(json.dumps({"num_experts": 64, "num_experts_per_token": tr.top_k}))
    counts = layer_counts(tr.expert_ids, 64).astype(np.int64)
    save_file({f"100_{int(layer)}": counts[j] for j, layer in enumerate(tr.moe_layer_index)},
              str(stats / "rank0.safetensors"))
    # the placements servers run today: SGLang (README), vLLM's initial expert map, EPLB's phy2log (serving.md)
    running = _plan_file(half, 8, 8)
    (folder / "current.json").write_text(exporters()["sglang"].export(running)[0])
    (folder / "initial_expert_map.json").write_text(exporters()["vllm"].export(running)[0])
    torch.save(torch.from_numpy(running.phy2log), folder / "phy2log.pt")
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return user_files(tmp_path_factory.mktemp("user-files"))


# running -----------------------------------------------------------------------------------------------------------
def _command(args: list[str]):
    group = typer.main.get_command(app)
    assert args and args[0] in group.commands, f"'moeplace {args[0] if args else ''}' is not a command"
    return group.commands[args[0]]


def _reads(cmd, args: list[str]) -> list[str]:
    """Files and folders the parsed command reads (its arguments and path options other than outputs)."""
    ctx = cmd.make_context(args[0], list(args[1:]))  # raises click's usage error on a wrong option or value
    outputs = {"out_path", "out_dir", "plots", "plot", "shard_dir"}
    paths = []
    for name, value in ctx.params.items():
        if name in outputs or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            text = str(v)
            if re.search(r"\.(json|npz|pt|yaml|jsonl|npy)$", text) or "/" in text:
                paths.append(text)
    return paths


def _expand(args: list[str]) -> list[str]:
    out = []
    for a in args:
        out += sorted(glob.glob(a)) or [a] if any(c in a for c in "*?[") else [a]
    return out


CAPS = (("--time-limit", "1"), ("--workers", "1"),  # solvers, and the work in this process
        ("--seconds-per-point", "0.01"), ("--tokens-per-expert", "16"), ("--tokens-per-peer", "8"),  # calibrate
        ("--copy-size", "1MiB"))


def _capped(cmd, args: list[str]) -> list[str]:
    """The default tier's only change: solver time limits at 1 s, the work in this process (``--workers 1``:
    parallel runs give the same results by design, tests/test_parallel.py checks that) and ``calibrate``'s
    measurements at their smallest sizes (its own tests check the figures)."""
    for option, value in CAPS:
        if not any(option in p.opts for p in cmd.params):
            continue
        if option in args:
            i = args.index(option)
            args = args[:i + 1] + [value] + args[i + 2:]
        else:
            args = args + [option, value]
    return args


HEAVY = ("collect", "bench", "budget", "sglang-launch")  # the default tier parses and checks these; their own tests
# run them (sglang-launch starts an SGLang server: tests/test_online_stacks.py runs it with a stand-in launcher)
HEAVY_OPTIONS = ("--ray-address",)  # a Ray cluster starts in 6 to 15 s: parsed and checked, run in the slow tier


def _bench_preflight(cmd, args: list[str]) -> None:
    """What ``bench`` checks before it launches ranks: every plan fits the world size and the trace."""
    from placement.cli_common import load_data, load_plans
    from placement.commands.bench import _check_plans

    p = cmd.make_context(args[0], list(args[1:])).params
    plans = load_plans(p["plans"])
    data = load_data(p["trace"])[0]
    if p["holdout"]:
        data = data.split_by_sequence(1.0 - p["holdout"], seed=p["seed"])[1]
    _check_plans(plans, p["plans"], p["world_size"] or plans[0].topology.num_gpus, data)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_run_in_order(page, inputs, tmp_path, monkeypatch):
    """Default tier: parsed, inputs present, run in-process (time limits capped at 1 s; collect/bench parsed)."""
    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    monkeypatch.chdir(work)
    for line in documented_commands(page):
        args = _expand(shlex.split(line, comments=True)[1:])
        cmd = _command(args)
        for path in _reads(cmd, args):
            bundled = path.split(":")[0] in datasets.available()
            assert bundled or Path(path).exists(), f"{page.name}: '{line}' reads {path}, which nothing made before it"
        if args[0] == "bench":
            _bench_preflight(cmd, args)
        if args[0] in HEAVY or any(o in args for o in HEAVY_OPTIONS):
            continue
        r = runner.invoke(app, _capped(cmd, args))
        assert r.exit_code == 0, f"{page.name}: '{line}' failed:\n{r.output}"
        out = re.search(r"--out\s+(\S+)|--plots\s+(\S+)", line)
        if out:
            assert Path(out.group(1) or out.group(2)).exists(), f"{page.name}: '{line}' wrote no {out.group(0)}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_commands_run_verbatim(page, tmp_path):
    """Slow tier: each command exactly as written (user paths mapped), through bash, in order."""
    pytest.importorskip("transformers")
    work = tmp_path / "work"
    work.mkdir()
    user_files(work, real_model=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "moeplace"  # the moeplace of this checkout, whatever is installed
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m placement.cli \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    import torch

    for line in documented_commands(page):
        if "--device cuda" in line and not torch.cuda.is_available():
            continue
        if line.startswith("moeplace sglang-launch"):  # starts a server: needs SGLang and the model's GPUs
            continue
        p = subprocess.Popen(["bash", "-c", line], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        try:  # on a 2-core CPU, runtime.md's 4-rank bench takes about 20 minutes
            out, err = p.communicate(timeout=2400)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)  # the command and every process it started (bench ranks)
            out, err = p.communicate()
        assert p.returncode == 0, f"{page.name}: '{line}' failed:\n{out[-2000:]}\n{err[-2000:]}"
        assert "Traceback" not in err, err
