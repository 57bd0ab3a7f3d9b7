"""A device must not wreck the model: one of five devices attacks, the defences hold.

Real federations in process (real ClientApp, real strategy): four honest devices and one whose train
reply is rewritten before it leaves, as a compromised device would. The attacked runs are compared
with the clean run on the server's unseen speakers (exit 1, the exit every device trains).

The server's test set is small (2 speakers, 48 clips), so a UAR moves in steps of one clip
(1/48 when the classes are balanced): a defended run that drops or keeps a different honest update
legitimately lands a clip or two away from the clean run. The claims are therefore stated in clips:
a defence keeps exit 1 within a few clips of the clean run, while the same attack on the plain mean
costs several times that many, so the bound separates "defended" from "wrecked" by a clear margin.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from audio_fixtures import espeak_backend
from flwr.app import Array, Context, Message, MetricRecord

from fedsd.clients.client_app import make_client_app
from fedsd.clients.device import simulated_device_config
from fedsd.config import load_config
from fedsd.server.federation import FederationSpec, run_federation
from fedsd.server.inprocess import InProcessGrid
from fedsd.server.prepare import prepare_run

CONFIG = """
name: robust
data: {{corpus: synth, root: {root}, labels: [neutral, happy, angry, sad], crop: {{max_seconds: 2.0, mode: tile}},
       split: speaker}}  # test speakers by seed, not the manifest's split=test: the bounds are pinned to them
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4]}}
federated: {{num_clients: 5, by: speaker, test_speakers: 2, server_speakers: 0, rounds: 3, local_epochs: 15,
            batch_size: 8, lr: 0.003, exits_mix: [1], label_fraction: 1.0, min_clients: 3, mode: ce,
            personal_test_fraction: 0.0}}
"""
ATTACKER = 0  # partition id of the compromised device
Tamper = Callable[[Message, Message], None]
DEFENDED_CLIPS = 3  # a defended run may land this many clips from the clean run ...
WRECKED_CLIPS = 2 * DEFENDED_CLIPS  # ... the undefended mean under the same attack loses more than this

pytestmark = pytest.mark.slow  # nine real federations (clean, 2 plain-mean attacks, 5 defences, inflation)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedsd.data.synthetic import generate_corpus
    from fedsd.model.backbone import load_backbone
    from fedsd.model.multiexit import MultiExitSER

    tmp = tmp_path_factory.mktemp("robust")
    corpus = tmp / "corpus"
    generate_corpus(  # 2 test + 5 device speakers; the bounds below are in clips of this corpus: pinned
        corpus, speakers=7, sentences=6, seed=1, backend=espeak_backend(), progress=False
    )
    torch.manual_seed(0)
    base = tmp / "base"
    MultiExitSER(
        load_backbone("tiny"), [1, 2, 3, 4], ["neutral", "happy", "angry", "sad"],
        meta={"sample_rate": 16000, "crop": {"max_seconds": 2.0, "mode": "tile"}},
    ).save_pretrained(base)  # fmt: skip
    cfg_path = tmp / "fed.yaml"
    cfg_path.write_text(CONFIG.format(root=corpus))
    return {"tmp": tmp, "base": base, "config": cfg_path}


def _scale(factor: float) -> Tamper:
    """Send global + factor · (honest update − global): ×100 inflates, −100 flips and inflates."""

    def tamper(msg: Message, reply: Message) -> None:
        sent = msg.content.array_records["arrays"]
        arrays = reply.content.array_records["arrays"]
        for key in list(arrays.keys()):
            update, start = arrays[key].numpy(), sent[key].numpy()
            arrays[key] = Array((start + factor * (update - start)).astype(update.dtype))

    return tamper


def _inflate_examples(msg: Message, reply: Message) -> None:
    metrics = reply.content.metric_records["metrics"]
    reply.content.metric_records["metrics"] = MetricRecord(dict(metrics) | {"num-examples": 1_000_000})


def _federate(world: dict[str, Path], name: str, tamper: Tamper | None, overrides: dict) -> list[dict]:
    cfg = load_config(world["config"])
    run_dir = world["tmp"] / name
    shutil.rmtree(run_dir, ignore_errors=True)
    prepared = prepare_run(cfg, run_dir, base_model=world["base"], log=lambda _: None)
    rc = simulated_device_config(cfg, prepared.partition, prepared.base_model, world["tmp"] / "shared")
    honest = make_client_app(rc)

    def device(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        attacker = int(context.node_config["partition-id"]) == ATTACKER
        if tamper is not None and attacker and msg.metadata.message_type == "train" and not reply.has_error():
            tamper(msg, reply)
        return reply

    spec = FederationSpec(
        config=str(world["config"]), run_dir=str(run_dir), base_model=str(prepared.base_model),
        partition=str(prepared.partition), overrides=overrides,
    )  # fmt: skip
    grid = InProcessGrid(device, [{"partition-id": i, "num-partitions": 5} for i in range(5)])  # type: ignore[arg-type]
    run_federation(grid, spec, log=lambda _: None)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _uar(lines: list[dict]) -> float:
    return float(lines[-1]["exit1/uar"])


def _clip(lines: list[dict]) -> float:
    """The most one clip can move exit 1's UAR on the server's test set: 1 / (classes · smallest class).

    UAR averages recall over the classes present; one clip of class c moves c's recall by 1/n_c.
    """
    confusion = lines[-1]["eval"]["1"]["confusion"]
    support = [sum(row) for row in confusion if sum(row) > 0]
    assert support, "the server's test set is empty"
    return 1.0 / (len(support) * min(support))


@pytest.fixture(scope="module")
def clean(world) -> dict:
    lines = _federate(world, "clean", None, {})
    uar, clip = _uar(lines), _clip(lines)
    assert uar >= lines[0]["exit1/uar"] + 4 * clip - 1e-9, (
        "the clean federation must learn, or nothing below means anything",
        lines[0]["exit1/uar"],
        uar,
    )
    return {"uar": uar, "clip": clip}


@pytest.fixture(scope="module")
def plain_mean(world) -> Callable[[float], list[dict]]:
    """The plain mean under the x``factor`` attack, federated once per factor for the whole module."""
    runs: dict[float, list[dict]] = {}

    def run(factor: float) -> list[dict]:
        if factor not in runs:
            runs[factor] = _federate(world, f"mean{factor:+g}", _scale(factor), {})
        return runs[factor]

    return run


@pytest.mark.parametrize("factor", [100.0, -100.0], ids=["scaled-x100", "sign-flipped-x100"])
def test_plain_mean_is_wrecked_by_one_attacker(clean: dict, plain_mean, factor: float) -> None:
    lines = plain_mean(factor)
    assert all(r["train"]["num_rejected"] == 0 for r in lines[1:])  # nothing stops it
    loss = clean["uar"] - _uar(lines)
    assert loss > WRECKED_CLIPS * clean["clip"], (
        f"one attacker cost the plain mean only {loss / clean['clip']:.1f} clip(s) "
        f"(clean UAR {clean['uar']:.3f}, attacked {_uar(lines):.3f}): the attack is too weak for the "
        f"defence tests below to mean anything"
    )


@pytest.mark.parametrize(
    ("factor", "defence"),
    [
        (100.0, {"federated.max_update_norm_ratio": 5.0}),
        (-100.0, {"federated.max_update_norm_ratio": 5.0}),
        (100.0, {"federated.aggregation": "trimmed_mean", "federated.trim_fraction": 0.2}),
        (-100.0, {"federated.aggregation": "trimmed_mean", "federated.trim_fraction": 0.2}),
        (100.0, {"federated.aggregation": "median"}),
    ],
    ids=["x100-norm-ratio", "flip-norm-ratio", "x100-trimmed-mean", "flip-trimmed-mean", "x100-median"],
)
def test_defences_keep_the_shallow_exit_within_a_few_clips(
    world, clean: dict, plain_mean, factor: float, defence
) -> None:
    name = "def-" + "-".join(f"{k.split('.')[-1]}{v}" for k, v in defence.items()) + f"{factor:+g}"
    lines = _federate(world, name, _scale(factor), defence)
    clip, uar, wrecked = clean["clip"], _uar(lines), _uar(plain_mean(factor))
    # the same attack without a defence must cost far more than the bound, or the bound proves nothing
    assert clean["uar"] - wrecked > WRECKED_CLIPS * clip, (wrecked, clean["uar"])
    assert abs(uar - clean["uar"]) <= DEFENDED_CLIPS * clip + 1e-9, (
        f"defended UAR {uar:.3f} is {abs(uar - clean['uar']) / clip:.1f} clip(s) from the clean "
        f"{clean['uar']:.3f} (bound {DEFENDED_CLIPS}); the undefended mean fell to {wrecked:.3f}"
    )
    if "federated.max_update_norm_ratio" in defence:
        for r in lines[1:]:  # the attacker is named and rejected every round, the others are kept
            rejections = r["train"]["rejections"]
            assert len(rejections) == 1 and "median" in rejections[0]["reason"], rejections
            assert r["train"]["num_clients"] == 4


def test_inflated_num_examples_are_rejected(world, clean: dict) -> None:
    lines = _federate(world, "inflate", _inflate_examples, {})
    for r in lines[1:]:
        (rejection,) = r["train"]["rejections"]
        assert "exceeds the" in rejection["reason"] and "declared when it joined" in rejection["reason"]
        assert r["train"]["num_clients"] == 4
