"""ONNX export per exit: fp32 parity with PyTorch, int8 agreement, and a runtime that never imports torch.

Parity: for every family and both layer-norm orders, at every exit, clips of different lengths batched
together and alone give the PyTorch model's logits (clip alone) within 1e-4: the graph keeps the
per-clip group-norm front end of ``TruncatedEncoder._front_end``. int8: a tiny model whose heads are
trained on generated speech agrees with its fp32 graph on >= 98 % of the clips, UAR within 0.01.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from audio_fixtures import espeak_backend
from harness import FAMILY_CASES, tiny_net
from typer.testing import CliRunner

from fedsd.model import MultiExitSER
from fedsd.runtime.onnx_export import export_onnx
from fedsd.runtime.onnx_runtime import OnnxExitModel, evaluate_clips, read_metadata, resample, sidecar_path

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
LABELS = ["neutral", "happy", "angry", "sad"]
META = {"sample_rate": 16000, "crop": {"max_seconds": 2.0, "mode": "random"}, "normalize": "utterance"}
LENGTHS = (16000, 9000, 4000, 1200)  # 1 s down to 75 ms


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared machine: one torch thread is many times faster than oversubscribed ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(path: Path) -> OnnxExitModel:
    return OnnxExitModel.load(path, threads=1)


def make(family: str = "wav2vec2", preln: bool = False, **overrides) -> MultiExitSER:
    return tiny_net(family, preln, labels=LABELS, meta=META, **overrides)


def clips(lengths=LENGTHS, seed: int = 0) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = np.arange(n) / 16000
        w = np.sin(2 * np.pi * g.uniform(100, 300) * t) + 0.3 * g.standard_normal(n)
        out.append(((w - w.mean()) / w.std()).astype(np.float32))
    return out


def torch_logits(net: MultiExitSER, wavs: list[np.ndarray], k: int) -> np.ndarray:
    """Each clip alone through the PyTorch model (the reference)."""
    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(w)[None], exits=[k])[k].logits.numpy() for w in wavs])


CASES = FAMILY_CASES


def _check_parity(net: MultiExitSER, graph: OnnxExitModel, exits: list[int]) -> None:
    """Batched and alone, every exit of ``graph`` within 1e-4 of PyTorch (each clip alone)."""
    wavs = clips()
    batched = graph.run(wavs)
    alone = [graph.run([w]) for w in wavs]
    for k in exits:
        ref = torch_logits(net, wavs, k)
        one = np.concatenate([a[k] for a in alone])
        assert np.abs(batched[k] - ref).max() <= 1e-4, (k, np.abs(batched[k] - ref).max())
        assert np.abs(one - ref).max() <= 1e-4, (k, np.abs(one - ref).max())


@pytest.mark.parametrize(("family", "preln", "overrides"), CASES)
def test_fp32_graph_equals_pytorch_at_every_exit_batched_and_alone(tmp_path, family, preln, overrides):
    """One graph holding every exit (the same computation as the single-exit graphs, one export)."""
    net = make(family, preln, **overrides)
    path = tmp_path / "all.onnx"
    info = export_onnx(net, net.exits, path)
    assert info["exits"] == net.exits and info["num_layers_in_graph"] == 4
    _check_parity(net, load(path), net.exits)


def _single_exit_graphs(tmp_path: Path, net: MultiExitSER) -> None:
    wavs = clips()
    for k in net.exits:
        path = tmp_path / f"exit{k}.onnx"
        info = export_onnx(net, [k], path)
        assert info["exits"] == [k] and info["num_layers_in_graph"] == k
        graph = load(path)
        assert [o.name for o in graph.session.get_outputs()] == ["logits", "probs"]
        _check_parity(net, graph, [k])
        # the probs output is the softmax of the logits output
        x = np.zeros((2, 9000), np.float32)
        x[0], x[1, :4000] = wavs[1], wavs[2]
        mask = (np.arange(9000)[None] < np.array([[9000], [4000]])).astype(np.int64)
        logits, probs = graph.session.run(None, {"input_values": x, "attention_mask": mask})
        e = np.exp(logits - logits.max(-1, keepdims=True))
        assert np.allclose(probs, e / e.sum(-1, keepdims=True), atol=1e-6)
    # only layers 1..K are in the graph: the exit-1 file is the smallest
    sizes = [(tmp_path / f"exit{k}.onnx").stat().st_size for k in net.exits]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


@pytest.mark.parametrize(("family", "preln", "overrides"), CASES)
def test_single_exit_graphs_hold_layers_up_to_k(tmp_path, family, preln, overrides):
    _single_exit_graphs(tmp_path, make(family, preln, **overrides))


def test_multi_exit_graph_and_metadata(tmp_path):
    net = make("wavlm", False)
    path = tmp_path / "m.onnx"
    export_onnx(net, [3, 1, 2], path)
    graph = load(path)
    assert graph.exits == [1, 2, 3] and graph.label_names == LABELS
    assert [o.name for o in graph.session.get_outputs()] == [
        "logits_1", "probs_1", "logits_2", "probs_2", "logits_3", "probs_3",
    ]  # fmt: skip
    wavs = clips(seed=1)
    out = graph.run(wavs)
    for k in (1, 2, 3):
        assert np.abs(out[k] - torch_logits(net, wavs, k)).max() <= 1e-4
    info = read_metadata(path)
    assert info == json.loads(sidecar_path(path).read_text())
    assert info["preprocessing"] == {
        "sample_rate": 16000,
        "crop": {"max_seconds": 2.0, "mode": "center"},  # the deterministic twin of the training crop
        "normalize": "utterance",
        "mono": True,
    }
    assert info["parent_fingerprint"] == net.backbone_fingerprint() and info["quantization"] is None
    # early exit on a several-exit graph: the first exit confident enough answers, else the deepest
    from fedsd.runtime.onnx_runtime import predict_one

    assert predict_one(graph, wavs[0], "auto", threshold=0.0)[0] == 1
    k, probs = predict_one(graph, wavs[0], "auto", threshold=1.1)
    assert k == 3 and abs(probs.sum() - 1) < 1e-6
    assert predict_one(graph, wavs[0], 2)[0] == 2


def test_numpy_resample_matches_torchaudio():
    from fedsd.data.audio import resample as torch_resample

    g = np.random.default_rng(0)
    for orig, new in ((44100, 16000), (8000, 16000), (22050, 16000), (16000, 16000)):
        w = g.standard_normal(orig // 3).astype(np.float32)
        a, b = resample(w, orig, new), torch_resample(w, orig, new)
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4, (orig, new)  # float32 sums


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """A saved tiny model, its exit-2 ONNX graph (via the CLI) and three WAVs (one at 22.05 kHz)."""
    from fedsd.cli.main import app

    tmp = tmp_path_factory.mktemp("onnx-cli")
    make("wav2vec2", False).save_pretrained(tmp / "model")
    res = CliRunner().invoke(
        app, ["export", "--model", str(tmp / "model"), "--exit", "2", "--format", "onnx", "--out", str(tmp)]
    )
    assert res.exit_code == 0, res.output
    files = []
    for i, (n, rate) in enumerate(((24000, 16000), (12000, 16000), (30000, 22050))):
        w = clips([n], seed=i)[0] * 0.1
        files.append(tmp / f"clip{i}.wav")
        sf.write(files[-1], w, rate)
    return tmp / "model", tmp / "exit2.onnx", files


def _run_without_torch(args: list[str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        "from fedsd.cli.main import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'flwr', 'torchaudio') if m in sys.modules)\n"
        "print('IMPORTED', heavy, file=sys.stderr)\n"
        "sys.exit(code or 0)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_predict_on_onnx_never_imports_torch_and_matches_pytorch(exported):
    from fedsd.cli.main import app

    model, graph, files = exported
    proc = _run_without_torch(["predict", "--model", str(graph), "--json", *map(str, files)])
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stderr, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    res = CliRunner().invoke(app, ["predict", "--model", str(model), "--exit", "2", "--json", *map(str, files)])
    assert res.exit_code == 0, res.output
    ref = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref, strict=True):
        assert set(a) == set(b) and a["file"] == b["file"] and a["exit"] == b["exit"] == 2
        assert a["label"] == b["label"]
        for name in LABELS:
            assert abs(a["probs"][name] - b["probs"][name]) < 1e-4


def test_evaluate_on_onnx_never_imports_torch(exported, tmp_path):
    _, graph, files = exported
    manifest = tmp_path / "m.csv"
    head = "utt_id,path,label,orig_label,speaker,dataset,duration,sample_rate,split"
    lines = [f"u{i},{f},{LABELS[i]},{LABELS[i]},s{i},x,1.0,16000,test" for i, f in enumerate(files)]
    manifest.write_text("\n".join([head, *lines]) + "\n")
    out = tmp_path / "eval.json"
    proc = _run_without_torch(
        ["evaluate", "--model", str(graph), "--manifest", str(manifest), "--root", "/", "--out", str(out),
         "--latency-utts", "2"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stderr, proc.stderr
    data = json.loads(out.read_text())
    assert set(data["exits"]) == {"2"} and data["exits"]["2"]["n"] == 3 and data["runtime"] == "onnxruntime"
    assert data["exits"]["2"]["latency_s"] > 0


def test_export_cli_errors(exported, tmp_path):
    from fedsd.cli.main import app

    model, graph, _ = exported
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--model", str(model), "--exit", "2", "--out", str(tmp_path / "a"),
                              "--quantize", "int8"])  # fmt: skip
    assert res.exit_code == 2 and "--format onnx" in res.output
    res = runner.invoke(app, ["export", "--model", str(model), "--exit", "5", "--format", "onnx",
                              "--out", str(tmp_path / "x.onnx")])  # fmt: skip
    assert res.exit_code == 2 and "valid exits" in res.output
    res = runner.invoke(app, ["export", "--model", str(model), "--exit", "2", "--format", "onnx",
                              "--out", str(graph)])  # fmt: skip
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, ["export", "--model", str(model), "--exit", "2", "--format", "tflite",
                              "--out", str(tmp_path / "y")])  # fmt: skip
    assert res.exit_code == 2 and "'pytorch', 'onnx'" in res.output


# ------------------------------------------------------------------------------------------- int8
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[MultiExitSER, list[np.ndarray], np.ndarray]:
    """A tiny model whose exit heads are fitted to generated emotional speech, and its clips.

    Only the heads train (on cached pooled features of the frozen backbone): seconds instead of the
    minutes a full recipe takes, and the predictions are confident like a trained model's.
    """
    from fedsd.data.manifest import read_manifest
    from fedsd.data.synthetic import generate_corpus
    from fedsd.runtime.onnx_runtime import load_clip

    out = tmp_path_factory.mktemp("int8-corpus")  # the agreement and UAR bounds: espeak-ng speech, pinned
    generate_corpus(out, speakers=8, sentences=3, seed=0, backend=espeak_backend(), progress=False)
    rows = read_manifest(out / "manifest.csv")
    pre = {"sample_rate": 16000, "crop": {"max_seconds": 1.0, "mode": "center"}, "normalize": "utterance"}
    wavs = [load_clip(out / r.path, pre) for r in rows]
    y = np.array([LABELS.index(r.label) for r in rows])
    net = make("wav2vec2", False)
    net.meta["crop"] = {"max_seconds": 1.0, "mode": "center"}
    with torch.no_grad():
        feats = {k: [] for k in net.exits}
        for w in wavs:
            for k, (f, _) in net.precompute(torch.from_numpy(w)[None]).items():
                feats[k].append(f)
    target = torch.from_numpy(y)
    torch.manual_seed(0)
    for k in net.exits:
        x = torch.cat(feats[k])
        head = net.head(k).train()
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head.forward_precomputed(x).logits, target).backward()
            opt.step()
        head.eval()
    return net.eval(), wavs, y


def _agreement(net, wavs, y, fp32_path: Path, int8_path: Path) -> list[tuple[int, float, float, float]]:
    """Per exit: (exit, share of clips where int8 and fp32 pick the same class, UAR fp32, UAR int8)."""
    from fedsd.metrics import classification_report

    fp32 = evaluate_clips(load(fp32_path), wavs)
    int8 = evaluate_clips(load(int8_path), wavs)
    return [(k, float((fp32[k] == int8[k]).mean()), classification_report(y, fp32[k], LABELS).uar,
             classification_report(y, int8[k], LABELS).uar) for k in net.exits]  # fmt: skip


def test_int8_agrees_with_fp32(trained, tmp_path):

    net, wavs, y = trained
    calib = wavs[::2]  # half the clips calibrate, every clip is tested
    export_onnx(net, net.exits, tmp_path / "fp32.onnx")
    info = export_onnx(net, net.exits, tmp_path / "int8.onnx", quantize="int8", calibration=calib)
    assert info["quantization"] == "int8-static"
    # int8 MatMul and conv weights; the four fp32 heads are a third of this tiny graph (base shape: README)
    assert (tmp_path / "int8.onnx").stat().st_size < 0.7 * (tmp_path / "fp32.onnx").stat().st_size
    for k, agree, u32, u8 in _agreement(net, wavs, y, tmp_path / "fp32.onnx", tmp_path / "int8.onnx"):
        assert u32 > 0.5, (k, u32)  # the model is trained (chance 0.25)
        assert agree >= 0.98 and abs(u32 - u8) <= 0.01, (k, agree, u32, u8)


def test_static_cnn_quantises_every_conv_but_the_first(trained, tmp_path):
    """`--quant-mode static-cnn`: the waveform-reading first convolution (and the heads) stay fp32, every
    other convolution and the MatMuls compute in int8; the trained model keeps most answers and its UAR
    (README: 92-95 % agreement on the demo model, close calls in both directions)."""
    import onnx


    net, wavs, y = trained
    export_onnx(net, net.exits, tmp_path / "fp32.onnx")
    info = export_onnx(net, net.exits, tmp_path / "cnn.onnx", quantize="int8", calibration=wavs[::2],
                       quant_mode="static-cnn")  # fmt: skip
    assert info["quantization"] == "int8-static-cnn"
    graph = onnx.load(str(tmp_path / "cnn.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    fed_by_dq = [producer.get(n.input[0]) is not None and producer[n.input[0]].op_type == "DequantizeLinear"
                 for n in convs]  # fmt: skip
    assert len(convs) >= 3 and not fed_by_dq[0] and all(fed_by_dq[1:]), fed_by_dq
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert any(producer.get(n.input[0]) is not None and producer[n.input[0]].op_type == "DequantizeLinear"
               for n in matmuls)  # fmt: skip
    for k, agree, u32, u8 in _agreement(net, wavs, y, tmp_path / "fp32.onnx", tmp_path / "cnn.onnx"):
        assert agree >= 0.85 and abs(u32 - u8) <= 0.05, (k, agree, u32, u8)


def test_auto_keeps_the_fastest_mode_that_agrees_on_held_out_clips(trained, tmp_path):
    """`--quant-mode auto`: static-cnn when it keeps the required share of fp32 answers on the check clips
    at every exit, else static; the choice, and every agreement it measured, travel with the graph."""
    from fedsd.runtime.onnx_export import AUTO_ORDER, top_classes

    net, wavs, _ = trained
    calib, check = wavs[::2], wavs[1::2]
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(net, net.exits, fp32)
    reference = top_classes(fp32, net.exits, check)

    steps: list[str] = []
    lenient = export_onnx(net, net.exits, tmp_path / "a.onnx", quantize="int8", calibration=calib,
                          quant_mode="auto", check=check, min_agreement=0.0, step=steps.append)  # fmt: skip
    n = len(check)
    assert steps == ["exporting the fp32 graph (layers 1..4)", f"fp32 answers on {n} held-out clips",
                     f"quantising to int8 (static-cnn) on {len(calib)} calibration clips",
                     f"int8 (static-cnn) answers on {n} held-out clips"]  # fmt: skip
    choice = lenient["quantization_choice"]
    assert choice["chosen"] == AUTO_ORDER[0] == "static-cnn" and list(choice["agreement"]) == ["static-cnn"]
    assert lenient["quantization"] == "int8-static-cnn" and not choice["below_min_agreement"]
    assert read_metadata(tmp_path / "a.onnx")["quantization_choice"] == choice

    strict = export_onnx(net, net.exits, tmp_path / "s.onnx", quantize="int8", calibration=iter(calib),
                         quant_mode="auto", check=check, min_agreement=1.0)  # fmt: skip
    choice = strict["quantization_choice"]
    measured = choice["agreement"]
    if min(measured["static-cnn"].values()) < 1.0:  # static-cnn fell short: static was measured too
        assert list(measured) == ["static-cnn", "static"]
        passed = [m for m in measured if min(measured[m].values()) >= 1.0]
        best = max(measured, key=lambda m: (min(measured[m].values()), -AUTO_ORDER.index(m)))
        assert choice["chosen"] == (passed[0] if passed else best)
        assert choice["below_min_agreement"] == (not passed)
    # what it recorded is what the written graph does on those clips
    tops = top_classes(tmp_path / "s.onnx", net.exits, check)
    for k in net.exits:
        assert measured[choice["chosen"]][str(k)] == pytest.approx(float(np.mean(tops[k] == reference[k])))
    assert read_metadata(tmp_path / "s.onnx")["quantization"] == f"int8-{choice['chosen']}"

    with pytest.raises(ValueError, match="held-out clips"):
        export_onnx(net, net.exits, tmp_path / "x.onnx", quantize="int8", calibration=calib, quant_mode="auto")


def test_auto_checks_on_clips_calibration_never_saw(tmp_path):
    """The check clips are the manifest's valid rows, or (without any) every fifth row held out of
    calibration; either way no clip both calibrates and judges."""
    from fedsd.runtime.export import calibration_clips

    head = "utt_id,path,label,orig_label,speaker,dataset,duration,sample_rate,split"
    pre = {"sample_rate": 16000, "crop": {"max_seconds": 1.0, "mode": "center"}, "normalize": "utterance"}
    lines = []
    for i in range(20):
        w = np.random.default_rng(i).standard_normal(8000).astype(np.float32) * 0.1
        sf.write(tmp_path / f"c{i}.wav", w, 16000)
        split = "valid" if i >= 16 else "train"
        lines.append(f"u{i},c{i}.wav,{LABELS[i % 4]},{LABELS[i % 4]},s{i % 3},x,0.5,16000,{split}")
    with_valid = tmp_path / "v.csv"
    with_valid.write_text("\n".join([head, *lines]) + "\n")
    only_train = tmp_path / "t.csv"
    only_train.write_text("\n".join([head, *(ln.replace(",valid", ",train") for ln in lines)]) + "\n")

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return a.shape == b.shape and bool(np.array_equal(a, b))

    for manifest, n_cal, n_check in ((with_valid, 16, 4), (only_train, 17, 3)):  # 3 of the 4 fifth rows
        cal, source, check = calibration_clips(pre, manifest, tmp_path, 300, held_out=3 if n_check == 3 else 10)
        assert (len(cal), len(check)) == (n_cal, n_check), (manifest.name, len(cal), len(check))
        assert not any(same(a, b) for a in cal for b in check)
        assert f"agreement checked on {n_check} held-out clips" in source
    cal, _, check = calibration_clips(pre, only_train, tmp_path, 300)
    assert len(cal) == 20 and check == []  # a fixed mode calibrates on every row


def test_auto_with_too_few_calibration_rows_says_what_to_do(tmp_path):
    from fedsd.runtime.export import ExportError, calibration_clips

    head = "utt_id,path,label,orig_label,speaker,dataset,duration,sample_rate,split"
    lines = []
    for i in range(3):
        sf.write(tmp_path / f"c{i}.wav", np.full(4000, 0.01 * (i + 1), np.float32), 16000)
        lines.append(f"u{i},c{i}.wav,neutral,neutral,s0,x,0.25,16000,train")
    (tmp_path / "m.csv").write_text("\n".join([head, *lines]) + "\n")
    pre = {"sample_rate": 16000, "crop": {"max_seconds": 1.0, "mode": "center"}, "normalize": "utterance"}
    with pytest.raises(ExportError, match=r"3 rows are too few.*--quant-mode"):
        calibration_clips(pre, tmp_path / "m.csv", tmp_path, 300, held_out=100)
    cal, _, check = calibration_clips(pre, tmp_path / "m.csv", tmp_path, 300)  # a fixed mode needs none held out
    assert len(cal) == 3 and check == []
