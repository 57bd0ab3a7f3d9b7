"""Every benchmark script runs end to end at a tiny size and writes its JSON with provenance.

Only the plumbing and the sanity of the numbers are checked (UARs in [0, 1], the expected rows and
exits): at these sizes the models learn nothing, and timings on a shared CI machine are too noisy for
assertions on targets. Each script is loaded by path and driven through ``main(argv)``, as
``python benchmarks/X.py ARGS`` would run it. The federated benchmarks share one tiny corpus and one
base model (trained by the adaptation benchmark's run).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SMOKED = {
    "whisper_recipe",
    "adaptation",
    "exit_latency",
    "onnx_latency",
    "privacy",
    "proxy_memory",
    "robustness",
    "round_cost",
    "round_overhead",
    "self_distillation",
    "simulation_scale",
    "synthetic_baseline",
}
PROVENANCE = {
    "benchmark", "git", "command", "argv", "config", "backbone_fingerprint", "versions", "machine",
    "started_utc", "finished_utc", "wall_s",
}  # fmt: skip
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# the federated benchmarks at their smallest: 6 speakers = 2 test + 2 server + 2 devices
FED = ["--clients", "2", "--test-speakers", "2", "--server-speakers", "2", "--rounds", "1", "--local-epochs", "1",
       "--seeds", "0", "--set", "data.crop.max_seconds=1.0", "--threads", "2"]  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_common() -> ModuleType:
    """benchmarks/common/, the package every script imports as ``common`` (its folder on ``sys.path``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("common")


def check_provenance(data: dict[str, Any], name: str, *, fingerprints: int | None = 1) -> dict[str, Any]:
    """The provenance block every results JSON carries; ``fingerprints``: how many models (None: none)."""
    p = data["provenance"]
    assert set(p) >= PROVENANCE, PROVENANCE - set(p)
    assert p["benchmark"] == name
    assert p["git"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", p["git"]["commit"])
    assert p["git"]["commit"] is None or isinstance(p["git"]["dirty"], bool)
    assert p["command"].startswith(f".venv/bin/python benchmarks/{name}.py")
    assert all(a in p["command"] for a in p["argv"])
    assert isinstance(p["config"], dict) and p["config"]
    for lib in ("torch", "transformers", "flwr"):
        assert p["versions"][lib], lib
    assert p["machine"]["cpu_count"] >= 1 and p["machine"]["usable_cores"] >= 1
    assert datetime.fromisoformat(p["started_utc"]) <= datetime.fromisoformat(p["finished_utc"])
    assert p["wall_s"] > 0
    fp = p["backbone_fingerprint"]
    if fingerprints is None:
        assert fp is None
    elif isinstance(fp, str):
        assert fingerprints == 1 and SHA256.match(fp)
    else:
        assert len(fp) == fingerprints and all(SHA256.match(v) for v in fp.values())
    return p


def assert_uar(value: float) -> None:
    assert 0.0 <= value <= 1.0, value


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def read(path: Path, returned: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(path.read_text())
    written, back = json.dumps(data, sort_keys=True), json.dumps(returned, sort_keys=True, default=str)
    assert written == json.dumps(json.loads(back), sort_keys=True)  # main() returns what it wrote
    return data


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 speakers × 1 sentence × 4 emotions (24 files)."""
    from fedsd.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("bench-corpus")
    generate_corpus(out, speakers=6, sentences=1, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def adaptation_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path
) -> tuple[Path, dict[str, Any], Path]:
    """The adaptation benchmark at its smallest; its base model serves privacy and robustness too."""
    tmp = tmp_path_factory.mktemp("bench-adaptation")
    # one device holding both device speakers: 2 clips per class, so it has personal test speech (1 per class)
    argv = ["--corpus", str(tiny_corpus), "--work", str(tmp / "work"), "--base-epochs", "1", "--fractions", "0.5",
            "--out", str(tmp / "res" / "adaptation"), *FED, "--clients", "1", "--set", "federated.min_clients=1",
            "--set", "federated.personalize_epochs=1", "--folds", "2", "--test-speakers", "1"]  # fmt: skip
    out = load_script("adaptation").main(argv)
    base = Path(next(iter(out["setup"]["splits"].values()))["base_model"])
    return tmp / "res", out, base


def test_every_script_has_a_smoke_test():
    scripts = {p.stem for p in BENCH.glob("*.py")}  # the shared set-up is the package benchmarks/common/
    assert scripts == SMOKED, "add a smoke test for each new benchmark script (and list it in SMOKED)"


def test_work_directory_of_other_code_is_refused(tmp_path):
    common = load_common()
    work = common.work_dir(tmp_path / "w", "x")
    assert common.work_dir(work, "x") == work  # same code: reused
    stamp = work / common.WORK_STAMP
    made = json.loads(stamp.read_text())
    made["code"]["commit"] = "0" * 40
    stamp.write_text(json.dumps(made))
    with pytest.raises(SystemExit, match="never re-tabulated"):
        common.work_dir(work, "x")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "bench.json").write_text("{}")
    with pytest.raises(SystemExit, match="no bench-work.json"):
        common.work_dir(tmp_path / "old", "x")


def test_t_interval():
    common = load_common()
    ci = common.t_interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["std"] == 1.0 and ci["n"] == 3 and ci["positive"] == 3
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2)
    assert ci["ci_low"] == pytest.approx(2.0 - half) and ci["ci_high"] == pytest.approx(2.0 + half)
    assert math.isnan(common.t_interval([0.5])["ci_low"])


def test_paired_differences_pair_by_seed():
    common = load_common()
    # seeds 2 and 0 in either order, seed 7 only on one side (left out), a NaN difference left out
    d = common.paired({2: 0.5, 0: 0.7, 7: 0.9, 3: math.nan}, {0: 0.6, 2: 0.2, 3: 0.1})
    assert d["n"] == 2 and d["values"] == pytest.approx([0.1, 0.3]) and d["mean"] == pytest.approx(0.2)
    assert common.ci_cell(d).startswith("+0.200 [") and common.ci_cell(d).endswith("(2/2 > 0)")
    assert common.ci_cell(common.paired({0: 0.5}, {0: 0.75}), single="1 seed") == "-0.250 (1 seed)"
    assert common.ci_cell(common.paired({}, {})) == "–"


def test_interleaved_timing_shuffles_resets_and_drops_warmup():
    common = load_common()
    calls: list[str] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    resets: list[str] = []
    before = {"a": lambda: resets.append("a")}
    seen: list[int] = []
    times = common.interleaved(variants, 5, seed=1, warmup=2, before=before, clocks=("wall", "cpu"),
                               on_repeat=lambda rep, _: seen.append(rep))  # fmt: skip
    assert set(times) == {"wall", "cpu"} and all(len(t) == 5 for c in times.values() for t in c.values())
    assert len(calls) == 7 * 4 and resets == ["a"] * 7 and seen == [1, 2, 3, 4, 5]
    orders = {tuple(calls[i : i + 4]) for i in range(0, len(calls), 4)}
    assert all(sorted(o) == list("abcd") for o in orders) and len(orders) > 1  # every variant once, reordered
    assert common.spread_s([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0,
                                                "samples_s": [1.0, 2.0, 3.0]}  # fmt: skip
    assert common.over({"bare": 2.0, "x": 3.0}, "bare") == {"x": 1.5}
    assert common.default_exits(12) == [3, 6, 9, 12] and common.default_exits(4) == [1, 2, 3, 4]


def test_exit_latency_smoke(tmp_path, capsys):
    bench = load_script("exit_latency")
    assert set(bench.CLOCKS) == {"wall", "cpu"}
    out = bench.main(
        [
            "--backbone",
            "tiny",
            "--seconds",
            "0.5",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "r.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert "| exit | median ms |" in printed and "plain HF" in printed and "targets:" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["exit"] for r in data["rows"]] == [1, 2, 3, 4] == [r["exit"] for r in out["rows"]]
    assert data["setup"]["threads"] == 1 and data["setup"]["samples"] == 8000
    for r in data["rows"]:
        assert r["median_ms"] > 0 and r["ideal_ms"] > 0 and r["ratio_to_ideal"] > 0
    assert set(data["samples_s"]) >= {"hf", "front", "head", "layer1", "layer4", "exit4"}
    assert all(len(v) == 3 for v in data["samples_s"].values())
    assert set(data["targets"]) == {"exits_within_10pct_of_ideal", "full_within_5pct_of_hf"}
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = check_provenance(data, "exit_latency")
    assert p["config"]["backbone"] == "tiny" and p["config"]["exits"] == [1, 2, 3, 4]


def test_exit_latency_whisper_reference_is_the_30s_hf_forward(tmp_path, capsys):
    """HF's WhisperEncoder refuses anything but 30 s: the reference pads, our exits run at true length."""
    bench = load_script("exit_latency")
    argv = ["--backbone", "tiny", "--family", "whisper", "--seconds", "0.5", "--repeats", "2", "--warmup", "1",
            "--threads", "1", "--json", str(tmp_path / "w.json")]  # fmt: skip
    out = bench.main(argv)
    assert "zero-padded to 30 s" in capsys.readouterr().out
    assert out["setup"]["family"] == "whisper" and out["hf_label"].startswith("WhisperEncoder")


def test_onnx_latency_smoke(tmp_path, tiny_corpus, capsys):
    bench = load_script("onnx_latency")
    argv = ["--backbone", "tiny", "--exits", "1", "3", "--seconds", "0.5", "--repeats", "2", "--modes", "static",
            "dynamic", "auto", "--corpus", str(tiny_corpus), "--calibration-clips", "4", "--eval-clips", "4",
            "--profile", "2", "--quiet", "--json", str(tmp_path / "o.json")]  # fmt: skip
    data = read(tmp_path / "o.json", bench.main(argv))
    out = capsys.readouterr().out
    assert "| exit | eager fp32 ms | ORT fp32 ms |" in out and "kernel time per op type" in out
    p = check_provenance(data, "onnx_latency")
    assert p["config"]["threads"] == 1 and p["config"]["onnxruntime"]
    assert [r["exit"] for r in data["rows"]] == [1, 3] and data["setup"]["samples"] == 8000
    for r in data["rows"]:
        assert r["fp32_parity_max_abs_dlogit"] < 1e-4
        assert set(r["ms"]) == {"torch", "ort_fp32", "static", "dynamic", "auto"} and all(
            v > 0 for v in r["ms"].values()
        )
        assert set(r["bytes"]) == {"torch", "ort_fp32", "static", "dynamic", "auto"} and all(r["bytes"].values())
        assert all(0 <= a["agree"] <= 1 and a["clips"] == 4 for a in r["agreement"].values())
        # auto chose on the validation clips, one of its candidates, and says what each agreed
        assert r["auto"]["chosen"] in ("static-cnn", "static") and r["auto"]["check_clips"] == 4
        assert r["auto"]["chosen"] in r["auto"]["agreement"]
        ops = data["op_profile_ms"][str(r["exit"])]
        assert set(ops) == {"ort_fp32", "static", "dynamic", "auto"} and ops["ort_fp32"]["MatMul"] > 0
        assert any(op.startswith("QLinear") or op.endswith("Integer") or op == "DequantizeLinear"
                   for op in ops["static"])  # fmt: skip
    assert all(len(v) == 2 for v in data["samples_s"]["cpu"].values())
    assert set(data["targets"]) == {"static", "dynamic", "auto", "ort_fp32_not_slower_than_eager"}


def test_synthetic_baseline_smoke(tmp_path, tiny_corpus):
    bench = load_script("synthetic_baseline")
    out = bench.main(
        ["--speakers", "4", "--sentences", "1", "--folds", "2", "--json", str(tmp_path / "g.json")]
    )
    data = read(tmp_path / "g.json", out)
    check_provenance(data, "synthetic_baseline", fingerprints=None)
    [row] = data["results"]
    assert row["seed"] == 0 and row["corpus"]["utterances"] == 16 and row["folds"] == 2
    for key in ("acc", "uar", "cv_acc", "cv_uar"):
        assert_uar(row[key])
    out = bench.main(["--corpus", str(tiny_corpus), "--folds", "3", "--json", str(tmp_path / "c.json")])
    [row] = read(tmp_path / "c.json", out)["results"]
    assert row["corpus"]["speakers"] == 6 and row["folds"] == 3
    assert_uar(row["cv_uar"])


def test_round_cost_smoke(tmp_path):
    bench = load_script("round_cost")
    argv = ["--backbone", "tiny", "--utterances", "8", "--seconds", "1", "--repeats", "1", "--epochs", "1",
            "--quiet", "--json", str(tmp_path / "rc.json")]  # fmt: skip
    data = read(tmp_path / "rc.json", bench.main(argv))
    check_provenance(data, "round_cost")
    assert data["settings"]["utterances"] == 8 and data["settings"]["exits"] == [1, 2, 3, 4]
    assert set(data["times"]) >= {f"{v}@{data['settings']['default_threads']}" for v in bench.VARIANTS}
    assert all(t["median_s"] > 0 for t in data["times"].values())
    assert data["max_feature_gap"] < 1e-4
    assert 0 < data["bytes"]["upload_over_parameters"] < 1


def test_round_overhead_smoke(tmp_path):
    bench = load_script("round_overhead")
    argv = ["--backbone", "tiny", "--utterances", "2", "--seconds", "0.5", "--repeats", "1", "--epochs", "1",
            "--quiet", "--json", str(tmp_path / "ro.json")]  # fmt: skip
    data = read(tmp_path / "ro.json", bench.main(argv))
    check_provenance(data, "round_overhead")
    assert set(data["times"]) == {"bare", "bare-runtime", "fedsd", "warm"}
    assert (
        data["times"]["fedsd"]["cache_misses"] == [0] == data["times"]["warm"]["cache_misses"]
    )  # every timed message found its features cached
    assert "opacus" not in data["times"]["fedsd"]["heavy_modules"]
    assert all(t["median_s"] > 0 for t in data["times"].values()) and data["over_floor"]["fedsd"] > 0


def test_self_distillation_smoke(tmp_path, tiny_corpus, capsys):
    bench = load_script("self_distillation")
    argv = ["--corpus", str(tiny_corpus), "--work", str(tmp_path / "work"), "--test-speakers", "2",
            "--valid-speakers", "2", "--epochs", "1", "--seeds", "0", "1", "--fractions", "0.5",
            "--set", "data.crop.max_seconds=1.0", "--out", str(tmp_path / "sd")]  # fmt: skip
    out = bench.main(argv)
    assert "SD − CE" in capsys.readouterr().out
    data = read(tmp_path / "sd.json", out)
    p = check_provenance(data, "self_distillation", fingerprints=4)
    assert p["config"]["data"]["split"] == "speaker" and p["config"]["data"]["test_speakers"] == 2
    assert data["exits"] == [1, 2, 3, 4]
    assert sorted((r["mode"], r["seed"]) for r in data["runs"]) == [
        ("ce", 0),
        ("ce", 1),
        ("sd", 0),
        ("sd", 1),
    ]
    for seed, speakers in data["setup"]["speakers_by_seed"].items():
        assert len(speakers["test"]) == 2 and len(speakers["valid"]) == 2, seed
        assert not set(speakers["test"]) & (set(speakers["train"]) | set(speakers["valid"]))
    s = data["summary"]["0.5"]
    assert s["seeds"] == [0, 1]
    for k in ("1", "2", "3", "4"):
        for arm in ("ce", "sd"):
            assert len(s[arm][k]["values"]) == 2
            for v in s[arm][k]["values"]:
                assert_uar(v)
        d = s["sd_minus_ce"][k]
        assert d["n"] == 2 and d["ci_low"] <= d["mean"] <= d["ci_high"]
        assert d["values"] == pytest.approx(
            [a - b for a, b in zip(s["sd"][k]["values"], s["ce"][k]["values"], strict=True)]
        )
    assert len(data["baseline"]) == 2
    for b in data["baseline"]:
        assert_uar(b["uar"])
        assert b["n_test"] == 8 and 4 <= b["n_train"] < 8  # half the 8 training utterances, ≥ 1 per class
    assert_png(tmp_path / "sd.png")


def test_adaptation_smoke(adaptation_run):
    res, out, base = adaptation_run
    data = read(res / "adaptation.json", out)
    p = check_provenance(data, "adaptation", fingerprints=2)  # one base model per speaker fold
    bases = [Path(s["base_model"]) for s in data["setup"]["splits"].values()]
    assert base == bases[0] and p["backbone_fingerprint"] == {
        str(b): json.loads((b / "fedsd.json").read_text())["fingerprint"] for b in bases
    }
    assert data["exits"] == [1, 2, 3, 4]
    assert [(r["labels"], r["method"], r["measure"]) for r in data["table"]] == [
        ("50%", "before (base model)", "unseen"), ("50%", "before (base model)", "pglobal"),
        ("50%", "CE only", "unseen"), ("50%", "CE only", "pglobal"), ("50%", "CE only", "ppersonal"),
        ("50%", "self-distillation", "unseen"), ("50%", "self-distillation", "pglobal"),
        ("50%", "self-distillation", "ppersonal"),
        ("50%", "local-only, CE", "unseen"), ("50%", "local-only, CE", "pglobal"),
        ("50%", "local-only, CE", "ppersonal"),
        ("50%", "local-only, SD", "unseen"), ("50%", "local-only, SD", "pglobal"),
        ("50%", "local-only, SD", "ppersonal"),
        *[("50%", f"pseudo-labels, τ = {t}", m) for t in ("0.5", "0.7", "0.9") for m in ("unseen", "pglobal", "ppersonal")],
    ] + ([("50%", "pseudo-labels (τ chosen on validation)", m) for m in ("unseen", "pglobal", "ppersonal")]
         if data["pseudo_label_choice"]["0.5"]["chosen"] else [])  # fmt: skip
    for row in data["table"]:
        assert set(row["uar"]) == {"1", "2", "3", "4"}
        if row["measure"] == "unseen":
            for values in row["uar"].values():
                assert len(values) == 2  # one seed × two speaker folds
                for v in values:
                    assert_uar(v)
        else:  # the one device runs exit 1: measured there only, the teacher never on devices
            assert len(row["uar"]["1"]) == 2 and row["uar"]["4"] == []
            for v in row["uar"]["1"]:
                assert_uar(v)
    assert {r["mode"] for r in data["runs"]} == {"ce", "sd", "pl"} and not any(r["cached"] for r in data["runs"])
    choice = data["pseudo_label_choice"]["0.5"]
    assert set(choice["valid_uar_exit2"]) == {"pl0.5", "pl0.7", "pl0.9"}
    assert sorted({(r["fold"], r["seed"]) for r in data["runs"]}) == [(0, 0), (1, 0)]
    # speaker folds: disjoint test speakers, each fold with its own base model, never trained on them
    splits = data["setup"]["splits"]
    tests = [set(s["test_speakers"]) for s in splits.values()]
    assert len(tests) == 2 and not tests[0] & tests[1]
    for s in splits.values():
        assert not set(s["test_speakers"]) & (set(s["server_speakers"]) | set(s["device_speakers"]))
    for r in data["runs"]:
        p = r["personal"]
        assert p["has_final"] and p["n_devices"]["1"] == 1
        for tag in ("global", "personal") if r["local_only"] else ("base", "global", "personal"):
            assert_uar(p[tag]["1"])
        (dev,) = p["devices"].values()
        assert dev["speakers"] and set(dev["speakers"]) <= set(splits[str(r["fold"])]["device_speakers"])
        if r["local_only"]:  # no federated round: the devices fine-tuned the base model's heads alone
            assert r["before"] == r["after"] and r["overrides"]["federated.personalize_epochs"] == 1 * 1 + 1
    comparisons_pre = [row["comparison"] for row in data["prestated"]]
    assert comparisons_pre and all("p_holm" in row for row in data["prestated"])
    comparisons = {d["comparison"] for d in data["differences"]}
    assert "self-distillation − CE only, personal test, personal heads" in comparisons
    assert "CE only: personal − global heads, personal test" in comparisons
    assert all(d["t95"]["1"]["n"] == 2 for d in data["differences"])  # pairs over (fold, seed)
    assert data["verdicts"][0].startswith("premise") and isinstance(data["premise"]["0"]["holds_all"], bool)
    assert data["setup"]["corpus"]["utterances"] == 24
    assert_png(res / "adaptation.png")


def test_privacy_smoke(tmp_path, tiny_corpus, adaptation_run):
    _, _, base = adaptation_run
    bench = load_script("privacy")
    argv = ["--corpus", str(tiny_corpus), "--work", str(tmp_path / "work"), "--base-model", str(base),
            "--epsilons", "8", "--repeats", "1", "--out", str(tmp_path / "privacy"), *FED,
            "--clients", "1", "--set", "federated.min_clients=1", "--set", "federated.personalize_epochs=1"]  # fmt: skip
    # (one device with both device speakers: it has personal test speech, as in adaptation_run)
    data = read(tmp_path / "privacy.json", bench.main(argv))
    check_provenance(data, "privacy")
    assert [r["target_epsilon"] for r in data["rows"]] == [None, None, 8.0]
    assert [r["arm"] for r in data["rows"]] == ["no DP", "DP path, σ = 0, no clipping", "ε = 8"]
    for r in data["rows"]:
        assert set(r["uar"]) == {"1", "2", "3"}
        for values in r["uar"].values():
            assert len(values) == 1
            assert_uar(values[0])
        for key in ("personal_global", "personal_personal", "personal_base"):
            assert set(r[key]) == {"1", "2", "3"} and all(len(v) == 1 for v in r[key].values())
    dp, sigma0 = data["rows"][2], data["rows"][1]
    assert 0 < dp["epsilon"][0] <= 8.0 + 1e-6 and dp["sigma"]
    assert sigma0["sigma"] == [0.0] and sigma0["epsilon"] == []  # the same-loss reference arm: no privacy
    # under DP a device keeps its personal-test metrics (not noised) to itself: read from its own log
    assert all(
        math.isfinite(dp[key][k][0]) for key in ("personal_global", "personal_personal") for k in ("1",)
    )
    diffs = data["differences"]
    assert (
        "ε = 8: personal − global heads, personal test" in diffs
        and "ε = 8 − no DP, unseen test speakers" in diffs
    )
    for k in ("1", "2", "3"):  # the difference is the two arms' values subtracted, seed by seed
        d = diffs["ε = 8 − no DP, unseen test speakers"][k]
        assert d["values"] == [dp["uar"][k][0] - data["rows"][0]["uar"][k][0]]
        d = diffs["ε = 8 − DP path, σ = 0, no clipping, unseen test speakers"][k]  # noise and clipping only
        assert d["values"] == [dp["uar"][k][0] - sigma0["uar"][k][0]]
    assert "DP path, σ = 0, no clipping − no DP, unseen test speakers" in diffs
    assert data["overhead"]["ratio"] > 0
    assert_png(tmp_path / "privacy.png")


def test_robustness_smoke(tmp_path, tiny_corpus, adaptation_run):
    _, _, base = adaptation_run
    bench = load_script("robustness")
    argv = ["--corpus", str(tiny_corpus), "--work", str(tmp_path / "work"), "--base-model", str(base),
            "--defences", "mean", "median", "--attacks", "none", "scaled", "--out", str(tmp_path / "rob"),
            *FED]  # fmt: skip
    data = read(tmp_path / "rob.json", bench.main(argv))
    check_provenance(data, "robustness")
    assert set(data["results"]) == {
        "mean (no defence)|none", "mean (no defence)|scaled ×100", "median|none", "median|scaled ×100",
    }  # fmt: skip
    for per_exit in data["results"].values():
        assert set(per_exit) == {"1", "2", "3"}
        for values in per_exit.values():
            assert len(values) == 1
            assert_uar(values[0])
    assert all(len(v) == 1 for v in data["rejected"].values())
    assert_png(tmp_path / "rob.png")


@pytest.mark.slow
def test_simulation_scale_smoke(tmp_path):
    """Ray starts in a child process per device count, and again for Flower's floor: about a minute."""
    bench = load_script("simulation_scale")
    argv = ["--clients", "2", "--speakers", "6", "--sentences", "1", "--rounds", "2", "--test-speakers", "2",
            "--server-speakers", "2", "--grace", "10", "--floor", "--json", str(tmp_path / "sim.json")]  # fmt: skip
    data = read(tmp_path / "sim.json", bench.main(argv))
    check_provenance(data, "simulation_scale")
    [r] = data["runs"]
    assert r["clients"] == 2 and r["ok"], r
    assert r["total_seconds"] > 0 and r["peak_rss_sum_bytes"] > 0
    assert len(r["round_seconds"]) == 2
    # the floor: the same devices and rounds through a bare ClientApp, every round with every device
    f = r["floor"]
    assert f["ok"] and f["rounds_done"] == 2 and f["clients_per_round"] == [2, 2], f
    assert f["peak_rss_sum_bytes"] > 0 and f["leftover_processes_killed"] == 0
    assert r["per_message_seconds"] == pytest.approx(r["steady_round_seconds"] / 2)
    assert r["steady_round_vs_floor"] == pytest.approx(r["steady_round_seconds"] / f["steady_round_seconds"])
    proj = data["targets"]["projection_10000"]
    assert proj["from_clients"] == 2
    assert proj["messages"] == 20_000
    assert proj["floor_seconds"] == pytest.approx(20_000 * r["floor_per_message_seconds"])
    assert proj["fedsd_seconds"] == pytest.approx(20_000 * r["per_message_seconds"])
    assert "Flower's floor" in bench.table(data)
    assert data["leftover_processes_total"] == 0


def test_whisper_recipe_smoke(tmp_path, tiny_corpus):
    """The recipe comparison at its smallest (the scratch recipe on 6 speakers, 1 epoch, two variants):
    validation and test UAR per exit per variant, and the MFCC baseline on the same split."""
    bench = load_script("whisper_recipe")
    sets = [f"data.root={tiny_corpus}", "data.split=speaker", "train.epochs=1", "federated.num_clients=1",
            "federated.test_speakers=1", "federated.server_speakers=4", "federated.server_valid_speakers=1"]
    argv = ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "scratch.yaml"), "--work", str(tmp_path / "work"),
            "--variant", "base:", "--variant", "ce:train.mode=ce", "--out", str(tmp_path / "w.json")]
    for item in sets:
        argv += ["--set", item]
    out = bench.main(argv)
    data = json.loads((tmp_path / "w.json").read_text())
    assert [v["variant"] for v in data["variants"]] == [v["variant"] for v in out["variants"]] == ["base", "ce"]
    assert "whisper_recipe" in json.dumps(data["provenance"])
    assert data["setup"]["speakers"]["test"] and not set(data["setup"]["speakers"]["test"]) & set(
        data["setup"]["speakers"]["train"] + data["setup"]["speakers"]["valid"]
    )
    for v in data["variants"]:
        assert set(v["test_uar"]) == {"1", "2", "3", "4"} and all(0 <= x <= 1 for x in v["test_uar"].values())
    assert 0 <= data["mfcc_baseline"]["test"]["uar"] <= 1



def test_holm_and_paired_p_match_their_definitions():
    sys.path.insert(0, str(BENCH))
    from common import holm, paired_p
    from scipy import stats

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])  # m·p, step-down, monotone
    assert holm([0.5, float("nan")])[0] == 0.5 and math.isnan(holm([0.5, float("nan")])[1])
    a = {(0, s): v for s, v in enumerate([0.70, 0.72, 0.69, 0.75])}
    b = {(0, s): v for s, v in enumerate([0.65, 0.70, 0.70, 0.71])}
    want = stats.ttest_rel([a[k] for k in sorted(a)], [b[k] for k in sorted(b)]).pvalue
    assert paired_p(a, b) == pytest.approx(want)
    assert math.isnan(paired_p({(0, 0): 1.0}, {(0, 0): 0.5}))  # one pair: no test
