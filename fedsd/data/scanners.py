"""One scanner per corpus (RAVDESS, CREMA-D, EmoDB, DEMoS, ESD, TESS, SAVEE, IEMOCAP, MSP-Podcast):
each reads its corpus's own naming or annotation files into manifest rows (``fedsd.data.corpora``
registers them in ``SCANNERS``; its docstring says why there is one per corpus).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from fedsd.data.corpus_base import (
    _NAMING,
    CorpusError,
    Progress,
    ScanResult,
    _audio_files,
    _build,
    _check_root,
    _Parsed,
    _scan_by_name,
    resolve_preset,
)

# ---------------------------------------------------------------------------------------------- RAVDESS
_RAVDESS_EMO = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
_RAVDESS_RE = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


def _parse_ravdess(path: Path, root: Path) -> _Parsed | str:
    m = _RAVDESS_RE.match(path.stem)
    if not m:
        return _NAMING.format("RAVDESS MM-VC-EE-II-SS-RR-AA")
    _modality, _channel, emo, _intensity, statement, _rep, actor = m.groups()
    if emo not in _RAVDESS_EMO:
        return f"unknown RAVDESS emotion code {emo}"
    return _Parsed(
        utt_id=path.stem,
        orig_label=_RAVDESS_EMO[emo],
        speaker=actor,
        gender="m" if int(actor) % 2 == 1 else "f",
        lang="en",
        text_id=statement,
    )


def scan_ravdess(root: Path, preset: str | None = None, *, progress: Progress | None = None) -> ScanResult:
    """RAVDESS ``03-01-05-01-02-01-12.wav``: emotion = 3rd field, actor = 7th (odd = male)."""
    return _scan_by_name("ravdess", root, preset, _parse_ravdess, progress)


# ---------------------------------------------------------------------------------------------- CREMA-D
_CREMAD_EMO = {
    "ANG": "anger",
    "DIS": "disgust",
    "FEA": "fear",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
_CREMAD_RE = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


def _cremad_genders(root: Path) -> dict[str, str]:
    """Actor sex from ``VideoDemographics.csv`` when it ships with the corpus."""
    table = next(iter(sorted(root.rglob("VideoDemographics.csv"))), None)
    if table is None:
        return {}
    out: dict[str, str] = {}
    with open(table, newline="", encoding="utf-8", errors="replace") as fh:
        for rec in csv.DictReader(fh):
            actor, sex = (rec.get("ActorID") or "").strip(), (rec.get("Sex") or "").strip().lower()
            if actor and sex[:1] in ("m", "f"):
                out[actor] = sex[:1]
    return out


def scan_cremad(root: Path, preset: str | None = None, *, progress: Progress | None = None) -> ScanResult:
    """CREMA-D ``1001_DFA_ANG_XX.wav``: speaker 1001, sentence DFA, emotion ANG, intensity XX."""
    genders = _cremad_genders(_check_root(root))

    def parse(path: Path, _root: Path) -> _Parsed | str:
        m = _CREMAD_RE.match(path.stem)
        if not m:
            return _NAMING.format("CREMA-D 1001_DFA_ANG_XX")
        actor, text, emo, _level = m.groups()
        if emo not in _CREMAD_EMO:
            return f"unknown CREMA-D emotion code {emo}"
        return _Parsed(
            path.stem, _CREMAD_EMO[emo], actor, gender=genders.get(actor, ""), lang="en", text_id=text
        )

    return _scan_by_name("crema-d", root, preset, parse, progress)


# ---------------------------------------------------------------------------------------------- EmoDB
_EMODB_EMO = {
    "W": "anger",
    "L": "boredom",
    "E": "disgust",
    "A": "fear",
    "F": "happiness",
    "T": "sadness",
    "N": "neutral",
}
_EMODB_GENDER = {
    "03": "m",
    "08": "f",
    "09": "f",
    "10": "m",
    "11": "m",
    "12": "m",
    "13": "f",
    "14": "f",
    "15": "m",
    "16": "f",
}
_EMODB_RE = re.compile(r"^(\d\d)([a-z]\d\d)([A-Z])([a-z]?)$")


def _parse_emodb(path: Path, root: Path) -> _Parsed | str:
    m = _EMODB_RE.match(path.stem)
    if not m:
        return _NAMING.format("EmoDB 03a01Fa")
    spk, text, emo, _version = m.groups()
    if emo not in _EMODB_EMO:
        return f"unknown EmoDB emotion letter {emo}"
    return _Parsed(
        path.stem, _EMODB_EMO[emo], spk, gender=_EMODB_GENDER.get(spk, ""), lang="de", text_id=text
    )


def scan_emodb(root: Path, preset: str | None = None, *, progress: Progress | None = None) -> ScanResult:
    """EmoDB ``03a01Fa.wav``: speaker = chars 0-1, text = chars 2-4, emotion letter = char 5."""
    return _scan_by_name("emodb", root, preset, _parse_emodb, progress)


# ---------------------------------------------------------------------------------------------- DEMoS
_DEMOS_EMO = {
    "rab": "anger",
    "tri": "sadness",
    "gio": "happiness",
    "pau": "fear",
    "dis": "disgust",
    "col": "guilt",
    "sor": "surprise",
    "neu": "neutral",
}
_DEMOS_RE = re.compile(r"^(PR|NP)_([mf])_(\d+)_([a-z]{3})(\w*)$")


def _parse_demos(path: Path, root: Path) -> _Parsed | str:
    m = _DEMOS_RE.match(path.stem)
    if not m:
        return _NAMING.format("DEMoS PR_m_59_rab17b")
    _kind, gender, spk, emo, rest = m.groups()
    if emo not in _DEMOS_EMO:
        return f"unknown DEMoS emotion code {emo}"
    return _Parsed(path.stem, _DEMOS_EMO[emo], spk, gender=gender, lang="it", text_id=rest)


def scan_demos(root: Path, preset: str | None = None, *, progress: Progress | None = None) -> ScanResult:
    """DEMoS ``PR_m_59_rab17b.wav`` / ``NP_...``: gender m/f, speaker number, Italian emotion code."""
    return _scan_by_name("demos", root, preset, _parse_demos, progress)


# ---------------------------------------------------------------------------------------------- ESD
_ESD_EMO = {"angry": "angry", "happy": "happy", "neutral": "neutral", "sad": "sad", "surprise": "surprise"}
_ESD_SPLIT = {"train": "train", "evaluation": "valid", "test": "test"}
_ESD_RE = re.compile(r"^(\d{4})_(\d{6})$")


def _parse_esd(path: Path, root: Path) -> _Parsed | str:
    m = _ESD_RE.match(path.stem)
    if not m:
        return _NAMING.format("ESD 0011/Angry/0011_000351")
    spk, num = m.groups()
    if not 1 <= int(spk) <= 20:
        return f"ESD speaker {spk} is outside 0001-0020"
    parents = [p.name for p in path.relative_to(root).parents][:-1]  # nearest first, without '.'
    emotion = next((_ESD_EMO[p.lower()] for p in parents if p.lower() in _ESD_EMO), None)
    if emotion is None:
        return "ESD file is not inside an emotion folder (Angry, Happy, Neutral, Sad, Surprise)"
    split = next((_ESD_SPLIT[p.lower()] for p in parents if p.lower() in _ESD_SPLIT), "")
    # ESD numbers utterances 1..1750 per speaker, 350 per emotion, the same 350 sentences each time.
    text = f"{(int(num) - 1) % 350 + 1:03d}"
    return _Parsed(path.stem, emotion, spk, lang="en" if int(spk) >= 11 else "zh", text_id=text, split=split)


def scan_esd(root: Path, preset: str | None = None, *, progress: Progress | None = None) -> ScanResult:
    """ESD ``0011/Angry/0011_000351.wav``: speakers 0001-0010 Mandarin, 0011-0020 English.

    A ``train``/``evaluation``/``test`` folder (the official split) becomes the split column.
    """
    return _scan_by_name("esd", root, preset, _parse_esd, progress)


# ---------------------------------------------------------------------------------------------- TESS
_TESS_EMO = {
    "angry": "angry",
    "disgust": "disgust",
    "fear": "fear",
    "happy": "happy",
    "neutral": "neutral",
    "ps": "surprise",
    "sad": "sad",
}
_TESS_RE = re.compile(r"^(OAF|YAF)_(.+)_(angry|disgust|fear|happy|neutral|ps|sad)$", re.IGNORECASE)


def _parse_tess(path: Path, root: Path) -> _Parsed | str:
    m = _TESS_RE.match(path.stem)
    if not m:
        return _NAMING.format("TESS OAF_back_angry")
    spk, word, emo = m.groups()
    return _Parsed(
        path.stem, _TESS_EMO[emo.lower()], spk.upper(), gender="f", lang="en", text_id=word.lower()
    )


def scan_tess(root: Path, preset: str | None = None, *, progress: Progress | None = None) -> ScanResult:
    """TESS ``OAF_angry/OAF_back_angry.wav``: speaker OAF/YAF, target word, emotion (ps = surprise)."""
    return _scan_by_name("tess", root, preset, _parse_tess, progress)


# ---------------------------------------------------------------------------------------------- SAVEE
_SAVEE_EMO = {
    "a": "anger",
    "d": "disgust",
    "f": "fear",
    "h": "happiness",
    "n": "neutral",
    "sa": "sadness",
    "su": "surprise",
}
_SAVEE_SPEAKERS = ("DC", "JE", "JK", "KL")
_SAVEE_RE = re.compile(r"^(?:(DC|JE|JK|KL)_)?(sa|su|a|d|f|h|n)(\d\d)$")


def _parse_savee(path: Path, root: Path) -> _Parsed | str:
    m = _SAVEE_RE.match(path.stem)
    if not m:
        return _NAMING.format("SAVEE DC/a01 or DC_a01")
    spk, emo, num = m.groups()
    spk = spk or path.parent.name
    if spk not in _SAVEE_SPEAKERS:
        return f"SAVEE speaker {spk!r} is not one of {', '.join(_SAVEE_SPEAKERS)}"
    return _Parsed(f"{spk}_{emo}{num}", _SAVEE_EMO[emo], spk, gender="m", lang="en")


def scan_savee(root: Path, preset: str | None = None, *, progress: Progress | None = None) -> ScanResult:
    """SAVEE ``DC/a01.wav`` or ``DC_a01.wav``: speaker DC/JE/JK/KL, emotion a d f h n sa su."""
    return _scan_by_name("savee", root, preset, _parse_savee, progress)


# ---------------------------------------------------------------------------------------------- IEMOCAP
_IEMOCAP_EMO = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "excited",
    "ang": "angry",
    "sad": "sad",
    "fru": "frustrated",
    "sur": "surprised",
    "fea": "fearful",
    "dis": "disgusted",
    "oth": "other",
    "xxx": "xxx",
}
_IEMOCAP_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(Ses\d\d[MF]_\S+)\s+(\w+)\s+\[")
_IEMOCAP_UTT = re.compile(r"^(Ses\d\d)[MF]_.+_([MF])\d+$")


def iemocap_speaker(utt_id: str) -> tuple[str, str, str] | None:
    """``Ses01F_impro01_M000`` -> ("Ses01M", "Ses01", "m"): the *utterance* suffix gives the gender."""
    m = _IEMOCAP_UTT.match(utt_id)
    if not m:
        return None
    session, gender = m.groups()
    return f"{session}{gender}", session, gender.lower()


def read_iemocap_labels(root: Path) -> dict[str, str]:
    """Utterance -> 3-letter code from ``Session*/dialog/EmoEvaluation/*.txt``."""
    labels: dict[str, str] = {}
    for txt in sorted(root.glob("Session*/dialog/EmoEvaluation/*.txt")):
        with open(txt, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                m = _IEMOCAP_LINE.match(line.strip())
                if m:
                    labels[m.group(1)] = m.group(2).lower()
    return labels


def scan_iemocap(root: Path, preset: str | None = None, *, progress: Progress | None = None) -> ScanResult:
    """IEMOCAP: labels from EmoEvaluation, audio at ``Session*/sentences/wav/<dialog>/<utt>.wav``."""
    root = _check_root(root)
    resolve_preset(preset, "iemocap")
    labels = read_iemocap_labels(root)
    if not labels:
        raise CorpusError(f"{root}: no IEMOCAP labels found in Session*/dialog/EmoEvaluation/*.txt")
    items: list[tuple[Path, _Parsed | str]] = []
    found: set[str] = set()
    for path in _audio_files(root):
        rel = path.relative_to(root).parts
        if len(rel) != 5 or not rel[0].startswith("Session") or rel[1:3] != ("sentences", "wav"):
            items.append((path, "not under Session*/sentences/wav/<dialog>/"))
            continue
        utt = path.stem
        spk = iemocap_speaker(utt)
        if spk is None:
            items.append((path, _NAMING.format("IEMOCAP Ses01F_impro01_M000")))
            continue
        code = labels.get(utt)
        if code is None:
            items.append((path, "no label line in EmoEvaluation"))
            continue
        if code not in _IEMOCAP_EMO:
            items.append((path, f"unknown IEMOCAP emotion code {code!r}"))
            continue
        found.add(utt)
        speaker, session, gender = spk
        items.append(
            (path, _Parsed(utt, _IEMOCAP_EMO[code], speaker, gender=gender, lang="en", session=session))
        )
    res = _build("iemocap", root, preset, items, progress)
    for utt in sorted(set(labels) - found):
        res.skipped.append((utt, "labelled in EmoEvaluation but no wav found"))
    return res


# ---------------------------------------------------------------------------------------------- MSP-Podcast
_MSP_EMO = {
    "A": "angry",
    "S": "sad",
    "H": "happy",
    "U": "surprise",
    "F": "fear",
    "D": "disgust",
    "C": "contempt",
    "N": "neutral",
    "O": "other",
    "X": "no-agreement",
}
_MSP_SPLIT = {
    "train": "train",
    "development": "valid",
    "validation": "valid",
    "test1": "test",
    "test2": "test",
    "test3": "test",
    "test": "test",
}


def scan_msp_podcast(
    root: Path, preset: str | None = None, *, progress: Progress | None = None
) -> ScanResult:
    """MSP-Podcast: ``Labels/labels_consensus.csv`` (FileName, EmoClass, SpkrID, Gender, Split_Set), audio
    under ``Audios/``. The official split is kept. Unknown speakers are grouped per podcast so the
    speaker-independent partitioner does not merge every unknown voice into one pseudo-speaker.
    """
    root = _check_root(root)
    resolve_preset(preset, "msp-podcast")
    table = root / "Labels" / "labels_consensus.csv"
    if not table.is_file():
        raise CorpusError(f"{table}: MSP-Podcast labels file not found")
    audio = {p.name: p for p in _audio_files(root / "Audios")} if (root / "Audios").is_dir() else {}
    items: list[tuple[Path, _Parsed | str]] = []
    listed: set[str] = set()
    with open(table, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"FileName", "EmoClass", "SpkrID", "Split_Set"}
        missing = sorted(need - set(reader.fieldnames or []))
        if missing:
            raise CorpusError(f"{table}: missing column(s) {', '.join(missing)}")
        for rec in reader:
            name = (rec.get("FileName") or "").strip()
            if not name:
                continue
            listed.add(name)
            path = audio.get(name)
            if path is None:
                items.append((Path("Audios") / name, "audio file missing"))
                continue
            emo = (rec.get("EmoClass") or "").strip().upper()
            if emo not in _MSP_EMO:
                items.append((path, f"unknown MSP-Podcast EmoClass {emo!r}"))
                continue
            utt = Path(name).stem
            spk = (rec.get("SpkrID") or "").strip()
            if not spk or spk.lower() == "unknown":
                parts = utt.split("_")
                spk = f"unknown-{parts[1]}" if len(parts) >= 3 else f"unknown-{utt}"
            split_raw = (rec.get("Split_Set") or "").strip().lower()
            gender = (rec.get("Gender") or "").strip().lower()[:1]
            items.append(
                (
                    path,
                    _Parsed(
                        utt,
                        _MSP_EMO[emo],
                        spk,
                        gender=gender if gender in ("m", "f") else "",
                        lang="en",
                        split=_MSP_SPLIT.get(split_raw, ""),
                    ),
                )
            )
    for name in sorted(set(audio) - listed):
        items.append((audio[name], "not listed in labels_consensus.csv"))
    return _build("msp-podcast", root, preset, items, progress)
