"""What a server hears of a failure while DP is on: only that the device failed, unless the failure is
about the server's own message or the run's budget; the details stay in the device's event log."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message

from fedsd.clients.device import DeviceError, HostileMessage
from fedsd.clients.dp_gate import dp_in_use

PRIVATE_ERROR = "this device could not handle the message (DP is on: the reason stays in its own log)"
"""What a server hears of a failure under DP, unless the failure is about its own message."""
BUDGET_STOP = "privacy budget reached: this device stops training (the figures stay in its own log)"
"""What a server hears when the device-wide budget (ε over every federation) stops a round."""
EVALUATION_REFUSED = "federated evaluation is refused while DP is on: its metrics are not noised"


class RunBudgetReached(DeviceError):
    """This run's ε budget is spent: the text holds only this run's ε, which the replies carry anyway."""


def message_is_private(msg: Message, context: Context) -> bool:
    """Whether DP is on for this message (never raises: it decides what an error reply may say)."""
    try:
        cfg = dict(msg.content.config_records.get("config", ConfigRecord())) if msg.has_content() else {}
        return dp_in_use(context, cfg)
    except Exception:
        return True


def private_reason(err: BaseException) -> str:
    """The error text a server gets under DP: a refusal of its own message says what was refused (its
    own values only); a reached budget says so (the server stops asking), without ε; anything else
    is generic, as exception text may hold local paths, label counts or ε over other federations."""
    if isinstance(err, (HostileMessage, RunBudgetReached)) or str(err) == EVALUATION_REFUSED:
        return str(err)
    if str(err).startswith("privacy budget reached"):  # the device-wide budget: ε over other federations
        return BUDGET_STOP
    return PRIVATE_ERROR
