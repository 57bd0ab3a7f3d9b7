"""Cost of one device round: a warm feature cache against recomputing the frozen backbone every epoch.

Why: on a device the backbone is frozen, so its head inputs are a pure function of the audio. fedsd
caches them on disk (``fedsd.training.features``) and a steady-state round only reads them back and trains the
small exit heads (docs/architecture.md §3). This script measures what that buys, on the device's real code path
(``plan_exits`` → ``FeatureCache.get`` → ``train_heads`` → ``heads_to_record``), and what a device
uploads per round. Variants, all timed in one run, interleaved in a freshly shuffled order per
repetition so that noise from other processes on a shared CPU spreads over all of them alike:

* ``no cache``   — every epoch recomputes the head inputs with the frozen backbone
                   (``hidden_for_exits`` + ``head.precompute`` under ``no_grad``), then trains the heads
                   on them; audio is decoded once per round (the variant's most favourable form).
* ``cold cache`` — the first round of a device: fills an empty cache (one backbone pass), then trains.
* ``warm cache`` — a steady-state round: every head input is read from disk, then the heads train.
* ``model load`` — ``MultiExitSER.from_pretrained`` of the saved model, which a deployed device pays
                   per message whatever the cache holds (every Flower message runs in a fresh process).

The no-cache and warm-cache rounds are timed at 1 torch intra-op thread and at torch's default (one per
core), side by side: a warm round is a few hundred tiny ops, and on a busy shared CPU their intra-op
thread synchronisation can cost more than the arithmetic. Every round starts from the same head weights
and ends with the reply's ArrayRecord. Targets: warm cache ≥ 50× faster than no cache (at the same thread
count); upload ≤ 1 % of the full model.

    .venv/bin/python benchmarks/round_cost.py                     # base, 32 × 4 s, exit 6, 2 epochs, 3 reps
    .venv/bin/python benchmarks/round_cost.py --backbone tiny --utterances 8 --seconds 1 --repeats 2

Writes ``benchmarks/results/round_cost.json`` (``--json``) with provenance (benchmarks/common/).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)
from flwr.app import MetricRecord, RecordDict  # noqa: E402
from flwr.common.serde import recorddict_to_proto  # noqa: E402

from fedsd.clients.training import ExitPlan, LocalTrainConfig, plan_exits, train_heads  # noqa: E402
from fedsd.data.audio import CropPolicy  # noqa: E402
from fedsd.data.dataset import SpeechDataset, collate_batch  # noqa: E402
from fedsd.data.manifest import ManifestRow, read_manifest  # noqa: E402
from fedsd.data.synthetic import generate_corpus  # noqa: E402
from fedsd.model import MultiExitSER, load_backbone  # noqa: E402
from fedsd.security.wire import heads_to_record  # noqa: E402
from fedsd.training.cached import model_crop  # noqa: E402
from fedsd.training.features import CachedFeatures, FeatureCache  # noqa: E402

LABELS = common.EMOTIONS
SPEEDUP_TARGET = 50.0
UPLOAD_TARGET = 0.01
VARIANTS = ("no_cache", "cold_cache", "warm_cache", "model_load")


def vkey(variant: str, threads: int) -> str:
    """``no_cache@2``: a variant timed with this many torch intra-op threads."""
    return f"{variant}@{threads}"


TITLES = {
    "no_cache": "no cache (backbone every epoch)",
    "cold_cache": "cold cache (first round: fill + train)",
    "warm_cache": "warm cache (steady state: read + train)",
    "model_load": "model load (`from_pretrained`, per message)",
}


def make_corpus(out: Path, utterances: int, seed: int) -> tuple[list[ManifestRow], Path]:
    """``utterances`` synthetic clips (2 or more speakers × sentences × 4 emotions), first N rows."""
    speakers = max(1, math.ceil(utterances / 16))
    sentences = min(12, max(1, math.ceil(utterances / (len(LABELS) * speakers))))
    while speakers * sentences * len(LABELS) < utterances:
        speakers += 1
    res = generate_corpus(
        out, speakers=speakers, sentences=sentences, emotions=LABELS, seed=seed, progress=False
    )
    return read_manifest(res.manifest)[:utterances], out


def labelled_mask(n: int, fraction: float, seed: int) -> list[bool]:
    """A device's scarce labels: ``round(n * fraction)`` labelled utterances drawn by seed."""
    chosen = set(random.Random(seed).sample(range(n), round(n * fraction)))
    return [i in chosen for i in range(n)]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Device:
    """One device's round on the real code path, with three ways of getting its head inputs."""

    def __init__(
        self,
        model: MultiExitSER,
        rows: list[ManifestRow],
        root: Path,
        labelled: list[bool],
        plan: ExitPlan,
        cfg: LocalTrainConfig,
        crop: CropPolicy,
        batch_size: int,
    ) -> None:
        self.model, self.rows, self.root, self.labelled = model, rows, root, labelled
        self.plan, self.cfg, self.crop, self.batch_size = plan, cfg, crop, batch_size
        self.initial_heads = model.head_state_dict()
        index = {n: i for i, n in enumerate(model.label_names)}
        self.labels = torch.tensor(
            [index[r.label] if m and r.label else -1 for r, m in zip(rows, labelled, strict=True)]
        )

    def reset(self) -> None:
        """Every round starts from the same global heads (what the server would send)."""
        self.model.load_head_state_dict(self.initial_heads)

    def reply(self, feats: CachedFeatures, losses: dict[str, float]) -> RecordDict:
        """The train reply's content, as ``fedsd.clients.train_task.train`` builds it."""
        metrics = {
            "num-examples": len(feats.utt_ids),
            "exit": self.cfg.exit,
            "n-labelled": int((feats.labels >= 0).sum()),
            "n-utterances": len(feats.utt_ids),
            "loss": float(losses.get("total", 0.0)),
            "cache-hits": feats.hits,
            "cache-misses": feats.misses,
            "seconds": 0.0,
        }
        arrays = heads_to_record(self.model.head_state_dict(self.plan.train))
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})

    @torch.no_grad()
    def backbone_features(self, waves: list[dict[str, Any]]) -> CachedFeatures:
        """Head inputs straight from the frozen backbone (what the cache would have stored)."""
        self.model.eval()
        inputs: dict[int, list[torch.Tensor]] = {k: [] for k in self.plan.needed}
        for s in range(0, len(waves), self.batch_size):
            batch = collate_batch(waves[s : s + self.batch_size])
            states = self.model.hidden_for_exits(
                batch["input_values"], batch["attention_mask"], self.plan.needed
            )
            for k in self.plan.needed:
                hidden, mask = states[k]
                pre = self.model.heads[str(k)].precompute(hidden, mask).float()
                for j in range(pre.shape[0]):
                    x = pre[j]
                    inputs[k].append(x[: int(mask[j].sum())] if x.dim() == 2 else x)
        ids = [r.utt_id for r in self.rows]
        return CachedFeatures(ids, inputs, self.labels.clone(), hits=0, misses=len(ids))

    def round_no_cache(self) -> tuple[RecordDict, CachedFeatures]:
        """Decode once, then per epoch: backbone forward → head inputs → one epoch of head training."""
        ds = SpeechDataset(
            self.rows, self.root, self.model.label_names, self.crop, labelled=self.labelled, train=False
        )
        waves = [ds[i] for i in range(len(ds))]
        params = [p for k in self.plan.train for p in self.model.heads[str(k)].parameters()]
        opt = torch.optim.Adam(params, lr=self.cfg.lr)  # one optimizer for the whole round
        losses: dict[str, float] = {}
        for epoch in range(self.cfg.epochs):
            feats = self.backbone_features(waves)
            one = dataclasses.replace(self.cfg, epochs=1, seed=self.cfg.seed + epoch)
            losses = train_heads(self.model, feats, self.plan, one, optimizer_factory=lambda _p: opt)
        return self.reply(feats, losses), feats

    def round_cached(self, cache: FeatureCache) -> tuple[RecordDict, CachedFeatures]:
        """What ``fedsd.clients.train_task.train`` does: cached head inputs → ``cfg.epochs`` of head training."""
        feats = cache.get(
            self.rows,
            self.root,
            self.plan.needed,
            label_names=self.model.label_names,
            labelled=self.labelled,
            batch_size=self.batch_size,
        )
        losses = train_heads(self.model, feats, self.plan, self.cfg)
        return self.reply(feats, losses), feats


def feature_gap(a: CachedFeatures, b: CachedFeatures) -> float:
    """Largest absolute difference between two sets of head inputs (recomputed vs cached)."""
    return max(
        float((x - y).abs().max()) for k in a.inputs for x, y in zip(a.inputs[k], b.inputs[k], strict=True)
    )


def run(args: argparse.Namespace, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    # a reused --workdir never serves features or a model from an earlier run (or older code)
    for stale in [work / "warm", work / "model", *work.glob("cold*")]:
        shutil.rmtree(stale, ignore_errors=True)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    rows, root = make_corpus(work / "corpus", args.utterances, args.seed)
    corpus_s = time.perf_counter() - t0
    durations = [r.duration for r in rows]
    log(
        f"corpus: {len(rows)} utterances of {min(durations):.2f}–{max(durations):.2f} s "
        f"(tiled/cropped to {args.seconds} s) in {corpus_s:.1f} s"
    )

    backbone = load_backbone(args.backbone)
    exits = args.exits or common.default_exits(backbone.config.num_hidden_layers)
    meta = {"sample_rate": 16000, "crop": {"max_seconds": args.seconds, "mode": "tile"}}
    model = MultiExitSER(backbone, exits, LABELS, head="stats", meta=meta).eval()
    device_exit = args.exit if args.exit is not None else exits[1]
    cfg = LocalTrainConfig(
        exit=device_exit,
        teacher="deep",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        seed=args.seed,
    )
    plan = plan_exits(model.exits, device_exit, cfg)
    crop = model_crop(model)
    labelled = labelled_mask(len(rows), args.label_fraction, args.seed)
    dev = Device(model, rows, root, labelled, plan, cfg, crop, args.batch_size)
    log(
        f"model: {args.backbone} exits {exits}; device at exit {device_exit}, teacher {plan.teacher}: "
        f"runs {plan.needed}, trains {plan.train}; {sum(labelled)}/{len(rows)} labelled; "
        f"{args.epochs} epochs; torch threads {torch.get_num_threads()}"
    )

    model_dir = model.save_pretrained(work / "model")
    warm = FeatureCache(work / "warm", model, crop)
    t0 = time.perf_counter()
    _, first = dev.round_cached(warm)  # fills the warm cache; also warms up the backbone
    log(f"warm cache filled ({first.misses} misses) in {time.perf_counter() - t0:.1f} s")
    dev.reset()
    _, again = dev.round_cached(warm)
    if again.misses:
        raise RuntimeError(f"the warm cache missed {again.misses} utterances")

    # Cold rounds need an empty cache each time; FeatureCache's constructor (which hashes the backbone
    # for its fingerprint) runs untimed, like the other variants' model setup.
    cold: dict[str, FeatureCache] = {}
    count = {"cold": 0}

    def setup_cold() -> None:
        dev.reset()
        count["cold"] += 1
        cold["cache"] = FeatureCache(work / f"cold{count['cold']}", model, crop)

    recomputed: dict[str, CachedFeatures] = {}

    def no_cache() -> None:
        _, recomputed["feats"] = dev.round_no_cache()

    def setting(threads: int, then: Callable[[], Any] | None = None) -> Callable[[], None]:
        def setup() -> None:
            torch.set_num_threads(threads)
            if then is not None:
                then()

        return setup

    default_threads = torch.get_num_threads()
    # torch's default is always timed too: the cold-cache round runs at it and is compared at it
    thread_counts = sorted(set(args.threads or [1]) | {default_threads})
    variants: dict[str, Callable[[], Any]] = {}
    before: dict[str, Callable[[], Any]] = {}
    for t in thread_counts:
        variants[vkey("no_cache", t)] = no_cache
        before[vkey("no_cache", t)] = setting(t, dev.reset)
        variants[vkey("warm_cache", t)] = lambda: dev.round_cached(warm)
        before[vkey("warm_cache", t)] = setting(t, dev.reset)
    variants[vkey("cold_cache", default_threads)] = lambda: dev.round_cached(cold["cache"])
    before[vkey("cold_cache", default_threads)] = setting(default_threads, setup_cold)
    variants[vkey("model_load", default_threads)] = lambda: MultiExitSER.from_pretrained(model_dir)
    before[vkey("model_load", default_threads)] = setting(default_threads)
    log(f"timing {len(variants)} variants × {args.repeats} repetitions, interleaved: {', '.join(variants)}")
    load_before = os.getloadavg()
    def progress(rep: int, times: dict[str, dict[str, list[float]]]) -> None:
        log(f"  rep {rep}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times["wall"].items()))

    times = common.interleaved(variants, args.repeats, seed=args.seed, before=before, on_repeat=progress)["wall"]
    load_after = os.getloadavg()
    torch.set_num_threads(default_threads)
    stats = {name: common.spread_s(t) for name, t in times.items()}
    gap = feature_gap(recomputed["feats"], again)

    # What a device uploads per round: the train reply's content (its heads + a few metrics).
    dev.reset()
    reply, _ = dev.round_cached(warm)
    arrays = reply.array_records["arrays"]
    array_bytes = sum(int(a.numpy().nbytes) for a in arrays.values())
    proto_arrays = recorddict_to_proto(RecordDict({"arrays": arrays})).ByteSize()
    proto_reply = recorddict_to_proto(reply).ByteSize()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ckpt_bytes = dir_bytes(model_dir)
    med = {name: s["median_s"] for name, s in stats.items()}
    speedups = {str(t): med[vkey("no_cache", t)] / med[vkey("warm_cache", t)] for t in thread_counts}
    best_no_cache = min(med[vkey("no_cache", t)] for t in thread_counts)
    best_warm = min(med[vkey("warm_cache", t)] for t in thread_counts)
    cold_t, load_t = med[vkey("cold_cache", default_threads)], med[vkey("model_load", default_threads)]
    upload_ratio = proto_reply / param_bytes
    return {
        "fingerprint": model.backbone_fingerprint(),
        "settings": {
            "backbone": args.backbone,
            "exits": exits,
            "device_exit": device_exit,
            "teacher": plan.teacher,
            "needed_exits": plan.needed,
            "trained_exits": plan.train,
            "utterances": len(rows),
            "seconds": args.seconds,
            "crop": crop.key(),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "labelled": sum(labelled),
            "repeats": args.repeats,
            "head": "stats",
            "thread_counts": thread_counts,
            "default_threads": default_threads,
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "corpus_seconds": corpus_s,
        "times": stats,
        "speedup_warm_vs_no_cache": speedups,
        "speedup_best_vs_best": best_no_cache / best_warm,
        "speedup_cold_vs_no_cache": med[vkey("no_cache", default_threads)] / cold_t,
        "speedup_with_model_load": (best_no_cache + load_t) / (best_warm + load_t),
        "max_feature_gap": gap,
        "bytes": {
            "upload_array_bytes": array_bytes,
            "upload_proto_arrays_bytes": proto_arrays,
            "upload_proto_reply_bytes": proto_reply,
            "model_parameter_bytes": param_bytes,
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint_dir_bytes": ckpt_bytes,
            "upload_over_parameters": upload_ratio,
            "upload_over_checkpoint": proto_reply / ckpt_bytes,
        },
        "targets": {
            "speedup_min": SPEEDUP_TARGET,
            "speedup_met": min(speedups.values()) >= SPEEDUP_TARGET,
            "upload_max_fraction": UPLOAD_TARGET,
            "upload_met": upload_ratio <= UPLOAD_TARGET,
        },
    }


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def table(res: dict[str, Any]) -> str:
    st, t, b = res["settings"], res["times"], res["bytes"]
    lines = [
        f"Round cost — `{st['backbone']}` backbone, exits {st['exits']}, device at exit {st['device_exit']} "
        f"(teacher {st['teacher']}, trains {st['trained_exits']}), {st['utterances']} × {st['seconds']} s, "
        f"{st['epochs']} epochs, {st['repeats']} interleaved repetitions, {res['machine']['cpu_count']} CPUs "
        f"(load avg {res['machine']['loadavg_before'][0]:.1f} → {res['machine']['loadavg_after'][0]:.1f})",
        "",
        "| variant | torch threads | median s | min s | max s | × warm cache (same threads) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        for threads in st["thread_counts"]:
            s = t.get(vkey(name, threads))
            if s is None:
                continue
            warm = t[vkey("warm_cache", threads)]["median_s"]
            lines.append(
                f"| {TITLES[name]} | {threads} | {s['median_s']:.3f} | {s['min_s']:.3f} | {s['max_s']:.3f} | "
                f"{s['median_s'] / warm:.1f} |"
            )
    tg = res["targets"]
    per_threads = ", ".join(
        f"**{v:.0f}×** with {k} thread{'s' if k != '1' else ''}"
        for k, v in res["speedup_warm_vs_no_cache"].items()
    )
    lines += [
        "",
        f"Speed-up, warm cache vs no cache at the same thread count: {per_threads} "
        f"(target ≥ {tg['speedup_min']:.0f}×: {'met' if tg['speedup_met'] else 'NOT met'}); best vs best "
        f"{res['speedup_best_vs_best']:.0f}×; cold cache vs no cache {res['speedup_cold_vs_no_cache']:.1f}×; "
        f"best vs best with one model load per message on both sides {res['speedup_with_model_load']:.1f}×. "
        f"Recomputed vs cached head inputs differ by at most {res['max_feature_gap']:.1e}.",
        "",
        "| per client per round | bytes | share of full model parameters |",
        "|---|---:|---:|",
        f"| upload: raw head arrays (sum of `nbytes`) | {b['upload_array_bytes']:,} "
        f"({mb(b['upload_array_bytes'])}) | {b['upload_array_bytes'] / b['model_parameter_bytes']:.3%} |",
        f"| upload: `recorddict_to_proto(RecordDict(arrays)).ByteSize()` | {b['upload_proto_arrays_bytes']:,} "
        f"| {b['upload_proto_arrays_bytes'] / b['model_parameter_bytes']:.3%} |",
        f"| upload: whole train reply (arrays + metrics), serialized | {b['upload_proto_reply_bytes']:,} "
        f"| {b['upload_over_parameters']:.3%} |",
        f"| full model: all parameters ({b['model_parameters']:,} float32) | {b['model_parameter_bytes']:,} "
        f"({mb(b['model_parameter_bytes'])}) | 100 % |",
        f"| full model: checkpoint directory (`save_pretrained`) | {b['checkpoint_dir_bytes']:,} "
        f"({mb(b['checkpoint_dir_bytes'])}) | {b['checkpoint_dir_bytes'] / b['model_parameter_bytes']:.1%} |",
        "",
        f"Upload / full model: {b['upload_over_parameters']:.3%} of parameter bytes, "
        f"{b['upload_over_checkpoint']:.3%} of the checkpoint (target ≤ {tg['upload_max_fraction']:.0%}: "
        f"{'met' if tg['upload_met'] else 'NOT met'}).",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = common.device_parser(__doc__, utterances=32, seconds=4.0, helps={"seconds": "clip length (tile/crop policy)"})
    p.add_argument("--exits", type=common.int_list, help="model exits (default: quarter depths, 3,6,9,12 for base)")
    p.add_argument("--exit", type=int, default=None, help="the device's exit (default: the second exit)")
    p.add_argument("--batch-size", type=int, default=8, help="backbone and head batch size")
    p.add_argument("--label-fraction", type=float, default=0.2, help="labelled share of the device's data")
    p.add_argument(
        "--threads",
        type=common.int_list,
        help="torch intra-op thread counts to time the no-cache and warm-cache rounds at "
        "(default: 1; torch's default is always added)",
    )
    common.add_timing_args(p, "round_cost", repeats=3)
    args = p.parse_args(argv)
    common.check_sizes(p, args)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main)


def _main(args: argparse.Namespace, bench: common.Run) -> dict[str, Any]:
    return common.timed_main(args, bench, run, table, with_settings=True)


if __name__ == "__main__":
    main()
