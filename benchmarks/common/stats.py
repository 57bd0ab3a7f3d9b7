"""Statistics over seeds: mean ± std cells and paired differences with Student-t intervals."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std, NaNs left out (NaN, NaN with nothing left; std 0 with one value)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def cell(values: Sequence[float]) -> str:
    """``0.712 ± 0.034``: a table cell of mean ± std."""
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, std and the two-sided Student-t confidence interval of the mean (NaN with one value)."""
    from scipy import stats

    vals = [v for v in values if not math.isnan(v)]
    n = len(vals)
    m, s = mean_std(vals)
    if n < 2:
        lo = hi = math.nan
    else:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n)
        lo, hi = m - half, m + half
    return {"n": n, "mean": m, "std": s, "ci_low": lo, "ci_high": hi, "confidence": confidence,
            "positive": sum(v > 0 for v in vals), "values": vals}  # fmt: skip


def paired(a: Mapping[Any, float], b: Mapping[Any, float], confidence: float = 0.95) -> dict[str, Any]:
    """:func:`t_interval` of the differences a[s] − b[s] over the seeds (keys) both have, in seed order.

    Pairing by seed is what makes the comparison fair: both arms of a seed saw the same split, devices,
    labels and initial weights, so the seed-to-seed spread cancels out of each difference.
    """
    return t_interval([a[s] - b[s] for s in sorted(set(a) & set(b))], confidence)


def ci_cell(ci: dict[str, Any], *, single: str = "n = 1", up: str = "> 0") -> str:
    """``+0.031 [-0.012, +0.074] (4/5 > 0)``: a paired difference with its interval; one value, no interval."""
    if not ci["n"]:
        return "–"
    if ci["n"] < 2:
        return f"{ci['mean']:+.3f} ({single})"
    return f"{ci['mean']:+.3f} [{ci['ci_low']:+.3f}, {ci['ci_high']:+.3f}] ({ci['positive']}/{ci['n']} {up})"


def paired_p(a: Mapping[Any, float], b: Mapping[Any, float]) -> float:
    """Two-sided one-sample t-test p-value of the paired differences a[s] − b[s] (NaN under 2 pairs)."""
    from scipy import stats

    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b)) if not math.isnan(a[s] - b[s])]
    if len(diffs) < 2:
        return math.nan
    if statistics.pstdev(diffs) == 0.0:
        return 0.0 if diffs[0] != 0 else 1.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1; NaN stays NaN)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m, out, running = len(order), [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
