"""Result tables (rich for the terminal, Markdown for report.md) and matplotlib plots.

Plots are written atomically (render to bytes, then one rename) so a crash never leaves half a PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.table import Table

from fedsd.checkpoint import atomic_write_bytes
from fedsd.metrics import ClassificationReport


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def exit_table(
    reports: Mapping[int, ClassificationReport],
    latency_s: Mapping[int, float] | None = None,
    title: str = "Per-exit results",
) -> Table:
    """Rich table: one row per exit with UAR, WA, F1, per-class recall and latency."""
    label_names = list(next(iter(reports.values())).per_class_recall) if reports else []
    t = Table(title=title)
    t.add_column("exit", justify="right")
    for col in ("UAR", "WA", "F1"):
        t.add_column(col, justify="right")
    for name in label_names:
        t.add_column(f"R[{name}]", justify="right")
    if latency_s:
        t.add_column("latency ms", justify="right")
    for k in sorted(reports):
        r = reports[k]
        row = [str(k), _fmt(r.uar), _fmt(r.wa), _fmt(r.macro_f1)]
        row += [_fmt(r.per_class_recall[n]) for n in label_names]
        if latency_s:
            row.append(_fmt(latency_s.get(k, float("nan")) * 1000, 1))
        t.add_row(*row)
    return t


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return _fmt(v) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def exit_markdown(
    reports: Mapping[int, ClassificationReport], latency_s: Mapping[int, float] | None = None
) -> str:
    header = ["exit", "UAR", "WA", "macro-F1"] + (["latency (ms)"] if latency_s else [])
    rows = []
    for k in sorted(reports):
        r = reports[k]
        row: list[object] = [k, r.uar, r.wa, r.macro_f1]
        if latency_s:
            row.append(f"{latency_s.get(k, float('nan')) * 1000:.1f}")
        rows.append(row)
    return markdown_table(header, rows)


def _save(fig: object, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_uar_vs_latency(
    series: Mapping[str, Mapping[int, tuple[float, float]]], path: str | Path, title: str = ""
) -> Path:
    """Accuracy-efficiency trade-off: one line per series, points = exits at (latency ms, UAR)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, points in series.items():
        ks = sorted(points)
        xs = [points[k][1] * 1000 for k in ks]
        ys = [points[k][0] for k in ks]
        ax.plot(xs, ys, marker="o", label=name)
        for k, x, y in zip(ks, xs, ys, strict=True):
            ax.annotate(f"exit {k}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("median latency per utterance (ms)")
    ax.set_ylabel("UAR")
    ax.set_title(title or "UAR against latency per exit")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def plot_uar_per_round(rounds: Sequence[int], uar: Mapping[int, Sequence[float]], path: str | Path) -> Path:
    """UAR of each exit over federated rounds (round 0 = before federation)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k in sorted(uar):
        ax.plot(list(rounds), list(uar[k]), marker="o", label=f"exit {k}")
    ax.set_xlabel("round")
    ax.set_ylabel("UAR (unseen speakers)")
    ax.set_title("UAR per exit per round")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_personal_per_device(
    devices: Sequence[str], series: Mapping[str, Sequence[float]], path: str | Path
) -> Path:
    """Grouped bars: personal-test UAR of every device (x) for each model (series: base model, final
    global heads, personal heads, ...); a missing value (NaN) leaves a gap."""
    plt = _pyplot()
    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(18.0, max(5.5, 0.6 * len(devices) * n ** 0.5 + 2)), 4))
    for j, (label, values) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(devices))]
        ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=label)
    many = len(devices) > 12
    ax.set_xticks(range(len(devices)), list(devices), rotation=60 if many else 0, ha="right" if many else "center",
                  fontsize=7 if many else 8)  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel("UAR on the device's personal test speech")
    ax.set_title("Personal-test UAR per device (at its exit)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_epsilon_per_round(
    rounds: Sequence[int],
    per_device: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    delta: float,
    budget: float | None = None,
) -> Path:
    """Cumulative ε of every device over the rounds (the privacy each device has spent so far)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    from matplotlib.ticker import MaxNLocator

    for name, values in per_device.items():  # round 0: nothing spent yet
        label = name if len(per_device) <= 10 else None
        ax.plot([0, *rounds], [0.0, *values], marker="o", ms=3, lw=1, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    if budget is not None:
        ax.axhline(budget, color="red", ls="--", lw=1, label=f"budget ε = {budget:g}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"cumulative ε (δ = {delta:g})")
    ax.set_title("Privacy spent per device")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_confusion(
    report: ClassificationReport, label_names: Sequence[str], path: str | Path, title: str
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    cm = report.confusion
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_learning_curves(
    history: Sequence[Mapping[str, object]], exits: Sequence[int], path: str | Path
) -> Path:
    """Training loss per epoch (left) and validation UAR per exit per epoch (right), best epoch marked.

    Why: a single "best epoch" number hides a collapse (a model that learned once, then predicted one
    class); the curves show it at a glance.
    """
    plt = _pyplot()
    fig, (ax_loss, ax_uar) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [int(r["epoch"]) for r in history]  # type: ignore[call-overload]
    curves = [("train/total", "total")] + [(f"train/loss/{k}", f"exit {k}") for k in exits]
    for key, label in curves:
        values = [r.get(key) for r in history]
        if any(isinstance(v, (int, float)) for v in values):
            ax_loss.plot(epochs, [float(v) if v is not None else math.nan for v in values], marker=".", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean per batch)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    for k in exits:
        values = [r.get(f"valid/exit{k}/uar") for r in history]
        if any(isinstance(v, (int, float)) for v in values):
            ax_uar.plot(epochs, [float(v) if v is not None else math.nan for v in values], marker="o", label=f"exit {k}")
    if history:
        best = int(history[-1].get("best_epoch", -1))  # type: ignore[call-overload]
        if best > 0:
            ax_uar.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"selected (epoch {best})")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_uar):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_uar.set_xlabel("epoch")
    ax_uar.set_ylabel("validation UAR")
    ax_uar.grid(alpha=0.3)
    ax_uar.legend(fontsize=8)
    fig.suptitle("Learning curves")
    return _save(fig, path)
