"""`fedsd data ...` commands: scan corpora, import tables, check audio, synthesize, partition, stats."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)

# --- `synth` is defined in fedsd/cli/synth.py and mounted here (keeps this file's owners apart).
from fedsd.cli.synth import register as _register_synth  # noqa: E402

_register_synth(app)

# --- scan / import-csv / check / partition / stats below.
# Heavy modules (torch via audio resampling, matplotlib) are imported lazily so `fedsd --help` stays fast.
import contextlib  # noqa: E402
import io  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from fedsd.checkpoint import atomic_write_bytes  # noqa: E402
from fedsd.cli.errors import ExitCode, fail  # noqa: E402
from fedsd.cli.options import PartitionBy  # noqa: E402
from fedsd.cli.output import JSON_HELP, console, json_output, progress_callback  # noqa: E402
from fedsd.data.audio import AudioError  # noqa: E402
from fedsd.data.corpora import (  # noqa: E402
    SCANNERS,
    CorpusError,
    ScanResult,
    import_csv,
    preset_names,
    resolve_preset,
    scan_corpus,
)
from fedsd.data.manifest import ManifestError, read_manifest, write_manifest  # noqa: E402
from fedsd.data.partition import (  # noqa: E402
    Partition,
    PartitionError,
    partition_manifest,
)

_MAX_SHOWN = 40
_Json = Annotated[bool, typer.Option("--json", help=JSON_HELP)]


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Expected problems with the data (missing, unreadable, malformed) end in one line and exit 1."""
    try:
        yield
    except (ManifestError, AudioError, CorpusError, PartitionError, OSError) as exc:
        fail(str(exc) or type(exc).__name__, ExitCode.FAILURE)


def _print_scan_summary(res: ScanResult, out: Path) -> None:
    labels = Counter(r.label or "(unlabelled)" for r in res)
    table = Table(title=f"{res.dataset}: {len(res)} utterances -> {out}", show_header=False, box=None)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("rows", str(len(res)))
    table.add_row("preset", res.preset)
    table.add_row("classes", ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
    table.add_row("speakers", str(len({r.speaker for r in res})))
    table.add_row("hours", f"{sum(r.duration for r in res) / 3600:.2f}")
    reasons = res.skip_reasons()
    table.add_row(
        "skipped", f"{res.num_skipped}" + "".join(f"\n  {n} x {r}" for r, n in reasons.most_common(5))
    )
    if res.dropped:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(res.dropped.items()))
        table.add_row("dropped by preset", f"{res.num_dropped} ({dropped})")
    console.print(table)
    for rel, reason in res.skipped[:5]:
        console.print(f"  skipped {escape(rel)}: {escape(reason)}", soft_wrap=True, highlight=False)
    if res.num_skipped > 5:
        console.print(f"  ... and {res.num_skipped - 5} more skipped")


def _scan_document(res: ScanResult, out: Path) -> dict[str, Any]:
    """What `scan`/`import-csv --json` print: the manifest written and what was left out, and why."""
    return {
        "manifest": out,
        "dataset": res.dataset,
        "preset": res.preset,
        "rows": len(res),
        "classes": Counter(r.label or "(unlabelled)" for r in res),
        "speakers": len({r.speaker for r in res}),
        "hours": sum(r.duration for r in res) / 3600,
        "skipped": [{"path": rel, "reason": reason} for rel, reason in res.skipped],
        "dropped_by_preset": res.dropped,
    }


def _write_scan(res: ScanResult, out: Path) -> dict[str, Any]:
    if not res:
        fail(
            f"no usable utterances: {res.num_skipped} file(s) skipped, {res.num_dropped} dropped by preset "
            f"{res.preset!r}; nothing written to {out}"
        )
    write_manifest(res, out)
    _print_scan_summary(res, out)
    return _scan_document(res, out)


def _check_preset(preset: str | None, corpus: str | None) -> None:
    try:
        resolve_preset(preset, corpus)
    except CorpusError as exc:
        fail(str(exc), ExitCode.USAGE)


@app.command("scan")
def scan_cmd(
    corpus: Annotated[str, typer.Argument(help=f"Corpus: {', '.join(SCANNERS)}.", show_default=False)],
    root: Annotated[Path, typer.Argument(help="Corpus root folder as distributed.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")],
    preset: Annotated[
        str | None, typer.Option(help=f"Label preset ({', '.join(preset_names())}); default per corpus.")
    ] = None,
    json_: _Json = False,
) -> None:
    """Scan a corpus folder into a manifest CSV (paths relative to ROOT).

    Files that do not follow the corpus's naming are skipped and counted, never fatal.

    Example: fedsd data scan iemocap /data/IEMOCAP_full_release --out iemocap.csv --preset iemocap4
    """
    if corpus.lower() not in SCANNERS:
        fail(f"unknown corpus {corpus!r}; valid corpora: {', '.join(SCANNERS)}", ExitCode.USAGE)
    _check_preset(preset, corpus.lower())
    with json_output(json_) as output, _errors():
        with progress_callback(f"scanning {corpus}") as update:
            res = scan_corpus(corpus, root, preset, progress=update)
        output.document(_write_scan(res, out))


@app.command("import-csv")
def import_csv_cmd(
    table: Annotated[
        Path, typer.Argument(help="CSV (or .tsv) with one row per audio file.", show_default=False)
    ],
    root: Annotated[Path, typer.Option("--root", help="Folder the table's paths are relative to.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Manifest CSV to write.")],
    path_col: Annotated[str, typer.Option(help="Column with the audio path.")] = "path",
    label_col: Annotated[
        str, typer.Option(help="Column with the emotion label (empty = unlabelled).")
    ] = "label",
    speaker_col: Annotated[str, typer.Option(help="Column with the speaker id.")] = "speaker",
    utt_col: Annotated[
        str | None, typer.Option(help="Column with utterance ids (default: file stem).")
    ] = None,
    split_col: Annotated[str | None, typer.Option(help="Column with train/dev/test.")] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name; speakers become DATASET:speaker.")] = "custom",
    preset: Annotated[
        str | None, typer.Option(help=f"Label preset ({', '.join(preset_names())}); default raw labels.")
    ] = None,
    json_: _Json = False,
) -> None:
    """Turn any table of audio files into a manifest.

    Example: fedsd data import-csv labels.csv --root /data/mycorpus --out mine.csv --label-col emotion --speaker-col spk --dataset mine --preset ekman6
    """  # noqa: E501
    _check_preset(preset, None)
    with json_output(json_) as output, _errors():
        with progress_callback(f"importing {table.name}") as update:
            res = import_csv(
                table, root, path_col, label_col, speaker_col, dataset=dataset, preset=preset, utt_col=utt_col,
                split_col=split_col, progress=update,
            )  # fmt: skip
        output.document(_write_scan(res, out))


def _manifest_first(manifest: Path) -> Path:
    """A missing manifest is the first thing reported, before any option that is missing too."""
    if not manifest.is_file():
        fail(f"{manifest}: manifest not found", ExitCode.FAILURE)
    return manifest


def _print_check(result: Any) -> None:
    rows, bad = result.rows, result.bad
    if not bad:
        console.print(f"[green]all {len(rows)} file(s) decode[/green]")
        return
    table = Table(title=f"{len(bad)} of {len(rows)} file(s) unusable")
    for col in ("utt_id", "path", "reason"):
        table.add_column(col)
    for b in bad:
        table.add_row(escape(b.row.utt_id), escape(b.row.path), escape(b.reason))
    console.print(table)


@app.command("check")
def check_cmd(
    manifest: Annotated[
        Path, typer.Argument(help="Manifest CSV to check.", show_default=False, callback=_manifest_first)
    ],
    root: Annotated[Path, typer.Option("--root", help="Folder the manifest's paths are relative to.")],
    drop_bad: Annotated[
        bool, typer.Option("--drop-bad", help="Write a manifest without the bad files.")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Clean manifest (with --drop-bad).")] = None,
    min_seconds: Annotated[float, typer.Option(min=0.0, help="Clips shorter than this are unusable.")] = 0.0,
    json_: _Json = False,
) -> None:
    """Decode every file of a manifest and report each unusable one with its reason.

    Exits 1 if any file is unusable; with --drop-bad --out CLEAN.csv the usable rows are written and it exits 0.

    The input manifest and audio are never modified.

    Example: fedsd data check ravdess.csv --root /data/ravdess --drop-bad --out ravdess.clean.csv
    """  # noqa: E501
    if drop_bad and out is None:
        fail("--drop-bad needs --out CLEAN.csv (the input manifest is never modified)", ExitCode.USAGE)
    if out is not None and not drop_bad:
        fail("--out is only used with --drop-bad", ExitCode.USAGE)
    from fedsd.data.check import check_manifest

    with json_output(json_) as output, _errors():
        with progress_callback("decoding") as update:
            result = check_manifest(manifest, root, min_seconds=min_seconds, progress=update)
        _print_check(result)
        doc: dict[str, Any] = {
            "manifest": manifest, "root": root, "rows": len(result.rows), "usable": len(result.usable),
            "unusable": [{"utt_id": b.row.utt_id, "path": b.row.path, "reason": b.reason} for b in result.bad],
        }  # fmt: skip
        if drop_bad and out is not None:
            if not result.usable:
                fail(f"every file in {manifest} is unusable; nothing written to {out}")
            write_manifest(result.usable, out)
            console.print(f"wrote {len(result.usable)} usable row(s) to {escape(str(out))}", soft_wrap=True)
            doc["clean_manifest"] = out
        output.document(doc)
    if result.bad and not drop_bad:
        raise typer.Exit(int(ExitCode.FAILURE))


def _histogram_table(
    title: str,
    group: str,
    names: list[str],
    entries: list[tuple[str, dict[str, int], list[str]]],
    extra_totals_override: dict[str, int] | None = None,
) -> Table:
    """Rows = groups (clients or speakers), columns = classes, total and extra ``name=value`` counts."""
    table = Table(title=title)
    table.add_column(group)
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("total", justify="right", style="bold")
    extra_names = [e.split("=", 1)[0] for e in entries[0][2]] if entries else []
    for name in extra_names:
        table.add_column(name, justify="right")
    totals: Counter[str] = Counter()
    extra_totals = [0] * len(extra_names)
    for k, (label, hist, extras) in enumerate(entries):
        values = [int(e.split("=", 1)[1]) for e in extras]
        totals.update(hist)
        extra_totals = [a + b for a, b in zip(extra_totals, values, strict=True)]
        if k < _MAX_SHOWN:
            table.add_row(
                escape(label),
                *(str(hist.get(n, 0)) for n in names),
                str(sum(hist.values())),
                *map(str, values),
            )
    if len(entries) > _MAX_SHOWN:
        table.add_row(f"... {len(entries) - _MAX_SHOWN} more", *([""] * (len(table.columns) - 1)))
    override = extra_totals_override or {}
    extra_totals = [override.get(n, t) for n, t in zip(extra_names, extra_totals, strict=True)]
    table.add_row(
        "[bold]all[/bold]",
        *(str(totals.get(n, 0)) for n in names),
        str(sum(totals.values())),
        *map(str, extra_totals),
    )
    return table


def _client_entries(p: Partition) -> list[tuple[str, dict[str, int], list[str]]]:
    return [
        (c.client_id, c.class_histogram, [f"labelled={c.num_labelled}", f"speakers={len(c.speakers)}"])
        for c in p.clients
    ]


def _print_partition(p: Partition, source: str) -> None:
    distinct = {"speakers": len({s for c in p.clients for s in c.speakers})}  # dirichlet may share speakers
    title = f"{source}: {p.num_clients} clients"
    console.print(_histogram_table(title, "client", p.label_names, _client_entries(p), distinct))
    console.print(
        f"test: {len(p.test_utt_ids)} utterances from {len(p.test_speakers)} held-out speaker(s); "
        f"server: {len(p.server_utt_ids)} utterances from {len(p.server_speakers)} speaker(s)",
        soft_wrap=True,
    )
    personal = [len(c.personal_test_utt_ids) for c in p.clients]
    if any(personal):
        console.print(
            f"personal test (held out on each client, not in the counts above): {sum(personal)} utterances, "
            f"{min(personal)}–{max(personal)} per client",
            soft_wrap=True,
        )


def _partition_document(p: Partition, path: Path, device_manifests: list[Path] | None = None) -> dict[str, Any]:
    """What `partition`/`stats --json` print for a partition: per client its classes and labelled share,
    and the held-out test and server pools."""
    clients = [
        {"client_id": c.client_id, "utterances": len(c.utt_ids), "labelled": c.num_labelled,
         "speakers": len(c.speakers), "classes": c.class_histogram, "personal_test": len(c.personal_test_utt_ids)}
        for c in p.clients
    ]  # fmt: skip
    doc: dict[str, Any] = {
        "partition": path, "label_names": p.label_names, "seed": p.seed, "clients": clients,
        "test": {"utterances": len(p.test_utt_ids), "speakers": p.test_speakers},
        "server": {"utterances": len(p.server_utt_ids), "speakers": p.server_speakers},
    }  # fmt: skip
    if device_manifests is not None:
        doc["device_manifests"] = device_manifests
    return doc


@app.command("partition")
def partition_cmd(
    manifest: Annotated[
        Path, typer.Argument(help="Manifest CSV (only labelled rows take part).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Partition JSON to write.")],
    clients: Annotated[int | None, typer.Option(
        "--clients", "-n", min=1, help="Number of clients (by speaker: default one per speaker).")] = None,
    by: Annotated[PartitionBy, typer.Option(help="How clients are formed.")] = PartitionBy.speaker,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration (small = skewed classes).")] = 0.5,
    label_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Labelled share per client and class.")
    ] = 1.0,
    test_speakers: Annotated[
        int, typer.Option(min=0, help="Unseen speakers held out as the global test set.")
    ] = 0,
    server_speakers: Annotated[int, typer.Option(min=0, help="Speakers held out for central training.")] = 0,
    keep_speakers: Annotated[
        bool, typer.Option("--keep-speakers", help="Dirichlet: keep each speaker on one client.")
    ] = False,
    min_per_client: Annotated[int, typer.Option(min=1, help="Smallest allowed client (utterances).")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed = same partition).")] = 0,
    personal_test_fraction: Annotated[float, typer.Option(
        min=0.0, max=0.95, help="Per client, this stratified share of its own utterances is held out as its "
        "personal test set (labelled, never trained on; at least one per class it has twice).")] = 0.2,
    device_manifests: Annotated[Path | None, typer.Option(
        "--device-manifests", help="Also write one manifest per client into this directory (CLIENT.csv: "
        "training rows, hidden labels blank; personal test rows with split=personal_test), for `fedsd client "
        "run --data`.")] = None,
    json_: _Json = False,
) -> None:
    """Split a manifest into a held-out test set, a server pool and federated clients with scarce labels.

    Each client keeps a personal test set of its own utterances (--personal-test-fraction, 0 for none).

    Example: fedsd data partition iemocap.csv --clients 8 --by dirichlet --alpha 0.3 --label-fraction 0.1 --test-speakers 2 --out part.json
    """  # noqa: E501
    with json_output(json_) as output, _errors():
        part, paths = partition_manifest(
            manifest, out, device_manifests=device_manifests, num_clients=clients, by=by.value, alpha=alpha,
            label_fraction=label_fraction, test_speakers=test_speakers, server_speakers=server_speakers,
            seed=seed, keep_speakers=keep_speakers, min_per_client=min_per_client,
            personal_test_fraction=personal_test_fraction,
        )  # fmt: skip
        _print_partition(part, str(out))
        if device_manifests is not None:
            console.print(f"{len(paths)} device manifests written to {escape(str(device_manifests))}", soft_wrap=True)
        output.document(_partition_document(part, out, list(paths) if device_manifests is not None else None))


def _plot(
    entries: list[tuple[str, dict[str, int], list[str]]], names: list[str], title: str, path: Path
) -> None:
    """Stacked bar chart of class counts per group, written atomically (format from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = path.suffix.lstrip(".").lower() or "png"
    width = min(40.0, max(6.0, 0.35 * len(entries) + 2))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    try:
        xs = range(len(entries))
        bottom = [0] * len(entries)
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for k, name in enumerate(names):
            vals = [hist.get(name, 0) for _, hist, _ in entries]
            ax.bar(xs, vals, bottom=bottom, label=name, color=cmap(k % cmap.N))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_xticks(list(xs))
        ax.set_xticklabels([e[0] for e in entries], rotation=90, fontsize=7)
        ax.set_ylabel("utterances")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=min(len(names), 8), loc="upper right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _speaker_stats(source: Path) -> tuple[list[tuple[str, dict[str, int], list[str]]], list[str], dict[str, Any]]:
    """Class counts per speaker of a manifest: the histogram entries, class names and the JSON document."""
    rows = read_manifest(source)
    names = sorted({r.label for r in rows if r.label})
    if any(not r.label for r in rows):
        names.append("(unlabelled)")
    per_spk: dict[str, Counter[str]] = {}
    for r in rows:
        per_spk.setdefault(r.speaker, Counter())[r.label or "(unlabelled)"] += 1
    entries: list[tuple[str, dict[str, int], list[str]]] = [(spk, dict(h), []) for spk, h in sorted(per_spk.items())]
    title = f"{source}: {len(rows)} utterances, {len(per_spk)} speakers"
    console.print(_histogram_table(title, "speaker", names, entries))
    speakers = [{"speaker": spk, "utterances": sum(h.values()), "classes": h} for spk, h, _ in entries]
    return entries, names, {"manifest": source, "rows": len(rows), "label_names": names, "speakers": speakers}


@app.command("stats")
def stats_cmd(
    source: Annotated[Path, typer.Argument(help="manifest.csv or partition.json.", show_default=False)],
    plot: Annotated[
        Path | None, typer.Option(help="Also draw a stacked class histogram (png, pdf, svg).")
    ] = None,
    json_: _Json = False,
) -> None:
    """Class counts per speaker (manifest) or per client (partition), optionally as a stacked bar chart.

    Example: fedsd data stats part.json --plot clients.png
    """
    if plot is not None and plot.suffix.lower().lstrip(".") not in ("png", "pdf", "svg", "jpg", "jpeg"):
        fail(f"{plot}: --plot needs a .png, .pdf, .svg or .jpg file name", ExitCode.USAGE)
    with json_output(json_) as output, _errors():
        if source.suffix.lower() == ".json":
            part = Partition.load(source)
            _print_partition(part, str(source))
            entries, names = _client_entries(part), part.label_names
            doc, title = _partition_document(part, source), f"{source.name}: classes per client"
        else:
            entries, names, doc = _speaker_stats(source)
            title = f"{source.name}: classes per speaker"
        if plot is not None:
            _plot(entries, names, title, plot)
            console.print(f"plot written to {escape(str(plot))}", soft_wrap=True)
            doc["plot"] = plot
        output.document(doc)
