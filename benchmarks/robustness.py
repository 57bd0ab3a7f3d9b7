"""One malicious device among eight: what plain averaging loses and what the defences keep.

Setting: the adaptation benchmark's (``benchmarks/adaptation.py``) recipe, configs/scratch.yaml: synthetic
corpus (36 speakers × 12 sentences × 4 emotions), one central base model on a fixed speaker split
(``--speaker-seed`` 0: 4 test speakers, 16 server speakers), 8 simulated devices at exits [1, 2, 3]
(teacher: frozen exit 4), ``--fraction`` 20 % labels, self-distillation, 5 rounds × 5 local epochs,
in-process grid, seeds 0 1 2 (devices, labels and local seed; test speakers and base model fixed).
Device 0 is compromised: every round it replaces its honest update u by g + f·(u − g) (g = the global
heads it received), f = 100 ("scaled") or f = −100 ("sign-flipped"). UAR on the 4 unseen test speakers.

Defences compared (config ``federated.*``): plain weighted mean; ``max_update_norm_ratio: 5``;
``aggregation: trimmed_mean`` (trim 0.2 → one device cut at each end of 8 per coordinate);
``aggregation: median``. Each is also run without an attacker (the price of the defence).

Every size defaults to the recipe's (configs/scratch.yaml) value; corpus, base model and feature cache are
made in the work directory on first use.

    .venv/bin/python benchmarks/robustness.py        # 4 defences × 3 attacks × 3 seeds = 36 runs
    .venv/bin/python benchmarks/robustness.py --speakers 6 --sentences 1 --clients 2 --test-speakers 2 \
        --server-speakers 2 --base-epochs 1 --rounds 1 --local-epochs 1 --seeds 0 \
        --defences mean median --attacks none scaled          # tiny

Writes ``benchmarks/results/robustness.json`` (with provenance, see benchmarks/common/) and
``robustness.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)
from common import cell, mean_std  # noqa: E402

from fedsd.report import markdown_table  # noqa: E402

EXITS = (1, 2, 3)
DEFENCES: dict[str, dict[str, Any]] = {
    "mean (no defence)": {},
    "norm ratio 5": {"federated.max_update_norm_ratio": 5.0},
    "trimmed mean 0.2": {"federated.aggregation": "trimmed_mean", "federated.trim_fraction": 0.2},
    "median": {"federated.aggregation": "median"},
}
ATTACKS: dict[str, float | None] = {"none": None, "scaled ×100": 100.0, "sign-flipped ×100": -100.0}
# command-line names
DEFENCE_KEYS = dict(zip(("mean", "norm", "trimmed", "median"), DEFENCES, strict=True))
ATTACK_KEYS = dict(zip(("none", "scaled", "flipped"), ATTACKS, strict=True))


def attacker(factor: float | None) -> Callable[[Any], Any]:
    """Wrap the honest ClientApp: device 0 replaces its train update u by g + factor·(u − g)."""
    from flwr.app import Array, Context, Message

    def wrap(honest: Any) -> Callable[[Message, Context], Message]:
        def device(msg: Message, context: Context) -> Message:
            reply = honest(msg, context)
            bad = int(context.node_config["partition-id"]) == 0
            if factor is not None and bad and msg.metadata.message_type == "train" and not reply.has_error():
                sent = msg.content.array_records["arrays"]
                arrays = reply.content.array_records["arrays"]
                for k in list(arrays.keys()):
                    u, g = arrays[k].numpy(), sent[k].numpy()
                    arrays[k] = Array((g + factor * (u - g)).astype(u.dtype))
            return reply

        return device

    return wrap


def plot(
    results: dict[str, dict[str, list[float]]],
    path: Path,
    defences: list[str],
    attacks: list[str],
    title: str,
) -> None:
    names = defences
    with common.figure(path, figsize=(7.5, 3.6)) as (_, ax):
        width = 0.8 / len(attacks)
        for j, attack in enumerate(attacks):
            stats = [mean_std(results[f"{d}|{attack}"]["1"]) for d in names]
            xs = [i + (j - (len(attacks) - 1) / 2) * width for i in range(len(names))]
            ax.bar(
                xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=f"attack: {attack}"
            )
        ax.axhline(0.25, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel("exit 1 UAR, unseen speakers")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower center", ncol=len(attacks), framealpha=0.95)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_federation_args(ap, "robustness")
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument(
        "--defences", nargs="+", choices=list(DEFENCE_KEYS), default=list(DEFENCE_KEYS), help="which defences"
    )
    ap.add_argument(
        "--attacks", nargs="+", choices=list(ATTACK_KEYS), default=list(ATTACK_KEYS), help="which attacks"
    )
    args = ap.parse_args(argv)
    if "mean" not in args.defences or "none" not in args.attacks:
        ap.error("the clean reference (--defences mean, --attacks none) is always needed")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main, setup=common.FedBench.from_args)


def _main(args: argparse.Namespace, bench: common.FedBench) -> dict[str, Any]:
    run, log = bench.run, bench.run.log
    split, base = bench.fixed_base(args.speaker_seed)
    num_clients = bench.num_clients
    defences = {DEFENCE_KEYS[d]: DEFENCES[DEFENCE_KEYS[d]] for d in args.defences}
    attacks = {ATTACK_KEYS[a]: ATTACKS[ATTACK_KEYS[a]] for a in args.attacks}
    results: dict[str, dict[str, list[float]]] = {}
    rejected: dict[str, list[int]] = {}
    before: dict[str, float] = {}
    for defence, extra in defences.items():
        for attack, factor in attacks.items():
            per_exit = results.setdefault(f"{defence}|{attack}", {str(k): [] for k in EXITS})
            tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in extra.items()) or "mean"
            for seed in args.seeds:
                res = bench.run_seed(
                    split, base, seed, args.fraction, f"robustness/{tag}-f{factor}-s{seed}", extra=extra,
                    wrap=attacker(factor), key_extra={"attack": "device 0 sends g + factor (u - g)", "factor": factor},
                )  # fmt: skip
                before = res["before"]
                for k in EXITS:
                    per_exit[str(k)].append(res["after"][str(k)])
                n_rejected = sum(len(r.get("rejections", [])) for r in res["train_reports"])
                rejected.setdefault(f"{defence}|{attack}", []).append(n_rejected)
                log(
                    f"{defence} / {attack} / seed {seed}: exit 1 {res['after']['1']:.3f}, rejected {n_rejected}"
                    + common.took(res)
                )
    clean = results["mean (no defence)|none"]
    header = (
        ["aggregation", "attack"]
        + [f"exit {k} UAR" for k in EXITS]
        + ["Δ exit 1 vs clean mean", "rejected replies"]
    )
    rows = [["base model (before federation)", "–"] + [f"{before[str(k)]:.3f}" for k in EXITS] + ["", ""]]
    for key, per_exit in results.items():
        defence, attack = key.split("|")
        cells = [cell(per_exit[str(k)]) for k in EXITS]
        delta = common.paired(dict(enumerate(per_exit["1"])), dict(enumerate(clean["1"])))  # by seed
        rows.append([defence, attack, *cells, f"{delta['mean']:+.3f} ± {delta['std']:.3f}",
                     f"{sum(rejected[key]) / len(args.seeds):.1f}/run"])  # fmt: skip
    title = f"One malicious device of {num_clients} (device 0), mean ± std over seeds {args.seeds}"
    print()
    print(f"### {title}")
    print()
    print(markdown_table(header, rows))
    print(f"this run {run.seconds:.0f} s")
    payload = {
        "setting": bench.setting(split, base, args, defences=defences, attacks=attacks),
        "exits": list(EXITS),
        "before": before,
        "results": results,
        "rejected": rejected,
        "seeds": args.seeds,
    }
    png = args.out.with_suffix(".png")
    draw = lambda path: plot(results, path, list(defences), list(attacks), title)  # noqa: E731
    return bench.publish(args.out.with_suffix(".json"), png, payload, args, draw)


if __name__ == "__main__":
    main()
