"""Each scanner runs on a fixture tree with the corpus's real naming, filled with tiny generated audio."""

from __future__ import annotations

from pathlib import Path

import pytest
from audio_fixtures import write_garbage, write_tone

from fedsd.data.corpora import (
    PRESETS,
    SCANNERS,
    CorpusError,
    import_csv,
    map_label,
    scan_corpus,
)
from fedsd.data.manifest import ManifestError, read_manifest, write_manifest

SR = 8000


def make(root: Path, *rels: str) -> None:
    for i, rel in enumerate(rels):
        write_tone(root / rel, seconds=0.05, sample_rate=SR, freq=200 + 10 * i)


def by_id(rows):
    return {r.utt_id: r for r in rows}


def test_registry_lists_every_corpus():
    assert set(SCANNERS) == {
        "ravdess", "crema-d", "emodb", "iemocap", "demos", "esd", "tess", "savee", "msp-podcast",
    }  # fmt: skip
    for name in ("iemocap4", "ekman6", "ravdess8", "demos7", "cremad6", "emodb7"):
        assert name in PRESETS


def test_unknown_corpus_and_preset_list_valid_ones(tmp_path):
    with pytest.raises(CorpusError, match="valid corpora: ravdess, crema-d"):
        scan_corpus("voxceleb", tmp_path)
    with pytest.raises(CorpusError, match="valid presets: .*iemocap4"):
        scan_corpus("ravdess", tmp_path, preset="iemocap5")
    with pytest.raises(CorpusError, match="not a directory"):
        scan_corpus("ravdess", tmp_path / "missing")


def test_presets():
    assert map_label("excited", "iemocap4") == "happy"
    assert map_label("frustrated", "iemocap4") is None
    assert map_label("neutral", "demos7") is None and map_label("guilt", "demos7") == "guilt"
    assert map_label("happiness", "ekman6") == "happy" and map_label("neutral", "ekman6") is None
    assert map_label("boredom", "emodb7") == "boredom"
    assert map_label("calm", "ravdess8") == "calm" and map_label("surprised", "ravdess8") == "surprise"
    assert map_label("whatever", "raw") == "whatever" and map_label("xxx", "raw") is None
    assert len({v for v in PRESETS["demos7"].values() if v}) == 7
    assert len({v for v in PRESETS["cremad6"].values() if v}) == 6


def test_ravdess(tmp_path):
    make(
        tmp_path,
        "Actor_01/03-01-05-01-02-01-01.wav",
        "Actor_02/03-01-01-01-01-01-02.wav",
        "Actor_02/03-02-08-02-01-02-02.wav",
        "Actor_01/03-01-09-01-01-01-01.wav",  # no emotion 09
        "Actor_01/readme.wav",
        "Actor_01/._03-01-05-01-02-01-01.wav",
    )
    res = scan_corpus("ravdess", tmp_path)
    assert len(res) == 3 and res.num_skipped == 3 and res.preset == "ravdess8"
    rows = by_id(res)
    a = rows["03-01-05-01-02-01-01"]
    assert (a.label, a.orig_label, a.speaker, a.gender, a.text_id) == (
        "angry",
        "angry",
        "ravdess:01",
        "m",
        "02",
    )
    assert a.path == "Actor_01/03-01-05-01-02-01-01.wav" and a.dataset == "ravdess"
    assert a.sample_rate == SR and a.duration == pytest.approx(0.05) and a.split == ""
    assert rows["03-01-01-01-01-01-02"].label == "neutral" and rows["03-01-01-01-01-01-02"].gender == "f"
    assert rows["03-02-08-02-01-02-02"].label == "surprise"
    assert rows["03-02-08-02-01-02-02"].orig_label == "surprised"
    four = scan_corpus("ravdess", tmp_path, "iemocap4")
    assert sorted(r.label for r in four) == ["angry", "neutral"] and four.num_dropped == 1


def test_cremad(tmp_path):
    make(
        tmp_path,
        "AudioWAV/1001_DFA_ANG_XX.wav",
        "AudioWAV/1001_IEO_HAP_HI.wav",
        "AudioWAV/1002_DFA_NEU_XX.flac",
        "AudioWAV/1001_DFA_XYZ_XX.wav",
        "AudioWAV/notes.wav",
    )
    (tmp_path / "VideoDemographics.csv").write_text(
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,C,N\n1002,21,Female,C,N\n"
    )
    res = scan_corpus("crema-d", tmp_path)
    assert len(res) == 3 and res.num_skipped == 2
    rows = by_id(res)
    assert rows["1001_DFA_ANG_XX"].label == "angry" and rows["1001_DFA_ANG_XX"].orig_label == "anger"
    assert rows["1001_DFA_ANG_XX"].speaker == "crema-d:1001" and rows["1001_DFA_ANG_XX"].text_id == "DFA"
    assert rows["1001_DFA_ANG_XX"].gender == "m" and rows["1002_DFA_NEU_XX"].gender == "f"
    assert rows["1001_IEO_HAP_HI"].label == "happy" and rows["1002_DFA_NEU_XX"].label == "neutral"


def test_emodb(tmp_path):
    make(
        tmp_path,
        "wav/03a01Fa.wav",
        "wav/08b02Wb.wav",
        "wav/10a04Lc.wav",
        "wav/16a01Nb.wav",
        "wav/03a01Xa.wav",
    )
    res = scan_corpus("emodb", tmp_path)
    assert len(res) == 4 and res.num_skipped == 1
    rows = by_id(res)
    r = rows["03a01Fa"]
    assert (r.label, r.orig_label, r.speaker, r.gender, r.text_id, r.lang) == (
        "happy", "happiness", "emodb:03", "m", "a01", "de",
    )  # fmt: skip
    assert rows["08b02Wb"].label == "angry" and rows["08b02Wb"].gender == "f"
    assert rows["10a04Lc"].label == "boredom" and rows["16a01Nb"].label == "neutral"
    ekman = scan_corpus("emodb", tmp_path, "ekman6")
    assert sorted(r.label for r in ekman) == ["angry", "happy"] and ekman.num_dropped == 2


def test_demos(tmp_path):
    make(
        tmp_path,
        "DEMOS/PR_m_59_rab17b.wav",
        "DEMOS/NP_f_12_tri03a.wav",
        "NEU/NP_m_59_neu01b.wav",
        "x/foo.wav",
    )
    res = scan_corpus("demos", tmp_path)
    assert len(res) == 2 and res.num_dropped == 1 and res.num_skipped == 1 and res.preset == "demos7"
    rows = by_id(res)
    r = rows["PR_m_59_rab17b"]
    assert (r.label, r.orig_label, r.speaker, r.gender, r.lang) == ("angry", "anger", "demos:59", "m", "it")
    assert rows["NP_f_12_tri03a"].label == "sad" and rows["NP_f_12_tri03a"].speaker == "demos:12"
    assert len(scan_corpus("demos", tmp_path, "raw")) == 3


def test_esd(tmp_path):
    make(
        tmp_path,
        "0011/Angry/0011_000351.wav",
        "0001/Happy/train/0001_000701.wav",
        "0011/Surprise/test/0011_001401.wav",
        "0021/Angry/0021_000351.wav",
        "0011/Misc/0011_000001.wav",
    )
    res = scan_corpus("esd", tmp_path)
    assert len(res) == 3 and res.num_skipped == 2
    rows = by_id(res)
    r = rows["0011_000351"]
    assert (r.label, r.speaker, r.lang, r.text_id, r.split) == ("angry", "esd:0011", "en", "001", "")
    h = rows["0001_000701"]
    assert (h.label, h.speaker, h.lang, h.text_id, h.split) == ("happy", "esd:0001", "zh", "001", "train")
    assert rows["0011_001401"].label == "surprise" and rows["0011_001401"].split == "test"


def test_tess(tmp_path):
    make(
        tmp_path,
        "OAF_angry/OAF_back_angry.wav",
        "YAF_pleasant_surprised/YAF_bath_ps.wav",
        "OAF_Sad/OAF_beg_sad.wav",
        "OAF_angry/notes.wav",
    )
    res = scan_corpus("tess", tmp_path)
    assert len(res) == 3 and res.num_skipped == 1
    rows = by_id(res)
    assert rows["OAF_back_angry"].label == "angry" and rows["OAF_back_angry"].speaker == "tess:OAF"
    assert rows["OAF_back_angry"].text_id == "back"
    assert rows["YAF_bath_ps"].label == "surprise" and rows["YAF_bath_ps"].speaker == "tess:YAF"
    assert rows["OAF_beg_sad"].label == "sad"


def test_savee(tmp_path):
    make(
        tmp_path,
        "AudioData/DC/a01.wav",
        "AudioData/JE/sa03.wav",
        "AudioData/KL/su15.wav",
        "flat/DC_n01.wav",
        "AudioData/XX/a01.wav",
        "AudioData/DC/info.wav",
    )
    res = scan_corpus("savee", tmp_path)
    assert len(res) == 4 and res.num_skipped == 2
    rows = by_id(res)
    assert {k: (r.label, r.speaker) for k, r in rows.items()} == {
        "DC_a01": ("angry", "savee:DC"),
        "JE_sa03": ("sad", "savee:JE"),
        "KL_su15": ("surprise", "savee:KL"),
        "DC_n01": ("neutral", "savee:DC"),
    }


def _iemocap_tree(root: Path) -> None:
    ev = root / "Session1/dialog/EmoEvaluation"
    ev.mkdir(parents=True)
    (ev / "Ses01F_impro01.txt").write_text(
        "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
        "C-E2:\tNeutral;\t()\n"
        "A-E3:\tval 3; act 2; dom  2;\t()\n\n"
        "[10.0100 - 11.5000]\tSes01F_impro01_M003\tang\t[2.0000, 3.5000, 3.5000]\n"
        "[12.0000 - 13.0000]\tSes01F_impro01_F001\texc\t[4.0000, 3.5000, 3.0000]\n"
        "[14.0000 - 15.0000]\tSes01F_impro01_M004\tfru\t[2.0000, 3.0000, 3.0000]\n"
        "[16.0000 - 17.0000]\tSes01F_impro01_F002\tneu\t[2.5000, 2.5000, 2.5000]\n"
    )
    (ev / "Ses01M_script01_1.txt").write_text(
        "[1.0000 - 2.0000]\tSes01M_script01_1_F005\tsad\t[2.0, 2.0, 2.0]\n"
    )
    (ev / "Categorical").mkdir()
    (ev / "Categorical/Ses01F_impro01_e1_cat.txt").write_text("Ses01F_impro01_F000 :Neutral state; ()\n")
    make(
        root,
        "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav",
        "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M003.wav",
        "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F001.wav",
        "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M004.wav",
        "Session1/sentences/wav/Ses01M_script01_1/Ses01M_script01_1_F005.wav",
        "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_X999.wav",
        "Session1/dialog/wav/Ses01F_impro01.wav",
    )


def test_iemocap_speaker_is_session_plus_utterance_gender(tmp_path):
    _iemocap_tree(tmp_path)
    res = scan_corpus("iemocap", tmp_path)
    rows = by_id(res)
    assert len(res) == 4 and res.num_dropped == 1 and res.dropped["frustrated"] == 1
    # skipped: the X999 file (naming), the dialog-level wav, and F002 (labelled, no wav)
    assert res.num_skipped == 3
    assert {k: (r.label, r.speaker) for k, r in rows.items()} == {
        "Ses01F_impro01_F000": ("neutral", "iemocap:Ses01F"),
        "Ses01F_impro01_M003": ("angry", "iemocap:Ses01M"),
        "Ses01F_impro01_F001": ("happy", "iemocap:Ses01F"),
        "Ses01M_script01_1_F005": ("sad", "iemocap:Ses01F"),
    }
    m = rows["Ses01F_impro01_M003"]
    assert (m.session, m.gender, m.orig_label) == ("Ses01", "m", "angry")
    assert rows["Ses01F_impro01_F001"].orig_label == "excited"


def test_iemocap_without_labels_is_a_clear_error(tmp_path):
    make(tmp_path, "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav")
    with pytest.raises(CorpusError, match="EmoEvaluation"):
        scan_corpus("iemocap", tmp_path)


def test_msp_podcast(tmp_path):
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Labels/labels_consensus.csv").write_text(
        "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"
        "MSP-PODCAST_0001_0008.wav,A,5.2,2.0,5.0,127,Female,Train\n"
        "MSP-PODCAST_0001_0009.wav,N,4.0,4.0,4.0,Unknown,Unknown,Development\n"
        "MSP-PODCAST_0002_0001.wav,X,4.0,4.0,4.0,55,Male,Test1\n"
        "MSP-PODCAST_0002_0002.wav,C,4.0,4.0,4.0,55,Male,Test2\n"
        "MSP-PODCAST_0003_0001.wav,H,4.0,4.0,4.0,77,Male,Train\n"
    )
    make(
        tmp_path,
        "Audios/MSP-PODCAST_0001_0008.wav",
        "Audios/MSP-PODCAST_0001_0009.wav",
        "Audios/MSP-PODCAST_0002_0001.wav",
        "Audios/MSP-PODCAST_0002_0002.wav",
        "Audios/MSP-PODCAST_9999_0001.wav",
    )
    res = scan_corpus("msp-podcast", tmp_path)
    assert len(res) == 3 and res.num_dropped == 1 and res.num_skipped == 2
    rows = by_id(res)
    assert {k: (r.label, r.speaker, r.split, r.gender) for k, r in rows.items()} == {
        "MSP-PODCAST_0001_0008": ("angry", "msp-podcast:127", "train", "f"),
        "MSP-PODCAST_0001_0009": ("neutral", "msp-podcast:unknown-0001", "valid", ""),
        "MSP-PODCAST_0002_0002": ("contempt", "msp-podcast:55", "test", "m"),
    }
    assert rows["MSP-PODCAST_0001_0008"].path == "Audios/MSP-PODCAST_0001_0008.wav"


def test_unreadable_file_is_skipped_not_fatal(tmp_path):
    make(tmp_path, "wav/03a01Fa.wav")
    write_garbage(tmp_path / "wav/03a02Fa.wav")
    res = scan_corpus("emodb", tmp_path)
    assert len(res) == 1 and res.num_skipped == 1 and "unreadable" in res.skipped[0][1]


def test_scan_roundtrips_through_manifest(tmp_path):
    _iemocap_tree(tmp_path / "corpus")
    res = scan_corpus("iemocap", tmp_path / "corpus")
    write_manifest(res, tmp_path / "m.csv")
    back = read_manifest(tmp_path / "m.csv")
    assert [r.utt_id for r in back] == [r.utt_id for r in res]
    assert [r.speaker for r in back] == [r.speaker for r in res]
    assert back[0].session == "Ses01"


def test_import_csv(tmp_path):
    root = tmp_path / "audio"
    make(root, "a/one.wav", "a/two.flac", "b/one.wav", "c/three.wav", "d/joy.wav")
    table = tmp_path / "table.csv"
    table.write_text(
        "file,emotion,who,part\n"
        "a/one.wav,anger,s1,train\n"
        "a/two.flac,,s1,train\n"
        "b/one.wav,sadness,s2,dev\n"
        f"{root / 'c/three.wav'},happy,s2,test\n"
        "missing.wav,happy,s3,train\n"
        "d/joy.wav,elated,s3,train\n"
    )
    res = import_csv(table, root, "file", "emotion", "who", dataset="mine", split_col="part")
    rows = by_id(res)
    assert set(rows) == {"a__one", "two", "b__one", "three", "joy"}
    assert rows["a__one"].label == "anger" and rows["a__one"].speaker == "mine:s1"
    assert rows["two"].label == "" and rows["two"].orig_label == ""  # unlabelled speech is kept
    assert rows["b__one"].split == "valid" and rows["three"].path == "c/three.wav"
    assert res.skipped == [("missing.wav", "file not found")]
    mapped = import_csv(table, root, "file", "emotion", "who", dataset="mine", preset="ekman6")
    assert by_id(mapped)["a__one"].label == "angry" and by_id(mapped)["b__one"].label == "sad"
    assert "joy" not in by_id(mapped) and mapped.dropped["elated"] == 1
    assert by_id(mapped)["two"].label == ""


def test_import_csv_missing_column_lists_columns(tmp_path):
    table = tmp_path / "t.tsv"
    table.write_text("path\tlabel\nx.wav\tangry\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) speaker; the table has path, label"):
        import_csv(table, tmp_path)
