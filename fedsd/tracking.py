"""Experiment tracking: TensorBoard event files and MLflow runs beside ``metrics.jsonl``.

Why one small interface: central training, pretraining and the federation already write one record
per epoch/round to their run directory; a :class:`Tracker` receives the same numbers at the same
moment (step = epoch or round), so a dashboard never shows a number the run directory does not hold.
Both back ends are optional (``pip install 'fedsd[tracking]'``) and imported only when asked for.

Where things go:
- TensorBoard: one writer per phase, ``DIR/central``, ``DIR/federation``, ``DIR/pretrain`` (a run
  directory of TensorBoard each), so ``tensorboard --logdir DIR`` shows a simulation's central model
  and its federation side by side. The config is shown as text (``config``).
- MLflow: one run per phase in the experiment ``log.mlflow_experiment`` (default: the config's
  ``name``): the flattened config as params, the scalars as metrics, and at the end the run's files
  (metrics.jsonl, config.yaml, results/report, plots) as artifacts. A ``sqlite:///DB`` store keeps
  artifacts in ``mlartifacts/`` beside the database (not in the current directory).

A tracker that fails in the middle of a run (an MLflow server going away) is switched off with one
warning: the run and its ``metrics.jsonl`` matter more than a dashboard.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsd.config import ExperimentConfig

Log = Callable[[str], None]
EXTRA = "pip install 'fedsd[tracking]'"
RUN_FILES = ("metrics.jsonl", "config.yaml", "results.json", "report.md", "pretrain.json")
"""Files of a run directory logged as artifacts at the end (those that exist), plus its ``*.png``."""
_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
_METRICS_PER_BATCH = 1000


TENSORBOARD_HELP = "Log scalars for TensorBoard into DIR/<phase> (log.tensorboard; needs the tracking extra)."
MLFLOW_HELP = "Log params, metrics and files to this MLflow store: file:DIR, sqlite:///DB, http://HOST:PORT (log.mlflow_uri)."


class TrackingError(ValueError):
    """Tracking was asked for but cannot be done (package missing, unusable URI); says what to do."""


# ----------------------------------------------------------------------------- the interface
class Tracker:
    """Where a run's parameters, per-step scalars and files go; this base class drops everything."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat ``{dotted key: value}`` of what the run is (the config)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars of one epoch or round."""

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """A file of the run (stored as ``name``, default its own name)."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and end the run (idempotent); ``status`` is MLflow's run status."""


class NullTracker(Tracker):
    """Tracking off (the base class already drops everything)."""


class TensorBoardTracker(Tracker):
    """Event files via ``torch.utils.tensorboard.SummaryWriter`` (flushed after every step)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises this when the tensorboard package is missing
            raise TrackingError(f"log.tensorboard needs the tensorboard package: {EXTRA} ({e})") from None
        self.log_dir = Path(log_dir)
        self.writer: Any = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: Mapping[str, Any]) -> None:
        # 4-space indent: TensorBoard's text plugin renders markdown, and this keeps one line per key
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in params.items()))
        self.writer.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run through ``MlflowClient`` (no global active run: several may be open at once)."""

    def __init__(
        self, uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None
    ) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as e:
            raise TrackingError(f"log.mlflow_uri needs the mlflow package: {EXTRA} ({e})") from None
        self.uri = normalize_mlflow_uri(uri)
        if self.uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told; a `file:` URI given by the user is that word
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client: Any = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(experiment)
            exp_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(experiment, artifact_location=_artifact_root(self.uri))
            )
            self.run_id: str = self.client.create_run(
                exp_id, run_name=run_name, tags=dict(tags or {})
            ).info.run_id
        except Exception as e:  # MlflowException, a refused connection, a locked database ...
            raise TrackingError(f"log.mlflow_uri {uri!r}: cannot start an MLflow run: {e}") from None
        self._open = True

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _METRICS_PER_BATCH])

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        path = Path(path)
        if name is None or name == path.name:
            self.client.log_artifact(self.run_id, str(path))
            return
        with tempfile.TemporaryDirectory(prefix="fedsd-artifact-") as tmp:  # MLflow stores a file by its name
            target = Path(tmp) / name
            target.write_bytes(path.read_bytes())
            self.client.log_artifact(self.run_id, str(target))

    def close(self, status: str = "FINISHED") -> None:
        if self._open:
            self._open = False
            self.client.set_terminated(self.run_id, status)


class FanOut(Tracker):
    """Every call goes to each tracker; one that raises is dropped with a warning, the run goes on."""

    def __init__(self, trackers: Iterable[Tracker], log: Log = print) -> None:
        self.trackers = list(trackers)
        self.log = log
        self._closed = False
        atexit.register(self._at_exit)  # a run that died with an exception still ends its MLflow run

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as e:
                self.trackers.remove(t)
                self.log(
                    f"tracking: {type(t).__name__} failed in {what} ({e}); it is off for the rest of this run"
                )

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each("log_params", lambda t: t.log_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if metrics:
            self._each("log_metrics", lambda t: t.log_metrics(metrics, step))

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        self._each("log_artifact", lambda t: t.log_artifact(path, name))

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            self._each("close", lambda t: t.close(status))
            atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        self.close("FAILED")


# ----------------------------------------------------------------------------- opening
def open_tracker(
    *,
    phase: str,
    run_dir: Path,
    tensorboard: str | os.PathLike[str] | None = None,
    mlflow_uri: str | None = None,
    experiment: str = "fedsd",
    params: Mapping[str, Any] | None = None,
    log: Log = print,
) -> Tracker:
    """A tracker for one phase (``central``, ``federation``, ``pretrain``) of a run in ``run_dir``.

    Raises :class:`TrackingError` at once (before any compute) when a back end cannot be used.
    """
    trackers: list[Tracker] = []
    if tensorboard:
        trackers.append(TensorBoardTracker(Path(tensorboard).expanduser() / phase))
    if mlflow_uri:
        tags = {"fedsd.phase": phase, "fedsd.run_dir": str(Path(run_dir).resolve())}
        trackers.append(
            MLflowTracker(mlflow_uri, experiment, "/".join(Path(run_dir).resolve().parts[-2:]), tags)
        )
    if not trackers:
        return NullTracker()
    where = [f"TensorBoard {Path(tensorboard or '') / phase}"] if tensorboard else []
    where += [f"MLflow {mlflow_uri} (experiment {experiment!r})"] if mlflow_uri else []
    log(f"tracking {phase}: " + ", ".join(where))
    fan = FanOut(trackers, log)
    if params:
        fan.log_params(params)
    return fan


def tracker_for(cfg: ExperimentConfig, run_dir: Path, phase: str, log: Log = print) -> Tracker:
    """The tracker ``cfg.log`` asks for, with the flattened config as params (``NullTracker`` if none)."""
    lc = cfg.log
    if not (lc.tensorboard or lc.mlflow_uri):
        return NullTracker()
    return open_tracker(
        phase=phase, run_dir=run_dir, tensorboard=lc.tensorboard, mlflow_uri=lc.mlflow_uri,
        experiment=lc.mlflow_experiment or cfg.name, params=flatten(cfg.model_dump(mode="json")), log=log,
    )  # fmt: skip


def finish_run(tracker: Tracker, run_dir: Path, config: ExperimentConfig | None = None) -> None:
    """Log the run directory's result files (``RUN_FILES`` that exist, ``*.png``) and close the tracker.

    ``config``: the effective config, stored as ``config.yaml`` (instead of a file in ``run_dir``)."""
    if isinstance(tracker, NullTracker):
        return
    from fedsd.config import config_to_yaml

    config_yaml = config_to_yaml(config) if config is not None else None
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        if (run_dir / name).is_file() and not (name == "config.yaml" and config_yaml is not None):
            tracker.log_artifact(run_dir / name)
    for png in sorted(run_dir.glob("*.png")):
        tracker.log_artifact(png)
    if config_yaml is not None:
        with tempfile.TemporaryDirectory(prefix="fedsd-config-") as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(config_yaml, encoding="utf-8")
            tracker.log_artifact(path)
    tracker.close()


def tracking_overrides(tensorboard: Path | None, mlflow_uri: str | None) -> dict[str, Any]:
    """``--tensorboard`` / ``--mlflow-uri`` as ``log.*`` overrides (paths made absolute: the server's
    processes may run elsewhere); checks at once that the packages are installed."""
    out: dict[str, Any] = {}
    if tensorboard is not None:
        require("tensorboard", "--tensorboard")
        out["log.tensorboard"] = str(Path(tensorboard).expanduser().resolve())
    if mlflow_uri is not None:
        require("mlflow", "--mlflow-uri")
        out["log.mlflow_uri"] = normalize_mlflow_uri(mlflow_uri)
    return out


def require(package: str, what: str) -> None:
    """Fail with the install line when ``package`` (tensorboard or mlflow) is not importable."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise TrackingError(f"{what} needs the {package} package: {EXTRA}")


# ----------------------------------------------------------------------------- the scalars
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A central training (or pretraining) epoch's record → scalars: every finite number but ``epoch``
    (``lr``, ``train/total``, ``train/loss/<exit>``, ``valid/exit<k>/uar``, ``select/score`` ...)."""
    return {k: float(v) for k, v in record.items() if k != "epoch" and _number(v)}


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A federated round's ``metrics.jsonl`` record → scalars.

    Every finite top-level number but ``round``/``time`` (``exit<k>/uar``, ``/wa``, ``/f1``,
    ``/valid-uar``, personal metrics), and from the nested parts: ``train/clients`` and
    ``train/rejected`` (updates accepted and rejected), ``train/exit<k>/loss`` (mean training loss of
    the devices at exit k), ``train/missing`` (devices that did not reply), ``privacy/max_epsilon``
    (devices' sample-level DP) and ``privacy/central_epsilon`` (the server's client-level DP).
    """
    out = {k: float(v) for k, v in record.items() if k not in ("round", "time") and _number(v)}
    train = record.get("train")
    if isinstance(train, Mapping):
        out["train/clients"] = float(train.get("num_clients", 0))
        out["train/rejected"] = float(train.get("num_rejected", 0))
        losses: dict[int, list[float]] = {}
        for client in train.get("clients") or []:
            metrics = client.get("metrics") or {}
            if _number(metrics.get("loss")) and _number(metrics.get("exit")):
                losses.setdefault(int(metrics["exit"]), []).append(float(metrics["loss"]))
        for k, values in sorted(losses.items()):
            out[f"train/exit{k}/loss"] = sum(values) / len(values)
    if isinstance(record.get("missing"), list):
        out["train/missing"] = float(len(record["missing"]))
    privacy = record.get("privacy")
    if isinstance(privacy, Mapping):
        if _number(privacy.get("max_epsilon")):
            out["privacy/max_epsilon"] = float(privacy["max_epsilon"])
        central = privacy.get("central")
        if isinstance(central, Mapping) and _number(central.get("epsilon")):
            out["privacy/central_epsilon"] = float(central["epsilon"])
    return out


# ----------------------------------------------------------------------------- helpers
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}``; an empty mapping stays one key (``{}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]  # MLflow's limit on a param value


def normalize_mlflow_uri(uri: str) -> str:
    """A bare path becomes a ``file:`` URI of its absolute path; URIs pass unchanged."""
    uri = uri.strip()
    if not uri:
        raise TrackingError("log.mlflow_uri is empty: give e.g. file:./mlruns or sqlite:///mlflow.db")
    if ":" in uri or uri == "databricks":  # file:, sqlite:///, http(s)://, databricks ...
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a new experiment in a local ``sqlite:///DB`` store: ``mlartifacts/`` beside the
    database (MLflow's default is ``./mlruns`` of whatever directory the process runs in)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix + ":memory:":
        return None
    return (Path(uri[len(prefix) :]).expanduser().resolve().parent / "mlartifacts").as_uri()
