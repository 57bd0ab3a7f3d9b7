"""Make the data a config names exist: generate the synthetic corpus on first use.

Why: `fedsd train --config configs/demo.yaml` and `fedsd demo` must work on a fresh checkout with no
data on disk; real corpora are never generated, so a missing manifest there is an error saying how to
make one (`fedsd data scan`).
"""

from __future__ import annotations

from collections.abc import Callable

from fedsd.config import ConfigError, DataConfig
from fedsd.data.manifest import read_manifest


def ensure_corpus(data: DataConfig, log: Callable[[str], None] = print) -> None:
    """Generate ``data.root`` from ``data.synth`` when the config's synthetic manifest is missing."""
    manifest = data.manifest_path
    if manifest.exists():
        if data.corpus == "synth":
            _check_synth_matches(data)
        return
    if data.corpus != "synth":
        raise ConfigError(
            f"data.manifest {manifest} does not exist; create it with "
            f"`fedsd data scan {data.corpus} {data.root} --out {manifest}`"
        )
    from fedsd.data.synthetic import generate_corpus

    s = data.synth
    log(
        f"generating the synthetic corpus in {data.root} ({s.speakers} speakers × {s.sentences} sentences × "
        f"{len(s.emotions)} emotions, seed {s.seed})"
    )
    res = generate_corpus(
        data.root,
        speakers=s.speakers,
        sentences=s.sentences,
        emotions=tuple(s.emotions),
        seed=s.seed,
        intensity=s.intensity,
        backend=s.backend,
    )
    log(f"wrote {res.n_files} files with the {res.backend} backend in {res.seconds:.1f} s")


def _check_synth_matches(data: DataConfig) -> None:
    """An existing synthetic corpus must have the emotions the config asks for."""
    have = {r.orig_label or r.label for r in read_manifest(data.manifest_path)}
    want = set(data.synth.emotions)
    if not want <= have:
        raise ConfigError(
            f"{data.manifest_path} holds emotions {sorted(have)} but data.synth.emotions asks for "
            f"{sorted(want)}; delete {data.root} to regenerate it or point data.root elsewhere"
        )
