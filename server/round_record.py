"""Pieces of a round's metrics.jsonl line that the devices report: privacy (ε) and personal-test metrics,
and the one log line a round ends with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def privacy_record(report: Any, device_epsilon: dict[int, float], dp: Any) -> dict[str, Any]:
    """ε per device (cumulative, as each reported) and the maximum; central DP's ε when on.

    ``device_epsilon`` (node id → latest ε) is updated from the round's accepted replies: devices keep
    their value between rounds they skip. ``dp`` is the config's ``federated.dp`` (its δ when no
    device reported one)."""
    out: dict[str, Any] = {}
    for c in report.clients:
        eps = c.metrics.get("dp-epsilon")
        if isinstance(eps, int | float) and not isinstance(eps, bool):  # a device could send a list
            device_epsilon[int(c.node_id)] = float(eps)
    stopped = [r.node_id for r in report.rejections if "privacy budget reached" in r.reason]
    if device_epsilon:
        out["device_epsilon"] = {str(n): e for n, e in sorted(device_epsilon.items())}
        out["max_epsilon"] = max(device_epsilon.values())
        deltas = [c.metrics.get("dp-delta") for c in report.clients]
        out["delta"] = max(
            [float(d) for d in deltas if isinstance(d, int | float) and not isinstance(d, bool)]
            or [dp.delta if dp else float("nan")]
        )
    if stopped:
        out["budget_stopped"] = sorted(stopped)
    if report.central_dp is not None:
        out["central"] = report.central_dp
    return out


def personal_record(device_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Devices' personal-test metrics, mean ± std over devices per exit: ``personal`` (nested) and
    flat ``exit<k>/personal-<metric>-<tag>[-std]`` keys beside the global ``exit<k>/uar``."""
    from fedsd.server.report import personal_flat, summarize_personal

    summary = summarize_personal(device_metrics)
    return {"personal": summary} | personal_flat(summary) if summary else {}


def round_line(rec: dict[str, Any], rnd: int, rounds: int, exits: Sequence[int]) -> str:
    """``round R/N: UAR on unseen speakers — ...``, with the validation speakers' UAR and ε when known."""
    uars = ", ".join(f"exit {k}: {rec.get(f'exit{k}/uar', float('nan')):.3f}" for k in exits)
    valid = [rec[f"exit{k}/valid-uar"] for k in exits if f"exit{k}/valid-uar" in rec]
    if valid:
        uars += "; validation speakers: " + "/".join(f"{v:.3f}" for v in valid)
    privacy = rec.get("privacy", {})
    if "max_epsilon" in privacy:
        uars += f"; device DP: max ε {privacy['max_epsilon']:.2f} (δ = {privacy['delta']:g})"
    if "central" in privacy:
        uars += f"; central DP: ε {privacy['central']['epsilon']:.2f}"
    return f"round {rnd}/{rounds}: UAR on unseen speakers — {uars}"
