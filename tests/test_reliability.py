"""The command line under real conditions: a closed stdout pipe, Ctrl-C and SIGTERM during every solver back end,
SIGKILL during a report, unwritable outputs, missing optional extras. Real subprocesses and real signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
TRACE = "deepseek-v2-lite-esft:law"


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then installs its KeyboardInterrupt handler, as in a shell


def moeplace(*args, stdout=subprocess.PIPE, cwd=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "placement.cli", *map(str, args)], stdout=stdout,
                            stderr=subprocess.PIPE, env=ENV, cwd=cwd, preexec_fn=_default_sigint, **kw)


def _descendants(pid: int) -> set[int]:
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _wait_for(predicate, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


# 1. a closed stdout ------------------------------------------------------------------------------------------------
def _closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone: the first print gets EPIPE (as after '| head -1')."""
    r, w = os.pipe()
    os.close(r)
    return w


def test_closed_stdout_keeps_the_plan_and_the_report(tmp_path):
    w = _closed_pipe()
    p = moeplace("plan", TRACE, "--gpus", 8, "--solver", "eplb", "--out", tmp_path / "p.json", stdout=w)
    os.close(w)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()
    assert json.loads((tmp_path / "p.json").read_text())["format"] == "moeplace.plan"
    w = _closed_pipe()
    p = moeplace("report", tmp_path / "p.json", "--trace", TRACE, "--no-plots", "--out", tmp_path / "rep", stdout=w)
    os.close(w)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert {"report.md", "report.html", "report.json"} <= {f.name for f in (tmp_path / "rep").iterdir()}
    w = _closed_pipe()  # --json writes with print_json, not rich
    p = moeplace("plan", TRACE, "--gpus", 8, "--solver", "eplb", "--json", "--out", tmp_path / "q.json", stdout=w)
    os.close(w)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and b"Traceback" not in err and (tmp_path / "q.json").exists(), err.decode()


# 2. Ctrl-C and SIGTERM ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver,backend,sig", [("exflow", "cp-sat", signal.SIGINT),
                                                ("moetuner", "highs", signal.SIGTERM),
                                                ("moetuner", "cbc", signal.SIGTERM)])
def test_interrupt_stops_the_solve_at_once(tmp_path, solver, backend, sig):
    """During the back end's solve (its child process running, for HiGHS and CBC): exit 130 within seconds, no
    plan written, no process left behind. Before, CP-SAT caught Ctrl-C itself and the plan ran to its limit."""
    out = tmp_path / "x.json"
    p = moeplace("plan", TRACE, "--gpus", 8, "--solver", solver, "--backend", backend, "--time-limit", 120,
                 "--out", out)
    lines = []

    def solving() -> bool:  # stderr's first line says the solve started; child back ends show up as processes
        if not lines:
            line = p.stderr.readline()
            if line:
                lines.append(line)
            return False
        return backend == "cp-sat" or bool(_descendants(p.pid))

    assert _wait_for(solving, 120, step=0.01), "the solve never started"
    time.sleep(1.0)  # well inside the back end
    children = _descendants(p.pid)
    assert backend == "cp-sat" or children, "no back-end process to kill"
    t0 = time.monotonic()
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    stopped = time.monotonic() - t0
    assert p.returncode == 130, (p.returncode, err.decode())
    assert stopped < 5, f"took {stopped:.1f} s to stop"
    assert b"Traceback" not in err and (b"interrupted" in err or b"terminated" in err), err.decode()
    assert not out.exists() and not list(tmp_path.iterdir())
    assert _wait_for(lambda: not any(_alive(c) for c in children), 5), "a back-end process outlived the command"


# 3. reports: whole or not at all ------------------------------------------------------------------------------------
def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("plans")
    for solver in ("eplb", "round-robin"):
        p = moeplace("plan", TRACE, "--gpus", 8, "--solver", solver, "--out", d / f"{solver}.json")
        assert p.wait(timeout=300) == 0
    return [d / "eplb.json", d / "round-robin.json"]


def _report(plans, out, *extra) -> subprocess.Popen:
    return moeplace("report", *plans, "--trace", TRACE, "--out", out, *extra)


def _staging(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".mp-")]


def _staged_png(parent: Path) -> bool:
    try:
        return any(s.is_dir() and any(s.rglob("*.png")) for s in _staging(parent))
    except OSError:  # the staging folder went away while we looked
        return False


def test_report_folder_is_replaced_whole_or_not_at_all(plans, tmp_path):
    """Ctrl-C and SIGKILL while the new report's plots are being drawn leave the old report as it was; the next
    report removes what the killed one left, replaces the old report's own files (its plots too) and keeps the
    user's; a folder moeplace did not write is refused before any work."""
    from traces.outputs import MANIFEST

    rep = tmp_path / "rep"
    assert _report(plans, rep, "--plots").wait(timeout=300) == 0
    assert (rep / "plots" / "tradeoff.png").exists()
    (rep / "notes.txt").write_text("mine")  # a file of the user's in the report folder
    before = _digest(rep)
    for sig in (signal.SIGINT, signal.SIGKILL):
        p = _report(plans, rep, "--plots", "--title", "new")
        assert _wait_for(lambda: _staged_png(tmp_path), 240), "no plot was staged"
        p.send_signal(sig)
        p.communicate(timeout=60)
        assert p.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
        assert _digest(rep) == before  # the old report, untouched: no new plot, no mixed page
        if sig == signal.SIGINT:
            assert not _staging(tmp_path)  # an interrupt cleans up after itself
    assert _staging(tmp_path), "SIGKILL left no staging folder (nothing to clean up: the test did not test)"
    assert _report(plans[:1], rep, "--no-plots", "--title", "new").wait(timeout=300) == 0
    assert not _staging(tmp_path)  # the next write to the folder removed what the killed one left
    assert "new" in (rep / "report.md").read_text().splitlines()[0]
    assert (rep / "notes.txt").read_text() == "mine"  # the user's file is kept in the new report folder
    assert not (rep / "plots").exists()  # the previous report's plots went with it: no mixed report
    assert set(json.loads((rep / MANIFEST).read_text())["files"]) == {"report.md", "report.html", "report.json"}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    p = _report(plans[:1], foreign, "--no-plots")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and b"not empty and was not written by moeplace" in err, err.decode()
    assert [f.name for f in foreign.iterdir()] == ["thesis.tex"]


def test_stale_temporaries_rule(tmp_path):
    """Removed: this machine's temporaries whose process has ended, and any older than a day. Kept: those of a
    running process, young ones of unknown owner, and everything else."""
    from traces import outputs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    m = outputs._MACHINE
    names = {f".mp-{m}-{dead.pid}-abc123.tmp": False, f".mp-{m}-{dead.pid}-def456.bak": False,
             f".mp-{m}-{os.getpid()}-ghi789.tmp": True, ".mp-k2j4h5g6.tmp": True, ".mp-0a1b2c3d.bak": False,
             "mp-notours.tmp": True, ".mp-data.json": True}
    for n in names:
        (tmp_path / n).write_text("x")
    (tmp_path / f".mp-{m}-{dead.pid}-dir99.tmp").mkdir()  # a staging folder of a killed report
    (tmp_path / f".mp-{m}-{dead.pid}-dir99.tmp" / "report.md").write_text("partial")
    old = time.time() - 2 * outputs.STALE_SECONDS
    os.utime(tmp_path / ".mp-0a1b2c3d.bak", (old, old))
    outputs.atomic_write_bytes(tmp_path / "out.json", lambda f: f.write(b"{}"))
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n, keep in names.items() if keep} | {"out.json"}


# 4. unwritable outputs fail before the work ---------------------------------------------------------------------------
def test_unwritable_output_fails_before_any_work(tmp_path):
    cases = [("plan", TRACE, "--gpus", 8, "--solver", "exflow", "--time-limit", 60, "--out", "/proc/moeplace/o.json"),
             ("report", "p.json", "--out", "/proc/moeplace-report"),
             ("demo", "--out", "/proc/moeplace-demo"),
             ("plan", TRACE, "--gpus", 8, "--out", "-")]
    if os.geteuid() != 0:  # a folder without write permission (root writes anyway; /proc covers root)
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        cases.append(("plan", TRACE, "--gpus", 8, "--solver", "exflow", "--out", ro / "o.json"))
    for args in cases:
        t0 = time.monotonic()
        p = moeplace(*args)
        _, err = p.communicate(timeout=120)
        text = err.decode()
        assert p.returncode == 2 and text.startswith("error:") and "Traceback" not in text, (args, text)
        assert "planning" not in text and time.monotonic() - t0 < 30, (args, text)


# 5. optional extras ----------------------------------------------------------------------------------------------------
HIDE = """
import importlib.abc, json, sys
class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Hidden())
from typer.testing import CliRunner
from placement.cli import app
results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    results.append([r.exit_code, r.output, repr(r.exception)])
print(json.dumps(results))
"""


def test_missing_extras_name_the_extra_to_install(plans, tmp_path):
    dump = tmp_path / "dump.pt"
    import torch

    torch.save({"logical_count": torch.zeros(2, 3, 4, dtype=torch.int32)}, dump)
    cases = [(["bench", str(plans[0]), "--trace", TRACE], 'pip install "moeplace[torch]"'),
             (["collect", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--out",
               str(tmp_path / "c.npz")], 'pip install "moeplace[torch]"'),
             (["import", "sglang", str(dump), "--out", str(tmp_path / "s.npz")], 'pip install "moeplace[torch]"'),
             (["import-plan", str(dump), "--format", "eplb", "--gpus", "4", "--out", str(tmp_path / "i.json")],
              'pip install "moeplace[torch]"'),
             (["report", str(plans[0]), "--trace", TRACE, "--plots", "--out", str(tmp_path / "r")],
              'pip install "moeplace[plot]"'),
             (["affinity", TRACE, "--plots", str(tmp_path / "a")], 'pip install "moeplace[plot]"'),
             (["budget", "--gpus", "1", "--plot", str(tmp_path / "c.png")], 'pip install "moeplace[plot]"'),
             (["plan", TRACE, "--gpus", "8", "--solver", "eplb", "--ray-address", "local", "--out",
               str(tmp_path / "p.json")], 'pip install "moeplace[ray]"'),
             (["calibrate", "--out", str(tmp_path / "hw.json")], 'pip install "moeplace[torch]"'),
             (["replay", "esft-drift:counts", "--gpus", "8", "--window", "4", "--interval", "4", "--plot",
               str(tmp_path / "c.png")], 'pip install "moeplace[plot]"'),
             (["demo", "--plots", "--out", str(tmp_path / "d")], 'pip install "moeplace[plot]"')]
    script = HIDE.format(hidden={"torch", "transformers", "matplotlib", "ray"})
    r = subprocess.run([sys.executable, "-c", script, json.dumps([a for a, _ in cases])], capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    for (args, extra), (code, output, exc) in zip(cases, json.loads(r.stdout)):
        assert code == 2 and extra in " ".join(output.split()), (args, output, exc)
        assert "Traceback" not in output and "ModuleNotFoundError" not in exc, (args, output, exc)
    assert not any(tmp_path.glob("*.npz")) and not (tmp_path / "r").exists() and not (tmp_path / "c.png").exists()
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "hw.json").exists() and not (tmp_path / "d").exists()
    # with collect's extra present but transformers hidden, it names the hf extra
    script = HIDE.format(hidden={"transformers"})
    r = subprocess.run([sys.executable, "-c", script, json.dumps([cases[1][0]])], capture_output=True, text=True,
                       env=ENV, timeout=600)
    code, output, _ = json.loads(r.stdout)[0]
    assert code == 2 and 'pip install "moeplace[hf]"' in " ".join(output.split()), output


def test_a_report_folder_from_before_manifests_is_replaced_and_keeps_the_users_files(tmp_path):
    """A demo folder written by an earlier moeplace (no manifest): its report, plots, plans and exports are the
    report's own and are replaced; any other file is the user's and stays."""
    from traces.outputs import MANIFEST, output_folder

    old = tmp_path / "moeplace-demo"
    (old / "plots").mkdir(parents=True)
    (old / "report.json").write_text(json.dumps({"title": "moeplace demo: DeepSeek-V2-Lite"}))
    for name in ("report.md", "plots/tradeoff.png", "plan-eplb-global.json", "sglang-joint.json", "notes.txt"):
        (old / name).write_text("old")
    with output_folder(old, "moeplace demo") as stage:
        (stage / "report.md").write_text("new")
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file()) == \
        [MANIFEST, "notes.txt", "report.md"]
    assert (old / "report.md").read_text() == "new" and (old / "notes.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["moeplace-demo"]  # no staging or backup left
