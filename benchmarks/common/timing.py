"""The timing scaffold: interleaved repetitions, medians and spreads, and where a timed run keeps its files.

Every timing benchmark runs on a shared machine, so each repetition times every variant once, in a
freshly shuffled order: noise from other processes spreads over all variants alike, and ratios are only
taken between numbers of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .paths import RESULTS
from .provenance import Run, jsonable

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
Times = dict[str, list[float]]  # variant → seconds, one per repetition


def default_exits(num_layers: int) -> list[int]:
    """Quarter depths ([3, 6, 9, 12] for a 12-layer model, [1, 2, 3, 4] for the tiny one)."""
    return sorted({max(1, round(num_layers * q / 4)) for q in (1, 2, 3, 4)})


def interleaved(
    variants: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    seed: int = 0,
    warmup: int = 0,
    before: dict[str, Callable[[], Any]] | None = None,
    clocks: Sequence[str] = ("wall",),
    gc_off: bool = False,
    on_repeat: Callable[[int, dict[str, Times]], None] | None = None,
) -> dict[str, Times]:
    """Time every variant once per repetition, in a new random order; returns clock → variant → seconds.

    ``warmup`` repetitions run first and are not kept; ``before[name]`` runs untimed right before its
    variant (a reset, a fresh cache); ``gc_off`` keeps the garbage collector out of the timed calls (it
    collects between repetitions); ``on_repeat(rep, times)`` follows each kept repetition (progress).
    """
    names = list(variants)
    rng = random.Random(seed)
    out: dict[str, Times] = {c: {n: [] for n in names} for c in clocks}
    gc_was_enabled = gc.isenabled()
    if gc_off:
        gc.disable()
    try:
        for rep in range(warmup + repeats):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                if before is not None and name in before:
                    before[name]()
                t0 = [CLOCKS[c]() for c in clocks]
                variants[name]()
                t1 = [CLOCKS[c]() for c in reversed(clocks)][::-1]
                if rep >= warmup:
                    for c, a, b in zip(clocks, t0, t1, strict=True):
                        out[c][name].append(b - a)
            if gc_off:
                gc.collect()
            if on_repeat is not None and rep >= warmup:
                on_repeat(rep - warmup + 1, out)
    finally:
        if gc_off and gc_was_enabled:
            gc.enable()
    return out


def quartiles_ms(samples: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range of samples in seconds, in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    if len(ms) >= 2:
        q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = med = q3 = ms[0]
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1}


def spread_s(samples: Sequence[float]) -> dict[str, Any]:
    """Median, minimum, maximum and the sorted samples, in seconds."""
    s = sorted(samples)
    return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1], "samples_s": s}


def over(medians: dict[str, float], reference: str) -> dict[str, float]:
    """Each median as a multiple of the reference's (the reference itself left out)."""
    return {name: m / medians[reference] for name, m in medians.items() if name != reference}


@contextlib.contextmanager
def scratch(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """``workdir`` (made if missing, kept afterwards) or a temporary directory removed afterwards."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir.resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def device_parser(
    doc: str, *, utterances: int, seconds: float, helps: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """The parser of a script that times one device's round: ``--backbone``, ``--utterances``, ``--seconds``,
    ``--epochs`` (``helps`` overrides their help texts); the script's own flags and :func:`add_timing_args`
    follow."""
    texts = {
        "utterances": "utterances on the device",
        "seconds": "clip length",
        "epochs": "local epochs per round",
    } | (helps or {})
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backbone", default="base", help="built-in backbone: base (wav2vec2-base shape) or tiny")
    p.add_argument("--utterances", type=int, default=utterances, help=texts["utterances"])
    p.add_argument("--seconds", type=float, default=seconds, help=texts["seconds"])
    p.add_argument("--epochs", type=int, default=2, help=texts["epochs"])
    return p


def int_list(text: str) -> list[int]:
    """``3,6,9`` → [3, 6, 9]: a comma-separated flag value."""
    return [int(x) for x in text.split(",")]


def add_timing_args(p: argparse.ArgumentParser, name: str, *, repeats: int) -> None:
    """The flags of a timing script that builds its own device: repetitions, seed, files, output."""
    p.add_argument("--repeats", type=int, default=repeats, help="interleaved repetitions per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep corpus, model and caches here")
    p.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", help="where to write the results")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def check_sizes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts (``--utterances``, ``--repeats``, ``--epochs``) at least 1, ``--seconds`` positive."""
    if args.utterances < 1 or args.repeats < 1 or args.epochs < 1 or args.seconds <= 0:
        p.error("--utterances, --repeats, --epochs must be >= 1 and --seconds > 0")


def timed_main(
    args: argparse.Namespace,
    run: Run,
    measure: Callable[[argparse.Namespace, Path, Callable[[str], None]], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    *,
    with_settings: bool = False,
) -> dict[str, Any]:
    """A timing script's body: ``measure`` in ``--workdir`` (or a temp dir), print ``table``, write ``--json``.

    ``measure`` returns the results with the timed model's ``fingerprint``, which moves to provenance;
    the config is the flags (plus the results' ``settings`` with ``with_settings``).
    """
    with scratch(args.workdir, f"fedsd-{run.name.replace('_', '-')}-") as work:
        res = measure(args, work, run.log)
    print(table(res))
    fingerprint = res.pop("fingerprint")
    config = args_config(args, drop=("json", "quiet")) | (res["settings"] if with_settings else {})
    return run.write(args.json, res, config=config, fingerprint=fingerprint, args=args)


def args_config(args: argparse.Namespace, drop: Sequence[str] = ()) -> dict[str, Any]:
    """The flags as the results' config, without those that only say where output goes."""
    return {k: v for k, v in jsonable(args).items() if k not in drop}
