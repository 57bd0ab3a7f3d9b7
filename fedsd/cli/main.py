"""The `fedsd` command line: a typer root that mounts each command group from the code it drives.

Heavy libraries (torch, transformers, flwr) are imported inside commands, so `fedsd --help` stays fast.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import typer

# Flower must never phone home from any process we start (docs/architecture.md §4).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = typer.Typer(
    name="fedsd",
    help="Federated, on-device adaptation of speech emotion recognition by self-distillation.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


def _keep_argument_help() -> None:
    """Give typer's arguments their help back: typer 0.20 stores ``help`` on a ``TyperArgument`` before
    calling click's ``Parameter.__init__``, and click >= 8.2 resets it to None there (every argument's help
    vanished from ``--help``; tests/test_cli_conventions.py checks it is shown)."""
    from typer.core import TyperArgument

    original = TyperArgument.__init__
    if getattr(original, "keeps_help", False):
        return

    def __init__(self: TyperArgument, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.help is None:
            self.help = kwargs.get("help")

    __init__.keeps_help = True  # type: ignore[attr-defined]
    TyperArgument.__init__ = __init__  # type: ignore[method-assign]


_keep_argument_help()


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _mount() -> None:
    """Attach the command groups; each lives next to the code it drives.

    Groups whose module is not part of this build are skipped; an import error inside an existing
    module is a bug and is raised.
    """
    from fedsd.cli.data import app as data_app

    app.add_typer(data_app, name="data", help="Corpora, manifests, synthetic speech and partitions.")
    if _exists("fedsd.cli.train"):
        from fedsd.cli.train import register as register_train

        register_train(app)
    if _exists("fedsd.cli.pretrain"):
        from fedsd.cli.pretrain import register as register_pretrain

        register_pretrain(app)
    if _exists("fedsd.cli.export"):
        from fedsd.cli.export import register as register_export

        register_export(app)
    if _exists("fedsd.cli.model"):
        from fedsd.cli.model import register as register_model

        register_model(app)
    if _exists("fedsd.server.simulate_cli"):
        from fedsd.server.simulate_cli import register as register_simulate

        register_simulate(app)
    if _exists("fedsd.cli.certs"):
        from fedsd.cli.certs import app as certs_app

        app.add_typer(certs_app, name="certs", help="TLS certificates for `fedsd server start --tls-dir`.")
    if _exists("fedsd.server.cli"):
        from fedsd.server.cli import app as server_app

        app.add_typer(server_app, name="server", help="Run the Flower server (SuperLink + federated run).")
    if _exists("fedsd.clients.cli"):
        from fedsd.clients.cli import app as client_app

        app.add_typer(client_app, name="client", help="Run a device (Flower SuperNode) at a chosen exit.")
    if _exists("fedsd.cli.config"):
        from fedsd.cli.config import register as register_config

        register_config(app)
    if _exists("fedsd.demo"):
        from fedsd.demo import register as register_demo

        register_demo(app)


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
