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

Reproduce (reuses ``runs/adaptation`` when present, else generates the corpus and trains the base
model first, ~10 min):

    .venv/bin/python benchmarks/privacy.py                   # ε 1, 3, 8 and no DP, seeds 0 1 2

Writes ``benchmarks/results/privacy.json`` and ``privacy.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptation import (  # noqa: E402  (a sibling script, not a package)
    ROOT,
    device_partition,
    ensure_base_model,
    ensure_corpus,
    federate,
    mean_std,
    speaker_split,
)

from fedsd.clients.app import model_crop  # noqa: E402
from fedsd.clients.dp_training import train_heads_private  # noqa: E402
from fedsd.clients.training import LocalTrainConfig, plan_exits, train_heads  # noqa: E402
from fedsd.data.dataset import rows_by_ids  # noqa: E402
from fedsd.data.manifest import read_manifest  # noqa: E402
from fedsd.data.partition import Partition  # noqa: E402
from fedsd.features import FeatureCache  # noqa: E402
from fedsd.model.multiexit import MultiExitSER  # noqa: E402
from fedsd.privacy import calibrate_noise, local_schedule  # noqa: E402
from fedsd.report import markdown_table  # noqa: E402

EXITS = (1, 2, 3)


def overhead(
    base: Path, partition: Path, corpus: Path, cache: Path, repeats: int, delta: float
) -> dict[str, Any]:
    """Median seconds of one round of local training on device 0 (exit 3: heads 1-3), with and without DP."""
    model = MultiExitSER.from_pretrained(base)
    client = Partition.load(partition).client(0)
    rows = rows_by_ids(read_manifest(corpus / "manifest.csv"), client.utt_ids)
    lcfg = LocalTrainConfig(exit=3, epochs=5, batch_size=16, lr=1e-3)
    plan = plan_exits(model.exits, 3, lcfg)
    feats = FeatureCache(cache, model, model_crop(model)).get(
        rows, corpus, plan.needed, label_names=model.label_names, labelled=list(client.labelled)
    )
    q, steps = local_schedule(len(feats.utt_ids), lcfg.batch_size, lcfg.epochs)
    sigma = calibrate_noise(3.0, delta, q, steps * 5)
    heads0 = {k: v.clone() for k, v in model.head_state_dict().items()}
    times: dict[str, list[float]] = {"no DP": [], "DP-SGD": []}
    for _ in range(repeats):
        for name in times:
            model.load_head_state_dict(heads0)
            t0 = time.perf_counter()
            if name == "no DP":
                train_heads(model, feats, plan, lcfg)
            else:
                train_heads_private(
                    model,
                    feats,
                    plan,
                    lcfg,
                    noise_multiplier=sigma,
                    max_grad_norm=1.0,
                    sample_rate=q,
                    steps=steps,
                )
            times[name].append(time.perf_counter() - t0)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "adaptation")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--delta", type=float, default=1e-4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7, help="timing repeats (overhead)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "privacy")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    work = args.work.resolve()
    corpus = ensure_corpus(work / "corpus", 24, 12, log)
    common = {
        "data.root": str(corpus),
        "data.manifest": str(corpus / "manifest.csv"),
        "data.synth.speakers": 24,
        "data.synth.sentences": 12,
        "federated.rounds": args.rounds,
        "federated.local_epochs": 5,
    }
    split = speaker_split(common, 0)
    base, _ = ensure_base_model(common, split, work / "base-spk0", log)
    cache = work / "cache"
    rows_all = read_manifest(corpus / "manifest.csv")
    from fedsd.config import load_config

    num_clients = load_config(ROOT / "configs" / "demo.yaml", common).federated.num_clients or 8
    settings: list[float | None] = [None, *sorted(args.epsilons, reverse=True)]
    rows: list[dict[str, Any]] = []
    for eps in settings:
        row: dict[str, Any] = {"target_epsilon": eps, "uar": {str(k): [] for k in EXITS}, "epsilon": [], "sigma": [],
                               "device_seconds": []}  # fmt: skip
        for seed in args.seeds:
            part = work / "partitions" / f"spk0-f{args.fraction:g}-s{seed}.json"
            if not part.exists():
                device_partition(split, rows_all, seed, args.fraction, num_clients).save(part)
            overrides = common | {
                "federated.label_fraction": args.fraction,
                "federated.seed": seed,
                "federated.mode": "sd",
            }
            if eps is not None:
                overrides |= {
                    "federated.dp": {"target_epsilon": eps, "delta": args.delta, "max_grad_norm": 1.0,
                                     "rounds": args.rounds},
                }  # fmt: skip
            name = "nodp" if eps is None else f"eps{eps:g}"
            run_dir = work / "runs" / "privacy" / f"{name}-s{seed}"
            res = federate(overrides, part, base, run_dir, cache)
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
                + (" (cached)" if res.get("cached") else f" ({res['seconds']:.0f} s)")
            )
        rows.append(row)
    before = res["before"]

    log("timing local training with and without DP (device 0, exit 3, interleaved)")
    part0 = work / "partitions" / f"spk0-f{args.fraction:g}-s{args.seeds[0]}.json"
    ov = overhead(base, part0, corpus, cache, args.repeats, args.delta)

    header = ["device DP", "σ (calibrated)", f"max ε after {args.rounds} rounds"] + [
        f"exit {k} UAR" for k in EXITS
    ]
    table_rows = [["base model (before federation)", "–", "–"] + [f"{before[str(k)]:.3f}" for k in EXITS]]
    for r in rows:
        label = "none" if r["target_epsilon"] is None else f"target ε = {r['target_epsilon']:g}"
        sig = "–" if not r["sigma"] else f"{min(r['sigma']):.2f}–{max(r['sigma']):.2f}"
        eps_txt = "∞" if not r["epsilon"] else f"{max(r['epsilon']):.2f}"
        cells = []
        for k in EXITS:
            m, s = mean_std(r["uar"][str(k)])
            cells.append(f"{m:.3f} ± {s:.3f}")
        table_rows.append([label, sig, eps_txt, *cells])
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
        f"{time.perf_counter() - t_start:.0f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "setting": {
            "corpus": "synthetic 24 speakers x 12 sentences x 4 emotions",
            "base_model": str(base),
            "seeds": args.seeds,
            "label_fraction": args.fraction,
            "delta": args.delta,
            "rounds": args.rounds,
            "exits_mix": [1, 2, 3],
        },
        "before": before,
        "rows": rows,
        "overhead": ov,
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    log(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
