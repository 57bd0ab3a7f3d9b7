"""A Flower Grid that hands messages straight to a ClientApp in this process (no Ray, no sockets).

Why: the same ServerApp logic then runs in tests and quick experiments in seconds, with Flower's own
Message/Context/ClientApp objects. Messages are copied through Flower's serialisation on the way in
and out, as a real transport would, so a client can never mutate the server's records in place.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode value used by the real runtime


def _copy(content: RecordDict) -> RecordDict:
    """Round-trip through Flower's wire format (what a transport does)."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    return recorddict_from_proto(recorddict_to_proto(content))


class InProcessGrid(Grid):
    """Nodes are (node_id → Context); ``send_and_receive`` calls the ClientApp for each message."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Iterable[Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        self.contexts: dict[int, Context] = {}
        for i, nc in enumerate(node_configs):
            node_id = 1000 + i
            self.contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=dict(nc),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self.unavailable: set[int] = set()
        self._run: Any = None
        self._ids = itertools.count()
        self._replies: dict[str, Message] = {}
        TaskIdentity.run_id = run_id  # instruction Messages are stamped with the process's identity
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1

    # -- Grid interface
    def set_run(self, run_id: int) -> None:
        self._run = run_id

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # deprecated in flwr
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.unavailable]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.contexts or node in self.unavailable:
                continue  # a vanished device: no reply, like a real timeout
            incoming = Message(_copy(msg.content), node, msg.metadata.message_type)
            try:
                reply = self.client_app(incoming, self.contexts[node])
                out = Message(_copy(reply.content), reply_to=msg)
            except Exception as e:  # the runtime turns handler exceptions into error replies
                out = Message(Error(CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"), reply_to=msg)
            key = str(next(self._ids))
            self._replies[key] = out
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))
