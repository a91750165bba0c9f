"""moeplace export: write a plan in a serving stack's startup format."""

from __future__ import annotations

from pathlib import Path

import typer

from placement.cli_common import UserError, out, user_errors


def register(app: typer.Typer) -> None:
    @app.command("export")
    @user_errors
    def export_cmd(
        plan: Path = typer.Argument(..., help="Plan file (Plan v1 JSON)."),
        fmt: str = typer.Option(..., "--format", "-f", help="Target stack format (see 'moeplace export --help')."),
        out_path: Path = typer.Option(..., "--out", "-o", help="File to write."),
    ):
        """Write PLAN in the format a serving stack loads at startup and print the matching server flags."""
        from placement.export import ExportError, exporters
        from placement.plan import Plan
        from traces import atomic_write_bytes

        mods = exporters()
        if fmt not in mods:
            raise UserError(f"--format {fmt!r} is not one of {', '.join(sorted(mods))}")
        p = Plan.load(plan)
        try:
            text, hints = mods[fmt].export(p, str(out_path))
        except ExportError as exc:
            raise UserError(f"cannot export {plan} as {fmt}: {exc}") from None
        atomic_write_bytes(out_path, lambda f: f.write(text.encode()))
        out.print(f"wrote {out_path} ({fmt})")
        for h in hints:
            out.print(f"  {h}", highlight=False)
