"""`fedsd demo` (what `make demo` runs): the whole story on generated speech, offline, in minutes.

1. generate the synthetic emotional speech corpus;
2. train the tiny multi-exit model centrally with self-distillation on a pool of server speakers;
3. federate: devices with 20 % labels and a mix of exits adapt their shallow heads by
   self-distillation from the frozen deep exit; Flower aggregates the heads;
4. evaluate on unseen speakers every round and write report.md with tables and plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fedsd.cli.errors import ExitCode, fail
from fedsd.cli.options import Engine
from fedsd.cli.output import console, err_console, json_option, json_output, progress_bar


def demo_command(
    config: Path = typer.Option(
        Path("demo"),
        "--config",
        "-c",
        help="A shipped config name (`fedsd config list`) or an experiment YAML.",
    ),
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Run directory (relative: under the current one)."
    ),
    engine: Engine = typer.Option(Engine.ray, help="ray (Flower's simulation engine) or inprocess."),
    fresh: bool = typer.Option(False, help="Retrain the central model even if the run directory has one."),
    json_: bool = json_option("Print demo-results.json (the numbers with their provenance) on stdout; the rest on stderr."),
) -> None:
    """Run the end-to-end demo: synthetic corpus → central self-distillation → federated adaptation → report.

    Example: [bold]fedsd demo --out runs/demo[/]
    """
    import shutil

    from fedsd.config import ConfigError, resolve_config_path

    t0 = time.perf_counter()
    out = out.resolve()  # data, models and the report land under the current directory, never the package's
    try:
        config = resolve_config_path(config)  # `demo` is the shipped configs/demo.yaml, installed or not
    except ConfigError as e:
        fail(str(e), ExitCode.USAGE)
    if fresh and out.exists():
        shutil.rmtree(out)
    with json_output(json_) as output:
        console.rule("[bold]1–3. data, the central multi-exit model, federated adaptation of the shallow exits")
        result = _simulate(config, out, engine)
        console.rule("[bold]4. report")
        results = write_demo_results(out / "demo-results.json", result, config, time.perf_counter() - t0)
        report = result.report or result.run_dir / "report.md"
        console.print(report.read_text(), markup=False, highlight=False)
        console.print(
            f"[bold green]demo finished in {time.perf_counter() - t0:.0f} s[/]; report: [bold]{escape(str(report))}[/]"
        )
        console.print(
            "each device's model (its exit, final global heads, personal heads): "
            f"{escape(str(out / 'federated' / 'device-models'))}"
        )
        console.print(f"results with provenance (what README's demo table quotes): [bold]{escape(str(results))}[/]")
        output.document(json.loads(results.read_text(encoding="utf-8")))


def _simulate(config: Path, out: Path, engine: Engine) -> Any:
    """Steps 1-3 with a progress bar on stderr; every device keeps its deployable model (and personal heads)."""
    from fedsd.config import ConfigError
    from fedsd.server.federation import FederationError
    from fedsd.server.simulation import simulate

    try:
        with progress_bar() as progress:
            return simulate(
                config, out=out, federation_dir=out / "federated", engine=engine.value, device_models=True,  # type: ignore[arg-type]
                progress=progress, log=err_console.print,
            )  # fmt: skip
    except ConfigError as e:
        fail(str(e), ExitCode.USAGE)
    except (ValueError, OSError, FederationError) as e:
        fail(str(e))


def _source_version() -> dict[str, Any]:
    """The git commit of the source this package runs from, and whether its code is dirty (None outside
    a checkout, e.g. an installed wheel: then the package version is what identifies the code)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:

        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                                  timeout=10).stdout  # fmt: skip

        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--", "fedsd", "server", "clients", "configs").strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "code_dirty": None}
    return {"commit": commit, "code_dirty": dirty}


def write_demo_results(path: Path, result: Any, config: Path, seconds: float) -> Path:
    """The demo's numbers as one JSON file with provenance: commit, command, config hash and the base
    model's fingerprint beside the final per-exit UAR on unseen speakers and the personal-test summary.

    README's demo table is read from such a file, never from memory or from an older run.
    """
    import hashlib
    import json
    import platform
    import sys
    from datetime import UTC, datetime

    import fedsd
    from fedsd.checkpoint import atomic_write_text

    final = {str(k): rows[-1] for k, rows in result.global_metrics.items() if rows}
    base = {str(k): rows[0] for k, rows in result.global_metrics.items() if rows}
    fingerprint = None
    meta_path = Path(result.run_dir) / "final" / "fedsd.json"
    if meta_path.exists():
        fingerprint = json.loads(meta_path.read_text(encoding="utf-8")).get("fingerprint")
    payload = {
        "provenance": {
            "fedsd": fedsd.__version__,
            **_source_version(),
            "command": sys.argv,
            "config": str(config),
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
            "backbone_fingerprint": fingerprint,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "written": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
        },  # fmt: skip
        "unseen_speakers": {"base_model": base, "final_global_heads": final},
        "personal_test": result.personal,
        "run_dir": str(result.run_dir),
    }
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")
    return path


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
