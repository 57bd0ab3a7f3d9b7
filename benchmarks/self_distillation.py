"""Does self-distillation lift the shallow exits? CE-only vs self-distillation, 100 % and 20 % labels.

Synthetic corpus (speaker-independent test), tiny backbone trained from scratch, several seeds; prints
per-exit test UAR as mean ± std and writes a JSON next to it.

    .venv/bin/python benchmarks/self_distillation.py --seeds 0 1 2 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedsd.config import ExperimentConfig
from fedsd.data.synthetic import generate_corpus
from fedsd.train import train


def run(
    corpus: Path, mode: str, fraction: float, seed: int, epochs: int, crop: float, out: Path
) -> dict[int, float]:
    cfg = ExperimentConfig.model_validate(
        {
            "name": f"{mode}-{fraction}-{seed}",
            "data": {
                "root": str(corpus),
                "labels": ["neutral", "happy", "angry", "sad"],
                "crop": {"max_seconds": crop, "mode": "random"},
            },
            "model": {"backbone": "tiny", "pretrained": False, "exits": [1, 2, 3, 4]},
            "train": {
                "mode": mode,
                "lr": 1e-3,
                "batch_size": 16,
                "epochs": epochs,
                "label_fraction": fraction,
                "freeze_feature_encoder": False,
                "seed": seed,
            },
        }
    )
    res = train(cfg, out / cfg.name, log=lambda _: None)
    return {k: r.uar for k, r in res.test.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, help="existing synthetic corpus (default: generate one)")
    ap.add_argument("--speakers", type=int, default=16)
    ap.add_argument("--sentences", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--crop", type=float, default=2.0, help="seconds per training clip")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.2])
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/self_distillation.json"))
    args = ap.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="fedsd-sd-bench-"))
    corpus = args.corpus or work / "corpus"
    if args.corpus is None:
        generate_corpus(corpus, speakers=args.speakers, sentences=args.sentences, seed=0, progress=False)
    results: dict[str, dict[int, list[float]]] = {}
    t0 = time.perf_counter()
    for fraction in args.fractions:
        for mode in ("ce", "sd"):
            key = f"{mode}@{fraction:g}"
            for seed in args.seeds:
                uar = run(corpus, mode, fraction, seed, args.epochs, args.crop, work / "runs")
                for k, v in uar.items():
                    results.setdefault(key, {}).setdefault(k, []).append(v)
                console.print(f"{key} seed {seed}: " + ", ".join(f"exit {k} {v:.3f}" for k, v in uar.items()))
    exits = sorted(next(iter(results.values())))
    table = Table(title=f"Test UAR (unseen speakers), mean ± std over seeds {args.seeds}")
    table.add_column("labels")
    table.add_column("loss")
    for k in exits:
        table.add_column(f"exit {k}", justify="right")
    for key, per_exit in results.items():
        mode, fraction = key.split("@")
        cells = [
            f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"
            for v in (per_exit[k] for k in exits)
        ]
        table.add_row(f"{float(fraction):.0%}", "CE only" if mode == "ce" else "self-distillation", *cells)
    console.print(table)
    console.print(f"{time.perf_counter() - t0:.0f} s in all; corpus {corpus}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
