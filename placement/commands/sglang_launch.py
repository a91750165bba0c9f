"""moeplace sglang-launch: start an SGLang server whose EPLB manager uses moeplace's online policy."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from placement.cli_common import UserError, err, user_errors


def launch_env(options: dict, base: dict | None = None) -> dict:
    """The environment that installs the policy in every SGLang process: the hook folder first on PYTHONPATH (its
    ``sitecustomize`` runs at interpreter start-up), moeplace importable, the policy switched on with ``options``."""
    import placement
    from placement import sglang_policy

    env = dict(os.environ if base is None else base)
    hook = Path(__file__).resolve().parents[1] / "sglang_hook"
    root = str(Path(placement.__file__).resolve().parents[1])
    parts = [str(hook), root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env[sglang_policy.ENV] = "moeplace"
    env[sglang_policy.ENV_OPTIONS] = json.dumps(options)
    return env


def register(app: typer.Typer) -> None:
    @app.command("sglang-launch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    @user_errors
    def sglang_launch_cmd(
        ctx: typer.Context,
        max_moves: Optional[int] = typer.Option(None, "--max-moves", help="Most expert copies moved per rebalance."),
        move_budget: Optional[float] = typer.Option(None, "--move-budget", help="Copies moved per rebalance on average "
                                                    "(unused budget is saved for a later rebalance)."),
        move_cost: Optional[float] = typer.Option(None, "--move-cost", help="Seconds per moved copy (default: one "
                                                  "expert's weights over the intra-node link)."),
        history: Optional[int] = typer.Option(None, "--history", help="Windows kept as profiles (default 4)."),
        horizon: Optional[float] = typer.Option(None, "--horizon", help="Traffic a placement serves before the next "
                                                "rebalance, in recorder windows (default 1: --eplb-rebalance-num-"
                                                "iterations equal to the recorder buffer)."),
        model: Optional[str] = typer.Option(None, "--model", help="Model sizes for the cost model (deepseek-v3, ...)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the command and environment instead of starting."),
    ):
        """Start 'python -m sglang.launch_server ARGS...' (every argument after the options above goes to SGLang)
        with moeplace's migration-aware policy in SGLang's EPLB manager. Needs SGLang in this environment and
        --enable-eplb among SGLang's arguments; if the policy cannot be installed or fails, SGLang's own algorithm
        decides and the server runs on."""
        import importlib.util

        from placement.online import OnlinePolicy

        options = {k: v for k, v in (("max_moves", max_moves), ("move_budget", move_budget), ("move_cost", move_cost),
                                     ("history", history), ("horizon", horizon), ("model", model)) if v is not None}
        OnlinePolicy(**options)  # bad options: one sentence now, not a warning inside the server
        args = list(ctx.args)
        if args[:1] == ["--"]:
            args = args[1:]
        if importlib.util.find_spec("sglang") is None:
            raise UserError("SGLang is not installed in this environment (pip install sglang); moeplace sglang-launch "
                            "starts python -m sglang.launch_server with the policy installed")
        if "--enable-eplb" not in args:
            err.print("note: SGLang rebalances only with --enable-eplb; without it the policy is never called",
                      markup=False, highlight=False)
        env = launch_env(options)
        cmd = [sys.executable, "-m", "sglang.launch_server", *args]
        if dry_run:
            from placement import sglang_policy

            print(" ".join(cmd))
            for key in ("PYTHONPATH", sglang_policy.ENV, sglang_policy.ENV_OPTIONS):
                print(f"{key}={env[key]}")
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, env)  # SGLang replaces this process: signals and exit codes are its own
