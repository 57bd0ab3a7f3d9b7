"""Multi-exit speech emotion model: HF encoder with a truncated forward, exit heads, checkpoints."""

from fedsd.model.backbone import (
    BUILTINS,
    FAMILIES,
    BackboneError,
    ConfigError,
    EncoderState,
    TruncatedEncoder,
    backbone_fingerprint,
    build_backbone,
    builtin_config,
    load_backbone,
)
from fedsd.model.config import MultiExitConfig
from fedsd.model.heads import HEADS, ExitHead, GRUHead, HeadOutput, StatsHead, build_head, stats_pool
from fedsd.model.multiexit import MultiExitSER

__all__ = [
    "BUILTINS",
    "FAMILIES",
    "HEADS",
    "BackboneError",
    "ConfigError",
    "EncoderState",
    "ExitHead",
    "GRUHead",
    "HeadOutput",
    "MultiExitConfig",
    "MultiExitSER",
    "StatsHead",
    "TruncatedEncoder",
    "backbone_fingerprint",
    "build_backbone",
    "build_head",
    "builtin_config",
    "load_backbone",
    "stats_pool",
]
