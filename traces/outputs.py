"""Writing outputs safely: atomic files, whole folders, one command's writes as a unit, stale temporaries.

- :func:`atomic_write_bytes` writes a file through a hidden temporary in the same folder and renames it into place.
- :func:`output_folder` writes a whole folder (a report): into a hidden staging folder next to it, swapped in when
  complete (one ``renameat2(RENAME_EXCHANGE)`` on Linux), so a reader sees the old folder or the new one, never a
  mix. Files in the old folder that the previous report did not write (the user's own) are kept.
- :func:`command_files` makes one CLI command's writes a unit: a command that fails or is interrupted leaves the
  file system as it found it; no output replaces an input.

Temporaries are named ``.mp-<machine>-<pid>-<random>.tmp`` (and ``.bak`` for the previous content kept for a
rollback). A process killed with SIGKILL leaves them behind; the next write to that folder removes the stale ones
(:func:`clean_stale`): a temporary of this machine whose process no longer runs, or any ``.mp-*.tmp``/``.bak``
older than :data:`STALE_SECONDS` (other machines on a shared file system, older names). A temporary of a command
still running is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

__all__ = ["OutputPathError", "atomic_write_bytes", "check_output_path", "check_writable", "clean_stale",
           "command_files", "make_output_dir", "note_input", "output_folder", "deferred_signals"]

STALE_SECONDS = 24 * 3600.0  # age after which any .mp-* temporary counts as abandoned
MANIFEST = ".moeplace.json"  # in a folder written by output_folder: the files it wrote


class OutputPathError(ValueError):
    """An output path that cannot be written (one sentence naming the path and what to do)."""


# names of temporaries --------------------------------------------------------------------------------------------
def _machine() -> str:
    """4 hex digits for this machine and PID namespace (a PID means something only there)."""
    ns = ""
    with contextlib.suppress(OSError):
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    return hashlib.sha1(f"{socket.gethostname()}/{ns}".encode()).hexdigest()[:4]


_MACHINE = _machine()
_TEMP_NAME = re.compile(r"^\.mp-(?:([0-9a-f]{4})-([0-9]+)-)?[A-Za-z0-9_]+\.(?:tmp|bak)$")


def _prefix() -> str:
    return f".mp-{_MACHINE}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it runs
        return True
    return True


def _is_stale(entry: os.DirEntry, now: float) -> bool:
    m = _TEMP_NAME.match(entry.name)
    if not m:
        return False
    if m.group(1) == _MACHINE and m.group(2):
        return not _pid_alive(int(m.group(2)))
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
    except OSError:
        return False


_cleaned: set[str] = set()


def clean_stale(folder: str | os.PathLike) -> list[str]:
    """Remove abandoned ``.mp-*.tmp``/``.mp-*.bak`` files and folders in ``folder`` (once per folder and process;
    see the module docstring for the rule). Returns the names removed; errors are ignored."""
    key = os.path.realpath(folder)
    if key in _cleaned:
        return []
    _cleaned.add(key)
    removed, now = [], time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _is_stale(entry, now):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
    return removed


# signals ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deferred_signals():
    """Hold Ctrl-C and SIGTERM while a few renames must all happen (a swap, a rollback); a signal that came in
    meanwhile is raised as :class:`KeyboardInterrupt` at the end. Outside the main thread: does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, lambda num, frame: pending.append(num))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            raise KeyboardInterrupt


# one command's files ---------------------------------------------------------------------------------------------
class _Command:
    """Files one CLI command reads and writes: no output may replace an input, and a command that fails leaves
    the file system as it found it (see :func:`command_files`)."""

    def __init__(self) -> None:
        self.inputs: set[str] = set()  # real paths read
        self.created: list[Path] = []  # files and folders this command created, in order
        self.backups: list[tuple[Path, Path]] = []  # (path, hard link to its previous content) for replaced files
        self.folders: list[tuple[Path, Path | None]] = []  # (folder replaced whole, its previous content or None)

    def rollback(self) -> None:
        for path, backup in reversed(self.folders):
            with contextlib.suppress(OSError):
                shutil.rmtree(path)
            if backup is not None:
                with contextlib.suppress(OSError):
                    os.rename(backup, path)
        for path, backup in reversed(self.backups):
            with contextlib.suppress(OSError):
                os.replace(backup, path)
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()

    def commit(self) -> None:
        for _, backup in self.backups:
            with contextlib.suppress(OSError):
                backup.unlink()
        for _, backup in self.folders:
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)


_command: _Command | None = None  # the running CLI command; None in library use


def note_input(path: str | os.PathLike) -> None:
    """Record ``path`` as an input of the running command (see :func:`command_files`)."""
    if _command is not None:
        _command.inputs.add(os.path.realpath(path))


@contextlib.contextmanager
def command_files():
    """Run one command's file writes as a unit: inside, :func:`atomic_write_bytes` refuses to replace a file read
    through :func:`note_input`, and if the block fails or is interrupted (Ctrl-C, SIGTERM), the files and folders
    it created are removed and the files and folders it replaced get their previous content back. Only an explicit
    exit with code 0 or 130 (``typer.Exit``) keeps what was written: ``collect`` exits 130 on an interrupt so that
    it can resume from its shards."""
    global _command
    before, cmd = _command, _Command()
    _command = cmd
    try:
        yield cmd
    except BaseException as exc:
        with deferred_signals():
            if getattr(exc, "exit_code", None) in (0, 130):
                cmd.commit()
            else:
                cmd.rollback()
        raise
    else:
        with deferred_signals():
            cmd.commit()
    finally:
        _command = before


# paths -------------------------------------------------------------------------------------------------------------
def make_output_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; inside :func:`command_files` a failing command removes the folders made here (once
    empty). A part of the path that is a file is an :class:`OutputPathError`."""
    path = Path(path)
    missing = _missing_folders(path, path)
    path.mkdir(parents=True, exist_ok=True)
    if _command is not None:
        _command.created.extend(reversed(missing))
    return path


def _missing_folders(folder: Path, shown) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet (innermost first); an :class:`OutputPathError` naming
    ``shown`` when a part of it is a file."""
    missing = []
    for p in (folder, *folder.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            raise OutputPathError(f"{shown}: {p} is a file, not a folder; choose another output path")
        missing.append(p)
    return missing


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if a file can be written there, else an :class:`OutputPathError`: an empty name, ``-``
    (moeplace writes files, not standard output), a folder, a special file (device, pipe, socket), a path under an
    existing file, or an input of the command."""
    shown = os.fspath(path)
    path = Path(path)
    if shown == "-":
        raise OutputPathError("--out - would write a file named '-': moeplace writes its outputs to files, give a "
                              "file name (e.g. out.json)")
    if not shown.strip() or path.name in ("", ".", ".."):
        raise OutputPathError(f"the output path {shown!r} is not a file name; give a file to write, e.g. out.json")
    if path.is_dir():
        raise OutputPathError(f"{shown} is a folder; give the name of a file to write (e.g. {path / 'out'})")
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{shown} exists and is not a regular file (a device, pipe or socket); write to "
                              f"another path")
    _missing_folders(path.parent, shown)
    if _command is not None and os.path.realpath(path) in _command.inputs:
        raise OutputPathError(f"{shown} is also an input of this command; write the output to another file")
    return path


def check_writable(path: str | os.PathLike, folder: bool = False, whole: bool = False) -> Path:
    """Check before any long work that an output can be written at ``path`` (a file, or a folder if ``folder``;
    ``whole``: a folder :func:`output_folder` replaces as a whole): the path's checks (:func:`check_output_path`),
    then a real probe: a temporary file created and removed in the nearest existing folder (for a folder replaced
    whole: its parent), so permissions, read-only file systems and root all answer truthfully. An
    :class:`OutputPathError` names the path."""
    shown = os.fspath(path)
    path = Path(path)
    if folder:
        if shown == "-":
            raise OutputPathError("--out - names no folder; give the folder to write, e.g. report/")
        if path.exists() and not path.is_dir():
            raise OutputPathError(f"{shown} exists and is not a folder; give another output folder")
        _missing_folders(path, shown)
        if whole and path.is_dir():
            _check_not_around_cwd(path, shown)
            _check_ours(path, shown)
        base = path.parent if whole else path
    else:
        check_output_path(path)
        base = path.parent
    while not base.is_dir():  # the nearest folder that exists ("" is the current folder)
        base = base.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=_prefix(), suffix=".tmp", dir=base)
    except OSError as exc:
        reason = (exc.strerror or type(exc).__name__).lower()
        raise OutputPathError(f"{shown} cannot be written ({reason} in {base.resolve()}); choose another path or fix "
                              f"the folder's permissions") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return path


def _check_not_around_cwd(path: Path, shown) -> None:
    here, target = Path.cwd().resolve(), path.resolve()
    if here == target or target in here.parents:
        raise OutputPathError(f"{shown} is the current folder (or holds it); a report replaces its folder as a whole, "
                              f"so give a folder of its own, e.g. report/")


# files -------------------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Write a file atomically: ``write(fileobj)`` into a temp file in the same folder, then rename.

    The path is checked first (:func:`check_output_path`); the temporary file has a short name of its own, so
    any name the file system accepts works; OS errors name ``path``, not the temporary file. Stale temporaries of
    killed commands in the folder are removed first (:func:`clean_stale`)."""
    path = check_output_path(path)
    tmp = None
    try:
        make_output_dir(path.parent)
        clean_stale(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(), suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with deferred_signals():
            _keep_previous(path)
            os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        _remove(tmp)
        if exc.filename is None or os.fspath(exc.filename) == os.fspath(path):
            raise
        raise type(exc)(exc.errno, exc.strerror, os.fspath(path)) from None
    except BaseException:
        _remove(tmp)
        raise


def _keep_previous(path: Path) -> None:
    """Inside :func:`command_files`: remember that ``path`` is new, or keep its previous content (a hard link, so
    no copy) for a rollback; a file system without hard links keeps none."""
    if _command is None or any(p == path for p, _ in _command.backups) or path in _command.created:
        return
    if not path.exists():
        _command.created.append(path)
        return
    for _ in range(5):
        backup = path.with_name(f"{_prefix()}{os.urandom(4).hex()}.bak")
        try:
            os.link(path, backup)
        except FileExistsError:
            continue
        except OSError:
            return
        _command.backups.append((path, backup))
        return


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove(tmp) -> None:
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# folders -----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def output_folder(path: str | os.PathLike, written_by: str = "moeplace") -> Iterator[Path]:
    """Write the folder ``path`` as a whole: yields an empty staging folder (a hidden sibling of ``path``) to write
    into; when the block ends without error the staging folder replaces ``path`` in one step, else it is removed
    and ``path`` stays as it was.

    An existing ``path`` must be empty or a folder this function wrote before (its :data:`MANIFEST` lists the
    files it wrote; older reports: ``report.*`` and ``plots/*.png``); its other files (the user's, the command's
    inputs) are kept in the new folder. The current folder (or one holding it) is refused. Inside
    :func:`command_files` a later failure puts the old folder back."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    shown = os.fspath(path)
    check_writable(path, folder=True, whole=True)
    make_output_dir(path.parent)
    clean_stale(path.parent)
    stage = Path(tempfile.mkdtemp(prefix=_prefix(), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
        yield stage
        ours = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if not p.is_dir())
        (stage / MANIFEST).write_text(json.dumps({"written_by": written_by, "files": ours}, indent=1) + "\n")
        if path.is_dir():
            _carry_over(path, stage, shown)
        with deferred_signals():
            backup = _swap_in(stage, path)
            if _command is not None:
                _command.folders.append((path, backup))
            elif backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _check_ours(folder: Path, shown) -> None:
    """An :class:`OutputPathError` unless ``folder`` is empty (temporaries aside) or was written by
    :func:`output_folder` (or is a report written before manifests)."""
    if _previous_files(folder):
        return
    try:
        names = sorted(p.name for p in folder.iterdir() if not _TEMP_NAME.match(p.name))
    except OSError:
        return
    if names:
        raise OutputPathError(f"{shown} is not empty and was not written by moeplace ({', '.join(names[:3])}"
                              f"{', ...' if len(names) > 3 else ''}); a report replaces its folder as a whole, so "
                              f"give a new or empty folder")


def _previous_files(folder: Path) -> set[str]:
    """The files a previous :func:`output_folder` wrote in ``folder`` (relative paths)."""
    try:
        record = json.loads((folder / MANIFEST).read_text())
        return {str(f) for f in record.get("files", [])} | {MANIFEST}
    except (OSError, ValueError, AttributeError):
        pass
    if (folder / "report.json").is_file():  # a report written before manifests: its own names
        names = {"report.md", "report.html", "report.json"} | {
            p.relative_to(folder).as_posix() for p in (folder / "plots").glob("*.png")}
        try:
            demo = str(json.loads((folder / "report.json").read_text()).get("title", "")).startswith("moeplace demo")
        except (OSError, ValueError, AttributeError):
            demo = False
        if demo:  # and a demo's plans and exports
            for pattern in ("plan-*.json", "sglang-*.json", "vllm-*.json", "trtllm-*.yaml", "vllm-ascend-*.json"):
                names |= {p.name for p in folder.glob(pattern)}
        return names
    return set()


def _carry_over(old: Path, stage: Path, shown) -> None:
    """Hard-link (else copy) into ``stage`` the files of ``old`` that its previous writer did not write, that the
    new content does not replace and that are not stale temporaries; refuse a folder that is not ours and not
    empty, and a new file that would replace one of the command's inputs."""
    ours = _previous_files(old)
    inputs = _command.inputs if _command is not None else set()
    files, empty_dirs = [], []
    for root, dirs, names in os.walk(old):  # symbolic links to folders are entries, not followed
        rel_root = Path(root).relative_to(old)
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        dirs[:] = [d for d in dirs if d not in links]
        kept = [n for n in names + links if not _TEMP_NAME.match(n)]
        files += [rel_root / n for n in kept]
        if not kept and not dirs and rel_root != Path("."):
            empty_dirs.append(rel_root)
    if not ours and files:
        _check_ours(old, shown)
    for rel in empty_dirs:
        (stage / rel).mkdir(parents=True, exist_ok=True)
    for rel in files:
        src, dst = old / rel, stage / rel
        is_input = os.path.realpath(src) in inputs
        if dst.exists() or dst.is_symlink():
            if is_input:
                raise OutputPathError(f"{src} is an input of this command and the new {shown} would replace it; "
                                      f"write to another folder")
            continue
        if rel.as_posix() in ours and not is_input:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(stage: Path, path: Path) -> Path | None:
    """Put ``stage`` in place of ``path``; returns where the old content went (None if there was none)."""
    if not path.exists():
        os.rename(stage, path)
        return None
    if _exchange(stage, path):
        backup = stage.with_name(stage.name[:-len(".tmp")] + ".bak")
        os.rename(stage, backup)  # stage now holds the old content
        return backup
    backup = Path(tempfile.mkdtemp(prefix=_prefix(), suffix=".bak", dir=path.parent))
    os.rmdir(backup)
    os.rename(path, backup)
    os.rename(stage, path)
    return backup
