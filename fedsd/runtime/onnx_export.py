"""Write one exit (or several) of a multi-exit model as an ONNX graph, optionally int8-quantised.

Why: devices run ONNX Runtime, not the Python training stack. The graph takes the raw 16 kHz waveform
(after the per-utterance normalisation recorded in its metadata) and an attention mask, and returns
logits and probabilities; only the CNN front end and layers 1..K are inside (the cut is
``fedsd.model.export.export_exit``).

Batch semantics. ``TruncatedEncoder._front_end`` runs a group-norm front end per clip on its own samples
so a clip's output never depends on its batch-mates. The graph expresses the same thing with masking:
the first convolution's output frames that only see a clip's own samples are exactly the frames the clip
alone would produce, and the group norm's statistics are taken over those frames only. Every later
convolution's valid frames depend on valid frames only, padded frames are zeroed after the feature
projection and masked out of attention and pooling, so a padded batch gives each clip (within float
rounding) what it gives alone.

The runtime side (``fedsd.runtime.onnx_runtime``) never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedsd.model.backbone import ConfigError, EncoderState
from fedsd.model.export import export_exit, parent_fingerprint
from fedsd.model.multiexit import MultiExitSER
from fedsd.runtime.onnx_runtime import (
    AUTO_MIN_AGREEMENT,
    FORMAT,
    INPUT_MASK,
    INPUT_WAVE,
    META_KEY,
    make_session,
    output_names,
    sidecar_path,
)

OPSET = 20  # 20: GELU is one ONNX op (17 spelled it as five: Div, Erf, Add, Mul, Mul)


def _conv_lengths(n: Tensor, kernel: int, stride: int) -> Tensor:
    return torch.div(n - kernel, stride, rounding_mode="floor") + 1


class ExitGraph(nn.Module):
    """The traceable forward of ``model`` at ``exits``: (waveform, mask) -> logits, probs per exit.

    ``model`` should already be cut to its deepest requested exit (``export_exit``) so that nothing
    above it is inside the graph.
    """

    def __init__(self, model: MultiExitSER, exits: Sequence[int]) -> None:
        super().__init__()
        if model.head_kind != "stats":
            raise ConfigError(
                "head", f"ONNX export supports the 'stats' head, not {model.head_kind!r} (its packed GRU)"
            )
        self.net = model.eval()
        self.exits = sorted(exits)
        config = model.backbone.config
        self.kernels = [int(k) for k in getattr(config, "conv_kernel", ())]
        self.strides = [int(s) for s in getattr(config, "conv_stride", ())]

    def _front_end(self, x: Tensor, num_samples: Tensor) -> tuple[Tensor, Tensor]:
        """Frame features ``[B, F, C]`` and valid frame counts, per clip as if each ran alone."""
        enc = self.net.encoder
        layers = enc.model.feature_extractor.conv_layers
        h = x[:, None]
        n = num_samples
        for i, layer in enumerate(layers):
            n = _conv_lengths(n, self.kernels[i], self.strides[i])
            if i == 0 and enc.group_norm_front_end:
                h = layer.conv(h)
                norm: nn.GroupNorm = layer.layer_norm
                valid = (torch.arange(h.shape[-1], device=h.device)[None, :] < n[:, None]).to(h.dtype)
                valid = valid[:, None, :]  # [B, 1, T]
                count = n.to(h.dtype)[:, None, None]
                # Few passes over the largest activation of the graph (channels × samples/5): one masked
                # copy, a sum and a ReduceL2 (E[x], E[x²]: squaring the copy first cost another pass), then
                # one per-channel scale and shift. The textbook form (subtract, mask, square, sum,
                # subtract, divide, scale, shift) made this group norm a sixth of an int8 exit's time.
                hv = h * valid
                mean = hv.sum(-1, keepdim=True) / count
                sumsq = torch.linalg.vector_norm(hv, dim=-1, keepdim=True).square()  # one ReduceL2 pass
                var = (sumsq / count - mean * mean).clamp_min(0.0)
                scale = norm.weight[None, :, None] * torch.rsqrt(var + norm.eps)
                h = h * scale + (norm.bias[None, :, None] - mean * scale)
                h = layer.activation(h)
            else:
                h = layer(h)
        return h.transpose(1, 2), n

    def forward(self, input_values: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        enc = self.net.encoder
        if enc.family == "whisper":
            # Its start() is traceable as is: per-clip log-mel, masked convs, an additive key mask.
            return self._exits(enc.start(input_values, attention_mask))
        model = enc.model
        num_samples = attention_mask.to(torch.long).sum(-1)
        features, lengths = self._front_end(input_values, num_samples)
        frames = features.shape[1]
        frame_mask = torch.arange(frames, device=features.device)[None, :] < lengths[:, None]
        projected = model.feature_projection(features)
        hidden = projected[0] if isinstance(projected, tuple) else projected
        hidden = hidden * frame_mask[..., None].to(hidden.dtype)
        if enc.family == "wavlm":
            layer_mask: Any = frame_mask.to(torch.long)
        else:
            additive = (~frame_mask).to(hidden.dtype) * torch.finfo(hidden.dtype).min
            layer_mask = additive[:, None, None, :]
        encoder = model.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        if not enc.pre_ln:
            hidden = encoder.layer_norm(hidden)
        return self._exits(EncoderState(hidden, frame_mask, 0, None, layer_mask, lengths))

    def _exits(self, state: EncoderState) -> tuple[Tensor, ...]:
        """Logits and probabilities of each exit, advancing layer by layer from ``state``."""
        enc = self.net.encoder
        outs: list[Tensor] = []
        for k in self.exits:
            state = enc.advance(state, k)
            logits = self.net.head(k)(enc.exit_hidden(state), state.frame_mask).logits
            outs += [logits, torch.softmax(logits, dim=-1)]
        return tuple(outs)


def _parse_exits(model: MultiExitSER, exits: Sequence[int]) -> list[int]:
    wanted = sorted({int(k) for k in exits})
    bad = [k for k in wanted if k not in model.exits]
    if not wanted or bad:
        raise ConfigError("exit", f"{bad or list(exits)} not among the model's exits {model.exits}")
    return wanted


def graph_model(model: MultiExitSER, exits: Sequence[int]) -> ExitGraph:
    """``ExitGraph`` of ``model`` cut to the deepest of ``exits`` (its weights copied, ``model`` untouched)."""
    wanted = _parse_exits(model, exits)
    small = export_exit(model, wanted[-1]).eval()
    small.backbone.config._attn_implementation = "eager"  # plain matmul + softmax: exports everywhere
    return ExitGraph(small, wanted).eval()


def preprocessing(model: MultiExitSER) -> dict[str, Any]:
    """What a runtime does to a file before the graph: sample rate, crop (evaluation twin), normalisation."""
    from fedsd.data.audio import CropPolicy

    sample_rate = int(model.meta.get("sample_rate", 16000))
    crop = CropPolicy.for_evaluation(model.meta.get("crop"), sample_rate)
    return {
        "sample_rate": sample_rate,
        "crop": {"max_seconds": crop.max_seconds, "mode": crop.mode},
        # checkpoints from `fedsd train` record "utterance"; older ones normalised the same way
        "normalize": str(model.meta.get("normalize", "utterance")),
        "mono": True,
    }


def graph_info(model: MultiExitSER, exits: Sequence[int], quantization: str | None) -> dict[str, Any]:
    """The metadata stored in the graph (``metadata_props``) and in the JSON beside it."""
    wanted = _parse_exits(model, exits)
    names = output_names(wanted)
    return {
        "format": FORMAT,
        "family": model.family,
        "exits": wanted,
        "label_names": list(model.label_names),
        "preprocessing": preprocessing(model),
        "inputs": {
            INPUT_WAVE: "float32 [batch, samples]: normalised waveform, zero-padded at the end",
            INPUT_MASK: "int64 [batch, samples]: 1 for real samples, 0 for padding",
        },
        "outputs": {str(k): {"logits": lg, "probs": pr} for k, (lg, pr) in names.items()},
        "batch_semantics": "per clip: padded batch-mates never change a clip's outputs",
        "quantization": quantization,
        "parent_fingerprint": parent_fingerprint(model),
        "num_layers_in_graph": wanted[-1],
        "opset": OPSET,
    }


def _set_metadata(path: Path, info: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(info, sort_keys=True)
    for key in ("label_names", "exits", "preprocessing"):
        e = proto.metadata_props.add()
        e.key, e.value = key, json.dumps(info[key])
    proto.producer_name = "fedsd"
    onnx.save(proto, str(path))


def _example(batch: int = 2, samples: int = 16000) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, samples, generator=g)
    mask = torch.ones(batch, samples, dtype=torch.long)
    mask[1:, samples * 3 // 4 :] = 0
    x = x * mask
    return x, mask


def export_graph(graph: ExitGraph, path: Path) -> None:
    """Trace ``graph`` to ``path`` (dynamic batch and length) with the TorchScript-based exporter.

    Why not the dynamo exporter: with transformers' masking helpers and WavLM's relative position bias
    it specialises the frame count; the tracing exporter records the shape arithmetic as graph ops.
    """
    names = [n for pair in output_names(graph.exits).values() for n in pair]
    dyn = {INPUT_WAVE: {0: "batch", 1: "samples"}, INPUT_MASK: {0: "batch", 1: "samples"}}
    dyn |= {n: {0: "batch"} for n in names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            _example(),
            str(path),
            input_names=[INPUT_WAVE, INPUT_MASK],
            output_names=names,
            dynamic_axes=dyn,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )


def export_onnx(
    model: MultiExitSER,
    exits: Sequence[int],
    out: str | os.PathLike[str],
    *,
    quantize: str | None = None,
    calibration: Iterator[np.ndarray] | Callable[[], Iterator[np.ndarray]] | None = None,
    quant_mode: str = "static",
    check: Sequence[np.ndarray] | None = None,
    min_agreement: float = AUTO_MIN_AGREEMENT,
    step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``out`` (``.onnx``) and its JSON sidecar; returns the metadata written.

    ``quantize="int8"`` quantises the fp32 graph with ONNX Runtime: ``quant_mode="static"`` (QDQ,
    calibrated on ``calibration``, normalised waveforms) is the default; ``"dynamic"`` quantises
    MatMul/Gemm weights only and needs no calibration. ``"auto"`` tries the static modes fastest first
    and keeps the first whose top class agrees with the fp32 graph's on at least ``min_agreement`` of the
    held-out ``check`` clips at every exit (else the best-agreeing one); the metadata's
    ``quantization_choice`` records every measured agreement. ``step`` hears what it is doing (each
    step of a base-size int8 export takes a minute or more).
    """
    say = step or (lambda _msg: None)
    out = Path(out)
    if quantize not in (None, "int8"):
        raise ConfigError("quantize", f"unknown value {quantize!r}; valid: int8")
    if quantize == "int8" and quant_mode == "auto" and not check:
        raise ConfigError("check", "quant_mode 'auto' needs held-out clips to measure agreement on")
    graph = graph_model(model, exits)
    quant = None if quantize is None else f"int8-{quant_mode}"
    info = graph_info(model, exits, quant)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".onnx-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        say(f"exporting the fp32 graph (layers 1..{info['exits'][-1]})")
        export_graph(graph, fp32)
        final = fp32
        if quantize == "int8" and quant_mode == "auto":
            final, choice = _quantize_auto(
                fp32, Path(tmp), info["exits"], calibration, check or [], min_agreement, say
            )
            info["quantization"] = f"int8-{choice['chosen']}"
            info["quantization_detail"] = QUANT_DETAIL[choice["chosen"]]
            info["quantization_choice"] = choice
        elif quantize == "int8":
            final = Path(tmp) / "int8.onnx"
            say(f"quantising to int8 ({quant_mode})")
            quantize_int8(fp32, final, mode=quant_mode, calibration=calibration)
            info["quantization_detail"] = QUANT_DETAIL[quant_mode]
        _set_metadata(final, info)
        os.replace(final, out)
    from fedsd.checkpoint import atomic_write_json

    atomic_write_json(sidecar_path(out), info)
    return info


# ------------------------------------------------------------------------------------------- int8
QUANT_DETAIL = {
    "static": "static QDQ of the transformer MatMuls (uint8 activations calibrated MinMax, per-channel "
    "int8 weights); CNN front end, positional conv and exit head compute in fp32 (conv weights stored int8)",
    "static-cnn": "static QDQ (uint8 activations calibrated on the moving average of per-clip min/max, "
    "per-channel int8 weights) of the transformer MatMuls and of every convolution but the first; the first "
    "convolution (raw waveform in), the norms and the exit head compute in fp32",
    "static-all": "static QDQ (uint8 activations, int8 weights) of every supported op, the CNN front end included",
    "dynamic": "dynamic int8 of the transformer MatMul weights; activations quantised at run time; "
    "conv weights stored int8, computed in fp32",
    "dynamic-all": "dynamic int8 of every supported op (Conv included: ConvInteger)",
}
QUANT_MODES = (*QUANT_DETAIL, "auto")
AUTO_ORDER = ("static-cnn", "static")
"""What ``auto`` tries, fastest first (README, ONNX Runtime per exit: 1.7-1.9x and 1.1-1.3x eager at the base shape)."""


def top_classes(path: Path, exits: Sequence[int], clips: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
    """The graph's top class per exit for each clip, run alone (batch 1, full mask), as a device runs it."""
    session = make_session(path, threads=None)
    names = output_names(exits)
    wanted = [names[k][0] for k in sorted(names)]
    tops: dict[int, list[int]] = {k: [] for k in sorted(names)}
    for wav in clips:
        x = np.asarray(wav, dtype=np.float32)[None]
        logits = session.run(wanted, {INPUT_WAVE: x, INPUT_MASK: np.ones(x.shape, dtype=np.int64)})
        for k, lg in zip(sorted(names), logits, strict=True):
            tops[k].append(int(np.argmax(lg[0])))
    return {k: np.asarray(v) for k, v in tops.items()}


def _quantize_auto(
    fp32: Path,
    tmp: Path,
    exits: Sequence[int],
    calibration: Iterator[np.ndarray] | Callable[[], Iterator[np.ndarray]] | None,
    check: Sequence[np.ndarray],
    min_agreement: float,
    say: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    """Quantise with each mode of ``AUTO_ORDER`` until one keeps the fp32 graph's answers on ``check``.

    Why measure per model: how many answers int8 changes depends on the model, not only on the mode
    (on the tiny demo model ``static-cnn`` keeps 96-98 % of them, below what a default should change; a
    wider front end may quantise more finely). The clips must be held out from calibration.
    """
    if calibration is None:
        raise ConfigError("calibration", "static int8 needs calibration speech")
    clips = list(calibration() if callable(calibration) else calibration)  # every candidate calibrates on it
    say(f"fp32 answers on {len(check)} held-out clips")
    reference = top_classes(fp32, exits, check)
    agreement: dict[str, dict[str, float]] = {}
    chosen = None
    for mode in AUTO_ORDER:
        path = tmp / f"int8-{mode}.onnx"
        say(f"quantising to int8 ({mode}) on {len(clips)} calibration clips")
        quantize_int8(fp32, path, mode=mode, calibration=iter(clips))
        say(f"int8 ({mode}) answers on {len(check)} held-out clips")
        tops = top_classes(path, exits, check)
        agreement[mode] = {str(k): float(np.mean(tops[k] == reference[k])) for k in reference}
        if min(agreement[mode].values()) >= min_agreement:
            chosen = mode
            break
    below = chosen is None
    if chosen is None:  # none keeps enough answers: the one that keeps most (ties: the faster)
        chosen = max(agreement, key=lambda m: (min(agreement[m].values()), -AUTO_ORDER.index(m)))
    choice = {
        "mode": "auto",
        "chosen": chosen,
        "order": list(AUTO_ORDER),
        "min_agreement": min_agreement,
        "check_clips": len(check),
        "agreement": agreement,
        "below_min_agreement": below,
    }
    return tmp / f"int8-{chosen}.onnx", choice


# Whisper's log-mel (fedsd.model.whisper.LogMel): its DFT convolution and mel MatMul see a power spectrum
# spanning 8 decades, which no int8 range keeps; every mode leaves it in fp32, weights included.
FP32_SCOPE = "log_mel"


def _head_nodes(path: Path) -> list[str]:
    """Nodes kept in fp32: the exit heads (pooling statistics, two small Gemms) and any log-mel front end."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if "heads" in n.name or FP32_SCOPE in n.name or n.op_type == "Gemm"]


def _log_mel_nodes(path: Path) -> list[str]:
    """Nodes of a log-mel front end (Whisper): fp32 even in the quantise-everything modes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if FP32_SCOPE in n.name]


def _first_conv(path: Path) -> list[str]:
    """The name of the graph's first Conv (the CNN front end's, fed by the waveform)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "Conv"][:1]


class _Calibration:
    """ONNX Runtime ``CalibrationDataReader`` over normalised waveforms, one clip per batch."""

    def __init__(self, clips: Iterator[np.ndarray]) -> None:
        self._it = iter(clips)

    def get_next(self) -> dict[str, np.ndarray] | None:
        wav = next(self._it, None)
        if wav is None:
            return None
        wav = np.asarray(wav, dtype=np.float32)[None]
        return {INPUT_WAVE: wav, INPUT_MASK: np.ones(wav.shape, dtype=np.int64)}

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax calibration
        pass


def quantize_int8(
    fp32: Path,
    out: Path,
    *,
    mode: str = "static",
    calibration: Iterator[np.ndarray] | Callable[[], Iterator[np.ndarray]] | None = None,
) -> None:
    """Quantise the graph at ``fp32`` to ``out`` (see ``QUANT_DETAIL`` for the modes)."""
    if mode not in QUANT_DETAIL:
        raise ConfigError("quant_mode", f"unknown value {mode!r}; valid: {', '.join(QUANT_DETAIL)}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a warning per 1-D weight it cannot quantise per channel
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _quantize(fp32, out, mode, calibration)
    finally:
        root.setLevel(level)


def _quantize(
    fp32: Path,
    out: Path,
    mode: str,
    calibration: Iterator[np.ndarray] | Callable[[], Iterator[np.ndarray]] | None,
) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    matmul_only = mode in ("static", "dynamic")
    cnn = mode == "static-cnn"
    if mode.startswith("dynamic"):
        kw: dict[str, Any] = {"op_types_to_quantize": ["MatMul"]} if matmul_only else {}
        exclude = _head_nodes(fp32) if matmul_only else _log_mel_nodes(fp32)
        quantize_dynamic(fp32, out, weight_type=QuantType.QInt8, nodes_to_exclude=exclude, **kw)
        if matmul_only:
            int8_conv_weights(out)
        return
    if calibration is None:
        raise ConfigError("calibration", "static int8 needs calibration speech")
    clips = calibration() if callable(calibration) else calibration
    pre = out.with_name(out.stem + "-pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantise the raw graph
        pre = fp32
    kw = {"op_types_to_quantize": ["MatMul"]} if matmul_only else {}
    exclude = _head_nodes(pre) if matmul_only else _log_mel_nodes(pre)
    if cnn:
        # The first convolution reads the raw waveform: int8 activations there cost accuracy (|Δlogit| 0.14
        # vs 0.007 with it in fp32, base shape) and time (one input channel: no int8 kernel pays off).
        kw = {"op_types_to_quantize": ["MatMul", "Conv"]}
        exclude = _head_nodes(pre) + _first_conv(pre)
    quantize_static(
        str(pre),
        str(out),
        _Calibration(clips),
        quant_format=QuantFormat.QDQ,
        # U8S8: uint8 activations, int8 weights, the pair ORT's x86 kernels are fastest at (S8S8 QDQ ran no
        # faster than fp32 on this machine; README, ONNX latency)
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        nodes_to_exclude=exclude,
        # static-cnn: ranges are the moving average of per-clip min/max, not the extremes over every clip.
        # MinMax widens with every calibration clip, and int8 convolutions feeding GELUs lose the small
        # values: on the demo model's validation clips static-cnn kept 92-93 % of the fp32 answers with
        # MinMax on 300 clips and 97-98 % with the average; the MatMul-only default keeps MinMax (99-100 %).
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "CalibMovingAverage": cnn},
        **kw,
    )
    if matmul_only:
        int8_conv_weights(out)


def int8_conv_weights(path: Path) -> int:
    """Store every fp32 Conv weight of ``path`` as per-output-channel int8 + DequantizeLinear; in place.

    Why: the MatMul-only modes keep the CNN front end and the positional convolution in fp32 (their
    activations do not survive int8), yet those weights are a third of an early exit's file. Weight-only
    int8 shrinks the file and costs one dequantisation per run; the convolutions still compute in fp32.
    Returns the number of weights converted.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = sorted(
        {
            n.input[1]
            for n in graph.node
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits and FP32_SCOPE not in n.name
        }
    )
    done = 0
    for name in names:
        w = numpy_helper.to_array(inits[name])
        if w.dtype != np.float32:
            continue
        scale = np.abs(w).reshape(w.shape[0], -1).max(1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
        graph.initializer.remove(inits.pop(name))
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_scale"),
                numpy_helper.from_array(np.zeros(w.shape[0], np.int8), f"{name}_zero"),
            ]
        )
        dq = helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [name], f"{name}_dq", axis=0
        )
        graph.node.insert(0, dq)
        done += 1
    onnx.save(model, str(path))
    return done
