"""Which device did not answer: a Grid wrapper that remembers, per exchange, who was asked and who replied.

Why: Flower's ``Strategy.start`` hides the messages it sends. When a device dies mid-round, the
strategy only sees fewer replies (``HttpGrid.send_and_receive`` returns what arrived before the
timeout) or an error reply that the *SuperLink* wrote on the device's behalf once its heartbeat
expired (code NODE_UNAVAILABLE, ``src_node_id`` = the SuperLink's id 1, not the device's). Neither
names the device. This wrapper pairs every sent message with its reply — by message id
(``reply_to_message_id``), else by sender node for grids that assign no ids — so the server can say
"round 3: no reply from device 4711 (exit 2)".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedsd.security.untrusted import printable

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE
NO_REPLY = "no reply"


@dataclass
class Exchange:
    """One ``send_and_receive`` call."""

    message_type: str
    timeout: float | None
    seconds: float
    failed: dict[int, str] = field(default_factory=dict)
    """node id → why it gave no usable reply (``NO_REPLY`` or ``error <code>: <reason>``)."""
    answered: list[int] = field(default_factory=list)


class ReplyTracker(Grid):
    """Delegates everything to ``grid``; records each ``send_and_receive`` as an :class:`Exchange`."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self._exchanges: list[Exchange] = []

    # -- Grid interface (delegated)
    def set_run(self, run_id: Any) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # deprecated in flwr, still abstract
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        t0 = time.monotonic()
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        if sent:
            self._exchanges.append(pair_replies(sent, replies, timeout, time.monotonic() - t0))
        return replies

    # -- what happened
    def take(self) -> list[Exchange]:
        """The exchanges recorded since the last call (and forget them)."""
        out, self._exchanges = self._exchanges, []
        return out


def _error_text(reply: Message) -> str:
    """The error a reply carries, printable (its reason is the device's text: never trusted raw in logs)."""
    err = reply.error
    return f"error {err.code}: {printable(err.reason, 300)}"


def pair_replies(
    sent: list[Message], replies: list[Message], timeout: float | None, seconds: float
) -> Exchange:
    """Match each sent message with its reply; a message without one, or with an error, failed."""
    by_id: dict[str, Message] = {}
    by_node: dict[int, Message] = {}
    for reply in replies:
        if reply.metadata.reply_to_message_id:
            by_id[reply.metadata.reply_to_message_id] = reply
        by_node[reply.metadata.src_node_id] = reply
    ex = Exchange(sent[0].metadata.message_type, timeout, seconds)
    for msg in sent:
        node = msg.metadata.dst_node_id
        reply = by_id.get(msg.metadata.message_id) if msg.metadata.message_id else None
        if reply is None:  # grids that assign no message ids: pair by sender
            reply = by_node.get(node)
        if reply is None:
            ex.failed[node] = NO_REPLY
        elif reply.has_error():
            ex.failed[node] = _error_text(reply)
        else:
            ex.answered.append(node)
    return ex


def failed_devices(exchanges: Iterable[Exchange], message_type: str = "train") -> dict[int, str]:
    """node id → reason, over the exchanges of ``message_type`` (a later exchange does not undo one)."""
    out: dict[int, str] = {}
    for ex in exchanges:
        if ex.message_type == message_type:
            for node, reason in ex.failed.items():
                out.setdefault(node, reason)
    return out


def describe_failure(
    rnd: int, node: int, reason: str, exit_k: Any = None, timeout: float | None = None
) -> str:
    """One log line: ``round 3: no reply from device 4711 (exit 2) within 60 s``."""
    who = f"device {node}" + (f" (exit {exit_k})" if exit_k is not None else "")
    if reason == NO_REPLY:
        within = f" within {timeout:.0f} s" if timeout is not None else ""
        return f"round {rnd}: no reply from {who}{within}"
    if reason.startswith(f"error {NODE_UNAVAILABLE}:"):
        return f"round {rnd}: no reply from {who}: the SuperLink reports it offline (heartbeat lost)"
    return f"round {rnd}: {who} replied with an error: {reason}"
