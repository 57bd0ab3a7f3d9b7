"""report.md and plots of a federated run: UAR per exit per round, and UAR against exit latency."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsd.checkpoint import atomic_write_text
from fedsd.config import ExperimentConfig
from fedsd.metrics import nanmean
from fedsd.model.multiexit import MultiExitSER
from fedsd.report import markdown_table, plot_epsilon_per_round, plot_uar_per_round, plot_uar_vs_latency


def exit_latency_s(model: MultiExitSER, seconds: float, repeats: int = 5) -> dict[int, float]:
    """Median per-utterance latency of each exit on this machine (latency depends on length only)."""
    from fedsd.train import measure_exit_latency

    n = int(seconds * int(model.meta.get("sample_rate", 16000)))
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=g) for _ in range(repeats)]
    return measure_exit_latency(model, waves)


def _number(value: Any, default: float = math.nan) -> float:
    """A device-reported metric as a float: devices are untrusted (a list or a string reads as ``default``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return default
    return float(value)


def _whole(value: Any, default: int) -> int:
    number = _number(value)
    return int(number) if math.isfinite(number) else default


def _uar(rec: dict[str, Any], k: int) -> float:
    return float(rec.get(f"exit{k}/uar", float("nan")))


def write_report(
    run_dir: Path,
    history: Sequence[dict[str, Any]],
    model: MultiExitSER,
    cfg: ExperimentConfig,
    log: Callable[[str], None] = print,
) -> Path:
    """Write report.md, uar_per_round.png and uar_vs_latency.png into ``run_dir``."""
    exits = list(model.exits)
    rounds = [int(r["round"]) for r in history]
    lines = [f"# Federated self-distillation: {cfg.name}\n"]
    fc = cfg.federated
    lines.append(
        f"{len(rounds) - 1 if rounds and rounds[0] == 0 else len(rounds)} rounds, devices trained heads "
        f"`{fc.train_exits}` their exit with teacher `{fc.teacher}`, mode `{fc.mode}`, "
        f"{fc.local_epochs} local epochs, aggregation `{fc.aggregation}`.\n"
    )
    if not history:
        lines.append("No round completed.\n")
        return atomic_write_text(run_dir / "report.md", "\n".join(lines))
    has_eval = any(f"exit{k}/uar" in history[-1] for k in exits)
    if has_eval:
        lines.append("## UAR on unseen speakers per round\n")
        lines.append(
            markdown_table(
                ["round"] + [f"exit {k}" for k in exits],
                [[r] + [_uar(h, k) for k in exits] for r, h in zip(rounds, history, strict=True)],
            )
        )
        plot_uar_per_round(
            rounds, {k: [_uar(h, k) for h in history] for k in exits}, run_dir / "uar_per_round.png"
        )
        lines.append("![UAR per round](uar_per_round.png)\n")
        crop = (model.meta.get("crop") or {}).get("max_seconds") or 4.0
        lat = exit_latency_s(model, float(crop))
        first, last = history[0], history[-1]
        series = {
            f"round {rounds[0]}": {k: (_uar(first, k), lat[k]) for k in exits},
            f"round {rounds[-1]}": {k: (_uar(last, k), lat[k]) for k in exits},
        }
        plot_uar_vs_latency(series, run_dir / "uar_vs_latency.png", "UAR against exit latency, before/after")
        lines.append("## Accuracy against latency\n")
        rows = [
            [k, f"{lat[k] * 1000:.1f}", _uar(first, k), _uar(last, k), _uar(last, k) - _uar(first, k)]
            for k in exits
        ]
        lines.append(
            markdown_table(
                ["exit", "latency (ms)", f"UAR round {rounds[0]}", f"UAR round {rounds[-1]}", "Δ"], rows
            )
        )
        lines.append(f"Latency: median of batch-1 forwards of {crop:.1f} s of audio on the server.\n")
        lines.append("![UAR against latency](uar_vs_latency.png)\n")
    clients = [h["train"] for h in history if "train" in h]
    if clients:
        lines.append("## Devices, last round\n")
        last = clients[-1]
        rows = []
        for c in last["clients"]:
            m = c["metrics"]
            ex = _whole(m.get("exit"), -1)
            before = [_number(v) for key, v in m.items() if key.endswith("/uar-before")]
            after = [_number(v) for key, v in m.items() if key.endswith("/uar-after")]
            rows.append(
                [
                    c["node_id"],
                    ex,
                    _whole(m.get("n-utterances"), 0),
                    _whole(m.get("n-labelled"), 0),
                    nanmean(before),  # an exit without evaluated utterances has no UAR: skipped
                    nanmean(after),
                    f"{_number(m.get('seconds')):.1f}",
                ]
            )
        lines.append(
            markdown_table(
                [
                    "device",
                    "exit",
                    "utterances",
                    "labelled",
                    "local UAR before",
                    "local UAR after",
                    "seconds",
                ],
                rows,
            )
        )
        rejected = [(h["round"], r) for h in clients for r in h.get("rejections", [])]
        lines.append("## Rejected updates\n")
        if rejected:
            lines += [f"- round {rnd}: device {r.get('node_id')}: {r.get('reason')}" for rnd, r in rejected]
            lines.append("")
        else:
            lines.append("None.\n")
    lines += privacy_section(history, run_dir)
    path = atomic_write_text(run_dir / "report.md", "\n".join(lines))
    log(f"report: {path}")
    return path


def privacy_section(history: Sequence[dict[str, Any]], run_dir: Path | None = None) -> list[str]:
    """Markdown: cumulative ε of every device per round (and the server's client-level ε), if any."""
    recs = [h for h in history if h.get("privacy")]
    if not recs:
        return []
    devices = sorted({n for h in recs for n in h["privacy"].get("device_epsilon", {})}, key=int)
    central = any("central" in h["privacy"] for h in recs)
    lines = ["## Privacy\n"]
    if devices:
        delta = max(float(h["privacy"].get("delta", math.nan)) for h in recs)
        lines.append(
            f"Sample-level DP on the devices (Opacus DP-SGD on the heads): cumulative ε at δ = {delta:g} "
            "as each device reported it (a device that skipped a round keeps its last value).\n"
        )
    header = ["round"] + (["max ε"] + [f"device {n}" for n in devices] if devices else [])
    header += ["central ε (client-level)"] if central else []
    rows = []
    for h in recs:
        p = h["privacy"]
        row: list[Any] = [h["round"]]
        if devices:
            eps = p.get("device_epsilon", {})
            row += [p.get("max_epsilon", math.nan)] + [eps.get(n, math.nan) for n in devices]
        if central:
            row.append(p.get("central", {}).get("epsilon", math.nan))
        rows.append(row)
    lines.append(markdown_table(header, rows))
    if devices and run_dir is not None:
        per_device = {
            f"device {n}": [float(h["privacy"].get("device_epsilon", {}).get(n, math.nan)) for h in recs]
            for n in devices
        }
        budgets = [
            _number(c["metrics"].get("dp-epsilon-budget"))
            for h in recs
            for c in h.get("train", {}).get("clients", [])
        ]
        budget = max((b for b in budgets if math.isfinite(b)), default=None)
        plot_epsilon_per_round(
            [int(h["round"]) for h in recs],
            per_device,
            run_dir / "epsilon_per_round.png",
            delta=delta,
            budget=budget,
        )
        lines.append("![ε per round](epsilon_per_round.png)\n")
    stopped = sorted({n for h in recs for n in h["privacy"].get("budget_stopped", [])})
    if stopped:
        lines.append(f"Devices that stopped training at their ε budget: {', '.join(map(str, stopped))}.\n")
    return lines
