"""report.md and plots of a federated run: UAR per exit per round, and UAR against exit latency."""

from __future__ import annotations

import math
import re
import statistics
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
    from fedsd.training.central import measure_exit_latency

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


_PERSONAL_KEY = re.compile(r"exit([0-9]{1,6})/personal-(uar|wa|f1)-([a-z]{1,16})", re.ASCII)


def summarize_personal(device_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over devices of their personal-test metrics, per tag (before, after, global, personal),
    exit and metric: ``{tag: {"<exit>": {"uar": {"mean", "std", "n"}, ...}}}``.

    Devices are untrusted: only ``exit<k>/personal-<metric>-<tag>`` keys with a finite value in [0, 1]
    count. ``std`` is the sample standard deviation (0 for a single device).
    """
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for m in device_metrics:
        for key, value in m.items():
            match = _PERSONAL_KEY.fullmatch(str(key))
            v = _number(value)
            if match is None or not 0.0 <= v <= 1.0:
                continue
            k, metric, tag = match.groups()
            values.setdefault(tag, {}).setdefault(str(int(k)), {}).setdefault(metric, []).append(v)
    out: dict[str, Any] = {}
    for tag, exits in sorted(values.items()):
        out[tag] = {}
        for k, metrics in sorted(exits.items(), key=lambda kv: int(kv[0])):
            out[tag][k] = {
                metric: {
                    "mean": statistics.fmean(vs),
                    "std": statistics.stdev(vs) if len(vs) > 1 else 0.0,
                    "n": len(vs),
                }
                for metric, vs in sorted(metrics.items())
            }
    return out


def personal_flat(summary: dict[str, Any]) -> dict[str, float]:
    """``exit<k>/personal-<metric>-<tag>`` (mean) and ``...-std`` beside the global ``exit<k>/uar``."""
    out: dict[str, float] = {}
    for tag, exits in summary.items():
        for k, metrics in exits.items():
            for metric, s in metrics.items():
                out[f"exit{k}/personal-{metric}-{tag}"] = float(s["mean"])
                out[f"exit{k}/personal-{metric}-{tag}-std"] = float(s["std"])
    return out


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
    if any(f"exit{k}/uar" in history[-1] for k in exits):
        lines += uar_section(history, rounds, exits, run_dir)
        lines += latency_section(history, rounds, model, run_dir)
    lines += personal_section(history, exits, run_dir)
    lines += devices_section(history)
    lines += privacy_section(history, run_dir)
    path = atomic_write_text(run_dir / "report.md", "\n".join(lines))
    log(f"report: {path}")
    return path


def uar_section(
    history: Sequence[dict[str, Any]], rounds: list[int], exits: list[int], run_dir: Path
) -> list[str]:
    """Markdown (and uar_per_round.png): UAR per exit per round on unseen speakers, and on the server
    pool's validation speakers when the run measured them."""
    lines = ["## UAR on unseen speakers per round\n"]
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
    if any(f"exit{k}/valid-uar" in h for h in history for k in exits):
        lines.append("## UAR on the server's validation speakers per round\n")
        lines.append(
            "The server pool's held-out speakers (they chose the base model's epoch; never trained on): "
            "the speech to choose federated settings on, unlike the unseen test speakers above.\n"
        )
        valid = [[r] + [float(h.get(f"exit{k}/valid-uar", math.nan)) for k in exits]
                 for r, h in zip(rounds, history, strict=True)]  # fmt: skip
        lines.append(markdown_table(["round"] + [f"exit {k}" for k in exits], valid))
    return lines


def latency_section(
    history: Sequence[dict[str, Any]], rounds: list[int], model: MultiExitSER, run_dir: Path
) -> list[str]:
    """Markdown (and uar_vs_latency.png): each exit's latency on this machine beside its UAR in the
    first and the last round."""
    exits = list(model.exits)
    crop = (model.meta.get("crop") or {}).get("max_seconds") or 4.0
    lat = exit_latency_s(model, float(crop))
    first, last = history[0], history[-1]
    series = {
        f"round {rounds[0]}": {k: (_uar(first, k), lat[k]) for k in exits},
        f"round {rounds[-1]}": {k: (_uar(last, k), lat[k]) for k in exits},
    }
    plot_uar_vs_latency(series, run_dir / "uar_vs_latency.png", "UAR against exit latency, before/after")
    lines = ["## Accuracy against latency\n"]
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
    return lines


DEVICE_HEADER = [
    "device", "exit", "training utterances", "labelled", "personal test", "personal-test UAR before",
    "personal-test UAR after", "training-set UAR before", "training-set UAR after", "seconds",
]  # fmt: skip


def _device_row(name: str, m: dict[str, Any]) -> list[Any]:
    """One device's line of the last train round (its metrics are untrusted: numbers only)."""

    def mean_of(suffix: str) -> float:
        # an exit without evaluated utterances has no UAR: skipped
        return nanmean([_number(v) for key, v in m.items() if str(key).endswith(suffix)])

    return [
        name,
        _whole(m.get("exit"), -1),
        _whole(m.get("n-utterances"), 0),
        _whole(m.get("n-labelled"), 0),
        _whole(m.get("n-personal-test"), 0),
        mean_of("/personal-uar-before"),
        mean_of("/personal-uar-after"),
        mean_of("/train-uar-before"),
        mean_of("/train-uar-after"),
        f"{_number(m.get('seconds')):.1f}",
    ]


def devices_section(history: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown: the devices of the last train round, and every rejected update of the run."""
    clients = [h["train"] for h in history if "train" in h]
    if not clients:
        return []
    names = device_names(history)
    rows = [
        _device_row(names.get(str(c["node_id"]), str(c["node_id"])), c["metrics"])
        for c in clients[-1]["clients"]
    ]
    lines = ["## Devices, last round\n", markdown_table(DEVICE_HEADER, rows)]
    lines.append(
        "UAR averaged over the device's exits. *Personal test*: the device's own held-out utterances "
        "(never trained on), with the global heads it received (before) and after its local training "
        "this round (after). *Training-set UAR*: on the labelled utterances it trains on.\n"
    )
    rejected = [(h["round"], r) for h in clients for r in h.get("rejections", [])]
    lines.append("## Rejected updates\n")
    if rejected:
        lines += [
            f"- round {rnd}: device {names.get(str(r.get('node_id')), r.get('node_id'))}: {r.get('reason')}"
            for rnd, r in rejected
        ]
        lines.append("")
    else:
        lines.append("None.\n")
    return lines


def device_names(history: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Node id (as a string) → the device's name (its partition's client id), from every round."""
    names: dict[str, str] = {}
    for h in history:
        for node, info in (h.get("devices") or {}).items():
            if isinstance(info, dict) and isinstance(info.get("name"), str):
                names[str(node)] = info["name"]
        for node, name in (h.get("device_names") or {}).items():
            names[str(node)] = str(name)
    return names


def _pm(summary: dict[str, Any], tag: str, k: int) -> str:
    s = ((summary.get(tag) or {}).get(str(k)) or {}).get("uar")
    if not s:
        return "–"
    return f"{s['mean']:.3f} ± {s['std']:.3f} (n={s['n']})"


def personal_per_device(history: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per device (by name), personal-test UAR at its own exit: ``start`` (the global heads it first
    received), ``adapted`` (after its last local training), ``global`` (final global heads) and
    ``personal`` (its personal heads), where reported."""
    names = device_names(history)
    out: dict[str, dict[str, float]] = {}
    exit_of: dict[str, int] = {}

    def put(node: Any, metrics: dict[str, Any], fields: dict[str, str], first: bool) -> None:
        name = names.get(str(node), str(node))
        k = _whole(metrics.get("exit"), exit_of.get(name, -1))
        exit_of[name] = k
        row = out.setdefault(name, {})
        row["exit"] = float(k)
        for field, tag in fields.items():
            v = _number(metrics.get(f"exit{k}/personal-uar-{tag}"))
            if math.isfinite(v) and not (first and field in row):
                row[field] = v

    for h in history:
        for c in (h.get("train") or {}).get("clients", []):
            put(c.get("node_id"), c.get("metrics") or {}, {"start": "before"}, True)
            put(c.get("node_id"), c.get("metrics") or {}, {"adapted": "after"}, False)
    final = (history[-1].get("final") or {}).get("devices", {}) if history else {}
    for node, d in final.items():
        put(node, d.get("metrics") or {}, {"global": "global", "personal": "personal"}, False)
    return {n: v for n, v in sorted(out.items()) if len(v) > 1}


def personal_section(
    history: Sequence[dict[str, Any]], exits: Sequence[int], run_dir: Path | None = None
) -> list[str]:
    """Markdown (and personal_uar_per_device.png): the devices' personal test speech, mean ± std over
    devices per exit, beside the global UAR on unseen speakers."""
    trained = [h for h in history if h.get("personal")]
    final = (history[-1].get("final") or {}).get("personal", {}) if history else {}
    if not trained and not final:
        return []
    first = trained[0]["personal"] if trained else {}
    last = trained[-1]["personal"] if trained else {}
    lines = ["## Personal test speech (each device's own held-out utterances)\n"]
    lines.append(
        "Each device keeps a labelled part of its own utterances that it never trains on and the server "
        "never sees. UAR on it, mean ± std over the devices that run the exit (n), beside the global UAR "
        "on unseen speakers. *Base model*: the global heads devices received in round 1; *final global*: "
        "the heads every device ends with; *after local training*: each device's heads after its last "
        "round of local training; *personal heads*: a private copy fine-tuned on the device after the "
        "last round (never sent).\n"
    )
    header = [
        "exit", f"global UAR, unseen speakers (round {history[0].get('round')} → {history[-1].get('round')})",
        "personal: base model", "personal: final global", "personal: after local training",
        "personal: personal heads",
    ]  # fmt: skip
    rows = []
    for k in exits:
        cells = [
            _pm(first, "before", k),
            _pm(final, "global", k),
            _pm(last, "after", k),
            _pm(final, "personal", k),
        ]
        if all(c == "–" for c in cells):
            continue
        rows.append([k, f"{_uar(history[0], k):.3f} → {_uar(history[-1], k):.3f}", *cells])
    if rows:
        lines.append(markdown_table(header, rows))
    per_device = personal_per_device(history)
    if per_device and run_dir is not None:
        from fedsd.report import plot_personal_per_device

        labels = {"start": "base model", "global": "final global heads", "adapted": "after local training",
                  "personal": "personal heads"}  # fmt: skip
        series = {
            label: [per_device[d].get(field, math.nan) for d in per_device]
            for field, label in labels.items()
            if any(field in v for v in per_device.values())
        }
        ticks = [f"{d}\nexit {int(v['exit'])}" for d, v in per_device.items()]
        plot_personal_per_device(ticks, series, run_dir / "personal_uar_per_device.png")
        lines.append(
            "![Personal-test UAR per device](personal_uar_per_device.png)\n\nPer device at its own exit.\n"
        )
    return lines


def privacy_section(history: Sequence[dict[str, Any]], run_dir: Path | None = None) -> list[str]:
    """Markdown: cumulative ε of every device per round (and the server's client-level ε), if any."""
    recs = [h for h in history if h.get("privacy")]
    if not recs:
        return []
    devices = sorted({n for h in recs for n in h["privacy"].get("device_epsilon", {})}, key=int)
    central = any("central" in h["privacy"] for h in recs)
    lines = ["## Privacy\n"]
    delta = math.nan
    if devices:
        delta = max(float(h["privacy"].get("delta", math.nan)) for h in recs)
        lines.append(
            f"Sample-level DP on the devices (Opacus DP-SGD on the heads): cumulative ε at δ = {delta:g} "
            "as each device reported it (a device that skipped a round keeps its last value).\n"
        )
    names = device_names(history)
    lines.append(_epsilon_table(recs, devices, central, names))
    notes = [
        h["privacy"]["central"].get("epsilon_note")
        for h in recs
        if isinstance(h["privacy"].get("central"), dict)
    ]
    if any(isinstance(n, str) for n in notes):
        lines.append(f"Central ε is ∞: {[n for n in notes if isinstance(n, str)][-1]}.\n")
    if devices and run_dir is not None:
        _plot_epsilons(recs, devices, names, delta, run_dir)
        lines.append("![ε per round](epsilon_per_round.png)\n")
    stopped = sorted({n for h in recs for n in h["privacy"].get("budget_stopped", [])})
    if stopped:
        shown = ", ".join(names.get(str(n), str(n)) for n in stopped)
        lines.append(f"Devices that stopped training at their ε budget: {shown}.\n")
    return lines


def _epsilon_table(
    recs: Sequence[dict[str, Any]], devices: list[str], central: bool, names: dict[str, str]
) -> str:
    """Round, max ε and each device's ε (sample-level), and the central ε, as a markdown table."""
    header = ["round"] + (["max ε"] + [names.get(n, f"device {n}") for n in devices] if devices else [])
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
    return markdown_table(header, rows)


def _plot_epsilons(
    recs: Sequence[dict[str, Any]], devices: list[str], names: dict[str, str], delta: float, run_dir: Path
) -> None:
    """epsilon_per_round.png: each device's cumulative ε per round, with the largest ε budget any
    device reported."""
    per_device = {
        names.get(n, f"device {n}"): [
            float(h["privacy"].get("device_epsilon", {}).get(n, math.nan)) for h in recs
        ]
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
