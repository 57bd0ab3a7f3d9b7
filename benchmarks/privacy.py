"""What sample-level differential privacy costs: shallow-exit UAR at ε ≈ 1, 3, 8 and without DP, and
the time overhead of DP-SGD on a device.

Setting: the adaptation benchmark's (``benchmarks/adaptation.py``): synthetic corpus (24 speakers × 12
sentences × 4 emotions), its central base model (speaker seed 0), 8 simulated devices at exits
[1, 2, 3] with the frozen deep exit 4 as teacher, 20 % labels, self-distillation, 5 rounds × 5 local
epochs over the in-process grid. Each DP row sets ``federated.dp.target_epsilon`` (δ = 1e-4 per device,
C = 1): every device calibrates σ once so that the 5 rounds spend exactly that ε, accounted with Opacus'
RDP accountant across rounds. Per seed (0, 1, 2) the devices, labels and local seed change; test
speakers and base model are fixed. UAR is on the 4 unseen test speakers.

Overhead: the same device's local training (cached features, one round of 5 epochs) with and without
DP, interleaved, median of repeats; reported as a ratio (the machine is shared, absolute times drift).

Reproduce (the recipe is configs/scratch.yaml; every size defaults to its value; the corpus and base model
are made in the work directory on first use):

    .venv/bin/python benchmarks/privacy.py                   # ε 1, 3, 8 and no DP, seeds 0 1 2
    .venv/bin/python benchmarks/privacy.py --speakers 6 --sentences 1 --clients 2 --test-speakers 2 \
        --server-speakers 2 --base-epochs 1 --rounds 1 --local-epochs 1 --seeds 0 --epsilons 8 \
        --repeats 1                                          # tiny

Writes ``benchmarks/results/privacy.json`` (with provenance, see benchmarks/common/) and ``privacy.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)
from common import cell, mean_std, personal_results  # noqa: E402

from fedsd.report import markdown_table  # noqa: E402

EXITS = (1, 2, 3)


def overhead(
    base: Path, partition: Path, corpus: Path, cache: Path, repeats: int, delta: float, epochs: int
) -> dict[str, Any]:
    """Median seconds of one round of local training on device 0 (exit 3: heads 1-3), with and without DP."""
    from fedsd.cached import model_crop
    from fedsd.clients.dp_training import train_heads_private
    from fedsd.clients.training import LocalTrainConfig, plan_exits, train_heads
    from fedsd.data.dataset import rows_by_ids
    from fedsd.data.manifest import read_manifest
    from fedsd.data.partition import Partition
    from fedsd.features import FeatureCache
    from fedsd.model.multiexit import MultiExitSER
    from fedsd.privacy import calibrate_noise, local_schedule

    model = MultiExitSER.from_pretrained(base)
    client = Partition.load(partition).client(0)
    rows = rows_by_ids(read_manifest(corpus / "manifest.csv"), client.utt_ids)
    lcfg = LocalTrainConfig(exit=3, epochs=epochs, batch_size=16, lr=1e-3)
    plan = plan_exits(model.exits, 3, lcfg)
    feats = FeatureCache(cache, model, model_crop(model)).get(
        rows, corpus, plan.needed, label_names=model.label_names, labelled=list(client.labelled)
    )
    q, steps = local_schedule(len(feats.utt_ids), lcfg.batch_size, lcfg.epochs)
    sigma = calibrate_noise(3.0, delta, q, steps * 5)
    heads0 = {k: v.clone() for k, v in model.head_state_dict().items()}
    variants = {
        "no DP": lambda: train_heads(model, feats, plan, lcfg),
        "DP-SGD": lambda: train_heads_private(
            model, feats, plan, lcfg, noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=q, steps=steps
        ),
    }
    reset = {name: lambda: model.load_head_state_dict(heads0) for name in variants}  # same start each time
    times = common.interleaved(variants, repeats, before=reset)["wall"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "utterances": len(feats.utt_ids),
        "steps": steps,
        "sample_rate": q,
        "noise_multiplier": sigma,
        "repeats": repeats,
        "median_s": med,
        "ratio": med["DP-SGD"] / med["no DP"],
        "all_s": times,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: unseen speakers (global heads); right: personal test speech, global (solid) and personal
    (dashed) heads; dotted horizontal lines: no DP."""
    dp_rows = [r for r in rows if r["target_epsilon"] is not None]
    nodp = next(r for r in rows if r["target_epsilon"] is None)
    xs = [r["target_epsilon"] for r in dp_rows]
    panels = (("unseen test speakers", (("uar", "-"),)),
              ("personal test (solid: global, dashed: personal heads)",
               (("personal_global", "-"), ("personal_personal", "--"))))  # fmt: skip
    with common.figure(path, figsize=(9.5, 3.6), ncols=2, sharey=True) as (_, axes):
        for ax, (title, keys) in zip(axes, panels, strict=True):
            for i, k in enumerate(EXITS):
                color = f"C{i}"
                for key, style in keys:
                    stats = [mean_std(r[key][str(k)]) for r in dp_rows]
                    ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                                ls=style, color=color, label=f"exit {k}" if style == "-" else None)  # fmt: skip
                    ax.axhline(mean_std(nodp[key][str(k)])[0], ls=":", lw=1, color=color)
            ax.axhline(0.25, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.set_xlabel("target ε per device over the run (δ = 1e-4)")
            ax.set_title(title, fontsize=9)
        axes[0].set_ylabel("UAR (dotted: no DP)")
        axes[0].legend(fontsize=7)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_federation_args(ap, "privacy")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument(
        "--fraction", type=float, default=0.1, help="device label fraction (0.1: 8 labelled clips)"
    )
    ap.add_argument("--delta", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats (overhead)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main, setup=common.FedBench.from_args)


def _main(args: argparse.Namespace, bench: common.FedBench) -> dict[str, Any]:
    run, log = bench.run, bench.run.log
    split, base = bench.fixed_base(args.speaker_seed)
    fed = bench.config().federated
    settings: list[float | None] = [None, *sorted(args.epsilons, reverse=True)]
    rows: list[dict[str, Any]] = []
    for eps in settings:
        rows.append(run_setting(args, bench, split, base, eps))
    before, personal_base = rows[0]["before"], rows[0]["personal_base"]

    log("timing local training with and without DP (device 0, exit 3, interleaved)")
    part0 = bench.partition(split, args.seeds[0], args.fraction)
    ov = overhead(base, part0, bench.corpus, bench.cache, args.repeats, args.delta, fed.local_epochs)

    print()
    print(
        f"### Shallow-exit UAR under device DP (mean ± std over seeds {args.seeds}, {args.fraction:.0%} labels)"
    )
    print()
    print(markdown_table(*uar_table(rows, before, personal_base, fed.rounds)))
    print()
    print(markdown_table(*difference_table(rows)))
    print()
    print(
        markdown_table(
            ["local training, 1 round", "median s", "ratio"],
            [
                ["no DP", f"{ov['median_s']['no DP']:.3f}", "1.00"],
                ["DP-SGD (Opacus)", f"{ov['median_s']['DP-SGD']:.3f}", f"{ov['ratio']:.2f}"],
            ],
        )
    )
    print(
        f"overhead: device 0, {ov['utterances']} utterances, {ov['steps']} steps, q = {ov['sample_rate']:.3f}, "
        f"σ = {ov['noise_multiplier']:.2f}; median of {ov['repeats']} interleaved repeats; this run "
        f"{run.seconds:.0f} s"
    )
    payload = {
        "setting": bench.setting(
            split,
            base,
            args,
            delta=args.delta,
            exits_mix=fed.exits_mix,
            personalize_epochs=fed.personalize_epochs,
            personal_test_fraction=fed.personal_test_fraction,
        ),  # fmt: skip
        "exits": list(EXITS),
        "before": before,
        "personal_base": personal_base,
        "rows": rows,
        "differences": differences(rows),
        "overhead": ov,
    }
    png = args.out.with_suffix(".png")
    return bench.publish(args.out.with_suffix(".json"), png, payload, args, lambda path: plot(rows, path))


def run_setting(
    args: argparse.Namespace, bench: common.FedBench, split: Any, base: Path, eps: float | None
) -> dict[str, Any]:
    """Every seed of one DP setting (``eps`` None: no DP): unseen-speaker UAR of the final global heads,
    personal-test UAR of the global and the personal heads, ε spent and σ, per seed."""
    fed = bench.config().federated
    row: dict[str, Any] = {"target_epsilon": eps, "uar": {str(k): [] for k in EXITS}, "epsilon": [], "sigma": [],
                           "device_seconds": [], "seeds": list(args.seeds),
                           "personal_global": {str(k): [] for k in EXITS},
                           "personal_personal": {str(k): [] for k in EXITS}}  # fmt: skip
    dp = {} if eps is None else {
        "federated.dp": {"target_epsilon": eps, "delta": args.delta, "max_grad_norm": 1.0, "rounds": fed.rounds},
    }  # fmt: skip
    name = "nodp" if eps is None else f"eps{eps:g}"
    for seed in args.seeds:
        res = bench.run_seed(split, base, seed, args.fraction, f"privacy/{name}-s{seed}", extra=dp)
        personal = personal_results(Path(res["run_dir"]), EXITS)
        for k in EXITS:
            row["uar"][str(k)].append(res["after"][str(k)])
            row["personal_global"][str(k)].append(personal["global"][str(k)])
            row["personal_personal"][str(k)].append(personal["personal"][str(k)])
        row["before"] = res["before"]
        row.setdefault("personal_base_seeds", []).append(personal["base"])
        reports = res["train_reports"]
        dev = [c["metrics"] for rep in reports for c in rep.get("clients", [])]
        row["device_seconds"] += [m["seconds"] for m in dev if "seconds" in m]
        if eps is not None:
            last = [c["metrics"] for c in reports[-1].get("clients", [])]
            row["epsilon"].append(max(m["dp-epsilon"] for m in last))
            row["sigma"] += sorted({round(m["dp-noise-multiplier"], 4) for m in last})
        bench.run.log(
            f"{name} seed {seed}: "
            + common.personal_line(res, personal, EXITS, EXITS)
            + (f"; max ε {row['epsilon'][-1]:.3f}" if eps is not None else "")
            + common.took(res)
        )
    row["personal_base"] = {
        str(k): [p[str(k)] for p in row["personal_base_seeds"]] for k in EXITS
    }  # the base model's heads on each seed's personal test speech
    return row


def _label(r: dict[str, Any]) -> str:
    return "no DP" if r["target_epsilon"] is None else f"ε = {r['target_epsilon']:g}"


def uar_table(
    rows: list[dict[str, Any]], before: dict[str, float], personal_base: dict[str, list[float]], rounds: int
) -> tuple[list[str], list[list[str]]]:
    """One row per (setting, what is measured): UAR per exit, mean ± std over seeds."""
    header = ["device DP", "σ (calibrated)", f"max ε after {rounds} rounds", "measured on"] + [
        f"exit {k}" for k in EXITS
    ]
    out = [
        ["base model", "–", "–", "unseen test speakers"] + [f"{before[str(k)]:.3f}" for k in EXITS],
        ["base model", "–", "–", "personal test"] + [cell(personal_base[str(k)]) for k in EXITS],
    ]
    for r in rows:
        sig = "–" if not r["sigma"] else f"{min(r['sigma']):.2f}–{max(r['sigma']):.2f}"
        eps_txt = "∞" if not r["epsilon"] else f"{max(r['epsilon']):.2f}"
        for measure, key in (("unseen test speakers", "uar"), ("personal test, global heads", "personal_global"),
                             ("personal test, personal heads", "personal_personal")):  # fmt: skip
            out.append([_label(r), sig, eps_txt, measure, *(cell(r[key][str(k)]) for k in EXITS)])
    return header, out


def differences(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Paired over seeds, per setting: personal − global heads and personal heads − base model (personal
    test); DP − no DP (unseen speakers and personal heads)."""
    nodp = rows[0]
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        for k in map(str, EXITS):
            pp, pg, pb = (
                _by_seed(r, key, k) for key in ("personal_personal", "personal_global", "personal_base")
            )
            out.setdefault(f"{_label(r)}: personal − global heads, personal test", {})[k] = common.paired(
                pp, pg
            )
            out.setdefault(f"{_label(r)}: personal heads − base model, personal test", {})[k] = common.paired(
                pp, pb
            )
            if r is not nodp:
                for measure, key in (
                    ("unseen test speakers", "uar"),
                    ("personal test, personal heads", "personal_personal"),
                ):
                    a, b = _by_seed(r, key, k), _by_seed(nodp, key, k)
                    out.setdefault(f"{_label(r)} − no DP, {measure}", {})[k] = common.paired(a, b)
    return out


def _by_seed(row: dict[str, Any], key: str, k: str) -> dict[int, float]:
    return dict(zip(row["seeds"], row[key][k], strict=True))


def difference_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["paired difference (95 % t over seeds)"] + [f"exit {k}" for k in EXITS]
    return header, [
        [name, *(common.ci_cell(d[str(k)]) for k in EXITS)] for name, d in differences(rows).items()
    ]


if __name__ == "__main__":
    main()
