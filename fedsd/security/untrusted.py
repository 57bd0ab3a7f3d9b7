"""Values that crossed the trust boundary, checked before they touch a path, a subprocess or a log.

Everything a server sends is untrusted on a device, and everything a device sends is untrusted on the
server (see docs/architecture.md §4). A value that becomes part of a file name is checked against a strict
pattern first — never "cleaned": a cleaned value could still collide with something else. The
validators raise :class:`UntrustedValueError` whose message names the field and shows the offending
value with :func:`shown` (escaped, truncated), so it is safe to print and log.

- :func:`sha256_hex` / :func:`fingerprint`: 64 lower-case hex digits (backbone fingerprints, file
  digests). A device keys its model cache by ``fingerprint[:16]``: only hex reaches that path.
- :func:`identifier`: ``[A-Za-z0-9._-]{1,64}`` not starting with ``.`` (run/federation ids that name
  files, e.g. ``privacy/<federation-id>.json``): no separator, no ``..``, no hidden file, no NUL.
- :func:`model_file`: the only file names a model delivery may carry (what ``save_pretrained`` writes).
- :func:`config_int` / :func:`config_float` / :func:`config_choice`: typed, finite, bounded reads of a
  ConfigRecord (a ``local-epochs`` of 10**12 would be a denial of service, a NaN ``lr`` a poisoned model).
- :func:`model_dimensions`: every number a delivered config declares is bounded (``MAX_CONFIG_INT``,
  ``MAX_LAYERS``, ``MAX_CONFIG_LIST``) before a model is sized from it, even on the meta device.
- :func:`printable`: a one-line, control-character-free rendering of any text for logs and terminals
  (an ANSI escape sequence in a server's string must not reach the operator's terminal).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MAX_MODEL_FILES",
    "UntrustedValueError",
    "config_choice",
    "config_float",
    "config_int",
    "fingerprint",
    "identifier",
    "model_dimensions",
    "model_file",
    "printable",
    "sha256_hex",
    "shown",
]


class UntrustedValueError(ValueError):
    """A value received from the other side of the federation is unusable; the message names it."""


_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_IDENTIFIER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", re.ASCII)

# What MultiExitSER.save_pretrained writes: fedsd.json, heads.safetensors and a Hugging Face backbone/
# (config + weights, sharded or not). A delivery naming anything else is refused.
MODEL_FILES = frozenset(
    {
        "fedsd.json",
        "heads.safetensors",
        "backbone/config.json",
        "backbone/model.safetensors",
        "backbone/model.safetensors.index.json",
        "backbone/generation_config.json",
    }
)
_MODEL_SHARD = re.compile(r"backbone/model-[0-9]{5}-of-[0-9]{5}\.safetensors", re.ASCII)
MAX_MODEL_FILES = 256
"""Most files one model delivery may carry (the fixed files plus weight shards)."""


MAX_CONFIG_INT = 2**20
"""Largest integer a delivered config may hold (dimensions, positions, vocabulary, token ids)."""
MAX_LAYERS = 256
"""Largest layer count (``*_layers``), exit and label count a delivered config may declare."""
MAX_CONFIG_LIST = 4096
"""Longest list in a delivered config (conv dims, exits, label names)."""
MAX_CONFIG_DEPTH = 8
"""Deepest nesting of a delivered config's objects and lists."""


def model_dimensions(config: Any, what: str = "model config", depth: int = 0) -> None:
    """Refuse a delivered config (``backbone/config.json``, ``fedsd.json``) that declares absurd sizes.

    Every integer anywhere in it must lie in [-MAX_CONFIG_INT, MAX_CONFIG_INT], every ``*layers*``
    count and the number of ``exits``/``label_names`` at most MAX_LAYERS/MAX_CONFIG_LIST, lists and
    nesting bounded: checked on the parsed JSON, before anything (even a meta-device skeleton) is built.
    """
    if depth > MAX_CONFIG_DEPTH:
        raise UntrustedValueError(f"{what}: nested deeper than MAX_CONFIG_DEPTH = {MAX_CONFIG_DEPTH}")
    items: Iterable[tuple[str, Any]]
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        if len(config) > MAX_CONFIG_LIST:
            raise UntrustedValueError(
                f"{what}: a list of {len(config)} items, over MAX_CONFIG_LIST = {MAX_CONFIG_LIST}"
            )
        items = ((f"{i}", v) for i, v in enumerate(config))
    else:
        return
    for key, value in items:
        name = f"{what}.{printable(key, 64)}" if isinstance(config, dict) else f"{what}[{key}]"
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_CONFIG_INT:
                raise UntrustedValueError(f"{name}: {shown(value)} is over MAX_CONFIG_INT = {MAX_CONFIG_INT}")
            if isinstance(config, dict) and "layers" in str(key) and value > MAX_LAYERS:
                raise UntrustedValueError(f"{name}: {value} layers, over MAX_LAYERS = {MAX_LAYERS}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UntrustedValueError(f"{name}: {shown(value)} is not finite")
        elif isinstance(value, (dict, list)):
            if key == "exits" and isinstance(value, list) and len(value) > MAX_LAYERS:
                raise UntrustedValueError(f"{name}: {len(value)} exits, over MAX_LAYERS = {MAX_LAYERS}")
            model_dimensions(value, name, depth + 1)


def printable(text: Any, limit: int | None = 500) -> str:
    """``text`` as one printable line: control/format characters escaped (``\\x1b``, ``\\n``,
    ``\\u202e``), cut to ``limit`` characters. For logs and terminals, never for paths."""
    s = text if isinstance(text, str) else str(text)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    if limit is not None and len(out) > limit:
        out = out[:limit] + f"… ({len(s)} characters)"
    return out


def shown(value: Any, limit: int = 80) -> str:
    """A safe rendering of an untrusted value for an error message (repr: quoted, escaped; cut)."""
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__ must not break the error path
        text = f"<{type(value).__name__}>"
    return printable(text, limit)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise UntrustedValueError(f"{what}: expected a string, got {type(value).__name__} {shown(value)}")
    return value


def sha256_hex(value: Any, what: str = "sha256") -> str:
    """``value`` if it is a sha256 digest in hex (64 lower-case hex digits), else raise."""
    s = _string(value, what)
    if not _SHA256.fullmatch(s):
        raise UntrustedValueError(f"{what}: not a sha256 hex digest (64 hex digits): {shown(s)}")
    return s


def fingerprint(value: Any, what: str = "fingerprint", *, allow_empty: bool = False) -> str:
    """A backbone fingerprint (sha256 hex); ``""`` passes only with ``allow_empty``."""
    if allow_empty and value == "":
        return ""
    return sha256_hex(value, what)


def identifier(value: Any, what: str = "id", *, allow_empty: bool = False) -> str:
    """An id that may name a file: ``[A-Za-z0-9._-]{1,64}``, not starting with '.' (no '..', no '/')."""
    s = _string(value, what)
    if allow_empty and s == "":
        return s
    if not _IDENTIFIER.fullmatch(s):
        raise UntrustedValueError(
            f"{what}: not a valid id (1–64 of A-Z a-z 0-9 . _ -, not starting with '.'): {shown(s)}"
        )
    return s


def model_file(value: Any, what: str = "model file") -> str:
    """A relative file name a model delivery may carry (see ``MODEL_FILES``), else raise."""
    s = _string(value, what)
    if s in MODEL_FILES or _MODEL_SHARD.fullmatch(s):
        return s
    raise UntrustedValueError(
        f"{what}: {shown(s)} is not a file of a fedsd model "
        f"({', '.join(sorted(MODEL_FILES))} or backbone weight shards)"
    )


def config_int(
    cfg: Mapping[str, Any], key: str, default: int, lo: int | None = None, hi: int | None = None
) -> int:
    """An integer setting (an integral float such as ``3.0`` is accepted), within [lo, hi]."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UntrustedValueError(f"config '{printable(key, 64)}': expected an integer, got {shown(value)}")
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise UntrustedValueError(
                f"config '{printable(key, 64)}': expected an integer, got {shown(value)}"
            )
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UntrustedValueError(f"config '{printable(key, 64)}': {value} is outside [{lo}, {hi}]")
    return value


def config_float(
    cfg: Mapping[str, Any],
    key: str,
    default: float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
) -> float:
    """A finite number setting within [lo, hi] (``(lo, hi]`` with ``lo_open``)."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UntrustedValueError(f"config '{printable(key, 64)}': expected a number, got {shown(value)}")
    value = float(value)
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if not math.isfinite(value) or low_bad or (hi is not None and value > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise UntrustedValueError(
            f"config '{printable(key, 64)}': {shown(value)} is not a finite number in {bounds}"
        )
    return value


def config_choice(cfg: Mapping[str, Any], key: str, default: str, choices: Iterable[str]) -> str:
    """A string setting that must be one of ``choices``."""
    value = cfg.get(key, default)
    allowed = tuple(choices)
    if not isinstance(value, str) or value not in allowed:
        raise UntrustedValueError(
            f"config '{printable(key, 64)}': {shown(value)} is not one of {', '.join(allowed)}"
        )
    return value
