"""``--set KEY=VALUE``: the one parser every command with a config uses (train, simulate, server start).

Why check here: the config loader sees an override only after merging it into the YAML file, so an
unknown key or a bad value used to be reported against the file. Checked here, the error names the
``--set`` flag, the key, and the closest real key (``train.epoch`` → did you mean ``train.epochs``?).
"""

from __future__ import annotations

import difflib
import functools
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from fedsd.cli.errors import ExitCode, fail

SET_HELP = "Any config field as KEY=VALUE, the value read as YAML (repeatable): --set train.warmup_epochs=2"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``DPConfig | None`` → ``DPConfig``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _is_mapping(annotation: Any) -> bool:
    """``dict[str, Any]`` (optional or not): any sub-key is allowed beneath such a field."""
    origin = typing.get_origin(annotation)
    return origin is dict or any(_is_mapping(a) for a in typing.get_args(annotation) if a is not type(None))


@functools.cache
def config_fields() -> dict[str, FieldInfo]:
    """Every dotted key of an experiment config (sections too: ``federated.dp``) → its pydantic field."""
    from fedsd.config import ExperimentConfig

    found: dict[str, FieldInfo] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            found[prefix + name] = info
            sub = _model_of(info.annotation)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")

    walk(ExperimentConfig, "")
    return found


def closest_keys(key: str) -> list[str]:
    """The valid keys nearest to ``key``: the closest spelling of the whole key, else every key whose
    last part is spelt like ``key``'s (``lr`` → ``train.lr``, ``federated.lr``)."""
    keys = list(config_fields())
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close
    leaf = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(leaf, sorted({k.rsplit(".", 1)[-1] for k in keys}), n=1, cutoff=0.75)
    return [k for k in keys if near and k.rsplit(".", 1)[-1] == near[0]][:3]


def check_override(key: str, value: Any, raw: str) -> None:
    """Exit 2 unless ``key`` is a config field and ``value`` fits its type and range."""
    fields = config_fields()
    if key not in fields:
        parents = [".".join(key.split(".")[:i]) for i in range(1, key.count(".") + 1)]
        if any(p in fields and _is_mapping(fields[p].annotation) for p in parents):
            return  # a key inside a free mapping (model.head_kwargs.hidden)
        near = " or ".join(repr(k) for k in closest_keys(key))
        hint = f"; did you mean {near}?" if near else "; the sections are data, model, train, federated, log"
        fail(f"--set {key}={raw}: {key!r} is not a config key{hint}", ExitCode.USAGE)
    info = fields[key]
    kind = typing.Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    try:
        TypeAdapter(kind).validate_python(value)  # type: ignore[arg-type]
    except ValidationError as e:
        reasons = "; ".join(err["msg"] for err in e.errors())
        fail(f"--set {key}={raw}: {reasons}", ExitCode.USAGE)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set train.epochs=2`` items → ``{"train.epochs": 2}``, each key and value checked (exit 2)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            fail(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2", ExitCode.USAGE)
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            fail(f"--set {key}={raw}: the value is not YAML: {e}", ExitCode.USAGE)
        check_override(key, value, raw)
        out[key] = value
    return out
