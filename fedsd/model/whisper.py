"""Whisper's encoder as a multi-exit family: log-mel front end in torch, layers at the clip's true length.

Why a family of its own: the other families take the raw waveform; Whisper takes a log-mel spectrogram
padded to 30 s, and Hugging Face's ``WhisperEncoder`` refuses anything else. Here the model input stays
the 16 kHz waveform + attention mask used everywhere in fedsd (training, feature cache, inference, ONNX),
so the spectrogram is computed inside the model: an STFT written as a strided convolution with a fixed
DFT basis (traceable, ONNX-exportable, never quantised) and Slaney mel filters, numerically what
``transformers.WhisperFeatureExtractor`` computes for the same samples. Then conv1+GELU, conv2+GELU, the
first T rows of the position table and layers 1..k only, at the clip's true length: no 30 s padding
(tiny.en, 4 s clip, 1 thread: 39 ms for all 4 layers vs 360 ms padded). True-length features differ
from 30 s padded ones more with depth, which is why every path (training, cache, inference, export)
goes through this one forward.

Batch-mates never change a clip's outputs: the STFT reflects each clip at its own end, the log-mel
maximum is over the clip's own frames, the mel and the conv1 output are zeroed beyond the clip's
frames (what the convolution's zero padding shows a lone clip), and the layers get a key-padding mask.

Exits: ``hidden_states[k]`` of HF for k < N is a layer's raw output; HF's last entry (k = N) is after
the encoder's final LayerNorm, which is also what Whisper's decoder reads. So by default the deepest
layer's exit sees that LayerNorm (``final_norm_at_last_exit`` true), and exits below it never do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from fedsd.model.backbone import (
    ENCODERS,
    SAMPLE_RATE,
    BackboneError,
    EncoderState,
    TruncatedEncoder,
    _bidirectional_mask,
    batched_inputs,
)

N_FFT = 400  # 25 ms window
HOP = 160  # 10 ms hop: 100 mel frames/s, 50 encoder frames/s after conv2's stride 2
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the clip's maximum
MIN_SAMPLES = N_FFT  # shorter clips cannot be reflect-padded by half a window as Whisper does


def tiny_config(num_layers: int = 4) -> WhisperConfig:
    """A small random Whisper (d_model 64, 2 heads, FFN 128) for tests and smoke runs."""
    return WhisperConfig(
        d_model=64,
        encoder_layers=num_layers,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=128,
        vocab_size=128,
        pad_token_id=127,
        bos_token_id=126,
        eos_token_id=127,
        decoder_start_token_id=126,
        begin_suppress_tokens=None,
        max_target_positions=32,
    )


def base_config() -> WhisperConfig:
    """The shape of OpenAI's Whisper base (6 layers, width 512, 8 heads), random weights."""
    return WhisperConfig(
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
    )


# ------------------------------------------------------------------------------------------ log-mel
def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-normalised mel filters on the Slaney scale, 0-8 kHz: ``[n_mels, 1 + N_FFT // 2]`` (float64).

    The same call ``WhisperFeatureExtractor`` makes, so the two front ends share their filters exactly.
    """
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    ).T


def dft_basis() -> np.ndarray:
    """Periodic-Hann-windowed real DFT as conv weights ``[2 * (1 + N_FFT // 2), 1, N_FFT]``: cos rows, then -sin."""
    n = np.arange(N_FFT)
    window = 0.5 - 0.5 * np.cos(2 * math.pi * n / N_FFT)
    freqs = np.arange(1 + N_FFT // 2)[:, None]
    angle = 2 * math.pi * freqs * n[None, :] / N_FFT
    return np.concatenate([window * np.cos(angle), -window * np.sin(angle)])[:, None, :]


def mel_frames(num_samples: Tensor) -> Tensor:
    """Log-mel frames of a clip: Whisper's centred STFT gives ``n // HOP + 1`` and drops the last."""
    return torch.div(num_samples, HOP, rounding_mode="floor")


def encoder_frames(mel: Tensor) -> Tensor:
    """Encoder frames for ``mel`` log-mel frames (conv2: kernel 3, stride 2, padding 1)."""
    return torch.div(mel - 1, 2, rounding_mode="floor") + 1


class LogMel(nn.Module):
    """16 kHz waveform ``[B, S]`` -> Whisper log-mel ``[B, n_mels, S // HOP]``, each clip as if alone.

    The DFT basis and filters are non-persistent buffers: they are constants of the method, not weights,
    so they are not in any state dict or fingerprint (the fingerprint names the rule instead).
    """

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.register_buffer("basis", torch.from_numpy(dft_basis()).float(), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filters(n_mels)).float(), persistent=False)

    def forward(self, x: Tensor, num_samples: Tensor) -> tuple[Tensor, Tensor]:
        """(log-mel zeroed beyond each clip's frames, frame counts)."""
        total = x.shape[1]
        half = N_FFT // 2
        n = num_samples[:, None]
        # Reflect padding by half a window at both ends of each clip's own samples (np.pad "reflect").
        pos = torch.arange(-half, total + half, device=x.device)[None, :]
        idx = pos.abs()
        idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx).clamp(0, total - 1)
        padded = torch.gather(x, 1, idx)
        spec = nn.functional.conv1d(padded[:, None, :], self.basis, stride=HOP)[..., :-1]
        bins = spec.shape[1] // 2
        power = spec[:, :bins].square() + spec[:, bins:].square()
        mel = torch.matmul(self.filters, power)
        log_spec = torch.log10(mel.clamp_min(LOG_FLOOR))
        frames = mel_frames(num_samples)
        valid = (torch.arange(log_spec.shape[-1], device=x.device)[None, :] < frames[:, None])[:, None, :]
        peak = log_spec.masked_fill(~valid, -torch.inf).amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, peak - DYNAMIC_RANGE)
        return ((log_spec + 4.0) / 4.0) * valid.to(log_spec.dtype), frames


# ------------------------------------------------------------------------------------------ encoder
class WhisperTruncatedEncoder(TruncatedEncoder):
    """Whisper's encoder run layer by layer from the waveform, sharing the wrapped ``WhisperEncoder``'s weights.

    ``final_norm_at_last_exit``: whether the exit after the last layer sees the encoder's final LayerNorm
    (HF's ``hidden_states[N]``); default true unless the config pins ``tie_last_hidden_states`` false.
    """

    def __init__(self, model: PreTrainedModel, final_norm_at_last_exit: bool | None = None) -> None:
        nn.Module.__init__(self)
        if not isinstance(model, WhisperEncoder):
            raise BackboneError(
                f"a whisper backbone must be transformers' WhisperEncoder, got {type(model).__name__}"
            )
        self.family = "whisper"
        self.model = model
        config = model.config
        self.num_layers = int(config.encoder_layers)
        self.hidden_size = int(config.d_model)
        self.pre_ln = True
        self.group_norm_front_end = False
        if final_norm_at_last_exit is None:
            final_norm_at_last_exit = bool(getattr(config, "tie_last_hidden_states", None) is not False)
        self.final_norm_at_last_exit = bool(final_norm_at_last_exit)
        self.max_mel_frames = int(config.max_source_positions) * 2
        self.log_mel = LogMel(int(config.num_mel_bins))

    def output_lengths(self, num_samples: Tensor) -> Tensor:
        """Encoder frames (20 ms each) for each clip length in samples."""
        return encoder_frames(mel_frames(num_samples.to(torch.long)))

    def _check_lengths(self, num_samples: Tensor) -> None:
        if torch.jit.is_tracing():
            return  # the graph takes any length; the position table's size bounds it there
        if bool((num_samples < MIN_SAMPLES).any()):
            raise ValueError(
                f"a clip is too short for Whisper's front end: {int(num_samples.min())} samples "
                f"(at least {MIN_SAMPLES} = 25 ms are needed)"
            )
        longest = int(mel_frames(num_samples).max())
        if longest > self.max_mel_frames:
            seconds = float(num_samples.max()) / SAMPLE_RATE
            raise ValueError(
                f"a clip of {seconds:.2f} s is longer than Whisper's {self.max_mel_frames // 100} s window "
                f"({longest} mel frames > {self.max_mel_frames}); crop it (data.max_seconds) first"
            )

    def start(self, input_values: Tensor, attention_mask: Tensor | None = None) -> EncoderState:
        """Log-mel, conv1+GELU, conv2+GELU and positions at the clip's true length: layer 0.

        One clip may come as 1-D ``input_values`` (and then a 1-D ``attention_mask``).
        """
        input_values, attention_mask = batched_inputs(input_values, attention_mask)
        num_samples = (
            attention_mask.to(torch.long).sum(-1)
            if attention_mask is not None
            else torch.full((input_values.shape[0],), input_values.shape[1], device=input_values.device)
        )
        self._check_lengths(num_samples)
        mel, frames = self.log_mel(input_values, num_samples)
        return self.from_mel(mel, frames)

    def from_mel(self, mel: Tensor, frames: Tensor | None = None) -> EncoderState:
        """Layer 0 from a log-mel ``[B, n_mels, F]`` whose clip i has ``frames[i]`` valid frames (zeros beyond).

        With all frames valid and F = 3000 this is HF's ``WhisperEncoder`` before its first layer.
        """
        model: Any = self.model
        total = mel.shape[-1]
        if frames is None:
            frames = torch.full((mel.shape[0],), total, dtype=torch.long, device=mel.device)
        mel_valid = (torch.arange(total, device=mel.device)[None, :] < frames[:, None])[:, None, :]
        h = nn.functional.gelu(model.conv1(mel)) * mel_valid.to(mel.dtype)
        h = nn.functional.gelu(model.conv2(h)).transpose(1, 2)
        lengths = encoder_frames(frames)
        frame_mask = torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None]
        h = h + model.embed_positions.weight[: h.shape[1]]
        h = nn.functional.dropout(h, p=float(model.dropout), training=model.training)
        h = h * frame_mask[..., None].to(h.dtype)
        return EncoderState(h, frame_mask, 0, None, self._layer_mask(h, frame_mask), lengths)

    def _layer_mask(self, hidden: Tensor, frame_mask: Tensor | None) -> Any:
        if torch.jit.is_tracing():
            # A traced graph must not bake in "no padding, no mask": an additive key-padding mask always.
            assert frame_mask is not None
            additive = (~frame_mask).to(hidden.dtype) * torch.finfo(hidden.dtype).min
            return additive[:, None, None, :]
        return _bidirectional_mask(self.config, hidden, frame_mask)

    def advance(self, state: EncoderState, upto: int) -> EncoderState:
        """Run layers ``state.layer + 1 .. upto`` only."""
        if not state.layer <= upto <= self.num_layers:
            raise ValueError(
                f"cannot advance from layer {state.layer} to {upto} (encoder depth {self.num_layers})"
            )
        hidden = state.hidden
        layers: Any = self.model.layers
        for i in range(state.layer, upto):
            out = layers[i](hidden, state.layer_mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return EncoderState(hidden, state.frame_mask, upto, None, state.layer_mask, state.lengths)

    def exit_hidden(self, state: EncoderState) -> Tensor:
        """What HF reports as ``hidden_states[state.layer]`` at 3000 frames."""
        if state.layer == self.num_layers and self.final_norm_at_last_exit:
            return self.model.layer_norm(state.hidden)
        return state.hidden


ENCODERS["whisper"] = WhisperTruncatedEncoder


# ------------------------------------------------------------------------------------------ loading
# A full WhisperModel / WhisperForConditionalGeneration checkpoint stores the encoder under these
# prefixes; WhisperEncoder.from_pretrained would only warn and keep random weights without the mapping.
_ENCODER_PREFIXES = {r"^model\.encoder\.": "", r"^encoder\.": ""}


def load_encoder(source: str, config: PretrainedConfig, spec: str) -> WhisperEncoder:
    """The encoder weights of a Whisper checkpoint (encoder-only, WhisperModel or ...ForConditionalGeneration).

    Every encoder tensor must come from the checkpoint: a missing one raises ``BackboneError`` instead of
    silently keeping a random initialisation.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the decoder's tensors are "unexpected" here, by design
    try:
        model, info = WhisperEncoder.from_pretrained(
            source,
            config=config,
            dtype=torch.float32,
            key_mapping=_ENCODER_PREFIXES,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(previous)
    missing = sorted(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise BackboneError(
            f"backbone {spec!r}: the checkpoint does not hold the whole Whisper encoder "
            f"(missing {missing[:6]}{'…' if len(missing) > 6 else ''}, wrong shapes {mismatched[:3]}); "
            "expected a WhisperEncoder, WhisperModel or WhisperForConditionalGeneration checkpoint"
        )
    return model.eval()
