"""A speech encoder with exit heads after chosen layers; the deepest exit is the teacher.

Why one module: training (all exits, one pass), device inference (exit K only, layers 1..K only),
early exit (go deeper only while unsure, never recomputing a layer) and checkpoints (backbone identity
+ heads) all need the same exit bookkeeping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedsd.checkpoint import (
    CheckpointError,
    atomic_directory,
    atomic_write_json,
    load_tensors,
    save_tensors,
    sha256_file,
)
from fedsd.model.backbone import (
    BackboneError,
    ConfigError,
    TruncatedEncoder,
    backbone_fingerprint,
    load_backbone,
)
from fedsd.model.config import FORMAT_VERSION, MultiExitConfig
from fedsd.model.heads import ExitHead, HeadOutput, build_head

HEADS_FILE = "heads.safetensors"
META_FILE = "fedsd.json"
BACKBONE_DIR = "backbone"
_REQUIRED = ("format_version", "family", "exits", "head", "label_names", "fingerprint", "heads")


class MultiExitSER(nn.Module):
    """Backbone + one ``ExitHead`` per exit; ``teacher_exit`` is the deepest exit.

    The settings live in ``self.config`` (a ``MultiExitConfig``); ``exits``, ``label_names``, ``meta``
    and the other setting attributes read it. ``MultiExitSER.from_config(backbone, config)`` builds the
    same model from a config object.

    ``final_norm_at_last_exit`` (pre-LN encoders): whether the exit after the last layer sees the
    encoder's final LayerNorm; None decides it now from the installed transformers (see
    ``TruncatedEncoder``). Checkpoints record the decision, so a reload computes what was trained.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        exits: Sequence[int],
        label_names: Sequence[str],
        head: str = "stats",
        head_kwargs: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        final_norm_at_last_exit: bool | None = None,
    ) -> None:
        super().__init__()
        self.encoder = TruncatedEncoder(backbone, final_norm_at_last_exit)
        config = MultiExitConfig(
            family=self.encoder.family,
            num_layers=self.encoder.num_layers,
            exits=exits,  # type: ignore[arg-type]  # checked and normalised to a sorted list
            label_names=label_names,  # type: ignore[arg-type]
            head=head,
            head_kwargs=head_kwargs,  # type: ignore[arg-type]  # None -> {}
            final_norm_at_last_exit=self.encoder.final_norm_at_last_exit,
            meta=meta,  # type: ignore[arg-type]
        )
        size, classes = self.encoder.hidden_size, config.num_classes
        kwargs = config.head_kwargs
        self.heads = nn.ModuleDict({str(k): build_head(config.head, size, classes, **kwargs) for k in config.exits})
        first: ExitHead = self.heads[str(config.exits[0])]  # type: ignore[assignment]
        self.config: MultiExitConfig = config.replace(head_kwargs=first.config())  # every option, defaults too
        self._verified: tuple[str, tuple] | None = None  # see from_pretrained(fingerprint=...)

    @classmethod
    def from_config(cls, backbone: PreTrainedModel, config: MultiExitConfig) -> MultiExitSER:
        """A model with freshly initialised heads for ``config`` around ``backbone``.

        The backbone must be the one the config describes (family and depth), else ConfigError."""
        model = cls(
            backbone,
            config.exits,
            config.label_names,
            head=config.head,
            head_kwargs=config.head_kwargs,
            meta=config.meta,
            final_norm_at_last_exit=config.final_norm_at_last_exit,
        )
        for name in ("family", "num_layers"):
            want, have = getattr(config, name), getattr(model.config, name)
            if want != have:
                raise ConfigError(name, f"{want!r} does not match the backbone's {have!r}")
        return model

    # -- properties ---------------------------------------------------------------------------------

    @property
    def backbone(self) -> PreTrainedModel:
        return self.encoder.model

    @property
    def exits(self) -> list[int]:
        return self.config.exits

    @property
    def teacher_exit(self) -> int:
        return self.config.teacher_exit

    @property
    def label_names(self) -> list[str]:
        return self.config.label_names

    @property
    def head_kind(self) -> str:
        return self.config.head

    @property
    def head_kwargs(self) -> dict[str, Any]:
        return self.config.head_kwargs

    @property
    def meta(self) -> dict[str, Any]:
        """Free-form provenance saved with the model (``config.meta``); mutable, and assignable."""
        return self.config.meta

    @meta.setter
    def meta(self, value: Mapping[str, Any]) -> None:
        self.config = self.config.replace(meta=value)

    @property
    def family(self) -> str:
        return self.encoder.family

    @property
    def final_norm_at_last_exit(self) -> bool:
        return self.encoder.final_norm_at_last_exit

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def embed_dim(self) -> int:
        return self.head(self.exits[0]).embed_dim

    def head(self, k: int) -> ExitHead:
        return self.heads[str(k)]  # type: ignore[return-value]

    def _requested(self, exits: Sequence[int] | None) -> list[int]:
        if exits is None:
            return list(self.exits)
        wanted = sorted({int(k) for k in exits})
        unknown = [k for k in wanted if k not in self.exits]
        if unknown or not wanted:
            raise ConfigError(
                "exits", f"requested exits {list(exits)} are not all among the model's exits {self.exits}"
            )
        return wanted

    def _run_head(self, k: int, hidden: Tensor, frame_mask: Tensor) -> HeadOutput:
        head = self.head(k)
        dtype = next(head.parameters()).dtype
        return head(hidden.to(dtype), frame_mask)

    # -- forward passes -----------------------------------------------------------------------------

    def hidden_for_exits(
        self, input_values: Tensor, attention_mask: Tensor | None, exits: Sequence[int] | None = None
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Hidden states and frame mask at each requested exit, from one pass up to the deepest of them."""
        out: dict[int, tuple[Tensor, Tensor]] = {}
        state = self.encoder.start(input_values, attention_mask)
        for k in self._requested(exits):
            state = self.encoder.advance(state, k)
            out[k] = (self.encoder.exit_hidden(state), state.frame_mask)
        return out

    def forward(
        self, input_values: Tensor, attention_mask: Tensor | None = None, exits: Sequence[int] | None = None
    ) -> dict[int, HeadOutput]:
        """Head outputs for the requested exits (default all); layers run only up to the deepest one."""
        return {
            k: self._run_head(k, hidden, mask)
            for k, (hidden, mask) in self.hidden_for_exits(input_values, attention_mask, exits).items()
        }

    def precompute(
        self, input_values: Tensor, attention_mask: Tensor | None = None, exits: Sequence[int] | None = None
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Cacheable head inputs per exit (``ExitHead.precompute``) with their frame masks."""
        out = {}
        for k, (hidden, mask) in self.hidden_for_exits(input_values, attention_mask, exits).items():
            head = self.head(k)
            out[k] = (head.precompute(hidden.to(next(head.parameters()).dtype), mask), mask)
        return out

    def forward_precomputed(
        self, features: Mapping[int, tuple[Tensor, Tensor | None]]
    ) -> dict[int, HeadOutput]:
        """Heads applied to cached ``precompute`` outputs (no backbone work)."""
        return {k: self.head(k).forward_precomputed(x, mask) for k, (x, mask) in features.items()}

    @torch.no_grad()
    def predict_early_exit(
        self,
        input_values: Tensor,
        attention_mask: Tensor | None = None,
        threshold: float = 0.9,
        max_exit: int | None = None,
    ) -> tuple[int, Tensor]:
        """Classify one clip, stopping at the first exit whose top probability reaches ``threshold``.

        Deeper exits continue from the state already computed, so each layer runs at most once. If no
        exit is confident enough, the deepest exit allowed (``max_exit``, default the teacher) answers.
        Runs in eval mode (dropout off) and restores the previous mode.
        """
        if input_values.dim() == 1:
            input_values = input_values.unsqueeze(0)
        if input_values.shape[0] != 1:
            raise ValueError(f"predict_early_exit takes one clip, got a batch of {input_values.shape[0]}")
        candidates = [k for k in self.exits if max_exit is None or k <= max_exit]
        if not candidates:
            raise ConfigError("max_exit", f"{max_exit} is below the shallowest exit {self.exits[0]}")
        was_training = self.training
        self.eval()
        try:
            state = self.encoder.start(input_values, attention_mask)
            for k in candidates:
                state = self.encoder.advance(state, k)
                out = self._run_head(k, self.encoder.exit_hidden(state), state.frame_mask)
                probs = torch.softmax(out.logits[0].float(), dim=-1)
                if float(probs.max()) >= threshold:
                    break
        finally:
            self.train(was_training)
        return k, probs

    # -- head weights -------------------------------------------------------------------------------

    def head_state_dict(self, exits: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Detached CPU copies of the heads' weights, keyed ``heads.<exit>.<param>``."""
        out: dict[str, Tensor] = {}
        for k in self._requested(exits):
            for name, t in self.head(k).state_dict().items():
                out[f"heads.{k}.{name}"] = t.detach().to("cpu").clone()
        return out

    def load_head_state_dict(
        self, state_dict: Mapping[str, Tensor], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Load head weights; returns (missing, unexpected) keys like ``nn.Module.load_state_dict``.

        Shape mismatches always raise; with ``strict`` missing or unexpected keys raise too (a device may
        load only the heads it runs with ``strict=False``).
        """
        own = {f"heads.{name}": t for name, t in self.heads.state_dict().items()}
        unexpected = sorted(k for k in state_dict if k not in own)
        missing = sorted(k for k in own if k not in state_dict)
        wrong = [
            f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
            for k in state_dict
            if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape)
        ]
        if wrong:
            raise CheckpointError(f"head weights with wrong shapes: {'; '.join(wrong)}")
        if strict and (missing or unexpected):
            raise CheckpointError(
                f"head weights do not match the model: missing {missing}, unexpected {unexpected}"
            )
        sub = {k[len("heads."):]: v for k, v in state_dict.items() if k in own}
        self.heads.load_state_dict(sub, strict=False)
        return missing, unexpected

    # -- freezing -----------------------------------------------------------------------------------

    def freeze_backbone(self, freeze_feature_encoder_only: bool = False) -> None:
        """Stop gradients into the backbone (devices) or only its CNN front end (common fine-tuning).

        Whisper's front end is its two convolutions and the position table (the log-mel has no weights).
        """
        if freeze_feature_encoder_only and self.family == "whisper":
            for module in (self.backbone.conv1, self.backbone.conv2, self.backbone.embed_positions):
                module.requires_grad_(False)  # the conv front end and the position table
        elif freeze_feature_encoder_only:
            fe = self.backbone.feature_extractor
            if hasattr(fe, "_freeze_parameters"):
                fe._freeze_parameters()  # also stops HF forcing requires_grad on the input
            else:
                fe.requires_grad_(False)
        else:
            self.backbone.requires_grad_(False)

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter takes gradients (``freeze_backbone()`` or set by hand)."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> MultiExitSER:
        """Like ``nn.Module.train``, but a frozen backbone stays in eval mode.

        Why: a frozen backbone is a fixed feature extractor; with its dropout on, the heads would train
        on noisy features they never see at inference (and cached features could not stand in for it).
        Training loops call ``model.train()`` every epoch, so the rule lives here.
        """
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()
        return self

    def backbone_fingerprint(self) -> str:
        """Identity of what the backbone computes at the exits: weights, config, final-norm rule.

        A model loaded with a verified ``fingerprint`` (``from_pretrained``) answers with it while its
        backbone tensors are the ones loaded, unmodified (same objects, same in-place version
        counters); after any change it hashes the weights again."""
        if self._verified is not None and self._verified[1] == self._backbone_version():
            return self._verified[0]
        return backbone_fingerprint(self.backbone, self.final_norm_at_last_exit)

    def _backbone_version(self) -> tuple:
        return tuple((id(t), t._version) for t in self.backbone.state_dict(keep_vars=True).values())

    @property
    def has_backbone_weights(self) -> bool:
        """False for a heads-only model (``from_pretrained(backbone="meta")``): no forward pass."""
        return not any(t.is_meta for t in self.backbone.parameters())

    # -- checkpoints --------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The fedsd.json content (without the per-file hashes): ``config.to_dict()`` + the fingerprint."""
        info = self.config.to_dict()
        info["fingerprint"] = self.backbone_fingerprint()
        info["meta"] = info.pop("meta")  # last, after the fingerprint, as the file has always had it
        return info

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write ``backbone/`` (HF layout), ``heads.safetensors``, ``fedsd.json``: one atomic directory."""
        path = Path(path)
        heads = self.head_state_dict()
        info = self.describe()
        with atomic_directory(path) as tmp:
            self.backbone.save_pretrained(tmp / BACKBONE_DIR)
            save_tensors(tmp / HEADS_FILE, heads, metadata={"format": "pt"})
            info["heads"] = {k: list(v.shape) for k, v in heads.items()}
            info["heads_sha256"] = sha256_file(tmp / HEADS_FILE)
            atomic_write_json(tmp / META_FILE, info)
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        map_location: str | torch.device = "cpu",
        *,
        fingerprint: str | None = None,
        backbone: PreTrainedModel | str | None = None,
    ) -> MultiExitSER:
        """Load a directory written by ``save_pretrained``; anything inconsistent raises CheckpointError.

        ``fingerprint``: the backbone fingerprint the caller already verified for these exact files (a
        device's stamp, ``fedsd.clients.model_store``); it must equal the one in fedsd.json, and the
        weights are not hashed again. Only with it, ``backbone`` may be ``"meta"`` (a heads-only model:
        the encoder's skeleton without weights, for heads trained on cached features) or a backbone
        already loaded from this directory (reused, not read again).
        """
        path = Path(path)
        if backbone is not None and fingerprint is None:
            raise ValueError("from_pretrained(backbone=...) needs the verified fingerprint")
        info = _read_info(path, fingerprint)
        net, final_norm = _open_backbone(path, info, backbone)
        verified = fingerprint is not None
        if fingerprint is None:
            fingerprint = backbone_fingerprint(net, final_norm)
        if fingerprint != info["fingerprint"]:
            raise CheckpointError(
                f"{path / BACKBONE_DIR}: backbone fingerprint {fingerprint[:12]}… differs from the "
                f"{info['fingerprint'][:12]}… recorded in {META_FILE} (weights or config changed)"
            )
        try:
            model = cls.from_config(net, MultiExitConfig.from_dict(info))
        except ConfigError as err:
            raise CheckpointError(f"{path / META_FILE}: {err}") from err
        _load_heads(model, path, info)
        if not model.has_backbone_weights:
            model.heads.to(map_location)
            model.eval()
        else:
            model.to(map_location).eval()
        if verified:
            model._verified = (fingerprint, model._backbone_version())
        return model


def _read_info(path: Path, fingerprint: str | None) -> dict[str, Any]:
    """fedsd.json of ``path``, checked for what loading needs before any weights are read."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing; {path} is not a fedsd model directory")
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: unreadable JSON ({err})") from err
    absent = [k for k in _REQUIRED if k not in info]
    if absent:
        raise CheckpointError(f"{meta_path}: missing keys {absent}")
    if info["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format_version {info['format_version']} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    bdir = path / BACKBONE_DIR
    if not bdir.is_dir():
        raise CheckpointError(f"{bdir}: backbone directory is missing")
    if fingerprint is not None and fingerprint != info["fingerprint"]:
        raise CheckpointError(
            f"{meta_path}: fingerprint {str(info['fingerprint'])[:12]}… is not the verified "
            f"{fingerprint[:12]}…"
        )
    return info


def _open_backbone(
    path: Path, info: Mapping[str, Any], backbone: PreTrainedModel | str | None
) -> tuple[PreTrainedModel, bool | None]:
    """The backbone to wrap (read from ``backbone/``, a meta skeleton, or the one given) and the recorded
    final-norm decision."""
    bdir = path / BACKBONE_DIR
    try:
        if backbone is None:
            backbone = load_backbone(bdir, family=info["family"])
        elif isinstance(backbone, str):
            backbone = _skeleton(bdir, info["family"], backbone)
    except (BackboneError, ConfigError) as err:
        raise CheckpointError(f"{bdir}: {err}") from err
    # Checkpoints older than the key recorded no decision (and a fingerprint without it): the
    # installed transformers decides, as it did when they were written.
    final_norm = info.get("final_norm_at_last_exit")
    if final_norm is not None and not isinstance(final_norm, bool):
        raise CheckpointError(
            f"{path / META_FILE}: final_norm_at_last_exit must be true or false, got {final_norm!r}"
        )
    return backbone, final_norm


def _load_heads(model: MultiExitSER, path: Path, info: Mapping[str, Any]) -> None:
    """Load heads.safetensors into ``model`` after checking it against fedsd.json and the model's heads."""
    heads_path = path / HEADS_FILE
    heads = load_tensors(heads_path, expected_sha256=info.get("heads_sha256"))
    recorded = {k: list(v) for k, v in info["heads"].items()}
    found = {k: list(v.shape) for k, v in heads.items()}
    expected = {k: list(v.shape) for k, v in model.head_state_dict().items()}
    for name, other in ((META_FILE, recorded), ("the model built from it", expected)):
        if found != other:
            diff = sorted(set(found) ^ set(other)) or sorted(k for k in found if found[k] != other[k])
            raise CheckpointError(f"{heads_path}: head weights do not match {name}: differing keys {diff[:8]}")
    model.load_head_state_dict(heads, strict=True)


def _skeleton(bdir: Path, family: str, device: str) -> PreTrainedModel:
    """The encoder of ``bdir``'s config on ``device`` ("meta": shapes only, nothing read or allocated)."""
    from transformers import AutoConfig

    from fedsd.model.backbone import FAMILIES, _deterministic, family_of

    if device != "meta":
        raise ValueError(f"backbone={device!r}: only 'meta' (a heads-only model) is supported")
    config = _deterministic(AutoConfig.from_pretrained(str(bdir)))
    if family_of(config) != family:
        raise ConfigError("family", f"{bdir} holds a {family_of(config)!r} model, fedsd.json says {family!r}")
    _, model_cls = FAMILIES[family]
    with torch.device("meta"):
        return model_cls(config).eval()
