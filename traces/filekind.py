"""What a file is, from its content: one diagnosis shared by every loader (traces, dumps, plans, placements), so
that a file that is not what a command expects gets one correct sentence, whatever the command.

:func:`kind` reads the first bytes (and, for a zip archive, its member names; for JSON, the top-level keys) and
never trusts the file name. :func:`describe` is the phrase for messages, :func:`what_to_do` a hint naming the
command that reads such a file.
"""

from __future__ import annotations

import json
import os
import zipfile

__all__ = ["kind", "describe", "what_to_do", "mismatch"]

# the pickled magic number at the start of a legacy (non-zip) torch.save file
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
_JSON_LIMIT = 64 << 20  # bytes of a text file parsed to tell JSON kinds apart

PHRASES = {
    "missing": "missing",
    "folder": "a folder",
    "empty": "an empty file",
    "npz": "a NumPy .npz archive",
    "npy": "a NumPy .npy array",
    "torch": "a torch.save file",
    "pickle": "a Python pickle",
    "zip": "a zip archive that is neither a NumPy .npz nor a torch.save file",
    "badzip": "a damaged or truncated zip archive",
    "plan": "a moeplace plan (JSON)",
    "sglang-placement": "an SGLang placement (JSON with physical_to_logical_map)",
    "counts-json": "SGLang counts (JSON with logical_count)",
    "json": "JSON",
    "text": "text that is not JSON",
    "binary": "binary data in no format moeplace reads",
}


def kind(path: str | os.PathLike) -> str:
    """One of the keys of :data:`PHRASES`."""
    if not os.path.exists(path):
        return "missing"
    if os.path.isdir(path):
        return "folder"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return "badzip"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        return "zip"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(_TORCH_LEGACY):
        return "torch"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if b"\x00" in head:
        return "binary"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not only a character cut at the end of the sample
            return "binary"
        text = head[:exc.start].decode("utf-8")
    if not text.lstrip()[:1] in ("{", "["):
        return "text"
    if os.path.getsize(path) > _JSON_LIMIT:
        return "json"
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError):
        return "text"
    if isinstance(obj, dict):
        if obj.get("format") == "moeplace.plan":
            return "plan"
        if "physical_to_logical_map" in obj:
            return "sglang-placement"
        if "logical_count" in obj:
            return "counts-json"
    return "json"


def describe(path: str | os.PathLike) -> str:
    """``kind`` as a phrase for a message ("a torch.save file", "binary data in no format moeplace reads")."""
    return PHRASES[kind(path)]


HINTS = {
    "npz": "a trace goes first in 'moeplace plan TRACE.npz' or after --trace ('moeplace evaluate PLAN.json --trace "
           "TRACE.npz')",
    "torch": "an SGLang recorder dump is imported with 'moeplace import sglang'; an EPLB phy2log with "
             "'moeplace import-plan --format eplb'",
    "plan": "a plan goes to evaluate, report, export or bench ('moeplace evaluate PLAN.json --trace TRACE')",
    "sglang-placement": "read it into a plan with 'moeplace import-plan FILE --format sglang --gpus G'",
    "counts-json": "counts are imported with 'moeplace import sglang'",
    "badzip": "copy the file again",
    "empty": "copy the file again",
}


def what_to_do(k: str) -> str:
    """A hint for a file of kind ``k`` given where something else was expected ("" if there is none)."""
    return HINTS.get(k, "")


def mismatch(path: str | os.PathLike, expected: str, k: str | None = None) -> str:
    """The sentence for ``path`` given where ``expected`` (a phrase: "a plan file (JSON)") was asked for."""
    k = k or kind(path)
    hint = what_to_do(k)
    return f"{os.fspath(path)} is not {expected}: it is {PHRASES[k]}" + (f"; {hint}" if hint else "")
