"""`fedsd data synth`: generate the synthetic emotional speech corpus (see fedsd/data/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import typer

_HELP = (
    "Generate a synthetic emotional speech corpus: 16 kHz mono WAVs plus manifest.csv.\n\n"
    "Speakers are espeak-ng voices (or a numpy source-filter voice where espeak-ng is missing), each with "
    "its own channel, room and noise; emotions are rendered by prosody and voice quality. Every speaker "
    "says the same sentences in every emotion; the split column is speaker-independent. Same seed, same "
    "bytes.\n\n"
    "Example: [bold]fedsd data synth --out data/synth --speakers 8 --sentences 5 "
    "--emotions neutral,happy,angry,sad[/]"
)


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code=2)


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def register(app: typer.Typer) -> None:
    """Add the ``synth`` command to the ``fedsd data`` group."""

    @app.command("synth", help=_HELP)
    def synth(
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (created if missing)."),
        speakers: int = typer.Option(24, help="Number of speakers (>= 1; >= 3 gives train/valid/test)."),
        sentences: int = typer.Option(12, help="Sentences per speaker and emotion (1-32)."),
        emotions: str = typer.Option(
            "neutral,happy,angry,sad",
            help="Comma-separated emotions: neutral, happy, angry, sad, fear, disgust, surprise, calm.",
        ),
        seed: int = typer.Option(0, help="Random seed (>= 0); the corpus is a pure function of it."),
        intensity: float = typer.Option(0.75, help="How far emotions move from neutral, in [0, 1]."),
        backend: str = typer.Option("auto", help="auto (espeak-ng if installed), espeak or numpy."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        from fedsd.data.synthetic import SENTENCES, SynthError, generate_corpus, parse_emotions

        # Validate up front so every bad argument is one clear line and exit code 2.
        if speakers < 1:
            raise _fail(f"--speakers must be >= 1 (got {speakers})")
        if not 1 <= sentences <= len(SENTENCES):
            raise _fail(f"--sentences must be between 1 and {len(SENTENCES)} (got {sentences})")
        if seed < 0:
            raise _fail(f"--seed must be >= 0 (got {seed})")
        if not 0.0 <= intensity <= 1.0:
            raise _fail(f"--intensity must be in [0, 1] (got {intensity})")
        try:
            emos = parse_emotions(emotions)
            res = generate_corpus(out, speakers=speakers, sentences=sentences, emotions=emos, seed=seed,
                                  intensity=intensity, backend=backend, progress=progress)
        except SynthError as exc:
            raise _fail(str(exc)) from None
        except RuntimeError as exc:  # espeak-ng failing mid-run: say so in one line, not a traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        split = ", ".join(f"{k} {v}" for k, v in res.speakers_per_split.items())
        typer.echo(
            f"wrote {res.n_files} files ({_n(speakers, 'speaker')} × {_n(sentences, 'sentence')} × "
            f"{_n(len(emos), 'emotion')}) and {res.manifest}"
        )
        typer.echo(f"speakers per split: {split}; backend: {res.backend}; {res.seconds:.1f} s")
