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
import re
import shutil
import subprocess
import time
import wave
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from scipy import fft as sp_fft
from scipy import signal

from fedsd.checkpoint import atomic_write_text
from fedsd.data.manifest import ManifestRow, write_manifest

SAMPLE_RATE = 16_000
DATASET = "synth"
BACKENDS = ("auto", "espeak", "numpy")
DEFAULT_EMOTIONS: tuple[str, ...] = ("neutral", "happy", "angry", "sad")
_REF_RMS = 10 ** (-26 / 20)  # speech level of a neutral utterance before speaker gain (-26 dBFS)


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


def _rng(*key: int) -> np.random.Generator:
    """A generator owned by one (seed, ...) key: results never depend on call order or threads."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


_TAG_SPEAKER, _TAG_VOICES, _TAG_SPLIT, _TAG_UTT, _TAG_ROOM = 1, 2, 3, 4, 5


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


# ---------------------------------------------------------------------------------------- espeak backend
def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode espeak-ng's WAV (its --stdout header has no valid sizes, so walk the chunks ourselves)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not return WAV data")
    pos, sr = 12, 22050
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if cid == b"fmt ":
            sr = int.from_bytes(data[pos + 12 : pos + 16], "little")
        if cid == b"data":
            pcm = data[pos + 8 :]
            pcm = pcm[: len(pcm) // 2 * 2]
            return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0, sr
        pos += 8 + size + (size & 1)
    raise RuntimeError("espeak-ng WAV output has no data chunk")


# espeak-ng `-p` (0..99) against the resulting f0 shift in semitones, measured on en-us+m3 and en-gb+f2.
_P_TABLE = np.array([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99], dtype=float)
_ST_TABLE = np.array([-6.5, -5.5, -4.3, -3.0, -1.5, 0.0, 1.65, 3.4, 5.25, 7.1, 8.8])


def _espeak_render(exe: str, voice: str, text: str, pitch_st: float, rate: float, range_f: float,
                   pause: float) -> np.ndarray:
    """Speak ``text`` with prosody via espeak-ng; return float64 at 16 kHz."""
    p = int(round(float(np.interp(pitch_st, _ST_TABLE, _P_TABLE))))
    wpm = int(round(np.clip(165 * rate, 80, 400)))
    rng_pct = int(round((range_f - 1.0) * 100))
    ssml = f'<speak><prosody range="{rng_pct:+d}%">{escape(text)}</prosody></speak>'
    cmd = [exe, "-m", "-z", "--stdout", "-v", voice, "-p", str(p), "-s", str(wpm), "-g", str(int(round(pause))), ssml]
    proc = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"espeak-ng failed for voice {voice!r} (exit {proc.returncode}): {err}")
    x, sr = _parse_wav(proc.stdout)
    if sr != SAMPLE_RATE:
        g = math.gcd(SAMPLE_RATE, sr)
        x = signal.resample_poly(x, SAMPLE_RATE // g, sr // g)
    return _trim(x)


def _trim(x: np.ndarray, thresh_db: float = -45.0) -> np.ndarray:
    """Cut leading/trailing digital silence so the padding we add later is the only silence."""
    if x.size == 0:
        return x
    a = np.abs(x)
    thr = a.max() * 10 ** (thresh_db / 20)
    idx = np.flatnonzero(a > thr)
    if idx.size == 0:
        return x
    return x[max(0, idx[0] - 160) : idx[-1] + 160]


# ----------------------------------------------------------------------------------------- numpy backend
_VOWEL_FORMANTS = {
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (300.0, 2200.0, 2950.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (320.0, 900.0, 2250.0),
    "y": (400.0, 1900.0, 2600.0),
}
_NASAL_FORMANTS = (280.0, 1300.0, 2500.0)
_FRIC_FORMANTS = (1800.0, 3600.0, 5600.0)
_FRICATIVES = set("sfhzvcxjq")
_PLOSIVES = set("ptkbdg")


def _numpy_plan(text: str) -> list[tuple[str, float, tuple[float, float, float], bool]]:
    """Turn a sentence into (kind, seconds, formants, accented) segments: a crude letter-to-sound model.

    Why letters: it keeps 'same sentence' meaningful for the fallback too (same segment sequence for
    every emotion and speaker) without any phonetic dictionary.
    """
    plan: list[tuple[str, float, tuple[float, float, float], bool]] = []
    for token in re.findall(r"[a-z]+|[,.;?!]", text.lower()):
        if token in ",.;?!":
            plan.append(("gap", 0.16 if token == "," else 0.08, _NASAL_FORMANTS, False))
            continue
        for k, chunk in enumerate(re.findall(r"[^aeiouy]*[aeiouy]+|[^aeiouy]+$", token)):
            onset = re.match(r"[^aeiouy]*", chunk).group(0)[:2]  # type: ignore[union-attr]
            vowels = chunk[len(re.match(r"[^aeiouy]*", chunk).group(0)) :]  # type: ignore[union-attr]
            for c in onset:
                if c in _FRICATIVES:
                    plan.append(("fric", 0.05, _FRIC_FORMANTS, False))
                elif c in _PLOSIVES:
                    plan.append(("gap", 0.035, _NASAL_FORMANTS, False))
                    plan.append(("burst", 0.012, _FRIC_FORMANTS, False))
                else:
                    plan.append(("nasal", 0.045, _NASAL_FORMANTS, False))
            if vowels:
                plan.append(("vowel", 0.085 * (1.3 if k == 0 else 1.0), _VOWEL_FORMANTS[vowels[0]], k == 0))
                if len(vowels) > 1:
                    plan.append(("vowel", 0.05, _VOWEL_FORMANTS[vowels[-1]], False))
        plan.append(("gap", 0.03, _NASAL_FORMANTS, False))
    return plan


def _smooth(x: np.ndarray, n: int) -> np.ndarray:
    if n <= 1:
        return x
    k = np.hanning(n + 2)[1:-1]
    k /= k.sum()
    xp = np.pad(x, (n // 2, n - 1 - n // 2), mode="edge")
    return np.convolve(xp, k, mode="valid") if n <= 64 else signal.oaconvolve(xp, k, mode="valid")


def _numpy_render(text: str, spk: Speaker, style: EmotionStyle, rng: np.random.Generator) -> np.ndarray:
    """Source-filter synthesis: glottal pulses with a prosodic f0 contour through moving formants."""
    sr = SAMPLE_RATE
    plan = _numpy_plan(text)
    rate = spk.rate * style.rate
    kinds, durs, forms, accents = [], [], [], []
    for kind, dur, fm, acc in plan:
        d = dur / rate * float(np.exp(rng.normal(0, 0.08)))
        if kind == "gap":
            d += style.pause * 0.01
        kinds.append(kind)
        durs.append(max(1, int(round(d * sr))))
        forms.append(fm)
        accents.append(acc)
    n = int(sum(durs))
    seg = np.repeat(np.arange(len(durs)), durs)
    kind_arr = np.array(kinds)[seg]
    voiced = np.isin(kind_arr, ["vowel", "nasal"]).astype(float)
    voiced[kind_arr == "nasal"] = 0.45
    noisy = np.where(kind_arr == "fric", 0.35, np.where(kind_arr == "burst", 0.6, 0.0))
    voiced = _smooth(voiced, int(0.012 * sr))
    noisy = _smooth(noisy, int(0.006 * sr))
    fmt = _smooth_cols(np.array(forms)[seg] * spk.vtl, int(0.03 * sr))

    # f0 contour in semitones: declination + word accents, scaled by the pitch range; then jitter.
    t = np.arange(n) / sr
    starts = np.cumsum([0, *durs[:-1]]) / sr
    contour = np.linspace(1.0, -2.0, n)
    for s, d, acc in zip(starts, durs, accents, strict=True):
        if acc:  # a pitch accent: a Gaussian bump (±3 sd = ±0.27 s) on the stressed syllable
            h = 2.5 * float(rng.uniform(0.5, 1.2))
            c = s + d / sr / 2
            lo, hi = max(0, int((c - 0.27) * sr)), min(n, int((c + 0.27) * sr))
            contour[lo:hi] += h * np.exp(-0.5 * ((t[lo:hi] - c) / 0.09) ** 2)
    contour *= style.range
    wobble = _smooth(rng.normal(0, 1, n), int(0.03 * sr))
    wobble /= np.std(wobble) + 1e-12
    f0 = spk.f0_hz * 2 ** ((spk.pitch_st + style.pitch_st + contour) / 12) * (1 + style.jitter * wobble)
    phase = np.cumsum(f0 / sr) % 1.0
    oq = float(np.clip(0.55 + 0.25 * style.breath - 0.2 * style.drive, 0.3, 0.85))  # open quotient
    flow = np.where(phase < oq, np.sin(np.pi * phase / oq) ** 2, 0.0)
    src = np.diff(flow, prepend=0.0) * voiced * 20
    src += style.breath * 0.3 * rng.normal(0, 1, n) * flow * voiced  # aspiration during the open phase
    src += noisy * rng.normal(0, 1, n) * 0.3

    bws = np.array([70.0, 100.0, 140.0]) * (1 + style.breath)
    return _formant_filter(src, fmt, bws)


def _formant_filter(x: np.ndarray, fmt: np.ndarray, bws: np.ndarray, frame: int = 512) -> np.ndarray:
    """Time-varying cascade of formant resonators, done frame-wise in the frequency domain.

    Why not ``lfilter`` per block: hundreds of small calls per utterance dominated the fallback's run time.
    Hann frames at 50 % overlap sum to one; each is zero-padded to twice its length (linear, not
    circular, convolution), multiplied by the all-pole response at the frame centre, and overlap-added.
    """
    sr = SAMPLE_RATE
    n, hop, nfft = len(x), frame // 2, 2 * frame
    starts = np.arange(-hop, n, hop)
    xp = np.pad(x, (hop, frame + hop))
    idx = (starts + hop)[:, None] + np.arange(frame)[None, :]
    frames = xp[idx] * np.hanning(frame + 1)[:-1]
    centre = np.clip(starts + hop, 0, n - 1)
    f = np.clip(fmt[centre], 90.0, sr / 2 - 200.0)  # (frames, formants)
    r = np.exp(-np.pi * bws / sr)[None, :]
    c1, c2 = -2 * r * np.cos(2 * np.pi * f / sr), np.broadcast_to(r * r, f.shape)
    z1 = np.exp(-1j * 2 * np.pi * np.fft.rfftfreq(nfft))
    resp = np.ones((len(starts), len(z1)), dtype=complex)
    for j in range(f.shape[1]):  # all-pole resonators normalized to unit gain at 0 Hz
        resp *= ((1 + c1[:, j] + c2[:, j])[:, None]) / (1 + np.outer(c1[:, j], z1) + np.outer(c2[:, j], z1 * z1))
    y = sp_fft.irfft(sp_fft.rfft(frames, nfft, axis=1) * resp, nfft, axis=1)
    out = np.zeros(len(xp) + nfft)
    for k, s0 in enumerate(starts + hop):
        out[s0 : s0 + nfft] += y[k]
    return out[hop : hop + n]


def _smooth_cols(x: np.ndarray, n: int) -> np.ndarray:
    return np.stack([_smooth(x[:, j], n) for j in range(x.shape[1])], axis=1)


# ----------------------------------------------------------------------------------------- post-process
def _rms(x: np.ndarray) -> float:
    """RMS over the loudest 70 % of 20 ms frames (active speech, not pauses)."""
    fr = 320
    m = len(x) // fr
    if m < 2:
        return float(np.sqrt(np.mean(x**2)) + 1e-12)
    e = np.mean(x[: m * fr].reshape(m, fr) ** 2, axis=1)
    e = np.sort(e)[int(0.3 * m) :]
    return float(np.sqrt(np.mean(e)) + 1e-12)


def _envelope(x: np.ndarray, n: int) -> np.ndarray:
    return np.sqrt(_smooth(x**2, n) + 1e-12)


def _tilt_response(freqs: np.ndarray, db_per_oct: float, pivot: float = 1000.0) -> np.ndarray:
    f = np.clip(freqs, 100.0, None)
    return 10 ** (db_per_oct * np.log2(f / pivot) / 20)


def _apply_style(x: np.ndarray, style: EmotionStyle, rng: np.random.Generator) -> np.ndarray:
    """Voice-quality part of an emotion: jitter, tremolo, breathiness, tilt, effort (gain), clipping."""
    sr = SAMPLE_RATE
    n = len(x)
    x = x / _rms(x) * _REF_RMS
    t = np.arange(n) / sr
    if style.jitter > 0:  # f0 wobble by a slowly varying delay (pitch deviation = -d'(t))
        f_v = rng.uniform(4.5, 7.5)
        slow = _smooth(rng.normal(0, 1, n), int(0.05 * sr))
        slow = np.cumsum(slow / (np.std(slow) + 1e-12)) / sr  # integrate: delay whose derivative is noise
        slow -= _smooth(slow, int(0.3 * sr))
        delay = style.jitter / (2 * np.pi * f_v) * np.sin(2 * np.pi * f_v * t + rng.uniform(0, 2 * np.pi))
        delay += style.jitter * 0.5 * slow
        x = np.interp(np.arange(n) - delay * sr, np.arange(n), x)
    if style.tremolo > 0:
        f_t = rng.uniform(4.0, 8.0)
        x = x * (1 + min(style.tremolo, 0.9) * np.sin(2 * np.pi * f_t * t + rng.uniform(0, 2 * np.pi)))
    if style.breath > 0:  # aspiration noise: high-passed, following the speech envelope
        noise = signal.sosfilt(_BREATH_SOS, rng.normal(0, 1, n))
        env = _envelope(x, int(0.02 * sr))
        x = x + style.breath * 1.2 * noise / (np.std(noise) + 1e-12) * env
    x = _fft_filter(x, lambda f: _tilt_response(f, style.tilt_db_oct))
    x = x / _rms(x) * _REF_RMS * 10 ** (style.gain_db / 20)
    if style.drive > 0:  # level-relative soft clipping: harmonics and flattened peaks, loudness kept
        before = _rms(x)
        peak = np.percentile(np.abs(x), 99.5) + 1e-12
        g = 1 + 6 * min(style.drive, 1.5)
        x = np.tanh(g * x / peak) * peak / g
        x = x / _rms(x) * before
    return x


_BREATH_SOS = signal.butter(2, [1200, 6500], btype="bandpass", fs=SAMPLE_RATE, output="sos")


@lru_cache(maxsize=256)
def _room_ir(seed: int, index: int, rt60: float, wet_db: float) -> np.ndarray:
    """Exponentially decaying noise tail after a unit direct path; darker as it decays (air absorption)."""
    rng = _rng(seed, _TAG_ROOM, index)
    sr = SAMPLE_RATE
    n = int(min(1.2 * rt60, 0.8) * sr)
    t = np.arange(n) / sr
    tail = rng.normal(0, 1, n) * np.exp(-6.9 * t / rt60)
    tail = signal.sosfilt(signal.butter(1, 3500, fs=sr, output="sos"), tail)
    tail[: int(0.003 * sr)] = 0.0  # pre-delay before the first reflections
    tail *= np.sqrt(10 ** (wet_db / 10) / (np.sum(tail**2) + 1e-12))
    tail[0] = 1.0
    return tail


def _noise(color: str, n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.normal(0, 1, n)
    if color == "white":
        return white
    m = sp_fft.next_fast_len(n, real=True)
    spec = sp_fft.rfft(white, m)
    f = np.clip(sp_fft.rfftfreq(m, 1 / SAMPLE_RATE), 20.0, None)
    spec /= np.sqrt(f) if color == "pink" else f
    y = sp_fft.irfft(spec, m)[:n]
    return y / (np.std(y) + 1e-12)


def _fft_filter(x: np.ndarray, response: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Zero-phase filtering by a magnitude response of frequency (Hz); padded against wrap-around."""
    n = len(x)
    m = sp_fft.next_fast_len(n + 2048, real=True)
    spec = sp_fft.rfft(x, m) * response(sp_fft.rfftfreq(m, 1 / SAMPLE_RATE))
    return sp_fft.irfft(spec, m)[:n]


def _channel_response(spk: Speaker, f: np.ndarray) -> np.ndarray:
    """Microphone and line: band limits, tilt and a few broad EQ bumps (zero-phase magnitude)."""
    fz = np.clip(f, 1.0, None)
    h = 1 / np.sqrt(1 + (spk.highpass_hz / fz) ** 4) / np.sqrt(1 + (f / spk.lowpass_hz) ** 8)
    h = h * _tilt_response(f, spk.mic_tilt_db_oct)
    lf = np.log2(fz)
    for fc, g_db, width in spk.eq:
        h = h * 10 ** (g_db * np.exp(-0.5 * ((lf - math.log2(fc)) / width) ** 2) / 20)
    return h


def _apply_speaker(x: np.ndarray, spk: Speaker, seed: int, rng: np.random.Generator) -> np.ndarray:
    """Recording conditions of the speaker: leading/trailing silence, room, microphone/channel, noise."""
    sr = SAMPLE_RATE
    pad = (int(rng.uniform(0.08, 0.3) * sr), int(rng.uniform(0.1, 0.35) * sr))
    x = np.pad(x, pad) * 10 ** ((spk.gain_db + rng.normal(0, 1.5)) / 20)
    n = len(x)
    x = signal.fftconvolve(x, _room_ir(seed, spk.index, spk.rt60_s, spk.wet_db))[:n]
    x = _fft_filter(x, lambda f: _channel_response(spk, f))
    # The noise floor is fixed per speaker (set by a neutral utterance's level), so quiet emotions get
    # a worse SNR than loud ones, as in a real recording session.
    floor = _REF_RMS * 10 ** ((spk.gain_db - spk.snr_db + rng.normal(0, 1.5)) / 20)
    noise = _noise(spk.noise_color, n, rng) * floor
    if spk.hum_db > -math.inf:
        t = np.arange(n) / sr
        hum = sum(np.sin(2 * np.pi * k * spk.hum_hz * t + k) / k for k in (1, 2, 3))
        noise += hum / np.sqrt(np.mean(hum**2)) * floor * 10 ** (spk.hum_db / 20)
    x = x + noise
    peak = np.max(np.abs(x))
    if peak > 0.97:  # a gentle limiter instead of hard clipping at full scale
        x = np.tanh(x / 0.97) * 0.97
    return x


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
    split_of = speaker_splits(speakers, seed, splits)
    name, exe = resolve_backend(backend)

    voices = _choose_voices(espeak_voices(exe), speakers, seed) if exe else None
    spks: list[Speaker] = []
    for i in range(speakers):
        if voices is not None:
            voice, gender = voices[i]
        else:
            voice, gender = "numpy", ("M", "F")[(i + seed) % 2]
        spks.append(replace(_make_speaker(seed, i, voice, gender, emos), split=split_of[i]))

    out = Path(out_dir)
    jobs = [(spk, s, e) for spk in spks for s in range(sentences) for e in emos]

    def run(job: tuple[Speaker, int, str]) -> ManifestRow:
        spk, s, emo = job
        x = render_utterance(spk, SENTENCES[s], emo, seed=seed, sentence_index=s, intensity=float(intensity),
                             backend=name, espeak_exe=exe)
        utt = f"{spk.name}_s{s:02d}_{emo}"
        rel = f"wav/{spk.name}/{utt}.wav"
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        tmp.write_bytes(wav_bytes(x))
        os.replace(tmp, dst)
        return ManifestRow(
            utt_id=f"{DATASET}_{utt}", path=rel, label=emo, orig_label=emo, speaker=f"{DATASET}:{spk.name}",
            dataset=DATASET, duration=len(x) / SAMPLE_RATE, sample_rate=SAMPLE_RATE, split=spk.split,
            gender=spk.gender, lang=spk.lang, text_id=f"s{s:02d}",
        )

    rows: list[ManifestRow] = []
    bar = _progress_bar() if progress else None
    task = bar.add_task(f"synth ({name})", total=len(jobs)) if bar else None
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
