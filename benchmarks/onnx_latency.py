"""Latency and size per exit: PyTorch eager fp32 against ONNX Runtime fp32 and int8 (each int8 mode).

Why: devices run ONNX Runtime; `fedsd export --format onnx [--quantize int8]` must be worth shipping
(issue 12 targets: int8 >= 2x faster than eager fp32 at every exit of the base shape, int8 file <= 30 %
of fp32, fp32 ONNX no slower than eager) and its int8 must agree with fp32. Per exit this script
exports one graph per variant, then times every variant on the same clip (batch 1) in one run, every
repetition visiting every (exit, variant) once in a fresh random order, and reports medians. torch and
ONNX Runtime both get ``--threads`` threads (default 1, for fairness and because one thread's CPU time
barely moves when other processes share the cores); the default clock is process CPU time.

Agreement: each int8 graph's top class is compared with the fp32 graph's on the test clips of a corpus
(``--corpus``, default the demo corpus if present, else a small generated one); ``--modes auto`` chooses
per exit on its validation clips (as ``fedsd export`` does on the calibration manifest's); with a trained
checkpoint (``--model``) the UARs are reported too. Random weights (the base shape) give a check of
the numerics, not of a trained model's accuracy.

    .venv/bin/python benchmarks/onnx_latency.py                                   # base, exits 3 6 9 12
    .venv/bin/python benchmarks/onnx_latency.py --model runs/demo/central/best --corpus data/synth \\
        --json benchmarks/results/onnx_latency_tiny.json
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)

from fedsd.model import MultiExitSER, load_backbone  # noqa: E402
from fedsd.model.backbone import SAMPLE_RATE  # noqa: E402
from fedsd.model.export import export_exit  # noqa: E402
from fedsd.runtime.onnx_export import (  # noqa: E402
    AUTO_MIN_AGREEMENT,
    AUTO_ORDER,
    QUANT_DETAIL,
    QUANT_MODES,
    export_onnx,
    graph_info,
)
from fedsd.runtime.onnx_runtime import INPUT_MASK, INPUT_WAVE, OnnxExitModel, load_clip  # noqa: E402

LABELS = common.EMOTIONS
CLOCKS = common.CLOCKS
INT8_TARGET = 2.0  # int8 at least this much faster than eager fp32
SIZE_TARGET = 0.30  # int8 file at most this share of the fp32 file


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def corpus_clips(
    corpus: Path | None, pre: dict[str, Any], n_cal: int, n_eval: int, seconds: float, work: Path, log: Callable
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], Path, list[np.ndarray]]:
    """Calibration clips (train split), test clips with labels, and validation clips (what ``auto``
    chooses on), preprocessed as the graph says.

    Models without a crop of their own (the built-in base) see clips cut or tiled to ``seconds``.
    """
    from fedsd.data.manifest import read_manifest

    if corpus is None:
        demo = common.ROOT / "data" / "synth"
        if (demo / "manifest.csv").is_file():
            corpus = demo
        else:
            from fedsd.data.synthetic import generate_corpus

            corpus = work / "corpus"
            log("generating a small corpus for calibration and agreement")
            generate_corpus(corpus, speakers=4, sentences=2, seed=0, progress=False)
    rows = [r for r in read_manifest(corpus / "manifest.csv") if r.label in LABELS]
    pre = dict(pre)
    if not (pre.get("crop") or {}).get("max_seconds"):
        pre["crop"] = {"max_seconds": seconds, "mode": "tile"}
    train = [r for r in rows if r.split == "train"] or rows
    held = [r for r in rows if r.split == "test"] or [r for r in rows if r.split == "valid"] or rows
    valid = [r for r in rows if r.split == "valid"] or held
    rng = random.Random(0)
    cal_rows = rng.sample(train, min(n_cal, len(train)))
    eval_rows = rng.sample(held, min(n_eval, len(held)))
    check_rows = rng.sample(valid, min(n_eval, len(valid)))
    cal = [load_clip(corpus / r.path, pre) for r in cal_rows]
    ev = [load_clip(corpus / r.path, pre) for r in eval_rows]
    check = [load_clip(corpus / r.path, pre) for r in check_rows]
    return cal, ev, [r.label for r in eval_rows], corpus, check


def uar(y: Sequence[int], p: Sequence[int], n: int) -> float:
    from fedsd.metrics import classification_report

    return classification_report(y, p, [str(i) for i in range(n)]).uar


def op_profile(path: Path, feeds: dict[str, np.ndarray], runs: int, threads: int, work: Path) -> dict[str, float]:
    """ONNX Runtime's own kernel time per op type, ms per run over ``runs`` runs of a profiling session
    (after one run of an unprofiled session of the same file), which says where an int8 graph still spends
    fp32 time."""
    import json
    from collections import Counter

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"profile-{path.stem}")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000.0 / runs
    return dict(per_op.most_common())


def render_profile(profiles: dict[str, dict[str, dict[str, float]]], top: int = 8) -> str:
    lines = ["", "ONNX Runtime kernel time per op type (ms per run):"]
    for name, by_variant in profiles.items():
        for variant, ops in by_variant.items():
            total = sum(ops.values())
            shown = ", ".join(f"{op} {ms:.1f}" for op, ms in list(ops.items())[:top])
            lines.append(f"  exit {name} {variant}: total {total:.1f} = {shown}")
    return "\n".join(lines)


def render(rows: list[dict[str, Any]], modes: list[str], header: str) -> str:
    cols = ["exit", "eager fp32 ms", "ORT fp32 ms", *[f"ORT int8 {m} ms" for m in modes]]
    cols += ["MB: torch / fp32 / " + " / ".join(f"int8 {m}" for m in modes), *[f"agree {m}" for m in modes]]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        t = r["ms"]
        cells = [str(r["exit"]), f"{t['torch']:.1f}", f"{t['ort_fp32']:.1f} ({r['speedup']['ort_fp32']:.2f}×)"]
        cells += [f"{t[m]:.1f} ({r['speedup'][m]:.2f}×)" for m in modes]
        b = r["bytes"]
        cells.append(" / ".join(f"{b[k] / 1e6:.1f}" for k in ["torch", "ort_fp32", *modes]))
        cells += [f"{r['agreement'][m]['agree']:.3f}" + (f" ({r['auto']['chosen']})" if m == "auto" else "")
                  for m in modes]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="base", help="built-in name (base, tiny) with random weights")
    p.add_argument("--family", default=None, help="wav2vec2 / hubert / wavlm (built-ins only)")
    p.add_argument("--model", type=Path, default=None, help="a trained fedsd checkpoint (instead of --backbone)")
    p.add_argument("--exits", type=int, nargs="+", default=None, help="default: quarter depths")
    p.add_argument("--seconds", type=float, default=4.0, help="clip length timed (16 kHz)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="clock of the table (both kept)")
    p.add_argument("--modes", nargs="+", default=list(QUANT_DETAIL), choices=list(QUANT_MODES),
                   help="int8 modes timed; auto chooses per exit on the validation clips (default: every fixed mode)")
    p.add_argument("--corpus", type=Path, default=None, help="calibration/agreement speech (manifest.csv)")
    p.add_argument("--calibration-clips", type=int, default=16)
    p.add_argument("--eval-clips", type=int, default=64,
                   help="test clips for int8 agreement (and as many validation clips for auto's choice)")
    p.add_argument("--work", type=Path, default=None, help="where the graphs go (default: a temp dir)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile every ONNX variant with ONNX Runtime's profiler over N runs: time per op type")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--json", type=Path, default=common.RESULTS / "onnx_latency.json", help="default: %(default)s"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, run)


def run(args: argparse.Namespace, bench: common.Run) -> dict[str, Any]:
    with common.scratch(args.work, "onnx-latency-") as work:
        return _run(args, bench, work)


def _run(args: argparse.Namespace, bench: common.Run, work: Path) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    if args.model is not None:
        net = MultiExitSER.from_pretrained(args.model).eval()
        source = str(args.model)
    else:
        backbone = load_backbone(args.backbone, family=args.family)
        exits = common.default_exits(int(backbone.config.num_hidden_layers))
        net = MultiExitSER(backbone, exits, LABELS, head="stats", meta={"normalize": "utterance"}).eval()
        source = args.backbone
    exits = args.exits or net.exits
    samples = int(round(args.seconds * SAMPLE_RATE))
    pre = graph_info(net, [exits[0]], None)["preprocessing"]
    cal, ev, ev_labels, corpus, check = corpus_clips(
        args.corpus, pre, args.calibration_clips, args.eval_clips, args.seconds, work, bench.log
    )
    names = list(net.label_names)
    y = [names.index(lbl) if lbl in names else -1 for lbl in ev_labels]
    labelled = args.model is not None and all(v >= 0 for v in y)
    g = np.random.default_rng(args.seed)
    x_np = g.standard_normal(samples).astype(np.float32)
    x_np = (x_np - x_np.mean()) / x_np.std()
    x_t = torch.from_numpy(x_np)[None]
    ones = np.ones((1, samples), dtype=np.int64)

    variants: dict[str, Callable[[], Any]] = {}
    rows: list[dict[str, Any]] = []
    for k in exits:
        bench.log(f"exit {k}: exporting fp32 and int8 ({', '.join(args.modes)})")
        small = export_exit(net, k)
        small.save_pretrained(work / f"torch{k}")
        files = {"ort_fp32": work / f"exit{k}.onnx"}
        export_onnx(net, [k], files["ort_fp32"])
        chosen: dict[str, Any] = {}
        for m in args.modes:
            files[m] = work / f"exit{k}-{m}.onnx"
            info = export_onnx(net, [k], files[m], quantize="int8", calibration=cal, quant_mode=m, check=check)
            if m == "auto":
                chosen = info["quantization_choice"]
        graphs = {v: OnnxExitModel.load(f, threads=args.threads) for v, f in files.items()}
        variants[f"{k}|torch"] = lambda k=k: net(x_t, exits=[k])
        for v, gm in graphs.items():
            variants[f"{k}|{v}"] = lambda gm=gm: gm.run_padded(x_np[None], ones)
        with torch.inference_mode():
            ref = net(x_t, exits=[k])[k].logits.numpy()
        fp32_logits = graphs["ort_fp32"].run_padded(x_np[None], ones)[k]
        pred = {v: np.concatenate([gm.run([w])[k].argmax(-1) for w in ev]) for v, gm in graphs.items()}
        agreement: dict[str, Any] = {}
        for m in args.modes:
            q = graphs[m].run_padded(x_np[None], ones)[k]
            agreement[m] = {
                "agree": float((pred[m] == pred["ort_fp32"]).mean()),
                "clips": len(ev),
                "max_abs_dlogit_timed_clip": float(np.abs(q - fp32_logits).max()),
            }
            if labelled:
                agreement[m]["uar_int8"] = uar(y, pred[m], len(names))
                agreement[m]["uar_fp32"] = uar(y, pred["ort_fp32"], len(names))
        rows.append(
            {
                "exit": k,
                "fp32_parity_max_abs_dlogit": float(np.abs(fp32_logits - ref).max()),
                "bytes": {"torch": _dir_bytes(work / f"torch{k}")} | {v: f.stat().st_size for v, f in files.items()},
                "agreement": agreement,
            }
            | ({"auto": chosen} if chosen else {})
        )
    profiles: dict[str, dict[str, dict[str, float]]] = {}
    if args.profile:
        feeds = {INPUT_WAVE: x_np[None], INPUT_MASK: ones}
        for k in exits:
            bench.log(f"exit {k}: profiling {', '.join(['ort_fp32', *args.modes])} ({args.profile} runs each)")
            profiles[str(k)] = {
                v: op_profile(work / (f"exit{k}.onnx" if v == "ort_fp32" else f"exit{k}-{v}.onnx"), feeds,
                              args.profile, args.threads, work)
                for v in ["ort_fp32", *args.modes]
            }  # fmt: skip
    bench.log(f"timing {len(variants)} variants x {args.repeats} interleaved repeats")
    with torch.inference_mode():
        times = common.interleaved(variants, args.repeats, seed=args.seed, warmup=args.warmup, clocks=list(CLOCKS))
    for r in rows:
        k = r["exit"]
        r["ms"] = {v: common.quartiles_ms(times[args.clock][f"{k}|{v}"])["median_ms"] for v in ["torch", "ort_fp32", *args.modes]}
        r["wall"] = {v: common.quartiles_ms(times["wall"][f"{k}|{v}"]) for v in ["torch", "ort_fp32", *args.modes]}
        r["cpu"] = {v: common.quartiles_ms(times["cpu"][f"{k}|{v}"]) for v in ["torch", "ort_fp32", *args.modes]}
        r["speedup"] = {v: r["ms"]["torch"] / r["ms"][v] for v in ["ort_fp32", *args.modes]}
        r["size_ratio"] = {m: r["bytes"][m] / r["bytes"]["ort_fp32"] for m in args.modes}
    targets = {
        m: {
            "int8_2x_faster_every_exit": all(r["speedup"][m] >= INT8_TARGET for r in rows),
            "int8_size_le_30pct": all(r["size_ratio"][m] <= SIZE_TARGET for r in rows),
        }
        for m in args.modes
    } | {"ort_fp32_not_slower_than_eager": all(r["speedup"]["ort_fp32"] >= 1.0 for r in rows)}
    setup = {
        "source": source,
        "family": net.family,
        "num_layers": net.encoder.num_layers,
        "hidden_size": net.encoder.hidden_size,
        "exits": exits,
        "seconds": args.seconds,
        "samples": samples,
        "batch": 1,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "clock": args.clock,
        "repeats": args.repeats,
        "corpus": str(corpus),
        "calibration_clips": len(cal),
        "eval_clips": len(ev),
        "modes": {m: QUANT_DETAIL.get(m, f"auto: the first of {', '.join(AUTO_ORDER)} keeping "
                                         f"{AUTO_MIN_AGREEMENT:.0%} of the fp32 answers on the validation clips")
                  for m in args.modes},  # fmt: skip
        "check_clips": len(check),
    }
    header = (
        f"ONNX latency: {source} ({net.family}, {setup['num_layers']} layers, width {setup['hidden_size']}), "
        f"{args.seconds:g} s audio, batch 1, {args.threads} thread(s) for torch and ORT, median "
        f"{args.clock} time of {args.repeats} interleaved repeats"
    )
    print(render(rows, list(args.modes), header))
    if profiles:
        print(render_profile(profiles))
    print(f"targets: {targets}")
    from importlib import metadata

    config = {k: v for k, v in vars(args).items() if k not in ("json", "work", "quiet")} | {
        "exits": exits,
        "onnxruntime": metadata.version("onnxruntime"),
        "onnx": metadata.version("onnx"),
    }
    out = {"setup": setup, "rows": rows, "targets": targets, "samples_s": times} | (
        {"op_profile_ms": profiles} if profiles else {}
    )
    return bench.write(args.json, out, config=config, fingerprint=net.backbone_fingerprint(), args=args)


if __name__ == "__main__":
    main()
