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

Reproduce (first run generates the corpus and trains the base model, ~10 min on 2 loaded cores; the
federated runs reuse cached features and take well under a minute each):

    .venv/bin/python benchmarks/adaptation.py --seeds 0 1 2 --fractions 0.1 0.2
    .venv/bin/python benchmarks/adaptation.py --ablations          # SD loss ablations at 10 % labels

Writes ``benchmarks/results/adaptation.json`` + ``adaptation.png`` (``adaptation.ablations.*`` with
``--ablations``); run directories, corpus, base model and cache live under ``--work`` (runs/adaptation).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsd.clients.app import make_client_app, model_crop
from fedsd.clients.device import SIM_CACHE, simulated_device_config
from fedsd.clients.training import evaluate_cached
from fedsd.config import load_config
from fedsd.data.dataset import rows_by_ids
from fedsd.data.manifest import read_manifest
from fedsd.data.partition import Partition, make_partition
from fedsd.data.synthetic import generate_corpus
from fedsd.features import FeatureCache
from fedsd.model.multiexit import MultiExitSER
from fedsd.server.federation import FederationSpec, run_federation
from fedsd.server.inprocess import InProcessGrid
from fedsd.server.prepare import server_pool_splits

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
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


def _quiet(_: str) -> None:
    pass


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


# ---------------------------------------------------------------------------------------- set-up
def ensure_corpus(path: Path, speakers: int, sentences: int, log: Callable[[str], None]) -> Path:
    if not (path / "manifest.csv").exists():
        log(f"generating the synthetic corpus ({speakers} speakers × {sentences} sentences) → {path}")
        generate_corpus(path, speakers=speakers, sentences=sentences, seed=0, progress=False)
    return path


def speaker_split(cfg_overrides: dict[str, Any], speaker_seed: int) -> Partition:
    """Test speakers, server pool and device speakers, fixed for the whole benchmark."""
    cfg = load_config(DEMO, cfg_overrides)
    fc = cfg.federated
    rows = [r for r in read_manifest(cfg.data.manifest_path) if r.label]
    return make_partition(
        rows,
        num_clients=fc.num_clients,
        by="speaker",
        label_fraction=1.0,
        test_speakers=fc.test_speakers,
        server_speakers=fc.server_speakers,
        seed=speaker_seed,
    )


def ensure_base_model(
    cfg_overrides: dict[str, Any], split: Partition, out: Path, log: Callable[[str], None]
) -> tuple[Path, float]:
    """The central base model (self-distillation on the server pool), trained once and reused."""
    best = out / "best"
    if (best / "fedsd.json").exists():
        log(f"base model: reusing {best}")
        return best, 0.0
    from fedsd.train import train

    cfg = load_config(DEMO, cfg_overrides)
    rows = read_manifest(cfg.data.manifest_path)
    splits = server_pool_splits(split, rows, cfg.train.seed)
    log(
        f"base model: training centrally on {len(split.server_speakers)} server speakers "
        f"({len(splits['train'])} train / {len(splits['valid'])} valid utterances) → {out}"
    )
    t0 = time.perf_counter()
    res = train(cfg, out, splits=splits, log=_quiet)
    log(f"base model trained in {time.perf_counter() - t0:.0f} s (best epoch {res.best_epoch})")
    return res.best_dir, time.perf_counter() - t0


def device_partition(
    split: Partition, rows_all: list, seed: int, fraction: float, num_clients: int
) -> Partition:
    """The fixed test/server speakers of ``split``; devices and labels re-drawn from ``seed``."""
    held = set(split.test_speakers) | set(split.server_speakers)
    device_rows = [r for r in rows_all if r.label and r.speaker not in held]
    sub = make_partition(
        device_rows, num_clients=num_clients, by="speaker", label_fraction=fraction, seed=seed
    )
    return Partition(
        config={**split.config, "label_fraction": fraction, "speaker_seed": split.seed, "device_seed": seed},
        seed=seed,
        label_names=split.label_names,
        test_utt_ids=split.test_utt_ids,
        test_speakers=split.test_speakers,
        server_utt_ids=split.server_utt_ids,
        server_speakers=split.server_speakers,
        clients=sub.clients,
    )


# ---------------------------------------------------------------------------------------- runs
def federate(
    overrides: dict[str, Any],
    partition: Path,
    base: Path,
    run_dir: Path,
    cache: Path,
    log: Callable[[str], None] = _quiet,
) -> dict[str, Any]:
    """One in-process federated run; cached in ``run_dir/bench.json`` under a key of its inputs."""
    key = _digest({"overrides": overrides, "partition": partition.read_text(), "base": str(base)})
    done = run_dir / "bench.json"
    if done.exists():
        prev = json.loads(done.read_text())
        if prev.get("key") == key:
            return prev | {"cached": True}
    cfg = load_config(DEMO, overrides)
    spec = FederationSpec(
        config=str(DEMO),
        run_dir=str(run_dir),
        base_model=str(base),
        partition=str(partition),
        cache_dir=str(cache),
        overrides=overrides,
    )
    device_cfg = simulated_device_config(cfg, partition, base, run_dir) | {SIM_CACHE: str(cache)}
    n = len(Partition.load(partition).clients)
    grid = InProcessGrid(
        make_client_app(device_cfg), [{"partition-id": i, "num-partitions": n} for i in range(n)]
    )
    t0 = time.perf_counter()
    result = run_federation(grid, spec, log=log)
    seconds = time.perf_counter() - t0
    hist = result.history
    exits = sorted(int(k[4:-4]) for k in hist[0] if k.startswith("exit") and k.endswith("/uar"))
    trained = [rec.get("train", {}) for rec in hist[1:]]
    out = {
        "key": key,
        "seconds": seconds,
        "before": {str(k): hist[0][f"exit{k}/uar"] for k in exits},
        "after": {str(k): hist[-1][f"exit{k}/uar"] for k in exits},
        "curve": {str(k): [rec[f"exit{k}/uar"] for rec in hist] for k in exits},
        "rounds": len(hist) - 1,
        "train_reports": trained,
    }
    done.write_text(json.dumps(out, indent=1) + "\n")
    return out | {"cached": False}


def teacher_quality(base: Path, split: Partition, rows_all: list, root: Path, cache: Path) -> dict[str, Any]:
    """Base-model UAR per exit on the test speakers and on all device utterances (with every label)."""
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
            from fedsd.clients.training import head_outputs

            logits = head_outputs(model, feats, model.exits, list(range(len(rows))))
        teacher = logits[model.exits[-1]].logits.argmax(-1)
        out[f"{name}: agreement with teacher"] = {
            str(k): float((logits[k].logits.argmax(-1) == teacher).float().mean()) for k in model.exits[:-1]
        }
    return out


# ---------------------------------------------------------------------------------------- report
def _cell(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}"


def markdown_table(rows: list[tuple[str, str, dict[str, list[float]]]], exits: Sequence[int]) -> str:
    head = "| labels | method | " + " | ".join(f"exit {k}" for k in exits) + " |"
    sep = "|---|---|" + "---:|" * len(exits)
    lines = [head, sep]
    for labels, method, per_exit in rows:
        lines.append(f"| {labels} | {method} | " + " | ".join(_cell(per_exit[str(k)]) for k in exits) + " |")
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
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "adaptation", help="corpus, model, runs, cache"
    )
    ap.add_argument("--corpus", type=Path, help="existing synthetic corpus (default: WORK/corpus, generated)")
    ap.add_argument("--speakers", type=int, default=24)
    ap.add_argument("--sentences", type=int, default=12)
    ap.add_argument("--base-model", type=Path, help="reuse this central checkpoint (default: WORK/base)")
    ap.add_argument("--speaker-seed", type=int, default=0, help="draws test and server speakers (fixed)")
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
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=5)
    ap.add_argument("--ablations", action="store_true", help="SD loss/optimizer ablations instead")
    ap.add_argument("--ablation-fraction", type=float, default=0.1)
    ap.add_argument("--variants", nargs="+", help=f"run these (CE only always): {', '.join(ABLATIONS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adaptation")
    ap.add_argument("--verbose", action="store_true", help="show Flower's per-round log")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    work = args.work.resolve()
    corpus = ensure_corpus((args.corpus or work / "corpus").resolve(), args.speakers, args.sentences, log)
    common = {
        "data.root": str(corpus),
        "data.manifest": str(corpus / "manifest.csv"),
        "data.synth.speakers": args.speakers,
        "data.synth.sentences": args.sentences,
        "federated.rounds": args.rounds,
        "federated.local_epochs": args.local_epochs,
    }
    if args.base_per_seed and args.base_model:
        ap.error("--base-per-seed trains one base model per seed; it cannot take --base-model")
    cache = work / "cache"
    rows_all = read_manifest(corpus / "manifest.csv")
    setups: dict[int, dict[str, Any]] = {}

    def setup(spk_seed: int) -> dict[str, Any]:
        """Speaker split, base model and its quality for one speaker seed (memoized)."""
        if spk_seed in setups:
            return setups[spk_seed]
        split = speaker_split(common, spk_seed)
        log(
            f"speakers (seed {spk_seed}): test {', '.join(split.test_speakers)}; server pool "
            f"{len(split.server_speakers)}; devices {sum(len(c.speakers) for c in split.clients)}"
        )
        if args.base_model:
            base, seconds = args.base_model.resolve(), 0.0
        else:
            best, seconds = ensure_base_model(common, split, work / f"base-spk{spk_seed}", log)
            base = best.parent / args.checkpoint
        quality = teacher_quality(base, split, rows_all, corpus, cache)
        for name, per_exit in quality.items():
            log(
                f"base model {base.parent.name}/{base.name}, {name}: "
                + ", ".join(f"exit {k} {v:.3f}" for k, v in per_exit.items())
            )
        tag = f"spk{spk_seed}-{base.parent.name}-{base.name}-{_digest(str(base))[:6]}"
        setups[spk_seed] = {"split": split, "base": base, "seconds": seconds, "quality": quality, "tag": tag}
        return setups[spk_seed]

    num_clients = load_config(DEMO, common).federated.num_clients or 8

    variants = ABLATIONS if args.ablations else MAIN
    if args.variants and not args.ablations:
        ap.error("--variants picks ablations: add --ablations")
    if args.variants:
        unknown = sorted(set(args.variants) - set(ABLATIONS))
        if unknown:
            ap.error(f"--variants {unknown}: choose from {', '.join(ABLATIONS)}")
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
                part_path = work / "partitions" / f"spk{spk_seed}-f{frac:g}-s{seed}.json"
                if not part_path.exists():
                    device_partition(split, rows_all, seed, frac, num_clients).save(part_path)
                overrides = common | {
                    "federated.mode": mode,
                    "federated.seed": seed,
                    "federated.label_fraction": frac,
                    **extra,
                }
                run_dir = work / "runs" / base_tag / f"f{frac:g}-s{seed}-{mode}-{_digest(overrides)}"
                res = federate(overrides, part_path, base, run_dir, cache)
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
                    | {"overrides": extra, "run_dir": str(run_dir)}
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
    total = time.perf_counter() - t_start
    fed_seconds = sum(r["seconds"] for r in runs)
    fresh = [r for r in runs if not r["cached"]]
    print()
    print(
        f"{len(runs)} federated runs, {fed_seconds:.0f} s of federation in all "
        f"({fed_seconds / len(runs):.0f} s each; {len(fresh)} run now, the rest cached in the work dir); "
        f"base model training {sum(st['seconds'] for st in setups.values()):.0f} s now; this invocation {total:.0f} s; work dir {work}"
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
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "setup": {
            "corpus": str(corpus),
            "speakers": args.speakers,
            "sentences": args.sentences,
            "base_per_seed": args.base_per_seed,
            "splits": {
                str(k): {
                    "test_speakers": st["split"].test_speakers,
                    "server_speakers": st["split"].server_speakers,
                    "device_speakers": sorted(s for c in st["split"].clients for s in c.speakers),
                    "base_model": str(st["base"]),
                }
                for k, st in setups.items()
            },
            "seeds": args.seeds,
            "fractions": fractions,
            "config": str(DEMO.relative_to(ROOT)),
            "overrides": common | {"data.root": "<corpus>", "data.manifest": "<corpus>/manifest.csv"},
            "engine": "inprocess",
            "torch_threads": args.threads,
        },
        "base_model_quality": {str(k): st["quality"] for k, st in setups.items()},
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
            "total": total,
            "base_model_training_now": sum(st["seconds"] for st in setups.values()),
            "federated_runs": fed_seconds,
        },
    }
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    plot(table_rows, exits, png_path, title)
    log(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
