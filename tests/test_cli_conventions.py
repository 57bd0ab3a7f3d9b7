"""One convention across every `fedsd` command (docs/cli.md, "Conventions"): help on every option,
choices as enums, `--json` = one JSON document (or JSON lines) on stdout with everything else on stderr,
`--set` errors that name the flag and the closest key, and one table of exit codes, each produced here
by a real failure."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from harness import Procs, flat, write_config
from typer.testing import CliRunner

from fedsd.cli.errors import ExitCode
from fedsd.cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def leaf_commands() -> dict[str, click.Command]:
    """Every runnable command of the `fedsd` tree by its full name (``data check``)."""

    def walk(cmd: click.Command, prefix: str) -> dict[str, click.Command]:
        if isinstance(cmd, click.Group):
            return {k: v for name, sub in cmd.commands.items() for k, v in walk(sub, f"{prefix} {name}").items()}
        return {prefix.strip(): cmd}

    return walk(typer.main.get_command(app), "")


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def as_json(*args: Any) -> tuple[Any, str]:
    """Run a command with --json: its stdout must be exactly one JSON document; (document, stderr)."""
    res = invoke(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), res.stderr


# ----------------------------------------------------------------------------------------- help, choices
def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"fedsd {name} {param.name}"
        for name, cmd in leaf_commands().items()
        for param in cmd.params
        if not (getattr(param, "help", None) or "").strip()
    ]
    assert not missing, missing


def test_every_command_takes_json() -> None:
    lacking = [name for name, cmd in leaf_commands().items() if not any("--json" in p.opts for p in cmd.params)]
    assert not lacking, lacking


@pytest.mark.parametrize(
    ("command", "option", "values"),
    [
        ("train", "--mode", {"sd", "ce"}),
        ("simulate", "--mode", {"sd", "ce", "pl"}),
        ("simulate", "--by", {"speaker", "dirichlet", "iid"}),
        ("simulate", "--engine", {"ray", "inprocess"}),
        ("demo", "--engine", {"ray", "inprocess"}),
        ("data partition", "--by", {"speaker", "dirichlet", "iid"}),
        ("data synth", "--backend", {"auto", "espeak", "numpy"}),
        ("export", "--format", {"pytorch", "onnx"}),
        ("export", "--quantize", {"int8"}),
        ("pretrain", "--family", {"wav2vec2", "hubert", "wavlm"}),
    ],
)
def test_choices_are_enums(command: str, option: str, values: set[str]) -> None:
    param = next(p for p in leaf_commands()[command].params if option in p.opts)
    assert isinstance(param.type, click.Choice) and set(param.type.choices) == values


def test_quant_modes_match_the_exporter() -> None:
    from fedsd.runtime.onnx_export import QUANT_MODES

    param = next(p for p in leaf_commands()["export"].params if "--quant-mode" in p.opts)
    assert set(param.type.choices) == set(QUANT_MODES)


def test_a_wrong_choice_or_device_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path, name="c")
    bad_mode = invoke("train", "-c", config, "--mode", "distill")
    assert bad_mode.exit_code == ExitCode.USAGE and "distill" in bad_mode.output
    bad_device = invoke("predict", "--model", tmp_path, "--device", "gpu", tmp_path / "a.wav")
    assert bad_device.exit_code == ExitCode.USAGE and "not a torch device" in flat(bad_device.output)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------- --set
@pytest.mark.parametrize("command", [["train"], ["simulate"], ["server", "start", "--insecure"]])
def test_a_bad_set_key_names_the_flag_and_the_closest_key(tmp_path: Path, command: list[str]) -> None:
    config = write_config(tmp_path / "exp.yaml", tmp_path, name="exp")
    res = invoke(*command, "-c", config, "--out", tmp_path / "run", "--set", "train.epoch=2")
    assert res.exit_code == ExitCode.USAGE, res.output
    text = flat(res.stderr)
    assert "--set train.epoch=2" in text and "did you mean 'train.epochs'" in text, text
    assert "exp.yaml" not in text  # the file is not to blame
    assert res.stdout == "" and not (tmp_path / "run").exists()


def test_a_bad_set_value_names_the_flag(tmp_path: Path) -> None:
    config = write_config(tmp_path / "exp.yaml", tmp_path, name="exp")
    res = invoke("train", "-c", config, "--set", "train.lr=-1")
    assert res.exit_code == ExitCode.USAGE
    assert "--set train.lr=-1: Input should be greater than 0" in flat(res.stderr)
    leaf = invoke("train", "-c", config, "--set", "epochs=3")  # a key without its section
    assert leaf.exit_code == ExitCode.USAGE and "did you mean 'train.epochs'" in flat(leaf.stderr)


def test_data_check_reports_a_missing_manifest_before_a_missing_root(tmp_path: Path) -> None:
    res = invoke("data", "check", tmp_path / "none.csv")
    assert res.exit_code == ExitCode.FAILURE
    assert "none.csv: manifest not found" in flat(res.output) and "--root" not in res.output


# ----------------------------------------------------------------------------------------- --json
def test_config_commands_json() -> None:
    listed, _ = as_json("config", "list")
    assert "demo" in [c["name"] for c in listed] and all(Path(c["path"]).is_file() for c in listed)
    shown, _ = as_json("config", "show", "demo")
    assert shown["name"] and {"data", "model", "train", "federated"} <= set(shown)
    plain = invoke("config", "list")  # without --json: the human table, on stdout
    assert plain.exit_code == 0 and "demo" in plain.stdout and not plain.stdout.lstrip().startswith("[")


def test_data_commands_json(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    synth, err = as_json("data", "synth", "--out", corpus, "--speakers", "3", "--sentences", "1",
                         "--emotions", "neutral,sad", "--backend", "numpy")  # fmt: skip
    assert synth["n_files"] == 6 and Path(synth["manifest"]).is_file() and "wrote 6 files" in err
    checked, err = as_json("data", "check", corpus / "manifest.csv", "--root", corpus)
    assert checked["rows"] == checked["usable"] == 6 and checked["unusable"] == [] and "decode" in err
    imported, _ = as_json("data", "import-csv", corpus / "manifest.csv", "--root", corpus, "--out", tmp_path / "m.csv")
    assert imported["rows"] == 6 and imported["speakers"] == 3 and imported["classes"] == {"neutral": 3, "sad": 3}
    part, err = as_json("data", "partition", tmp_path / "m.csv", "--out", tmp_path / "p.json", "--clients", "3")
    assert len(part["clients"]) == 3 and "clients" in err
    stats, _ = as_json("data", "stats", tmp_path / "p.json")
    assert [c["client_id"] for c in stats["clients"]] == [c["client_id"] for c in part["clients"]]
    per_speaker, _ = as_json("data", "stats", tmp_path / "m.csv")
    assert sum(s["utterances"] for s in per_speaker["speakers"]) == 6
    human = invoke("data", "check", corpus / "manifest.csv", "--root", corpus)  # the report stays on stdout
    assert human.exit_code == 0 and "all 6 file(s) decode" in human.stdout


def test_model_commands_json(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path) -> None:
    manifest = small_corpus / "manifest.csv"
    doc, err = as_json("evaluate", "--model", tiny_model_dir, "--manifest", manifest, "--root", small_corpus,
                       "--latency-utts", "1", "--out", tmp_path / "eval.json")  # fmt: skip
    assert set(doc["exits"]) == {"1", "2", "3", "4"} and "speaker_overlap" in doc
    assert json.loads((tmp_path / "eval.json").read_text()) == doc and "UAR" in err
    wavs = sorted((small_corpus / "wav").rglob("*.wav"))[:2]
    res = invoke("predict", "--model", tiny_model_dir, "--exit", "2", *wavs, "--json")
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]  # JSON lines: one per file, nothing else
    assert [line["file"] for line in lines] == [str(w) for w in wavs] and res.stderr.strip() == ""
    exported, err = as_json("export", "--model", tiny_model_dir, "--exit", "2", "--out", tmp_path / "exit2")
    assert exported["exits"] == [1, 2] and exported["format"] == "pytorch" and "after" in err


def test_train_json_keeps_progress_and_logs_off_stdout(tmp_path: Path, small_corpus: Path) -> None:
    config = write_config(tmp_path / "t.yaml", small_corpus, name="t", train={"epochs": 1, "batch_size": 16})
    doc, err = as_json("train", "-c", config, "--out", tmp_path / "run", "--set", "train.lr=0.001")
    assert Path(doc["best_dir"]).is_dir() and doc["best_epoch"] == 1 and set(doc["test"]) == {"1", "2", "3", "4"}
    assert "run directory" in err


def test_simulate_json(tmp_path: Path, small_corpus: Path, tiny_model_dir: Path) -> None:
    config = write_config(tmp_path / "s.yaml", small_corpus, name="s")
    doc, err = as_json("simulate", "-c", config, "--engine", "inprocess", "--rounds", "1",
                       "--base-model", tiny_model_dir, "--out", tmp_path / "run")  # fmt: skip
    assert doc["rounds_done"] == 1 and set(doc["final_uar"]) == {"1", "2", "3", "4"} and "done" in err


def test_pretrain_json(tmp_path: Path, small_corpus: Path) -> None:
    doc, err = as_json("pretrain", "--manifest", small_corpus / "manifest.csv", "--out", tmp_path / "enc",
                       "--epochs", "1", "--clusters", "4", "--batch-size", "8", "--crop-seconds", "1.0",
                       "--threads", "1")  # fmt: skip
    assert [r["epoch"] for r in doc["history"]] == [1] and Path(doc["out_dir"]).is_dir()
    assert "pretrained encoder" in err


def test_security_commands_json(tmp_path: Path) -> None:
    certs, err = as_json("certs", "create", "--out", tmp_path / "certs", "--host", "server.lan")
    assert Path(certs["files"]["ca_cert"]).is_file() and "server.lan" in certs["hosts"] and "CA key" in err
    keys, _ = as_json("client", "keygen", "--out", tmp_path / "device.key")
    assert Path(keys["public_key"]).is_file()


# ----------------------------------------------------------------------------------------- exit codes
def test_the_exit_codes_are_the_server_and_device_codes_and_documented() -> None:
    from fedsd.clients import supervisor
    from fedsd.server import service

    assert service.EXIT_FAILED == supervisor.EXIT_SUPERNODE_FAILED == ExitCode.FAILURE
    assert service.EXIT_USAGE == ExitCode.USAGE == 2  # click's own usage error
    assert service.EXIT_NO_DEVICES == supervisor.EXIT_SERVER_GONE == ExitCode.UNAVAILABLE
    assert supervisor.EXIT_REFUSED == ExitCode.REFUSED
    assert service.EXIT_INTERRUPTED == supervisor.EXIT_INTERRUPTED == ExitCode.INTERRUPTED
    page = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    for code in ExitCode:
        assert re.search(rf"^\| {code.value} \| `{code.name}` \|", page, re.M), code


def test_exit_codes_0_1_2_from_real_failures(tmp_path: Path) -> None:
    assert invoke("config", "list").exit_code == ExitCode.OK
    assert invoke("data", "check", tmp_path / "none.csv", "--root", tmp_path).exit_code == ExitCode.FAILURE
    assert invoke("config", "show", "no-such-config").exit_code == ExitCode.USAGE
    for command in (["train"], ["simulate"], ["server", "start", "--insecure"]):  # a missing config: the same code
        res = invoke(*command, "-c", tmp_path / "missing.yaml", "--out", tmp_path / "run")
        assert res.exit_code == ExitCode.USAGE and "config file not found" in res.stderr, (command, res.output)
    assert invoke("train", "--no-such-flag").exit_code == ExitCode.USAGE  # click's own


@pytest.mark.slow
def test_exit_codes_3_4_130_from_real_devices(procs: Procs, small_corpus: Path) -> None:
    """No server (3), a server whose certificate this device does not trust (4), Ctrl-C (130)."""
    from harness import TlsEcho

    for name in ("ours", "theirs"):
        assert invoke("certs", "create", "--out", procs.root / name).exit_code == 0
    echo = TlsEcho(procs.root / "theirs" / "server.pem", procs.root / "theirs" / "server.key")
    base = ["client", "run", "--exit", "1", "--data", small_corpus / "manifest.csv", "--root", small_corpus]
    nobody = f"127.0.0.1:{procs.port()}"
    try:
        gone = procs.fedsd("gone", *base, "--server", nobody, "--insecure", "--cache", procs.root / "c1",
                           "--server-timeout", "2")  # fmt: skip
        refused = procs.fedsd("refused", *base, "--server", f"127.0.0.1:{echo.port}", "--cache", procs.root / "c2",
                              "--root-cert", procs.root / "ours" / "ca.pem")  # fmt: skip
        stopped = procs.fedsd("stopped", *base, "--server", nobody, "--insecure", "--cache", procs.root / "c3")
        stopped.wait_for("SuperNode started", 120)
        stopped.send(signal.SIGINT)
        assert stopped.wait_exit(60) == ExitCode.INTERRUPTED, procs.report()
        assert gone.wait_exit(120) == ExitCode.UNAVAILABLE, procs.report()
        assert refused.wait_exit(120) == ExitCode.REFUSED, procs.report()
    finally:
        echo.close()
