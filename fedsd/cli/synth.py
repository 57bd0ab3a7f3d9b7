"""`fedsd data synth`: generate the synthetic emotional speech corpus (see fedsd/data/synthetic.py)."""

from __future__ import annotations

import contextlib
from enum import StrEnum
from pathlib import Path

import typer
from rich.markup import escape

from fedsd.cli.errors import ExitCode, fail
from fedsd.cli.output import console, json_option, json_output, progress_callback

_HELP = (
    "Generate a synthetic emotional speech corpus: 16 kHz mono WAVs plus manifest.csv.\n\n"
    "Speakers are espeak-ng voices (or a numpy source-filter voice where espeak-ng is missing), each with "
    "its own channel, room and noise; emotions are rendered by prosody and voice quality. Every speaker "
    "says the same sentences in every emotion; the split column is speaker-independent. Same seed, same "
    "bytes.\n\n"
    "Example: [bold]fedsd data synth --out data/synth --speakers 8 --sentences 5 "
    "--emotions neutral,happy,angry,sad[/]"
)


class Backend(StrEnum):
    """The voice of the generated speakers."""

    auto = "auto"
    espeak = "espeak"
    numpy = "numpy"


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _check(speakers: int, sentences: int, seed: int, intensity: float) -> None:
    """Every bad number is one clear line and exit code 2, before anything is written."""
    from fedsd.data.synthetic import SENTENCES

    if speakers < 1:
        fail(f"--speakers must be >= 1 (got {speakers})", ExitCode.USAGE)
    if not 1 <= sentences <= len(SENTENCES):
        fail(f"--sentences must be between 1 and {len(SENTENCES)} (got {sentences})", ExitCode.USAGE)
    if seed < 0:
        fail(f"--seed must be >= 0 (got {seed})", ExitCode.USAGE)
    if not 0.0 <= intensity <= 1.0:
        fail(f"--intensity must be in [0, 1] (got {intensity})", ExitCode.USAGE)


def synth_command(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (created if missing)."),
    speakers: int = typer.Option(24, help="Number of speakers (>= 1; >= 3 gives train/valid/test)."),
    sentences: int = typer.Option(12, help="Sentences per speaker and emotion (1-32)."),
    emotions: str = typer.Option(
        "neutral,happy,angry,sad",
        help="Comma-separated emotions: neutral, happy, angry, sad, fear, disgust, surprise, calm.",
    ),
    seed: int = typer.Option(0, help="Random seed (>= 0); the corpus is a pure function of it."),
    intensity: float = typer.Option(0.75, help="How far emotions move from neutral, in [0, 1]."),
    backend: Backend = typer.Option(Backend.auto, help="auto (espeak-ng if installed), espeak or numpy."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on stderr)."),
    json_: bool = json_option(),
) -> None:
    from fedsd.data.synthetic import SynthError, generate_corpus, parse_emotions

    _check(speakers, sentences, seed, intensity)
    with json_output(json_) as output:
        try:
            emos = parse_emotions(emotions)
            with progress_callback("synth") if progress else contextlib.nullcontext(None) as update:
                res = generate_corpus(
                    out, speakers=speakers, sentences=sentences, emotions=emos, seed=seed, intensity=intensity,
                    backend=backend.value, progress=False, on_progress=update,
                )  # fmt: skip
        except SynthError as exc:
            fail(str(exc), ExitCode.USAGE)
        except RuntimeError as exc:  # espeak-ng failing mid-run: say so in one line, not a traceback
            fail(str(exc))
        split = ", ".join(f"{k} {v}" for k, v in res.speakers_per_split.items())
        console.print(
            f"wrote {res.n_files} files ({_n(speakers, 'speaker')} × {_n(sentences, 'sentence')} × "
            f"{_n(len(emos), 'emotion')}) and {escape(str(res.manifest))}",
            highlight=False,
            soft_wrap=True,
        )
        console.print(
            f"speakers per split: {split}; backend: {res.backend}; {res.seconds:.1f} s",
            highlight=False,
            soft_wrap=True,
        )
        output.document(res)


def register(app: typer.Typer) -> None:
    """Add the ``synth`` command to the ``fedsd data`` group."""
    app.command("synth", help=_HELP)(synth_command)
