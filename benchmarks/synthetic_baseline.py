"""Difficulty check of the synthetic corpus: MFCC statistics + logistic regression, speaker-independent.

Why: the synthetic corpus is only useful if it is learnable but not trivial, with classes overlapping like
real emotional speech. DESIGN.md §3 sets the target: this simple baseline should land near 0.70-0.80
(4 classes, speakers never shared between training and testing) — well above chance (0.25), far from 1.0.

    .venv/bin/python benchmarks/synthetic_baseline.py --speakers 24 --sentences 12 --seeds 0 1 2
    .venv/bin/python benchmarks/synthetic_baseline.py --backend numpy
    .venv/bin/python benchmarks/synthetic_baseline.py --corpus DIR     # an existing corpus

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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsd.data.manifest import read_manifest  # noqa: E402
from fedsd.data.synthetic import generate_corpus  # noqa: E402

EMOTIONS = ("neutral", "happy", "angry", "sad")


def mfcc_stats(path: Path, n_mfcc: int = 20) -> np.ndarray:
    """Mean and std over frames of MFCCs and their deltas (a classic utterance-level SER feature)."""
    import soundfile as sf
    import torch
    import torchaudio

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(x.mean(axis=1))
    tf = _mfcc(sr, n_mfcc)
    m = tf(wav)  # (n_mfcc, frames)
    d = torchaudio.functional.compute_deltas(m)
    feats = torch.cat([m, d])
    return torch.cat([feats.mean(dim=1), feats.std(dim=1)]).numpy().astype(np.float64)


_MFCC_CACHE: dict[tuple[int, int], object] = {}


def _mfcc(sr: int, n_mfcc: int):  # type: ignore[no-untyped-def]
    import torchaudio

    key = (sr, n_mfcc)
    if key not in _MFCC_CACHE:
        _MFCC_CACHE[key] = torchaudio.transforms.MFCC(
            sample_rate=sr, n_mfcc=n_mfcc, melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 40}
        )
    return _MFCC_CACHE[key]


def load_features(corpus: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels, speaker groups and split labels of a corpus (its manifest order)."""
    rows = [r for r in read_manifest(corpus / "manifest.csv") if r.label in EMOTIONS]
    x = np.stack([mfcc_stats(corpus / r.path) for r in rows])
    y = np.array([EMOTIONS.index(r.label) for r in rows])
    groups = np.array([r.speaker for r in rows])
    splits = np.array([r.split for r in rows])
    return x, y, groups, splits


def _fit_score(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, recall_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(xtr, ytr)
    pred = clf.predict(xte)
    return float(accuracy_score(yte, pred)), float(recall_score(yte, pred, average="macro"))


def evaluate(x: np.ndarray, y: np.ndarray, groups: np.ndarray, splits: np.ndarray, folds: int) -> dict[str, float]:
    """Test-split scores (train on the train split) and leave-speakers-out CV means."""
    from sklearn.model_selection import GroupKFold

    tr, te = splits == "train", splits == "test"
    acc, uar = _fit_score(x[tr], y[tr], x[te], y[te]) if te.any() and tr.any() else (float("nan"),) * 2
    k = min(folds, len(np.unique(groups)))
    cv_acc, cv_uar = [], []
    for a, b in GroupKFold(n_splits=k).split(x, y, groups):
        s = _fit_score(x[a], y[a], x[b], y[b])
        cv_acc.append(s[0])
        cv_uar.append(s[1])
    return {"acc": acc, "uar": uar, "cv_acc": float(np.mean(cv_acc)), "cv_uar": float(np.mean(cv_uar)),
            "cv_uar_sd": float(np.std(cv_uar))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speakers", type=int, default=24)
    p.add_argument("--sentences", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--intensity", type=float, default=0.75)
    p.add_argument("--backend", default="auto", choices=["auto", "espeak", "numpy"])
    p.add_argument("--folds", type=int, default=6, help="leave-speakers-out CV folds")
    p.add_argument("--corpus", type=Path, default=None, help="evaluate this existing corpus instead")
    args = p.parse_args(argv)

    results: list[tuple[str, str, dict[str, float], float]] = []
    if args.corpus is not None:
        t0 = time.perf_counter()
        res = evaluate(*load_features(args.corpus), folds=args.folds)
        results.append(("-", "corpus", res, time.perf_counter() - t0))
    else:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="fedsd-synth-") as tmp:
                t0 = time.perf_counter()
                r = generate_corpus(tmp, speakers=args.speakers, sentences=args.sentences, emotions=EMOTIONS,
                                    seed=seed, intensity=args.intensity, backend=args.backend, progress=False)
                res = evaluate(*load_features(Path(tmp)), folds=args.folds)
                results.append((str(seed), r.backend, res, time.perf_counter() - t0))
            print(f"seed {seed}: done in {results[-1][3]:.1f} s", file=sys.stderr)

    print(f"4-class speaker-independent baseline (MFCC+delta mean/std, logistic regression), "
          f"speakers={args.speakers} sentences={args.sentences} intensity={args.intensity}")
    print(f"{'seed':>5} {'backend':>8} {'test acc':>9} {'test UAR':>9} {'CV acc':>8} {'CV UAR':>8} {'± sd':>6}")
    for seed, backend, res, _ in results:
        print(f"{seed:>5} {backend:>8} {res['acc']:9.3f} {res['uar']:9.3f} {res['cv_acc']:8.3f} "
              f"{res['cv_uar']:8.3f} {res['cv_uar_sd']:6.3f}")
    if len(results) > 1:
        mean = {k: float(np.mean([r[2][k] for r in results])) for k in ("acc", "uar", "cv_acc", "cv_uar")}
        print(f"{'mean':>5} {'':>8} {mean['acc']:9.3f} {mean['uar']:9.3f} {mean['cv_acc']:8.3f} {mean['cv_uar']:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
