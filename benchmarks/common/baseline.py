"""The classic reference: MFCC statistics per utterance + logistic regression."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

_MFCC: dict[tuple[int, int], Any] = {}


def mfcc_stats(path: Path, n_mfcc: int = 20) -> Any:
    """Mean and std over frames of MFCCs and their deltas (a classic utterance-level SER feature)."""
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(x.mean(axis=1))
    if (sr, n_mfcc) not in _MFCC:
        _MFCC[(sr, n_mfcc)] = torchaudio.transforms.MFCC(
            sample_rate=sr, n_mfcc=n_mfcc, melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 40}
        )
    m = _MFCC[(sr, n_mfcc)](wav)  # (n_mfcc, frames)
    feats = torch.cat([m, torchaudio.functional.compute_deltas(m)])
    return torch.cat([feats.mean(dim=1), feats.std(dim=1)]).numpy().astype(np.float64)


def mfcc_features(rows: Sequence[Any], root: Path) -> Any:
    """One MFCC-statistics vector per manifest row (an (n, 80) array)."""
    import numpy as np

    return np.stack([mfcc_stats(root / r.path) for r in rows])


def fit_score(xtr: Any, ytr: Any, xte: Any, yte: Any) -> dict[str, float]:
    """Standardize + logistic regression; accuracy and UAR (macro recall) on the test part."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, recall_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(xtr, ytr)
    pred = clf.predict(xte)
    return {"acc": float(accuracy_score(yte, pred)), "uar": float(recall_score(yte, pred, average="macro"))}
