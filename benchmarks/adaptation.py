"""Federated on-device adaptation: does self-distillation on unlabelled speech lift the shallow exits?

The recipe of ``configs/scratch.yaml`` (synthetic corpus, tiny backbone, its central base model trained on
the server pool; 8 simulated devices with exits 1/2/3 round-robin, the deep exit 4 the frozen teacher;
its rounds × local epochs), Flower's Message API over the in-process grid (no Ray). Per label fraction
and seed it measures, per exit, SD against CE only:

    unseen speakers    global UAR of the final global heads on the unseen test speakers (and of the
                       base model, round 0)
    personal test,     each device's own held-out speech (``federated.personal_test_fraction`` of its
      global heads     utterances, stratified, never trained on); mean over the devices that run the
                       exit, for the base model's heads (round 1 "before") and the final global heads
    personal test,     the same speech after each device fine-tuned a private copy of the final global
      personal heads   heads on its own training speech (``federated.personalize_epochs``, the recipe's
                       value = its local_epochs; chosen without looking at test or personal-test speech)

    base model         the central model before federation (round 0)
    CE only            federated, cross-entropy on the devices' labelled utterances (its personal heads
                       are the "FedAvg + fine-tune" baseline)
    self-dist.         federated, CE on labelled + KD from the frozen deep exit + feature loss on all
    local-only CE/SD   no federation (``federated.rounds: 0``): each device fine-tunes the base model's
                       heads on its own speech alone, as many epochs as a federated device trains in all

Speaker folds (``--folds K``): the test speakers rotate over K disjoint groups, each fold with its own
server pool and base model; every difference is paired over (fold, seed). A short list of comparisons is
stated before the runs (:data:`PRESTATED`: exit 2, 10 % labels, personal held-out speech) and
Holm-adjusted; every other difference printed is exploratory.

and the paired differences over seeds with 95 % Student-t intervals (``common.paired``): SD − CE,
personal − global heads, federated − base model. The premise of distillation (the base model's teacher
beats each shallow exit on the unseen speakers) is checked and printed first.

Paired design. ``make_partition`` draws test and server speakers from ``federated.seed`` too, so a plain
seed change would move the test set and the base model's training pool. Instead the speaker split is
drawn once (``--speaker-seed``), the base model is trained once on its server pool, and each seed
re-partitions only the remaining device speakers: which speakers share a device, which utterances are
labelled (nested: the 5 % set lies inside the 10 % one, inside the 20 % one), which are the devices'
personal test speech (the same at every fraction) and the local training seed (``federated.seed``).
Every run of a seed sees the same devices, labels and personal test speech, every run sees the same
test speakers and base model, and the feature cache (same backbone, same files) is shared by all runs.

Reproduce (the recipe is configs/scratch.yaml; every size defaults to its value. The first run generates
the corpus and trains the base model; the federated runs reuse cached features):

    .venv/bin/python benchmarks/adaptation.py --seeds 0 1 2 --fractions 0.1 --threads 1
    .venv/bin/python benchmarks/adaptation.py --folds 3 --seeds 0 1 2 --fractions 0.1 --threads 1  # issue 22
    .venv/bin/python benchmarks/adaptation.py                      # 5 seeds × 5 %, 10 %, 20 % (issue 10)
    .venv/bin/python benchmarks/adaptation.py --ablations          # SD loss ablations at 10 % labels
    .venv/bin/python benchmarks/adaptation.py --speakers 8 --sentences 2 --clients 2 --test-speakers 2 \
        --server-speakers 2 --base-epochs 1 --rounds 1 --local-epochs 1 --seeds 0 --fractions 0.5   # tiny

Writes ``benchmarks/results/adaptation.json`` + ``adaptation.png`` (``adaptation.ablations.*`` with
``--ablations``) with provenance (benchmarks/common/); corpus, base model, runs and feature cache live
in the work directory (default ``runs/bench/<code version>/federated``, shared with privacy.py and
robustness.py), reused only by the same code.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)
from common import NAN, cell, mean_std, personal_results  # noqa: E402

METHOD_NAMES = {"before": "before (base model)", "ce": "CE only", "sd": "self-distillation"}

# The two methods of the main table and the ablations (``--ablations``, pick with ``--variants``):
# key → (row name, device loss mode, config overrides, label fraction or None = the run's fraction).
Variant = tuple[str, str, dict[str, Any], float | None]
LOCAL_ONLY = {"federated.rounds": 0}
"""No federation (:class:`fedsd.config.FederatedConfig` ``rounds`` 0): each device fine-tunes the base model's
heads on its own speech only, for as many epochs as a federated device trains in all (rounds × local
epochs + personalization epochs: :func:`resolve_variant`)."""
MAIN: dict[str, Variant] = {
    "ce": ("CE only", "ce", {}, None),
    "sd": ("self-distillation", "sd", {}, None),
    "local-ce": ("local-only, CE", "ce", LOCAL_ONLY, None),
    "local-sd": ("local-only, SD", "sd", LOCAL_ONLY, None),
}
PL_THRESHOLDS = (0.5, 0.7, 0.9)
PSEUDO: dict[str, Variant] = {
    f"pl{t:g}": (f"pseudo-labels, τ = {t:g}", "pl", {"federated.distill.pl_threshold": t}, None)
    for t in PL_THRESHOLDS
}
"""The pseudo-label arm at each candidate threshold; the table's ``pl`` row is the one whose global heads
score best on the validation speakers at exit :data:`PRESTATED_EXIT` (:func:`choose_on_validation`)."""
PRESTATED_EXIT = 2
PRESTATED_FRACTION = 0.1
PRESTATED: list[tuple[str, tuple[str, str], tuple[str, str]]] = [
    ("SD personal heads − local-only SD", ("sd", "ppersonal"), ("local-sd", "ppersonal")),
    ("SD personal heads − local-only CE", ("sd", "ppersonal"), ("local-ce", "ppersonal")),
    ("SD personal heads − FedAvg + fine-tune (CE personal heads)", ("sd", "ppersonal"), ("ce", "ppersonal")),
    ("SD global heads − CE global heads", ("sd", "pglobal"), ("ce", "pglobal")),
    ("SD personal heads − pseudo-labels (τ chosen on validation)", ("sd", "ppersonal"), ("pl", "ppersonal")),
]
"""The comparisons stated before the runs (issue 22): a device at exit 2 with 10 % labels, on its own
held-out speech, paired over folds × seeds, two-sided t-tests Holm-adjusted over this list. Every other
difference in the tables is exploratory."""
ABLATIONS: dict[str, Variant] = {
    "ce": ("CE only", "ce", {}, None),
    "sd": ("SD (default: w_ce = w_kd = w_feat = 1, T = 2)", "sd", {}, None),
    "sd-nofeat": ("SD, no feature term (w_feat = 0)", "sd", {"federated.distill.w_feat": 0.0}, None),
    "sd-kdonly": (
        "SD, KD only (w_ce = w_feat = 0)",
        "sd",
        {"federated.distill.w_ce": 0.0, "federated.distill.w_feat": 0.0},
        None,
    ),
    "sd-wkd0.25": ("SD, w_kd = 0.25", "sd", {"federated.distill.w_kd": 0.25}, None),
    "sd-T1": ("SD, T = 1", "sd", {"federated.distill.temperature": 1.0}, None),
    "sd-T4": ("SD, T = 4", "sd", {"federated.distill.temperature": 4.0}, None),
    "sd-lr3e-4": ("SD, lr 3e-4", "sd", {"federated.lr": 3e-4}, None),
    "ce-lr3e-4": ("CE only, lr 3e-4", "ce", {"federated.lr": 3e-4}, None),
    "sd-1ep": ("SD, 1 local epoch", "sd", {"federated.local_epochs": 1}, None),
    "sd-prox0.1": ("SD, proximal μ = 0.1", "sd", {"federated.proximal_mu": 0.1}, None),
    "sd-prox1": ("SD, proximal μ = 1", "sd", {"federated.proximal_mu": 1.0}, None),
    "sd-slr0.5": ("SD, server lr 0.5", "sd", {"federated.server_lr": 0.5}, None),
    "ce-prox1": ("CE only, proximal μ = 1", "ce", {"federated.proximal_mu": 1.0}, None),
    "ce-slr0.5": ("CE only, server lr 0.5", "ce", {"federated.server_lr": 0.5}, None),
    "ce-1ep": ("CE only, 1 local epoch", "ce", {"federated.local_epochs": 1}, None),
    "ce-oracle": ("CE only, 100 % labels (oracle)", "ce", {}, 1.0),
}


# ---------------------------------------------------------------------------------------- runs
def teacher_quality(base: Path, split: Any, rows_all: list, root: Path, cache: Path) -> dict[str, Any]:
    """Base-model UAR per exit on the test speakers and on all device utterances (with every label)."""
    from fedsd.data.dataset import rows_by_ids
    from fedsd.model.multiexit import MultiExitSER
    from fedsd.training.cached import evaluate_cached, head_outputs, model_crop
    from fedsd.training.features import FeatureCache

    model = MultiExitSER.from_pretrained(base)
    fc = FeatureCache(cache, model, model_crop(model))
    out: dict[str, Any] = {}
    device_ids = [u for c in split.clients for u in c.utt_ids]
    for name, ids in (("test speakers", split.test_utt_ids), ("device speakers", device_ids)):
        rows = rows_by_ids(rows_all, ids)
        feats = fc.get(rows, root, model.exits, label_names=model.label_names)
        reports = evaluate_cached(model, feats, model.exits)
        out[name] = {str(k): r.uar for k, r in reports.items()}
        # how often each shallow exit already agrees with the teacher (what KD can still change)
        with torch.no_grad():
            logits = head_outputs(model, feats, model.exits, list(range(len(rows))))
        teacher = logits[model.exits[-1]].logits.argmax(-1)
        out[f"{name}: agreement with teacher"] = {
            str(k): float((logits[k].logits.argmax(-1) == teacher).float().mean()) for k in model.exits[:-1]
        }
    return out


def premise(quality: dict[str, Any]) -> dict[str, Any]:
    """Distillation's premise on the unseen speakers: the base model's teacher beats each shallow exit."""
    uar = quality["test speakers"]
    exits = sorted(uar, key=int)
    teacher = exits[-1]
    gaps = {k: uar[teacher] - uar[k] for k in exits[:-1]}
    holds = {k: g > 0 for k, g in gaps.items()}
    text = (
        f"premise (base model, unseen test speakers): teacher exit {teacher} UAR {uar[teacher]:.3f} vs "
        + ", ".join(f"exit {k} {uar[k]:.3f} (gap {g:+.3f})" for k, g in gaps.items())
        + (
            " — holds: the teacher is better than every shallow exit"
            if all(holds.values())
            else " — DOES NOT HOLD at exit(s) "
            + ", ".join(k for k, h in holds.items() if not h)
            + ": the teacher is not better there, so there is nothing (or less than nothing) to distil"
        )
    )
    return {"teacher_exit": int(teacher), "uar": uar, "gap": gaps, "holds": holds,
            "holds_all": all(holds.values()), "text": text}  # fmt: skip


# ---------------------------------------------------------------------------------------- report
MEASURES = {
    "unseen": "unseen test speakers",
    "valid": "validation speakers (server pool)",
    "pglobal": "personal test, global heads",
    "ppersonal": "personal test, personal heads",
}


def measures(runs: list[dict[str, Any]]) -> dict[str, str]:
    """:data:`MEASURES`, without validation speakers where no run has them (no server pool to hold them)."""
    has_valid = any(r.get("valid_after") for r in runs)
    return {m: where for m, where in MEASURES.items() if m != "valid" or has_valid}


def resolve_variant(variant: Variant, fc: Any) -> Variant:
    """A local-only variant gets the epochs a federated device trains in all (compute-matched)."""
    name, mode, extra, frac = variant
    if extra.get("federated.rounds") == 0 and "federated.personalize_epochs" not in extra:
        epochs = fc.rounds * fc.local_epochs + fc.personalize_epochs
        extra = extra | {"federated.personalize_epochs": epochs}
    return name, mode, extra, frac


def choose_on_validation(runs: list[dict[str, Any]], fraction: float) -> tuple[str | None, dict[str, float]]:
    """The pseudo-label threshold whose global heads have the best mean validation-speaker UAR at exit
    :data:`PRESTATED_EXIT` over folds and seeds (never test or personal-test speech); its runs are copied
    under the key ``pl``. Returns the chosen key and every candidate's score."""
    scores = {
        key: statistics.mean(v) if (v := [x for x in values(runs, fraction, key, "valid", PRESTATED_EXIT).values()
                                         if not math.isnan(x)]) else NAN
        for key in PSEUDO
    }  # fmt: skip
    known = {k: v for k, v in scores.items() if not math.isnan(v)}
    if not known:
        return None, scores
    best = max(known, key=lambda k: (known[k], k))
    runs += [
        r | {"key": "pl", "chosen_from": best} for r in runs if r["key"] == best and r["fraction"] == fraction
    ]
    return best, scores


def values(
    runs: list[dict[str, Any]], f: float, key: str, measure: str, k: int
) -> dict[tuple[int, int], float]:
    """(fold, seed) → one run's value (``measure`` of variant ``key`` at exit ``k``); 'base' = the base
    model (taken from the runs that have round 1: a local-only run has no federated round)."""
    out: dict[tuple[int, int], float] = {}
    for r in runs:
        if r["fraction"] != f or (key != "base" and r["key"] != key):
            continue
        if key == "base" and r.get("local_only") and measure != "unseen":
            continue
        if measure == "valid":  # where settings may be chosen (runs from before it was logged: NaN)
            v = r.get("valid_before" if key == "base" else "valid_after", {}).get(str(k), NAN)
        elif key == "base":
            v = r["before"][str(k)] if measure == "unseen" else r["personal"]["base"][str(k)]
        elif measure == "unseen":
            v = r["after"][str(k)]
        else:
            v = r["personal"]["global" if measure == "pglobal" else "personal"][str(k)]
        out.setdefault((r.get("fold", 0), r["seed"]), v)
    return out


def fmt_cell(vals: Sequence[float]) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    return cell(vals) if vals else "–"


def results_table(
    runs: list[dict[str, Any]], fractions: Sequence[float], variants: dict[str, Variant], exits: Sequence[int]
) -> tuple[str, list[dict[str, Any]]]:
    """Markdown + JSON rows: per fraction, the base model and each variant, per measure, per exit."""
    cols = [*exits]
    head = (
        "| labels | method | measured on | "
        + " | ".join(f"exit {k}" + (" (teacher)" if k == exits[-1] else "") for k in cols)
        + " |"
    )
    lines = [head, "|---|---|---|" + "---:|" * len(cols)]
    rows: list[dict[str, Any]] = []
    methods = [("base", METHOD_NAMES["before"])] + [(k, v[0]) for k, v in variants.items()]
    for f in fractions:
        for key, name in methods:
            for measure, where in measures(runs).items():
                if key == "base" and measure == "ppersonal":
                    continue
                per = {str(k): list(values(runs, f, key, measure, k).values()) for k in cols}
                if measure not in ("unseen", "valid"):  # devices run exits 1..3: no teacher measured there
                    per[str(exits[-1])] = []
                lines.append(
                    f"| {f:.0%} | {name} | {where} | "
                    + " | ".join(fmt_cell(per[str(k)]) for k in cols)
                    + " |"
                )
                rows.append({"labels": f"{f:.0%}", "fraction": f, "method": name, "key": key,
                             "measure": measure, "uar": per,
                             "mean_std": {k: mean_std(v) for k, v in per.items()}})  # fmt: skip
    return "\n".join(lines), rows


def differences(
    runs: list[dict[str, Any]], fractions: Sequence[float], variants: dict[str, Variant], exits: Sequence[int]
) -> tuple[str, list[dict[str, Any]]]:
    """Paired differences per seed with 95 % Student-t intervals over seeds (shallow exits only)."""
    names = {k: v[0] for k, v in variants.items()}
    comparisons: list[tuple[str, str, str, str, str]] = []  # (label, key a, measure a, key b, measure b)
    for key in variants:
        if key != "ce":
            for measure, where in measures(runs).items():
                comparisons.append((f"{names[key]} − CE only, {where}", key, measure, "ce", measure))
    for key in variants:
        comparisons.append(
            (f"{names[key]}: personal − global heads, personal test", key, "ppersonal", key, "pglobal")
        )
    for key in variants:
        comparisons.append(
            (f"{names[key]} − base model, unseen test speakers", key, "unseen", "base", "unseen")
        )
        comparisons.append(
            (f"{names[key]} (global heads) − base model, personal test", key, "pglobal", "base", "pglobal")
        )
        comparisons.append(
            (
                f"{names[key]} (personal heads) − base model, personal test",
                key,
                "ppersonal",
                "base",
                "pglobal",
            )
        )
    head = "| labels | paired difference (per seed) | " + " | ".join(f"exit {k}" for k in exits) + " |"
    lines = [head, "|---|---|" + "---:|" * len(exits)]
    rows: list[dict[str, Any]] = []
    for f in fractions:
        for label, ka, ma, kb, mb in comparisons:
            cis = {
                str(k): common.paired(values(runs, f, ka, ma, k), values(runs, f, kb, mb, k)) for k in exits
            }
            lines.append(
                f"| {f:.0%} | {label} | " + " | ".join(common.ci_cell(cis[str(k)]) for k in exits) + " |"
            )
            rows.append({"labels": f"{f:.0%}", "fraction": f, "comparison": label, "a": [ka, ma], "b": [kb, mb],
                         "t95": cis})  # fmt: skip
    return "\n".join(lines), rows


def verdicts(
    diffs: list[dict[str, Any]],
    fractions: Sequence[float],
    variants: dict[str, Variant],
    exits: Sequence[int],
    prem: dict[str, Any],
) -> list[str]:
    """The issue's targets (SD ≥ CE + 0.05 at exits 1–2 on personal test speech at 10 % labels; personal
    heads ≥ global heads; federation not below the base model on the unseen speakers), read as measured."""

    def find(f: float, a: list[str], b: list[str]) -> dict[str, Any] | None:
        return next((d for d in diffs if d["fraction"] == f and d["a"] == a and d["b"] == b), None)

    out = [prem["text"]]
    for f in fractions:
        for key, (name, *_) in variants.items():
            fed = find(f, [key, "unseen"], ["base", "unseen"])
            if fed is None:
                continue
            for k in exits:
                ci = fed["t95"][str(k)]
                if not ci["n"] or ci["mean"] >= 0:
                    continue
                sig = ci["n"] > 1 and ci["ci_high"] < 0
                out.append(
                    f"{f:.0%} {name}: federation LOWERS the unseen-speaker UAR below the base model at exit {k}: "
                    f"{common.ci_cell(ci)}"
                    + (" (the whole 95 % interval is below 0)" if sig else " (interval includes 0)")
                )
        if "sd" in variants:
            for measure in ("ppersonal", "pglobal"):
                d = find(f, ["sd", measure], ["ce", measure])
                if d is None:
                    continue
                for k in [k for k in exits if k <= 2]:
                    ci = d["t95"][str(k)]
                    if not ci["n"]:
                        continue
                    met = ci["mean"] >= 0.05
                    out.append(
                        f"{f:.0%} target SD ≥ CE + 0.05, {MEASURES[measure]}, exit {k}: "
                        f"{'met (mean)' if met else 'NOT met'}: {common.ci_cell(ci)}"
                    )
        for key, (name, *_) in variants.items():
            d = find(f, [key, "ppersonal"], [key, "pglobal"])
            if d is None:
                continue
            cells = [(k, d["t95"][str(k)]) for k in exits if d["t95"][str(k)]["n"]]
            if cells:
                ok = all(ci["mean"] >= 0 for _, ci in cells)
                out.append(
                    f"{f:.0%} {name}: target personal heads ≥ global heads {'met (mean)' if ok else 'NOT met'}: "
                    + "; ".join(f"exit {k} {common.ci_cell(ci)}" for k, ci in cells)
                )
    return out


def prestated(runs: list[dict[str, Any]], variants: dict[str, Variant]) -> tuple[str, list[dict[str, Any]]]:
    """:data:`PRESTATED` at exit :data:`PRESTATED_EXIT` and :data:`PRESTATED_FRACTION` labels: paired mean,
    95 % interval, raw and Holm-adjusted p over the (fold, seed) pairs; the rest of the tables is exploratory."""
    rows: list[dict[str, Any]] = []
    k = PRESTATED_EXIT
    for label, (ka, ma), (kb, mb) in PRESTATED:
        if ka not in variants or kb not in variants:
            continue
        a = values(runs, PRESTATED_FRACTION, ka, ma, k)
        b = values(runs, PRESTATED_FRACTION, kb, mb, k)
        rows.append({"comparison": label, "exit": k, "fraction": PRESTATED_FRACTION, "a": [ka, ma],
                     "b": [kb, mb], "t95": common.paired(a, b), "p": common.paired_p(a, b)})  # fmt: skip
    for row, adj in zip(rows, common.holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adj
        row["significant_holm_0.05"] = bool(adj < 0.05) if not math.isnan(adj) else None
    lines = [
        f"| pre-stated comparison (exit {k}, {PRESTATED_FRACTION:.0%} labels, personal held-out speech) "
        "| paired difference [95 % CI] | p | p (Holm) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['comparison']} | {common.ci_cell(r['t95'])} | {r['p']:.3g} | {r['p_holm']:.3g}"
            + (" *" if r["significant_holm_0.05"] else "")
            + " |"
        )
    return "\n".join(lines), rows


def plot(
    runs: list[dict[str, Any]],
    fractions: Sequence[float],
    variants: dict[str, Variant],
    exits: Sequence[int],
    path: Path,
    title: str,
) -> None:
    with common.figure(path, dpi=110, nrows=len(fractions), ncols=2, figsize=(13, 3.6 * len(fractions)),
                       squeeze=False) as (fig, axes):  # fmt: skip
        _draw(axes, runs, fractions, variants, exits)
        fig.suptitle(textwrap.fill(title, 140), fontsize=9)


def _draw(
    axes: Any, runs: list[dict[str, Any]], fractions: Sequence[float], variants: dict[str, Variant],
    exits: Sequence[int],
) -> None:  # fmt: skip
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    shallow = [k for k in exits if k != exits[-1]]
    colour = {"base": "0.55"} | {k: cmap((i + 1) % cmap.N) for i, k in enumerate(variants)}
    bars_left = [("base", "unseen", METHOD_NAMES["before"])] + [
        (k, "unseen", v[0]) for k, v in variants.items()
    ]
    bars_right = [("base", "pglobal", METHOD_NAMES["before"])] + [
        (k, m, f"{v[0]}, {'global' if m == 'pglobal' else 'personal'} heads")
        for k, v in variants.items()
        for m in ("pglobal", "ppersonal")
    ]
    for row, f in zip(axes, fractions, strict=True):
        for ax, bars, ks, where in (
            (row[0], bars_left, list(exits), "unseen test speakers"),
            (row[1], bars_right, shallow, "personal test speech (mean over devices)"),
        ):
            width = 0.8 / len(bars)
            for j, (key, measure, label) in enumerate(bars):
                stats = [mean_std(list(values(runs, f, key, measure, k).values())) for k in ks]
                xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(ks))]
                ax.bar(xs, [0 if math.isnan(m) else m for m, _ in stats], width,
                       yerr=[0 if math.isnan(s) else s for _, s in stats], capsize=2, label=label,
                       color=colour[key], alpha=0.45 if measure == "pglobal" and key != "base" else 1.0,
                       hatch="//" if measure == "pglobal" and key != "base" else None)  # fmt: skip
            ax.set_xticks(
                range(len(ks)), [f"exit {k}" + (" (teacher)" if k == exits[-1] else "") for k in ks]
            )
            ax.set_title(f"{f:.0%} labels on devices: {where}", fontsize=9)
            ax.set_ylim(0, 1.15)
            ax.grid(axis="y", alpha=0.3)
            ax.set_ylabel("UAR")
            ax.legend(loc="upper left", fontsize=6, framealpha=0.9, ncol=3)


def _curves(runs: list[dict[str, Any]], variants: dict[str, Variant], fractions: Sequence[float]) -> dict:
    """Per fraction and variant, per exit, the mean over seeds of the last 3 rounds' unseen-speaker UAR."""
    out: dict[str, Any] = {}
    for f in fractions:
        for key in variants:
            per = [r for r in runs if r["fraction"] == f and r["key"] == key]
            if per:
                out[f"{f:g}/{key}"] = {
                    k: [statistics.mean(r["curve"][k][-3:]) for r in per] for k in per[0]["curve"]
                }
    return out


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_federation_args(ap, "adaptation", seeds=(0, 1, 2, 3, 4))
    ap.add_argument(
        "--base-per-seed",
        action="store_true",
        help="seed s also draws the speaker split (speaker seed s) and trains its own base model",
    )
    ap.add_argument(
        "--checkpoint",
        choices=["best", "last"],
        default="best",
        help="which checkpoint of the trained base model (best = what prepare_run federates)",
    )
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument(
        "--folds",
        type=int,
        default=1,
        help="rotate the test speakers over this many disjoint folds (each its own base model); "
        "1: one draw of test speakers (--speaker-seed)",
    )
    ap.add_argument("--ablations", action="store_true", help="SD loss/optimizer ablations instead")
    ap.add_argument(
        "--no-pseudo-labels",
        dest="pseudo_labels",
        action="store_false",
        help=f"leave out the pseudo-label arm (thresholds {PL_THRESHOLDS}, one chosen on validation speakers)",
    )
    ap.add_argument("--ablation-fraction", type=float, default=0.1)
    ap.add_argument("--variants", nargs="+", help=f"run these (CE only always): {', '.join(ABLATIONS)}")
    args = ap.parse_args(argv)
    if args.folds < 1:
        ap.error("--folds must be >= 1")
    if args.folds > 1 and (args.base_per_seed or args.base_model):
        ap.error("--folds trains one base model per fold: it cannot take --base-per-seed or --base-model")
    if args.base_per_seed and args.base_model:
        ap.error("--base-per-seed trains one base model per seed; it cannot take --base-model")
    if args.variants and not args.ablations:
        ap.error("--variants picks ablations: add --ablations")
    unknown = sorted(set(args.variants or []) - set(ABLATIONS))
    if unknown:
        ap.error(f"--variants {unknown}: choose from {', '.join(ABLATIONS)}")
    bad = [f for f in args.fractions if not 0 < f <= 1]
    if bad:
        ap.error(f"--fractions {bad}: each must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main, setup=common.FedBench.from_args)


def _main(args: argparse.Namespace, bench: common.FedBench) -> dict[str, Any]:
    from fedsd.data.partition import Partition

    run, log = bench.run, bench.run.log
    corpus, cache, rows_all = bench.corpus, bench.cache, bench.rows
    setups: dict[int, dict[str, Any]] = {}

    def setup(spk_seed: int) -> dict[str, Any]:
        """Speaker split, base model and its quality for one speaker seed or fold (memoized)."""
        if spk_seed in setups:
            return setups[spk_seed]
        split = (
            bench.speaker_split(args.speaker_seed, spk_seed, args.folds)
            if args.folds > 1
            else bench.speaker_split(spk_seed)
        )
        best, seconds = bench.ensure_base_model(split, args.checkpoint)
        quality = teacher_quality(best, split, rows_all, corpus, cache)
        for name, per_exit in quality.items():
            log(
                f"base model {best.parent.name}/{best.name}, {name}: "
                + ", ".join(f"exit {k} {v:.3f}" for k, v in per_exit.items())
            )
        prem = premise(quality)
        log(prem["text"])
        tag = (
            f"fold{spk_seed}-" if args.folds > 1 else f"spk{spk_seed}-"
        ) + f"{best.parent.name}-{best.name}"
        setups[spk_seed] = {"split": split, "base": best, "seconds": seconds, "quality": quality, "tag": tag,
                            "premise": prem}  # fmt: skip
        return setups[spk_seed]

    variants = ABLATIONS if args.ablations else MAIN | (PSEUDO if args.pseudo_labels else {})
    if args.variants:
        variants = {k: ABLATIONS[k] for k in dict.fromkeys(["ce", *args.variants])}
    fractions = [args.ablation_fraction] if args.ablations else args.fractions
    fc = bench.config().federated
    variants = {k: resolve_variant(v, fc) for k, v in variants.items()}
    log(
        f"personal test: {fc.personal_test_fraction:.0%} of each device's speech; personal heads: "
        f"{fc.personalize_epochs} epochs after the last round (local_epochs {fc.local_epochs})"
    )
    runs: list[dict[str, Any]] = []
    folds = range(args.folds) if args.folds > 1 else [None]
    for f, fold, seed in ((f, fold, seed) for f in fractions for fold in folds for seed in args.seeds):
        spk_seed = fold if fold is not None else seed if args.base_per_seed else args.speaker_seed
        st = setup(spk_seed)
        split, base, base_tag = st["split"], st["base"], st["tag"]
        for key, (name, mode, extra, frac_override) in variants.items():
            frac = frac_override if frac_override is not None else f
            res = bench.run_seed(split, base, seed, frac, f"{base_tag}/f{frac:g}-s{seed}-{key}", mode=mode,
                                 extra=extra)  # fmt: skip
            exits_here = sorted(int(k) for k in res["after"])
            personal = personal_results(Path(res["run_dir"]), exits_here)
            speakers = {c.client_id: c.speakers for c in Partition.load(Path(res["partition"])).clients}
            for name_, dev in personal["devices"].items():
                dev["speakers"] = speakers.get(name_, [])
            runs.append(
                {
                    "key": key,
                    "variant": name,
                    "mode": mode,
                    "fraction": f,
                    "label_fraction": frac,
                    "seed": seed,
                    "fold": fold or 0,
                    "local_only": extra.get("federated.rounds") == 0,
                    "speaker_seed": spk_seed,
                    "base_model": str(base),
                    "partition": res["partition"],
                }
                | {k: res[k] for k in ("before", "after", "curve", "seconds", "cached")}
                | {k: res.get(k, {}) for k in ("valid_before", "valid_after", "valid_curve")}
                | {"personal": personal, "overrides": extra, "run_key": res["key"]}
            )
            shallow = exits_here[:-1]
            log(
                f"{f:.0%} "
                + (f"fold {fold} " if fold is not None else "")
                + f"seed {seed} {name}: "
                + common.personal_line(res, personal, exits_here, shallow)
                + f" (exits {exits_here})"
                + common.took(res)
            )
    chosen = {}
    if args.pseudo_labels and not args.ablations:
        for f in fractions:
            best, scores = choose_on_validation(runs, f)
            chosen[f"{f:g}"] = {"chosen": best, "valid_uar_exit2": scores}
            log(f"{f:.0%} pseudo-label threshold chosen on validation speakers: {best} ({scores})")
        if any(c["chosen"] for c in chosen.values()):
            variants = variants | {"pl": ("pseudo-labels (τ chosen on validation)", "pl", {}, None)}
    exits = sorted(int(k) for k in runs[0]["after"])
    shallow = exits[:-1]  # the teacher exit never changes
    table_md, table_rows = results_table(runs, fractions, variants, exits)
    diff_md, diff_rows = differences(runs, fractions, variants, shallow)
    first = setups[next(iter(setups))]
    prem = first["premise"]
    lines = verdicts(diff_rows, fractions, variants, shallow, prem)
    pre_md, pre_rows = prestated(runs, variants)
    base_desc = f"{first['base'].parent.name}/{first['base'].name}"
    title = (
        f"UAR per exit, mean ± std over seeds {args.seeds}: {len(first['split'].test_speakers)} unseen test "
        "speakers and each device's personal test speech "
        + (
            "(speaker split and base model per seed; "
            if args.base_per_seed
            else f"(one base model, {base_desc}; "
        )
        + f"exit {exits[-1]} = frozen teacher)"
    )
    print()
    print(f"### {title}")
    print()
    print(table_md)
    print()
    print("Paired differences per seed (same base model, devices, labels, personal test speech, local seed), "
          "mean [95 % Student-t interval over seeds] (seeds > 0 / seeds):")  # fmt: skip
    print()
    print(diff_md)
    print()
    print("Pre-stated comparisons (Holm-adjusted over this list; every other difference is exploratory):")
    print()
    print(pre_md)
    print()
    for line in lines:
        print(f"- {line}")
    fed_seconds = sum(r["seconds"] for r in runs)
    fresh = [r for r in runs if not r["cached"]]
    missing = [f"{r['fraction']:g}/s{r['seed']}/{r['key']}" for r in runs if not r["personal"]["has_final"]]
    if missing:
        print(f"- no end-of-run personal metrics (no personal test speech or no final replies): {missing}")
    print()
    print(
        f"{len(runs)} federated runs, {fed_seconds:.0f} s of federation in all "
        f"({fed_seconds / len(runs):.0f} s each; {len(fresh)} run now, the rest cached in the work dir); "
        f"base model training {bench.base_seconds:.0f} s now; this invocation {run.seconds:.0f} s; "
        f"work dir {bench.work}"
    )
    stem = args.out.name + "".join(
        suffix
        for on, suffix in (
            (args.checkpoint == "last" and not args.base_model, ".last"),
            (args.base_per_seed, ".perseed"),
            (args.ablations, ".ablations"),
        )
        if on
    )
    json_path, png_path = (args.out.parent / f"{stem}.{ext}" for ext in ("json", "png"))
    payload = {
        "setup": bench.setup_record()
        | {
            "base_per_seed": args.base_per_seed,
            "folds": args.folds,
            "splits": {
                str(k): {
                    "test_speakers": st["split"].test_speakers,
                    "server_speakers": st["split"].server_speakers,
                    "device_speakers": sorted(s for c in st["split"].clients for s in c.speakers),
                    "base_model": str(st["base"]),
                    "base_fingerprint": bench.fingerprints[str(st["base"])],
                }
                for k, st in setups.items()
            },
            "seeds": args.seeds,
            "fractions": fractions,
            "variants": {k: {"name": v[0], "mode": v[1], "overrides": v[2]} for k, v in variants.items()},
            "personal_test_fraction": fc.personal_test_fraction,
            "personalize_epochs": fc.personalize_epochs,
            "engine": "inprocess",
            "torch_threads": args.threads,
        },
        "base_model_quality": {str(k): st["quality"] for k, st in setups.items()},
        "premise": {str(k): st["premise"] for k, st in setups.items()},
        "exits": exits,
        "table": table_rows,
        "markdown": table_md,
        "differences": diff_rows,
        "differences_markdown": diff_md,
        "prestated": pre_rows,
        "pseudo_label_choice": chosen,
        "prestated_markdown": pre_md,
        "verdicts": lines,
        "last3_rounds_unseen": _curves(runs, variants, fractions),
        "runs": runs,
        "timings_s": {
            "total": run.seconds,
            "base_model_training_now": bench.base_seconds,
            "federated_runs": fed_seconds,
        },
    }
    draw = lambda path: plot(runs, fractions, variants, exits, path, title)  # noqa: E731
    return bench.publish(json_path, png_path, payload, args, draw)


if __name__ == "__main__":
    main()
