"""Experiment configuration: pydantic models of the YAML files in ``configs/``.

Why pydantic: a typo or an out-of-range value must fail before any compute starts, with a message
that names the field (``train.lr: Input should be greater than 0``), never deep inside a training loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """An unusable configuration; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Strict):
    """`data.synth`: the generated corpus (speakers × sentences × emotions), used when `data.corpus` is `synth`."""

    speakers: int = Field(24, ge=1)
    sentences: int = Field(12, ge=1)
    emotions: list[str] = ["neutral", "happy", "angry", "sad"]
    seed: int = 0
    intensity: float = Field(0.75, ge=0.0, le=1.0)
    backend: Literal["auto", "espeak", "numpy"] = "auto"


class CropConfig(_Strict):
    """How a clip is cut to `max_seconds` (random window, center, tile, or whole)."""

    max_seconds: float | None = Field(6.0, gt=0)
    mode: Literal["random", "center", "tile", "none"] = "tile"


class DataConfig(_Strict):
    """`data`: which speech (`root` + `manifest`), which labels, how clips are cropped and split."""

    corpus: str = "synth"
    """`synth` (generated on demand), a scanner name (ravdess, crema-d, ...) or `manifest`."""
    root: Path = Path("data/synth")
    manifest: Path | None = None
    """Defaults to ``<root>/manifest.csv`` for synth, else required."""
    preset: str | None = None
    labels: list[str] | None = None
    """Class order; ``None`` takes the sorted label set of the manifest."""
    sample_rate: int = Field(16000, gt=0)
    crop: CropConfig = CropConfig()
    eval_crop: CropConfig | None = None
    """Crop at evaluation; ``None`` = the training crop with mode ``center`` (deterministic)."""
    split: Literal["manifest", "speaker"] = "manifest"
    """`manifest`: use the split column; `speaker`: hold out valid/test speakers by seed."""
    valid_speakers: int = Field(0, ge=0)
    test_speakers: int = Field(0, ge=0)
    test_session: str | None = None
    """Leave-one-session-out (IEMOCAP): this session is the test set, the rest train/valid."""
    synth: SynthConfig = SynthConfig()

    @property
    def manifest_path(self) -> Path:
        return self.manifest if self.manifest is not None else self.root / "manifest.csv"


class ModelConfig(_Strict):
    """`model`: the backbone, its exits (transformer layer numbers; the last is the teacher) and heads."""

    backbone: str = "tiny"
    """Built-in name (`tiny`, `base`; `whisper-tiny.en`: pretrained, offline, `fedsd[pretrained]`), a local
    directory, or a Hugging Face hub id (e.g. `openai/whisper-tiny`)."""
    family: Literal["wav2vec2", "hubert", "wavlm", "whisper"] | None = None
    pretrained: bool = True
    """Load pretrained weights (directory / hub id). False trains the same architecture from scratch."""
    exits: list[int] = [1, 2, 3, 4]
    head: Literal["stats", "gru"] = "stats"
    head_kwargs: dict[str, Any] = {}

    @field_validator("exits")
    @classmethod
    def _exits_sorted(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one exit is needed")
        if any(k < 1 for k in v):
            raise ValueError(f"exits must be >= 1 (transformer layer numbers), got {v}")
        return sorted(set(v))


class DistillWeights(_Strict):
    """Weights of the self-distillation loss: CE, KL to the teacher (at `temperature`), feature MSE."""

    w_ce: float = Field(1.0, ge=0)
    w_kd: float = Field(1.0, ge=0)
    w_feat: float = Field(1.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    pl_threshold: float = Field(0.95, ge=0, le=1)
    """Mode ``pl`` (devices): the frozen teacher's confidence an unlabelled clip needs for a pseudo-label."""


class TrainConfig(_Strict):
    """`train`: central training of every exit (the base model devices start from)."""

    mode: Literal["sd", "ce"] = "sd"
    """`sd`: self-distillation; `ce`: cross-entropy at every exit (the baseline)."""
    distill: DistillWeights = DistillWeights()
    lr: float = Field(3e-5, gt=0)
    head_lr: float | None = Field(None, gt=0)
    """Learning rate of the exit heads (defaults to ``lr``)."""
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    epochs: int = Field(20, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm (transformers trained from scratch spike without it)."""
    label_fraction: float = Field(1.0, gt=0, le=1)
    freeze_feature_encoder: bool = True
    freeze_backbone: bool = False
    warmup_epochs: int = Field(0, ge=0)
    """Epochs of CE-only training before the distillation terms switch on."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Learning-rate shape after warm-up: constant, cosine or linear decay to 0 at the last step."""
    lr_warmup: float = Field(0.1, ge=0, lt=1)
    """Fraction of all optimizer steps spent ramping the learning rate up linearly from 0."""
    select: Literal["mean_uar", "teacher_uar", "last"] = "mean_uar"
    """Model selection on validation speech: mean UAR over all exits (default: an epoch where only the
    teacher happens to score cannot win), the teacher's UAR, or simply the last epoch."""
    mask_time_prob: float = Field(0.0, ge=0, lt=1)
    """SpecAugment-style time masking during training: fraction of frames (in spans of
    ``mask_time_length``) replaced by zeros after the front end. Off by default (HF inference parity)."""
    mask_time_length: int = Field(5, ge=1)
    noise_snr_db: tuple[float, float] | None = None
    """Training augmentation: add white noise at an SNR drawn uniformly from this range (dB) per clip."""
    seed: int = 0
    device: str = "cpu"
    num_workers: int = Field(0, ge=0)


class DPConfig(_Strict):
    """Sample-level differential privacy of each device's head training (Opacus DP-SGD).

    Give either ``noise_multiplier`` (σ, fixed) or ``target_epsilon`` (σ calibrated so that ``rounds``
    rounds of local training spend exactly that ε). ``max_grad_norm`` is the per-utterance clip C,
    ``delta`` the δ of (ε, δ)-DP (keep it below 1 / utterances on a device).
    """

    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    rounds: int | None = Field(None, ge=1)
    """Rounds a ``target_epsilon`` must cover (default: ``federated.rounds``)."""
    epsilon_budget: float | None = Field(None, gt=0)
    """Stop training when the next round would push ε past this (default: ``target_epsilon``)."""
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"

    @model_validator(mode="after")
    def _one_of(self) -> DPConfig:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or target_epsilon")
        return self


class CentralDPConfig(_Strict):
    """Client-level DP at the server: clip each device's update per exit head, add Gaussian noise."""

    clip_norm: float = Field(..., gt=0)
    """L2 bound of one device's update (change of one exit head's weights in one round)."""
    noise_multiplier: float = Field(..., ge=0)
    """Noise std per coordinate = noise_multiplier × clip_norm / (devices that sent the head)."""
    delta: float = Field(1e-5, gt=0, lt=1)
    seed: int | None = None
    """Seed of the server's noise (None: fresh OS randomness — the only safe choice in production)."""


class FederatedConfig(_Strict):
    """`federated`: devices, rounds, local training, aggregation, robustness, privacy, simulation resources."""

    num_clients: int | None = Field(8, ge=1)
    by: Literal["speaker", "dirichlet", "iid"] = "speaker"
    alpha: float = Field(0.5, gt=0)
    keep_speakers: bool = False
    label_fraction: float = Field(0.2, ge=0, le=1)
    personal_test_fraction: float = Field(0.2, ge=0, lt=1)
    """Per device, this stratified share of its own utterances is its personal test set (never trained on)."""
    personalize_epochs: int = Field(0, ge=0)
    """After the last round, each device fine-tunes a private copy of its heads this many epochs (0: off)."""
    test_speakers: int = Field(4, ge=0)
    server_speakers: int = Field(8, ge=0)
    server_valid_speakers: int = Field(2, ge=1)
    """Speakers of the server pool held out to select the central model's epoch (never trained on)."""
    rounds: int = Field(5, ge=0)
    """Federated rounds. 0: no federation at all: each device only fine-tunes its personal heads from the
    base model's (``personalize_epochs``), the local-only baseline, through the same device code."""
    local_epochs: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    proximal_mu: float = Field(0.0, ge=0)
    """FedProx's proximal term μ/2·‖w − w_global‖² on every trained head (0: off): keeps a device's heads
    near the global heads it received, against drift towards its own speakers."""
    server_lr: float = Field(1.0, gt=0, le=10)
    """Server learning rate η: global ← global + η·(aggregate − global) (1: plain FedAvg; < 1 moves the
    global heads only part of the way towards the devices' average each round)."""
    exits_mix: list[int] | None = None
    """Exit per simulated device, dealt round-robin (None: every device at the teacher's exit)."""
    train_exits: Literal["upto", "only"] = "upto"
    teacher: Literal["deep", "local"] = "deep"
    mode: Literal["sd", "ce", "pl"] = "sd"
    """Devices' loss: ``sd`` self-distillation, ``ce`` labels only, ``pl`` labels + the teacher's confident
    pseudo-labels on unlabelled speech (``distill.pl_threshold``; fedsd.training.distill)."""
    distill: DistillWeights = DistillWeights()
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_clients: int = Field(2, ge=1)
    max_update_norm: float | None = Field(None, gt=0)
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    max_update_norm_ratio: float | None = Field(None, gt=1)
    """Reject an update whose change of a head exceeds this multiple of the round's median change."""
    max_num_examples: float | None = Field(None, gt=0)
    """Cap on one device's weight in the mean (its ``num-examples``)."""
    dp: DPConfig | None = None
    """Sample-level DP on every device (a device's own ``--dp-*`` flags take precedence)."""
    central_dp: CentralDPConfig | None = None
    round_timeout: float = Field(600.0, gt=0)
    federated_evaluation: bool = False
    ray_address: str | None = None
    """Simulation: join this running Ray cluster (`host:port` of `ray start --head`, or `auto`) instead of
    starting a private Ray on this machine; the cluster keeps running afterwards."""
    cpus_per_client: float = Field(1.0, gt=0)
    """Simulation: CPU cores Ray reserves for each virtual device (fractions allowed: 0.5 = two per core)."""
    gpus_per_client: float = Field(0.0, ge=0)
    """Simulation: GPUs Ray reserves for each virtual device (fractions share a GPU); > 0 trains on CUDA."""
    seed: int = 0

    @model_validator(mode="after")
    def _central_dp_needs_mean(self) -> FederatedConfig:
        if self.central_dp is not None and self.aggregation != "mean":
            raise ValueError(
                "central_dp averages clipped updates; it cannot be combined with "
                f"aggregation={self.aggregation!r} (use aggregation: mean)"
            )
        return self

    @model_validator(mode="after")
    def _central_dp_excludes_norm_ratio(self) -> FederatedConfig:
        if self.central_dp is not None and self.max_update_norm_ratio is not None:
            raise ValueError(
                "federated.max_update_norm_ratio cannot be combined with federated.central_dp: rejecting "
                "an update relative to the other devices' breaks the DP sensitivity bound (use "
                "max_update_norm, an absolute bound, or central_dp's own clip_norm)"
            )
        return self


class LogConfig(_Strict):
    """Experiment tracking beside metrics.jsonl (``pip install 'fedsd[tracking]'``); off by default.

    The CLI's ``--tensorboard DIR`` and ``--mlflow-uri URI`` set these (see ``fedsd.tracking``)."""

    tensorboard: Path | None = None
    """TensorBoard log directory: each phase writes its own run in it (DIR/central, DIR/federation)."""
    mlflow_uri: str | None = Field(None, min_length=1)
    """MLflow tracking URI: ``file:./mlruns``, ``sqlite:///mlflow.db`` or a server's ``http://HOST:5000``."""
    mlflow_experiment: str | None = Field(None, min_length=1)
    """MLflow experiment the runs go to (default: the config's ``name``)."""


class ExperimentConfig(_Strict):
    """One experiment: a YAML file in `configs/` (`load_config`), sections `data`, `model`, `train`,
    `federated` (and `log`); unknown keys and out-of-range values are errors naming the field."""

    name: str = "experiment"
    base_model: Path | None = None
    """A trained multi-exit checkpoint to federate from; ``None`` = train one centrally first."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federated: FederatedConfig = FederatedConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _check_mix(self) -> ExperimentConfig:
        mix = self.federated.exits_mix
        if mix is not None:
            bad = [k for k in mix if k not in self.model.exits]
            if bad:
                raise ValueError(
                    f"federated.exits_mix has {bad}, which are not in model.exits {self.model.exits}"
                )
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def shipped_configs_dir() -> Path:
    """The folder of the configs that come with fedsd.

    A wheel carries ``configs/`` as package data (``fedsd/configs``); a checkout or an editable install
    reads the repository's ``configs/`` beside ``fedsd/``.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return here / "configs"


def shipped_configs() -> dict[str, Path]:
    """Shipped config name (``demo``) → its YAML file, sorted by name."""
    folder = shipped_configs_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """The YAML file ``path`` names: an existing file as given, else a shipped config.

    Why: after ``pip install fedsd`` there is no ``configs/`` folder in the working directory, yet
    ``--config demo`` and the documented ``--config configs/demo.yaml`` must still work. A bare name
    (``demo``, ``demo.yaml``) or a missing ``configs/NAME.yaml`` falls back to the shipped config of that
    name; any other missing path is an error that lists the shipped names.
    """
    given = Path(path).expanduser()
    if given.is_file():
        return given
    bare = given.parent == Path(".") or given.parent == Path("configs")
    name = given.name[: -len(".yaml")] if given.name.endswith(".yaml") else given.name
    shipped = shipped_configs()
    if bare and given.suffix in ("", ".yaml") and name in shipped:
        return shipped[name]
    names = ", ".join(shipped) or "none found"
    raise ConfigError(
        f"{path}: config file not found (shipped configs: {names}; pass a bare name such as "
        "`--config demo`, or copy one with `fedsd config show demo > my.yaml`)"
    )


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load a YAML config; relative paths in ``data`` stay relative to the current directory.

    ``path`` is a YAML file or the name of a shipped config (``demo``; see `resolve_config_path`).
    ``overrides`` uses dotted keys (``{"train.epochs": 2}``), as given on the command line.
    """
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (data, model, train, federated)")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(path))) from None


def override_config(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A copy of ``cfg`` with dotted ``overrides`` applied and validated like a loaded file."""
    raw = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, f"config {cfg.name!r} with overrides")) from None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Command-line ``KEY=VALUE`` items (``train.epochs=2``) → dotted overrides, values read as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: '{p}' is not a section")
    node[parts[-1]] = value


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
