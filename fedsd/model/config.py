"""The multi-exit model's settings as one typed object: ``MultiExitSER.config``, written to fedsd.json.

Why one object: the settings that rebuild a model (backbone family and depth, exits, class names, head
and its options, the final-norm rule) and its free-form ``meta`` (sample rate, crop, backbone source,
export record) are validated once, with errors that name the field, and are what ``save_pretrained``
writes and ``from_pretrained`` reads (in the spirit of transformers' ``PretrainedConfig``). The file
layout is unchanged, so checkpoints written before this object existed load as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsd.model.backbone import FAMILIES, SAMPLE_RATE, ConfigError
from fedsd.model.heads import HEADS, check_head_kwargs

FORMAT_VERSION = 1


def _check_family(family: Any) -> str:
    if family not in FAMILIES:
        raise ConfigError("family", f"unknown value {family!r}; valid values: {', '.join(FAMILIES)}")
    return str(family)


def _check_num_layers(num_layers: Any) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(
            "num_layers", f"expected the backbone's depth (an integer >= 1), got {num_layers!r}"
        )
    return num_layers


def _check_exits(exits: Any, num_layers: int) -> list[int]:
    if isinstance(exits, (str, bytes)) or not isinstance(exits, Sequence) or len(exits) == 0:
        raise ConfigError("exits", f"expected a non-empty list of layer numbers, got {exits!r}")
    bad = [k for k in exits if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_layers]
    if bad:
        raise ConfigError(
            "exits", f"{bad} not valid: exits are layer numbers from 1 to {num_layers} (the backbone's depth)"
        )
    return sorted(set(exits))


def _check_labels(label_names: Any) -> list[str]:
    if isinstance(label_names, str) or not isinstance(label_names, Sequence):
        raise ConfigError("label_names", f"expected a list of class names, got {label_names!r}")
    names = [str(n) for n in label_names]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError("label_names", f"need at least 2 distinct class names, got {names}")
    return names


def _check_head(head: Any) -> str:
    if head not in HEADS:
        raise ConfigError("head", f"unknown value {head!r}; valid values: {', '.join(HEADS)}")
    return str(head)


def _check_mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"expected a mapping, got {type(value).__name__}")
    return dict(value)


def _check_final_norm(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError("final_norm_at_last_exit", f"must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class MultiExitConfig:
    """What rebuilds a ``MultiExitSER`` around its backbone; fields are checked on construction.

    ``family`` and ``num_layers`` describe the backbone (they must match the one the model wraps);
    ``exits`` are layer numbers (sorted, duplicates dropped; the deepest is the teacher);
    ``final_norm_at_last_exit`` None means "decide from the installed transformers" (checkpoints older
    than the key); ``meta`` is free-form provenance (``sample_rate``, ``crop``, ``backbone_source``, ...).
    """

    family: str
    num_layers: int
    exits: list[int]
    label_names: list[str]
    head: str = "stats"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    final_norm_at_last_exit: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        num_layers = _check_num_layers(self.num_layers)
        checked: dict[str, Any] = {
            "family": _check_family(self.family),
            "num_layers": num_layers,
            "exits": _check_exits(self.exits, num_layers),
            "label_names": _check_labels(self.label_names),
            "head": _check_head(self.head),
        }
        checked["head_kwargs"] = check_head_kwargs(
            checked["head"], _check_mapping("head_kwargs", self.head_kwargs)
        )
        checked["final_norm_at_last_exit"] = _check_final_norm(self.final_norm_at_last_exit)
        checked["meta"] = _check_mapping("meta", self.meta)
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the normalised values are set once, here

    @property
    def teacher_exit(self) -> int:
        return self.exits[-1]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def sample_rate(self) -> int:
        return int(self.meta.get("sample_rate", SAMPLE_RATE))

    @property
    def crop(self) -> Any:
        """The training crop recorded in ``meta`` (a CropConfig dict, or samples in old checkpoints)."""
        return self.meta.get("crop")

    @property
    def backbone_source(self) -> str | None:
        """Where the backbone came from (built-in name, directory or hub id), when training recorded it."""
        source = self.meta.get("backbone_source")
        return None if source is None else str(source)

    def replace(self, **changes: Any) -> MultiExitConfig:
        """A copy with ``changes`` applied (and checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings part of fedsd.json, in the file's key order (derived values included for readers)."""
        return {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "num_layers": self.num_layers,
            "final_norm_at_last_exit": self.final_norm_at_last_exit,
            "exits": list(self.exits),
            "teacher_exit": self.teacher_exit,
            "head": self.head,
            "head_kwargs": dict(self.head_kwargs),
            "label_names": list(self.label_names),
            "sample_rate": self.sample_rate,
            "crop": self.crop,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MultiExitConfig:
        """Read the settings from a fedsd.json-like mapping; keys that are not settings (derived values,
        the fingerprint, head shapes and hash) are ignored. A missing or bad setting raises ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError("config", f"expected a mapping, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError("format_version", f"{version!r} is not supported (expected {FORMAT_VERSION})")
        fields = dataclasses.fields(cls)
        for f in fields:
            if (
                f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
                and f.name not in data
            ):
                raise ConfigError(f.name, "missing")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})
