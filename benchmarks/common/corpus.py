"""The recipe, the corpus and the work directory a benchmark's data and models live in.

Nothing made by other code is ever reused: the default work directory is named after the code version
(``runs/bench/<commit>[-dirty-<hash>]``), and a work directory records the code version that created it
and is refused under any other.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .paths import RECIPE, ROOT, WORK_STAMP
from .provenance import code_tag, code_version, digest


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """``--config`` (default configs/scratch.yaml) and ``--set KEY=VALUE`` overrides of it."""
    ap.add_argument(
        "--config",
        type=Path,
        default=RECIPE,
        help="the recipe (default: configs/scratch.yaml, the from-scratch tiny model; configs/demo.yaml: "
        "Whisper tiny.en)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the recipe (dotted keys, YAML values), e.g. --set data.crop.max_seconds=1",
    )


def add_corpus_args(ap: argparse.ArgumentParser, work: str) -> None:
    """The recipe (:func:`add_config_args`), ``--work`` (what it holds: ``work``), ``--corpus`` and the
    synthetic corpus's size, for :func:`prepare_corpus`; sizes default to the recipe's ``data.synth``."""
    add_config_args(ap)
    ap.add_argument("--work", type=Path, help=work)
    ap.add_argument("--corpus", type=Path, help="an existing corpus (default: the recipe's, generated)")
    ap.add_argument("--speakers", type=int, help="synthetic speakers (data.synth.speakers)")
    ap.add_argument("--sentences", type=int, help="sentences per speaker and emotion (data.synth.sentences)")


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


def prepare_corpus(
    args: argparse.Namespace, sizes: dict[str, Any], name: str, log: Callable[[str], None]
) -> tuple[Path, Path, dict[str, Any]]:
    """A benchmark's data: its work directory (``--work``), its corpus (``--corpus`` or generated there)
    and the recipe overrides (sizes, ``--set``, the corpus) every run of it shares."""
    overrides = base_overrides(args, sizes)
    work = work_dir(args.work, name)
    corpus = ensure_corpus(load_recipe(args, overrides), args.corpus, work, log)
    return work, corpus, overrides | corpus_overrides(corpus)
