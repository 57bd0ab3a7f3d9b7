"""Export the slice of a trained model that a device at one exit needs: a checkpoint or one ONNX graph.

Why: the server side trains the full multi-exit model, but a device deployed at exit K should download
and load only the front end, layers 1..K and the heads <= K (``fedsd.model.export``); with
``format="onnx"`` that slice becomes one graph that runs without torch (``fedsd.runtime.onnx_export``),
optionally int8-quantised with calibration speech chosen here. ``fedsd export`` is a thin layer over
:func:`export`. Error messages name the command's flags, since that is where most of them come from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsd.runtime.onnx_runtime import AUTO_MIN_AGREEMENT

FORMATS = ("pytorch", "onnx")
DEMO_CALIBRATION = Path("data/synth/manifest.csv")


class ExportError(ValueError):
    """An export that cannot be done as asked; ``code`` is the command's exit status (2: bad usage)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ExportResult:
    """What was written, next to the model it came from."""

    model: Path  # the full model's checkpoint directory
    path: Path  # the exported checkpoint directory, or the .onnx file
    format: str
    exits: list[int]  # the exits kept
    label_names: list[str]
    layers: int  # transformer layers kept (1..layers)
    size_bytes: int
    source_layers: int
    source_exits: list[int]
    source_bytes: int
    parameters: int | None = None  # pytorch only
    source_parameters: int | None = None
    parent_fingerprint: str | None = None
    quantization: str | None = None  # e.g. "int8-static (static QDQ ...)"; None: fp32 (onnx) or not applicable
    calibration: str | None = None  # where the int8 calibration clips came from
    quant_choice: dict | None = None  # quant_mode "auto": the mode chosen and every agreement measured


def dir_bytes(path: Path) -> int:
    """Size on disk of every file under ``path`` (what a device would download)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _require_dir(model: Path) -> None:
    if not model.is_dir():
        raise ExportError(f"--model {model}: not a directory (expected a checkpoint written by `fedsd train`)")


def _load(model: Path) -> Any:
    from fedsd.model.multiexit import MultiExitSER

    try:
        return MultiExitSER.from_pretrained(model)
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(str(e), 1) from e


def parse_exits(exits: str | Sequence[int] | None, exit: int) -> list[int]:
    """``"1,2,3"`` or ``[1, 2, 3]`` -> ``[1, 2, 3]``; None -> ``[exit]``."""
    if not exits:
        return [exit]
    if not isinstance(exits, str):
        return [int(k) for k in exits]
    try:
        return [int(x) for x in exits.split(",") if x.strip()]
    except ValueError:
        raise ExportError(f"--exits {exits!r}: give comma-separated exit numbers, e.g. 1,2,3") from None


def export(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    exit: int,
    format: str = "pytorch",
    quantize: str | None = None,
    quant_mode: str = "auto",
    exits: str | Sequence[int] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    calibration_clips: int = 300,
    check_clips: int = 100,
    min_agreement: float = AUTO_MIN_AGREEMENT,
    force: bool = False,
    warn: Callable[[str], None] | None = None,
    step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write what a device at ``exit`` needs from the checkpoint ``model`` to ``out``.

    ``format="pytorch"``: a checkpoint directory (``out`` must be new or empty unless ``force``).
    ``format="onnx"``: one graph, ``out`` a ``.onnx`` file or a directory (``exitK[-int8].onnx`` in it);
    ``exits`` puts several exits in one graph; ``quantize="int8"`` with ``quant_mode`` (static modes
    calibrate on up to ``calibration_clips`` clips of the ``calibration`` manifest, default the demo
    corpus). ``quant_mode="auto"`` (the default) keeps the fastest static mode whose answers agree with
    fp32 on ``min_agreement`` of up to ``check_clips`` held-out clips at every exit (the manifest's
    ``valid`` rows; without any, every fifth calibration row is held out). ``warn`` hears about clips
    that were skipped and about an auto choice below ``min_agreement``; ``step`` hears what an ONNX
    export is doing (a base-size int8 export takes minutes). Raises ``ExportError``.
    """
    model, out = Path(model), Path(out)
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: valid values: {', '.join(FORMATS)}")
    if format == "onnx":
        cal = Path(calibration) if calibration is not None else None
        if not 0.0 <= min_agreement <= 1.0:
            raise ExportError(f"--min-agreement {min_agreement}: give a share between 0 and 1, e.g. 0.98")
        if check_clips < 1:
            raise ExportError(f"--check-clips {check_clips}: give at least 1")
        return _export_onnx(
            model, out, exit, force, quantize, quant_mode, exits, cal, root, calibration_clips, warn,
            (check_clips, min_agreement), step,
        )  # fmt: skip
    if quantize or exits or calibration:
        raise ExportError("--quantize, --exits and --calibration need --format onnx")
    return _export_pytorch(model, out, exit, force)


def _export_pytorch(model: Path, out: Path, exit: int, force: bool) -> ExportResult:
    from fedsd.model.backbone import ConfigError
    from fedsd.model.export import export_exit, parameter_count, parent_fingerprint

    _require_dir(model)
    if out.exists() and out.resolve() == model.resolve():
        raise ExportError(f"--out {out}: is the --model directory; export to a new directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: exists and is not empty; pass --force to replace it")
    net = _load(model)
    if exit not in net.exits:
        raise ExportError(f"--exit {exit}: not an exit of {model}; valid exits: {net.exits}")
    try:
        small = export_exit(net, exit)
    except ConfigError as e:  # pragma: no cover - the check above catches it first
        raise ExportError(str(e)) from e
    small.save_pretrained(out)
    return ExportResult(
        model=model,
        path=out,
        format="pytorch",
        exits=list(small.exits),
        label_names=list(small.label_names),
        layers=small.encoder.num_layers,
        size_bytes=dir_bytes(out),
        source_layers=net.encoder.num_layers,
        source_exits=list(net.exits),
        source_bytes=dir_bytes(model),
        parameters=parameter_count(small),
        source_parameters=parameter_count(net),
        parent_fingerprint=parent_fingerprint(small),
    )


def _calibration_manifest(
    manifest: Path | None, root: str | os.PathLike[str] | None
) -> tuple[Path, Path]:
    """The calibration manifest and its audio root (the demo corpus when none is given)."""
    if manifest is None:
        manifest = DEMO_CALIBRATION
        root = root or manifest.parent
        if not manifest.is_file():
            raise ExportError(
                "--quantize int8 needs calibration speech: pass --calibration manifest.csv --root DIR "
                "(a few hundred clips of your own speech), or run `fedsd demo` first for the demo corpus"
            )
    return manifest, Path(root) if root is not None else manifest.parent


def _hold_out(rows: list, valid: list, held_out: int, manifest: Path) -> tuple[list, list]:
    """(calibration rows, agreement-check rows): ``valid`` rows if any, else every fifth row."""
    check_rows: list = []
    if held_out and valid:
        check_rows = valid[:: max(1, len(valid) // held_out)][:held_out]
    elif held_out:  # no validation rows: hold out every fifth row from calibration
        check_rows = rows[4::5][::max(1, len(rows) // 5 // held_out)][:held_out]
        kept = {id(r) for r in check_rows}
        rows = [r for r in rows if id(r) not in kept]
        if not rows or not check_rows:
            raise ExportError(
                f"--calibration {manifest}: {len(rows) + len(check_rows)} rows are too few to hold some out for "
                "--quant-mode auto's agreement check; add rows (or rows with split=valid), or pass a fixed "
                "--quant-mode such as static"
            )
    return rows, check_rows


def _read_clips(
    chosen: list, what: str, manifest: Path, root: Path, preprocessing: dict[str, Any],
    warn: Callable[[str], None] | None,
) -> list:  # fmt: skip
    """The readable ones of ``chosen`` as the graph sees them; unreadable ones are skipped with a warning."""
    from fedsd.data.audio import AudioError
    from fedsd.runtime.onnx_runtime import load_clip

    clips = []
    for r in chosen:
        try:
            clips.append(load_clip(root / r.path, preprocessing))
        except AudioError as e:
            if warn is not None:
                warn(f"{what}: skipping {e}")
    if not clips:
        raise ExportError(f"--calibration {manifest}: none of the {what} clips could be read under {root}")
    return clips


def calibration_clips(
    preprocessing: dict[str, Any],
    manifest: Path | None,
    root: str | os.PathLike[str] | None,
    limit: int,
    warn: Callable[[str], None] | None = None,
    held_out: int = 0,
) -> tuple[list, str, list]:
    """Up to ``limit`` normalised clips (as the graph sees them, training split first), their source, and
    up to ``held_out`` clips never used for calibration: the manifest's ``valid`` rows, or (without any)
    every fifth of the calibration rows."""
    from fedsd.data.manifest import read_manifest

    manifest, base = _calibration_manifest(manifest, root)
    try:
        rows = read_manifest(manifest)
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(str(e)) from e
    valid = [r for r in rows if r.split == "valid"]
    rows = [r for r in rows if r.split == "train"] or rows
    if not rows:
        raise ExportError(f"--calibration {manifest}: no rows")
    rows, check_rows = _hold_out(rows, valid, held_out, manifest)
    step = max(1, len(rows) // max(1, limit))
    clips = _read_clips(rows[::step][:limit], "calibration", manifest, base, preprocessing, warn)
    check = _read_clips(check_rows, "agreement check", manifest, base, preprocessing, warn) if check_rows else []
    source = f"{manifest} ({len(clips)} clips"
    source += f"; agreement checked on {len(check)} held-out clips)" if check else ")"
    return clips, source, check


def _onnx_out(out: Path, wanted: Sequence[int], quantize: str | None, force: bool) -> Path:
    """The .onnx file to write: ``out`` itself, or ``exit<K...>[-int8].onnx`` inside the directory ``out``."""
    if out.suffix.lower() != ".onnx":
        if out.exists() and not out.is_dir():
            raise ExportError(f"--out {out}: give a .onnx file name or a directory")
        tag = "-".join(str(k) for k in sorted(set(wanted)))
        out = out / f"exit{tag}{'-int8' if quantize else ''}.onnx"
    if out.exists() and not force:
        raise ExportError(f"--out {out}: exists; pass --force to replace it")
    return out


def _warn_low_agreement(choice: dict[str, Any] | None, out: Path, warn: Callable[[str], None] | None) -> None:
    if choice and choice["below_min_agreement"] and warn is not None:
        worst = {m: min(a.values()) for m, a in choice["agreement"].items()}
        warn(
            f"int8: no mode kept {choice['min_agreement']:.0%} of the fp32 answers on "
            f"{choice['check_clips']} held-out clips ({', '.join(f'{m} {v:.1%}' for m, v in worst.items())}); "
            f"wrote {choice['chosen']}, the closest — check it with `fedsd evaluate --model {out}`"
        )


def _export_onnx(
    model: Path,
    out: Path,
    exit: int,
    force: bool,
    quantize: str | None,
    quant_mode: str,
    exits: str | Sequence[int] | None,
    calibration: Path | None,
    root: str | os.PathLike[str] | None,
    limit: int,
    warn: Callable[[str], None] | None,
    auto: tuple[int, float],
    step: Callable[[str], None] | None,
) -> ExportResult:
    from fedsd.model.backbone import ConfigError
    from fedsd.runtime.onnx_export import QUANT_MODES, export_onnx, graph_info

    if quantize not in (None, "int8"):
        raise ExportError(f"--quantize {quantize!r}: valid values: int8")
    if quant_mode not in QUANT_MODES:
        raise ExportError(f"--quant-mode {quant_mode!r}: valid values: {', '.join(QUANT_MODES)}")
    _require_dir(model)
    wanted = parse_exits(exits, exit)
    out = _onnx_out(out, wanted, quantize, force)
    net = _load(model)
    bad = [k for k in wanted if k not in net.exits]
    if bad:
        raise ExportError(f"--exit/--exits {bad}: not exits of {model}; valid exits: {net.exits}")
    clips, source, check = None, None, None
    if quantize and (quant_mode.startswith("static") or quant_mode == "auto"):
        pre = graph_info(net, wanted, None)["preprocessing"]
        held = auto[0] if quant_mode == "auto" else 0
        if step is not None:
            step("reading calibration speech")
        clips, source, check = calibration_clips(pre, calibration, root, limit, warn, held_out=held)
    try:
        info = export_onnx(net, wanted, out, quantize=quantize, calibration=clips, quant_mode=quant_mode,
                           check=check, min_agreement=auto[1], step=step)  # fmt: skip
    except ConfigError as e:
        raise ExportError(str(e)) from e
    choice = info.get("quantization_choice")
    _warn_low_agreement(choice, out, warn)
    return ExportResult(
        model=model,
        path=out,
        format="onnx",
        exits=[int(k) for k in info["exits"]],
        label_names=list(info["label_names"]),
        layers=int(info["exits"][-1]),
        size_bytes=out.stat().st_size,
        source_layers=net.encoder.num_layers,
        source_exits=list(net.exits),
        source_bytes=dir_bytes(model),
        quantization=f"{info['quantization']} ({info['quantization_detail']})" if quantize else None,
        calibration=source,
        quant_choice=choice,
    )
