"""Does self-distillation lift the shallow exits? SD vs CE-only at 10 %, 20 % and 100 % labels.

Centralized training with the recipe of ``configs/scratch.yaml`` (its data, model and train sections: the
tiny backbone from scratch on the synthetic corpus); only the loss (``train.mode``: ``sd`` or ``ce``),
the label fraction and the seed change. Speaker-independent split drawn by the seed: ``--test-speakers``
unseen test speakers and ``--valid-speakers`` validation speakers (model selection by the recipe's
``train.select``), the rest train (``data.split: speaker``). Seeds are paired across the arms: for one
seed, CE-only and SD see the same split, the same labelled utterances (nested across fractions) and
the same initial weights.

In the same run, on the same split and labelled utterances, a simple reference: MFCC + delta mean/std
per utterance → standardize → logistic regression (``benchmarks/synthetic_baseline.py``'s baseline).

Reported: test UAR per exit, mean ± std over seeds, per arm and fraction; the paired difference SD − CE
per exit with its 95 % Student-t interval over seeds; the baseline's UAR.

    .venv/bin/python benchmarks/self_distillation.py                 # fractions 0.1 0.2 1.0, seeds 0-4
    .venv/bin/python benchmarks/self_distillation.py --speakers 8 --sentences 1 --test-speakers 2 \\
        --valid-speakers 2 --epochs 1 --seeds 0 1 --fractions 1.0 --set data.crop.max_seconds=1   # tiny

Writes ``benchmarks/results/self_distillation.json`` (with provenance, see benchmarks/common/) and
``self_distillation.png``. The corpus (generated from the recipe's ``data.synth`` unless ``--corpus``)
and the training runs live in the work directory (default ``runs/bench/<code version>/self_distillation``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)
from common import mean_std  # noqa: E402

ARMS = {"ce": "CE only", "sd": "self-distillation"}
BASELINE = "MFCC + logistic regression"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_corpus_args(ap, "corpus and runs (default runs/bench/<code>/self_distillation)")
    ap.add_argument("--test-speakers", type=int, default=4, help="unseen test speakers per seed")
    ap.add_argument("--valid-speakers", type=int, default=2, help="validation speakers per seed")
    ap.add_argument("--epochs", type=int, help="training epochs (default: the recipe's train.epochs)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 1.0], help="labelled shares")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    ap.add_argument(
        "--jobs", type=int, default=1, help="training runs in parallel (each on one torch thread when > 1)"
    )
    ap.add_argument("--modes", nargs="+", choices=sorted(ARMS), default=list(ARMS), help="arms to run")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "self_distillation", help="results stem")
    args = ap.parse_args(argv)
    if args.test_speakers < 1 or args.valid_speakers < 1:
        ap.error("--test-speakers and --valid-speakers must be >= 1 (speaker-independent split)")
    if any(not 0 < f <= 1 for f in args.fractions):
        ap.error("--fractions must lie in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main)


def baseline(
    features: dict[str, Any], splits: dict[str, list[Any]], labelled: list[bool], label_names: list[str]
) -> dict[str, Any]:
    """MFCC+LR trained on the labelled training utterances, scored on the test speakers."""
    import numpy as np

    train = [r for r, m in zip(splits["train"], labelled, strict=True) if m]
    test = splits["test"]

    def xy(rows: list[Any]) -> tuple[Any, Any]:
        return np.stack([features[r.utt_id] for r in rows]), np.array(
            [label_names.index(r.label) for r in rows]
        )

    return common.fit_score(*xy(train), *xy(test)) | {"n_train": len(train), "n_test": len(test)}


def train_one(config: dict[str, Any], run_dir: str, threads: int | None = None) -> dict[str, Any]:
    """One training run (a process-pool worker when ``--jobs`` > 1): its per-exit results."""
    from fedsd.config import ExperimentConfig
    from fedsd.training.central import train

    if threads is not None:
        common.set_threads(threads)
    cfg = ExperimentConfig.model_validate(config)
    res = train(cfg, run_dir, log=common.quiet)
    return {
        "test_uar": {str(k): r.uar for k, r in res.test.items()},
        "test_wa": {str(k): r.wa for k, r in res.test.items()},
        "valid_uar": {str(k): r.uar for k, r in res.valid.items()},
        "best_epoch": res.best_epoch,
        "run_dir": str(res.run_dir),
        "fingerprint": common.checkpoint_fingerprint(res.best_dir),
    }


def _run_all(jobs: list[tuple[float, int, str, dict[str, Any], str]], n_jobs: int, log: Any) -> list[dict[str, Any]]:
    """Run every (fraction, seed, mode) training, ``n_jobs`` at a time; results in job order."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    def report(job: tuple[float, int, str, dict[str, Any], str], res: dict[str, Any]) -> None:
        fraction, seed, mode = job[:3]
        log(
            f"{fraction:.0%} seed {seed} {ARMS[mode]}: test UAR "
            + ", ".join(f"exit {k} {v:.3f}" for k, v in res["test_uar"].items())
            + f" (best epoch {res['best_epoch']})"
        )

    if n_jobs <= 1:
        out = []
        for job in jobs:
            out.append(train_one(job[3], job[4]))
            report(job, out[-1])
        return out
    with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(train_one, job[3], job[4], 1) for job in jobs]
        out = []
        for job, fut in zip(jobs, futures, strict=True):
            out.append(fut.result())
            report(job, out[-1])
        return out


def _main(args: argparse.Namespace, run: common.Run) -> dict[str, Any]:
    from fedsd.data.manifest import read_manifest
    from fedsd.data.partition import labelled_mask
    from fedsd.training.central import resolve_label_names, split_rows

    log = run.log
    sizes = {
        "data.synth.speakers": args.speakers,
        "data.synth.sentences": args.sentences,
        "train.epochs": args.epochs,
        "data.split": "speaker",
        "data.valid_speakers": args.valid_speakers,
        "data.test_speakers": args.test_speakers,
    }
    work, corpus, overrides = common.prepare_corpus(args, sizes, run.name, log)
    recipe = common.load_recipe(args, overrides)
    rows = read_manifest(corpus / "manifest.csv")
    label_names = resolve_label_names(recipe, rows)
    log(
        f"recipe {args.config}: backbone {recipe.model.backbone}, exits {recipe.model.exits}, "
        f"{recipe.train.epochs} epochs, lr {recipe.train.lr}, crop {recipe.data.crop.max_seconds} s; corpus "
        f"{corpus} ({len(rows)} utterances, {len({r.speaker for r in rows})} speakers)"
    )
    log("MFCC features for the baseline")
    features = {r.utt_id: v for r, v in zip(rows, common.mfcc_features(rows, corpus), strict=True)}

    runs: list[dict[str, Any]] = []
    base_runs: list[dict[str, Any]] = []
    splits_by_seed: dict[str, dict[str, list[str]]] = {}
    fingerprints: dict[str, str] = {}
    jobs: list[tuple[float, int, str, dict[str, Any], str]] = []
    for fraction in args.fractions:
        for seed in args.seeds:
            for mode in args.modes:
                cfg = common.load_recipe(
                    args,
                    overrides
                    | {"train.mode": mode, "train.label_fraction": fraction, "train.seed": seed}
                    | {"name": f"sd-bench-{mode}-f{fraction:g}-s{seed}"},
                )
                name = f"f{fraction:g}-s{seed}-{mode}"
                jobs.append((fraction, seed, mode, cfg.model_dump(mode="json"), str(work / "runs" / name)))
    results = _run_all(jobs, args.jobs, log)
    for (fraction, seed, mode, _, run_dir), res in zip(jobs, results, strict=True):
        name = Path(run_dir).name
        fingerprints[name] = res["fingerprint"]
        runs.append({"fraction": fraction, "seed": seed, "mode": mode, **res})
    for fraction in args.fractions:
        for seed in args.seeds:
            # the split and the labelled subset depend on the seed (and fraction) only: both arms share them
            splits = split_rows(common.load_recipe(args, overrides | {"train.seed": seed}), rows)
            splits_by_seed[str(seed)] = {
                part: sorted({r.speaker for r in splits[part]}) for part in ("train", "valid", "test")
            }
            train_rows = splits["train"]
            mask = labelled_mask(
                [r.utt_id for r in train_rows], [r.label for r in train_rows], fraction, seed
            )
            b = baseline(features, splits, mask, label_names)
            base_runs.append({"fraction": fraction, "seed": seed, **b})
            log(f"{fraction:.0%} seed {seed} {BASELINE}: test UAR {b['uar']:.3f} ({b['n_train']} labelled)")

    exits = sorted(int(k) for k in runs[0]["test_uar"])
    summary = summarise(runs, base_runs, args.fractions, exits)
    print_table(summary, args.fractions, exits, args.seeds, args.test_speakers)
    payload = {
        "setup": {
            "corpus": common.corpus_info(corpus),
            "work": str(work),
            "recipe": str(args.config),
            "overrides": overrides,
            "varied": ["train.mode", "train.label_fraction", "train.seed"],
            "fractions": args.fractions,
            "seeds": args.seeds,
            "test_speakers": args.test_speakers,
            "valid_speakers": args.valid_speakers,
            "speakers_by_seed": splits_by_seed,
            "label_names": label_names,
            "baseline": "MFCC(20)+delta mean/std per utterance, StandardScaler, LogisticRegression(C=1)",
        },
        "exits": exits,
        "runs": runs,
        "baseline": base_runs,
        "summary": summary,
    }
    out = run.write(
        args.out.with_suffix(".json"),
        payload,
        config=recipe.model_dump(mode="json"),
        fingerprint=fingerprints,
        args=args,
    )
    png = plot(
        summary,
        args.fractions,
        exits,
        args.out.with_suffix(".png"),
        args.seeds,
        args.test_speakers,
        len(label_names),
    )
    log(f"wrote {png}")
    return out


def summarise(
    runs: list[dict[str, Any]], base_runs: list[dict[str, Any]], fractions: Sequence[float], exits: list[int]
) -> dict[str, Any]:
    """Per fraction: per arm and exit mean ± std; SD − CE per exit paired by seed with a 95 % t interval."""
    out: dict[str, Any] = {}
    modes = [m for m in ARMS if any(r["mode"] == m for r in runs)]
    for f in fractions:
        arm = {
            mode: {r["seed"]: r["test_uar"] for r in runs if r["fraction"] == f and r["mode"] == mode}
            for mode in modes
        }
        seeds = sorted(set.intersection(*(set(v) for v in arm.values())))
        per_seed = {mode: {str(k): {s: arm[mode][s][str(k)] for s in seeds} for k in exits} for mode in modes}
        entry: dict[str, Any] = {}
        for mode in modes:
            entry[mode] = {}
            for k, by_seed in per_seed[mode].items():
                vals = list(by_seed.values())
                m, sd = mean_std(vals)
                entry[mode][k] = {"mean": m, "std": sd, "values": vals}
        if len(modes) == 2:
            entry["sd_minus_ce"] = {k: common.paired(per_seed["sd"][k], per_seed["ce"][k]) for k in per_seed["sd"]}
        b = [r["uar"] for r in base_runs if r["fraction"] == f]
        m, sd = mean_std(b)
        entry["baseline"] = {"mean": m, "std": sd, "values": b}
        entry["seeds"] = seeds
        out[f"{f:g}"] = entry
    return out


def _pm(m: float, s: float) -> str:
    return f"{m:.3f} ± {s:.3f}"


def _ci(d: dict[str, Any]) -> str:
    return common.ci_cell(d, single="1 seed", up="up")


def print_table(
    summary: dict[str, Any], fractions: Sequence[float], exits: list[int], seeds: list[int], n_test: int
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Test UAR on {n_test} unseen speakers per seed, mean ± std over seeds {seeds}; "
        "SD − CE paired by seed, mean [95 % t interval]"
    )
    table.add_column("labels")
    table.add_column("method")
    for k in exits:
        table.add_column(f"exit {k}" + (" (teacher)" if k == exits[-1] else ""), justify="right")
    for f in fractions:
        e = summary[f"{f:g}"]
        for mode, name in ARMS.items():
            if mode in e:
                table.add_row(
                    f"{f:.0%}", name, *(_pm(e[mode][str(k)]["mean"], e[mode][str(k)]["std"]) for k in exits)
                )
        if "sd_minus_ce" in e:
            table.add_row(f"{f:.0%}", "SD − CE", *(_ci(e["sd_minus_ce"][str(k)]) for k in exits))
        b = e["baseline"]
        table.add_row(
            f"{f:.0%}", BASELINE, _pm(b["mean"], b["std"]) + " (utterance level)", *[""] * (len(exits) - 1),
            end_section=True,
        )  # fmt: skip
    Console(width=200).print(table)


def plot(
    summary: dict[str, Any],
    fractions: Sequence[float],
    exits: list[int],
    path: Path,
    seeds: list[int],
    n_test: int,
    n_classes: int,
) -> Path:
    size = (4.2 * len(fractions), 3.6)
    with common.figure(path, ncols=len(fractions), figsize=size, sharey=True, squeeze=False) as (fig, axes):
        _draw(axes, summary, fractions, exits, n_test, n_classes)
        fig.suptitle(f"Self-distillation vs CE only, mean ± std over seeds {seeds}", fontsize=9)
    return path


def _draw(
    axes: Any, summary: dict[str, Any], fractions: Sequence[float], exits: list[int], n_test: int, n_classes: int
) -> None:
    for ax, f in zip(axes[0], fractions, strict=True):
        e = summary[f"{f:g}"]
        for j, (mode, name) in enumerate(ARMS.items()):
            if mode not in e:
                continue
            xs = [k + (j - 0.5) * 0.12 for k in exits]
            ax.errorbar(
                xs,
                [e[mode][str(k)]["mean"] for k in exits],
                yerr=[e[mode][str(k)]["std"] for k in exits],
                marker="o",
                capsize=3,
                label=name,
            )
        ax.axhline(e["baseline"]["mean"], color="grey", ls="--", lw=1, label=BASELINE)
        ax.axhline(1 / n_classes, color="grey", ls=":", lw=0.8, label=f"chance ({n_classes} classes)")
        ax.set_xticks(exits, [f"exit {k}" for k in exits])
        ax.set_title(f"{f:.0%} labels", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"test UAR ({n_test} unseen speakers)")
    axes[0][0].legend(fontsize=7, loc="lower right")


if __name__ == "__main__":
    main()
