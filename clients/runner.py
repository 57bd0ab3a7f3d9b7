"""A device runs only the fedsd installed on it, never ClientApp code that arrives in an app bundle.

How Flower 1.42 runs a ClientApp on a SuperNode (isolation ``subprocess``, the default): the SuperNode
starts ``flower-superexec``, which starts one ``flwr-clientapp`` per message *by bare command name*
(``flwr/supercore/superexec/executor/subprocess_executor.py``, ``TASK_TYPE_TO_COMMAND`` in
``flwr/supercore/constant.py``). That process pulls the run's app bundle (FAB) from the SuperNode,
installs it (``install_from_fab``), puts it on ``sys.path`` and imports whatever its pyproject names as
``clientapp`` (``flwr/supernode/runtime/run_clientapp.py``: ``get_load_client_app_fn``). Anyone who can
submit a run (the Control API) thereby runs code on every device.

`fedsd client run` therefore puts a directory first on the SuperNode's PATH whose ``flwr-clientapp`` is
this module: Flower's own ``run_clientapp`` loop (task input, heartbeats, reply, exit status), with
three of its steps replaced — the bundle is never installed or unpacked, no dependencies are installed,
and the ClientApp is always ``fedsd.clients.client_app:app`` from this environment. If Flower's module no
longer has the names replaced here, the runner refuses to run at all (fail closed), rather than fall
back to loading the bundle.

With ``FEDSD_WARM_WORKER=1`` (``fedsd client run --warm-worker``, inherited from the SuperNode's
environment) the ClientApp this runner loads is a light forwarder: it relays the message and context to
the device's warm worker (clients/worker.py), which imported ``fedsd.clients.client_app`` once, so this
process never imports torch. If the worker cannot be used the message is handled here, as without the
flag: a device never loses a round to the optimisation.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

COMMAND = "flwr-clientapp"
_REPLACED = ("install_from_fab", "get_load_client_app_fn", "run_clientapp")
_PARENT: list[int] = []
"""The pid a warm worker serves (the SuperNode's executor), set by :func:`main`."""


def _fedsd_client_app() -> Any:
    from fedsd.clients.client_app import app

    return app


def forwarding_app(parent: int) -> Any:
    """A ClientApp stand-in (Flower calls it as ``app(message=..., context=...)``) that has the
    device's warm worker handle the message, and handles it in this process if the worker fails."""
    from fedsd.clients import worker

    def app(message: Any, context: Any) -> Any:
        try:
            reply, state = worker.call(message, context, parent=parent)
        except worker.WorkerUnavailable as e:
            from logging import WARNING

            from flwr.common.logger import log

            log(WARNING, "fedsd warm worker unavailable (%s): handling this message in this process", e)
            return _fedsd_client_app()(message=message, context=context)
        context.state = state  # what the handler left in it, as if it had run here
        return reply

    return app


def _loaded_app() -> Any:
    from fedsd.clients.worker import enabled

    if enabled():
        return forwarding_app(_PARENT[0] if _PARENT else os.getppid())
    return _fedsd_client_app()


def install_guard_rails() -> Any:
    """Patch Flower's ClientApp process so it cannot install or load a bundle; returns its module."""
    from flwr.supernode.runtime import run_clientapp as rc

    missing = [name for name in _REPLACED if not hasattr(rc, name)]
    if missing:
        raise SystemExit(
            f"fedsd ClientApp runner: flwr.supernode.runtime.run_clientapp lacks {missing}; this Flower "
            "version is not supported — refusing to run any ClientApp"
        )

    def no_install(*_args: Any, **_kwargs: Any) -> None:
        return None  # the bundle's files never reach this device's disk or sys.path

    def fedsd_loader(*_args: Any, **_kwargs: Any) -> Any:
        app = _loaded_app()
        return lambda *_a, **_k: app  # whatever component the bundle names

    rc.install_from_fab = no_install
    rc.get_load_client_app_fn = fedsd_loader
    return rc


def main() -> None:
    """``flwr-clientapp`` with the same arguments, running fedsd's installed ClientApp."""
    from fedsd.process.lifetime import set_parent_death_signal

    set_parent_death_signal()
    rc = install_guard_rails()
    import importlib

    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")  # the module, not the function

    args = cli._parse_args_run_flwr_clientapp().parse_args()
    _PARENT[:] = [args.parent_pid or os.getppid()]
    token = cli.try_obtain_flwr_app_token(args)
    rc.run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=token,
        insecure=args.insecure,
        certificates=cli.validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


def write_shim(directory: Path) -> Path:
    """``directory/flwr-clientapp``: an executable that runs :func:`main` with this Python."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / COMMAND
    path.write_text(
        f"#!{sys.executable}\n"
        "# Written by `fedsd client run`: every ClientApp this device runs is the installed fedsd's,\n"
        "# never code from an app bundle (see fedsd/clients/runner.py).\n"
        "from fedsd.clients.runner import main\n"
        "main()\n",
        encoding="utf-8",
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def shim_env(env: dict[str, str], directory: Path, *, warm_worker: bool = False) -> dict[str, str]:
    """``env`` with the shim directory first on PATH (so `flower-superexec` finds our runner);
    ``warm_worker``: with ``FEDSD_WARM_WORKER=1``, which every runner the SuperNode starts inherits."""
    write_shim(directory)
    out = dict(env)
    if warm_worker:
        from fedsd.clients.worker import ENV

        out[ENV] = "1"
    out["PATH"] = os.pathsep.join([str(directory), env.get("PATH", "")])
    return out


if __name__ == "__main__":
    main()
