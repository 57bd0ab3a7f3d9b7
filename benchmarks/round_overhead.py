"""Overhead of one cached train message on a device, against the floor Flower itself sets.

Each Flower message runs in a fresh process (a SuperNode starts a ClientApp process per message), so a
steady-state round on a device costs that process's start-up and imports plus the handler. This script
times, in one run, interleaved in a freshly shuffled order per repetition:

* ``bare``   — a fresh Python process that imports flwr only, builds a ``ClientApp`` with a train
               handler that sends the received heads back, and handles the same message: the floor.
* ``bare-runtime`` — the same, having also imported what every ``flwr-clientapp`` process imports
               (``flwr.supernode.runtime.run_clientapp``, Flower's task loop): the floor in a deployment,
               which the bare ClientApp understates. Informative; the ratios stay over ``bare``.
* ``fedsd``  — a fresh process that imports ``fedsd.clients.client_app`` (the installed ClientApp object, as
               Flower loads it) and handles a train message on a real device's node config (its own
               manifest, ``--model``, feature cache) whose features are all cached already.
* ``warm``   — a fresh process on the path Flower's ClientApp process takes with ``fedsd client run
               --warm-worker`` (``FEDSD_WARM_WORKER=1``): the runner's loader (clients/runner.py) gives a
               forwarder that relays the message and context to the device's warm worker
               (clients/worker.py), which imported ``fedsd.clients.client_app`` at an untimed first message.
               This process must not import torch (checked: the run fails if it does).
* ``fedsd@before`` (with ``--before DIR``) — the same with the code of another checkout (e.g. the
               previous commit: ``git worktree add /tmp/before HEAD~1``), with its own warm cache.

Both receive the model's global heads (``arrays``) and a train config, as in a federated round. Wall
time is from process spawn to exit; each process also reports its import and handler time. The flwr
gRPC transport (message delivery, serialization) is not in either side; it is the same for both.
Target (issue 12): cached train message ≤ 1.5× the bare ClientApp.

    .venv/bin/python benchmarks/round_overhead.py --before /tmp/before     # base, 16 × 2 s, 5 reps
    .venv/bin/python benchmarks/round_overhead.py --backbone tiny --utterances 4 --repeats 1

Writes ``benchmarks/results/round_overhead.json`` (``--json``) with provenance (benchmarks/common/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common/; scripts are not a package)

LABELS = common.EMOTIONS
TARGET = 1.5

# Runs in the fresh process. argv[1]: JSON {"kind", "code", "node", "heads", "config"[, "parent"]}; prints one
# JSON line.
CHILD = r"""
import time
T0 = time.perf_counter()
import json, sys
spec = json.loads(sys.argv[1])
if spec["code"]:  # another checkout's fedsd (pyproject's package-dir layout), ahead of the installed one
    import importlib.util
    for name, sub in (("fedsd", "fedsd"), ("fedsd.clients", "clients"), ("fedsd.server", "server")):
        d = spec["code"] + "/" + sub
        s = importlib.util.spec_from_file_location(name, d + "/__init__.py", submodule_search_locations=[d])
        m = importlib.util.module_from_spec(s)
        sys.modules[name] = m
        s.loader.exec_module(m)
        if "." in name:
            setattr(sys.modules["fedsd"], name.split(".")[1], m)
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
if spec["kind"] in ("bare", "bare-runtime"):
    if spec["kind"] == "bare-runtime":
        import flwr.supernode.runtime.run_clientapp
    app = ClientApp()

    @app.train()
    def train(msg, context):
        arrays = msg.content.array_records["arrays"]
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)
    where = None
elif spec["kind"] == "warm":  # the runner's loader, as `flwr-clientapp` calls it, in warm-worker mode
    import os
    os.environ["FEDSD_WARM_WORKER"] = "1"
    from fedsd.clients import runner
    runner._PARENT[:] = [spec["parent"]]
    app = runner.install_guard_rails().get_load_client_app_fn(default_app_ref="", app_path=None,
                                                               multi_app=True)("", "", "")
    where = runner.__file__
else:
    try:
        import fedsd.clients.client_app as mod
    except ModuleNotFoundError:  # a --before checkout from before clients/app.py was renamed
        import fedsd.clients.app as mod
    app = mod.app
    where = mod.__file__
T1 = time.perf_counter()
from safetensors.numpy import load_file
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
heads = ArrayRecord({k: Array(v) for k, v in load_file(spec["heads"]).items()})
msg = Message(RecordDict({"arrays": heads, "config": ConfigRecord(spec["config"])}), dst_node_id=5,
              message_type="train")
ctx = Context(run_id=7, node_id=5, node_config=spec["node"], state=RecordDict(), run_config={})
reply = app(message=msg, context=ctx)
assert not reply.has_error(), reply.error
T2 = time.perf_counter()
metrics = dict(reply.content.metric_records["metrics"])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"opacus", "matplotlib", "transformers", "torch"})
print(json.dumps({"import_s": T1 - T0, "handler_s": T2 - T1, "metrics": metrics, "file": where,
                  "heavy": heavy}))
"""


def make_device(work: Path, args: argparse.Namespace) -> tuple[dict[str, Any], Path, str]:
    """Corpus, model and a real device's node config (without its cache); returns (node, heads, fp)."""
    import numpy as np
    import soundfile as sf
    import torch

    from fedsd.data.manifest import ManifestRow, write_manifest
    from fedsd.model import MultiExitSER, load_backbone

    data = work / "data"
    (data / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    sr = 16000
    rows = []
    t = np.arange(int(args.seconds * sr)) / sr
    for i in range(args.utterances):
        f0 = 100 + 40 * (i % 4) + 10 * rng.random()
        wave = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(data / "wav" / f"u{i}.wav", wave.astype("float32"), sr)
        label = LABELS[i % 4] if i % 5 == 0 else ""  # scarce labels, as on a device
        rows.append(ManifestRow(f"u{i}", f"wav/u{i}.wav", label, label, "dev:s1", "dev", args.seconds, sr,
                                "train"))  # fmt: skip
    write_manifest(rows, data / "manifest.csv")
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.backbone)
    exits = common.default_exits(int(backbone.config.num_hidden_layers))
    model = MultiExitSER(backbone, exits, list(LABELS),
                         meta={"sample_rate": sr, "crop": {"max_seconds": args.seconds, "mode": "tile"}})  # fmt: skip
    model.save_pretrained(work / "model")
    from safetensors.numpy import save_file

    heads = work / "global-heads.safetensors"
    save_file({k: v.numpy() for k, v in model.head_state_dict().items()}, str(heads))
    node = {"exit": str(exits[1] if len(exits) > 1 else exits[0]), "data": str(data / "manifest.csv"),
            "root": str(data), "model": str(work / "model")}  # fmt: skip
    return node, heads, common.checkpoint_fingerprint(work / "model")


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    env = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=1800)  # fmt: skip
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{spec['kind']} message failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out | {"wall_s": wall}


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(s[key] for s in samples)

    return common.spread_s([s["wall_s"] for s in samples]) | {
            "import_median_s": med("import_s"), "handler_median_s": med("handler_s"),
            "cache_misses": [int(s["metrics"].get("cache-misses", 0)) for s in samples],
            "heavy_modules": samples[-1]["heavy"], "code_file": samples[-1]["file"]}  # fmt: skip


def run(args: argparse.Namespace, work: Path, log: Any) -> dict[str, Any]:
    log(f"making a device with a {args.backbone} model and {args.utterances} × {args.seconds} s")
    node, heads, fp = make_device(work, args)
    config = {"server-round": 2, "local-epochs": args.epochs, "batch-size": 16, "seed": args.seed,
              "fingerprint": fp}  # fmt: skip
    codes = {"fedsd": ""}
    if args.before is not None:
        codes["fedsd@before"] = str(args.before.resolve())
    specs = {name: {"kind": name, "code": "", "node": {}, "heads": str(heads), "config": config}
             for name in ("bare", "bare-runtime")}  # fmt: skip
    for name, code in codes.items():
        cache = work / f"cache-{name.replace('@', '-')}"
        specs[name] = {"kind": "fedsd", "code": code, "node": node | {"cache": str(cache)},
                       "heads": str(heads), "config": config}  # fmt: skip
    warm_cache = work / "cache-warm"
    if args.warm:  # the worker serves this process's "executor": it ends with this benchmark at the latest
        specs["warm"] = {"kind": "warm", "code": "", "node": node | {"cache": str(warm_cache)}, "heads": str(heads),
                         "config": config, "parent": os.getpid()}  # fmt: skip
    for name in [n for n in specs if not n.startswith("bare")]:
        log(f"{name}: first message fills its feature cache" + (" and starts the worker" if name == "warm" else ""))
        first = run_child(specs[name])
        log(f"  {first['wall_s']:.1f} s, {first['metrics'].get('cache-misses')} misses ({first['file']})")
    try:
        return timed(args, specs, log) | {"fingerprint": fp, "settings": settings(args, node, codes)}
    finally:
        if args.warm:
            from fedsd.clients import worker

            worker.stop(warm_cache, os.getpid())


def settings(args: argparse.Namespace, node: dict[str, Any], codes: dict[str, str]) -> dict[str, Any]:
    return {"backbone": args.backbone, "utterances": args.utterances, "seconds": args.seconds,
            "epochs": args.epochs, "repeats": args.repeats, "device_exit": int(node["exit"]),
            "before": codes.get("fedsd@before"), "warm": args.warm}  # fmt: skip


def timed(args: argparse.Namespace, specs: dict[str, Any], log: Any) -> dict[str, Any]:
    """Every variant's message, interleaved; the times, ratios to the floor, target and machine."""
    load_before = os.getloadavg()
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in specs}

    def message(name: str) -> Any:
        return lambda: samples[name].append(run_child(specs[name]))

    def progress(rep: int, _: Any) -> None:
        log(f"repetition {rep}/{args.repeats}: " + ", ".join(f"{n} {samples[n][-1]['wall_s']:.2f} s" for n in specs))

    # each child reports its own wall time, from spawn to exit: that is what is kept
    common.interleaved({name: message(name) for name in specs}, args.repeats, seed=args.seed, on_repeat=progress)
    times = {name: summary(s) for name, s in samples.items()}
    if "warm" in times and times["warm"]["heavy_modules"]:
        raise RuntimeError(f"the warm-worker path imported {times['warm']['heavy_modules']} (a fallback?)")
    medians = {name: t["median_s"] for name, t in times.items()}
    ratios = common.over(medians, "bare")
    return {
        "times": times,
        "over_floor": ratios,
        "over_runtime_floor": common.over(medians, "bare-runtime"),  # what a flwr-clientapp process costs
        "target": {"max_over_floor": TARGET, "met": ratios["fedsd"] <= TARGET}
        | ({"met_warm": ratios["warm"] <= TARGET} if "warm" in ratios else {}),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_before": list(load_before),
                    "loadavg_after": list(os.getloadavg())},  # fmt: skip
    }


def table(res: dict[str, Any]) -> str:
    st, t = res["settings"], res["times"]
    lines = [
        f"Round overhead — one cached train message in a fresh process, `{st['backbone']}` backbone, "
        f"{st['utterances']} × {st['seconds']} s cached, {st['epochs']} epochs, device exit "
        f"{st['device_exit']}, {st['repeats']} interleaved repetitions, {res['machine']['cpu_count']} CPUs "
        f"(load avg {res['machine']['loadavg_before'][0]:.1f} → {res['machine']['loadavg_after'][0]:.1f})",
        "",
        "| process | median wall s | min s | max s | imports s | handler s | × bare ClientApp "
        "| × bare-runtime |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in t.items():
        ratio = 1.0 if name == "bare" else res["over_floor"][name]
        runtime = 1.0 if name == "bare-runtime" else res["over_runtime_floor"][name]
        lines.append(
            f"| {name} | {s['median_s']:.2f} | {s['min_s']:.2f} | {s['max_s']:.2f} | "
            f"{s['import_median_s']:.2f} | {s['handler_median_s']:.2f} | {ratio:.2f} | {runtime:.2f} |"
        )
    tg = res["target"]
    lines += ["", f"Target ≤ {tg['max_over_floor']}× the bare ClientApp: "
              f"{'met' if tg['met'] else 'NOT met'} by a fresh process ({res['over_floor']['fedsd']:.2f}×)"
              + (f", {'met' if tg['met_warm'] else 'NOT met'} with the warm worker ({res['over_floor']['warm']:.2f}×)."
                 if "met_warm" in tg else ".")]  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = common.device_parser(__doc__, utterances=16, seconds=2.0,
                             helps={"utterances": "utterances on the device (all cached)",
                                   "epochs": "local epochs of the message"})  # fmt: skip
    p.add_argument("--before", type=Path, default=None, help="another checkout to time as fedsd@before")
    p.add_argument("--no-warm", dest="warm", action="store_false", help="leave out the warm-worker variant")
    common.add_timing_args(p, "round_overhead", repeats=5)
    args = p.parse_args(argv)
    common.check_sizes(p, args)
    if args.before is not None and not any(
        (args.before / "clients" / name).is_file() for name in ("client_app.py", "app.py")
    ):
        p.error(f"--before {args.before}: not a fedsd checkout (no clients/client_app.py)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return common.run_main(__file__, argv, parse_args, _main)


def _main(args: argparse.Namespace, bench: common.Run) -> dict[str, Any]:
    return common.timed_main(args, bench, run, table)


if __name__ == "__main__":
    main()
