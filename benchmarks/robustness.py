"""One malicious device among eight: what plain averaging loses and what the defences keep.

Setting: the adaptation benchmark's (``benchmarks/adaptation.py``): synthetic corpus (24 speakers), its
central base model (speaker seed 0), 8 simulated devices at exits [1, 2, 3] (teacher: frozen exit 4),
20 % labels, self-distillation, 5 rounds × 5 local epochs, in-process grid, seeds 0 1 2. Device 0 is
compromised: every round it replaces its honest update u by g + f·(u − g) (g = the global heads it
received), f = 100 ("scaled") or f = −100 ("sign-flipped"). UAR on the 4 unseen test speakers.

Defences compared (config ``federated.*``): plain weighted mean; ``max_update_norm_ratio: 5``;
``aggregation: trimmed_mean`` (trim 0.2 → one device cut at each end of 8 per coordinate);
``aggregation: median``. Each is also run without an attacker (the price of the defence).

    .venv/bin/python benchmarks/robustness.py        # ~20 min on 2 loaded cores (cached features)

Writes ``benchmarks/results/robustness.json`` and ``robustness.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, Context, Message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adaptation import (  # noqa: E402  (a sibling script, not a package)
    DEMO,
    ROOT,
    device_partition,
    ensure_base_model,
    ensure_corpus,
    mean_std,
    speaker_split,
)

from fedsd.clients.app import make_client_app  # noqa: E402
from fedsd.clients.device import SIM_CACHE, simulated_device_config  # noqa: E402
from fedsd.config import load_config  # noqa: E402
from fedsd.data.manifest import read_manifest  # noqa: E402
from fedsd.data.partition import Partition  # noqa: E402
from fedsd.report import markdown_table  # noqa: E402
from fedsd.server.federation import FederationSpec, run_federation  # noqa: E402
from fedsd.server.inprocess import InProcessGrid  # noqa: E402

EXITS = (1, 2, 3)
DEFENCES: dict[str, dict[str, Any]] = {
    "mean (no defence)": {},
    "norm ratio 5": {"federated.max_update_norm_ratio": 5.0},
    "trimmed mean 0.2": {"federated.aggregation": "trimmed_mean", "federated.trim_fraction": 0.2},
    "median": {"federated.aggregation": "median"},
}
ATTACKS: dict[str, float | None] = {"none": None, "scaled ×100": 100.0, "sign-flipped ×100": -100.0}


def run(
    overrides: dict[str, Any], factor: float | None, partition: Path, base: Path, run_dir: Path, cache: Path
) -> dict[str, Any]:
    """One federated run with device 0 tampering its train replies by ``factor`` (None: honest)."""
    done = run_dir / "bench.json"
    key = json.dumps(
        {"overrides": overrides, "factor": factor, "partition": partition.read_text()}, sort_keys=True
    )
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return json.loads(done.read_text()) | {"cached": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(DEMO, overrides)
    spec = FederationSpec(
        config=str(DEMO), run_dir=str(run_dir), base_model=str(base), partition=str(partition),
        cache_dir=str(cache), overrides=overrides,
    )  # fmt: skip
    honest = make_client_app(simulated_device_config(cfg, partition, base, run_dir) | {SIM_CACHE: str(cache)})

    def device(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        attacker = int(context.node_config["partition-id"]) == 0
        if factor is not None and attacker and msg.metadata.message_type == "train" and not reply.has_error():
            sent = msg.content.array_records["arrays"]
            arrays = reply.content.array_records["arrays"]
            for k in list(arrays.keys()):
                u, g = arrays[k].numpy(), sent[k].numpy()
                arrays[k] = Array((g + factor * (u - g)).astype(u.dtype))
        return reply

    n = len(Partition.load(partition).clients)
    grid = InProcessGrid(device, [{"partition-id": i, "num-partitions": n} for i in range(n)])  # type: ignore[arg-type]
    t0 = time.perf_counter()
    hist = run_federation(grid, spec, log=lambda _: None).history
    out = {
        "key": key,
        "seconds": time.perf_counter() - t0,
        "before": {str(k): hist[0][f"exit{k}/uar"] for k in EXITS},
        "after": {str(k): hist[-1][f"exit{k}/uar"] for k in EXITS},
        "rejected": [len(r.get("train", {}).get("rejections", [])) for r in hist[1:]],
    }
    done.write_text(json.dumps(out, indent=1) + "\n")
    return out | {"cached": False}


def plot(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = list(DEFENCES)
    width = 0.8 / len(ATTACKS)
    for j, attack in enumerate(ATTACKS):
        stats = [mean_std(results[f"{d}|{attack}"]["1"]) for d in names]
        xs = [i + (j - (len(ATTACKS) - 1) / 2) * width for i in range(len(names))]
        ax.bar(
            xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=f"attack: {attack}"
        )
    ax.axhline(0.25, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("exit 1 UAR, unseen speakers")
    ax.set_title("One malicious device of 8 (mean ± std over 3 seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="lower center", ncol=3, framealpha=0.95)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "adaptation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    work = args.work.resolve()
    corpus = ensure_corpus(work / "corpus", 24, 12, log)
    common = {
        "data.root": str(corpus), "data.manifest": str(corpus / "manifest.csv"), "data.synth.speakers": 24,
        "data.synth.sentences": 12, "federated.rounds": 5, "federated.local_epochs": 5,
    }  # fmt: skip
    split = speaker_split(common, 0)
    base, _ = ensure_base_model(common, split, work / "base-spk0", log)
    rows_all = read_manifest(corpus / "manifest.csv")
    num_clients = load_config(DEMO, common).federated.num_clients or 8
    results: dict[str, dict[str, list[float]]] = {}
    rejected: dict[str, list[int]] = {}
    before: dict[str, float] = {}
    for defence, extra in DEFENCES.items():
        for attack, factor in ATTACKS.items():
            cell = results.setdefault(f"{defence}|{attack}", {str(k): [] for k in EXITS})
            for seed in args.seeds:
                part = work / "partitions" / f"spk0-f{args.fraction:g}-s{seed}.json"
                if not part.exists():
                    device_partition(split, rows_all, seed, args.fraction, num_clients).save(part)
                overrides = common | extra | {
                    "federated.label_fraction": args.fraction, "federated.seed": seed, "federated.mode": "sd",
                }  # fmt: skip
                tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in extra.items()) or "mean"
                run_dir = work / "runs" / "robustness" / f"{tag}-f{factor}-s{seed}"
                res = run(overrides, factor, part, base, run_dir, work / "cache")
                before = res["before"]
                for k in EXITS:
                    cell[str(k)].append(res["after"][str(k)])
                rejected.setdefault(f"{defence}|{attack}", []).append(sum(res["rejected"]))
                log(
                    f"{defence} / {attack} / seed {seed}: exit 1 {res['after']['1']:.3f}, "
                    f"rejected {sum(res['rejected'])}"
                    + (" (cached)" if res.get("cached") else f" ({res['seconds']:.0f} s)")
                )
    clean = results["mean (no defence)|none"]
    header = (
        ["aggregation", "attack"]
        + [f"exit {k} UAR" for k in EXITS]
        + ["Δ exit 1 vs clean mean", "rejected replies"]
    )
    rows = [["base model (before federation)", "–"] + [f"{before[str(k)]:.3f}" for k in EXITS] + ["", ""]]
    for key, cell in results.items():
        defence, attack = key.split("|")
        cells = [f"{mean_std(cell[str(k)])[0]:.3f} ± {mean_std(cell[str(k)])[1]:.3f}" for k in EXITS]
        delta = mean_std([a - b for a, b in zip(cell["1"], clean["1"], strict=True)])
        rows.append([defence, attack, *cells, f"{delta[0]:+.3f} ± {delta[1]:.3f}",
                     f"{sum(rejected[key]) / len(args.seeds):.1f}/run"])  # fmt: skip
    print()
    print(f"### One malicious device of {num_clients} (device 0), mean ± std over seeds {args.seeds}")
    print()
    print(markdown_table(header, rows))
    print(f"this run {time.perf_counter() - t_start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"before": before, "results": results, "rejected": rejected, "seeds": args.seeds}, indent=1
        )
        + "\n"
    )
    plot(results, args.out.with_suffix(".png"))
    log(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
