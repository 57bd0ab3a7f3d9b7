"""The demo's central model, trained exactly as `fedsd demo` trains it, under recipe variants.

Why: the central recipe for the pretrained encoder (configs/demo.yaml, Whisper tiny.en) must be chosen on
validation speakers only. This script builds the demo's own federated partition (its ``federated`` section:
test speakers, server pool, devices), trains the central model on the server pool minus its validation
speakers (``server_pool_splits``, as ``fedsd demo`` does) once per variant, and reports per exit the
validation UAR (the selection criterion) and the test UAR on the unseen test speakers (reported, never
used to choose). In the same run, on the same split: MFCC + delta statistics → logistic regression
(``benchmarks/common/baseline.py``) trained on the same training speakers.

    .venv/bin/python benchmarks/whisper_recipe.py --threads 1 \\
        --variant base: --variant lr1e-4:train.lr=1e-4 --variant ce:train.mode=ce
    .venv/bin/python benchmarks/whisper_recipe.py --config configs/scratch.yaml --variant scratch:

A variant is ``NAME:KEY=VALUE;KEY=VALUE`` (dotted config keys, YAML values; empty = the recipe as is).
Writes ``--out`` (default ``benchmarks/results/whisper_recipe.json``) with provenance.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    from fedsd.config import parse_overrides

    name, _, body = text.partition(":")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME:KEY=VALUE;KEY=VALUE")
    items = [s.strip() for s in body.split(";") if s.strip()]
    return name, parse_overrides(items)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=common.ROOT / "configs" / "demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE;KEY=VALUE (repeatable)")
    ap.add_argument("--work", type=Path, help="run directory (default runs/bench/<code tag>/whisper_recipe)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=common.RESULTS / "whisper_recipe.json")
    args = ap.parse_args(argv)
    if not args.variant:
        args.variant = ["recipe:"]
    return args


def _main(args: argparse.Namespace, run: common.Run) -> dict[str, Any]:
    import numpy as np

    from fedsd.config import load_config, parse_overrides
    from fedsd.data.manifest import read_manifest
    from fedsd.data.prepare import ensure_corpus
    from fedsd.training.central import resolve_label_names, train
    from server.prepare import make_run_partition, server_pool_splits

    log = run.log
    base = parse_overrides(args.overrides)
    recipe = load_config(args.config, base)
    ensure_corpus(recipe.data, log=log)
    work = common.work_dir(args.work, run.name)
    part = make_run_partition(recipe, work / "partition.json", log)
    rows = read_manifest(recipe.data.manifest_path)
    label_names = resolve_label_names(recipe, rows)
    splits = server_pool_splits(part, rows, recipe.train.seed, recipe.federated.server_valid_speakers)
    speakers = {s: sorted({r.speaker for r in v}) for s, v in splits.items()}
    log(f"split: {', '.join(f'{s} {len(v)} speakers / {len(splits[s])} clips' for s, v in speakers.items())}")

    log("MFCC baseline on the same split")
    feats = dict(zip([r.utt_id for r in rows], common.mfcc_features(rows, recipe.data.root), strict=True))

    def xy(part_rows: list[Any]) -> tuple[Any, Any]:
        return np.stack([feats[r.utt_id] for r in part_rows]), np.array(
            [label_names.index(r.label) for r in part_rows]
        )

    mfcc = {
        "valid": common.fit_score(*xy(splits["train"]), *xy(splits["valid"])),
        "test": common.fit_score(*xy(splits["train"]), *xy(splits["test"])),
    }
    log(f"MFCC + LR: valid UAR {mfcc['valid']['uar']:.3f}, test UAR {mfcc['test']['uar']:.3f}")

    results: list[dict[str, Any]] = []
    fingerprints: dict[str, str] = {}
    for text in args.variant:
        name, overrides = parse_variant(text)
        cfg = load_config(args.config, base | overrides)
        run_dir = work / "runs" / name
        log(f"variant {name}: {overrides or 'the recipe'}")
        res = train(cfg, run_dir, splits=splits, log=log)
        import json

        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        row = {
            "variant": name,
            "overrides": overrides,
            "best_epoch": res.best_epoch,
            "valid_uar": {str(k): r.uar for k, r in res.valid.items()},
            "test_uar": {str(k): r.uar for k, r in res.test.items()},
            "test_wa": {str(k): r.wa for k, r in res.test.items()},
            "valid_curve": [
                {
                    k: v
                    for k, v in h.items()
                    if k == "epoch" or (k.startswith("valid/") and k.endswith("/uar"))
                }
                for h in history
            ],
            "run_dir": str(run_dir),
            "seconds": run.seconds,
        }
        fingerprints[name] = common.checkpoint_fingerprint(res.best_dir)
        results.append(row)
        log(
            f"{name}: best epoch {res.best_epoch}; valid UAR "
            + " / ".join(f"{v:.3f}" for v in row["valid_uar"].values())
            + "; test UAR "
            + " / ".join(f"{v:.3f}" for v in row["test_uar"].values())
        )
        payload = {
            "setup": {
                "config": str(args.config),
                "speakers": speakers,
                "clips": {s: len(v) for s, v in splits.items()},
                "selection": "valid speakers only; test reported, never used to choose",
            },
            "mfcc_baseline": mfcc,
            "variants": results,
        }
        run.write(
            args.out, payload, config=recipe.model_dump(mode="json"), fingerprint=fingerprints, args=args
        )
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main)


if __name__ == "__main__":
    main()
