"""The handshake: ask each device what it is (``query.info``) and deliver the base model to those that lack it.

A reply is the device's word: parsed by ``validate_info_reply`` (a malformed one leaves that device
out, named in the log, and the run goes on); replies from nodes that were not asked, and a node's
second reply, are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedsd.security.untrusted import UntrustedValueError, identifier
from fedsd.security.wire import QUERY_INFO, QUERY_MODEL, checkpoint_to_record
from fedsd.server.replies import NO_REPLY, pair_replies
from fedsd.server.validation import Rejection, validate_info_reply

Infos = dict[int, dict[str, Any]]


@dataclass
class Greeting:
    """What greeting devices needs from the run."""

    fingerprint: str
    base_model: str
    deliver_model: bool
    timeout: float
    log: Callable[[str], None]
    name_device: Callable[[int, Message], str]
    """Node id, its info reply → the name reports show (see :func:`device_name`)."""


def device_name(names: dict[int, str], node: int, reply: Message) -> str:
    """The name a device gives itself (its partition's client id, e.g. ``client-003``), recorded in
    ``names``; an invalid or already taken name falls back to ``<name>@<node id>`` or the node id."""
    try:
        name = identifier(reply.content.config_records["info"].get("name", ""), "name")
    except UntrustedValueError:
        name = str(node)
    if name in {v for n, v in names.items() if n != node}:
        name = f"{name}@{node}"
    names[node] = name
    return name


def greet(grid: Grid, nodes: Sequence[int], greeting: Greeting) -> Infos:
    """query.info to ``nodes``, then the base model to those that lack it; the usable ones' infos."""
    infos = ask_infos(grid, nodes, greeting)
    need = [n for n, i in infos.items() if not i["has-model"]]
    if need and not greeting.deliver_model:
        for n in need:
            greeting.log(f"device {n}: cannot take part: it lacks the model and model delivery is off")
            infos.pop(n)
        need = []
    if need:
        for node in deliver_model(grid, need, greeting):
            infos.pop(node, None)
    for n, i in sorted(infos.items()):
        greeting.log(
            f"device {n} ({i.get('name', n)}): exit {i['exit']}, {i['n-utterances']} utterances "
            f"({i['n-labelled']} labelled)"
        )
    return infos


def ask_infos(grid: Grid, nodes: Sequence[int], greeting: Greeting) -> Infos:
    """Each asked node's parsed ``query.info`` reply (with the name it goes by); failures are logged."""
    query = RecordDict({"config": ConfigRecord({"fingerprint": greeting.fingerprint})})
    msgs = [Message(query, dst_node_id=n, message_type=QUERY_INFO) for n in nodes]
    infos: Infos = {}
    timeout = greeting.timeout
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    # pair by message id: the SuperLink answers for a vanished device (src node 1, not the device)
    for node, why in sorted(pair_replies(msgs, replies, timeout, 0.0).failed.items()):
        greeting.log(
            f"device {node}: cannot take part: {why}" + (f" within {timeout:.0f} s" if why == NO_REPLY else "")
        )
    asked = set(nodes)
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error() or node not in asked or node in infos:
            continue  # errors were logged above; strangers and second replies do not count
        parsed = validate_info_reply(reply)
        if isinstance(parsed, Rejection):
            greeting.log(f"device {node}: cannot take part: malformed handshake reply: {parsed.reason}")
            continue
        infos[node] = parsed | {"name": greeting.name_device(node, reply)}
    return infos


def deliver_model(grid: Grid, need: Sequence[int], greeting: Greeting) -> list[int]:
    """Send the base model to ``need``; returns the nodes the delivery failed for (logged)."""
    files, digests = checkpoint_to_record(greeting.base_model)
    size = sum(a.numpy().nbytes for a in files.values())
    greeting.log(f"delivering the base model ({size / 1e6:.1f} MB) to {len(need)} device(s)")
    content = RecordDict(
        {
            "files": files,
            "digests": digests,
            "config": ConfigRecord({"fingerprint": greeting.fingerprint}),
        }
    )
    msgs = [Message(content, dst_node_id=n, message_type=QUERY_MODEL) for n in need]
    replies = list(grid.send_and_receive(msgs, timeout=greeting.timeout))
    failed = []
    for node, why in sorted(pair_replies(msgs, replies, greeting.timeout, 0.0).failed.items()):
        greeting.log(f"device {node}: model delivery failed: {why}")
        failed.append(node)
    return failed
