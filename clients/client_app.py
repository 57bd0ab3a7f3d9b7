"""The Flower ClientApp of a device: which handler answers which message, and the event log around each.

- ``query.info``  → the device's exit, data size and whether it holds the server's model
                    (clients/handshake.py).
- ``query.model`` → receives the base model once (a device started without ``--model``;
                    clients/delivery.py).
- ``train``       → fine-tunes its shallow heads from cached backbone features by self-distillation
                    and replies with those heads, ``num-examples`` and metrics. Nothing else leaves
                    (clients/train_task.py; DP rounds: clients/dp_round.py).
- ``evaluate``    → per-exit metrics on its personal test utterances, else its validation ones
                    (clients/evaluate_task.py).
- ``query.done``  → the run is over (a supervised device stops its SuperNode); with the final global
                    heads attached: personal-test metrics, personal heads and ``--out``
                    (clients/run_end.py, clients/personal.py).

When the node config names an ``events`` file (`fedsd client run` does), every handled message appends
one JSON line to it (clients/events.py) — what `fedsd client run` prints per round.

Everything in a server's message is untrusted and checked before it is used (clients/messages.py,
clients/delivery.py); a message that fails a check gets an error reply that says why
(:class:`~fedsd.clients.device.HostileMessage`), and nothing is written. Under DP an error reply says
only that the device failed (or that its budget is spent, or what of the server's message it refused);
the details stay in the device's event log (clients/private_errors.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedsd.clients.assembly import Handler
from fedsd.clients.delivery import receive_model
from fedsd.clients.device import DeviceError
from fedsd.clients.evaluate_task import evaluate
from fedsd.clients.events import log_event, message_event
from fedsd.clients.handshake import info
from fedsd.clients.private_errors import message_is_private, private_reason
from fedsd.clients.run_end import done
from fedsd.clients.train_task import train


def make_client_app(run_config_defaults: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp with our handlers. ``run_config_defaults`` complete the (read-only) run config:
    simulation runs, whose engine passes no run config to virtual nodes, carry their data paths this way."""
    client_app = ClientApp()
    defaults = dict(run_config_defaults or {})
    client_app.train()(_logged(train, defaults))
    client_app.evaluate()(_logged(evaluate, defaults))
    client_app.query("info")(_logged(info, defaults))
    client_app.query("model")(_logged(receive_model, defaults))
    client_app.query("done")(_logged(done, defaults))
    return client_app


def _logged(handler: Handler, defaults: dict[str, Any]) -> Callable[[Message, Context], Message]:
    """``handler`` as Flower calls it, with one event-log line per message; under DP a failure's reply
    says only what :func:`~fedsd.clients.private_errors.private_reason` allows."""

    def handle(msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        try:
            reply = handler(msg, context, defaults)
        except Exception as e:
            ev = message_event(msg, None, context, time.perf_counter() - t0)
            log_event(context, ev | {"error": f"{type(e).__name__}: {e}"})
            reason = private_reason(e) if message_is_private(msg, context) else str(e)
            if reason != str(e):  # under DP the server learns that it failed, the details stay here
                raise DeviceError(reason) from e
            raise
        log_event(context, message_event(msg, reply, context, time.perf_counter() - t0))
        return reply

    handle.__name__ = handler.__name__
    return handle


app = make_client_app()
