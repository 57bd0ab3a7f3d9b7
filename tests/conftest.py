"""Shared fixtures: a small generated corpus and a tiny multi-exit model, built once per session."""

from __future__ import annotations

import os

# One compute thread per process, set before anything imports torch: tests run several processes at
# once (pytest-xdist workers, a server, its ServerApp and devices), and two 2-thread processes on 2
# cores run ~6x slower each than two 1-thread ones.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from audio_fixtures import corpus_backend, espeak_backend  # noqa: E402
from harness import LABELS, Procs  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow (real-process) tests first: with pytest-xdist the long ones start at once and the many
    short ones fill the gaps, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 speakers × 3 sentences × 4 emotions of generated speech (72 files) with a manifest."""
    from fedsd.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    generate_corpus(out, speakers=6, sentences=3, seed=0, backend=corpus_backend(), progress=False)
    return out


@pytest.fixture(scope="session")
def espeak_corpus(small_corpus: Path) -> Path:
    """``small_corpus`` for tests whose numbers depend on its audio: pinned to espeak-ng speech (skipped
    with a reason where espeak-ng is missing, an error under `make test`)."""
    assert espeak_backend() == corpus_backend()
    return small_corpus


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny multi-exit model (exits 1–4, stats heads) saved as a fedsd checkpoint."""
    import torch

    from fedsd.model.backbone import load_backbone
    from fedsd.model.multiexit import MultiExitSER

    torch.manual_seed(0)
    model = MultiExitSER(
        load_backbone("tiny"),
        [1, 2, 3, 4],
        LABELS,
        meta={"sample_rate": 16000, "crop": {"max_seconds": 2.0, "mode": "tile"}},
    )
    out = tmp_path_factory.mktemp("model") / "base"
    model.save_pretrained(out)
    return out


@pytest.fixture()
def task_identity() -> Iterator[None]:
    """Flower's task identity as inside a ClientApp process (task 1, run 7, node 1), restored after: for
    tests that call the ClientApp directly."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture()
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Real processes for one test (tests/harness.py): logs in tmp_path; at teardown everything it
    started is stopped by pid, and the test fails if any process (or a Flower process on one of its
    ports) is left."""
    harness = Procs(tmp_path)
    try:
        yield harness
    finally:
        left = harness.close()
    assert not left, "processes left after the test:\n" + "\n".join(left)
