"""How a Ray simulation scales with the number of devices: wall time, time per round, peak memory.

Why: `fedsd simulate` must stay usable on a laptop-sized machine for tens of virtual devices. This script
federates an untrained tiny base model (3 rounds, devices at exits 1/2/3 dealt round-robin, 1 local
epoch) over one synthetic corpus partitioned by speaker into 10, 25 and 50 devices, with Flower's Ray
engine (``run_simulation_engine(..., engine="ray")``), and reports per device count:

* total seconds: the whole run of one device count, from starting its process to its exit (imports,
  preparation — partition and device manifests —, Ray start, handshake, rounds, final checkpoint and
  report, Ray shutdown), with the preparation and the simulation proper (Ray start → Ray shutdown)
  also on their own;
* seconds per round, from the ``time`` of consecutive records in the run's ``metrics.jsonl``
  (round 1 includes every device's first feature-cache fill);
* peak memory: every 0.5 s a background thread sums the RSS of this process and all its descendants
  (the simulation process, Ray's GCS/raylet and every Ray worker); the maximum of that sum is reported.
  RSS counts shared pages (torch's libraries, Ray's object store) once per process, so the sum
  over-states real use; the sum of PSS (shared pages split between their users) is sampled every 2 s
  alongside, for comparison.

Every device count runs in its own child process with a private Ray temp dir and ``RAY_ADDRESS=local``
(so it never joins another Ray instance on the machine); afterwards the script checks that no process
of that run survives and kills any that do (by pid). The total data is the same for every count
(50 client speakers × 16 utterances), so more devices means fewer utterances each. Targets for 50
devices: ≤ 5 minutes in all, ≤ 8 GB.

    .venv/bin/python benchmarks/simulation_scale.py                          # 10, 25, 50 devices
    .venv/bin/python benchmarks/simulation_scale.py --clients 1000 --rounds 3 --speakers 1006 --sentences 1 \
        --timeout 1800 --floor     # 1,000 devices, and Flower's own floor beside them
    .venv/bin/python benchmarks/simulation_scale.py --clients 4 --speakers 10 --rounds 2   # smoke run

``--floor``: after each device count, the same Ray engine, devices and rounds run a bare ClientApp that
imports flwr only and echoes the heads it receives (Flower's FedAvg sends it the base model's real head
tensors); fedsd's warm round is reported against it, and both are projected to the 30,000 messages of
10,000 devices × 3 rounds.

Writes ``benchmarks/results/simulation_scale.json`` (``--json``) with provenance (benchmarks/common/).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # Ray vendors psutil in ray/thirdparty_files; use it without importing Ray here
    _ray = importlib.util.find_spec("ray")
    if _ray is None or not _ray.submodule_search_locations:
        raise
    sys.path.insert(0, str(Path(list(_ray.submodule_search_locations)[0]) / "thirdparty_files"))
    import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)

REPO = common.ROOT
DEFAULT_JSON = common.RESULTS / "simulation_scale.json"
LABELS = common.EMOTIONS
TIME_TARGET_S = 300.0
MEMORY_TARGET_B = 8e9
TARGET_CLIENTS = 50
SAMPLE_EVERY_S = 0.5
PSS_EVERY = 4  # PSS (slower to read) every 4th sample, i.e. every 2 s
# the flags that size a run: the parent passes them on to its children, which fill the config with them
SIZES = ("rounds", "speakers", "sentences", "seconds", "by", "test_speakers", "server_speakers")

CONFIG = """\
name: simscale{clients}
data:
  corpus: synth
  root: {root}
  labels: [{labels}]
  sample_rate: 16000
  crop: {{max_seconds: {seconds}, mode: tile}}
  synth: {{speakers: {speakers}, sentences: {sentences}, emotions: [{labels}], seed: 0}}
model: {{backbone: tiny, pretrained: false, exits: [1, 2, 3, 4], head: stats}}
federated:
  num_clients: {clients}
  by: {by}
  test_speakers: {test_speakers}
  server_speakers: {server_speakers}
  label_fraction: 0.2
  rounds: {rounds}
  local_epochs: 1
  batch_size: 16
  lr: 1.0e-3
  exits_mix: [1, 2, 3]
  train_exits: upto
  teacher: deep
  min_clients: {clients}
  round_timeout: 600
"""


# ----------------------------------------------------------------------------------------- children
def child_setup(work: Path, speakers: int, sentences: int, seconds: float) -> dict[str, Any]:
    """Corpus and untrained tiny base model, shared by every device count (runs in a child process)."""
    sys.path.insert(0, str(REPO))
    from fedsd.data.synthetic import generate_corpus
    from fedsd.model import MultiExitSER, load_backbone

    t0 = time.perf_counter()
    res = generate_corpus(
        work / "corpus", speakers=speakers, sentences=sentences, emotions=LABELS, seed=0, progress=False
    )
    corpus_s = time.perf_counter() - t0
    meta = {"sample_rate": 16000, "crop": {"max_seconds": seconds, "mode": "tile"}}
    model = MultiExitSER(load_backbone("tiny"), [1, 2, 3, 4], list(LABELS), meta=meta)
    model.save_pretrained(work / "base")
    return {
        "corpus_seconds": corpus_s,
        "utterances": res.n_files,
        "backend": res.backend,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "fingerprint": model.backbone_fingerprint(),
    }


def child_simulate(work: Path, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """Prepare and run one federated simulation with the Ray engine (runs in a child process)."""
    sys.path.insert(0, str(REPO))
    from fedsd.config import load_config
    from fedsd.server.federation import FederationSpec
    from fedsd.server.prepare import prepare_run
    from fedsd.server.simulation import run_simulation_engine

    run_dir = work / f"clients{clients}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(
        CONFIG.format(
            clients=clients,
            root=work / "corpus",
            labels=", ".join(LABELS),
            **{k: getattr(args, k) for k in SIZES},
        ),
        encoding="utf-8",
    )
    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    prepared = prepare_run(cfg, run_dir, base_model=work / "base", log=print)
    prepare_s = time.perf_counter() - t0
    spec = FederationSpec(
        config=str(cfg_path),
        run_dir=str(run_dir),
        base_model=str(prepared.base_model),
        partition=str(prepared.partition),
    )
    start = time.time()
    t0 = time.perf_counter()
    result = run_simulation_engine(cfg, spec, prepared, engine="ray", log=print)
    sim_s = time.perf_counter() - t0
    end = time.time()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "clients": clients,
        "rounds_done": result.rounds_done,
        "prepare_seconds": prepare_s,
        "simulation_seconds": sim_s,
        "start_time": start,
        "end_time": end,
        "records": [
            {
                "round": r["round"],
                "time": r["time"],
                "train": r.get("train"),
                "uar": {k: v for k, v in r.items() if k.endswith("/uar")},
            }
            for r in records
        ],
    }


def child_floor(work: Path, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """Flower's own floor for the same federation shape (runs in a child process).

    A bare ClientApp that imports flwr only and answers a train message with the arrays it received;
    Flower's FedAvg sends every device the base model's real head tensors once per round (no evaluate
    messages), with the same Ray engine and resources as the fedsd run. What is left of a fedsd round
    above this is fedsd's own cost per message (plus the features it computes in round 1).
    """
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from safetensors.numpy import load_file

    heads = load_file(str(work / "base" / "heads.safetensors"))
    initial = ArrayRecord({k: Array(v) for k, v in heads.items()})
    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    server = ServerApp()
    stamps: list[float] = []

    def _round_done(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.time())  # round 0 (before training), then after each round's aggregation
        return MetricRecord({})

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                          min_available_nodes=clients)  # fmt: skip
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.rounds, evaluate_fn=_round_done)

    start = time.time()
    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}})  # fmt: skip
    sim_s = time.perf_counter() - t0
    return {
        "clients": clients,
        "rounds_done": max(len(stamps) - 1, 0),
        "prepare_seconds": 0.0,
        "simulation_seconds": sim_s,
        "start_time": start,
        "end_time": time.time(),
        "head_floats": int(sum(v.size for v in heads.values())),
        "records": [
            {"round": i, "time": t, "train": {"num_clients": clients} if i else None, "uar": {}}
            for i, t in enumerate(stamps)
        ],
    }


# ----------------------------------------------------------------------------------------- parent
def role(p: psutil.Process) -> str:
    """A readable name: Ray's process title (``ray::ClientAppActor``), a Python script, or the binary."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]
    script = next((Path(a).name for a in cmd[1:] if a.endswith(".py")), None)
    try:
        return script or p.name()
    except psutil.Error:
        return "?"


class MemorySampler(threading.Thread):
    """Every 0.5 s: RSS summed over this process, its descendants and any process of this Ray session."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker  # the private Ray temp dir: in the command line of Ray's own daemons
        self.stop_event = threading.Event()
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.peak_breakdown: dict[str, list[int]] = {}  # role → [RSS bytes, processes] at the peak sample
        self.names: dict[int, str] = {}  # roles given by the caller (the simulation's own process)
        self.samples = 0
        self.seen: dict[int, tuple[float, str]] = {}  # pid → (create_time, role)
        self.me = psutil.Process()

    def processes(self) -> list[psutil.Process]:
        """This process, its descendants, and Ray daemons of this run (with theirs) that were re-parented."""
        procs = {self.me.pid: self.me}
        roots = [self.me]
        for p in psutil.process_iter(["cmdline"]):
            if self.marker in " ".join(p.info.get("cmdline") or []):
                roots.append(p)
        for root in roots:
            procs.setdefault(root.pid, root)
            with contextlib.suppress(psutil.Error):
                for p in root.children(recursive=True):
                    procs.setdefault(p.pid, p)
        return list(procs.values())

    def run(self) -> None:
        while not self.stop_event.is_set():
            rss = pss = 0
            with_pss = self.samples % PSS_EVERY == 0
            procs = self.processes()
            breakdown: dict[str, list[int]] = {}
            for p in procs:
                try:
                    if p.pid != self.me.pid and p.pid not in self.seen:
                        self.seen[p.pid] = (p.create_time(), self.names.get(p.pid) or role(p))
                    if with_pss:
                        info = p.memory_full_info()
                        pss += getattr(info, "pss", info.rss)
                    else:
                        info = p.memory_info()
                    rss += info.rss
                    # Ray workers retitle themselves once started: name every process afresh each time
                    mine = p.pid == self.me.pid
                    name = "benchmark (parent)" if mine else self.names.get(p.pid) or role(p)
                    entry = breakdown.setdefault(name, [0, 0])
                    entry[0] += info.rss
                    entry[1] += 1
                except psutil.Error:
                    continue
            if rss > self.peak_rss:
                self.peak_rss = rss
                self.peak_breakdown = dict(sorted(breakdown.items(), key=lambda kv: -kv[1][0]))
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self.samples += 1
            self.stop_event.wait(SAMPLE_EVERY_S)

    def survivors(self) -> list[psutil.Process]:
        """Processes of this run still alive (same pid *and* start time, so never a recycled pid)."""
        alive = []
        for pid, (created, _name) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                continue
        return alive


def stop_processes(procs: Sequence[psutil.Process], log: Callable[[str], None]) -> int:
    """SIGTERM, then SIGKILL after 10 s, each process by pid; returns how many there were."""
    for p in procs:
        log(f"  stopping leftover process {p.pid} ({p.name()})")
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(list(procs), timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return len(procs)


def child_env(ray_tmp: Path) -> dict[str, str]:
    return os.environ | common.ENV | {
        "RAY_ADDRESS": "local",  # start a private Ray instance, never join one found on the machine
        "RAY_TMPDIR": str(ray_tmp),
        "PYTHONUNBUFFERED": "1",
    }


def run_child(
    mode: list[str], work: Path, args: argparse.Namespace, tag: str, log: Callable[[str], None]
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run this script in child ``mode``, sampling memory; returns (child result, process report)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix=f"fsr{tag}-", dir="/tmp"))  # short: Ray's socket paths
    out_json = work / f"{tag}.result.json"
    out_json.unlink(missing_ok=True)
    log_path = work / f"{tag}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *mode,
        "--workdir",
        str(work),
        "--child-out",
        str(out_json),
        *passthrough(args),
    ]
    metrics = work / f"clients{tag.removeprefix('sim')}" / "metrics.jsonl"  # for progress lines only
    metrics.unlink(missing_ok=True)  # a reused --workdir: never report an earlier run's rounds
    sampler = MemorySampler(str(ray_tmp))
    sampler.start()
    t0 = time.perf_counter()
    timed_out = False
    with log_path.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(ray_tmp), cwd=REPO)
        sampler.names[proc.pid] = "driver (ServerApp + Ray driver)"
        reported = 0
        while proc.poll() is None:
            if time.perf_counter() - t0 > args.timeout:
                timed_out = True
                log(f"  {tag}: over --timeout {args.timeout:.0f} s, stopping it")
                stop_processes([psutil.Process(proc.pid), *sampler.survivors()], log)
                break
            if metrics.exists():
                lines = [x for x in metrics.read_text().splitlines() if x.strip()]
                for line in lines[reported:]:
                    log(
                        f"  {tag}: round {json.loads(line)['round']} done at {time.perf_counter() - t0:.0f} s"
                    )
                reported = len(lines)
            time.sleep(1.0)
        proc.wait()
    wall = time.perf_counter() - t0
    # Ray's workers notice their raylet is gone and exit on their own, a little after the driver: give
    # them --grace seconds (the memory sampler keeps counting them), then stop whatever is still there.
    lingering = sampler.survivors()
    while lingering and time.perf_counter() - t0 - wall < args.grace:
        time.sleep(0.25)
        lingering = sampler.survivors()
    exit_lag = time.perf_counter() - t0 - wall
    sampler.stop_event.set()
    sampler.join()
    leftovers = sampler.survivors()
    if leftovers:
        log(f"  {tag}: {len(leftovers)} process(es) still alive {exit_lag:.0f} s after the run ended")
    killed = stop_processes(leftovers, log) if leftovers else 0
    shutil.rmtree(ray_tmp, ignore_errors=True)
    report = {
        "child_wall_seconds": wall,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "peak_rss_sum_bytes": sampler.peak_rss,
        "peak_pss_sum_bytes": sampler.peak_pss,
        "peak_processes": sampler.peak_procs,
        "memory_samples": sampler.samples,
        "processes_seen": len(sampler.seen),
        "process_roles": sorted({name for _c, name in sampler.seen.values()}),
        "peak_rss_by_role_bytes": sampler.peak_breakdown,
        "ray_exit_lag_seconds": exit_lag,
        "leftover_processes_killed": killed,
        "log": str(log_path),
    }
    if proc.returncode != 0 or not out_json.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        log(f"  {tag} failed (exit {proc.returncode}); last log lines:\n" + "\n".join(tail))
        return None, report
    return json.loads(out_json.read_text()), report


def summarise(clients: int, child: dict[str, Any] | None, proc: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"clients": clients, **proc}
    if child is None:
        row["ok"] = False
        return row
    recs = child["records"]
    times = [r["time"] for r in recs]
    per_round = [b - a for a, b in zip(times, times[1:], strict=False)]
    row |= {
        "ok": child["rounds_done"] == len(recs) - 1
        and all((r.get("train") or {}).get("num_clients") == clients for r in recs[1:]),
        "rounds_done": child["rounds_done"],
        "prepare_seconds": child["prepare_seconds"],
        "simulation_seconds": child["simulation_seconds"],
        "total_seconds": proc["child_wall_seconds"],  # the whole child: imports, prepare, Ray, rounds, exit
        "startup_to_round0_seconds": times[0] - child["start_time"] if times else None,
        "round_seconds": per_round,
        "mean_round_seconds": sum(per_round) / len(per_round) if per_round else None,
        "steady_round_seconds": (sum(per_round[1:]) / len(per_round[1:])) if len(per_round) > 1 else None,
        "after_last_round_seconds": child["end_time"] - times[-1] if times else None,
        "clients_per_round": [(r.get("train") or {}).get("num_clients") for r in recs[1:]],
        "rejected_per_round": [(r.get("train") or {}).get("num_rejected") for r in recs[1:]],
        "final_uar": recs[-1]["uar"] if recs else {},
    }
    return row


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def table(res: dict[str, Any]) -> str:
    st = res["settings"]
    lines = [
        f"Simulation scale — tiny backbone (untrained), Ray engine, {st['rounds']} rounds, exits_mix [1, 2, 3], "
        f"1 local epoch, {st['client_utterances']} device utterances of {st['seconds']} s "
        f"({st['cpu_count']} CPUs, 1 CPU per virtual device; load avg at start {st['loadavg_start'][0]:.1f})",
        "",
        "| devices | utt./device | total s | prepare s | simulation s | start → round 0 s | "
        "round 1 s (cold cache) | later rounds s | after last round s | peak RSS sum GB | "
        "peak PSS sum GB | processes | all trained | Ray gone after s | killed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in res["runs"]:
        if not r.get("ok") and "round_seconds" not in r:
            lines.append(
                f"| {r['clients']} | – | failed after {r['child_wall_seconds']:.0f} s | | | | | | | "
                f"{gb(r['peak_rss_sum_bytes'])} | {gb(r['peak_pss_sum_bytes'])} | "
                f"{r['peak_processes']} | no | {r['ray_exit_lag_seconds']:.1f} | {r['leftover_processes_killed']} |"
            )
            continue
        rs = r["round_seconds"]
        later = ", ".join(f"{x:.1f}" for x in rs[1:]) or "–"
        lines.append(
            f"| {r['clients']} | {st['client_utterances'] / r['clients']:.0f} | {r['total_seconds']:.1f} "
            f"| {r['prepare_seconds']:.1f} | {r['simulation_seconds']:.1f} "
            f"| {r['startup_to_round0_seconds']:.1f} | {rs[0]:.1f} | {later} | {r['after_last_round_seconds']:.1f} "
            f"| {gb(r['peak_rss_sum_bytes'])} | {gb(r['peak_pss_sum_bytes'])} | {r['peak_processes']} "
            f"| {'yes' if r['ok'] else 'NO'} | {r['ray_exit_lag_seconds']:.1f} | {r['leftover_processes_killed']} |"
        )
    t = res["targets"]
    if t["measured"]:
        lines += [
            "",
            f"Targets at {TARGET_CLIENTS} devices: total ≤ {TIME_TARGET_S / 60:.0f} min → "
            f"{t['total_seconds']:.0f} s ({'met' if t['time_met'] else 'NOT met'}); peak memory ≤ "
            f"{MEMORY_TARGET_B / 1e9:.0f} GB → {gb(t['peak_rss_sum_bytes'])} GB RSS sum "
            f"({'met' if t['memory_met'] else 'NOT met'}).",
        ]
    else:
        lines += ["", f"Targets at {TARGET_CLIENTS} devices: not measured in this run."]
    floors = [r for r in res["runs"] if r.get("floor")]
    if floors:
        lines += [
            "",
            "Flower's floor, side by side: a bare ClientApp (flwr only) that echoes the heads it receives, "
            "same Ray engine, devices and rounds (one train message per device and round, no evaluate):",
            "",
            "| devices | fedsd total s | floor total s | fedsd start → round 0 s | floor start → round 0 s | "
            "fedsd later rounds s | floor later rounds s | fedsd s / device-message | floor s / device-message "
            "| × floor | floor peak RSS GB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def later(x: dict[str, Any]) -> str:
            return ", ".join(f"{v:.1f}" for v in x["round_seconds"][1:]) or "–"

        for r in floors:
            f = r["floor"]
            if "steady_round_vs_floor" not in r:  # either run failed, or too few rounds for a warm one
                lines.append(f"| {r['clients']} | {'failed' if not (r['ok'] and f['ok']) else '–'} |" + " |" * 9)
                continue
            lines.append(
                f"| {r['clients']} | {r['total_seconds']:.1f} | {f['total_seconds']:.1f} "
                f"| {r['startup_to_round0_seconds']:.1f} | {f['startup_to_round0_seconds']:.1f} "
                f"| {later(r)} | {later(f)} | {r['per_message_seconds']:.3f} | {r['floor_per_message_seconds']:.3f} "
                f"| {r['steady_round_vs_floor']:.2f} | {gb(f['peak_rss_sum_bytes'])} |"
            )
        proj = res["targets"].get("projection_10000")
        if proj:
            lines += [
                "",
                f"The {proj['messages']:,} train messages of 10,000 devices × {st['rounds']} rounds at the warm "
                f"per-message cost of the {proj['from_clients']}-device run: Flower's floor alone "
                f"{proj['floor_seconds']:.0f} s, fedsd {proj['fedsd_seconds']:.0f} s (target for the whole run "
                f"{proj['target_seconds']:.0f} s; start-up and round 1's feature computation come on top).",
            ]
    done = [r for r in res["runs"] if r.get("peak_rss_by_role_bytes")]
    if done:
        big = max(done, key=lambda r: r["clients"])
        parts = ", ".join(f"{name} ×{n}: {gb(b)}" for name, (b, n) in big["peak_rss_by_role_bytes"].items())
        lines.append(f"Peak RSS by process at {big['clients']} devices (GB): {parts}.")
    lines.append(
        f"Corpus generation (once, shared): {res['setup']['corpus_seconds']:.1f} s; "
        f"Ray processes still alive after the grace period (then killed by pid): "
        f"{res['leftover_processes_total']}."
    )
    return "\n".join(lines)


def passthrough(args: argparse.Namespace) -> list[str]:
    """The options a child needs to reproduce the parent's settings."""
    return [item for k in SIZES for item in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 25, 50],
        help="device counts, comma-separated",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--speakers", type=int, default=56, help="synthetic speakers (devices + test + server)")
    p.add_argument("--sentences", type=int, default=4, help="sentences per speaker and emotion")
    p.add_argument("--seconds", type=float, default=2.0, help="clip length (tile/crop policy)")
    p.add_argument("--by", choices=("speaker", "iid"), default="speaker", help="partition mode")
    p.add_argument("--test-speakers", type=int, default=4)
    p.add_argument("--server-speakers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="give up on one device count after this")
    p.add_argument(
        "--grace", type=float, default=30.0, help="seconds Ray's processes get to exit after a run ends"
    )
    p.add_argument("--workdir", type=Path, default=None, help="keep corpus, model and runs here")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--child-setup", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-clients", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-floor", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--floor",
        action="store_true",
        help="after each device count, run Flower's floor: a bare ClientApp (flwr only) that echoes the "
        "heads, same engine, devices and rounds; reports fedsd's warm round against it",
    )
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.clients) < 1 or args.rounds < 1:
        p.error("--clients and --rounds must be >= 1")
    return args


def parent(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    loadavg = os.getloadavg()
    log(
        f"setup: {args.speakers} speakers × {args.sentences} sentences × {len(LABELS)} emotions, tiny base model"
    )
    setup, setup_proc = run_child(["--child-setup"], work, args, "setup", log)
    if setup is None:
        raise SystemExit("setup failed; see the log above")
    client_speakers = args.speakers - args.test_speakers - args.server_speakers
    runs = []
    for n in args.clients:
        log(f"{n} devices: simulating {args.rounds} rounds with the Ray engine")
        child, proc = run_child(["--child-clients", str(n)], work, args, f"sim{n}", log)
        runs.append(summarise(n, child, proc))
        r = runs[-1]
        log(
            f"{n} devices: {'ok' if r['ok'] else 'FAILED'}, {r.get('total_seconds', float('nan')):.1f} s, "
            f"peak RSS sum {gb(r['peak_rss_sum_bytes'])} GB"
        )
        if args.floor:
            log(f"{n} devices: Flower's floor (bare ClientApp, same engine and rounds)")
            child, proc = run_child(["--child-floor", str(n)], work, args, f"floor{n}", log)
            r["floor"] = summarise(n, child, proc)
            f = r["floor"]
            log(f"{n} devices: floor {'ok' if f['ok'] else 'FAILED'}, {f.get('total_seconds', float('nan')):.1f} s")
            if f["ok"] and r["ok"] and f.get("steady_round_seconds") and r.get("steady_round_seconds"):
                r["per_message_seconds"] = r["steady_round_seconds"] / n
                r["floor_per_message_seconds"] = f["steady_round_seconds"] / n
                r["steady_round_vs_floor"] = r["steady_round_seconds"] / f["steady_round_seconds"]
    at_target = [r for r in runs if r["clients"] == TARGET_CLIENTS and "total_seconds" in r]
    targets: dict[str, Any] = {"measured": bool(at_target)}
    if at_target:
        r = at_target[0]
        targets |= {
            "clients": TARGET_CLIENTS,
            "total_seconds": r["total_seconds"],
            "time_max_seconds": TIME_TARGET_S,
            "time_met": r["total_seconds"] <= TIME_TARGET_S and r["ok"],
            "peak_rss_sum_bytes": r["peak_rss_sum_bytes"],
            "memory_max_bytes": MEMORY_TARGET_B,
            "memory_met": r["peak_rss_sum_bytes"] <= MEMORY_TARGET_B,
        }
    measured = [r for r in runs if r.get("floor_per_message_seconds")]
    if measured:  # the per-message costs are flat in the device count: project the largest run
        r = max(measured, key=lambda x: x["clients"])
        messages = args.rounds * 10_000
        targets["projection_10000"] = {
            "from_clients": r["clients"],
            "messages": messages,
            "floor_seconds": messages * r["floor_per_message_seconds"],
            "fedsd_seconds": messages * r["per_message_seconds"],
            "target_seconds": 1800.0,
            "note": "rounds × 10,000 train messages at the warm per-message seconds measured here; start-up "
            "and round 1's feature computation come on top",
        }
    return {
        "settings": {
            "rounds": args.rounds,
            "speakers": args.speakers,
            "sentences": args.sentences,
            "seconds": args.seconds,
            "by": args.by,
            "test_speakers": args.test_speakers,
            "server_speakers": args.server_speakers,
            "client_speakers": client_speakers,
            "client_utterances": client_speakers * args.sentences * len(LABELS),
            "exits_mix": [1, 2, 3],
            "local_epochs": 1,
            "label_fraction": 0.2,
            "cpu_count": os.cpu_count(),
            "loadavg_start": loadavg,
            "loadavg_end": os.getloadavg(),
            "sample_every_s": SAMPLE_EVERY_S,
        },
        "setup": setup | {"peak_rss_sum_bytes": setup_proc["peak_rss_sum_bytes"]},
        "runs": runs,
        "targets": targets,
        "leftover_processes_total": sum(r["leftover_processes_killed"] for r in runs),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child_setup or args.child_clients is not None or args.child_floor is not None:  # a child
        assert args.workdir is not None and args.child_out is not None
        if args.child_setup:
            out = child_setup(args.workdir, args.speakers, args.sentences, args.seconds)
        elif args.child_floor is not None:
            out = child_floor(args.workdir, args.child_floor, args)
        else:
            out = child_simulate(args.workdir, args.child_clients, args)
        args.child_out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        return out
    bench = common.Run(__file__, argv)
    with common.scratch(args.workdir, "fedsd-sim-scale-") as work:
        res = parent(args, work)
    print(table(res))
    config = res["settings"] | {"config_template": CONFIG, "engine": "ray", "base_model": "tiny, untrained"}
    return bench.write(args.json, res, config=config, fingerprint=res["setup"].get("fingerprint"), args=args)


if __name__ == "__main__":
    main()
