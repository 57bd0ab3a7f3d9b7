"""The Flower ServerApp (``fedsd.server.server_app:app``): wires Flower's objects to the federated run.

The work lives in task modules: :mod:`fedsd.server.run_config` turns the run config into a run spec and
runs :mod:`fedsd.server.federation`.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsd.server.run_config import serve

app = ServerApp()


def _info(msg: str) -> None:
    log(logging.INFO, msg)


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, dict(context.run_config), log=_info)
