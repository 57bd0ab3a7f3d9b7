"""The server's federated run: handshake, model delivery, rounds, evaluation, checkpoints, resume.

Independent of how messages travel: the same ``run_federation(grid, spec)`` runs inside a deployed
ServerApp, Flower's simulation engine, or an in-process grid in tests.

Run directory (every write atomic):
    state.json              last completed round, fingerprint, settings (what --resume reads)
    rounds/round_NNN.safetensors   global heads after round N (round 000 = the base model's heads)
    metrics.jsonl           one line per round: server evaluation per exit, clients, rejections
    final/                  complete checkpoint (base backbone + aggregated heads)
    report.md, *.png        tables and plots
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsd.checkpoint import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    save_tensors,
    sweep_temporaries,
)
from fedsd.config import load_config
from fedsd.data.manifest import ManifestRow
from fedsd.metrics import ClassificationReport
from fedsd.model.multiexit import MultiExitSER
from fedsd.security.wire import QUERY_DONE, heads_to_record, record_to_heads
from fedsd.server.central_dp import CentralDP
from fedsd.server.handshake import Greeting, device_name, greet
from fedsd.server.replies import ReplyTracker, describe_failure, failed_devices
from fedsd.server.round_record import personal_record, privacy_record, round_line
from fedsd.server.run_spec import (
    FederationError,
    FederationResult,
    FederationSpec,
    eval_rows,
    train_config_record,
    valid_rows,
)
from fedsd.server.strategy import NotEnoughDevices, PartialFedAvg, wait_for_nodes
from fedsd.server.validation import metric_cap_problem
from fedsd.tracking import NullTracker, Tracker, finish_run, round_scalars, tracker_for
from fedsd.training.cached import evaluate_cached, model_crop
from fedsd.training.features import CachedFeatures, FeatureCache

__all__ = [
    "DONE_TIMEOUT_S",
    "Federation",
    "FederationError",
    "FederationResult",
    "FederationSpec",
    "exits_in",
    "run_federation",
    "train_config_record",
]

Log = Callable[[str], None]
DONE_TIMEOUT_S = 120.0
"""Longest wait for the devices' end-of-run replies (they personalise and write their model first)."""


def _round_path(run_dir: Path, rnd: int) -> Path:
    return run_dir / "rounds" / f"round_{rnd:03d}.safetensors"


class Federation:
    """One federated run over a grid; see the module docstring for what it writes."""

    def __init__(self, spec: FederationSpec, log: Log = print) -> None:
        self.spec = spec
        self.log = log
        self.cfg = load_config(spec.config, spec.overrides)
        self.run_dir = Path(spec.run_dir)
        self.model = MultiExitSER.from_pretrained(spec.base_model)
        self.fingerprint = self.model.backbone_fingerprint()
        fc = self.cfg.federated
        self.rounds = spec.rounds or fc.rounds
        self.min_clients = spec.min_clients or fc.min_clients
        self.history: list[dict[str, Any]] = []
        self._greeted: set[int] = set()
        self._eval_feats: CachedFeatures | None = None
        self._valid_feats: CachedFeatures | None = None
        self.strategy = PartialFedAvg(
            fraction_train=fc.fraction_train,
            fraction_evaluate=1.0 if fc.federated_evaluation else 0.0,
            min_train_nodes=self.min_clients,
            min_evaluate_nodes=self.min_clients,
            min_available_nodes=self.min_clients,
            aggregation=fc.aggregation,
            trim_fraction=fc.trim_fraction,
            max_update_norm=fc.max_update_norm,
            max_num_examples=fc.max_num_examples,
            max_update_norm_ratio=fc.max_update_norm_ratio,
            central_dp=CentralDP(**fc.central_dp.model_dump()) if fc.central_dp else None,
            required_metrics=("dp-epsilon",) if fc.dp else (),
            node_wait_s=self.spec.node_wait_s,
            server_lr=fc.server_lr,
        )
        self.federation_id = uuid.uuid4().hex[:16]
        self.device_epsilon: dict[int, float] = {}
        """Latest cumulative ε each device reported (devices keep it between rounds they skip)."""
        self.device_names: dict[int, str] = {}
        """Node id → the name the device gave (its partition's client id): what reports show."""
        self.tracker: Tracker = NullTracker()  # opened by run() when the config's log section asks

    # ----------------------------------------------------------------- state and resume
    def _state_path(self) -> Path:
        return self.run_dir / "state.json"

    def _load_start(self) -> int:
        """Round to start after; loads the global heads of that round into the model."""
        state_path = self._state_path()
        if self.spec.resume and state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") != self.fingerprint:
                raise FederationError(
                    f"{state_path}: the run was started with backbone {state.get('fingerprint', '?')[:12]}, "
                    f"but --base-model {self.spec.base_model} has {self.fingerprint[:12]}"
                )
            done = int(state["completed_round"])
            if self.strategy.central_dp is not None:  # keep counting; never replay the noise
                self.strategy.central_dp.restore(state.get("central_dp"), done, self._read_history(done))
            self.federation_id = str(state.get("federation_id") or self.federation_id)
            for rec in self._read_history(done):
                self._note_epsilons(rec)
            self.model.load_head_state_dict(load_tensors(_round_path(self.run_dir, done)))
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():
                lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                self.history = [r for r in lines if int(r.get("round", -1)) <= done]
                if len(self.history) < len(lines):  # a crash between metrics and state.json
                    atomic_write_text(
                        metrics, "".join(json.dumps(r, default=str) + "\n" for r in self.history)
                    )
                    self.log(f"dropped {len(lines) - len(self.history)} metrics line(s) after round {done}")
            for stale in sorted((self.run_dir / "rounds").glob("round_*.safetensors")):
                if stale.stem[6:].isdigit() and int(stale.stem[6:]) > done:  # never committed to state.json
                    stale.unlink()
            swept = [p for d in (self.run_dir, self.run_dir / "rounds") for p in sweep_temporaries(d)]
            if swept:
                self.log(f"removed {len(swept)} temporary file(s) left by an interrupted write")
            self.log(f"resuming after round {done} of {self.rounds} ({state_path})")
            return done
        if self.spec.resume:
            self.log(f"--resume: no {state_path} yet, starting from round 0")
        if (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()
        return 0

    def _save_round(self, rnd: int, record: dict[str, Any]) -> None:
        save_tensors(
            _round_path(self.run_dir, rnd), self.model.head_state_dict(), {"fingerprint": self.fingerprint}
        )
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        self.tracker.log_metrics(round_scalars(record), step=rnd)
        atomic_write_json(
            self._state_path(),
            {
                "completed_round": rnd,
                "rounds": self.rounds,
                "fingerprint": self.fingerprint,
                "federation_id": self.federation_id,
                "central_dp": self.strategy.central_dp.state() if self.strategy.central_dp else None,
                "base_model": self.spec.base_model,
                "spec": asdict(self.spec),
                "time": time.time(),
            },
        )

    # ----------------------------------------------------------------- privacy
    def _read_history(self, done: int) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        return [r for r in lines if int(r.get("round", -1)) <= done]

    def _note_epsilons(self, rec: dict[str, Any]) -> None:
        for node, eps in (rec.get("privacy", {}).get("device_epsilon") or {}).items():
            self.device_epsilon[int(node)] = float(eps)

    def _privacy_record(self, report: Any) -> dict[str, Any]:
        """ε per device (cumulative, as each reported) and the maximum; central DP's ε when on."""
        return privacy_record(report, self.device_epsilon, self.cfg.federated.dp)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[int, ClassificationReport]:
        """Per-exit metrics of the current global heads on the server's unseen speakers."""
        if self._eval_feats is None:
            self._eval_feats = self._features(*eval_rows(self.spec, self.cfg))
        return evaluate_cached(self.model, self._eval_feats, self.model.exits) if self._eval_feats else {}

    def evaluate_valid(self) -> dict[int, ClassificationReport]:
        """Per-exit metrics of the current global heads on the server pool's validation speakers."""
        if self._valid_feats is None:
            self._valid_feats = self._features(*valid_rows(self.spec, self.cfg))
        return evaluate_cached(self.model, self._valid_feats, self.model.exits) if self._valid_feats else {}

    def _features(self, rows: list[ManifestRow], root: Path) -> CachedFeatures | None:
        if not rows:
            return None
        cache_dir = Path(self.spec.cache_dir) if self.spec.cache_dir else self.run_dir / "cache"
        cache = FeatureCache(cache_dir, self.model, model_crop(self.model))
        return cache.get(rows, root, self.model.exits, label_names=self.model.label_names)

    @staticmethod
    def _personal_record(device_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return personal_record(device_metrics)

    def _eval_record(self, rnd: int) -> dict[str, Any]:
        reports = self.evaluate()
        rec: dict[str, Any] = {"round": rnd, "time": time.time()}
        for k, r in reports.items():
            rec[f"exit{k}/uar"] = r.uar
            rec[f"exit{k}/wa"] = r.wa
            rec[f"exit{k}/f1"] = r.macro_f1
        rec["eval"] = {str(k): r.to_dict() for k, r in reports.items()}
        for k, r in self.evaluate_valid().items():
            rec[f"exit{k}/valid-uar"] = r.uar
        return rec

    # ----------------------------------------------------------------- handshake
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        return wait_for_nodes(grid, self.min_clients, self.spec.node_wait_s, "the handshake")

    def handshake(self, grid: Grid) -> dict[int, dict[str, Any]]:
        """Ask every device what it is; deliver the base model to those that lack it."""
        nodes = self._wait_for_nodes(grid)
        infos = self._greet(grid, nodes)
        self._greeted = set(nodes)
        self.strategy.declared_examples = {n: float(i["n-utterances"]) for n, i in infos.items()}
        self.strategy.declared_exits = {n: int(i["exit"]) for n, i in infos.items()}
        self._note_identities(infos)
        return infos

    def _note_identities(self, infos: dict[int, dict[str, Any]]) -> None:
        """Central DP counts per device identity (stable across SuperNode restarts), not per node id."""
        if self.strategy.central_dp is not None:
            ids = {n: str(i["device-id"]) for n, i in infos.items() if i.get("device-id")}
            self.strategy.central_dp.identities |= ids

    def admit_late(self, grid: Grid, infos: dict[int, dict[str, Any]]) -> list[int]:
        """Greet devices that connected after the handshake (a restarted SuperNode gets a new node id).

        Without this, their replies would be rejected for lacking a declared data size. Each new node is
        greeted once; returns the nodes admitted.
        """
        new = sorted(set(grid.get_node_ids()) - set(infos) - self._greeted)
        if not new:
            return []
        self._greeted |= set(new)
        self.log(f"{len(new)} device(s) joined during the run: {', '.join(map(str, new))}")
        joined = self._greet(grid, new)
        infos |= joined
        declared = dict(self.strategy.declared_examples or {})
        declared |= {n: float(i["n-utterances"]) for n, i in joined.items()}
        self.strategy.declared_examples = declared
        exits = dict(self.strategy.declared_exits or {})
        exits |= {n: int(i["exit"]) for n, i in joined.items()}
        self.strategy.declared_exits = exits
        self._note_identities(joined)
        return sorted(joined)

    def _greet(self, grid: Grid, nodes: Sequence[int]) -> dict[int, dict[str, Any]]:
        """query.info to ``nodes``, then the base model to those that lack it (``fedsd.server.handshake``)."""
        greeting = Greeting(
            fingerprint=self.fingerprint, base_model=self.spec.base_model,
            deliver_model=self.spec.deliver_model, timeout=self.cfg.federated.round_timeout,
            log=self.log, name_device=lambda node, reply: device_name(self.device_names, node, reply),
        )  # fmt: skip
        return greet(grid, nodes, greeting)

    # ----------------------------------------------------------------- the run
    def run(self, grid: Grid) -> FederationResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker_for(self.cfg, self.run_dir, "federation", log=self.log)
        start = self._load_start()
        if start >= self.rounds and self.rounds > 0:  # 0 rounds (local-only): handshake, round 0, done
            self.log(f"all {self.rounds} rounds are already done")
            self.notify_done(grid)
            return FederationResult(self.run_dir, start, self.history, self._finish())
        infos = self.handshake(grid)
        if len(infos) < self.min_clients:
            raise NotEnoughDevices(f"{len(infos)} usable device(s); min_clients is {self.min_clients}")
        tracker = ReplyTracker(grid)  # names the devices that did not reply (see _after_round)

        def evaluate_fn(server_round: int, arrays: Any) -> MetricRecord | None:
            return self._after_round(grid, tracker, infos, start, server_round, arrays)

        self.strategy.start(
            tracker,
            heads_to_record(self.model.head_state_dict()),
            num_rounds=self.rounds - start,
            timeout=self.cfg.federated.round_timeout,
            train_config=train_config_record(
                self.cfg, self.fingerprint, start, num_rounds=self.rounds, federation_id=self.federation_id
            ),
            evaluate_fn=evaluate_fn,
        )
        self.notify_done(grid)
        return FederationResult(self.run_dir, self.rounds, self.history, self._finish())

    def _after_round(
        self,
        grid: Grid,
        tracker: ReplyTracker,
        infos: dict[int, dict[str, Any]],
        start: int,
        server_round: int,
        arrays: Any,
    ) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: evaluate the round's global heads, record what happened to the
        round (train report, privacy, missing devices, late joiners) and commit it to the run directory."""
        rnd = start + server_round
        if server_round == 0:
            if start > 0:
                return None  # resumed: round `start` is on disk already
            rec = self._eval_record(0)
            rec["devices"] = {str(n): i for n, i in infos.items()}
        else:
            self.model.load_head_state_dict(record_to_heads(arrays))
            rec = self._eval_record(rnd)
            self._add_round_reports(rec, server_round, rnd)
            self._add_missing(rec, tracker, infos, rnd)
        if rnd < self.rounds:  # devices that (re)connected since the handshake take part from the next round
            joined = self.admit_late(grid, infos)
            if joined:
                rec["joined"] = joined
        rec["device_names"] = {str(n): name for n, name in sorted(self.device_names.items())}
        self._save_round(rnd, rec)
        self.history.append(rec)
        self.log(round_line(rec, rnd, self.rounds, self.model.exits))
        return MetricRecord(
            {
                k: v
                for k, v in rec.items()
                if k.startswith("exit") and "/personal-" not in k and isinstance(v, float)
            }  # fmt: skip
        )

    def _add_round_reports(self, rec: dict[str, Any], server_round: int, rnd: int) -> None:
        """The strategy's train and federated-evaluation reports of the round, devices' personal
        metrics and privacy."""
        report = self.strategy.train_reports.get(server_round)
        if report is not None:
            rec["train"] = report.to_dict() | {"round": rnd}
            rec |= self._personal_record([c.metrics for c in report.clients])
            privacy = self._privacy_record(report)
            if privacy:
                rec["privacy"] = privacy
        fed_eval = self.strategy.evaluate_reports.get(server_round)
        if fed_eval is not None:
            rec["federated_eval"] = fed_eval.to_dict()

    def _add_missing(
        self, rec: dict[str, Any], tracker: ReplyTracker, infos: dict[int, dict[str, Any]], rnd: int
    ) -> None:
        """Devices sent a train message that gave no reply or an error (died, timed out, raised)."""
        missing = failed_devices(tracker.take(), "train")
        rec["missing"] = sorted(missing)
        if missing:
            rec["missing_detail"] = {
                str(n): {"exit": infos.get(n, {}).get("exit"), "reason": why}
                for n, why in sorted(missing.items())
            }
        for n, why in sorted(missing.items()):
            exit_k = infos.get(n, {}).get("exit")
            self.log(describe_failure(rnd, n, why, exit_k, self.cfg.federated.round_timeout))

    def notify_done(self, grid: Grid, timeout: float | None = None) -> int:
        """Tell every connected device the run is over (best effort); returns how many confirmed.

        A supervised device (`fedsd client run`) stops its SuperNode when it hears this, instead of
        waiting for the server to disappear. The message carries the final global heads and the run's
        training config: each device measures them on its personal test speech, keeps them as its
        deployable model (``--out``) and, with personalize-epochs, fine-tunes private heads. Their
        replies (metrics only) become ``final`` in the last metrics.jsonl line.
        """
        try:
            nodes = sorted(grid.get_node_ids())
            if not nodes:
                return 0
            config = dict(train_config_record(
                self.cfg, self.fingerprint, 0, num_rounds=self.rounds, federation_id=self.federation_id
            ))  # fmt: skip
            config |= {"rounds": self.rounds, "status": "completed",
                       "personalize-epochs": self.cfg.federated.personalize_epochs}  # fmt: skip
            content = RecordDict(
                {"arrays": heads_to_record(self.model.head_state_dict()), "config": ConfigRecord(config)}
            )
            msgs = [Message(content, dst_node_id=n, message_type=QUERY_DONE) for n in nodes]
            wait = timeout or min(self.cfg.federated.round_timeout, DONE_TIMEOUT_S)
            replies = list(grid.send_and_receive(msgs, timeout=wait))
            ok = sum(1 for r in replies if not r.has_error())
            self.log(f"told {ok} of {len(nodes)} device(s) that the run is over")
            self._note_final(nodes, replies)
            return ok
        except Exception as e:  # never fail a finished run over a courtesy message
            self.log(f"could not tell the devices that the run is over: {e}")
            return 0

    def _note_final(self, nodes: Sequence[int], replies: Sequence[Message]) -> None:
        """Devices' end-of-run personal metrics (untrusted: numbers only) → ``final`` of the last round."""
        if not self.history:
            return
        from fedsd.server.report import device_names

        names = device_names(self.history) | {str(n): v for n, v in self.device_names.items()}  # resumed too
        asked, seen = set(nodes), set()
        devices: dict[str, dict[str, Any]] = {}
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error() or node not in asked or node in seen or not r.has_content():
                continue
            seen.add(node)
            metrics = dict(r.content.metric_records.get("metrics", MetricRecord()))
            too_big = metric_cap_problem(metrics)
            if too_big is not None:  # a device must not decide how much the last line holds
                self.log(f"device {node}: end-of-run metrics left out: {too_big}")
                continue
            kept = {k: float(v) for k, v in metrics.items()
                    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip
            if kept:
                devices[str(node)] = {"name": names.get(str(node), str(node)), "metrics": kept}
        if not devices:
            return
        final = {"devices": devices} | self._personal_record([d["metrics"] for d in devices.values()])
        self.history[-1]["final"] = final
        lines = "".join(json.dumps(r, default=str) + "\n" for r in self.history)
        atomic_write_text(self.run_dir / "metrics.jsonl", lines)
        summary = final.get("personal", {})
        for k, m in summary.get("global", {}).items():
            text = f"exit {k}: personal-test UAR, global heads {m['uar']['mean']:.3f} ± {m['uar']['std']:.3f}"
            p = summary.get("personal", {}).get(k)
            if p:
                text += f"; personal heads {p['uar']['mean']:.3f} ± {p['uar']['std']:.3f}"
            self.log(f"{text} (n = {m['uar']['n']} devices)")

    def _finish(self) -> Path:
        final = self.run_dir / "final"
        self.model.meta = {
            **self.model.meta,
            "federated_rounds": self.rounds,
            "federated_run": str(self.run_dir),
        }
        self.model.save_pretrained(final)
        from fedsd.server.report import write_report

        write_report(self.run_dir, self.history, self.model, self.cfg, log=self.log)
        finish_run(self.tracker, self.run_dir, self.cfg)
        return final


def run_federation(grid: Grid, spec: FederationSpec, log: Log = print) -> FederationResult:
    return Federation(spec, log).run(grid)


def exits_in(history: Sequence[dict[str, Any]]) -> list[int]:
    keys = {k for rec in history for k in rec if k.startswith("exit") and k.endswith("/uar")}
    return sorted(int(k[4 : k.index("/")]) for k in keys)
