"""What every benchmark script shares: provenance, result writing, corpus, base model, partitions, runs.

The scripts run as ``python benchmarks/X.py`` (and are loaded by path in the tests), so each one puts
this folder on ``sys.path`` and imports this module as ``common``; this module in turn makes the
checkout's ``fedsd`` importable without an install.

Provenance. Every results JSON carries a ``provenance`` block (:meth:`Run.provenance`): the git commit
and whether the tree was dirty (and a hash of the uncommitted code), the exact command line, the full
config, the backbone fingerprint(s) of the model(s) involved, library versions, the machine, UTC start
and end, and the wall time. Files are written atomically.

Caches. The federated benchmarks keep the corpus, the central base model, partitions, feature caches
and finished runs in a work directory, so that re-running a table is cheap. Nothing made by other
code is ever reused: the default work directory is named after the code version
(``runs/bench/<commit>[-dirty-<hash>]``), a work directory records the code version that created it and
is refused under any other, and every cached run is keyed by the code version and the base model's
checkpoint hash too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:  # a checkout without an install still runs
    sys.path.insert(0, str(ROOT))
DEMO = ROOT / "configs" / "demo.yaml"
RESULTS = BENCH / "results"
EMOTIONS = ("neutral", "happy", "angry", "sad")
# what decides a benchmark's numbers: an uncommitted change here makes the tree's code "dirty"
CODE_PATHS = ("fedsd", "server", "clients", "benchmarks", "configs", "pyproject.toml")
WORK_STAMP = "bench-work.json"
FEDERATED_WORK = "federated"  # the default work directory of the federated benchmarks

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DISABLE_USAGE_STATS": "1",
}.items():
    os.environ.setdefault(_key, _value)


def _quiet(_: str) -> None:
    pass


def digest(obj: Any, n: int = 16) -> str:
    """Short sha256 of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------- provenance
def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Commit, dirty flags and a hash of the uncommitted code (taken once per process).

    ``dirty``: anything uncommitted in the tree; ``code_dirty``: uncommitted changes (or untracked
    files) under :data:`CODE_PATHS`, hashed into ``code_diff_sha256``; results files don't count.
    """
    try:
        commit = _git("rev-parse", "HEAD").strip()
        status = [line for line in _git("status", "--porcelain").splitlines() if line.strip()]
        spec = ["--", *CODE_PATHS, ":(exclude)benchmarks/results"]
        diff = _git("diff", "HEAD", "--binary", *spec)
        untracked = sorted(_git("ls-files", "--others", "--exclude-standard", *spec).split())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "code_dirty": None, "code_diff_sha256": None, "status": []}
    h = hashlib.sha256(diff.encode())
    for name in untracked:
        h.update(f"\n{name}\n".encode())
        with contextlib.suppress(OSError):
            h.update((ROOT / name).read_bytes())
    code_dirty = bool(diff or untracked)
    return {
        "commit": commit,
        "dirty": bool(status),
        "code_dirty": code_dirty,
        "code_diff_sha256": h.hexdigest() if code_dirty else None,
        "status": status[:100],
    }


def code_tag() -> str:
    """``<commit12>`` or ``<commit12>-dirty-<hash8>``: names work directories and keys caches."""
    v = code_version()
    tag = (v["commit"] or "nogit")[:12]
    return tag + (f"-dirty-{v['code_diff_sha256'][:8]}" if v["code_dirty"] else "")


def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("fedsd", "torch", "torchaudio", "transformers", "flwr", "numpy", "scikit-learn", "opacus"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "hostname": platform.node(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def checkpoint_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """The backbone fingerprint recorded in a fedsd checkpoint's ``fedsd.json``."""
    return str(json.loads((Path(model_dir) / "fedsd.json").read_text(encoding="utf-8"))["fingerprint"])


def checkpoint_id(model_dir: str | os.PathLike[str]) -> str:
    """sha256 of ``fedsd.json`` (backbone fingerprint + per-file hashes of the heads): the whole model."""
    return hashlib.sha256((Path(model_dir) / "fedsd.json").read_bytes()).hexdigest()


def jsonable(obj: Any) -> Any:
    """argparse namespaces, paths and tuples → plain JSON values."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


class Run:
    """One invocation of a benchmark: its command line and clock, a logger, and the results writer."""

    def __init__(self, script: str, argv: Sequence[str] | None, *, quiet: bool = False) -> None:
        self.script = Path(script).resolve()
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.started = datetime.now(UTC)
        self.t0 = time.perf_counter()
        self.quiet = quiet
        self.code = code_version()

    @property
    def name(self) -> str:
        return self.script.stem

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{self.seconds:6.0f} s] {msg}", file=sys.stderr, flush=True)

    def command(self) -> str:
        """The command that reproduces this run, from the repository root."""
        try:
            script = self.script.relative_to(ROOT)
        except ValueError:
            script = self.script
        return shlex.join([".venv/bin/python", str(script), *self.argv])

    def provenance(
        self, *, config: Any, fingerprint: str | dict[str, str] | None = None, args: Any = None
    ) -> dict[str, Any]:
        """Everything needed to tell where a result came from (see the module docstring)."""
        return {
            "benchmark": self.name,
            "git": dict(self.code),
            "code_tag": code_tag(),
            "command": self.command(),
            "argv": self.argv,
            "sys_argv": list(sys.argv),
            "args": jsonable(args) if args is not None else None,
            "config": jsonable(config),
            "backbone_fingerprint": fingerprint,
            "versions": library_versions(),
            "machine": machine(),
            "started_utc": self.started.isoformat(timespec="seconds"),
            "finished_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": self.seconds,
        }

    def write(
        self,
        path: str | os.PathLike[str],
        payload: dict[str, Any],
        *,
        config: Any,
        fingerprint: str | dict[str, str] | None = None,
        args: Any = None,
    ) -> dict[str, Any]:
        """Atomically write ``{"provenance": ..., **payload}`` to ``path``; return that dict."""
        from fedsd.checkpoint import atomic_write_json

        out = {"provenance": self.provenance(config=config, fingerprint=fingerprint, args=args), **payload}
        atomic_write_json(path, out)
        self.log(f"wrote {path}")
        return out


def run_main(
    script: str,
    argv: Sequence[str] | None,
    parse: Callable[[Sequence[str] | None], argparse.Namespace],
    body: Callable[[argparse.Namespace, Run], dict[str, Any]],
) -> dict[str, Any]:
    """A script's ``main``: parse ``argv``, start the clock, run ``body(args, run)`` and return its results.

    An integer ``args.threads`` sets torch's intra-op threads for the run; the caller's count is restored
    afterwards (the tests call ``main`` in-process). ``args.quiet`` silences the progress log.
    """
    args = parse(argv)
    run = Run(script, argv, quiet=bool(getattr(args, "quiet", False)))
    threads = getattr(args, "threads", None)
    before = set_threads(threads if isinstance(threads, int) else None)
    try:
        return body(args, run)
    finally:
        set_threads(before)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave them); return the previous count to restore."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return before


# ---------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def cell(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, std and the two-sided Student-t confidence interval of the mean (NaN with one value)."""
    from scipy import stats

    vals = [v for v in values if not math.isnan(v)]
    n = len(vals)
    m, s = mean_std(vals)
    if n < 2:
        lo = hi = math.nan
    else:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n)
        lo, hi = m - half, m + half
    return {"n": n, "mean": m, "std": s, "ci_low": lo, "ci_high": hi, "confidence": confidence,
            "positive": sum(v > 0 for v in vals), "values": vals}  # fmt: skip


# ---------------------------------------------------------------------------------------- config / corpus
def add_config_args(ap: argparse.ArgumentParser) -> None:
    """``--config`` (default configs/demo.yaml) and ``--set KEY=VALUE`` overrides of it."""
    ap.add_argument("--config", type=Path, default=DEMO, help="the recipe (default: configs/demo.yaml)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the recipe (dotted keys, YAML values), e.g. --set data.crop.max_seconds=1",
    )


def base_overrides(args: argparse.Namespace, sizes: dict[str, Any]) -> dict[str, Any]:
    """The size arguments given (None = the recipe's value) plus ``--set`` items, as dotted overrides."""
    from fedsd.config import parse_overrides

    out = {k: v for k, v in sizes.items() if v is not None}
    return out | parse_overrides(args.overrides)


def load_recipe(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from fedsd.config import load_config

    return load_config(args.config, overrides)


def corpus_overrides(corpus: Path) -> dict[str, Any]:
    return {"data.root": str(corpus), "data.manifest": str(corpus / "manifest.csv")}


def ensure_corpus(cfg: Any, corpus: Path | None, work: Path, log: Callable[[str], None]) -> Path:
    """``corpus`` as given, or the recipe's synthetic corpus under ``work`` (generated once per recipe).

    The generated corpus's folder is named after its ``data.synth`` settings, so a size change never
    reuses a corpus of another size.
    """
    from fedsd.data.prepare import ensure_corpus as prepare

    if corpus is not None:
        corpus = corpus.resolve()
        if not (corpus / "manifest.csv").exists():
            raise SystemExit(f"--corpus {corpus}: no manifest.csv there")
        return corpus
    synth = cfg.data.synth
    path = (
        work / f"corpus-{synth.speakers}x{synth.sentences}-{digest(synth.model_dump(mode='json'), 8)}"
    ).resolve()
    data = cfg.data.model_copy(update={"root": path, "manifest": path / "manifest.csv", "corpus": "synth"})
    prepare(data, log)
    return path


def corpus_info(corpus: Path) -> dict[str, Any]:
    """What identifies a corpus in the results: where it is, its manifest's hash, its size."""
    from fedsd.checkpoint import sha256_file
    from fedsd.data.manifest import read_manifest

    rows = read_manifest(corpus / "manifest.csv")
    return {
        "root": str(corpus),
        "manifest_sha256": sha256_file(corpus / "manifest.csv"),
        "utterances": len(rows),
        "speakers": len({r.speaker for r in rows}),
        "labels": sorted({r.label for r in rows if r.label}),
    }


def work_dir(work: Path | None, name: str) -> Path:
    """The work directory (default ``runs/bench/<code tag>/<name>``), refused if older code made it."""
    work = (work or ROOT / "runs" / "bench" / code_tag() / name).resolve()
    stamp = work / WORK_STAMP
    here = {k: code_version()[k] for k in ("commit", "code_dirty", "code_diff_sha256")}
    if stamp.exists():
        made = json.loads(stamp.read_text(encoding="utf-8"))
        were = {k: made.get("code", {}).get(k) for k in here}
        if were != here:
            raise SystemExit(
                f"{work} holds corpus, models and runs made by code {made.get('code_tag')}; this is "
                f"{code_tag()}. Results are never re-tabulated from other code: pass another --work "
                "(or delete that one)."
            )
    elif work.exists() and any(work.iterdir()):
        raise SystemExit(
            f"{work} is not empty and has no {WORK_STAMP} (made by an older benchmark script): pass "
            "another --work (or delete that one)."
        )
    else:
        from fedsd.checkpoint import atomic_write_json

        atomic_write_json(
            stamp, {"code": here, "code_tag": code_tag(), "created_utc": datetime.now(UTC).isoformat()}
        )
    return work


# ---------------------------------------------------------------------------------------- baseline
_MFCC: dict[tuple[int, int], Any] = {}


def mfcc_stats(path: Path, n_mfcc: int = 20) -> Any:
    """Mean and std over frames of MFCCs and their deltas (a classic utterance-level SER feature)."""
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(x.mean(axis=1))
    if (sr, n_mfcc) not in _MFCC:
        _MFCC[(sr, n_mfcc)] = torchaudio.transforms.MFCC(
            sample_rate=sr, n_mfcc=n_mfcc, melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 40}
        )
    m = _MFCC[(sr, n_mfcc)](wav)  # (n_mfcc, frames)
    feats = torch.cat([m, torchaudio.functional.compute_deltas(m)])
    return torch.cat([feats.mean(dim=1), feats.std(dim=1)]).numpy().astype(np.float64)


def mfcc_features(rows: Sequence[Any], root: Path) -> Any:
    """One MFCC-statistics vector per manifest row (an (n, 80) array)."""
    import numpy as np

    return np.stack([mfcc_stats(root / r.path) for r in rows])


def fit_score(xtr: Any, ytr: Any, xte: Any, yte: Any) -> dict[str, float]:
    """Standardize + logistic regression; accuracy and UAR (macro recall) on the test part."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, recall_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(xtr, ytr)
    pred = clf.predict(xte)
    return {"acc": float(accuracy_score(yte, pred)), "uar": float(recall_score(yte, pred, average="macro"))}


# ---------------------------------------------------------------------------------------- federation
def add_federation_args(ap: argparse.ArgumentParser, name: str, *, seeds: Sequence[int] = (0, 1, 2)) -> None:
    """Corpus, split, base model and federation sizes shared by adaptation, privacy and robustness.

    Every size defaults to the recipe's (configs/demo.yaml) value.
    """
    add_config_args(ap)
    ap.add_argument(
        "--work",
        type=Path,
        help="corpus, base model, runs, feature cache (default runs/bench/<code>/federated: shared by "
        "adaptation, privacy and robustness, so the base model is trained once per code version)",
    )
    ap.add_argument("--corpus", type=Path, help="an existing corpus (default: the recipe's, generated)")
    ap.add_argument("--speakers", type=int, help="synthetic speakers (data.synth.speakers)")
    ap.add_argument("--sentences", type=int, help="sentences per speaker and emotion (data.synth.sentences)")
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
        overrides = base_overrides(args, sizes)
        work = work_dir(args.work, FEDERATED_WORK)
        corpus = ensure_corpus(load_recipe(args, overrides), args.corpus, work, run.log)
        overrides |= corpus_overrides(corpus)
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

    def speaker_split(self, speaker_seed: int) -> Any:
        """Test speakers, server pool and device speakers, fixed for the whole benchmark."""
        from fedsd.data.partition import make_partition

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
        from fedsd.train import train

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
        res = train(cfg, out, splits=splits, log=_quiet)
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
        path = self.work / "partitions" / f"spk{split.seed}-{digest(which, 8)}-f{fraction:g}-s{seed}-pt{ptf:g}.json"
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
        from fedsd.clients.app import make_client_app
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
                return prev | {"cached": True}
        cfg = self.config(overrides)
        spec = FederationSpec(
            config=str(self.config_path), run_dir=str(run_dir), base_model=str(base), partition=str(partition),
            cache_dir=str(self.cache), overrides=overrides,
        )  # fmt: skip
        app = make_client_app(
            simulated_device_config(cfg, partition, base, run_dir) | {SIM_CACHE: str(self.cache)}
        )
        n = len(Partition.load(partition).clients)
        grid = InProcessGrid(
            wrap(app) if wrap is not None else app,
            [{"partition-id": i, "num-partitions": n} for i in range(n)],
        )
        t0 = time.perf_counter()
        hist = run_federation(grid, spec, log=_quiet).history
        exits = sorted(int(k[4:-4]) for k in hist[0] if k.startswith("exit") and k.endswith("/uar"))
        out = {
            "key": key,
            "seconds": time.perf_counter() - t0,
            "before": {str(k): hist[0][f"exit{k}/uar"] for k in exits},
            "after": {str(k): hist[-1][f"exit{k}/uar"] for k in exits},
            "curve": {str(k): [rec[f"exit{k}/uar"] for rec in hist] for k in exits},
            "rounds": len(hist) - 1,
            "train_reports": [rec.get("train", {}) for rec in hist[1:]],
        }
        from fedsd.checkpoint import atomic_write_json

        atomic_write_json(done, out)
        return out | {"cached": False}

    def fixed_base(self, speaker_seed: int) -> tuple[Any, Path]:
        """One speaker split and its base model for the whole benchmark."""
        split = self.speaker_split(speaker_seed)
        base, _ = self.ensure_base_model(split)
        return split, base

    def write(self, path: Path, payload: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
        """The results JSON, with the shared recipe as config and the base models' fingerprints."""
        config = self.config().model_dump(mode="json")
        return self.run.write(path, payload, config=config, fingerprint=dict(self.fingerprints), args=args)

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
