"""Synthetic emotional speech: an offline, licence-free corpus for tests, demos and benchmarks.

Why it exists: real emotion corpora (DEMoS, IEMOCAP, ...) are licence-restricted or large, yet every part of
fedsd (partitioning, caching, distillation, federated rounds) needs speech with speakers, sentences and
emotion labels. This module renders such a corpus (docs/architecture.md §3):

* **Speakers** are ``espeak-ng`` voices (accent × voice variant, e.g. ``en-gb-scotland+m1``), each with its
  own pitch and rate offset, microphone/channel (EQ, band limits), room (synthetic reverb) and noise floor.
  Where ``espeak-ng`` is absent a pure-numpy source-filter synthesizer stands in (``backend="numpy"``).
* **Emotions** are rendered by prosody (pitch level, pitch range, speaking rate) and voice quality
  (gain, spectral tilt, soft clipping, breathiness, tremolo/jitter). Every speaker says the same sentences
  in every emotion, so the label is carried by *how* things are said, never by *what* is said.
* **Overlap like real data**: speakers differ in expressiveness and in their own way of expressing each
  emotion, and every utterance jitters around its style. With the defaults (``intensity=0.75``) a simple
  MFCC-statistics + logistic-regression baseline is speaker-independently well above chance but far from
  perfect (see ``benchmarks/synthetic_baseline.py``).
* **Deterministic per seed**: each utterance draws from its own generator seeded by
  (seed, speaker, sentence, emotion), so thread scheduling cannot change a single byte.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import time
import wave
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedsd.checkpoint import atomic_write_text
from fedsd.data.manifest import ManifestRow, write_manifest
from fedsd.data.synth_render import (
    _TAG_SPEAKER,
    _TAG_SPLIT,
    _TAG_UTT,
    _TAG_VOICES,
    SAMPLE_RATE,
    _apply_speaker,
    _apply_style,
    _espeak_render,
    _numpy_render,
    _rng,
)

DATASET = "synth"
BACKENDS = ("auto", "espeak", "numpy")
DEFAULT_EMOTIONS: tuple[str, ...] = ("neutral", "happy", "angry", "sad")


class SynthError(ValueError):
    """Invalid arguments for the generator; the message says what is allowed."""


# Sentences written for this corpus: neutral content, 8-11 words (~2.5-3.5 s), no emotional words, so that
# the words themselves never give the label away.
SENTENCES: tuple[str, ...] = (
    "The morning train left the station a little after seven.",
    "Please put the blue folder on the desk by the window.",
    "We walked along the river until the lights came on.",
    "My brother painted the kitchen door a bright shade of green.",
    "The meeting has been moved to Thursday afternoon at four.",
    "She found an old map folded inside the library book.",
    "There are twelve chairs in the room next to the hall.",
    "He always takes the long road home when it is raining.",
    "The baker sold every loaf of bread before noon today.",
    "I left my keys on the table near the front door.",
    "The children built a small boat out of wooden boxes.",
    "Our neighbours are moving to a farm in the north.",
    "The letter arrived on Monday with a stamp from Norway.",
    "They will paint the fence after the rain has stopped.",
    "A cold wind blew across the empty parking lot.",
    "The doctor asked him to come back in two weeks.",
    "We need to buy milk, eggs and flour for the cake.",
    "The radio was playing quietly in the other room.",
    "Her office is on the third floor of the tall building.",
    "The dog waited by the gate for the whole afternoon.",
    "Turn left at the bakery and walk past the old church.",
    "The lamp on the shelf has not worked for a month.",
    "He wrote the numbers down on the back of an envelope.",
    "The garden looks different now that the trees are gone.",
    "They sat on the bench and watched the boats go by.",
    "The phone rang twice and then the line went quiet.",
    "I will read the report again before the meeting starts.",
    "The market opens early on Saturday and closes at noon.",
    "A yellow bus stopped in front of the school gates.",
    "The museum keeps its oldest paintings in the basement.",
    "Somebody moved the boxes from the hallway last night.",
    "We can finish the rest of the work tomorrow morning.",
)


# --------------------------------------------------------------------------------------------- emotions
@dataclass(frozen=True)
class EmotionStyle:
    """How far an emotion moves an utterance away from neutral (values at full intensity).

    Additive knobs (0 = neutral): ``pitch_st`` mean f0 shift in semitones, ``gain_db`` vocal effort,
    ``tilt_db_oct`` spectral tilt in dB/octave (+ brighter), ``drive`` soft clipping 0..1, ``breath``
    aspiration noise 0..1, ``tremolo`` amplitude modulation depth 0..1, ``jitter`` f0 wobble (fraction),
    ``pause`` extra word gap (espeak units of 10 ms). Multiplicative knobs (1 = neutral): ``range`` f0
    range, ``rate`` speaking rate.
    """

    pitch_st: float = 0.0
    range: float = 1.0
    rate: float = 1.0
    gain_db: float = 0.0
    tilt_db_oct: float = 0.0
    drive: float = 0.0
    breath: float = 0.0
    tremolo: float = 0.0
    jitter: float = 0.0
    pause: float = 0.0

    def scaled(self, amount: float) -> EmotionStyle:
        """Move ``amount`` of the way from neutral (0) to this style (1); >1 exaggerates."""
        a = float(amount)
        return EmotionStyle(
            pitch_st=a * self.pitch_st,
            range=self.range**a,
            rate=self.rate**a,
            gain_db=a * self.gain_db,
            tilt_db_oct=a * self.tilt_db_oct,
            drive=max(0.0, a * self.drive),
            breath=max(0.0, a * self.breath),
            tremolo=max(0.0, a * self.tremolo),
            jitter=max(0.0, a * self.jitter),
            pause=max(0.0, a * self.pause),
        )


# Directions follow the acoustic correlates reported for acted emotional speech: high-arousal emotions
# (angry, happy, fear, surprise) raise pitch, range, rate and effort; low-arousal ones (sad, calm) lower
# them and add breathiness. The registry order is part of the seed derivation: only append.
EMOTIONS: dict[str, EmotionStyle] = {
    "neutral": EmotionStyle(),
    "happy": EmotionStyle(pitch_st=3.5, range=1.7, rate=1.08, gain_db=3.0, tilt_db_oct=1.5, drive=0.17,
                          breath=0.085, jitter=0.01),
    "angry": EmotionStyle(pitch_st=2.0, range=1.35, rate=1.12, gain_db=6.0, tilt_db_oct=3.0, drive=0.9,
                          jitter=0.017),
    "sad": EmotionStyle(pitch_st=-2.5, range=0.5, rate=0.82, gain_db=-5.0, tilt_db_oct=-2.5, breath=0.57,
                        tremolo=0.2, jitter=0.02, pause=3.0),
    "fear": EmotionStyle(pitch_st=5.0, range=1.2, rate=1.15, gain_db=-1.0, tilt_db_oct=0.5, breath=0.5,
                         tremolo=0.5, jitter=0.05),
    "disgust": EmotionStyle(pitch_st=-1.5, range=1.25, rate=0.85, gain_db=1.0, tilt_db_oct=-0.5, drive=0.4,
                            breath=0.17, jitter=0.035, pause=2.0),
    "surprise": EmotionStyle(pitch_st=6.0, range=2.0, rate=1.0, gain_db=3.0, tilt_db_oct=1.0, breath=0.17),
    "calm": EmotionStyle(pitch_st=-1.0, range=0.7, rate=0.88, gain_db=-3.0, tilt_db_oct=-1.5, breath=0.25,
                         pause=1.0),
}
_EMOTION_ID = {name: i for i, name in enumerate(EMOTIONS)}


def parse_emotions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Normalize ``"neutral,happy"`` or a sequence into a validated tuple (error lists valid names)."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        raise SynthError(f"no emotions given; valid emotions: {', '.join(EMOTIONS)}")
    unknown = [n for n in names if n not in EMOTIONS]
    if unknown:
        raise SynthError(f"unknown emotion(s) {', '.join(unknown)}; valid emotions: {', '.join(EMOTIONS)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SynthError(f"emotion(s) listed twice: {', '.join(dup)}")
    return tuple(names)


# --------------------------------------------------------------------------------------------- speakers
@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: a voice plus its own recording conditions (kept in ``speakers.json``)."""

    index: int
    name: str  # "spk03"
    gender: str  # "M" / "F"
    voice: str  # espeak-ng voice ("en-us+f2") or "numpy"
    lang: str
    pitch_st: float  # speaker's pitch offset from the voice default
    rate: float  # speaker's speaking-rate factor
    f0_hz: float  # numpy backend: neutral mean f0
    vtl: float  # numpy backend: formant scale (shorter vocal tract -> higher formants)
    expressiveness: float  # how strongly this speaker acts (multiplies intensity)
    quirks: dict[str, dict[str, float]]  # per emotion: the speaker's own offsets from the shared style
    habit: dict[str, float]  # habitual voice quality (breath, drive, tremolo, jitter) in every emotion
    gain_db: float
    highpass_hz: float
    lowpass_hz: float
    eq: tuple[tuple[float, float, float], ...]  # (centre Hz, gain dB, width in octaves)
    mic_tilt_db_oct: float
    rt60_s: float
    wet_db: float  # reverberant-to-direct energy ratio
    noise_color: str  # white / pink / brown
    snr_db: float  # for a neutral utterance
    hum_db: float  # mains hum relative to the noise floor, -inf = none
    hum_hz: float
    split: str = ""


_ESPEAK_VARIANTS_M = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8")
_ESPEAK_VARIANTS_F = ("f1", "f2", "f3", "f4", "f5")


@lru_cache(maxsize=4)
def espeak_voices(exe: str) -> tuple[tuple[str, str], ...]:
    """(voice, gender) pairs this espeak-ng installation offers: English accents × natural variants.

    Accents come from ``espeak-ng --voices=en`` (espeak's own ``gmw/`` voices; MBROLA ones need extra
    binaries), variants from ``--voices=variant`` restricted to the plain male/female ones (the others
    are robots, whispers and jokes). Sorted, so the choice per seed is deterministic.
    """

    def table(arg: str) -> list[list[str]]:
        try:
            out = subprocess.run([exe, arg], capture_output=True, text=True, check=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [line.split() for line in out.splitlines()[1:] if line.strip()]

    accents = sorted({cols[1] for cols in table("--voices=en") if len(cols) >= 5 and cols[4].startswith("gmw/")})
    variants = {cols[-1].split("/", 1)[1] for cols in table("--voices=variant") if cols and "/" in cols[-1]}
    male = [v for v in _ESPEAK_VARIANTS_M if v in variants]
    female = [v for v in _ESPEAK_VARIANTS_F if v in variants]
    out = [(f"{a}+{v}", "M") for a in accents for v in male] + [(f"{a}+{v}", "F") for a in accents for v in female]
    if not out:  # variants missing: the accents alone are still distinct (male) voices
        out = [(a, "M") for a in accents]
    return tuple(out)


def _choose_voices(voices: Sequence[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str]]:
    """Deterministic, gender-balanced choice; speaker i keeps its voice when more speakers are asked for."""
    rng = _rng(seed, _TAG_VOICES)
    male = [voices[i] for i in rng.permutation(len(voices)) if voices[i][1] == "M"]
    female = [voices[i] for i in rng.permutation(len(voices)) if voices[i][1] == "F"]
    pools = [p for p in (male, female) if p] if rng.random() < 0.5 else [p for p in (female, male) if p]
    return [pools[i % len(pools)][(i // len(pools)) % len(pools[i % len(pools)])] for i in range(n)]


# How much speakers and utterances scatter around the shared emotion styles. These are what make the
# corpus speaker-independently hard (tuned with benchmarks/synthetic_baseline.py; see its docstring).
VARIABILITY: dict[str, float] = {
    # a speaker's own way of expressing each emotion (sd; multiplicative ones are log-sd)
    "quirk_pitch_st": 1.2, "quirk_range": 0.2, "quirk_rate": 0.05, "quirk_gain_db": 1.2,
    "quirk_tilt_db_oct": 0.6, "quirk_voice": 0.25,
    # the speaker's habitual voice, the same in every emotion (upper bounds of uniform draws)
    "habit_breath": 0.1, "habit_drive": 0.08, "habit_tremolo": 0.03, "habit_jitter": 0.005,
    # how strongly speakers act: uniform range multiplying intensity
    "expr_min": 0.85, "expr_max": 1.25,
    # per-utterance scatter
    "utt_amount": 0.25, "utt_pitch_st": 0.7, "utt_range": 0.12, "utt_rate": 0.04, "utt_gain_db": 1.2,
    "utt_tilt_db_oct": 0.6, "utt_voice": 0.25,
}
_QUIRK_KEYS = ("pitch_st", "range", "rate", "gain_db", "tilt_db_oct", "breath", "drive", "tremolo", "jitter")
_MULTIPLICATIVE = frozenset({"range", "rate", "breath", "drive", "tremolo", "jitter"})


def _make_speaker(seed: int, index: int, voice: str, gender: str, emotions: Sequence[str]) -> Speaker:
    rng = _rng(seed, _TAG_SPEAKER, index)
    v = VARIABILITY
    female = gender == "F"
    quirks = {}
    for emo in EMOTIONS:  # drawn for every emotion so the --emotions list cannot change a speaker
        z = rng.normal(0, 1, len(_QUIRK_KEYS))
        q = {}
        for k, zk in zip(_QUIRK_KEYS, z, strict=True):
            sd = v["quirk_voice"] if k in ("breath", "drive", "tremolo", "jitter") else v[f"quirk_{k}"]
            q[k] = float(np.exp(sd * zk)) if k in _MULTIPLICATIVE else float(sd * zk)
        if emo == "neutral":  # neutral is the reference: the speaker's habit, no quirk
            q = {k: (1.0 if k in _MULTIPLICATIVE else 0.0) for k in _QUIRK_KEYS}
        quirks[emo] = q
    habit = {
        "breath": float(rng.uniform(0, v["habit_breath"])),
        "drive": float(rng.uniform(0, v["habit_drive"])),
        "tremolo": float(rng.uniform(0, v["habit_tremolo"])),
        "jitter": float(rng.uniform(0, v["habit_jitter"])),
    }
    n_eq = int(rng.integers(1, 4))
    eq = tuple(
        (float(np.exp(rng.uniform(np.log(200), np.log(5000)))), float(rng.uniform(-8, 8)), float(rng.uniform(0.3, 1.5)))
        for _ in range(n_eq)
    )
    has_hum = rng.random() < 0.3
    return Speaker(
        index=index,
        name=f"spk{index:02d}",
        gender=gender,
        voice=voice,
        lang=voice.split("+", 1)[0] if voice != "numpy" else "en",
        pitch_st=float(rng.uniform(-2.5, 2.5)),
        rate=float(np.exp(rng.uniform(np.log(0.88), np.log(1.12)))),
        f0_hz=float(rng.uniform(185, 240) if female else rng.uniform(95, 135)),
        vtl=float(rng.uniform(1.1, 1.22) if female else rng.uniform(0.92, 1.05)),
        expressiveness=float(rng.uniform(v["expr_min"], v["expr_max"])),
        habit=habit,
        quirks={e: quirks[e] for e in EMOTIONS if e in emotions or e == "neutral"},
        gain_db=float(rng.uniform(-8, 3)),
        highpass_hz=float(np.exp(rng.uniform(np.log(50), np.log(300)))),
        lowpass_hz=float(rng.uniform(3400, 7800)),
        eq=eq,
        mic_tilt_db_oct=float(rng.normal(0, 1.2)),
        rt60_s=float(rng.uniform(0.08, 0.6)),
        wet_db=float(rng.uniform(-14, -2)),
        noise_color=str(rng.choice(["white", "pink", "brown"])),
        snr_db=float(rng.uniform(12, 35)),
        hum_db=float(rng.uniform(-6, 6)) if has_hum else -math.inf,
        hum_hz=float(rng.choice([50.0, 60.0])),
    )


def speaker_splits(n: int, seed: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Split label per speaker index; speaker-independent, at least one speaker per split when n >= 3."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise SynthError(f"splits must be three non-negative fractions (train, valid, test); got {tuple(fractions)}")
    total = float(sum(fractions))
    fr = [f / total for f in fractions]
    if n >= 3:
        n_valid = max(1, round(n * fr[1]))
        n_test = max(1, round(n * fr[2]))
        while n - n_valid - n_test < 1:
            if n_valid >= n_test:
                n_valid -= 1
            else:
                n_test -= 1
    elif n == 2:
        n_valid, n_test = 0, 1
    else:
        n_valid, n_test = 0, 0
    labels = ["train"] * (n - n_valid - n_test) + ["valid"] * n_valid + ["test"] * n_test
    order = _rng(seed, _TAG_SPLIT, n).permutation(n)
    out = [""] * n
    for label, idx in zip(labels, order, strict=True):
        out[int(idx)] = label
    return out


def _utterance_style(spk: Speaker, emotion: str, intensity: float, rng: np.random.Generator) -> EmotionStyle:
    """The style this speaker uses for this utterance: shared style × expressiveness + quirks + scatter."""
    v = VARIABILITY
    amount = intensity * spk.expressiveness * float(np.exp(rng.normal(0, v["utt_amount"])))
    s = EMOTIONS[emotion].scaled(amount)
    q = spk.quirks.get(emotion, {})
    k = intensity  # quirks shrink with intensity too: at 0 every emotion sounds like the speaker's neutral

    def add(key: str) -> float:
        return float(getattr(s, key) + k * q.get(key, 0.0) + rng.normal(0, v[f"utt_{key}"]))

    def mul(key: str) -> float:
        return float(getattr(s, key) * q.get(key, 1.0) ** k * np.exp(rng.normal(0, v[f"utt_{key}"])))

    def voice(key: str) -> float:
        return float((getattr(s, key) * q.get(key, 1.0) ** k + spk.habit[key]) * np.exp(rng.normal(0, v["utt_voice"])))

    return replace(
        s,
        pitch_st=add("pitch_st"),
        range=mul("range"),
        rate=mul("rate"),
        gain_db=add("gain_db"),
        tilt_db_oct=add("tilt_db_oct"),
        breath=voice("breath"),
        drive=voice("drive"),
        tremolo=voice("tremolo"),
        jitter=voice("jitter") + 0.002,
    )


def render_utterance(
    spk: Speaker, text: str, emotion: str, *, seed: int, sentence_index: int, intensity: float, backend: str,
    espeak_exe: str | None = None,
) -> np.ndarray:
    """One utterance as float64 at 16 kHz in [-1, 1]; a pure function of its arguments."""
    rng = _rng(seed, _TAG_UTT, spk.index, sentence_index, _EMOTION_ID[emotion])
    style = _utterance_style(spk, emotion, intensity, rng)
    if backend == "espeak":
        assert espeak_exe is not None
        x = _espeak_render(espeak_exe, spk.voice, text, spk.pitch_st + style.pitch_st, spk.rate * style.rate,
                           style.range, 2.0 * rng.random() + style.pause)
    else:
        x = _numpy_render(text, spk, style, rng)
    x = _apply_style(x, style, rng)
    return _apply_speaker(x, spk, seed, rng)


def wav_bytes(x: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM WAV; written with the stdlib so the bytes depend on the samples only."""
    pcm = np.round(np.clip(x, -1.0, 32767 / 32768) * 32768).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- corpus
@dataclass
class SynthResult:
    """What ``generate_corpus`` produced."""

    manifest: Path
    n_files: int
    backend: str
    seconds: float
    out_dir: Path = Path()
    speakers_per_split: dict[str, int] = field(default_factory=dict)


def resolve_backend(backend: str) -> tuple[str, str | None]:
    """("espeak", exe) or ("numpy", None); "auto" picks espeak-ng when it is installed and has voices."""
    if backend not in BACKENDS:
        raise SynthError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "numpy":
        return "numpy", None
    exe = shutil.which("espeak-ng")
    if exe and espeak_voices(exe):
        return "espeak", exe
    if backend == "espeak":
        raise SynthError("backend 'espeak' needs espeak-ng on PATH with English voices; use --backend numpy")
    return "numpy", None


def _check_arguments(speakers: int, sentences: int, seed: int, intensity: float, workers: int) -> None:
    if not isinstance(speakers, int) or speakers < 1:
        raise SynthError(f"speakers must be an integer >= 1; got {speakers!r}")
    if not isinstance(sentences, int) or not 1 <= sentences <= len(SENTENCES):
        raise SynthError(f"sentences must be between 1 and {len(SENTENCES)}; got {sentences!r}")
    if not isinstance(seed, int) or seed < 0:
        raise SynthError(f"seed must be a non-negative integer; got {seed!r}")
    if not 0.0 <= float(intensity) <= 1.0:
        raise SynthError(f"intensity must be in [0, 1]; got {intensity!r}")
    if workers < 1:
        raise SynthError(f"workers must be >= 1; got {workers!r}")


def _speakers(n: int, seed: int, emos: Sequence[str], split_of: list[str], exe: str | None) -> list[Speaker]:
    """The corpus's speakers: espeak-ng voices chosen by seed (numpy voices without espeak-ng)."""
    voices = _choose_voices(espeak_voices(exe), n, seed) if exe else None
    spks: list[Speaker] = []
    for i in range(n):
        if voices is not None:
            voice, gender = voices[i]
        else:
            voice, gender = "numpy", ("M", "F")[(i + seed) % 2]
        spks.append(replace(_make_speaker(seed, i, voice, gender, emos), split=split_of[i]))
    return spks


@dataclass(frozen=True)
class _Renderer:
    """Renders and writes one (speaker, sentence, emotion) job; safe to run from several threads."""

    out: Path
    seed: int
    intensity: float
    backend: str
    exe: str | None

    def __call__(self, job: tuple[Speaker, int, str]) -> ManifestRow:
        spk, s, emo = job
        x = render_utterance(spk, SENTENCES[s], emo, seed=self.seed, sentence_index=s, intensity=self.intensity,
                             backend=self.backend, espeak_exe=self.exe)  # fmt: skip
        utt = f"{spk.name}_s{s:02d}_{emo}"
        rel = f"wav/{spk.name}/{utt}.wav"
        dst = self.out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        tmp.write_bytes(wav_bytes(x))
        os.replace(tmp, dst)
        return ManifestRow(
            utt_id=f"{DATASET}_{utt}", path=rel, label=emo, orig_label=emo, speaker=f"{DATASET}:{spk.name}",
            dataset=DATASET, duration=len(x) / SAMPLE_RATE, sample_rate=SAMPLE_RATE, split=spk.split,
            gender=spk.gender, lang=spk.lang, text_id=f"s{s:02d}",
        )  # fmt: skip


def _render_all(
    run: _Renderer, jobs: list[tuple[Speaker, int, str]], workers: int, progress: bool,
    on_progress: Callable[[int, int], None] | None,
) -> list[ManifestRow]:  # fmt: skip
    """Every job's manifest row, in job order (rows never depend on thread timing)."""
    rows: list[ManifestRow] = []
    bar = _progress_bar() if progress else None
    task = bar.add_task(f"synth ({run.backend})", total=len(jobs)) if bar else None
    try:
        if bar:
            bar.start()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for row in pool.map(run, jobs):  # map keeps job order: rows never depend on timing
                rows.append(row)
                if bar is not None and task is not None:
                    bar.advance(task)
                if on_progress:
                    on_progress(len(rows), len(jobs))
    finally:
        if bar:
            bar.stop()
    return rows


def generate_corpus(
    out_dir: str | os.PathLike[str],
    *,
    speakers: int = 24,
    sentences: int = 12,
    emotions: Sequence[str] | str = DEFAULT_EMOTIONS,
    seed: int = 0,
    intensity: float = 0.75,
    backend: str = "auto",
    splits: Sequence[float] = (0.7, 0.15, 0.15),
    progress: bool = True,
    workers: int = 2,
    on_progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    """Render ``speakers × sentences × emotions`` WAVs (16 kHz mono 16-bit) and ``manifest.csv``.

    Layout: ``out_dir/wav/<speaker>/<utt>.wav``, ``out_dir/manifest.csv`` (speaker-independent
    ``split`` column), ``out_dir/speakers.json`` (each speaker's voice and recording conditions).
    The manifest is written last, so a corpus with a manifest is complete.
    """
    t0 = time.perf_counter()
    emos = parse_emotions(emotions)
    _check_arguments(speakers, sentences, seed, intensity, workers)
    split_of = speaker_splits(speakers, seed, splits)
    name, exe = resolve_backend(backend)
    spks = _speakers(speakers, seed, emos, split_of, exe)
    out = Path(out_dir)
    jobs = [(spk, s, e) for spk in spks for s in range(sentences) for e in emos]
    rows = _render_all(_Renderer(out, seed, float(intensity), name, exe), jobs, workers, progress, on_progress)
    meta = {
        "generator": "fedsd.data.synthetic",
        "backend": name,
        "seed": seed,
        "intensity": float(intensity),
        "emotions": list(emos),
        "sentences": {f"s{i:02d}": SENTENCES[i] for i in range(sentences)},
        "speakers": [_speaker_json(s) for s in spks],
    }
    atomic_write_text(out / "speakers.json", json.dumps(meta, indent=2) + "\n")
    manifest = write_manifest(rows, out / "manifest.csv")
    per_split = {k: sum(1 for s in spks if s.split == k) for k in ("train", "valid", "test")}
    return SynthResult(manifest=manifest, n_files=len(rows), backend=name, seconds=time.perf_counter() - t0,
                       out_dir=out, speakers_per_split=per_split)


def _speaker_json(s: Speaker) -> dict[str, object]:
    d = asdict(s)
    d["hum_db"] = None if s.hum_db == -math.inf else round(s.hum_db, 3)
    for k, v in list(d.items()):
        if isinstance(v, float):
            d[k] = round(v, 4)
    d["eq"] = [[round(v, 3) for v in band] for band in s.eq]
    d["quirks"] = {e: {k: round(v, 4) for k, v in q.items()} for e, q in s.quirks.items()}
    return d


def _progress_bar():  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
