"""The federated benchmarks' set-up: speaker split, base model, partitions and cached federated runs.

Caches. The corpus, the central base model, partitions, feature caches and finished runs live in a work
directory, so that re-running a table is cheap; every cached run is keyed by the code version and the
base model's checkpoint hash too.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .corpus import add_corpus_args, corpus_info, prepare_corpus
from .paths import FEDERATED_WORK, RESULTS, quiet
from .provenance import Run, checkpoint_fingerprint, checkpoint_id, code_tag, digest


def add_federation_args(ap: argparse.ArgumentParser, name: str, *, seeds: Sequence[int] = (0, 1, 2)) -> None:
    """Corpus, split, base model and federation sizes shared by adaptation, privacy and robustness.

    Every size defaults to the recipe's (configs/scratch.yaml) value.
    """
    add_corpus_args(
        ap,
        "corpus, base model, runs, feature cache (default runs/bench/<code>/federated: shared by "
        "adaptation, privacy and robustness, so the base model is trained once per code version)",
    )
    ap.add_argument("--clients", type=int, help="simulated devices (federated.num_clients)")
    ap.add_argument("--test-speakers", type=int, help="unseen test speakers (federated.test_speakers)")
    ap.add_argument("--server-speakers", type=int, help="the base model's pool (federated.server_speakers)")
    ap.add_argument("--base-epochs", type=int, help="base model training epochs (train.epochs)")
    ap.add_argument("--base-model", type=Path, help="use this central checkpoint instead of training one")
    ap.add_argument("--rounds", type=int, help="federated rounds (federated.rounds)")
    ap.add_argument("--local-epochs", type=int, help="local epochs per round (federated.local_epochs)")
    ap.add_argument("--speaker-seed", type=int, default=0, help="draws test and server speakers (fixed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help="device/label/local seeds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    ap.add_argument("--out", type=Path, default=RESULTS / name, help="results stem (.json, .png)")
    ap.add_argument("--verbose", action="store_true", help="show Flower's per-round log")


@dataclass
class FedBench:
    """Corpus, recipe, speaker splits, base models and federated runs of one federated benchmark."""

    run: Run
    work: Path
    corpus: Path
    overrides: dict[str, Any]
    """Dotted overrides of the recipe shared by every run (corpus and sizes)."""
    config_path: Path
    rows: list[Any]
    base_model: Path | None = None
    base_seconds: float = 0.0
    fingerprints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace, run: Run) -> FedBench:
        from fedsd.data.manifest import read_manifest

        if not args.verbose:
            import flwr.common.logger  # noqa: F401  (sets its own level on import: import it first)

            logging.getLogger("flwr").setLevel(logging.WARNING)
        sizes = {
            "data.synth.speakers": args.speakers,
            "data.synth.sentences": args.sentences,
            "federated.num_clients": args.clients,
            "federated.test_speakers": args.test_speakers,
            "federated.server_speakers": args.server_speakers,
            "federated.rounds": args.rounds,
            "federated.local_epochs": args.local_epochs,
            "train.epochs": args.base_epochs,
        }
        work, corpus, overrides = prepare_corpus(args, sizes, FEDERATED_WORK, run.log)
        bench = cls(
            run, work, corpus, overrides, args.config.resolve(), read_manifest(corpus / "manifest.csv")
        )
        if args.base_model is not None:
            bench.base_model = args.base_model.resolve()
        return bench

    def config(self, extra: dict[str, Any] | None = None) -> Any:
        from fedsd.config import load_config

        return load_config(self.config_path, self.overrides | (extra or {}))

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def num_clients(self) -> int:
        return self.config().federated.num_clients or 8

    def speaker_split(self, speaker_seed: int, fold: int | None = None, folds: int = 1) -> Any:
        """Test speakers, server pool and device speakers, fixed for the whole benchmark.

        With ``folds`` > 1 the test speakers of ``fold`` are its share of a shuffle (``speaker_seed``) of
        all labelled speakers cut into ``folds`` disjoint groups of ``federated.test_speakers``: the
        folds rotate the test speakers so that no result rests on one set of them. The server pool and
        the devices are drawn from the other speakers (seed ``speaker_seed``, fold).
        """
        from fedsd.data.partition import make_partition

        if fold is not None:
            return self._fold_split(speaker_seed, fold, folds)
        fc = self.config().federated
        split = make_partition(
            [r for r in self.rows if r.label],
            num_clients=fc.num_clients,
            by="speaker",
            label_fraction=1.0,
            test_speakers=fc.test_speakers,
            server_speakers=fc.server_speakers,
            seed=speaker_seed,
        )
        self.run.log(
            f"speakers (seed {speaker_seed}): test {', '.join(split.test_speakers)}; server pool "
            f"{len(split.server_speakers)}; devices {sum(len(c.speakers) for c in split.clients)}"
        )
        return split

    def _fold_split(self, speaker_seed: int, fold: int, folds: int) -> Any:
        import random

        from fedsd.data.partition import Partition, make_partition

        fc = self.config().federated
        labelled = [r for r in self.rows if r.label]
        speakers = sorted({r.speaker for r in labelled})
        n_test = fc.test_speakers
        if not 0 <= fold < folds or folds * n_test > len(speakers) - fc.server_speakers - self.num_clients:
            raise ValueError(
                f"{folds} folds of {n_test} test speakers do not fit {len(speakers)} speakers beside "
                f"{fc.server_speakers} server speakers and {self.num_clients} devices (fold {fold})"
            )
        random.Random(speaker_seed).shuffle(speakers)
        test = sorted(speakers[fold * n_test : (fold + 1) * n_test])
        rest = make_partition(
            [r for r in labelled if r.speaker not in set(test)], num_clients=fc.num_clients, by="speaker",
            label_fraction=1.0, test_speakers=0, server_speakers=fc.server_speakers,
            seed=speaker_seed * 1000 + fold,
        )  # fmt: skip
        split = Partition(
            config=rest.config | {"fold": fold, "folds": folds, "speaker_seed": speaker_seed},
            seed=speaker_seed,
            label_names=rest.label_names,
            test_utt_ids=[r.utt_id for r in labelled if r.speaker in set(test)],
            test_speakers=test,
            server_utt_ids=rest.server_utt_ids,
            server_speakers=rest.server_speakers,
            clients=rest.clients,
        )
        self.run.log(
            f"speakers (seed {speaker_seed}, fold {fold + 1}/{folds}): test {', '.join(test)}; server pool "
            f"{len(split.server_speakers)}; devices {sum(len(c.speakers) for c in split.clients)}"
        )
        return split

    def ensure_base_model(self, split: Any, checkpoint: str = "best") -> tuple[Path, float]:
        """The central base model (the recipe's training on the server pool), trained once per recipe
        and split in this work directory; ``--base-model`` wins. Returns (checkpoint dir, seconds now)."""
        if self.base_model is not None:
            base, seconds = self.base_model, 0.0
        else:
            base, seconds = self._train_base(split, checkpoint)
        self.fingerprints[str(base)] = checkpoint_fingerprint(base)
        return base, seconds

    def _train_base(self, split: Any, checkpoint: str) -> tuple[Path, float]:
        from fedsd.checkpoint import atomic_write_json
        from fedsd.server.prepare import server_pool_splits
        from fedsd.training.central import train

        cfg = self.config()
        recipe = cfg.model_dump(mode="json")
        n_valid = cfg.federated.server_valid_speakers
        key = {
            "recipe": {k: recipe[k] for k in ("data", "model", "train")},  # not the federated section
            "server_valid_speakers": n_valid,
            "server": split.server_speakers,
            "test": split.test_speakers,
        }
        out = self.work / f"base-spk{split.seed}-{digest(key, 10)}"
        done = out / "bench-base.json"
        if done.exists():
            info = json.loads(done.read_text(encoding="utf-8"))
            best = out / checkpoint
            if info.get("key") == digest(key) and info.get("fingerprints", {}).get(checkpoint) == (
                checkpoint_fingerprint(best) if (best / "fedsd.json").exists() else None
            ):
                self.run.log(f"base model: reusing {best} (trained by this code)")
                return best, 0.0
        rows = self.rows
        splits = server_pool_splits(split, rows, cfg.train.seed, n_valid)  # as fedsd.server.prepare does
        self.run.log(
            f"base model: training centrally on {len(split.server_speakers)} server speakers "
            f"({len(splits['train'])} train / {len(splits['valid'])} valid utterances, "
            f"{cfg.train.epochs} epochs) → {out}"
        )
        t0 = time.perf_counter()
        res = train(cfg, out, splits=splits, log=quiet)
        seconds = time.perf_counter() - t0
        fps = {name: checkpoint_fingerprint(out / name) for name in ("best", "last")}
        atomic_write_json(done, {"key": digest(key), "fingerprints": fps, "code_tag": code_tag(),
                                 "best_epoch": res.best_epoch, "seconds": seconds})  # fmt: skip
        self.base_seconds += seconds
        self.run.log(f"base model trained in {seconds:.0f} s (best epoch {res.best_epoch})")
        return out / checkpoint, seconds

    def partition(self, split: Any, seed: int, fraction: float) -> Path:
        """The fixed test/server speakers of ``split``; devices, labels and each device's personal test
        speech (the recipe's ``federated.personal_test_fraction``, independent of ``fraction``) re-drawn
        from ``seed``."""
        from fedsd.data.partition import Partition, make_partition

        ptf = float(self.config().federated.personal_test_fraction)
        which = {"test": split.test_speakers, "server": split.server_speakers, "clients": self.num_clients,
                 "corpus": sorted(r.utt_id for r in self.rows), "personal_test_fraction": ptf}  # fmt: skip
        path = (
            self.work
            / "partitions"
            / f"spk{split.seed}-{digest(which, 8)}-f{fraction:g}-s{seed}-pt{ptf:g}.json"
        )
        if path.exists():
            return path
        held = set(split.test_speakers) | set(split.server_speakers)
        device_rows = [r for r in self.rows if r.label and r.speaker not in held]
        sub = make_partition(
            device_rows, num_clients=self.num_clients, by="speaker", label_fraction=fraction, seed=seed,
            personal_test_fraction=ptf,
        )  # fmt: skip
        Partition(
            config={
                **split.config,
                "label_fraction": fraction,
                "speaker_seed": split.seed,
                "device_seed": seed,
                "personal_test_fraction": ptf,
            },
            seed=seed,
            label_names=split.label_names,
            test_utt_ids=split.test_utt_ids,
            test_speakers=split.test_speakers,
            server_utt_ids=split.server_utt_ids,
            server_speakers=split.server_speakers,
            clients=sub.clients,
        ).save(path)
        return path

    def federate(
        self,
        overrides: dict[str, Any],
        partition: Path,
        base: Path,
        name: str,
        *,
        wrap: Callable[[Any], Any] | None = None,
        key_extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One in-process federated run over the recipe + ``overrides``; cached in the work directory.

        ``wrap`` turns the honest ClientApp into another ``(message, context) → reply`` callable (an
        attacker); ``key_extra`` names what it changes. The cache key holds the overrides, the partition,
        the base model's checkpoint hash and the code version: a cached run is only reused when all match.
        """
        from fedsd.clients.client_app import make_client_app
        from fedsd.clients.device import SIM_CACHE, simulated_device_config
        from fedsd.data.partition import Partition
        from fedsd.server.federation import FederationSpec, run_federation
        from fedsd.server.inprocess import InProcessGrid

        overrides = self.overrides | overrides
        key = digest(
            {"overrides": overrides, "partition": partition.read_text(), "base": checkpoint_id(base),
             "code": code_tag(), "extra": key_extra or {}},
            32,
        )  # fmt: skip
        run_dir = self.work / "runs" / f"{name}-{key[:10]}"
        done = run_dir / "bench.json"
        if done.exists():
            prev = json.loads(done.read_text(encoding="utf-8"))
            if prev.get("key") == key:
                return prev | {"cached": True, "run_dir": str(run_dir)}
        cfg = self.config(overrides)
        spec = FederationSpec(
            config=str(self.config_path), run_dir=str(run_dir), base_model=str(base), partition=str(partition),
            cache_dir=str(self.cache), overrides=overrides,
        )  # fmt: skip
        app = make_client_app(
            simulated_device_config(cfg, partition, base, run_dir) | {SIM_CACHE: str(self.cache)}
        )
        n = len(Partition.load(partition).clients)
        events = run_dir / "device-events"  # each device's own log (DP keeps personal metrics there)
        nodes = [{"partition-id": i, "num-partitions": n, "events": str(events / f"device-{i:03d}.jsonl")}
                 for i in range(n)]  # fmt: skip
        grid = InProcessGrid(wrap(app) if wrap is not None else app, nodes)
        t0 = time.perf_counter()
        hist = run_federation(grid, spec, log=quiet).history
        broken = [rec["round"] for rec in hist[1:] if not rec.get("train", {}).get("num_clients")]
        if broken:  # a run where no device trained is not a result: never cache or tabulate it
            why = next((d for rec in hist for d in rec.get("missing_detail", {}).values()), {})
            raise RuntimeError(
                f"{name}: no device trained in round(s) {broken} ({why.get('reason', 'no replies')})"
            )
        exits = sorted(int(k[4:-4]) for k in hist[0] if k.startswith("exit") and k.endswith("/uar"))
        out = {
            "key": key,
            "seconds": time.perf_counter() - t0,
            "before": {str(k): hist[0][f"exit{k}/uar"] for k in exits},
            "after": {str(k): hist[-1][f"exit{k}/uar"] for k in exits},
            "curve": {str(k): [rec[f"exit{k}/uar"] for rec in hist] for k in exits},
            "rounds": len(hist) - 1,
            "valid_before": {
                str(k): hist[0][f"exit{k}/valid-uar"] for k in exits if f"exit{k}/valid-uar" in hist[0]
            },
            "valid_after": {
                str(k): hist[-1][f"exit{k}/valid-uar"] for k in exits if f"exit{k}/valid-uar" in hist[-1]
            },
            "valid_curve": {str(k): [rec.get(f"exit{k}/valid-uar", NAN) for rec in hist] for k in exits},
            "train_reports": [rec.get("train", {}) for rec in hist[1:]],
        }
        from fedsd.checkpoint import atomic_write_json

        atomic_write_json(done, out)
        return out | {"cached": False, "run_dir": str(run_dir)}

    def run_seed(
        self,
        split: Any,
        base: Path,
        seed: int,
        fraction: float,
        name: str,
        *,
        mode: str = "sd",
        extra: dict[str, Any] | None = None,
        wrap: Callable[[Any], Any] | None = None,
        key_extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One seed of a federated benchmark: its partition (:meth:`partition`) and its run (:meth:`federate`)
        with ``fraction`` labels, loss ``mode`` and local seed ``seed``, plus ``extra`` overrides.

        The result also names its ``partition`` and ``run_dir``.
        """
        part = self.partition(split, seed, fraction)
        overrides = {"federated.label_fraction": fraction, "federated.seed": seed, "federated.mode": mode}
        res = self.federate(overrides | (extra or {}), part, base, name, wrap=wrap, key_extra=key_extra)
        return res | {"partition": str(part)}

    def fixed_base(self, speaker_seed: int) -> tuple[Any, Path]:
        """One speaker split and its base model for the whole benchmark."""
        split = self.speaker_split(speaker_seed)
        base, _ = self.ensure_base_model(split)
        return split, base

    def write(self, path: Path, payload: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
        """The results JSON, with the shared recipe as config and the base models' fingerprints."""
        config = self.config().model_dump(mode="json")
        return self.run.write(path, payload, config=config, fingerprint=dict(self.fingerprints), args=args)

    def publish(
        self,
        json_path: Path,
        png_path: Path,
        payload: dict[str, Any],
        args: argparse.Namespace,
        draw: Callable[[Path], Any],
    ) -> dict[str, Any]:
        """Write the results JSON (:meth:`write`), then ``draw(png_path)``; returns what was written."""
        out = self.write(json_path, payload, args)
        draw(png_path)
        self.run.log(f"wrote {png_path}")
        return out

    def setting(self, split: Any, base: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
        """The results' setting of a one-base-model benchmark: data, models, split, seeds and federation."""
        fed = self.config().federated
        return (
            self.setup_record()
            | {
                "base_model": str(base),
                "test_speakers": split.test_speakers,
                "seeds": args.seeds,
                "label_fraction": args.fraction,
                "rounds": fed.rounds,
                "local_epochs": fed.local_epochs,
                "num_clients": self.num_clients,
            }
            | extra
        )

    def setup_record(self) -> dict[str, Any]:
        """What the results JSON says about the data and models."""
        return {
            "corpus": corpus_info(self.corpus),
            "work": str(self.work),
            "recipe": str(self.config_path),
            "overrides": self.overrides,
            "base_models": dict(self.fingerprints),
            "base_model_training_s": self.base_seconds,
        }


def personal_line(
    res: dict[str, Any], personal: dict[str, Any], exits: Sequence[int], shallow: Sequence[int]
) -> str:
    """``unseen 0.81/0.82; personal test, global heads 0.68/0.70, personal heads 0.72/0.74``: a run's log
    line (unseen speakers at ``exits``, personal test speech at the ``shallow`` exits the devices run)."""
    return (
        "unseen "
        + "/".join(f"{res['after'][str(k)]:.3f}" for k in exits)
        + "; personal test, global heads "
        + "/".join(f"{personal['global'][str(k)]:.3f}" for k in shallow)
        + ", personal heads "
        + "/".join(f"{personal['personal'][str(k)]:.3f}" for k in shallow)
    )


def took(res: dict[str, Any]) -> str:
    """`` (cached)`` or `` (42 s)``: how a federated run's log line ends."""
    return " (cached)" if res.get("cached") else f" ({res['seconds']:.0f} s)"


NAN = float("nan")


def personal_results(run_dir: Path, exits: Sequence[int]) -> dict[str, Any]:
    """Personal-test UAR (mean over the devices that run the exit) from a run's ``metrics.jsonl``.

    ``base``: the base model's heads (round 1, what each device received, measured before training);
    ``global``: the final global heads and ``personal``: the personal heads (the ``final`` record the
    server writes after the devices' end-of-run replies); ``devices``: each device's values.
    """
    hist = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    r1 = next((rec for rec in hist if rec.get("round") == 1), {})
    final = hist[-1].get("final", {}) if hist else {}
    summary = final.get("personal", {})

    def mean(tag: str, k: int) -> float:
        return float(summary.get(tag, {}).get(str(k), {}).get("uar", {}).get("mean", NAN))

    def count(tag: str, k: int) -> int:
        return int(summary.get(tag, {}).get(str(k), {}).get("uar", {}).get("n", 0))

    devices = {
        d.get("name", node): {
            "exit": d["metrics"].get("exit"),
            "n_personal_test": d["metrics"].get("n-personal-test"),
            "global": {str(k): d["metrics"].get(f"exit{k}/personal-uar-global") for k in exits},
            "personal": {str(k): d["metrics"].get(f"exit{k}/personal-uar-personal") for k in exits},
        }
        for node, d in final.get("devices", {}).items()
    }
    out = {
        "base": {str(k): float(r1.get(f"exit{k}/personal-uar-before", NAN)) for k in exits},
        "global": {str(k): mean("global", k) for k in exits},
        "personal": {str(k): mean("personal", k) for k in exits},
        "n_devices": {str(k): count("global", k) for k in exits},
        "devices": devices,
        "has_final": bool(final),
        "source": "server",
    }
    if not summary and (run_dir / "device-events").is_dir():  # DP: the devices kept them to themselves
        out |= device_log_personal(run_dir / "device-events", exits)
    return out


def device_log_personal(events_dir: Path, exits: Sequence[int]) -> dict[str, Any]:
    """Personal-test UAR from the devices' own event logs (mean over devices per exit): what a device
    withholds from the server under DP (it is not noised) but measures and logs for its owner.

    ``base``: the received heads of round 1 (``personal_uar_before``), ``global`` and ``personal``: the
    end-of-run ``done`` event (final global heads, personal heads)."""
    per: dict[str, dict[str, list[float]]] = {
        t: {str(k): [] for k in exits} for t in ("base", "global", "personal")
    }
    devices: dict[str, Any] = {}
    for path in sorted(events_dir.glob("*.jsonl")):
        evs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        first = next((e for e in evs if e.get("kind") == "train" and e.get("round") == 1), {})
        last = next((e for e in reversed(evs) if e.get("kind") == "done"), {})
        found = {"base": first.get("personal_uar_before", {}), "global": last.get("personal_uar_global", {}),
                 "personal": last.get("personal_uar_personal", {})}  # fmt: skip
        devices[path.stem] = found
        for tag, values in found.items():
            for k, v in values.items():
                if k in per[tag] and isinstance(v, int | float) and math.isfinite(v):
                    per[tag][k].append(float(v))
    return {tag: {k: statistics.mean(v) if v else NAN for k, v in d.items()} for tag, d in per.items()} | {
        "n_devices": {k: len(v) for k, v in per["global"].items()},
        "devices": devices,
        "has_final": any(per["global"][str(k)] for k in exits),
        "source": "device event logs",
    }
