"""Federated on-device adaptation: does self-distillation on unlabelled speech lift the shallow exits?

Synthetic corpus (24 speakers × 12 sentences × 4 emotions), the tiny backbone of ``configs/demo.yaml``,
8 simulated devices with exits [1, 2, 3] (the deep exit 4 is the frozen teacher), 5 rounds × 5 local
epochs, Flower's Message API over the in-process grid (no Ray). Per label fraction and seed it compares
the shallow exits' UAR on unseen test speakers

    before      the central base model (self-distillation on the server's 8-speaker pool)
    CE only     federated, cross-entropy on the devices' labelled utterances
    self-dist.  federated, CE on labelled + KD from the frozen deep exit + feature loss on all utterances

Paired design. ``make_partition`` draws test and server speakers from ``federated.seed`` too, so a plain
seed change would move the test set and the base model's training pool. Instead the speaker split is
drawn once (``--speaker-seed``), the base model is trained once on its server pool, and each seed
re-partitions only the 12 remaining device speakers: which speakers share a device, which utterances are
labelled (nested: the 10 % set lies inside the 20 % one) and the local training seed (``federated.seed``).
Every run of a seed sees the same devices and labels, every run sees the same test speakers and base
model, and the feature cache (same backbone, same files) is shared by all runs.

Reproduce (the recipe is configs/demo.yaml; every size defaults to its value. The first run generates
the corpus and trains the base model; the federated runs reuse cached features):

    .venv/bin/python benchmarks/adaptation.py --seeds 0 1 2 --fractions 0.1 0.2
    .venv/bin/python benchmarks/adaptation.py --ablations          # SD loss ablations at 10 % labels
    .venv/bin/python benchmarks/adaptation.py --speakers 8 --sentences 1 --clients 2 --test-speakers 2 \
        --server-speakers 2 --base-epochs 1 --rounds 1 --local-epochs 1 --seeds 0 --fractions 0.5   # tiny

Writes ``benchmarks/results/adaptation.json`` + ``adaptation.png`` (``adaptation.ablations.*`` with
``--ablations``) with provenance (benchmarks/common.py); corpus, base model, runs and feature cache live
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
import common  # noqa: E402  (benchmarks/common.py; scripts are not a package)
from common import cell, mean_std  # noqa: E402

METHOD_NAMES = {"before": "before (base model)", "ce": "CE only", "sd": "self-distillation"}

# The two methods of the main table and the ablations (``--ablations``, pick with ``--variants``):
# key → (row name, device loss mode, config overrides, label fraction or None = the run's fraction).
Variant = tuple[str, str, dict[str, Any], float | None]
MAIN: dict[str, Variant] = {"ce": ("CE only", "ce", {}, None), "sd": ("self-distillation", "sd", {}, None)}
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
    "ce-1ep": ("CE only, 1 local epoch", "ce", {"federated.local_epochs": 1}, None),
    "ce-oracle": ("CE only, 100 % labels (oracle)", "ce", {}, 1.0),
}


# ---------------------------------------------------------------------------------------- runs
def teacher_quality(base: Path, split: Any, rows_all: list, root: Path, cache: Path) -> dict[str, Any]:
    """Base-model UAR per exit on the test speakers and on all device utterances (with every label)."""
    from fedsd.clients.app import model_crop
    from fedsd.clients.training import evaluate_cached, head_outputs
    from fedsd.data.dataset import rows_by_ids
    from fedsd.features import FeatureCache
    from fedsd.model.multiexit import MultiExitSER

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


# ---------------------------------------------------------------------------------------- report
def markdown_table(rows: list[tuple[str, str, dict[str, list[float]]]], exits: Sequence[int]) -> str:
    head = "| labels | method | " + " | ".join(f"exit {k}" for k in exits) + " |"
    sep = "|---|---|" + "---:|" * len(exits)
    lines = [head, sep]
    for labels, method, per_exit in rows:
        lines.append(f"| {labels} | {method} | " + " | ".join(cell(per_exit[str(k)]) for k in exits) + " |")
    return "\n".join(lines)


def paired_table(
    runs: list[dict[str, Any]], fractions: Sequence[float], exits: Sequence[int], ref: str = "ce"
) -> str:
    """Each variant − the reference per seed (same devices, labels, local seed): mean ± std, wins, paired t."""
    names = {r["key"]: r["variant"] for r in runs}
    head = (
        "| labels | variant − " + names.get(ref, ref) + " | " + " | ".join(f"exit {k}" for k in exits) + " |"
    )
    lines = [head, "|---|---|" + "---:|" * len(exits)]
    for f in fractions:
        by_seed: dict[int, dict[str, dict[str, float]]] = {}
        for r in runs:
            if r["fraction"] == f:
                by_seed.setdefault(r["seed"], {})[r["key"]] = r["after"]
        for key, name in names.items():
            if key == ref:
                continue
            cells = []
            for k in exits:
                d = [v[key][str(k)] - v[ref][str(k)] for v in by_seed.values() if {key, ref} <= set(v)]
                m, s = mean_std(d)
                t = m / (s / math.sqrt(len(d))) if len(d) > 1 and s > 0 else math.nan
                t_txt = f", t = {t:.1f}" if not math.isnan(t) else ""
                cells.append(f"{m:+.3f} ± {s:.3f} ({sum(x > 0 for x in d)}/{len(d)} up{t_txt})")
            lines.append(f"| {f:.0%} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    rows: list[tuple[str, str, dict[str, list[float]]]], exits: Sequence[int], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[str, dict[str, list[float]]]]] = {}
    for labels, method, per_exit in rows:
        groups.setdefault(labels, []).append((method, per_exit))
    n_methods = max(len(m) for m in groups.values())
    panel = max(5.5, 0.22 * n_methods * len(exits))
    fig, axes = plt.subplots(
        1, len(groups), figsize=(panel * len(groups) + (3.5 if n_methods > 4 else 0), 3.8)
    )
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    cmap = plt.get_cmap("tab20" if n_methods > 10 else "tab10")
    for ax, (labels, methods) in zip(axes, groups.items(), strict=True):
        width = 0.8 / len(methods)
        for j, (method, per_exit) in enumerate(methods):
            stats = [mean_std(per_exit[str(k)]) for k in exits]
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(exits))]
            ax.bar(
                xs,
                [m for m, _ in stats],
                width,
                yerr=[s for _, s in stats],
                capsize=3,
                label=method,
                color=cmap(j % cmap.N),
            )
        ax.set_xticks(
            range(len(exits)), [f"exit {k}" + (" (teacher)" if k == exits[-1] else "") for k in exits]
        )
        ax.set_title(f"{labels} labelled on devices")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("UAR, unseen test speakers")
    if n_methods > 4:
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    else:
        axes[0].legend(loc="upper left", fontsize=7, ncol=n_methods, framealpha=0.9)
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curves(
    table_rows: list[tuple[str, str, dict[str, list[float]]]],
    runs: list[dict[str, Any]],
    variants: dict[str, Variant],
    fractions: Sequence[float],
) -> list[dict[str, list[list[float]]]]:
    """Per table row, per exit, the per-round UAR curve of each seed (the 'before' row: round 0 only)."""
    out: list[dict[str, list[list[float]]]] = []
    for f in fractions:
        sel = [r for r in runs if r["fraction"] == f]
        once = list({r["seed"]: r for r in sel}.values())
        out.append({k: [[r["before"][k]] for r in once] for k in sel[0]["before"]})
        for key in variants:
            per = [r for r in sel if r["key"] == key]
            out.append({k: [r["curve"][k] for r in per] for k in sel[0]["curve"]})
    assert len(out) == len(table_rows)
    return out


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_federation_args(ap, "adaptation")
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
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--ablations", action="store_true", help="SD loss/optimizer ablations instead")
    ap.add_argument("--ablation-fraction", type=float, default=0.1)
    ap.add_argument("--variants", nargs="+", help=f"run these (CE only always): {', '.join(ABLATIONS)}")
    args = ap.parse_args(argv)
    if args.base_per_seed and args.base_model:
        ap.error("--base-per-seed trains one base model per seed; it cannot take --base-model")
    if args.variants and not args.ablations:
        ap.error("--variants picks ablations: add --ablations")
    unknown = sorted(set(args.variants or []) - set(ABLATIONS))
    if unknown:
        ap.error(f"--variants {unknown}: choose from {', '.join(ABLATIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main)


def _main(args: argparse.Namespace, run: common.Run) -> dict[str, Any]:
    log = run.log
    bench = common.FedBench.from_args(args, run)
    corpus, cache, rows_all = bench.corpus, bench.cache, bench.rows
    setups: dict[int, dict[str, Any]] = {}

    def setup(spk_seed: int) -> dict[str, Any]:
        """Speaker split, base model and its quality for one speaker seed (memoized)."""
        if spk_seed in setups:
            return setups[spk_seed]
        split = bench.speaker_split(spk_seed)
        best, seconds = bench.ensure_base_model(split, args.checkpoint)
        quality = teacher_quality(best, split, rows_all, corpus, cache)
        for name, per_exit in quality.items():
            log(
                f"base model {best.parent.name}/{best.name}, {name}: "
                + ", ".join(f"exit {k} {v:.3f}" for k, v in per_exit.items())
            )
        tag = f"spk{spk_seed}-{best.parent.name}-{best.name}"
        setups[spk_seed] = {"split": split, "base": best, "seconds": seconds, "quality": quality, "tag": tag}
        return setups[spk_seed]

    variants = ABLATIONS if args.ablations else MAIN
    if args.variants:
        variants = {k: ABLATIONS[k] for k in dict.fromkeys(["ce", *args.variants])}
    fractions = [args.ablation_fraction] if args.ablations else args.fractions
    runs: list[dict[str, Any]] = []
    for f in fractions:
        for seed in args.seeds:
            spk_seed = seed if args.base_per_seed else args.speaker_seed
            st = setup(spk_seed)
            split, base, base_tag = st["split"], st["base"], st["tag"]
            for key, (name, mode, extra, frac_override) in variants.items():
                frac = frac_override if frac_override is not None else f
                part_path = bench.partition(split, seed, frac)
                overrides = {
                    "federated.mode": mode,
                    "federated.seed": seed,
                    "federated.label_fraction": frac,
                    **extra,
                }
                res = bench.federate(overrides, part_path, base, f"{base_tag}/f{frac:g}-s{seed}-{mode}")
                runs.append(
                    {
                        "key": key,
                        "variant": name,
                        "mode": mode,
                        "fraction": f,
                        "label_fraction": frac,
                        "seed": seed,
                        "speaker_seed": spk_seed,
                        "base_model": str(base),
                    }
                    | {k: res[k] for k in ("before", "after", "curve", "seconds", "cached")}
                    | {"overrides": extra, "run_key": res["key"]}
                )
                log(
                    f"{f:.0%} seed {seed} {name}: "
                    + ", ".join(f"exit {k} {v:.3f}" for k, v in res["after"].items())
                    + f" ({res['seconds']:.0f} s{', cached' if res['cached'] else ''})"
                )
    exits = sorted(int(k) for k in runs[0]["after"])
    table_rows: list[tuple[str, str, dict[str, list[float]]]] = []
    for f in fractions:
        sel = [r for r in runs if r["fraction"] == f]
        once = list({r["seed"]: r for r in sel}.values())  # the base model's UAR, once per seed
        before = {str(k): [r["before"][str(k)] for r in once] for k in exits}
        table_rows.append((f"{f:.0%}", METHOD_NAMES["before"], before))
        for key, (name, *_) in variants.items():
            per = [r for r in sel if r["key"] == key]
            table_rows.append((f"{f:.0%}", name, {str(k): [r["after"][str(k)] for r in per] for k in exits}))

    last3 = [
        (labels, method, {k: [statistics.mean(c[-3:]) for c in v] for k, v in per.items()})
        for (labels, method, _), per in zip(
            table_rows, _curves(table_rows, runs, variants, fractions), strict=True
        )
    ]
    first = setups[next(iter(setups))]
    base_desc = f"{first['base'].parent.name}/{first['base'].name}"
    title = (
        f"UAR on {len(first['split'].test_speakers)} unseen test speakers, "
        f"mean ± std over seeds {args.seeds} "
        + (
            "(speaker split and base model per seed; "
            if args.base_per_seed
            else f"(one base model, {base_desc}; "
        )
        + f"exit {exits[-1]} = frozen teacher, for reference)"
    )
    print()
    print(f"### {title}")
    print()
    print(markdown_table(table_rows, exits))
    paired = paired_table(runs, fractions, exits[:-1])  # the teacher exit never changes
    print()
    print("Paired difference per seed, variant − CE only (same base model, devices, labels, local seed):")
    print()
    print(paired)
    fed_seconds = sum(r["seconds"] for r in runs)
    fresh = [r for r in runs if not r["cached"]]
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
            "engine": "inprocess",
            "torch_threads": args.threads,
        },
        "base_model_quality": {str(k): st["quality"] for k, st in setups.items()},
        "exits": exits,
        "table": [
            {
                "labels": labels,
                "method": method,
                "uar": per_exit,
                "mean_std": {k: mean_std(v) for k, v in per_exit.items()},
            }
            for labels, method, per_exit in table_rows
        ],
        "markdown": markdown_table(table_rows, exits),
        "markdown_last3_rounds": markdown_table(last3, exits),
        "paired_markdown": paired,
        "runs": runs,
        "timings_s": {
            "total": run.seconds,
            "base_model_training_now": bench.base_seconds,
            "federated_runs": fed_seconds,
        },
    }
    out = bench.write(json_path, payload, args)
    plot(table_rows, exits, png_path, title)
    log(f"wrote {png_path}")
    return out


if __name__ == "__main__":
    main()
