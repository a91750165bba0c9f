"""moeplace export: write a plan in a serving stack's startup format."""

from __future__ import annotations

from pathlib import Path

import typer

from placement.cli_common import UserError, err, out, user_errors


def register(app: typer.Typer) -> None:
    @app.command("export")
    @user_errors
    def export_cmd(
        plan: Path = typer.Argument(..., help="Plan file (Plan v1 JSON)."),
        fmt: str = typer.Option(..., "--format", "-f", help="Target stack: sglang, vllm, trtllm or vllm-ascend."),
        out_path: Path = typer.Option(..., "--out", "-o", help="File to write."),
    ):
        """Write PLAN in the format a serving stack loads at startup and print the matching server flags."""
        from placement.export import ExportError, exporters, render
        from placement.plan import Plan
        from traces import atomic_write_bytes

        mods = exporters()
        if fmt not in mods:
            raise UserError(f"--format {fmt!r} is not one of {', '.join(sorted(mods))}")
        mod = mods[fmt]
        p = Plan.load(plan)
        try:
            files, hints = render(mod, p, out_path, plan_path=plan)
        except ExportError as exc:
            raise UserError(f"cannot export {plan} as {fmt}: {exc}") from None
        if out_path.suffix != mod.SUFFIX:
            err.print(f"note: {fmt} files usually end in {mod.SUFFIX}; writing {out_path} anyway", highlight=False)
        for path, body in files:
            atomic_write_bytes(path, lambda f, b=body: f.write(b.encode()))
        extra = files[1:]
        out.print(f"wrote {out_path} ({fmt}: {p.num_layers} MoE layers x {p.num_slots} slots on "
                  f"{p.topology.num_gpus} GPUs, {p.num_redundant} redundant)", highlight=False)
        for path, _ in extra:
            out.print(f"wrote {path}", highlight=False)
        for h in hints:
            out.print(f"  {h}", highlight=False, markup=False)
