"""`fedsd data scan/import-csv/check/partition/stats` end to end on generated files."""

from __future__ import annotations

import json

import pytest
from audio_fixtures import write_empty_wav, write_garbage, write_nonfinite_wav, write_tone
from typer.testing import CliRunner

from fedsd.checkpoint import sha256_file
from fedsd.cli.main import app
from fedsd.data.manifest import ManifestRow, read_manifest, write_manifest
from fedsd.data.partition import Partition

runner = CliRunner()
EMOS = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry"}


def invoke(*args: str):
    return runner.invoke(app, ["data", *map(str, args)])


def assert_clean_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert text in " ".join(result.output.split())


@pytest.fixture()
def ravdess(tmp_path):
    root = tmp_path / "ravdess"
    for actor in range(1, 7):
        for k, emo in enumerate(EMOS):
            for rep in (1, 2):
                rel = f"Actor_{actor:02d}/03-01-{emo}-01-01-{rep:02d}-{actor:02d}.wav"
                write_tone(root / rel, seconds=0.05, sample_rate=8000, freq=150 + 20 * k)
    write_tone(root / "Actor_01/notes.wav", seconds=0.05)
    return root


@pytest.mark.parametrize("cmd", ["scan", "import-csv", "check", "partition", "stats"])
def test_every_command_has_help_with_example(cmd):
    result = invoke(cmd, "--help")
    assert result.exit_code == 0 and "Example: fedsd data" in result.output


def test_scan_writes_manifest_and_summary(tmp_path, ravdess):
    out = tmp_path / "m.csv"
    result = invoke("scan", "ravdess", ravdess, "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_manifest(out)
    assert len(rows) == 48 and {r.label for r in rows} == set(EMOS.values())
    assert len({r.speaker for r in rows}) == 6
    text = " ".join(result.output.split())
    assert "rows 48" in text and "speakers 6" in text and "skipped 1" in text and "notes.wav" in text
    four = invoke("scan", "ravdess", ravdess, "--out", tmp_path / "e.csv", "--preset", "ekman6")
    assert four.exit_code == 0 and "dropped by preset 12" in " ".join(four.output.split())


def test_scan_errors_are_one_clean_line(tmp_path, ravdess):
    assert_clean_error(
        invoke("scan", "voxceleb", ravdess, "--out", tmp_path / "m.csv"), 2, "valid corpora: ravdess"
    )
    assert_clean_error(
        invoke("scan", "ravdess", ravdess, "--out", tmp_path / "m.csv", "--preset", "nope"),
        2,
        "valid presets",
    )
    assert_clean_error(
        invoke("scan", "ravdess", tmp_path / "missing", "--out", tmp_path / "m.csv"), 1, "not a directory"
    )
    assert_clean_error(
        invoke("scan", "emodb", ravdess, "--out", tmp_path / "m.csv"), 1, "no usable utterances"
    )
    assert not (tmp_path / "m.csv").exists()


def test_import_csv(tmp_path, ravdess):
    table = tmp_path / "t.csv"
    table.write_text(
        "file,emo,who\nActor_01/03-01-05-01-01-01-01.wav,anger,a\nActor_02/03-01-01-01-01-01-02.wav,,b\nnope.wav,sad,c\n"
    )
    out = tmp_path / "m.csv"
    args = [
        "--root",
        ravdess,
        "--out",
        out,
        "--path-col",
        "file",
        "--label-col",
        "emo",
        "--speaker-col",
        "who",
    ]
    result = invoke("import-csv", table, *args, "--dataset", "mine", "--preset", "ekman6")
    assert result.exit_code == 0, result.output
    rows = read_manifest(out)
    assert [(r.label, r.speaker) for r in rows] == [("angry", "mine:a"), ("", "mine:b")]
    assert "file not found" in result.output
    bad = invoke("import-csv", table, "--root", ravdess, "--out", out)
    assert_clean_error(bad, 1, "missing column(s) path, label, speaker")


def _bad_manifest(tmp_path, ravdess):
    good = read_manifest_from_scan(tmp_path, ravdess)[:3]
    write_garbage(ravdess / "bad/garbage.wav")
    write_empty_wav(ravdess / "bad/empty.wav")
    write_nonfinite_wav(ravdess / "bad/nan.wav")
    write_tone(ravdess / "bad/short.wav", seconds=0.01)
    extra = [
        ManifestRow(utt, f"bad/{utt}.wav", "sad", "sad", "x:bad", "x", 0.1, 16000)
        for utt in ("garbage", "empty", "nan", "short", "missing")
    ]
    path = tmp_path / "with_bad.csv"
    write_manifest(good + extra, path)
    return path


def read_manifest_from_scan(tmp_path, ravdess):
    out = tmp_path / "scan.csv"
    assert invoke("scan", "ravdess", ravdess, "--out", out).exit_code == 0
    return read_manifest(out)


def test_check_reports_each_bad_file_and_keeps_going(tmp_path, ravdess):
    manifest = _bad_manifest(tmp_path, ravdess)
    before = sha256_file(manifest)
    result = invoke("check", manifest, "--root", ravdess, "--min-seconds", "0.02")
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "5 of 8 file(s) unusable" in text
    for utt, reason in [
        ("garbage", "cannot decode"),
        ("empty", "empty audio"),
        ("nan", "non-finite"),
        ("short", "shorter than"),
        ("missing", "file not found"),
    ]:
        assert utt in text and reason in text
    clean = tmp_path / "clean.csv"
    dropped = invoke(
        "check", manifest, "--root", ravdess, "--min-seconds", "0.02", "--drop-bad", "--out", clean
    )
    assert dropped.exit_code == 0, dropped.output
    assert [r.utt_id for r in read_manifest(clean)] == [r.utt_id for r in read_manifest(manifest)][:3]
    assert sha256_file(manifest) == before
    ok = invoke("check", clean, "--root", ravdess)
    assert ok.exit_code == 0 and "all 3 file(s) decode" in ok.output


def test_check_argument_and_manifest_errors(tmp_path, ravdess):
    assert_clean_error(invoke("check", tmp_path / "none.csv", "--root", ravdess), 1, "manifest not found")
    manifest = _bad_manifest(tmp_path, ravdess)
    assert_clean_error(
        invoke("check", manifest, "--root", ravdess, "--drop-bad"), 2, "--drop-bad needs --out"
    )


def test_partition_and_stats(tmp_path, ravdess):
    manifest = tmp_path / "m.csv"
    assert invoke("scan", "ravdess", ravdess, "--out", manifest).exit_code == 0
    out = tmp_path / "part.json"
    args = ["--clients", "2", "--by", "dirichlet", "--alpha", "0.3", "--label-fraction", "0.25"]
    result = invoke(
        "partition", manifest, *args, "--test-speakers", "2", "--keep-speakers", "--seed", "3", "--out", out
    )
    assert result.exit_code == 0, result.output
    part = Partition.load(out)
    assert part.num_clients == 2 and len(part.test_speakers) == 2 and part.config["keep_speakers"] is True
    assert part.config["manifest"] == str(manifest)
    assert "client-000" in result.output and "held-out" in result.output
    per_speaker = invoke("partition", manifest, "--out", tmp_path / "p2.json")
    assert per_speaker.exit_code == 0 and Partition.load(tmp_path / "p2.json").num_clients == 6
    assert_clean_error(
        invoke("partition", manifest, "--test-speakers", "6", "--out", tmp_path / "p3.json"),
        1,
        "cannot cover",
    )
    assert invoke("partition", manifest, "--by", "random", "--out", tmp_path / "p4.json").exit_code == 2

    plot = tmp_path / "plots" / "clients.png"
    stats = invoke("stats", out, "--plot", plot)
    assert stats.exit_code == 0, stats.output
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "client-001" in stats.output
    mplot = tmp_path / "speakers.svg"
    mstats = invoke("stats", manifest, "--plot", mplot)
    assert mstats.exit_code == 0, mstats.output
    assert "ravdess:01" in mstats.output and "<svg" in mplot.read_text()
    assert_clean_error(invoke("stats", out, "--plot", tmp_path / "x.txt"), 2, "--plot needs")
    (tmp_path / "broken.json").write_text(json.dumps({"clients": []}))
    assert_clean_error(invoke("stats", tmp_path / "broken.json"), 1, "broken.json: invalid partition")
