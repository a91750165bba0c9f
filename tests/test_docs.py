"""docs/cli.md is the real --help of every command; the docs name only commands and files that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from placement import docgen

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_cli_reference_matches_help():
    import difflib

    current, expected = docgen.DOC_PATH.read_text(), docgen.render()
    if current != expected:
        diff = "".join(list(difflib.unified_diff(current.splitlines(True), expected.splitlines(True), "docs/cli.md",
                                                 "moeplace --help", n=1))[:40])
        pytest.fail(f"docs/cli.md is out of date: run 'python -m placement.docgen'\n{diff}")


def test_cli_reference_covers_every_command():
    text = docgen.DOC_PATH.read_text()
    for name in docgen.command_names():
        assert f"## moeplace {name}\n" in text


def test_rendered_help_is_what_the_program_prints():
    """The generator's in-process rendering equals a real 'python -m placement.cli CMD --help' run."""
    env = {**os.environ, "TERMINAL_WIDTH": str(docgen.WIDTH), "COLUMNS": str(docgen.WIDTH),
           "_TYPER_FORCE_DISABLE_TERMINAL": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FORCE_COLOR", None)
    env.pop("GITHUB_ACTIONS", None)
    env.pop("PY_COLORS", None)
    real = subprocess.run([sys.executable, "-m", "placement.cli", "report", "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert real.returncode == 0, real.stderr
    printed = "\n".join(line.rstrip() for line in real.stdout.splitlines()).strip("\n")
    assert printed.replace("python -m placement.cli", "moeplace") == docgen.render_help(["report"])


def test_docs_link_to_files_that_exist():
    for md in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (md.parent / target).exists(), f"{md.name} links to {target}, which does not exist"


def test_commands_named_in_docs_exist():
    """Every 'moeplace VERB' in the docs I own is a real command (a renamed verb must not leave stale docs)."""
    verbs = set(docgen.command_names())
    for name in ("concepts.md", "formats.md"):
        text = (DOCS / name).read_text()
        for verb in re.findall(r"`moeplace ([a-z][a-z-]*)", text):
            assert verb in verbs, f"docs/{name} mentions 'moeplace {verb}', which is not a command"
