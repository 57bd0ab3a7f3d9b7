"""Rendering for the synthetic corpus (``fedsd.data.synthetic``): the espeak-ng and numpy voices, the
emotion's voice quality and the speaker's recording chain (room, channel, noise floor).

Why a module of its own: this is the signal processing, independent of which speakers, sentences and
emotions a corpus has; ``synthetic`` decides those and calls these pure functions per utterance.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import numpy as np
from scipy import fft as sp_fft
from scipy import signal

if TYPE_CHECKING:
    from fedsd.data.synthetic import EmotionStyle, Speaker

SAMPLE_RATE = 16_000
_REF_RMS = 10 ** (-26 / 20)  # speech level of a neutral utterance before speaker gain (-26 dBFS)


def _rng(*key: int) -> np.random.Generator:
    """A generator owned by one (seed, ...) key: results never depend on call order or threads."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


_TAG_SPEAKER, _TAG_VOICES, _TAG_SPLIT, _TAG_UTT, _TAG_ROOM = 1, 2, 3, 4, 5


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
