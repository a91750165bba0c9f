"""Helpers every CLI command shares: one-sentence errors with exit code 2, consoles, loading trace arguments, the
default solver and the metrics table."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.text import Text

from placement.plan import Plan, PlanError
from solvers import SolverInputError
from traces import LoadProfile, RoutingTrace, TraceError
from traces.format import OutputPathError, command_files
from placement.stopping import Terminated, stoppable
from traces.outputs import check_writable


def _silence(stream) -> None:
    """After a closed pipe on ``stream`` (stdout or stderr): later output goes to /dev/null, so the command finishes
    its work and keeps its files, as a Unix tool does under ``| head``."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich's default exits with code 1, and the command's files are rolled back
        self.quiet = True
        _silence(self.file)


out = _Console(soft_wrap=True)  # tables and JSON: stdout
err = _Console(stderr=True, soft_wrap=True)  # progress and errors: stderr (a terminal wraps; logs keep lines whole)


@contextlib.contextmanager
def progress(text: str, every: float = 10.0):
    """Progress of long work on stderr: a spinner whose text ``update(message)`` replaces on a terminal; elsewhere
    (a log file, CI) one line per message with the seconds elapsed, at most one line per ``every`` seconds."""
    if err.is_terminal:
        with err.status(text) as status:
            yield status
        return

    class Lines:
        def __init__(self) -> None:
            self.start = self.last = time.monotonic()
            err.print(text, markup=False, highlight=False)

        def update(self, message: str) -> None:
            now = time.monotonic()
            if now - self.last >= every:
                self.last = now
                err.print(f"[{now - self.start:.0f} s] {message}", markup=False, highlight=False)

    yield Lines()


class UserError(ValueError):
    """Bad input at the CLI boundary (one sentence)."""


USER_ERRORS = (UserError, TraceError, SolverInputError, PlanError, OutputPathError)

# input-error classes of modules the CLI imports lazily (module, class name): caught when the module is loaded
# (an exception of a class whose module was never imported cannot be raised, so nothing is imported here)
LAZY_USER_ERRORS = (("placement.runtime", "RuntimeInputError"), ("placement.export", "ExportError"),
                    ("placement.plots", "PlotsUnavailable"), ("placement.executor", "ExecutorError"),
                    ("placement.hardware", "HardwareError"))


def _is_lazy_user_error(exc: BaseException) -> bool:
    for module, name in LAZY_USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def fail(message: str) -> None:
    """Print one sentence to stderr and exit with code 2. The message is printed as plain text: file names and
    messages such as "must be a [T, k] array" contain brackets that rich would read as markup."""
    err.print(Text.assemble(("error:", "bold red"), " ", str(message)), highlight=False)
    raise typer.Exit(2)


def _os_error_message(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else ""
    reason = (exc.strerror or type(exc).__name__).rstrip(".")
    reason = reason[:1].lower() + reason[1:]
    if isinstance(exc, FileExistsError):
        return f"{name} exists and is not a folder; give another output folder"
    if isinstance(exc, NotADirectoryError):
        return f"{name}: a part of this path is an existing file, not a folder; choose another path"
    if name:
        return f"{name}: {reason}; check the path and try again"
    return f"{reason}; check the paths given and try again"


# upper bounds that keep the planners' memory sane: their GPU x GPU tables grow with layers x experts x GPUs^2
# (512 GPUs on a 26-layer, 64-expert trace take about 8 GB); no expert-parallel group deployed today is larger
MAX_GPUS = 512
MAX_REDUNDANT = 65536


def check_common_options(values: dict) -> None:
    """Options several commands share, checked once for all of them (by parameter name): ``--seed`` (a numpy
    seed: not negative), ``--threads`` (at least 1), ``--time-limit`` (positive seconds), ``--gpus`` (1 to
    :data:`MAX_GPUS`), ``--redundant`` (at most :data:`MAX_REDUNDANT`), ``--holdout`` (a share in [0, 1)),
    ``--workers`` and ``--work-limit`` (at least 1)."""
    def given(name: str) -> int | None:  # an integer option's value (typer gives ints; bool is an int too)
        v = values.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    seed = given("seed")
    if seed is not None and seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}")
    workers = given("workers")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}; leave it out to use every core")
    work = given("work_limit")
    if work is not None and work < 1:
        raise UserError(f"--work-limit must be at least 1 (iterated-search kicks per layer), got {work}")
    threads = given("threads")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}; leave it out to use the default")
    gpus = given("gpus")
    if gpus is not None and not 1 <= gpus <= MAX_GPUS:
        raise UserError(f"--gpus must be between 1 and {MAX_GPUS}, got {gpus}"
                        + ("" if gpus < 1 else "; moeplace plans expert-parallel groups of at most that size"))
    redundant = given("redundant")
    if redundant is not None and redundant > MAX_REDUNDANT:
        raise UserError(f"--redundant must be at most {MAX_REDUNDANT} slots in total, got {redundant}")
    holdout = values.get("holdout")
    if isinstance(holdout, float) and not 0.0 <= holdout < 1.0:
        raise UserError(f"--holdout must be in [0, 1), got {holdout}")
    limit = values.get("time_limit")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and not (math.isfinite(limit) and limit > 0):
        raise UserError(f"--time-limit must be a positive number of seconds, got {limit}")


OUTPUT_FILES = ("out_path", "plot")  # parameter names of output files, checked before a command does any work
OUTPUT_FOLDERS = {"out_dir": True, "plots": False, "shard_dir": False}  # output folders: replaced as a whole?


def check_outputs(values: dict) -> None:
    """Every output path among a command's parameters (:data:`OUTPUT_FILES`, :data:`OUTPUT_FOLDERS`) can be
    written: checked (with a real probe, :func:`traces.outputs.check_writable`) before any long work, so a
    read-only or mistyped path fails at once, not after the solve."""
    for name in OUTPUT_FILES:
        if isinstance(values.get(name), (str, os.PathLike)):
            check_writable(values[name])
    for name, whole in OUTPUT_FOLDERS.items():
        if isinstance(values.get(name), (str, os.PathLike)):
            check_writable(values[name], folder=True, whole=whole)


# optional dependencies: module -> the extra that installs it (pyproject.toml)
EXTRAS = {"torch": "torch", "transformers": "hf", "safetensors": "hf", "matplotlib": "plot"}


def torchrun_world(world_size: int | None) -> tuple[bool, int, int | None]:
    """``(under torchrun, this process's rank, world size)`` for commands that launch ranks: under torchrun its
    ``WORLD_SIZE`` (a disagreeing ``--world-size`` is a :class:`UserError`), else ``world_size`` as given (None:
    the command's own default)."""
    import os

    from placement.runtime import under_torchrun

    if not under_torchrun():
        return False, 0, world_size
    env_world = int(os.environ["WORLD_SIZE"])
    if world_size is not None and world_size != env_world:
        raise UserError(f"--world-size {world_size} disagrees with torchrun's WORLD_SIZE={env_world}; drop "
                        f"--world-size under torchrun")
    return True, int(os.environ.get("RANK", 0)), env_world


def require(module: str, what: str) -> None:
    """A :class:`UserError` naming the extra to install unless ``module`` (an optional dependency) imports."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module, module)
        raise UserError(f"{what} needs {module}, which this Python cannot import ({exc}); install it with: "
                        f"pip install \"moeplace[{extra}]\"") from None


def _stdout_closed() -> bool:
    """Whether nobody reads stdout any more (the reader of its pipe is gone)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def check_redundant(redundant: int, num_experts: int, gpus: int) -> None:
    """Redundant slots beyond one copy of every expert on every GPU (``num_experts * (gpus - 1)``) would put two
    copies of an expert on one GPU: a :class:`UserError` naming the limit."""
    limit = num_experts * (gpus - 1)
    if redundant > limit:
        raise UserError(f"--redundant {redundant} is more than {num_experts} experts x {gpus} GPUs can use: at most "
                        f"{limit} redundant slots ({num_experts} + {limit} = {num_experts + limit} slots, every GPU "
                        f"holding every expert once)")


MIN_FIT_SEQUENCES = 16  # below this, a plan fitted on the sequences left by --holdout is mostly noise


def user_errors(fn: Callable) -> Callable:
    """Turn the project's input errors (and missing/unreadable files) into one sentence + exit code 2; checks the
    options :func:`check_common_options` knows and the output paths (:func:`check_outputs`) before the command
    runs. Ctrl-C and SIGTERM stop the command with exit code 130, leaving no output and no process it started. A
    closed stdout (``| head``) ends the printing, not the command: its files are kept, the exit code is 0."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_common_options(kwargs)
            check_outputs(kwargs)
            with command_files(), stoppable():  # no output replaces an input; a failing command leaves no new file
                try:
                    return fn(*args, **kwargs)
                except BrokenPipeError:
                    if not _stdout_closed():
                        raise
                    _silence(sys.stdout)
                    raise typer.Exit(0) from None
        except USER_ERRORS as exc:
            fail(str(exc))
        except FileNotFoundError as exc:
            fail(f"{exc.filename or exc}: no such file or folder")
        except IsADirectoryError as exc:
            fail(f"{exc.filename}: is a folder, a file was expected")
        except PermissionError as exc:
            fail(f"{exc.filename}: permission denied")
        except OSError as exc:  # file name too long, read-only file system, disk full, a file where a folder is due
            fail(_os_error_message(exc))
        except MemoryError:
            fail("this problem does not fit in memory; use fewer GPUs, slots or layers, or a smaller trace")
        except (ValueError, RuntimeError) as exc:
            if _is_lazy_user_error(exc):
                fail(str(exc))
            raise
        except KeyboardInterrupt as exc:
            with contextlib.suppress(OSError):
                err.print("terminated" if isinstance(exc, Terminated) else "interrupted", markup=False,
                          highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def load_data(paths: list[str] | None, default_bundled: bool = True) -> tuple[RoutingTrace | LoadProfile, list[str]]:
    """Load trace arguments: files (.npz token traces or counts), folders or glob patterns of such shards, or
    bundled dataset names.

    Several token traces are concatenated (distinct sequence ids); if any argument is counts-only, every
    argument becomes a count profile and they are stacked as separate profiles.
    Returns the data and the list of sources (for provenance).
    """
    from traces import datasets, load

    if not paths:
        if not default_bundled:
            raise UserError("give at least one trace file")
        paths = [datasets.DEFAULT]
    items, names = [], []
    for p in paths:
        name = p.split(":", 1)[0]
        if not Path(p).exists() and name in datasets.available():
            items.append(datasets.load(p) if name == datasets.DEFAULT else _bundled_counts(p))
            names.append(p)
        else:
            for f in _shard_files(p):  # a file, or every shard of a folder or glob pattern
                items.append(load(f))
                names.append(str(f))
    for p, item in zip(names, items):  # a valid file that routes nothing would give NaN metrics and empty plans
        empty = (item.expert_ids < 0).all() if isinstance(item, RoutingTrace) else not (item.logical_count > 0).any()
        if empty:
            raise UserError(f"{p} routes no token to any expert (every id is -1 or every count 0); give a trace of "
                            "a run that used the MoE layers")
    if all(isinstance(i, RoutingTrace) for i in items):
        return (RoutingTrace.concat(items) if len(items) > 1 else items[0]), list(paths)
    return LoadProfile.concat([i.load_profile() for i in items]), list(paths)


def _shard_files(arg: str) -> list[Path]:
    """The files behind one trace argument: the file, or a folder's / glob pattern's shards
    (:func:`traces.shards.expand`)."""
    from traces import datasets
    from traces.shards import expand

    if not Path(arg).exists() and not set("*?[") & set(arg):
        raise UserError(f"{arg}: no such file (bundled datasets: {', '.join(datasets.available())})")
    return expand([arg])


def trace_files(paths: list[str] | None) -> list[Path]:
    """Trace arguments as shard files, for commands that stream them: bundled token traces as their task files,
    folders and glob patterns as their shards; default: the bundled trace."""
    from traces import datasets

    out: list[Path] = []
    for p in paths or [datasets.DEFAULT]:
        name = p.split(":", 1)[0]
        if not Path(p).exists() and name in datasets.available():
            out += datasets.task_files(p) if name == datasets.DEFAULT else _bundled_counts(p)
        else:
            out += _shard_files(p)
    return out


def _bundled_counts(name: str):
    raise UserError(f"{name} holds partial cross-layer counts (3 layers), not a plannable profile; use it from Python "
                    f"via traces.datasets.crosslayer_counts")


def load_plans(paths: list[str]) -> list[Plan]:
    if not paths:
        raise UserError("give at least one plan file")
    return [Plan.load(p) for p in paths]


def print_json(obj) -> None:
    try:
        sys.stdout.write(json.dumps(obj, indent=1, default=float) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # | head: the reader has gone; the command's work is done
        _silence(sys.stdout)


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:.4g}"
        return f"{value:.{digits}f}"
    return str(value)


def default_solver() -> str:
    from solvers import names

    return "joint" if "joint" in names() else "contiguous"


def metrics_table(columns: dict[str, dict], title: str | None = None, ratios_to: str | None = None):
    """A rich table: one row per headline metric, one column per plan (plus ratios to one column if asked)."""
    from rich.table import Table

    from placement.evaluate import HEADLINE

    table = Table(title=title, show_lines=False)
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for key, label in HEADLINE:
        row = [fmt(c.get(key)) if c else "-" for c in columns.values()]
        if all(r == "-" for r in row):
            continue
        if ratios_to and columns.get(ratios_to) and columns[ratios_to].get(key):
            base = columns[ratios_to][key]
            row = [f"{fmt(c.get(key))} ({c.get(key) / base:.2f}x)" if c.get(key) is not None and base else fmt(c.get(key))
                   for c in columns.values()]
        table.add_row(label, *row)
    return table


# parallel work (placement/executor.py): the same options on every command that has independent tasks
WorkersOption = Annotated[Optional[int], typer.Option(
    "--workers", help="Worker processes for the parallel work (default: this machine's cores; 1 runs everything in "
    "this process).")]
RayAddressOption = Annotated[Optional[str], typer.Option(
    "--ray-address", help="Run the parallel work on a Ray cluster: auto (RAY_ADDRESS), local (a private one on this "
    "machine), HOST:PORT or ray://HOST:PORT; needs moeplace[ray].")]


@contextlib.contextmanager
def executor_for(workers: int | None, ray_address: str | None):
    """The executor for ``--workers`` / ``--ray-address`` (:func:`placement.executor.make_executor`), closed on
    exit (its worker processes stopped, a private Ray cluster shut down)."""
    from placement.executor import make_executor

    with make_executor(workers, ray_address) as ex:  # an error or Ctrl-C stops the workers at once
        yield ex
