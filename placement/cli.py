"""The ``moeplace`` command line. Each verb lives in ``placement/commands/<verb>.py`` with a ``register(app)``
function; this module discovers them. Command modules import heavy packages inside their functions."""

from __future__ import annotations

import importlib
import pkgutil

import typer

app = typer.Typer(
    name="moeplace",
    help="Plan which GPU holds which Mixture-of-Experts expert, from real routing traces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register_commands() -> None:
    import placement.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"placement.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
