"""Latency per exit on CPU: does exit k cost the front end plus k layers, and nothing more?

Why: the point of a multi-exit model on a device is that exit k pays for the CNN front end, the
positional convolution and layers 1..k only (docs/architecture.md §1). This script measures, in one interleaved
run, each exit's latency next to its *ideal* (front end + k x one layer + head, each timed alone) and
the full exit next to Hugging Face's plain ``backbone(x).last_hidden_state``. Targets: every exit within
10 % of its ideal, the full exit within 5 % of the plain HF forward.

    .venv/bin/python benchmarks/exit_latency.py                       # base, 4 s, batch 1, 30 repeats
    .venv/bin/python benchmarks/exit_latency.py --backbone tiny --seconds 1 --repeats 5
    .venv/bin/python benchmarks/exit_latency.py --json runs/bench/exit_latency.json \\
        --plot runs/bench/exit_latency.png

Writes ``benchmarks/results/exit_latency.json`` by default (``--json``), with provenance
(benchmarks/common/).

Every repetition times every variant once, in a freshly shuffled order, so machine noise (other
processes on a shared CPU) spreads over all variants alike; medians and interquartile ranges are
reported, and ratios are only taken between numbers from the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)

from fedsd.model import MultiExitSER, load_backbone  # noqa: E402
from fedsd.model.backbone import SAMPLE_RATE  # noqa: E402

LABELS = ("angry", "happy", "neutral", "sad")
EXIT_TOLERANCE = 0.10  # exit k within 10 % of front end + k layers + head
FULL_TOLERANCE = 0.05  # our full exit within 5 % of the plain HF forward
CLOCKS = common.CLOCKS


def build_variants(model: MultiExitSER, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Name -> zero-argument callable; each is timed alone, all under ``torch.inference_mode``."""
    enc = model.encoder
    n = enc.num_layers
    variants: dict[str, Callable[[], Any]] = {}
    for k in model.exits:
        variants[f"exit{k}"] = lambda k=k: model(x, exits=[k])
    variants["hf"] = hf_reference(model, x)
    variants["front"] = lambda: enc.start(x)
    # Layer i alone, from a precomputed state at layer i-1 (every layer has the same shape and cost,
    # but timing all of them and averaging is less sensitive to a single unlucky one).
    states = [enc.start(x)]
    for i in range(1, n + 1):
        states.append(enc.advance(states[-1], i))
    for i in range(1, n + 1):
        variants[f"layer{i}"] = lambda i=i: enc.advance(states[i - 1], i)
    top = model.exits[-1]
    hidden, mask = enc.exit_hidden(states[top]), states[top].frame_mask
    variants["head"] = lambda: model._run_head(top, hidden, mask)
    return variants


WHISPER_WINDOW_S = 30  # HF's WhisperEncoder takes exactly 3,000 mel frames: every clip padded to 30 s


def hf_reference(model: MultiExitSER, x: torch.Tensor) -> Callable[[], Any]:
    """Hugging Face's own forward over all layers, as a user of ``transformers`` would run it.

    wav2vec 2.0 / HuBERT / WavLM: ``backbone(x).last_hidden_state``. Whisper: HF refuses anything but a
    30 s window, so the clip is zero-padded to 30 s, turned into log-mel (the feature extractor's rule)
    and run through ``WhisperEncoder``; our exits run at the clip's true length instead.
    """
    if model.family != "whisper":
        return lambda: model.backbone(x).last_hidden_state
    enc = model.encoder
    window = WHISPER_WINDOW_S * SAMPLE_RATE
    padded = torch.nn.functional.pad(x, (0, window - x.shape[1]))
    full = torch.full((x.shape[0],), window, dtype=torch.long)
    return lambda: model.backbone(enc.log_mel(padded, full)[0]).last_hidden_state


def measure(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int, seed: int = 0, clock: str = "wall"
) -> dict[str, list[float]]:
    """Round-robin timing on one clock, the garbage collector kept out of the timed calls."""

    def progress(rep: int, _: Any) -> None:
        if rep % 5 == 0:
            print(f"  repetition {rep}/{repeats}", file=sys.stderr, flush=True)

    times = common.interleaved(
        variants, repeats, seed=seed, warmup=warmup, clocks=(clock,), gc_off=True, on_repeat=progress
    )
    return times[clock]


def analyse(model: MultiExitSER, times: dict[str, list[float]]) -> dict[str, Any]:
    """Medians, ideal times, ratios and whether the targets are met."""
    n = model.encoder.num_layers
    stats = {name: common.quartiles_ms(t) for name, t in times.items()}
    layer_ms = statistics.fmean(stats[f"layer{i}"]["median_ms"] for i in range(1, n + 1))
    front_ms, head_ms = stats["front"]["median_ms"], stats["head"]["median_ms"]
    full = f"exit{model.exits[-1]}"
    full_ms = stats[full]["median_ms"]
    # Paired view: the same ratios taken inside each repetition (all variants ran within seconds of
    # each other), then the median over repetitions. Slow drifts in machine load cancel out.
    reps = range(len(times["front"]))
    layer_r = [statistics.fmean(times[f"layer{i}"][r] for i in range(1, n + 1)) for r in reps]
    rows = []
    for k in model.exits:
        s = stats[f"exit{k}"]
        ideal = front_ms + k * layer_ms + head_ms
        paired = statistics.median(
            times[f"exit{k}"][r] / (times["front"][r] + k * layer_r[r] + times["head"][r]) for r in reps
        )
        rows.append(
            {
                "exit": k,
                **s,
                "speedup_vs_full": full_ms / s["median_ms"],
                "ideal_ms": ideal,
                "ratio_to_ideal": s["median_ms"] / ideal,
                "paired_ratio_to_ideal": paired,
                "within_target": s["median_ms"] / ideal <= 1 + EXIT_TOLERANCE,
            }
        )
    hf_ms = stats["hf"]["median_ms"]
    full_over_hf_paired = statistics.median(times[full][r] / times["hf"][r] for r in reps)
    return {
        "stats": stats,
        "front_ms": front_ms,
        "layer_mean_ms": layer_ms,
        "head_ms": head_ms,
        "rows": rows,
        "hf_ms": hf_ms,
        "full_ms": full_ms,
        "full_over_hf": full_ms / hf_ms,
        "full_over_hf_paired": full_over_hf_paired,
        "noise_iqr_over_median": stats[full]["iqr_ms"] / full_ms,
        "targets": {
            "exits_within_10pct_of_ideal": all(r["within_target"] for r in rows),
            "full_within_5pct_of_hf": full_ms / hf_ms <= 1 + FULL_TOLERANCE,
        },
    }


def render(result: dict[str, Any], header: str) -> str:
    """Markdown table (prints well in a terminal and pastes into reports as is)."""
    lines = [
        header,
        "",
        "| exit | median ms | IQR ms | speed-up vs full | ideal ms | ratio to ideal | paired ratio |",
        "|-----:|----------:|-------:|-----------------:|---------:|---------------:|-------------:|",
    ]
    for r in result["rows"]:
        flag = "" if r["within_target"] else " (over 10 %)"
        lines.append(
            f"| {r['exit']} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['speedup_vs_full']:.2f}x "
            f"| {r['ideal_ms']:.1f} | {r['ratio_to_ideal']:.3f}{flag} | {r['paired_ratio_to_ideal']:.3f} |"
        )
    s = result["stats"]
    lines += [
        "",
        f"parts: front end {result['front_ms']:.1f} ms (IQR {s['front']['iqr_ms']:.1f}), "
        f"one layer {result['layer_mean_ms']:.1f} ms (mean of per-layer medians), "
        f"head {result['head_ms']:.2f} ms",
        f"plain HF forward ({result.get('hf_label', 'backbone(x).last_hidden_state')}): {result['hf_ms']:.1f} ms (IQR {s['hf']['iqr_ms']:.1f}); "
        f"our full exit / HF = {result['full_over_hf']:.3f} (paired per repetition: "
        f"{result['full_over_hf_paired']:.3f})",
        f"targets: every exit <= 1.10 x ideal: {'MET' if result['targets']['exits_within_10pct_of_ideal'] else 'MISSED'}; "
        f"full exit <= 1.05 x HF: {'MET' if result['targets']['full_within_5pct_of_hf'] else 'MISSED'}",
    ]
    if result["noise_iqr_over_median"] > 0.10:
        lines.append(
            f"note: the full exit's IQR is {result['noise_iqr_over_median']:.0%} of its median: the machine "
            "is noisy, so ratios within that spread are not resolved (use more --repeats or a quiet machine)"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path, title: str, ylabel: str = "latency (ms)") -> Path:
    """Measured latency per exit (median, IQR bars) against the ideal line, plus the HF reference."""
    rows = result["rows"]
    ks = [r["exit"] for r in rows]
    med = [r["median_ms"] for r in rows]
    err = [[r["median_ms"] - r["q1_ms"] for r in rows], [r["q3_ms"] - r["median_ms"] for r in rows]]
    with common.figure(path, figsize=(6, 4)) as (_, ax):
        ax.errorbar(ks, med, yerr=err, fmt="o-", capsize=4, label="measured (median, IQR)")
        ax.plot(ks, [r["ideal_ms"] for r in rows], "s--", label="ideal: front + k x layer + head")
        ax.axhline(result["hf_ms"], color="grey", ls=":", label="plain HF forward (all layers)")
        ax.set_xlabel("exit (transformer layers run)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(ks)
        ax.set_ylim(bottom=0)
        ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)
        ax.legend(fontsize=8)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="base", help="built-in name (base, tiny, ...) or a local directory")
    p.add_argument("--family", default=None, help="wav2vec2 / hubert / wavlm (built-ins only)")
    p.add_argument("--exits", type=int, nargs="+", default=None, help="default: quarter depths")
    p.add_argument("--seconds", type=float, default=4.0, help="clip length (16 kHz)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: latency (default). cpu: process CPU time; with --threads 1 it counts the work done "
        "and is almost immune to other processes sharing the cores (an overhead check, not a latency)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=common.RESULTS / "exit_latency.json",
        help="write all samples and the summary here, with provenance (default: %(default)s)",
    )
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of latency per exit vs ideal")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, run)


def run(args: argparse.Namespace, bench: common.Run | None = None) -> dict[str, Any]:
    """Build the model, time every variant interleaved, print/write the results."""
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.backbone, family=args.family)
    exits = args.exits or common.default_exits(int(backbone.config.num_hidden_layers))
    model = MultiExitSER(backbone, exits, LABELS, head="stats").eval()
    samples = int(round(args.seconds * SAMPLE_RATE))
    x = torch.randn(args.batch, samples, generator=torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        variants = build_variants(model, x)
        times = measure(variants, args.repeats, args.warmup, args.seed, clock=args.clock)
    result = analyse(model, times)
    if model.family == "whisper":
        result["hf_label"] = f"WhisperEncoder on the clip zero-padded to {WHISPER_WINDOW_S} s, log-mel included"
    setup = {
        "backbone": args.backbone,
        "family": model.family,
        "num_layers": model.encoder.num_layers,
        "hidden_size": model.encoder.hidden_size,
        "exits": model.exits,
        "seconds": args.seconds,
        "samples": samples,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "clock": args.clock,
        "torch": torch.__version__,
        "attn_implementation": getattr(model.backbone.config, "_attn_implementation", None),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    header = (
        f"exit latency: {args.backbone} ({model.family}, {setup['num_layers']} layers), "
        f"{args.seconds:g} s audio x batch {args.batch}, {setup['threads']} threads, "
        f"median of {args.repeats} interleaved repeats"
        + ("" if args.clock == "wall" else f", {args.clock} time")
    )
    print(render(result, header))
    out = {"setup": setup, **result, "samples_s": times}
    if bench is not None:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")} | {
            "exits": model.exits,
            "head": "stats",
            "labels": list(LABELS),
        }
        out = bench.write(args.json, out, config=config, fingerprint=model.backbone_fingerprint(), args=args)
    if args.plot is not None:
        plot(result, args.plot, header, "latency (ms)" if args.clock == "wall" else "CPU time (ms)")
        print(f"wrote {args.plot}")
    return out


if __name__ == "__main__":
    main()
