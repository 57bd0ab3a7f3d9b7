"""Difficulty check of the synthetic corpus: MFCC statistics + logistic regression, speaker-independent.

Why: the synthetic corpus is only useful if it is learnable but not trivial, with classes overlapping like
real emotional speech. docs/architecture.md §3 sets the target: this simple baseline should land near 0.70-0.80
(4 classes, speakers never shared between training and testing) — well above chance (0.25), far from 1.0.

    .venv/bin/python benchmarks/synthetic_baseline.py --speakers 24 --sentences 12 --seeds 0 1 2
    .venv/bin/python benchmarks/synthetic_baseline.py --backend numpy
    .venv/bin/python benchmarks/synthetic_baseline.py --corpus DIR     # an existing corpus
    .venv/bin/python benchmarks/synthetic_baseline.py --speakers 4 --sentences 1 --folds 2   # tiny

Writes ``benchmarks/results/synthetic_baseline.json`` (``--json``) with provenance (benchmarks/common/).
The features and the classifier live in benchmarks/common/baseline.py (``mfcc_features``, ``fit_score``), shared
with benchmarks/self_distillation.py, which reports this baseline beside the trained model.

Sizes default to the recipe's ``data.synth`` (configs/scratch.yaml; ``--config``, ``--set``).

Reported per seed: accuracy and UAR (macro recall) on the manifest's test-split speakers (model trained on
the train split), and the mean over leave-speakers-out folds (GroupKFold on all speakers; less noisy).

Measured with the defaults (24 speakers × 12 sentences × 4 emotions, intensity 0.75, seeds 0 1 2):
espeak-ng backend test UAR 0.78 / 0.80 / 0.82 (mean 0.80), 6-fold CV UAR 0.73 / 0.74 / 0.70 (mean 0.72);
numpy backend test UAR 0.83 / 0.83 / 0.77 (mean 0.81), CV UAR 0.80 / 0.76 / 0.75 (mean 0.77).
Typical confusions are neutral↔happy and happy↔angry; sad is the easiest class, as in acted corpora.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)
from common import EMOTIONS  # noqa: E402

from fedsd.data.manifest import read_manifest  # noqa: E402
from fedsd.data.synthetic import generate_corpus  # noqa: E402


def load_features(corpus: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels, speaker groups and split labels of a corpus (its manifest order)."""
    rows = [r for r in read_manifest(corpus / "manifest.csv") if r.label in EMOTIONS]
    x = common.mfcc_features(rows, corpus)
    y = np.array([EMOTIONS.index(r.label) for r in rows])
    groups = np.array([r.speaker for r in rows])
    splits = np.array([r.split for r in rows])
    return x, y, groups, splits


def evaluate(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, splits: np.ndarray, folds: int
) -> dict[str, float]:
    """Test-split scores (train on the train split) and leave-speakers-out CV means."""
    from sklearn.model_selection import GroupKFold

    tr, te = splits == "train", splits == "test"
    nan = {"acc": float("nan"), "uar": float("nan")}
    test = common.fit_score(x[tr], y[tr], x[te], y[te]) if te.any() and tr.any() else nan
    k = min(folds, len(np.unique(groups)))
    cv = [common.fit_score(x[a], y[a], x[b], y[b]) for a, b in GroupKFold(n_splits=k).split(x, y, groups)]
    cv_uar = [c["uar"] for c in cv]
    return {
        "acc": test["acc"],
        "uar": test["uar"],
        "cv_acc": float(np.mean([c["acc"] for c in cv])),
        "cv_uar": float(np.mean(cv_uar)),
        "cv_uar_sd": float(np.std(cv_uar)),
        "folds": k,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_config_args(p)
    p.add_argument("--speakers", type=int, help="default: the recipe's data.synth.speakers")
    p.add_argument("--sentences", type=int, help="default: the recipe's data.synth.sentences")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="corpus seeds")
    p.add_argument("--intensity", type=float, help="default: the recipe's data.synth.intensity")
    p.add_argument("--backend", choices=["auto", "espeak", "numpy"], help="default: the recipe's")
    p.add_argument("--folds", type=int, default=6, help="leave-speakers-out CV folds")
    p.add_argument("--corpus", type=Path, default=None, help="evaluate this existing corpus instead")
    p.add_argument("--json", type=Path, default=common.RESULTS / "synthetic_baseline.json")
    args = p.parse_args(argv)
    synth = common.load_recipe(args, common.base_overrides(args, {})).data.synth
    for key in ("speakers", "sentences", "intensity", "backend"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(synth, key))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main)


def _main(args: argparse.Namespace, run: common.Run) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    if args.corpus is not None:
        t0 = time.perf_counter()
        res = evaluate(*load_features(args.corpus), folds=args.folds)
        corpus = common.corpus_info(args.corpus.resolve())
        results.append({"seed": None, "backend": "corpus", "corpus": corpus, **res,
                        "seconds": time.perf_counter() - t0})  # fmt: skip
    else:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="fedsd-synth-") as tmp:
                t0 = time.perf_counter()
                r = generate_corpus(
                    tmp,
                    speakers=args.speakers,
                    sentences=args.sentences,
                    emotions=EMOTIONS,
                    seed=seed,
                    intensity=args.intensity,
                    backend=args.backend,
                    progress=False,
                )
                res = evaluate(*load_features(Path(tmp)), folds=args.folds)
                corpus = common.corpus_info(Path(tmp)) | {"root": None}
                results.append({"seed": seed, "backend": r.backend, "corpus": corpus, **res,
                                "seconds": time.perf_counter() - t0})  # fmt: skip
            run.log(f"seed {seed}: done in {results[-1]['seconds']:.1f} s")

    print(
        "4-class speaker-independent baseline (MFCC+delta mean/std, logistic regression), "
        + (f"corpus {args.corpus}" if args.corpus else f"speakers={args.speakers} sentences={args.sentences} "
           f"intensity={args.intensity}")
    )  # fmt: skip
    print(
        f"{'seed':>5} {'backend':>8} {'test acc':>9} {'test UAR':>9} {'CV acc':>8} {'CV UAR':>8} {'± sd':>6}"
    )
    for r in results:
        print(
            f"{r['seed'] if r['seed'] is not None else '-':>5} {r['backend']:>8} {r['acc']:9.3f} {r['uar']:9.3f} "
            f"{r['cv_acc']:8.3f} {r['cv_uar']:8.3f} {r['cv_uar_sd']:6.3f}"
        )
    keys = ("acc", "uar", "cv_acc", "cv_uar")
    mean = {k: float(np.mean([r[k] for r in results])) for k in keys}
    if len(results) > 1:
        print(
            f"{'mean':>5} {'':>8} {mean['acc']:9.3f} {mean['uar']:9.3f} {mean['cv_acc']:8.3f} {mean['cv_uar']:8.3f}"
        )
    config = {k: v for k, v in vars(args).items() if k != "json"} | {
        "emotions": list(EMOTIONS),
        "features": "MFCC(20)+delta mean/std per utterance",
        "classifier": "StandardScaler + LogisticRegression(C=1, max_iter=2000)",
    }
    return run.write(args.json, {"results": results, "mean": mean}, config=config, args=args)


if __name__ == "__main__":
    main()
