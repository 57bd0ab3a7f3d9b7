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

Reproduce (the recipe is configs/demo.yaml; every size defaults to its value; the corpus and base model
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
from common import cell, mean_std  # noqa: E402

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
    with common.figure(path, figsize=(5.5, 3.6)) as (_, ax):
        dp_rows = [r for r in rows if r["target_epsilon"] is not None]
        xs = [r["target_epsilon"] for r in dp_rows]
        for k in EXITS:
            means = [mean_std(r["uar"][str(k)])[0] for r in dp_rows]
            stds = [mean_std(r["uar"][str(k)])[1] for r in dp_rows]
            line = ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"exit {k}")
            nodp = [r for r in rows if r["target_epsilon"] is None][0]
            ax.axhline(mean_std(nodp["uar"][str(k)])[0], ls="--", lw=1, color=line[0].get_color())
        ax.axhline(0.25, color="grey", lw=0.8, ls=":", label="chance")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel("target ε per device over the run (δ = 1e-4)")
        ax.set_ylabel("UAR, unseen speakers")
        ax.set_title("Device DP-SGD: UAR vs ε (dashed: no DP)", fontsize=9)
        ax.legend(fontsize=7)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_federation_args(ap, "privacy")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--fraction", type=float, default=0.2)
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
        row: dict[str, Any] = {"target_epsilon": eps, "uar": {str(k): [] for k in EXITS}, "epsilon": [], "sigma": [],
                               "device_seconds": []}  # fmt: skip
        dp = {} if eps is None else {
            "federated.dp": {"target_epsilon": eps, "delta": args.delta, "max_grad_norm": 1.0, "rounds": fed.rounds},
        }  # fmt: skip
        name = "nodp" if eps is None else f"eps{eps:g}"
        for seed in args.seeds:
            res = bench.run_seed(split, base, seed, args.fraction, f"privacy/{name}-s{seed}", extra=dp)
            for k in EXITS:
                row["uar"][str(k)].append(res["after"][str(k)])
            reports = res["train_reports"]
            dev = [c["metrics"] for rep in reports for c in rep.get("clients", [])]
            row["device_seconds"] += [m["seconds"] for m in dev if "seconds" in m]
            if eps is not None:
                last = [c["metrics"] for c in reports[-1].get("clients", [])]
                row["epsilon"].append(max(m["dp-epsilon"] for m in last))
                row["sigma"] += sorted({round(m["dp-noise-multiplier"], 4) for m in last})
            log(
                f"{name} seed {seed}: UAR "
                + ", ".join(f"exit {k} {res['after'][str(k)]:.3f}" for k in EXITS)
                + (f"; max ε {row['epsilon'][-1]:.3f}" if eps is not None else "")
                + common.took(res)
            )
        rows.append(row)
    before = res["before"]

    log("timing local training with and without DP (device 0, exit 3, interleaved)")
    part0 = bench.partition(split, args.seeds[0], args.fraction)
    ov = overhead(base, part0, bench.corpus, bench.cache, args.repeats, args.delta, fed.local_epochs)

    header = ["device DP", "σ (calibrated)", f"max ε after {fed.rounds} rounds"] + [
        f"exit {k} UAR" for k in EXITS
    ]
    table_rows = [["base model (before federation)", "–", "–"] + [f"{before[str(k)]:.3f}" for k in EXITS]]
    for r in rows:
        label = "none" if r["target_epsilon"] is None else f"target ε = {r['target_epsilon']:g}"
        sig = "–" if not r["sigma"] else f"{min(r['sigma']):.2f}–{max(r['sigma']):.2f}"
        eps_txt = "∞" if not r["epsilon"] else f"{max(r['epsilon']):.2f}"
        table_rows.append([label, sig, eps_txt, *(cell(r["uar"][str(k)]) for k in EXITS)])
    print()
    print(
        f"### Shallow-exit UAR under device DP (mean ± std over seeds {args.seeds}, {args.fraction:.0%} labels)"
    )
    print()
    print(markdown_table(header, table_rows))
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
        "setting": bench.setting(split, base, args, delta=args.delta, exits_mix=fed.exits_mix),
        "exits": list(EXITS),
        "before": before,
        "rows": rows,
        "overhead": ov,
    }
    png = args.out.with_suffix(".png")
    return bench.publish(args.out.with_suffix(".json"), png, payload, args, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
