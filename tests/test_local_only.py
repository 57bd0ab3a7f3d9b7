"""The local-only baseline: ``federated.rounds: 0`` runs no federation, only each device's personal heads.

A reviewer's first question of a federated method is whether federation helps at all; the answer needs
devices that fine-tune the base model's heads on their own speech alone, through the same device code
(features, loss, seeds, personal test speech) as the federated arms. Real partition, real ClientApp and
server over the in-process grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import federation, inprocess_grid

from fedsd.model.multiexit import MultiExitSER
from fedsd.server.federation import run_federation

LOCAL_ONLY = {"rounds": 0, "local_epochs": 2, "min_clients": 2, "personal_test_fraction": 0.25,
              "personalize_epochs": 3}  # fmt: skip


@pytest.fixture()
def local_run(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path):
    return federation(
        tmp_path, small_corpus, tiny_model_dir, name="local-only", device_models=tmp_path / "models", **LOCAL_ONLY
    )


def test_zero_rounds_trains_no_global_heads_and_personalizes_from_the_base_model(local_run) -> None:
    fed = local_run
    logs: list[str] = []
    result = run_federation(inprocess_grid(fed.rc), fed.spec, log=logs.append)
    lines = [json.loads(x) for x in (Path(fed.spec.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0], logs  # the base model's evaluation, no training round
    assert "train" not in lines[0]
    assert "final" in lines[-1], "\n".join(logs)
    final = lines[-1]["final"]
    assert len(final["devices"]) == 2
    base = MultiExitSER.from_pretrained(fed.prepared.base_model).head_state_dict()
    served = MultiExitSER.from_pretrained(result.final_dir).head_state_dict()
    assert all(torch.equal(served[k], v) for k, v in base.items())  # the server never changed a head
    models = Path(fed.rc["sim-device-models"])
    for d in final["devices"].values():
        m = d["metrics"]
        assert m["personalize-epochs"] == 3 and "exit1/personal-uar-personal" in m
        own = MultiExitSER.from_pretrained(models / d["name"])
        assert all(torch.equal(v, base[k]) for k, v in own.head_state_dict().items())  # global = base
        mine = MultiExitSER.from_pretrained(models / d["name"] / "personal").head_state_dict()
        assert any(not torch.equal(v, base[k]) for k, v in mine.items())  # trained on its own speech only
