"""What sample-level differential privacy costs: shallow-exit UAR at ε ≈ 1, 3, 8, without DP, and on the
DP-SGD path without noise or clipping (σ = 0); the time overhead of DP-SGD on a device.

Setting: the adaptation benchmark's (``benchmarks/adaptation.py``) recipe, configs/scratch.yaml: synthetic
corpus (36 speakers × 12 sentences × 4 emotions), one central base model on a fixed speaker split
(``--speaker-seed`` 0: 4 test speakers, 16 server speakers, the rest dealt into 8 devices), devices at
exits [1, 2, 3] with the frozen deep exit 4 as teacher, ``--fraction`` 10 % labels, self-distillation,
5 rounds × 5 local epochs over the in-process grid. Per seed (0, 1, 2) the devices, labels and local seed
change; test speakers and base model are fixed. UAR is on the unseen test speakers.

Arms (the same per-utterance loss in every arm: CE of a labelled clip + KD, averaged over the batch,
``fedsd.training.distill``):

- **no DP**: plain local training (shuffled mini-batches, Adam);
- **DP path, σ = 0, no clipping**: the DP-SGD code path (Poisson sampling at q = B/n, Opacus, mean over
  the expected batch) with noise multiplier 0 and clip norm 1e6: no privacy (ε = ∞). "ε − σ = 0" isolates
  what noise and clipping cost; "σ = 0 − no DP" what Poisson sampling and the DP path change;
- **ε = 1, 3, 8**: ``federated.dp.target_epsilon`` (δ = 1e-4 per device, C = 1): every device calibrates
  σ once so that the 5 rounds spend exactly that ε, accounted with Opacus' RDP accountant across rounds.

Personal heads are **not** trained under DP in any arm: after the last round each device fine-tunes a
private copy of its (DP-trained) global heads on its own speech without DP (``personalize_epochs``).
Why: they never leave the device, and under DP their metrics are withheld from the server too, so DP has
nothing to protect there. The "personal heads" rows therefore measure DP-trained global heads plus a
non-private on-device fine-tuning, as the table says.

Overhead: the same device's local training (cached features, one round of 5 epochs) with and without
DP, interleaved, median of repeats; reported as a ratio (the machine is shared, absolute times drift).

Reproduce (every size defaults to the recipe's value; the corpus and base model are made in the work
directory on first use):

    .venv/bin/python benchmarks/privacy.py                   # all arms, seeds 0 1 2
    .venv/bin/python benchmarks/privacy.py --speakers 6 --sentences 1 --clients 2 --test-speakers 2 \
        --server-speakers 2 --base-epochs 1 --rounds 1 --local-epochs 1 --seeds 0 --epsilons 8 \
        --repeats 1                                          # tiny

Writes ``benchmarks/results/privacy.json`` (with provenance, see benchmarks/common/) and ``privacy.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)
from common import cell, mean_std, personal_results  # noqa: E402

from fedsd.report import markdown_table  # noqa: E402

EXITS = (1, 2, 3)
NO_DP, SIGMA0 = "no DP", "DP path, σ = 0, no clipping"
NO_CLIP = 1e6
"""Clip norm of the σ = 0 arm: far above any per-utterance gradient norm of the heads, i.e. no clipping."""
PERSONAL_HEADS = "personal test, personal heads (fine-tuned without DP, never sent)"
NOTES = (
    "Every arm trains with the same per-utterance loss (CE of a labelled clip + KD, averaged over the batch). "
    "Personal heads are fine-tuned on each device without DP after the last round, in every arm: they never "
    "leave the device and under DP their metrics are withheld from the server, so DP covers the global heads "
    "only. 'DP path, σ = 0, no clipping' is DP-SGD's code path and sampling without noise or clipping (no "
    "privacy): ε − that arm is what noise and clipping cost."
)


def overhead(
    base: Path, partition: Path, corpus: Path, cache: Path, repeats: int, delta: float, epochs: int
) -> dict[str, Any]:
    """Median seconds of one round of local training on device 0 (exit 3: heads 1-3), with and without DP."""
    from fedsd.clients.dp_training import train_heads_private
    from fedsd.clients.training import LocalTrainConfig, plan_exits, train_heads
    from fedsd.data.dataset import rows_by_ids
    from fedsd.data.manifest import read_manifest
    from fedsd.data.partition import Partition
    from fedsd.model.multiexit import MultiExitSER
    from fedsd.security.privacy import calibrate_noise, local_schedule
    from fedsd.training.cached import model_crop
    from fedsd.training.features import FeatureCache

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
    (dashed; fine-tuned without DP) heads; horizontal lines: no DP (dotted), DP path at σ = 0 (dash-dot)."""
    dp_rows = [r for r in rows if r["target_epsilon"] is not None]
    nodp = next(r for r in rows if _label(r) == NO_DP)
    sigma0 = next((r for r in rows if _label(r) == SIGMA0), None)
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
                    if sigma0 is not None:
                        ax.axhline(mean_std(sigma0[key][str(k)])[0], ls="-.", lw=0.8, color=color)
            ax.axhline(0.25, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.set_xlabel("target ε per device over the run (δ = 1e-4)")
            ax.set_title(title, fontsize=9)
        axes[0].set_ylabel("UAR (dotted: no DP; dash-dot: DP path at σ = 0)")
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
    arms: list[tuple[str, float | None]] = [(NO_DP, None), (SIGMA0, None)]
    arms += [(f"ε = {eps:g}", eps) for eps in sorted(args.epsilons, reverse=True)]
    rows: list[dict[str, Any]] = []
    for arm, eps in arms:
        rows.append(run_setting(args, bench, split, base, eps, arm))
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
    print(NOTES)
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
        "notes": NOTES,
    }
    png = args.out.with_suffix(".png")
    return bench.publish(args.out.with_suffix(".json"), png, payload, args, lambda path: plot(rows, path))


def run_setting(
    args: argparse.Namespace, bench: common.FedBench, split: Any, base: Path, eps: float | None, arm: str
) -> dict[str, Any]:
    """Every seed of one arm (``eps`` None: no DP, or the σ = 0 DP path for ``arm`` SIGMA0): unseen-speaker
    UAR of the final global heads, personal-test UAR of the global and the personal heads, ε spent and σ."""
    fed = bench.config().federated
    row: dict[str, Any] = {"arm": arm, "target_epsilon": eps, "uar": {str(k): [] for k in EXITS}, "epsilon": [],
                           "sigma": [], "device_seconds": [], "seeds": list(args.seeds),
                           "personal_global": {str(k): [] for k in EXITS},
                           "personal_personal": {str(k): [] for k in EXITS}}  # fmt: skip
    dp: dict[str, Any] = {}
    wrap, key_extra = None, None
    if eps is not None:
        dp = {"federated.dp": {"target_epsilon": eps, "delta": args.delta, "max_grad_norm": 1.0,
                               "rounds": fed.rounds}}  # fmt: skip
    elif arm == SIGMA0:
        wrap = dp_path_without_noise(args.delta)
        key_extra = {"devices": "DP-SGD path, σ = 0", "clip": NO_CLIP}
    name = "nodp" if arm == NO_DP else ("sigma0" if eps is None else f"eps{eps:g}")
    for seed in args.seeds:
        res = bench.run_seed(split, base, seed, args.fraction, f"privacy/{name}-s{seed}", extra=dp, wrap=wrap,
                             key_extra=key_extra)  # fmt: skip
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
        if dp:
            last = [c["metrics"] for c in reports[-1].get("clients", [])]
            row["epsilon"].append(max(m["dp-epsilon"] for m in last))
            row["sigma"] += sorted({round(m["dp-noise-multiplier"], 4) for m in last})
        elif wrap is not None:  # what the devices ran, from their own event logs (the reply drops dp-*)
            row["sigma"] += sorted(
                {round(e["dp_noise_multiplier"], 4) for e in _train_events(res["run_dir"])}
            )
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


def dp_path_without_noise(delta: float) -> Callable[[Any], Any]:
    """Wrap the honest ClientApp: every train message asks the device for DP-SGD at σ = 0 with clip norm
    ``NO_CLIP`` (the device's own DP path: Poisson sampling, Opacus, the same per-utterance loss), and the
    reply's ``dp-*`` metrics are dropped (its ε is ∞, which a reply cannot carry: the server accepts
    finite numbers only; this arm is not private, so the server runs it as a plain federation)."""
    from flwr.app import Message

    def wrap(honest: Any) -> Callable[[Message, Any], Message]:
        def device(msg: Message, context: Any) -> Message:
            train = msg.metadata.message_type == "train" and msg.has_content()
            if train:
                cfg = msg.content.config_records["config"]
                cfg["dp-noise-multiplier"], cfg["dp-max-grad-norm"], cfg["dp-delta"] = 0.0, NO_CLIP, delta
            reply = honest(msg, context)
            if train and not reply.has_error() and "metrics" in reply.content.metric_records:
                metrics = reply.content.metric_records["metrics"]
                for key in [k for k in metrics if k.startswith("dp-")]:
                    del metrics[key]
            return reply

        return device

    return wrap


def _train_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every device's train events of a benchmark run (``device-events/*.jsonl``, see FedBench.federate)."""
    import json

    return [
        e
        for path in sorted((Path(run_dir) / "device-events").glob("*.jsonl"))
        for e in map(json.loads, path.read_text(encoding="utf-8").splitlines())
        if e.get("kind") == "train"
    ]


def _label(r: dict[str, Any]) -> str:
    return r.get("arm") or (NO_DP if r["target_epsilon"] is None else f"ε = {r['target_epsilon']:g}")


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
                             (PERSONAL_HEADS, "personal_personal")):  # fmt: skip
            out.append([_label(r), sig, eps_txt, measure, *(cell(r[key][str(k)]) for k in EXITS)])
    return header, out


def differences(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Paired over seeds, per arm: personal − global heads and personal heads − base model (personal
    test); each DP arm − no DP, and − the σ = 0 DP path (noise and clipping only), unseen speakers and
    personal heads; the σ = 0 path − no DP (sampling and code path)."""
    nodp = next(r for r in rows if _label(r) == NO_DP)
    sigma0 = next((r for r in rows if _label(r) == SIGMA0), None)
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
            refs = [nodp] if r is sigma0 else [] if r is nodp else [nodp, sigma0]
            for ref in (x for x in refs if x is not None):
                for measure, key in (("unseen test speakers", "uar"), (PERSONAL_HEADS, "personal_personal")):
                    a, b = _by_seed(r, key, k), _by_seed(ref, key, k)
                    out.setdefault(f"{_label(r)} − {_label(ref)}, {measure}", {})[k] = common.paired(a, b)
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
