"""Tests for telme.py: CPU only, offline, a few minutes. Run with `bash run.sh test` or `pytest`."""
import csv
import dataclasses
import json
import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import telme


# --------------------------------------------------------------------------------------------------
# Shared fixtures and helpers: MELD CSVs, tokenizers, media, tiny encoders, runs
# --------------------------------------------------------------------------------------------------
def write_meld_csv(path: Path, rows):
    """rows: (dialogue, utterance, speaker, emotion, text)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(telme.MELD_COLUMNS)
        for n, (d, u, speaker, emotion, text) in enumerate(rows, 1):
            writer.writerow([n, text, speaker, emotion, "neutral", d, u, 1, 1, "00:00:01,000", "00:00:02,000"])


FIXTURE_ROWS = [(0, 0, "Ross", "joy", "hello there my friend"),
                (0, 1, "Rachel", "anger", "go away now"),
                (0, 2, "Ross", "sadness", "okay then i will go"),
                (1, 0, "Monica", "neutral", "who is there"),
                (1, 1, "Joey", "surprise", "how you doing")]


def write_rows(path: Path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def bert_style_tokenizer():
    return telme.word_level_tokenizer([r[4] for r in FIXTURE_ROWS])


def roberta_style_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r[4] for r in FIXTURE_ROWS] + ["Now feels"], vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizer(tokenizer_object=bpe._tokenizer)


def write_wav(path: Path, samples: np.ndarray, rate: int):
    """samples: (channels, n) float in [-1, 1]."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples.shape[0])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples.T * 32767).astype("<i2").tobytes())


def tone(seconds, rate, channels, pitch=1000.0):
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([(0.1 + 0.05 * c) * np.sin(2 * np.pi * pitch * t) for c in range(channels)]).astype(np.float32)


def index_frames(count):
    """Frame k shows k in base 8: three horizontal grey bands of 32 * digit (luma codes accurately)."""
    frames = np.zeros((count, 48, 64, 3), np.uint8)
    for k in range(count):
        for band in range(3):
            frames[k, 16 * band:16 * (band + 1)] = 32 * (k // 8 ** band % 8)
    return frames


def shown_indices(frames):
    """The k of index_frames, read back from 16 x 16 frames (each band about 5 rows high)."""
    digits = [np.round(frames[:, rows].reshape(len(frames), -1).mean(1) / 32)
              for rows in (slice(1, 4), slice(7, 10), slice(12, 15))]
    return (digits[0] + 8 * digits[1] + 64 * digits[2]).astype(int)


# Tiny encoders shared by the end-to-end tests below (the demo's sizes).
TINY = dict(epochs=(1, 1, 1), lr=(1e-3,), batch_size=4, max_text_tokens=48, image_size=32,
            feature_dim=48, max_audio_samples=48000, quiet=True, workers=1)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    corpus = [" ".join(telme.SYNTH_FILLER + sum(telme.SYNTH_GROUP_WORDS, []))] + [r[4] for r in FIXTURE_ROWS]
    return telme.write_tiny_models(tmp_path_factory.mktemp("models"), corpus, TINY["feature_dim"],
                                   TINY["image_size"], 8)


def tiny_config(dataset, data_dir, tmp_path, models, **overrides):
    return telme.make_config(dataset, data_dir=str(data_dir), out=str(tmp_path / "run"),
                             cache_dir=str(tmp_path / "cache"), text_model=models["text"],
                             audio_model=models["audio"], video_model=models["video"],
                             **{**TINY, **overrides})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = telme.demo(out, "meld", seed=42, quiet=True)
    return out, results


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A few synthetic dialogues and tiny encoders: a whole run of 2 epochs per phase in seconds."""
    out = tmp_path_factory.mktemp("tiny")
    data = telme.synth(out / "data", "meld", dialogues=3, seed=7)
    corpus = [u.text for utts in telme.load_splits(telme.make_config(data_dir=str(data))).values() for u in utts]
    models = telme.write_tiny_models(out / "models", corpus, telme.DEMO["feature_dim"],
                                     telme.DEMO["image_size"], 8, seed=7)

    def config(name, **overrides):
        settings = {**telme.DEMO, "epochs": (2, 2, 2), "cache_dir": str(out / "cache"), **overrides}
        return telme.make_config("meld", data_dir=str(data), out=str(out / name),
                                 text_model=models["text"], audio_model=models["audio"],
                                 video_model=models["video"], quiet=True, **settings)
    return config


def file_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_flags(cfg) -> list[str]:
    """The train flags that give `cfg` (those that differ from the meld preset)."""
    preset, flags = telme.make_config("meld"), []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(preset, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-"))
        else:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return flags


def one_line_exit(capsys, argv) -> str:
    """telme.main(argv) stops within seconds with one line and exit status 1; returns the line."""
    import time
    started = time.time()
    with pytest.raises(SystemExit) as stop:
        telme.main(argv)
    assert time.time() - started < 15
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code  # Python prints it, exit 1
    assert "Traceback" not in capsys.readouterr().err
    return stop.value.code


# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------
def test_config_presets_and_overrides():
    cfg = telme.make_config("iemocap", epochs=(3,), lr=(2e-5,))
    assert cfg.epochs == (3, 3, 3) and cfg.lr == (2e-5,) * 3  # one value: every phase
    for dataset, preset in telme.PRESETS.items():  # each dataset's preset replaces the defaults
        assert {k: getattr(telme.make_config(dataset), k) for k in preset} == preset
    assert telme.PRESETS["meld"]["tau"] != telme.Config.tau or telme.PRESETS["iemocap"]["tau"] != telme.Config.tau
    args = ["train", "--dataset", "iemocap", "--epochs", "1,2,3", "--tau", "3"]
    parsed = telme.config_from_args(telme.build_parser().parse_args(args))
    # A flag wins over the preset; what no flag names keeps the preset's value.
    assert parsed.epochs == (1, 2, 3) and parsed.tau == 3.0 and parsed.alpha == telme.PRESETS["iemocap"]["alpha"]
    # A switch given twice: the last wins (run.sh's recipes pass --compile before the user's flags).
    for flags, compiled in ((["--compile"], True), (["--compile", "--no-compile"], False), ([], False)):
        assert telme.config_from_args(telme.build_parser().parse_args(["train", *flags])).compile is compiled


@pytest.mark.parametrize("overrides, problem", [
    (dict(epochs=(10, 10)), "--epochs takes one value or three (teacher,students,fusion), not 2"),
    (dict(lr=(1e-5,) * 4), "--lr takes one value or three"),
    (dict(amp="bf15"), "--amp must be one of bf16, fp16, off, not 'bf15'"),
    (dict(heads=5), "--heads 5 does not divide the fusion's attention width 768"),
    (dict(heads=3, feature_dim=80, compat="official"), "width 160 (--feature-dim 80, --asf-attention batch)"),
])
def test_bad_settings_stop_with_one_line_before_training(overrides, problem):
    with pytest.raises(SystemExit) as stop:
        telme.make_config("meld", **overrides)
    assert problem in str(stop.value) and "\n" not in str(stop.value)


# --------------------------------------------------------------------------------------------------
# 1. Data: MELD as released (C1 characters, bad CSV input)
# --------------------------------------------------------------------------------------------------
def test_meld_c1_characters_become_the_punctuation_they_stood_for(tmp_path):
    rows = [(0, 0, "Richard\x92s Date", "joy", "It\x92s \x91Kay\x92\x85 so\x97no\x96yes"),
            (0, 1, "Ross", "neutral", "\x93Hi\x94\xa0there \x80 5"),
            (1, 0, "Monica", "anger", "plain text, é and ’ untouched")]
    write_meld_csv(tmp_path / "train_sent_emo.csv", rows)
    utterances = telme.read_meld_csv(tmp_path / "train_sent_emo.csv", tmp_path / "train_splits")
    assert [u.text for u in utterances] == ["It's 'Kay'... so-no-yes", '"Hi" there € 5',
                                            "plain text, é and ’ untouched"]
    assert utterances[0].speaker == "Richard's Date"
    assert not any(0x80 <= ord(c) < 0xa0 for u in utterances for c in u.text + u.speaker)


def meld_row(n, dialogue, utterance, emotion="joy"):
    return [n, "some words", "Ross", emotion, "positive", dialogue, utterance, 1, 1, "0", "1"]


@pytest.mark.parametrize("case, row, problem", [
    ("missing column", 1, "missing column(s) Emotion"),
    ("unknown label", 3, "unknown emotion 'happy'"),
    ("empty file", 1, "empty file"),
    ("header only", 2, "no utterances"),
    ("short row", 3, "fields"),
    ("dialogue not contiguous", 5, "rows of dialogue 0 are not contiguous"),
    ("unclosed quote", 4, "not a valid CSV row"),
])
def test_bad_meld_csv_is_one_line_naming_file_row_and_problem(tmp_path, case, row, problem):
    path = tmp_path / "train_sent_emo.csv"
    good = [meld_row(1, 0, 0), meld_row(2, 0, 1), meld_row(3, 1, 0)]
    if case == "missing column":
        header = [c for c in telme.MELD_COLUMNS if c != "Emotion"]
        write_rows(path, header, [r[:3] + r[4:] for r in good])
    elif case == "unknown label":
        write_rows(path, telme.MELD_COLUMNS, [good[0], meld_row(2, 0, 1, "happy"), good[2]])
    elif case == "empty file":
        path.write_text("")
    elif case == "header only":
        write_rows(path, telme.MELD_COLUMNS, [])
    elif case == "short row":
        write_rows(path, telme.MELD_COLUMNS, [good[0], good[1][:4], good[2]])
    elif case == "unclosed quote":  # the field runs on to the end of the file, past csv's size limit
        write_rows(path, telme.MELD_COLUMNS, good[:2])
        with open(path, "a") as f:
            f.write('3,"' + "x" * 200_000 + "\n")
    else:
        write_rows(path, telme.MELD_COLUMNS, good + [meld_row(4, 0, 2)])
    write_meld_csv(tmp_path / "dev_sent_emo.csv", FIXTURE_ROWS)
    with pytest.raises(telme.DataError) as error:
        telme.read_meld_csv(tmp_path / "train_sent_emo.csv", tmp_path / "train_splits")
    assert str(error.value).startswith(f"{path}:{row}: ") and problem in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(SystemExit) as stop:  # the command line's form of the same error
        telme.load_splits(telme.make_config("meld", data_dir=str(tmp_path)))
    assert str(stop.value) == f"telme: {error.value}"


# --------------------------------------------------------------------------------------------------
# 1. Data: IEMOCAP from its raw release tree and from the official split CSVs
# --------------------------------------------------------------------------------------------------
def write_iemocap_dialogue(root: Path, session: str, dialog: str, turns, divx="DivX", extra_lines=()):
    """turns: (turn suffix, start, end, label, text), written in the given order."""
    folder = root / session / "dialog"
    for sub in ("transcriptions", "EmoEvaluation", f"avi/{divx}"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "transcriptions" / f"{dialog}.txt").write_text("".join(
        f"{dialog}_{t} [{s:08.4f}-{e:08.4f}]: {text}\n" for t, s, e, _, text in turns) + "".join(extra_lines))
    (folder / "EmoEvaluation" / f"{dialog}.txt").write_text(
        "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n" + "".join(
            f"[{s:.4f} - {e:.4f}]\t{dialog}_{t}\t{label}\t[2.5000, 3.0000, 2.0000]\n"
            f"C-E1:\tNeutral;\t()\nA-E1:\tval 3; act 2; dom  2;\t()\n\n" for t, s, e, label, _ in turns))


@pytest.fixture
def iemocap_fixture(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    write_iemocap_dialogue(root, "Session1", "Ses01F_impro01", [
        ("F000", 6.2901, 8.2357, "neu", "Excuse me."),
        ("M000", 8.9, 10.1, "xxx", "Yeah?"),
        ("M001", 12.0, 14.5, "fru", "Do you have your forms?"),
        ("F001", 10.5, 11.75, "ang", "Is there a problem?"),  # out of time order in the file
    ], extra_lines=["Ses01F_impro01_MXX0 [015.0000-016.0000]: [BREATHING]\n", "M: noise\n"])
    write_iemocap_dialogue(root, "Session1", "Ses01M_impro01", [("M000", 1.0, 2.0, "sad", "Oh.")])  # dev
    write_iemocap_dialogue(root, "Session2", "Ses02F_script01", [("F000", 1.0, 2.0, "exc", "Yes!")], divx="Divx")
    write_iemocap_dialogue(root, "Session5", "Ses05M_impro03", [("F000", 3.0, 4.5, "hap", "Great.")])
    return root


def test_iemocap_raw_tree_gives_six_classes_speakers_windows_and_sessions(iemocap_fixture):
    root = iemocap_fixture
    splits = telme.load_splits(telme.make_config("iemocap", data_dir=str(root)))
    everything = {u.audio: u for utts in splits.values() for u in utts}
    wav = root / "Session1" / "sentences" / "wav" / "Ses01F_impro01"
    avi = str(root / "Session1" / "dialog" / "avi" / "DivX" / "Ses01F_impro01.avi")
    dialogue = [u for u in everything.values() if u.dialogue == "Ses01F_impro01"]
    expected = [("F000", "F", "Excuse me.", "neu", 6.2901, 8.2357),  # xxx turn M000 dropped
                ("F001", "F", "Is there a problem?", "ang", 10.5, 11.75),  # put back in time order
                ("M001", "M", "Do you have your forms?", "fru", 12.0, 14.5)]
    assert dialogue == [telme.Utterance("Ses01F_impro01", speaker, text, telme.EMOTIONS["iemocap"].index(label),
                                        avi, str(wav / f"Ses01F_impro01_{turn}.wav"), start, end)
                        for turn, speaker, text, label, start, end in expected]
    assert len(everything) == 6  # xxx, the unlabelled MXX0 turn and the noise line are not turns
    assert [u.dialogue for u in splits["test"]] == ["Ses05M_impro03"]
    assert splits["test"][0].label == telme.EMOTIONS["iemocap"].index("hap")
    assert splits["test"][0].speaker == "F"  # the turn's letter, not the session's (Ses05M)
    # Dialogues stay whole and in time order: the teacher's history is the turns before.
    for utts in splits.values():
        for group in telme.dialogues(utts):
            assert [u.start for u in group] == sorted(u.start for u in group)
    assert {u.dialogue for u in splits["dev"]} == {"Ses01M_impro01"}  # an official dev dialogue
    assert {u.dialogue for u in splits["train"]} == {"Ses01F_impro01", "Ses02F_script01"}
    (divx,) = [u for u in everything.values() if u.dialogue == "Ses02F_script01"]
    assert divx.video == str(root / "Session2" / "dialog" / "avi" / "Divx" / "Ses02F_script01.avi")


def test_iemocap_dev_is_the_official_twelve_dialogues(tmp_path):
    official = {"Ses01M_impro01", "Ses01M_script03_1", "Ses02F_impro02", "Ses02F_impro07",
                "Ses02M_script01_2", "Ses03F_impro01", "Ses03M_impro02", "Ses03M_impro08a",
                "Ses03M_script02_2", "Ses03M_script03_2", "Ses04F_impro07", "Ses04F_script02_1"}
    assert telme.IEMOCAP_DEV_DIALOGUES == official
    root = tmp_path / "IEMOCAP_full_release"
    others = ["Ses01F_impro01", "Ses02M_impro02", "Ses04M_script01_1"]
    for name in sorted(official) + others:
        write_iemocap_dialogue(root, f"Session{name[4]}", name, [("F000", 1.0, 2.0, "neu", "Hi.")])
    write_iemocap_dialogue(root, "Session5", "Ses05F_impro01", [("F000", 1.0, 2.0, "neu", "Hi.")])
    splits = telme.load_splits(telme.make_config("iemocap", data_dir=str(root)))
    assert [u.dialogue for u in splits["dev"]] == sorted(official)
    assert [u.dialogue for u in splits["train"]] == others
    # No official dev dialogue in the tree: a one-line error, not an empty dev split.
    for name in official:
        (root / f"Session{name[4]}" / "dialog" / "transcriptions" / f"{name}.txt").unlink()
    with pytest.raises(SystemExit, match="none of the official dev dialogues"):
        telme.load_splits(telme.make_config("iemocap", data_dir=str(root)))


def test_iemocap_unknown_label_names_file_and_line(iemocap_fixture):
    write_iemocap_dialogue(iemocap_fixture, "Session1", "Ses01F_impro01", [("F000", 1.0, 2.0, "angry", "No.")])
    with pytest.raises(SystemExit) as stop:
        telme.load_splits(telme.make_config("iemocap", data_dir=str(iemocap_fixture)))
    path = iemocap_fixture / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    assert str(stop.value) == f"telme: {path}:3: unknown emotion 'angry'"


def test_iemocap_labelled_turn_without_a_transcription_line_is_named(iemocap_fixture, capsys):
    transcript = iemocap_fixture / "Session1" / "dialog" / "transcriptions" / "Ses01F_impro01.txt"
    lines = transcript.read_text().splitlines(keepends=True)
    transcript.write_text("".join(line for line in lines if not line.startswith("Ses01F_impro01_M001")))
    splits = telme.load_splits(telme.make_config("iemocap", data_dir=str(iemocap_fixture)))
    assert sum(len(u) for u in splits.values()) == 5
    assert capsys.readouterr().err == (f"telme: {transcript}: no 'TURN [start-end]: text' line for 1 "
                                       f"labelled turn(s), left out: Ses01F_impro01_M001\n")


@pytest.fixture(scope="module")
def iemocap_synth(tmp_path_factory):
    return telme.synth(tmp_path_factory.mktemp("iemocap") / "IEMOCAP_full_release", "iemocap", dialogues=8, seed=1)


def test_synthetic_iemocap_tree_reads_back_as_written(iemocap_synth):
    root = iemocap_synth
    splits = telme.load_splits(telme.make_config("iemocap", data_dir=str(root)))
    # An independent reading of the text files: every turn's label and [start, end].
    written = {}
    for path in root.glob("Session*/dialog/EmoEvaluation/*.txt"):
        for line in path.read_text().splitlines():
            if line.startswith("["):
                times, turn, label = line.split("\t")[:3]
                written[turn] = (label, *map(float, times.strip("[]").split(" - ")))
    kept = {t: v for t, v in written.items() if v[0] in telme.EMOTIONS["iemocap"]}
    assert len(kept) < len(written)  # the synthetic tree has turns outside the six classes
    read = {Path(u.audio).stem: u for utts in splits.values() for u in utts}
    assert set(read) == set(kept)
    for turn, u in read.items():
        label, start, end = kept[turn]
        assert (telme.EMOTIONS["iemocap"][u.label], u.start, u.end) == (label, start, end)
        assert u.speaker == turn.split("_")[-1][0] and u.dialogue == turn.rsplit("_", 1)[0]
        assert Path(u.audio).is_file() and Path(u.video).is_file()
    development = sorted({u.dialogue for s in ("train", "dev") for u in splits[s]})
    assert {u.dialogue for u in splits["dev"]} == telme.IEMOCAP_DEV_DIALOGUES & set(development) != set()
    assert all(d.startswith("Ses05") for d in {u.dialogue for u in splits["test"]})
    assert not any(d.startswith("Ses05") for d in development)
    assert any("/Divx/" in u.video for u in read.values()) and any("/DivX/" in u.video for u in read.values())
    # Each turn's window of the dialogue video shows that turn (coloured), the gap after it grey.
    u = splits["test"][0]
    inside = telme.decode_frames(u.video, 8, 16, u.start, u.end).astype(float)
    gap = telme.decode_frames(u.video, 2, 16, u.end + 0.1, u.end + telme.SYNTH_TURN_GAP - 0.1).astype(float)
    assert np.abs(gap - 128).mean() < 4
    assert np.abs(inside[..., 0] - inside[..., 2]).mean() > 40  # red or blue, not grey
    waveform = telme.decode_audio(u.audio, 16000, 400000)
    assert abs(len(waveform) / 16000 - (u.end - u.start)) < 0.2


def test_official_split_csvs_give_the_same_utterances(iemocap_synth, tmp_path):
    root = iemocap_synth
    raw = telme.load_splits(telme.make_config("iemocap", data_dir=str(root)))
    # The CSVs live beside the tree here (a copy of the folder's layout, linked), the paths written
    # as the official code has them and the video folder always spelled DivX.
    data = tmp_path / "IEMOCAP_full_release"
    data.mkdir()
    for session in root.iterdir():
        (data / session.name).symlink_to(session)
    for split, utts in raw.items():
        rows = [[u.text, Path(u.audio).stem, u.dialogue, u.start, u.end,
                 "./dataset/IEMOCAP_full_release/" + str(Path(u.audio).relative_to(root)),
                 "./dataset/IEMOCAP_full_release/" + str(Path(u.video).relative_to(root)).replace("Divx", "DivX"),
                 telme.EMOTIONS["iemocap"][u.label]] for u in utts]
        write_rows(data / f"IEMOCAP_{split}.csv", telme.IEMOCAP_COLUMNS, rows)
    official = telme.load_splits(telme.make_config("iemocap", data_dir=str(data)))
    relocated = {split: [telme.dataclasses.replace(u, audio=u.audio.replace(str(root), str(data)),
                                                   video=u.video.replace(str(root), str(data)))
                         for u in utts] for split, utts in raw.items()}
    assert official == relocated
    (data / "IEMOCAP_dev.csv").unlink()  # the best epoch is chosen on dev: required, as train's
    with pytest.raises(SystemExit, match="IEMOCAP_dev.csv not found"):
        telme.load_splits(telme.make_config("iemocap", data_dir=str(data)))


def test_iemocap_synth_then_train_runs_end_to_end(iemocap_synth, tmp_path, tiny_models):
    cfg = tiny_config("iemocap", iemocap_synth, tmp_path, tiny_models)
    metrics = telme.train(cfg)
    assert list(metrics) == ["teacher", "audio", "visual", "fusion"]
    assert set(metrics["fusion"]["per_class"]["test"]) == set(telme.EMOTIONS["iemocap"])


# --------------------------------------------------------------------------------------------------
# 1. Data: teacher input
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def meld_fixture(tmp_path):
    for csv_name, _ in telme.MELD_SPLITS.values():
        write_meld_csv(tmp_path / csv_name, FIXTURE_ROWS)
    return tmp_path


def test_speaker_indices_by_first_appearance_capped_at_nine():
    assert telme.speaker_indices(["b", "a", "b", "c", "a"]) == [0, 1, 0, 2, 1]
    assert telme.speaker_indices([str(i) for i in range(12)])[-3:] == [8, 8, 8]


@pytest.mark.parametrize("make_tokenizer", [bert_style_tokenizer, roberta_style_tokenizer])
def test_teacher_input_prompt_truncation_and_left_padding(meld_fixture, make_tokenizer):
    utterances = telme.read_meld_csv(meld_fixture / "train_sent_emo.csv", meld_fixture / "train_splits")
    tokenizer = make_tokenizer()
    telme.add_speaker_tokens(tokenizer)
    ids = telme.teacher_input_ids(utterances, tokenizer, max_tokens=512)
    text = [tokenizer.decode(i) for i in ids]
    # Third utterance of dialogue 0: Ross is <s1> (first to speak), Rachel <s2>.
    tokens = tokenizer.convert_ids_to_tokens(ids[2])
    assert [t for t in tokens if t in telme.SPEAKER_TOKENS] == ["<s1>", "<s2>", "<s1>", "<s1>"]
    assert tokens[-1] == tokenizer.mask_token and tokens.count(tokenizer.sep_token) == 1
    assert "feels" in text[2] and "go away" in text[2] and "hello" in text[2]
    # A new dialogue starts its own speaker list: Monica is <s1>, not an index from dialogue 0.
    assert tokenizer.convert_ids_to_tokens(ids[3])[0] == "<s1>"
    assert "hello" not in text[3]
    # Truncation keeps the last tokens and the mask.
    short = telme.teacher_input_ids(utterances, tokenizer, max_tokens=6)
    assert all(len(s) <= 6 for s in short)
    assert short[2] == ids[2][-6:-1] + [tokenizer.mask_token_id]
    # Left padding: the mask is the last position of every row.
    batch = telme.Collate(pad_id=tokenizer.pad_token_id)(
        [{"index": i, "label": 0, "input_ids": s} for i, s in enumerate(ids)])
    assert torch.all(batch["input_ids"][:, -1] == tokenizer.mask_token_id)
    assert torch.all(batch["attention_mask"].sum(1) == torch.tensor([len(s) for s in ids]))
    shortest = min(range(len(ids)), key=lambda i: len(ids[i]))
    assert batch["input_ids"][shortest, 0] == tokenizer.pad_token_id


def byte_level_bpe_tokenizer():
    """A RoBERTa-style (byte-level BPE) tokenizer trained offline, whole words in its vocabulary."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Oh my God!", "Yes", "feels", "Now feels", "Yes Now"] * 5, vocab_size=300,
                            min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                     sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                     pad_token="<pad>", mask_token="<mask>")
    telme.add_speaker_tokens(tokenizer)
    return tokenizer


def test_teacher_ids_drop_the_spaces_beside_speaker_tokens_as_the_paper_teacher_read_them():
    tokenizer = byte_level_bpe_tokenizer()
    prompt = "<s1> Oh my God! <s2> Yes </s> Now <s2> feels"
    expected = ["<s1>", "Oh", "Ġmy", "ĠGod", "!", "<s2>", "Yes", "Ġ", "</s>", "ĠNow", "<s2>", "feels"]
    assert tokenizer.convert_ids_to_tokens(telme.prompt_token_ids(prompt, tokenizer)) == expected
    # The tokenizer on the whole string keeps a space token before every later speaker token.
    whole = tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert whole != expected and whole.count("Ġ") > expected.count("Ġ")
    # The same through teacher_input_ids, then truncated to the last tokens and the mask.
    said = [("Ross", "Oh my God!"), ("Rachel", "Yes")]
    utterances = [telme.Utterance("0", who, text, 0, "", "") for who, text in said]
    full, short = (telme.teacher_input_ids(utterances, tokenizer, n)[-1] for n in (512, 5))
    assert tokenizer.convert_ids_to_tokens(full) == expected + ["<mask>"]
    assert tokenizer.convert_ids_to_tokens(short) == ["</s>", "ĠNow", "<s2>", "feels", "<mask>"]


def test_teacher_ids_of_a_wordpiece_tokenizer_are_those_of_the_whole_prompt(meld_fixture):
    utterances = telme.read_meld_csv(meld_fixture / "train_sent_emo.csv", meld_fixture / "train_splits")
    for tokenizer in (bert_style_tokenizer(), bert_wordpiece_tokenizer()):
        telme.add_speaker_tokens(tokenizer)
        ids = telme.teacher_input_ids(utterances, tokenizer, 512)
        speakers = ["<s1>", "<s2>", "<s1>", "<s1>", "<s2>"]
        for k, u in enumerate(utterances):
            first = 0 if k < 3 else 3
            history = " ".join(f"{s} {v.text}" for s, v in zip(speakers[first:k + 1], utterances[first:k + 1]))
            whole = tokenizer(f"{history} {tokenizer.sep_token} Now {speakers[k]} feels",
                              add_special_tokens=False)["input_ids"]
            assert ids[k] == whole + [tokenizer.mask_token_id]


def bert_wordpiece_tokenizer():
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator([r[4] for r in FIXTURE_ROWS] + ["Now feels"], vocab_size=200, min_frequency=1)
    return BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")


# --------------------------------------------------------------------------------------------------
# 1. Data: media decoding; faulty media -> a reason, a log line, a count, zeros in its place
# --------------------------------------------------------------------------------------------------
def test_audio_resampled_to_16k_mono_with_the_right_length_and_pitch(tmp_path):
    rate, seconds = 22050, 1.5
    t = np.arange(int(rate * seconds)) / rate
    left, right = (0.5 * np.sin(2 * np.pi * pitch * t) for pitch in (1000, 3000))
    write_wav(tmp_path / "tone.wav", np.stack([left, right]), rate)
    waveform = telme.decode_audio(str(tmp_path / "tone.wav"), 16000, 400000)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert len(waveform) == 24000
    # Mono is the channels' mean: each tone at half its amplitude, at its own pitch.
    amplitude = 2 * np.abs(np.fft.rfft(waveform)) / len(waveform)  # bin k: k * 16000 / 24000 Hz
    assert sorted(np.argsort(amplitude)[-2:] * 16000 / len(waveform)) == [1000, 3000]
    assert np.allclose(amplitude[[1500, 4500]], 0.25, atol=0.01)
    # Only the last max_samples are kept.
    tail = telme.decode_audio(str(tmp_path / "tone.wav"), 16000, 1000)
    assert np.allclose(tail, waveform[-1000:], atol=1e-6)


def test_frames_are_rgb_in_order_and_uniformly_spaced(tmp_path):
    count, fps = 40, 10
    frames = np.zeros((count, 48, 64, 3), np.uint8)
    for k in range(count):
        frames[k, :, :, 0] = 6 * k  # red encodes the frame index
        frames[k, :, :, 1] = 255 - 6 * k
        frames[k, :, :, 2] = 30
    telme.write_clip(tmp_path / "ramp.mp4", frames, fps)
    out = telme.decode_frames(str(tmp_path / "ramp.mp4"), 8, 16)
    assert out.shape == (8, 16, 16, 3) and out.dtype == np.uint8
    red = out[..., 0].reshape(8, -1).mean(1)
    recovered = np.round(red / 6).astype(int)
    expected = [int((i + 0.5) * count / 8) for i in range(8)]  # centre of each of 8 segments
    assert np.all(np.abs(recovered - expected) <= 0), (recovered, expected)
    assert np.all(out[..., 2].mean() < 60)  # blue stays low: channels are RGB, not BGR
    assert np.all(np.diff(out[..., 1].reshape(8, -1).mean(1)) < 0)


def test_resize_keeps_aspect_then_centre_crops(tmp_path):
    frames = np.zeros((4, 40, 80, 3), np.uint8)
    frames[:, :, :20] = 255  # white left quarter; the centre crop must cut it away
    telme.write_clip(tmp_path / "wide.mp4", frames, 4)
    out = telme.decode_frames(str(tmp_path / "wide.mp4"), 2, 20)
    assert out.shape == (2, 20, 20, 3)
    assert out.mean() < 20


def coloured_frames(count, colour=(200, 40, 40)):
    return np.broadcast_to(np.array(colour, np.uint8), (count, 48, 64, 3)).copy()


def write_fault(path: Path, fault: str):
    """A clip of 1.5 s (12 frames at 8 fps, stereo 48 kHz) damaged as `fault` says."""
    if fault == "missing file":
        return
    if fault == "a directory":
        path.mkdir(parents=True)
        return
    if fault == "zero-byte file":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return
    audio = {"no audio stream": None, "6-channel 48 kHz": tone(1.5, 48000, 6),
             "silent audio": np.zeros((2, 72000), np.float32)}.get(fault, tone(1.5, 48000, 2))
    telme.write_clip(path, coloured_frames(12), 8, audio, 48000)
    if fault == "truncated mp4":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("fault, audio_reason, video_reason", [
    ("truncated mp4", "cannot decode", "cannot decode"),
    ("zero-byte file", "empty file (0 bytes)", "empty file (0 bytes)"),
    ("missing file", "file not found", "file not found"),
    ("a directory", "is a directory", "is a directory"),
    ("no audio stream", "no audio stream", None),
    ("silent audio", "audio is silent", None),
])
def test_each_media_fault_gives_its_reason(tmp_path, fault, audio_reason, video_reason):
    path = tmp_path / "clip.mp4"
    write_fault(path, fault)
    with pytest.raises(telme.MediaError, match=audio_reason.replace("(", r"\(").replace(")", r"\)")):
        telme.decode_audio(str(path), 16000, 400000)
    if video_reason is None:
        assert telme.decode_frames(str(path), 8, 16).shape == (8, 16, 16, 3)
    else:
        with pytest.raises(telme.MediaError) as error:
            telme.decode_frames(str(path), 8, 16)
        assert str(error.value).startswith(video_reason)


def test_six_channel_48k_audio_is_mixed_down_to_16k_mono(tmp_path):
    write_fault(tmp_path / "surround.mp4", "6-channel 48 kHz")
    waveform = telme.decode_audio(str(tmp_path / "surround.mp4"), 16000, 400000)
    assert waveform.ndim == 1 and abs(len(waveform) - 24000) <= 1024 // 3  # AAC pads its last frame
    spectrum = np.abs(np.fft.rfft(waveform))
    assert abs(np.argmax(spectrum) * 16000 / len(waveform) - 1000) < 2


class CountingContainer:
    """An opened media file that counts the frames decoded from each kind of stream."""

    def __init__(self, container, counts):
        self.container, self.counts = container, counts

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.container.close()

    def __getattr__(self, name):
        return getattr(self.container, name)

    def decode(self, stream):
        for frame in self.container.decode(stream):
            self.counts[stream.type] += 1
            yield frame


def test_a_forty_second_clip_decodes_only_what_is_used(tmp_path, monkeypatch):
    count, fps = 404, 10  # 40.4 s: the 8 segment centres fall inside frames, not on their edges
    expected = [int((i + 0.5) * count / 8) for i in range(8)]
    telme.write_clip(tmp_path / "long.mp4", index_frames(count), fps, tone(40.4, 48000, 2, 440.0), 48000)
    telme.write_clip(tmp_path / "long.avi", index_frames(count), fps)  # DivX: a keyframe every 12 frames
    whole = telme.decode_audio(str(tmp_path / "long.mp4"), 16000, 10 ** 9)  # reference: everything
    counts = {"audio": 0, "video": 0}
    real_open = telme.av.open
    monkeypatch.setattr(telme.av, "open", lambda path: CountingContainer(real_open(path), counts))
    tail = telme.decode_audio(str(tmp_path / "long.mp4"), 16000, 400000)
    assert len(tail) == 400000 and np.allclose(tail, whole[-400000:], atol=1e-4)
    aac_frames = 40.4 * 48000 / 1024
    assert counts["audio"] < 0.7 * aac_frames  # 25 s kept + the seek margin, not 40 s
    for clip in ("long.mp4", "long.avi"):
        frames = telme.decode_frames(str(tmp_path / clip), 8, 16)
        assert list(shown_indices(frames)) == expected, clip
    # With a keyframe every 12 frames each target costs at most 12 frames, not the whole clip.
    counts["video"] = 0
    telme.decode_frames(str(tmp_path / "long.avi"), 8, 16)
    assert counts["video"] <= 8 * 12 < count


def test_a_window_of_a_dialogue_video_is_reached_by_seeking(tmp_path, monkeypatch):
    count, fps = 400, 10
    telme.write_clip(tmp_path / "dialogue.avi", index_frames(count), fps)
    counts = {"audio": 0, "video": 0}
    real_open = telme.av.open
    monkeypatch.setattr(telme.av, "open", lambda path: CountingContainer(real_open(path), counts))
    start, end = 30.05, 33.25  # frames 300..332
    frames = telme.decode_frames(str(tmp_path / "dialogue.avi"), 8, 16, start, end)
    expected = [int((start + (i + 0.5) * (end - start) / 8) * fps) for i in range(8)]
    assert list(shown_indices(frames)) == expected
    assert counts["video"] <= (end - start) * fps + 12  # the window and one keyframe interval


MELD_FAULTS = ["good", "truncated mp4", "zero-byte file", "missing file", "no audio stream", "6-channel 48 kHz"]


@pytest.fixture
def faulty_meld(tmp_path):
    data = tmp_path / "MELD.Raw"
    rows = [(0, u, "Ross" if u % 2 else "Rachel", telme.EMOTIONS["meld"][u], "okay so") for u in range(6)]
    for split in ("train", "dev"):
        csv_name, clip_dir = telme.MELD_SPLITS[split]
        data.mkdir(exist_ok=True)
        write_meld_csv(data / csv_name, rows)
        for u, fault in enumerate(MELD_FAULTS):
            write_fault(data / clip_dir / f"dia0_utt{u}.mp4", fault)
    return data


def test_media_faults_are_logged_counted_and_become_zeros(tmp_path, faulty_meld, capsys):
    cfg = telme.make_config("meld", data_dir=str(faulty_meld), cache_dir=str(tmp_path / "cache"),
                            workers=1, quiet=True)
    splits = telme.load_splits(cfg)
    for attempt in ("decoding", "cached"):  # faults found earlier are reported again
        media = telme.prepare_media(cfg, splits)
        lines = capsys.readouterr().out.splitlines()
        faults = [line for line in lines if line.startswith("media fault: ")]
        assert len(faults) == 2 * 4, attempt  # one line per faulty utterance, both splits
        for u in range(1, 5):  # the four faulty clips of MELD_FAULTS[1:5]
            line = [f for f in faults if f"train_splits/dia0_utt{u}.mp4: " in f]
            assert len(line) == 1
        assert "file not found (audio and video replaced by zeros)" in "\n".join(faults)
        assert "no audio stream (audio replaced by zeros)" in "\n".join(faults)
        assert "14 faults (audio 8, video 6)" in lines[-1]
    batch = telme.make_collate(cfg)([telme.UtteranceDataset(splits["train"], media=media,
                                                            kinds=("audio", "video"))[i] for i in range(6)])
    assert batch["audio"][1:5].abs().sum() == 0 and batch["audio"][[0, 5]].abs().sum() > 0
    assert batch["video"][1:4].abs().sum() == 0 and batch["video"][[0, 4, 5]].abs().sum() > 0


def test_strict_stops_before_training(tmp_path, faulty_meld, tiny_models, capsys):
    args = ["--dataset", "meld", "--data-dir", str(faulty_meld), "--cache-dir", str(tmp_path / "cache"),
            "--workers", "1", "--quiet", "--strict"]
    models = ["--audio-model", tiny_models["audio"], "--video-model", tiny_models["video"]]
    with pytest.raises(SystemExit) as stop:
        telme.main(["train", *args, *models, "--text-model", tiny_models["text"], "--out", str(tmp_path / "run")])
    assert "14 media faults" in str(stop.value) and "--strict" in str(stop.value)
    assert not (tmp_path / "run").exists()  # nothing written: the media are checked first
    with pytest.raises(SystemExit):
        telme.main(["prepare", *args])


def test_training_with_faulty_media_scores_every_utterance(tmp_path, faulty_meld, tiny_models):
    cfg = tiny_config("meld", faulty_meld, tmp_path, tiny_models, batch_size=3)
    metrics = telme.train(cfg)
    assert list(metrics) == ["teacher", "audio", "visual", "fusion"]
    splits = telme.load_splits(cfg)
    for phase in telme.PHASES:  # the dev utterances with faulty clips are scored too, with zeros
        assert list(metrics[phase]["per_class"]) == ["dev"]  # this dataset has no test split
        support = sum(c["support"] for c in metrics[phase]["per_class"]["dev"].values())
        assert support == len(splits["dev"]), phase


# --------------------------------------------------------------------------------------------------
# 1. Data: media cache: decode once, resume, invalidate one entry, identical to decoding on the fly
# --------------------------------------------------------------------------------------------------
def tiny_clips(folder: Path, count: int, seed: int = 0) -> list:
    """`count` one-second clips (64x48 video, 48 kHz stereo audio), one utterance each."""
    rng = np.random.default_rng(seed)
    utterances = []
    for i in range(count):
        frames = rng.integers(0, 256, (8, 48, 64, 3), dtype=np.uint8)
        tone = np.sin(2 * np.pi * rng.uniform(200, 2000) * np.arange(48000) / 48000)
        path = folder / f"dia{i}_utt0.mp4"
        telme.write_clip(path, frames, 8, np.stack([tone, tone]).astype(np.float32))
        utterances.append(telme.Utterance(str(i), "A", "", 0, str(path), str(path)))
    return utterances


def cache_files(root: Path) -> dict:
    """Every file under the cache (temporaries included), relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_changed_clip_or_setting_invalidates_only_its_own_entries(tmp_path):
    utterances = tiny_clips(tmp_path / "clips", 3)
    cfg = telme.make_config("meld", cache_dir=str(tmp_path / "cache"), image_size=16, num_frames=4)
    media = telme.MediaCache(cfg)
    assert media.prepare(utterances, workers=1, quiet=True)["decoded"] == 6
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")}
    old_frames = np.array(media.load("video", utterances[1]))
    # Clip 1 is rewritten (new content, new size and mtime); clips 0 and 2 are untouched.
    replacement = tiny_clips(tmp_path / "other", 2, seed=7)[1]
    Path(utterances[1].video).write_bytes(Path(replacement.video).read_bytes())
    jobs = media.missing_jobs(utterances)
    assert [[(kind, path) for kind, path, *_ in job] for job in jobs] == [
        [("audio", utterances[1].audio), ("video", utterances[1].video)]]
    counts = media.prepare(utterances, workers=1, quiet=True)
    assert (counts["cached"], counts["decoded"], counts["clips"]) == (4, 2, 1)
    for path, mtime in before.items():  # nothing already cached was written again
        assert path.stat().st_mtime_ns == mtime
    assert not np.array_equal(media.load("video", utterances[1]), old_frames)
    # A changed decoding setting re-decodes the entries it concerns, here the video ones only.
    fewer_frames = telme.MediaCache(telme.make_config("meld", cache_dir=cfg.cache_dir, image_size=16,
                                                      num_frames=2))
    assert [[kind for kind, *_ in job] for job in fewer_frames.missing_jobs(utterances)] == [["video"]] * 3


def test_cached_reads_are_memory_mapped_equal_the_decoder_and_open_no_media(tmp_path, monkeypatch):
    utterances = tiny_clips(tmp_path / "clips", 2)
    cfg = telme.make_config("meld", cache_dir=str(tmp_path / "cache"), image_size=16, num_frames=4)
    media = telme.MediaCache(cfg)
    media.prepare(utterances, workers=1, quiet=True)
    expected = {(kind, i): telme.decode_media(kind, u.video, None, None, media.settings[kind])
                for kind in ("audio", "video") for i, u in enumerate(utterances)}

    def refuse(*args, **kwargs):
        raise AssertionError(f"a cached read opened {args[0]}")

    monkeypatch.setattr(telme.av, "open", refuse)
    dataset = telme.UtteranceDataset(utterances, media=media, kinds=("audio", "video"))
    for i in range(len(dataset)):
        item = dataset[i]
        for kind in ("audio", "video"):
            assert isinstance(item[kind], np.memmap)
            assert item[kind].dtype == expected[kind, i].dtype
            assert np.array_equal(item[kind], expected[kind, i])
    assert expected["audio", 0].dtype == np.float16 and expected["video", 0].shape == (4, 16, 16, 3)
    batch = telme.Collate(num_frames=4, image_size=16)([dataset[0], dataset[1]])
    assert batch["video"].shape == (2, 4, 3, 16, 16) and batch["audio"].abs().sum(1).min() > 0


KILLED_PREPARE = """
import json, os, signal, sys
import numpy
import telme
real_save, calls = numpy.save, []
def save(f, array):  # the fourth entry: half written, then the process is killed
    calls.append(1)
    if len(calls) == 4:
        f.write(b"\\x93NUMPY partial")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(f, array)
numpy.save = save
paths, cache_dir = json.loads(sys.argv[1]), sys.argv[2]
utterances = [telme.Utterance(str(i), "A", "", 0, p, p) for i, p in enumerate(paths)]
telme.MediaCache(telme.make_config("meld", cache_dir=cache_dir, image_size=16, num_frames=4)).prepare(
    utterances, workers=1, quiet=True)
"""


def test_a_prepare_killed_part_way_resumes_to_the_same_cache(tmp_path):
    import os
    import subprocess
    import sys
    utterances = tiny_clips(tmp_path / "clips", 4)
    settings = dict(image_size=16, num_frames=4)
    reference = tmp_path / "reference"
    telme.MediaCache(telme.make_config("meld", cache_dir=str(reference), **settings)).prepare(
        utterances, workers=1, quiet=True)
    cache = tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", KILLED_PREPARE, json.dumps([u.video for u in utterances]),
                             str(cache)], cwd=Path(telme.__file__).parent, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    left = cache_files(cache)
    temporaries = [p for p in cache.rglob(".*") if p.is_file()]
    assert len([p for p in left if p.endswith(".npy")]) == 3 and len(temporaries) == 1
    # The half-written entry is not taken for an entry; it is swept once stale.
    stale = os.stat(temporaries[0]).st_mtime - telme.STALE_TEMPORARY_SECONDS - 1
    os.utime(temporaries[0], (stale, stale))
    counts = telme.MediaCache(telme.make_config("meld", cache_dir=str(cache), **settings)).prepare(
        utterances, workers=1, quiet=True)
    assert (counts["cached"], counts["decoded"]) == (3, 5)
    assert cache_files(cache) == cache_files(reference)


def test_cached_and_uncached_runs_give_identical_metrics(tmp_path, monkeypatch, tiny_models):
    """One epoch per phase on a tiny synthetic set: once through the media cache, once decoding
    every clip each time it is read (nothing written to disk); the metrics must be identical."""
    data = telme.synth(tmp_path / "data", dialogues=2, seed=1)

    def run(name):
        cfg = tiny_config("meld", data, tmp_path, tiny_models, max_audio_samples=16000)
        return telme.train(dataclasses.replace(cfg, out=str(tmp_path / name),
                                               cache_dir=str(tmp_path / f"cache-{name}")))

    cached = run("cached")
    assert any((tmp_path / "cache-cached").rglob("*.npy"))

    def decode_on_the_fly(self, kind, u):
        path, start, end = (u.audio, None, None) if kind == "audio" else (u.video, u.start, u.end)
        return telme.decode_media(kind, path, start, end, self.settings[kind])

    monkeypatch.setattr(telme.MediaCache, "prepare", lambda self, *args, **kwargs: dict(
        cached=0, decoded=0, clips=0, workers=0, seconds=0.0))
    monkeypatch.setattr(telme.MediaCache, "load", decode_on_the_fly)
    uncached = run("uncached")
    assert not (tmp_path / "cache-uncached").exists()
    assert list(cached) == list(telme.PHASES)
    assert uncached == cached


# --------------------------------------------------------------------------------------------------
# 2. Encoders
# --------------------------------------------------------------------------------------------------
def test_teacher_pools_the_mask_position():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32))
    teacher = telme.TextTeacher(encoder, 7, 12).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    feature, logits = teacher(ids, mask)
    assert feature.shape == (2, 12) and logits.shape == (2, 7)
    # A left-padded prompt gives the same feature as the same prompt alone (positions skip the pads).
    alone, _ = teacher(ids[:1, 2:], mask[:1, 2:])
    assert torch.allclose(feature[:1], alone, atol=1e-5)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = encoder(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    assert torch.allclose(feature, teacher.project(hidden[:, -1]), atol=1e-6)


def test_roberta_teacher_left_padding_matches_unpadded():
    from transformers import RobertaConfig, RobertaModel
    torch.manual_seed(0)
    encoder = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, pad_token_id=1,
                                         num_attention_heads=2, intermediate_size=32))
    teacher = telme.TextTeacher(encoder, 7, 12).eval()
    assert not teacher.explicit_positions  # RoBERTa derives positions from its padding itself
    ids = torch.tensor([[1, 1, 5, 6, 7], [8, 9, 10, 11, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    feature, _ = teacher(ids, mask)
    assert torch.allclose(feature[:1], teacher(ids[:1, 2:], mask[:1, 2:])[0], atol=1e-5)


def test_image_statistics_come_from_the_saved_image_processor(tmp_path, tiny_models):
    assert telme.image_statistics(tiny_models["video"]) == tuple(map(list, telme.TIMESFORMER_IMAGE_STATS))
    encoder = telme.AutoModel.from_config(telme.AutoConfig.from_pretrained(tiny_models["video"]))
    stats = ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    telme.save_encoder_config(tmp_path, "video", encoder, stats)  # a run's copy, read back by eval
    assert telme.image_statistics(str(telme.encoder_dir(tmp_path, "video"))) == stats


# --------------------------------------------------------------------------------------------------
# 3. Distillation losses, against an independent derivation
# --------------------------------------------------------------------------------------------------
def reference_dist_loss(z_s, z_t, tau):
    """DIST re-derived with torch.corrcoef, one correlation at a time."""
    p_s, p_t = F.softmax(z_s / tau, -1), F.softmax(z_t / tau, -1)
    inter = [torch.corrcoef(torch.stack([p_s[i], p_t[i]]))[0, 1] for i in range(len(p_s))]
    intra = [torch.corrcoef(torch.stack([p_s[:, c], p_t[:, c]]))[0, 1] for c in range(p_s.shape[1])]
    return tau ** 2 * ((1 - torch.stack(inter).mean()) + (1 - torch.stack(intra).mean()))


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_dist_loss_matches_corrcoef_derivation(tau):
    torch.manual_seed(0)
    z_s, z_t = torch.randn(6, 7), torch.randn(6, 7)
    assert torch.allclose(telme.dist_loss(z_s, z_t, tau), reference_dist_loss(z_s, z_t, tau), atol=1e-5)


def test_dist_loss_is_zero_for_identical_logits_and_scales_with_tau_squared():
    torch.manual_seed(1)
    z = torch.randn(5, 7)
    assert telme.dist_loss(z, z.clone(), 4.0).abs() < 1e-5
    z_s, z_t = torch.randn(5, 7), torch.randn(5, 7)
    # The same correlation terms (logits pre-scaled so softmax sees the same input) times tau^2.
    assert torch.allclose(telme.dist_loss(2 * z_s, 2 * z_t, 2.0), 4 * telme.dist_loss(z_s, z_t, 1.0), atol=1e-5)


def reference_feature_kd(f_t, f_s, t=1.0):
    """KL(P||Q) written out as sums over explicit probabilities."""
    f_t, f_s = f_t / f_t.norm(dim=1, keepdim=True), f_s / f_s.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(len(f_t)):
        p = torch.exp(f_t[i] @ f_t.T / t) / torch.exp(f_t[i] @ f_t.T / t).sum()
        q = torch.exp(f_t[i] @ f_s.T / t) / torch.exp(f_t[i] @ f_s.T / t).sum()
        total += (p * (p.log() - q.log())).sum()
    return total / len(f_t)


@pytest.mark.parametrize("t", [1.0, 0.5])
def test_feature_kd_loss_matches_explicit_kl(t):
    torch.manual_seed(2)
    f_t, f_s = torch.randn(5, 16), torch.randn(5, 16)
    assert torch.allclose(telme.feature_kd_loss(f_t, f_s, t), reference_feature_kd(f_t, f_s, t), atol=1e-5)
    assert telme.feature_kd_loss(f_t, f_t.clone(), t).abs() < 1e-6
    assert telme.feature_kd_loss(f_t, f_s, t) > 1e-3


def test_student_loss_is_cross_entropy_plus_the_weighted_distillation_terms():
    """L = CE + alpha L_resp + beta L_feat from the derivations above, with alpha, beta and both
    temperatures away from 1 so that a dropped or swapped weight or temperature shows."""
    torch.manual_seed(4)
    z_s, z_t, f_s, f_t = torch.randn(6, 7), torch.randn(6, 7), torch.randn(6, 16), torch.randn(6, 16)
    y = torch.tensor([0, 3, 6, 2, 2, 5])
    cfg = telme.make_config("meld", alpha=0.3, beta=2.5, tau=3.0, kd_temperature=0.5)
    cross_entropy = -torch.log_softmax(z_s, -1)[torch.arange(6), y].mean()
    expected = cross_entropy + 0.3 * reference_dist_loss(z_s, z_t, 3.0) + 2.5 * reference_feature_kd(f_t, f_s, 0.5)
    assert torch.allclose(telme.student_loss(z_s, f_s, z_t, f_t, y, cfg), expected, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 4. Shifting fusion
# --------------------------------------------------------------------------------------------------
def fusion_inputs(batch=6, dim=24):
    torch.manual_seed(3)
    return torch.randn(batch, dim), torch.randn(batch, dim), torch.randn(batch, dim)


@pytest.mark.parametrize("attention", ["modality", "batch"])
def test_fusion_shapes_and_bounded_shift(attention):
    f_t, f_a, f_v = fusion_inputs()
    fusion = telme.ShiftingFusion(24, 7, heads=3, dropout=0.2, theta=0.1, attention=attention).eval()
    assert fusion(f_t, f_a, f_v).shape == (6, 7)
    lam, h = fusion.displacement(f_t, f_a, f_v)
    assert lam.shape == (6,) and h.shape == (6, 24)
    assert torch.all(lam * h.norm(dim=-1) <= 0.1 * f_t.norm(dim=-1) + 1e-6)


@pytest.mark.parametrize("theta, shift_bounded", [(0.1, True), (100.0, False)])
def test_fusion_follows_the_asf_steps_of_the_paper(theta, shift_bounded):
    """ASF (paper, section 3.4) re-derived from the module's weights without its forward:
    attention over the two tokens [F_A, F_V] of each utterance, A, g, H, lambda, Z and the logits."""
    f_t, f_a, f_v = fusion_inputs()
    batch, dim, heads = 6, 24, 3
    m = telme.ShiftingFusion(dim, 7, heads=heads, dropout=0.2, theta=theta).eval()
    tokens = torch.stack([f_a, f_v], dim=1)  # (B, 2, D)
    (w_q, w_k, w_v), (b_q, b_k, b_v) = m.attention.in_proj_weight.split(dim), m.attention.in_proj_bias.split(dim)
    q, k, v = ((tokens @ w.T + b).view(batch, 2, heads, dim // heads).transpose(1, 2)
               for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))  # (B, heads, 2, D/heads)
    mixed = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1) @ v
    attended = mixed.transpose(1, 2).reshape(batch, 2, dim) @ m.attention.out_proj.weight.T + m.attention.out_proj.bias
    n = torch.cat([f_a, f_v], dim=-1)
    a = F.layer_norm(attended.reshape(batch, 2 * dim) + n, (2 * dim,), m.student_norm.weight, m.student_norm.bias)
    g = torch.relu(torch.cat([a, f_t], dim=-1) @ m.gate.weight.T + m.gate.bias)
    h = g * (a @ m.shift.weight.T + m.shift.bias)
    lam = torch.clamp(theta * f_t.norm(dim=-1) / (h.norm(dim=-1) + 1e-6), max=1.0)
    assert bool((lam < 1).all()) == shift_bounded and bool((lam == 1).all()) != shift_bounded
    z = F.layer_norm(f_t + lam[:, None] * h, (dim,), m.output_norm.weight, m.output_norm.bias)
    assert torch.allclose(m(f_t, f_a, f_v), z @ m.classifier.weight.T + m.classifier.bias, atol=1e-5)


def test_fusion_modality_attention_is_per_sample_and_batch_attention_is_not():
    f_t, f_a, f_v = fusion_inputs()
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    others = [torch.randn_like(x) for x in (f_t, f_a, f_v)]  # new batch mates for sample 0
    mates = [torch.cat([x[:1], y[1:]]) for x, y in zip((f_t, f_a, f_v), others)]
    per_sample = telme.ShiftingFusion(24, 7, 3, 0.2, 0.1, "modality").eval()
    out = per_sample(f_t, f_a, f_v)
    assert torch.allclose(per_sample(f_t[order], f_a[order], f_v[order]), out[order], atol=1e-5)
    assert torch.allclose(per_sample(*mates)[0], out[0], atol=1e-6)
    # D2: the official 2-D input makes the batch one attention sequence. Attention without
    # positions is permutation-equivariant, so what betrays it is that a sample's output
    # depends on which samples share its batch.
    across_batch = telme.ShiftingFusion(24, 7, 3, 0.2, 0.1, "batch").eval()
    out = across_batch(f_t, f_a, f_v)
    assert not torch.allclose(across_batch(*mates)[0], out[0], atol=1e-4)
    assert not torch.allclose(across_batch(f_t[:1], f_a[:1], f_v[:1])[0], out[0], atol=1e-4)


# --------------------------------------------------------------------------------------------------
# 5. Training: runtime, fit, the phases, the run directory
# --------------------------------------------------------------------------------------------------
def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(telme, "PROGRESS_SECONDS", 0)
    assert list(telme.progress(range(3), "teacher 1/10", quiet=False)) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines()[-1].startswith("teacher 1/10: batch 3/3, ")
    assert list(telme.progress(range(3), "teacher 1/10", quiet=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_forward_only_batches_are_larger_only_where_batch_mates_cannot_change_an_output():
    cfg = telme.make_config("meld", batch_size=4, eval_batch_size=16)
    text, audio = telme.UtteranceDataset([], text_ids=[]), telme.UtteranceDataset([], kinds=("audio",))
    video, features = telme.UtteranceDataset([], kinds=("video",)), telme.FeatureDataset({"label": []})
    datasets = (text, audio, video, features)
    assert [telme.loader_batch_size(d, cfg, training=True) for d in datasets] == [4, 4, 4, 4]
    assert [telme.loader_batch_size(d, cfg, training=False) for d in datasets] == [16, 4, 16, 16]
    d2 = dataclasses.replace(cfg, asf_attention="batch")  # D2: a sample's output depends on its batch
    assert telme.loader_batch_size(features, d2, training=False) == 4


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside inductor
def test_compile_trains_the_same_fusion_as_eager_under_the_same_names(tmp_path):
    """--compile changes how a training step runs, not what it computes: one epoch of the fusion
    gives the same weights up to float rounding (which Adam's normalised steps amplify to ~1e-4 on
    near-zero gradients; training moved the weights by over 1e-3), saved under the module's own
    parameter names. Dropout is off: compiled code draws its dropout masks differently."""
    cfg = telme.make_config("meld", quiet=True, feature_dim=16, heads=2, dropout=0.0)
    rt = telme.make_runtime(cfg)
    generator = torch.Generator().manual_seed(0)

    def split(n):
        return ({k: torch.randn(n, 16, generator=generator) for k in ("f_teacher", "f_audio", "f_visual")}
                | {"label": torch.randint(7, (n,), generator=generator)})

    outputs = {"train": split(32), "dev": split(8), "test": split(8)}
    weights = {}
    for compiled in (False, True):
        run_cfg = dataclasses.replace(cfg, compile=compiled)
        run = tmp_path / f"compile-{compiled}"
        run.mkdir()
        transformers.set_seed(cfg.seed)
        fusion = telme.ShiftingFusion(16, 7, 2, 0.0, cfg.theta)
        initial = {k: v.clone() for k, v in fusion.state_dict().items()}
        loaders = {s: telme.make_loader(telme.FeatureDataset(out), run_cfg, rt, None, shuffle=s == "train",
                                        seed=cfg.seed) for s, out in outputs.items()}
        telme.fit("fusion", fusion, loaders, telme.fusion_forward, telme.fusion_loss, 1, 1e-3, run_cfg, rt, run)
        weights[compiled] = telme.load_file(telme.weights_path(run, "fusion"))
    assert weights[True].keys() == weights[False].keys() == initial.keys()
    assert max((w - initial[k]).abs().max() for k, w in weights[False].items()) > 1e-3  # it trained
    for name, eager in weights[False].items():
        torch.testing.assert_close(weights[True][name], eager, rtol=1e-3, atol=2e-4)


def test_teacher_trains_on_the_csvs_alone(tmp_path, tiny_models):
    data = tmp_path / "MELD.Raw"
    data.mkdir()
    for split in ("train", "dev"):
        write_meld_csv(data / telme.MELD_SPLITS[split][0], FIXTURE_ROWS)
    cfg = tiny_config("meld", data, tmp_path, tiny_models, strict=True)
    metrics = telme.train(cfg, "teacher")
    assert list(metrics) == ["teacher"] and metrics["teacher"]["best_epoch"] == 1
    assert not any((data / folder).exists() for _, folder in telme.MELD_SPLITS.values())
    assert not (tmp_path / "cache").exists()  # no clip was looked for


def test_a_phase_before_its_earlier_phases_stops_before_reading_anything(tmp_path):
    cfg = telme.make_config("meld", data_dir=str(tmp_path / "no-data"), out=str(tmp_path / "run"))
    with pytest.raises(SystemExit, match="has no teacher, audio, visual weights; --phase fusion needs them"):
        telme.train(cfg, "fusion")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "teacher.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="has no audio, visual weights"):
        telme.train(cfg, "fusion")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["teacher.safetensors"]  # nothing written


def test_a_fresh_teacher_removes_the_phases_trained_on_the_old_one(demo_run, tmp_path, monkeypatch):
    out, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("inputs"))
    before = file_bytes(run)
    cfg = telme.dataclasses.replace(telme.read_run_config(run), out=str(run), epochs=(1, 1, 1))
    with pytest.raises(SystemExit, match="already holds teacher, audio, visual, fusion weights or "
                                         "checkpoints; --resume .* continues that run, --overwrite"):
        telme.train(cfg, "teacher")
    # Stopped before its first weights exist, an --overwrite run leaves the old ones as they were.
    monkeypatch.setattr(telme, "save_weights", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        telme.train(cfg, "teacher", overwrite=True)
    assert all(file_bytes(run)[f"{p}.safetensors"] == before[f"{p}.safetensors"] for p in telme.PHASES)
    monkeypatch.undo()
    telme.train(cfg, "teacher", overwrite=True)
    assert telme.trained_phases(run) == ["teacher"]
    assert list(json.loads((run / "metrics.json").read_text())) == ["teacher"]
    assert json.loads((run / "checkpoints" / "teacher.complete").read_text())["epochs"] == 1


def test_resuming_an_interrupted_overwrite_retrains_the_phases_built_on_it(demo_run, tmp_path, monkeypatch):
    out, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("inputs"))
    cfg = telme.dataclasses.replace(telme.read_run_config(run), out=str(run), epochs=(1, 1, 1))
    monkeypatch.setattr(telme, "save_weights", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped after the new teacher's checkpoint, before its weights
        telme.train(cfg, "teacher", overwrite=True)
    monkeypatch.undo()
    assert all(telme.phase_complete(run, p) for p in ("audio", "visual", "fusion"))  # the old ones, still
    ran = []
    monkeypatch.setattr(telme, "train_students", lambda *args: ran.append("students"))
    monkeypatch.setattr(telme, "train_fusion", lambda *args: ran.append("fusion"))
    telme.train(cfg, "all", resume=True)
    # The new teacher removed the students and fusion distilled from the old one: they train again.
    assert ran == ["students", "fusion"] and telme.trained_phases(run) == ["teacher"]


def test_a_failing_train_leaves_the_finished_run_byte_identical(demo_run, tmp_path, capsys):
    out, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("inputs"))
    before = file_bytes(run)
    cfg = telme.read_run_config(run)
    flags = ["train", "--phase", "teacher", *cli_flags(dataclasses.replace(cfg, out=str(run)))]
    typo = str(tmp_path / "MELD.Rwa")
    data = ["--data-dir", cfg.data_dir]
    for extra, problem in ((["--data-dir", typo], "already holds teacher, audio, visual, fusion weights"),
                           (["--data-dir", typo, "--overwrite"], f"{typo}/train_sent_emo.csv not found"),
                           ([*data, "--batch-size", "0", "--overwrite"], "--batch-size must be at least 1, not 0"),
                           ([*data, "--text-model", "/no/such/dir", "--overwrite"], "/no/such/dir: no such directory"),
                           ([*data, "--resume", str(run), "--overwrite"], "give one")):
        assert problem in one_line_exit(capsys, flags + extra)
        assert file_bytes(run) == before  # config.json and metrics.json included


# --------------------------------------------------------------------------------------------------
# 5. Training: checkpoints and resuming
# --------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_truncation_is_reported(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 2, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        schedule.step()
    path = telme.checkpoint_path(tmp_path, "teacher")
    telme.save_checkpoint(path, 2, {"dev_wf1": 50.0, "best_epoch": 2}, model, optimizer, schedule, scaler,
                          generator)
    expected = (torch.rand(3), torch.rand(3, generator=generator), np.random.rand(), __import__("random").random())
    other = torch.nn.Linear(4, 3)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2)
    other_schedule = transformers.get_linear_schedule_with_warmup(other_optimizer, 2, 10)
    other_generator = torch.Generator()
    epoch, best = telme.restore_checkpoint(path, other, other_optimizer, other_schedule, scaler, other_generator)
    assert (epoch, best) == (2, {"dev_wf1": 50.0, "best_epoch": 2})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_schedule.last_epoch == 3 and other_optimizer.state_dict()["state"][0]["step"] == 3
    assert torch.equal(other_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    again = (torch.rand(3), torch.rand(3, generator=other_generator), np.random.rand(), __import__("random").random())
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(expected, again))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match=r"teacher.pt: truncated or damaged checkpoint"):
        telme.restore_checkpoint(path, other, other_optimizer, other_schedule, scaler, other_generator)


def interrupt_after(monkeypatch, phase, epoch):
    """Make training stop (as Ctrl-C would) right after `phase` saved its checkpoint of `epoch`."""
    save = telme.save_checkpoint

    def save_then_stop(path, done, *args):
        save(path, done, *args)
        if (path.stem, done) == (phase, epoch):
            raise KeyboardInterrupt
    monkeypatch.setattr(telme, "save_checkpoint", save_then_stop)


def test_resume_after_interruptions_ends_with_the_uninterrupted_metrics(tiny_setup, monkeypatch):
    whole = telme.train(tiny_setup("whole"))
    cfg = tiny_setup("interrupted")
    run = Path(cfg.out)
    interrupt_after(monkeypatch, "teacher", 1)
    with pytest.raises(KeyboardInterrupt):
        telme.train(cfg)
    assert telme.checkpoint_path(run, "teacher").is_file() and not telme.phase_complete(run, "teacher")
    interrupt_after(monkeypatch, "audio", 1)  # the second run stops in a later phase
    args = telme.build_parser().parse_args(["train", "--resume", str(run), "--quiet"])
    with pytest.raises(KeyboardInterrupt):
        telme.train(telme.resume_config(args), args.phase, resume=True)
    assert telme.phase_complete(run, "teacher") and not telme.checkpoint_path(run, "teacher").exists()
    assert telme.checkpoint_path(run, "audio").is_file()
    monkeypatch.undo()
    telme.main(["train", "--resume", str(run), "--quiet"])
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed == whole
    for phase in telme.PHASES:  # and the same selected weights
        a = telme.load_file(telme.weights_path(Path(tiny_setup("whole").out), phase))
        b = telme.load_file(telme.weights_path(run, phase))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # What is left is a marker per phase, and every epoch was logged once.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(f"{p}.complete" for p in telme.PHASES)
    strip_time = lambda log: [line.rsplit(" time ", 1)[0] for line in log.read_text().splitlines()]
    assert strip_time(run / "train.log") == strip_time(Path(tiny_setup("whole").out) / "train.log")


def test_a_run_stopped_between_checkpoint_and_best_weights_resumes_with_them(tiny_setup, monkeypatch):
    whole = telme.train(tiny_setup("teacher-whole"), "teacher")
    assert whole["teacher"]["best_epoch"] == 1  # so the weights of the stopped epoch are the best
    cfg = tiny_setup("teacher-stopped")
    run = Path(cfg.out)
    save = telme.save_weights

    def stop_at_first_weights(module, path, **metadata):
        if metadata["best_epoch"] == 1:
            raise KeyboardInterrupt
        save(module, path, **metadata)
    monkeypatch.setattr(telme, "save_weights", stop_at_first_weights)
    with pytest.raises(KeyboardInterrupt):
        telme.train(cfg, "teacher")
    assert telme.checkpoint_path(run, "teacher").is_file() and not telme.weights_path(run, "teacher").exists()
    monkeypatch.undo()
    resumed = telme.train(cfg, "teacher", resume=True)
    assert resumed == whole
    a = telme.load_file(telme.weights_path(Path(tiny_setup("teacher-whole").out), "teacher"))
    b = telme.load_file(telme.weights_path(run, "teacher"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tiny_setup, monkeypatch, capsys):
    cfg = tiny_setup("ctrl-c")
    run = Path(cfg.out)
    interrupt_after(monkeypatch, "audio", 1)
    with pytest.raises(SystemExit) as stop:
        telme.main(["train", *cli_flags(cfg)])
    assert stop.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    resume = f"python telme.py train --resume {run} --phase all"
    assert line == f"telme: interrupted; {run} holds teacher complete, audio up to epoch 1; continue with: {resume}"
    monkeypatch.undo()
    telme.main(resume.split()[2:] + ["--quiet"])
    assert telme.trained_phases(run) == list(telme.PHASES)
    # Files as readable as the umask allows (the atomic writer's temporary file is 0600).
    mask = telme.current_umask()
    modes = {p.name: p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes
    old = os.umask(0o027)
    try:
        telme.atomic_write(run / "group.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (run / "group.txt").stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------------------------------
# 5. Training: several processes, DistributedDataParallel over gloo on a CPU
# --------------------------------------------------------------------------------------------------
def ddp_worker(rank, world, port, cfg, record_dir):
    """One torchrun-like process: trains every phase, recording the training items it was given
    and every file it wrote."""
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    seen, written = {}, []
    fit, atomic_write = telme.fit, telme.atomic_write

    def recording_fit(phase, model, loaders, forward, loss_fn, *args):
        def recording_loss(m, batch):
            seen.setdefault(phase, []).extend(batch["index"].tolist())
            return loss_fn(m, batch)
        return fit(phase, model, loaders, forward, recording_loss, *args)

    def recording_write(path, write):
        written.append(str(path))
        atomic_write(path, write)

    telme.fit, telme.atomic_write = recording_fit, recording_write
    telme.train(cfg)
    telme.finish_distributed()
    (Path(record_dir) / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "written": written}))


def test_two_process_gloo_run_shards_train_and_counts_every_test_utterance_once(tiny_setup, tmp_path):
    import socket
    import torch.multiprocessing as mp
    cfg = tiny_setup("ddp", cache_dir=str(tmp_path / "cache"))  # a cold cache: decoding is shared too
    splits = telme.load_splits(cfg)
    # Odd split sizes make the sampler pad a shard with a repeat, which must not be counted twice.
    assert len(splits["dev"]) % 2 == 1 or len(splits["test"]) % 2 == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(2, port, cfg, str(tmp_path)), nprocs=2, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train_size = len(splits["train"])
    for phase in telme.PHASES:
        shards = [records[r]["seen"][phase] for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == 2 * (train_size // 2)  # 2 epochs of half each
        for epoch in range(2):
            a, b = (set(s[epoch * (train_size // 2):(epoch + 1) * (train_size // 2)]) for s in shards)
            assert len(a) == len(b) == train_size // 2 and not a & b
    run = Path(cfg.out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == list(telme.PHASES)
    for m in metrics.values():
        for split in ("dev", "test"):
            assert np.array(m["confusion"][split]).sum() == len(splits[split])
            assert sum(r["support"] for r in m["per_class"][split].values()) == len(splits[split])
    # Rank 0 wrote the run directory; rank 1 only its share of the media cache; no file twice.
    first, second = (set(r["written"]) for r in records)
    assert not first & second
    assert second and all(path.startswith(cfg.cache_dir) for path in second)
    assert any(path.startswith(cfg.cache_dir) for path in first)
    log = (run / "train.log").read_text().splitlines()
    assert len(log) == 4 * 2 and len(set(log)) == len(log)


# --------------------------------------------------------------------------------------------------
# 5. Training: static shapes (padding buckets) and graphed steps
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_text_bucket_pads_to_a_multiple_and_keeps_each_prompts_output(family):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel
    torch.manual_seed(0)
    small = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    encoder = (RobertaModel(RobertaConfig(pad_token_id=1, **small)) if family == "roberta"
               else BertModel(BertConfig(**small)))
    teacher = telme.TextTeacher(encoder, 7, 12).eval()
    items = [{"index": i, "label": 0, "input_ids": torch.randint(3, 60, (n,)).tolist()}
             for i, n in enumerate((5, 13, 9, 2))]
    pad_id = encoder.config.pad_token_id
    with torch.no_grad():
        longest = telme.Collate(pad_id=pad_id)(items)
        assert longest["input_ids"].shape[1] == 13
        for bucket, max_text, length in ((8, 512, 16), (5, 512, 15), (8, 14, 14), (13, 512, 13)):
            batch = telme.Collate(pad_id=pad_id, text_bucket=bucket, max_text=max_text)(items)
            assert batch["input_ids"].shape[1] == length
            assert (batch["attention_mask"].sum(1) == torch.tensor([5, 13, 9, 2])).all()
            for padded, exact in zip(telme.text_forward(teacher, batch), telme.text_forward(teacher, longest)):
                torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)
    # The flag reaches the collate; it is off by default.
    assert telme.make_collate(telme.make_config("meld")).text_bucket == 0
    collate = telme.make_collate(telme.make_config("meld", text_bucket=64, max_text_tokens=100), pad_id=pad_id)
    assert collate(items)["input_ids"].shape[1] == 64


def test_audio_buckets_pad_to_the_next_power_of_two_quarter_seconds_and_are_refused_under_d3():
    rng = np.random.default_rng(0)
    student = telme.build_student("audio", tiny_audio_encoder(), 7).eval()
    for lengths, max_audio, padded in (((5000, 9000), 400000, 16000), ((3000,), 400000, 4000),
                                       ((9000, 11000), 12000, 12000), ((64000,), 400000, 64000)):
        items = [{"index": i, "label": 0, "audio": rng.standard_normal(n).astype(np.float32)}
                 for i, n in enumerate(lengths)]
        exact = telme.make_collate(telme.make_config("meld", max_audio_samples=max_audio))(items)
        batch = telme.make_collate(telme.make_config("meld", max_audio_samples=max_audio, audio_buckets=True))(items)
        assert batch["audio"].shape[1] == padded
        n = exact["audio"].shape[1]  # the same samples and mask, then zeros outside the mask
        assert torch.equal(batch["audio"][:, :n], exact["audio"]) and not batch["audio"][:, n:].any()
        assert torch.equal(batch["audio_mask"][:, :n], exact["audio_mask"]) and not batch["audio_mask"][:, n:].any()
        with torch.no_grad():  # one positional convolution: the masked mean sees no padding (to rounding)
            torch.testing.assert_close(telme.audio_forward(student, batch)[0], telme.audio_forward(student, exact)[0],
                                       rtol=1e-4, atol=1e-4)
    assert not telme.make_config("meld").audio_buckets
    for switches in ({"compat": "official"}, {"official_audio_pooling": True}):
        with pytest.raises(SystemExit, match="--audio-buckets .* not with --official-audio-pooling"):
            telme.make_config("meld", audio_buckets=True, **switches)


def test_spec_augment_masks_drawn_on_the_host_give_the_internal_draws_loss_and_differ_per_step():
    """data2vec-audio draws its time masks with numpy inside forward; host_time_masks makes the same
    numpy calls before forward and passes the masks in: the same masks for the same seed, so the
    same loss (dropout, drawn by torch, the same too), and new masks at each step."""
    rng = np.random.default_rng(0)
    student = telme.build_student("audio", tiny_audio_encoder(), 7).train()
    items = [{"index": i, "label": i, "audio": rng.standard_normal(n).astype(np.float32)}
             for i, n in enumerate((9000, 16000, 12000))]
    batch = telme.make_collate(telme.make_config("meld"))(items)
    cfg = telme.make_config("meld")
    t_features, t_logits = torch.randn(3, 16), torch.randn(3, 7)
    drawn = []

    def recording_forward(model, batch):
        drawn.append(batch.get("time_masks"))
        return telme.audio_forward(model, batch)
    losses = {}
    for path, forward in (("internal", recording_forward),
                          ("host", telme.host_time_masks(student.encoder, recording_forward))):
        np.random.seed(0)
        torch.manual_seed(0)
        loss_fn = telme.student_step_loss(forward, t_features, t_logits, cfg)
        losses[path] = [loss_fn(student, batch) for _ in range(2)]
    assert drawn[0] is None and drawn[1] is None  # the internal path: data2vec draws them itself
    first, second = drawn[2:]
    assert first.dtype == torch.bool and first.any() and not torch.equal(first, second)
    frames = student.encoder._get_feature_vector_attention_mask(first.shape[1], batch["audio_mask"]).bool()
    assert not (first & ~frames).any()  # only real frames are masked
    assert losses["host"][0] == losses["internal"][0] and losses["host"][1] == losses["internal"][1]
    assert losses["host"][0] != losses["host"][1]


def graphed_fusion_weights(tmp_path, name, epochs, **overrides):
    """fit's fusion weights after `epochs` epochs on fixed random features (dropout off: compiled code
    draws its dropout masks differently); the initial weights too."""
    cfg = telme.make_config("meld", quiet=True, feature_dim=16, heads=2, dropout=0.0, **overrides)
    rt = telme.make_runtime(cfg)
    generator = torch.Generator().manual_seed(0)
    outputs = {s: {k: torch.randn(n, 16, generator=generator) for k in ("f_teacher", "f_audio", "f_visual")}
               | {"label": torch.randint(7, (n,), generator=generator)} for s, n in (("train", 24), ("dev", 8))}
    run = tmp_path / name
    run.mkdir(exist_ok=True)
    transformers.set_seed(cfg.seed)
    fusion = telme.ShiftingFusion(16, 7, 2, 0.0, cfg.theta)
    initial = {k: v.clone() for k, v in fusion.state_dict().items()}
    loaders = {s: telme.make_loader(telme.FeatureDataset(out), cfg, rt, None, shuffle=s == "train", seed=cfg.seed)
               for s, out in outputs.items()}
    telme.fit("fusion", fusion, loaders, telme.fusion_forward, telme.fusion_loss, epochs, 1e-3, cfg, rt, run)
    return telme.load_file(telme.weights_path(run, "fusion")), initial, run


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside inductor
def test_graphed_fusion_trains_and_resumes_as_eager(tmp_path, monkeypatch):
    """--compile-mode reduce-overhead (on a CPU: compiled without CUDA graphs), with the update
    compiled and a tensor learning rate: two fusion epochs, the run stopped after the first and
    resumed, give the weights and learning rates of two eager epochs to float rounding."""
    eager, initial, eager_run = graphed_fusion_weights(tmp_path, "eager", 2)
    interrupt_after(monkeypatch, "fusion", 1)
    with pytest.raises(KeyboardInterrupt):
        graphed_fusion_weights(tmp_path, "graphed", 2, compile=True, compile_mode="reduce-overhead")
    monkeypatch.undo()
    graphed, _, graphed_run = graphed_fusion_weights(tmp_path, "graphed", 2, compile=True,
                                                     compile_mode="reduce-overhead")
    assert graphed.keys() == eager.keys() == initial.keys()
    assert max((w - initial[k]).abs().max() for k, w in eager.items()) > 1e-3  # it trained
    for name, w in eager.items():
        torch.testing.assert_close(graphed[name], w, rtol=1e-3, atol=2e-4)
    lrs = [[line.split(" lr ")[1].split()[0] for line in (run / "train.log").read_text().splitlines()]
           for run in (eager_run, graphed_run)]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 2


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside inductor
def test_graphed_teacher_steps_on_bucketed_prompts_equal_eager_steps():
    """A few teacher steps, compiled in reduce-overhead mode on prompts padded to a bucket, against
    eager steps on prompts padded to each batch's longest: the same parameters to rounding."""
    from transformers import BertConfig, BertModel
    params_after = {}
    for graphed in (False, True):
        cfg = telme.make_config("meld", compile=graphed, compile_mode="reduce-overhead",
                                text_bucket=16 if graphed else 0)
        rt = telme.make_runtime(cfg)
        torch.manual_seed(0)
        encoder = BertModel(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        teacher = telme.TextTeacher(encoder, 7, 16).train()
        initial = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        params = [p for p in teacher.parameters() if p.requires_grad]
        optimizer, scaler = telme.make_optimizer(params, 1e-3), rt.grad_scaler("teacher")
        schedule = transformers.get_linear_schedule_with_warmup(optimizer, 2, 4)
        trained, update = telme.compiled_step(teacher, optimizer, cfg, rt.device)
        assert torch.is_tensor(optimizer.param_groups[0]["lr"]) is graphed
        generator = torch.Generator().manual_seed(1)
        collate = telme.make_collate(cfg)
        for step in range(4):
            items = [{"index": i, "label": i, "input_ids": torch.randint(3, 60, (n,), generator=generator).tolist()}
                     for i, n in enumerate(torch.randint(2, 12, (4,), generator=generator).tolist())]
            batch = collate(items)
            assert batch["input_ids"].shape[1] == (16 if graphed else max(len(it["input_ids"]) for it in items))
            telme.train_step(trained, batch, telme.teacher_loss, optimizer, scaler, params, cfg, rt, "teacher", update)
            schedule.step()
        params_after[graphed] = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    assert max((w - initial[k]).abs().max() for k, w in params_after[False].items()) > 1e-3  # it trained
    for name, eager in params_after[False].items():
        torch.testing.assert_close(params_after[True][name], eager, rtol=1e-3, atol=2e-4)


# --------------------------------------------------------------------------------------------------
# The official code's behaviours D1-D16 (README: Differences): each switch changes what it names
# --------------------------------------------------------------------------------------------------
def test_compat_official_switches_on_every_behaviour_and_nothing_by_default():
    fixed = telme.make_config("meld")
    assert not any(telme.compat_switches(fixed).values())
    official = telme.config_from_args(telme.build_parser().parse_args(["train", "--compat", "official"]))
    assert official.asf_attention == "batch" and official.amp == "fp16"  # D2; D5 needs the scaler
    assert telme.compat_switches(official) == {f"D{i}": True for i in range(1, 17) if i != 9}
    assert list(telme.compat_switches(official))[-3:] == ["D14", "D15", "D16"]  # in numeric order
    one = telme.make_config("meld", official_frames=True)
    assert [d for d, on in telme.compat_switches(one).items() if on] == ["D7"]
    # A saved configuration reads back to the same switches.
    assert telme.make_config(**telme.dataclasses.asdict(official)) == official


def cache_entry(tmp_path, kind, path, **switches):
    """Decode `path` through the media cache under the given switches; returns (array, cfg)."""
    cfg = telme.make_config("meld", cache_dir=str(tmp_path / "cache"), num_frames=4, image_size=16,
                            **switches)
    media = telme.MediaCache(cfg)
    u = telme.Utterance(dialogue="0", speaker="a", text="t", label=0, video=str(path), audio=str(path))
    media.prepare([u], workers=1, quiet=True)
    return np.asarray(media.load(kind, u), dtype=np.float32), cfg


def test_d1_official_audio_rate_shifts_the_pitch(tmp_path):
    rate = 44100
    t = np.arange(rate) / rate
    write_wav(tmp_path / "tone.wav", np.stack([0.5 * np.sin(2 * np.pi * 1000 * t)]), rate)
    for switch, expected in ((False, 1000.0), (True, 1000.0 * 16000 / 22050)):
        waveform, cfg = cache_entry(tmp_path, "audio", tmp_path / "tone.wav", official_audio_rate=switch)
        # The model is told the waveform is cfg.audio_rate (16 kHz) samples per second.
        peak = np.argmax(np.abs(np.fft.rfft(waveform))) * cfg.audio_rate / len(waveform)
        assert abs(peak - expected) < 3, (switch, peak, expected)


def test_d8_official_long_clips_become_zeros(tmp_path):
    def clip(name, seconds):
        rate, fps = 8000, 2
        frames = np.full((seconds * fps, 32, 32, 3), 200, np.uint8)
        tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(seconds * rate) / rate)
        telme.write_clip(tmp_path / name, frames, fps, np.stack([tone]).astype(np.float32), rate=rate)
        return tmp_path / name
    long, short = clip("long.mp4", 31), clip("short.mp4", 2)
    for kind in ("audio", "video"):
        assert np.abs(cache_entry(tmp_path, kind, long)[0]).max() > 0.1
        assert np.abs(cache_entry(tmp_path, kind, short, official_long_clips=True)[0]).max() > 0.1
    # The official stand-ins: 1412 zero samples, and frames that are zero after normalisation.
    audio = cache_entry(tmp_path, "audio", long, official_long_clips=True)[0]
    assert audio.shape == (1412,) and not audio.any()
    frames = {name: cache_entry(tmp_path, "video", path, official_long_clips=True)[0].astype(np.uint8)
              for name, path in (("long", long), ("short", short))}
    assert len(frames["long"]) == 0
    batch = telme.Collate(num_frames=4, image_size=16)([{"index": 0, "label": 0, "video": frames["long"]},
                                                        {"index": 1, "label": 0, "video": frames["short"]}])
    assert not batch["video"][0].any() and batch["video"][1].abs().min() > 0.1
    # The official IEMOCAP code has no such rule: --compat official leaves D8 off there.
    iemocap = telme.make_config("iemocap", compat="official")
    assert [d for d, on in telme.compat_switches(iemocap).items() if not on] == ["D8", "D10"]


def test_d7_official_frames_are_bgr_with_videomae_statistics():
    red = np.zeros((2, 4, 4, 3), np.uint8)
    red[..., 0] = 255
    items = [{"index": 0, "label": 0, "video": red}]
    ours_stats = ((0.45,) * 3, (0.225,) * 3)
    for switch in (False, True):
        cfg = telme.make_config("meld", num_frames=2, image_size=4, official_frames=switch)
        video = telme.make_collate(cfg, image_stats=ours_stats)(items)["video"]  # (B, T, 3, S, S)
        channels = video[0, 0, :, 0, 0]
        if switch:  # blue first, then ImageNet's mean and std
            expected = [(0 - 0.485) / 0.229, (0 - 0.456) / 0.224, (1 - 0.406) / 0.225]
        else:
            expected = [(1 - 0.45) / 0.225, (0 - 0.45) / 0.225, (0 - 0.45) / 0.225]
        assert torch.allclose(channels, torch.tensor(expected), atol=1e-5), (switch, channels)


def tiny_audio_encoder():
    """One positional-conv layer: with more, data2vec-audio itself lets padding leak into the
    frames next to it, so even a masked mean would not be exactly padding-free."""
    from transformers import Data2VecAudioConfig, Data2VecAudioModel
    torch.manual_seed(0)
    return Data2VecAudioModel(Data2VecAudioConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(16, 16, 16), conv_kernel=(10, 4, 4), conv_stride=(5, 4, 4), conv_pos_kernel_size=5,
        num_conv_pos_embeddings=1, num_conv_pos_embedding_groups=2)).eval()


def test_d3_official_audio_pooling_depends_on_the_batch_padding():
    rng = np.random.default_rng(0)
    short, long = rng.standard_normal(6000).astype(np.float32), rng.standard_normal(16000).astype(np.float32)
    encoder = tiny_audio_encoder()
    for switch in (False, True):
        cfg = telme.make_config("meld", official_audio_pooling=switch)
        student = telme.build_student("audio", encoder, 7, cfg.official_audio_pooling).eval()
        collate = telme.make_collate(cfg)

        def pooled(waves):
            batch = collate([{"index": i, "label": 0, "audio": w} for i, w in enumerate(waves)])
            with torch.no_grad():
                return telme.audio_forward(student, batch)[0][0]
        alone, padded = pooled([short]), pooled([short, long])
        if switch:
            assert not torch.allclose(alone, padded, atol=1e-3)
        else:
            assert torch.allclose(alone, padded, atol=1e-4)


def tiny_fit(tmp_path, **switches):
    """Ten epochs of a tiny fusion on 40 random samples, batch 4 (10 steps an epoch); the lr per epoch."""
    torch.manual_seed(0)
    cfg = telme.make_config("meld", batch_size=4, quiet=True, warmup_epochs=1.0, **switches)
    rt = telme.Runtime(torch.device("cpu"))

    def features(n):
        return {"f_teacher": torch.randn(n, 8), "f_audio": torch.randn(n, 8), "f_visual": torch.randn(n, 8),
                "label": torch.randint(0, 7, (n,))}
    loaders = {split: telme.make_loader(telme.FeatureDataset(features(n)), cfg, rt, None,
                                        shuffle=split == "train")
               for split, n in (("train", 40), ("dev", 8))}
    fusion = telme.ShiftingFusion(8, 7, 2, 0.0, 0.1)

    def loss_fn(model, batch):
        return F.cross_entropy(telme.fusion_forward(model, batch)[1], batch["label"])
    run = tmp_path / ("official" if switches else "ours")
    run.mkdir()
    telme.fit("fusion", fusion, loaders, telme.fusion_forward, loss_fn, 10, 1e-3, cfg, rt, run)
    return [float(line.split(" lr ")[1].split()[0]) for line in (run / "train.log").read_text().splitlines()]


def test_d4_official_schedule_counts_samples(tmp_path):
    ours = tiny_fit(tmp_path)
    assert ours[0] == pytest.approx(1e-3) and ours[-1] == 0.0  # warm after 1 epoch, 0 at the end
    official = tiny_fit(tmp_path, official_schedule=True)
    # Counted in samples: 40 warmup and 400 total steps, of which 100 are taken.
    assert official[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-2)
    assert official[-1] == pytest.approx(1e-3 * 300 / 360, rel=1e-2)


def test_d5_official_clipping_acts_before_unscaling():
    true_gradient = torch.tensor([2.0, 0.0, 0.0])  # norm 2, under the threshold 10
    for switch, expected_step in ((False, 2.0), (True, 10.0 / 1024)):
        cfg = telme.make_config("meld", official_clipping=switch)
        w = torch.zeros(3, requires_grad=True)
        optimizer = torch.optim.SGD([w], lr=1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale((w * true_gradient).sum()).backward()
        telme.clip_and_step(optimizer, scaler, [w], cfg)
        # Official: the scaled gradient (norm 2048) is clipped to 10, then unscaled by 1024.
        assert w.detach().norm().item() == pytest.approx(expected_step, rel=1e-4), switch


D6_ROWS = FIXTURE_ROWS + [(1, 2, "Monica", "joy", "hello joey"), (2, 0, "Joey", "anger", "go away now")]


def test_d6_official_speakers_index_a_dialogue_opener_against_the_previous_list(tmp_path):
    write_meld_csv(tmp_path / "train_sent_emo.csv", D6_ROWS)
    utterances = telme.read_meld_csv(tmp_path / "train_sent_emo.csv", tmp_path / "train_splits")
    tokenizer = bert_style_tokenizer()
    telme.add_speaker_tokens(tokenizer)

    def speaker_tokens(**switches):
        cfg = telme.make_config("meld", **switches)
        ids = telme.teacher_input_ids(utterances, tokenizer, 512, telme.prompt_speakers(cfg, utterances))
        return [[t for t in tokenizer.convert_ids_to_tokens(i) if t in telme.SPEAKER_TOKENS][-1] for i in ids]
    # Dialogue 0: Ross Rachel Ross; 1: Monica Joey Monica; 2: Joey.
    assert speaker_tokens() == ["<s1>", "<s2>", "<s1>", "<s1>", "<s2>", "<s1>", "<s1>"]
    # Official: Monica opens dialogue 1 as the third speaker of dialogue 0's list [Ross, Rachel],
    # then the list restarts without her: Joey <s1>, Monica again <s2>. Joey opens dialogue 2 as
    # Joey of dialogue 1's list [Joey, Monica].
    assert speaker_tokens(official_speakers=True) == ["<s1>", "<s2>", "<s1>", "<s3>", "<s1>", "<s2>", "<s1>"]


def test_d6_official_iemocap_speakers_are_utterance_ids():
    def utterance(dialogue, name, speaker):
        return telme.Utterance(dialogue=dialogue, speaker=speaker, text="x", label=0, video="v.avi",
                               audio=f"Session1/sentences/wav/{dialogue}/{name}.wav")
    utterances = [utterance("Ses01F_impro01", f"Ses01F_impro01_{s}00{i}", s) for i, s in enumerate("FMF")]
    utterances += [utterance("Ses01F_impro02", f"Ses01F_impro02_{s}00{i}", s) for i, s in enumerate("MF")]
    assert telme.prompt_speakers(telme.make_config("iemocap"), utterances) is None  # ours: F/M by name
    official = telme.prompt_speakers(telme.make_config("iemocap", official_speakers=True), utterances)
    assert official == [0, 1, 2, 3, 0]


def test_d6_official_speakers_past_the_ninth_are_plain_text():
    """Officially a list's tenth speaker is written <s10>: no special token, so it is tokenized as
    text (not capped at <s9>)."""
    utterances = [telme.Utterance(dialogue="d", speaker="F", text="x", label=0, video="v.avi",
                                  audio=f"Ses01F_impro01_F{i:03d}.wav") for i in range(12)]
    official = telme.prompt_speakers(telme.make_config("iemocap", official_speakers=True), utterances)
    assert official == list(range(12))
    tokenizer = roberta_style_tokenizer()
    telme.add_speaker_tokens(tokenizer)
    prompt = telme.teacher_input_ids(utterances, tokenizer, 512, official)[-1]
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # <s1> .. <s9> split the prompt (the spaces beside them dropped); the rest is one piece of text.
    expected = [i for k in range(1, 9) for i in [tokenizer.convert_tokens_to_ids(f"<s{k}>"), *encode("x")]]
    expected += [tokenizer.convert_tokens_to_ids("<s9>")] + encode("x <s10> x <s11> x <s12> x </s> Now <s12> feels")
    assert prompt == expected + [tokenizer.mask_token_id]
    assert prompt.count(tokenizer.convert_tokens_to_ids("<s9>")) == 1


def test_d10_official_text_keeps_the_c1_characters(tmp_path):
    write_meld_csv(tmp_path / "train_sent_emo.csv", [(0, 0, "Ross", "joy", "It\x92s fine\x85 ok")])
    for switch, expected in ((False, "It's fine... ok"), (True, "It\x92s fine\x85 ok")):
        cfg = telme.make_config("meld", data_dir=str(tmp_path), official_text=switch)
        assert telme.load_splits(cfg, required=("train",))["train"][0].text == expected


def test_d11_official_frame_indices_meld_rule():
    assert telme.official_frame_indices(40, 8) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert telme.official_frame_indices(21, 8) == [1, 3, 5, 7, 9, 11, 13, 15]  # the last quarter unused
    assert telme.official_frame_indices(5, 8) == [0, 1, 2, 3, 4, 4, 4, 4]


def test_d11_official_frame_indices_iemocap_window_rule():
    # [3, 5] s at 10 fps widens to [2, 6]: 40 frames, step 5, 1-based 20..60 -> every fifth from 24.
    assert telme.official_window_frame_indices(10.0, 3.0, 5.0, 8) == [23, 28, 33, 38, 43, 48, 53, 58]
    # At the start of a video the window begins at 0 s: [0, 1.5] s at 10 fps, step 1 (15 // 8).
    assert telme.official_window_frame_indices(10.0, 0.2, 0.5, 8) == [0, 1, 2, 3, 4, 5, 6, 7]
    # Fewer than 8 frames in the window (the official code fails): each of them, the last repeated.
    assert telme.official_window_frame_indices(2.0, 0.5, 1.0, 8) == [0, 1, 2, 3, 3, 3, 3, 3]


def test_d11_official_frames_through_the_media_cache(tmp_path):
    def frames(path, dataset="meld", start=None, end=None, **switches):
        cfg = telme.make_config(dataset, cache_dir=str(tmp_path / "cache"), num_frames=8, image_size=16,
                                **switches)
        media = telme.MediaCache(cfg)
        u = telme.Utterance("d", "F", "t", 0, str(path), str(path), start=start, end=end)
        media.prepare([u], workers=1, quiet=True)
        return shown_indices(np.asarray(media.load("video", u))).tolist()
    for count, official in ((40, [4, 9, 14, 19, 24, 29, 34, 39]), (21, [1, 3, 5, 7, 9, 11, 13, 15]),
                            (5, [0, 1, 2, 3, 4, 4, 4, 4])):
        path = tmp_path / f"clip{count}.mp4"
        telme.write_clip(path, index_frames(count), 8)
        assert frames(path, official_frame_indices=True) == official, count
        assert frames(path) != official, count
    # IEMOCAP: [3, 5] s of a dialogue video at 8 fps; under D11 widened to [2, 6] s, step 4.
    telme.write_clip(tmp_path / "dialogue.avi", index_frames(80), 8)
    for switch, expected in ((False, [25, 27, 29, 31, 33, 35, 37, 39]), (True, [18, 22, 26, 30, 34, 38, 42, 46])):
        assert frames(tmp_path / "dialogue.avi", "iemocap", 3.0, 5.0, official_frame_indices=switch) == expected


def test_d12_official_audio_normalisation_over_the_whole_clip(tmp_path):
    rate = 16000
    t = np.arange(2 * rate) / rate
    loud_then_quiet = np.where(t < 1.0, 0.8, 0.1) * np.sin(2 * np.pi * 440 * t)
    write_wav(tmp_path / "clip.wav", np.stack([loud_then_quiet]), rate)
    tails = {}
    for switch in (False, True):
        waveform, cfg = cache_entry(tmp_path, "audio", tmp_path / "clip.wav", max_audio_samples=rate // 2,
                                    official_audio_normalisation=switch)
        batch = telme.make_collate(cfg)([{"index": 0, "label": 0, "audio": waveform}])
        tails[switch] = batch["audio"][0, :rate // 2].numpy()
    assert tails[False].std() == pytest.approx(1.0, rel=1e-2)  # the tail normalised on its own
    # The whole clip normalised first: the quiet tail keeps its share of the clip's variance.
    whole_std = np.sqrt((0.8 ** 2 + 0.1 ** 2) / 4)
    assert tails[True].std() == pytest.approx(0.1 / np.sqrt(2) / whole_std, rel=5e-2)
    # Changing the setting changes the cache key: the two entries never mix.
    entries = list((tmp_path / "cache" / "audio").rglob("*.npy"))
    assert len(entries) == 2


def test_d13_official_audio_padding_pads_to_the_longest_clip_only():
    items = [{"index": i, "label": 0, "audio": np.ones(n, np.float32) * (i + 1)} for i, n in enumerate((1412, 900))]
    widths = {}
    for switch in (False, True):
        cfg = telme.make_config("meld", official_audio_pooling=True, official_audio_padding=switch)
        widths[switch] = telme.make_collate(cfg)(items)["audio"].shape[1]
    assert widths == {False: 4000, True: 1412}
    with pytest.raises(SystemExit, match="needs --official-audio-pooling"):
        telme.make_config("meld", official_audio_padding=True)


def test_d14_official_precision_per_phase():
    def plan(official):
        rt = telme.Runtime(torch.device("cpu"), torch.float16, official)
        uses = ("teacher", "audio", "visual", "fusion", "frozen", "eval")
        return ({u: rt.autocast_dtype(u) for u in uses},
                {p: rt.grad_scaler(p).is_enabled() for p in telme.PHASES})
    assert plan(False) == ({u: torch.float16 for u in ("teacher", "audio", "visual", "fusion", "frozen", "eval")},
                           {p: True for p in telme.PHASES})
    fp16 = torch.float16
    assert plan(True) == ({"teacher": None, "audio": fp16, "visual": fp16, "fusion": fp16, "frozen": fp16,
                           "eval": None}, {"teacher": False, "audio": True, "visual": True, "fusion": True})
    # On a CPU autocast stays off whatever the switch.
    rt = telme.make_runtime(telme.make_config("meld", device="cpu", amp="fp16", official_precision=True))
    assert rt.amp_dtype is None and isinstance(rt.autocast("audio"), telme.nullcontext)


def test_d14_one_gradient_scaler_for_both_students(tmp_path, tiny_models, monkeypatch):
    scalers = {}
    monkeypatch.setattr(telme, "frozen_outputs", lambda *args, **kwargs: {
        "train": {"f_teacher": torch.zeros(1, 48), "z_teacher": torch.zeros(1, 7)}})
    monkeypatch.setattr(telme, "fit", lambda phase, *args: scalers[switch].append(args[-1]) or {})
    u = telme.Utterance("0", "a", "t", 0, "clip.mp4", "clip.mp4")
    for switch in (False, True):
        scalers[switch] = []
        cfg = tiny_config("meld", tmp_path, tmp_path / str(switch), tiny_models, official_precision=switch)
        telme.train_students(cfg, telme.Runtime(torch.device("cpu")), tmp_path / str(switch),
                             {"train": [u], "dev": [u]}, None)
    assert scalers[False] == [None, None]  # each student's fit makes its own
    audio, visual = scalers[True]
    assert audio is visual and isinstance(audio, torch.amp.GradScaler)


def test_d15_fusion_features_per_batch_depend_on_batch_mates_under_d3(demo_run):
    demo_run = demo_run[0]
    cfg = telme.dataclasses.replace(telme.read_run_config(demo_run), official_audio_pooling=True,
                                    official_fusion_batches=True, quiet=True)
    rt = telme.make_runtime(cfg)
    utterances = telme.load_splits(cfg)["dev"][:8]
    media = telme.MediaCache(cfg)
    cached = telme.frozen_outputs(cfg, rt, demo_run, {"dev": utterances}, media)["dev"]
    loader, features = telme.per_batch_features(cfg, rt, demo_run, utterances, media)
    dataset, collate = loader.dataset, loader.collate_fn
    # A shuffled batch without the longest clip: its mates pad it less than the fixed batches did.
    lengths = [len(dataset[i]["audio"]) for i in range(len(dataset))]
    order = sorted(range(len(dataset)), key=lengths.__getitem__)[:4][::-1]
    batch = collate([dataset[i] for i in order])
    recomputed = features(batch)
    assert torch.allclose(recomputed["f_teacher"], cached["f_teacher"][order], atol=1e-5)
    assert torch.allclose(recomputed["f_visual"], cached["f_visual"][order], atol=1e-5)
    assert not torch.allclose(recomputed["f_audio"], cached["f_audio"][order], atol=1e-3)
    with pytest.raises(SystemExit, match="needs --official-audio-pooling"):
        telme.make_config("meld", official_fusion_batches=True)


def test_d16_official_cudnn_settings(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    telme.make_runtime(telme.make_config("meld", device="cpu"))
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    telme.make_runtime(telme.make_config("meld", device="cpu", official_cudnn=True))
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)


# --------------------------------------------------------------------------------------------------
# 6. Evaluation: eval and predictions.csv
# --------------------------------------------------------------------------------------------------
def test_eval_scores_a_run_stopped_between_the_two_students(demo_run, tmp_path):
    """A run interrupted after the audio student (no visual student, no fusion) still evaluates:
    the phases it has score as in the complete run."""
    out, results = demo_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    for phase in ("visual", "fusion"):
        telme.weights_path(run, phase).unlink()
    partial = telme.evaluate(run, quiet=True)
    assert list(partial) == ["teacher", "audio"]
    for phase in partial:
        assert partial[phase]["test_wf1"] == pytest.approx(results[phase]["test_wf1"], abs=1e-6)


def test_eval_recomputes_the_training_metrics(demo_run):
    out, results = demo_run
    log = (out / "train.log").read_text().splitlines()
    for phase, m in results.items():  # eval's scores are the ones training logged at the best epoch
        line = [l for l in log if l.startswith(f"[{phase:7s}] epoch {m['best_epoch']:2d}/")][0]
        assert f"dev_wf1 {m['dev_wf1']:6.2f} test_wf1 {m['test_wf1']:6.2f}" in line


def test_eval_of_a_run_whose_data_and_cache_moved(demo_run, tmp_path):
    """On another machine the run's config.json names folders that are not there: --data-dir and
    --cache-dir point eval at the data's new place, with the same scores."""
    out, results = demo_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("inputs"))
    shutil.copytree(out / "inputs" / "data", tmp_path / "moved")
    config = json.loads((run / "config.json").read_text())
    config["config"]["data_dir"] = str(tmp_path / "gone")
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="gone"):
        telme.main(["eval", "--run", str(run), "--quiet"])
    telme.main(["eval", "--run", str(run), "--quiet", "--data-dir", str(tmp_path / "moved"),
                "--cache-dir", str(tmp_path / "cache")])
    metrics = json.loads((run / "metrics.json").read_text())
    assert {p: metrics[p]["test_wf1"] for p in telme.PHASES} == {p: results[p]["test_wf1"] for p in telme.PHASES}


def wf1_from_predictions(path: Path) -> dict:
    """{(split, phase): weighted F1 x100} recomputed from predictions.csv."""
    from sklearn.metrics import f1_score
    rows = list(csv.DictReader(path.open()))
    phases = [c[:-len("_prediction")] for c in rows[0] if c.endswith("_prediction")]
    return {(split, p): 100 * f1_score([r["label"] for r in rows if r["split"] == split],
                                       [r[f"{p}_prediction"] for r in rows if r["split"] == split],
                                       average="weighted")
            for split in {r["split"] for r in rows} for p in phases}


def test_predictions_csv_gives_back_the_weighted_f1_of_metrics_json(demo_run):
    out, _ = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    recomputed = wf1_from_predictions(out / "predictions.csv")
    assert {p for _, p in recomputed} == set(telme.PHASES)
    for (split, phase), wf1 in recomputed.items():
        assert wf1 == pytest.approx(metrics[phase][f"{split}_wf1"], abs=1e-6)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    test = telme.load_splits(telme.read_run_config(out))["test"]
    assert [r["utterance"] for r in rows if r["split"] == "test"] == [Path(u.video).stem for u in test]
    assert all(abs(sum(float(r[f"fusion_{c}"]) for c in telme.EMOTIONS["meld"]) - 1) < 1e-4 for r in rows)


def test_eval_on_other_data_writes_its_own_folder_and_leaves_the_run(demo_run, tmp_path, capsys):
    """Labelled clips of one's own (a test CSV and its clips, no train or dev CSV) score into --out;
    the run's metrics.json and report stay as they were."""
    out, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("inputs"))
    before = file_bytes(run)
    other = telme.synth(tmp_path / "other", "meld", dialogues=4, seed=3)
    for split in ("train", "dev"):
        (other / telme.MELD_SPLITS[split][0]).unlink()
    argv = ["eval", "--run", str(run), "--data-dir", str(other), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert "is not the data" in one_line_exit(capsys, argv) and file_bytes(run) == before
    telme.main(argv + ["--out", str(tmp_path / "scored")])
    assert file_bytes(run) == before
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert list(scored) == list(telme.PHASES) and all(m["dev_wf1"] is None for m in scored.values())
    assert str(other) in (tmp_path / "scored" / "report.md").read_text()
    recomputed = wf1_from_predictions(tmp_path / "scored" / "predictions.csv")
    assert {s for s, _ in recomputed} == {"test"}
    for (split, phase), wf1 in recomputed.items():
        assert wf1 == pytest.approx(scored[phase]["test_wf1"], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# 6. Evaluation: report.md
# --------------------------------------------------------------------------------------------------
def markdown_table(lines, first_cell):
    """The rows (as lists of cells) of the markdown table whose header starts with first_cell."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_numbers_equal_metrics_json(demo_run):
    from PIL import Image
    out, _ = demo_run
    run = out
    metrics = json.loads((run / "metrics.json").read_text())
    lines = (run / "report.md").read_text().splitlines()
    phases = markdown_table(lines, "phase")
    assert [r[0] for r in phases] == list(metrics)
    for (phase, best_epoch, dev, test, paper), m in zip(phases, metrics.values()):
        assert (int(best_epoch), dev, test) == (m["best_epoch"], f"{m['dev_wf1']:.2f}", f"{m['test_wf1']:.2f}")
        assert float(paper) == telme.PAPER_WF1["meld"][phase]  # the demo's layout is MELD's
    per_class = markdown_table(lines, "class")
    for name, precision, recall, f1, support in per_class:
        r = metrics["fusion"]["per_class"]["test"][name]
        assert (precision, recall, f1, int(support)) == (
            f"{r['precision']:.2f}", f"{r['recall']:.2f}", f"{r['f1']:.2f}", r["support"])
    counts = np.array(metrics["fusion"]["confusion"]["test"])
    tables = [i for i, line in enumerate(lines) if line.startswith("| true")]
    assert len(tables) == 2
    assert np.array_equal(np.array([r[1:] for r in markdown_table(lines[tables[0]:], "true")], int), counts)
    shares = np.array([r[1:] for r in markdown_table(lines[tables[1]:], "true")], float)
    assert np.allclose(shares, 100 * counts / np.maximum(counts.sum(1, keepdims=True), 1), atol=0.05)
    # The image: one cell per pair of classes, darker where a larger share of the row falls.
    image = np.asarray(Image.open(run / "confusion.png").convert("RGB")).astype(int)
    cell = telme.CONFUSION_CELL
    margin = image.shape[1] - 7 * cell  # the class names' room, left and top
    assert image.shape == (margin + 7 * cell, margin + 7 * cell, 3) and margin > 0
    brightness = np.array([[image[margin + i * cell + 2, margin + j * cell + 2].sum() for j in range(7)]
                           for i in range(7)]).ravel()
    exact = (counts / np.maximum(counts.sum(1, keepdims=True), 1)).ravel()
    assert brightness[exact == 0].min() == 3 * 255  # an empty cell is white
    for a in range(49):  # a larger share of its row: a darker cell
        assert np.all(brightness[exact > exact[a] + 1e-9] < brightness[a])


def test_confusion_png_shows_the_counts_and_the_class_names():
    from PIL import Image
    import io
    classes = telme.EMOTIONS["iemocap"]
    counts = np.arange(36).reshape(6, 6)
    shares = counts / counts.sum(1, keepdims=True)

    def decoded(counts, classes):
        return np.asarray(Image.open(io.BytesIO(telme.confusion_png(counts, shares, classes))).convert("RGB"))

    image = decoded(counts, classes)
    margin = image.shape[1] - 6 * telme.CONFUSION_CELL
    assert image.shape == (margin + 6 * telme.CONFUSION_CELL,) * 2 + (3,)
    # Room for the longest name, and the names are drawn: longer names widen the image.
    assert decoded(counts, [c * 3 for c in classes]).shape[0] > image.shape[0]
    # The number in each cell is drawn: one other count changes only that cell's pixels.
    other = counts.copy()
    other[2, 3] += 1
    changed = np.argwhere((decoded(other, classes) != image).any(-1))
    cell_of = (changed - margin) // telme.CONFUSION_CELL
    assert len(changed) and np.all(changed >= margin) and np.all(cell_of == [2, 3])


# --------------------------------------------------------------------------------------------------
# 6. Evaluation: predict, one new utterance or a CSV of them
# --------------------------------------------------------------------------------------------------
def run_predict(capsys, *args):
    capsys.readouterr()  # only what predict prints
    telme.main(["predict", *map(str, args)])
    return capsys.readouterr().out


def test_predict_gives_eval_probabilities_for_the_same_utterance_and_history(demo_run, tmp_path, capsys):
    out, _ = demo_run
    run = out
    cfg = telme.read_run_config(run)
    test = telme.load_splits(cfg)["test"]
    dialogue = telme.dialogues(test)[1]
    k = 2  # the third utterance: two turns of history
    (tmp_path / "history.txt").write_text("".join(f"{u.speaker}: {u.text}\n" for u in dialogue[:k]))
    u = dialogue[k]
    result = json.loads(run_predict(capsys, "--run", run, "--video", u.video, "--text", u.text,
                                    "--history", tmp_path / "history.txt", "--speaker", u.speaker,
                                    "--all-phases", "--json"))
    outputs = telme.eval_outputs(run, cfg, telme.make_runtime(cfg), {"test": test})["test"]
    row = test.index(u)
    assert result["model"] == "fusion" and result["missing"] == {}
    assert list(result["phases"]) == list(telme.PHASES)
    # Eval runs batches of several clips, predict a batch of one. Text and video do not depend on
    # their batch mates; data2vec-audio's stacked positional convolutions see the zeros that pad a
    # shorter clip in its batch, which moves the audio (and so the fusion) probabilities by ~1e-4.
    tolerance = {"teacher": 1e-5, "visual": 1e-5, "audio": 2e-3, "fusion": 2e-3}
    for phase in telme.PHASES:
        expected = F.softmax(outputs[f"z_{phase}"][row], -1)
        got = torch.tensor(list(result["phases"][phase]["probabilities"].values()))
        assert torch.allclose(got, expected, atol=tolerance[phase]), (phase, got - expected)
        top2 = expected.topk(2).values
        if top2[0] - top2[1] > 2 * tolerance[phase]:  # the class, unless a near tie
            assert result["phases"][phase]["prediction"] == telme.EMOTIONS["meld"][int(expected.argmax())]
    assert result["prediction"] == result["phases"]["fusion"]["prediction"]
    # Without the history the teacher's prompt, hence its probabilities, change.
    alone = json.loads(run_predict(capsys, "--run", run, "--video", u.video, "--text", u.text, "--json"))
    assert alone["probabilities"] != result["probabilities"]


def test_predict_with_missing_modalities_and_a_separate_wav(demo_run, tmp_path, capsys):
    out, _ = demo_run
    run = out
    text, frames, audio = telme.synth_utterance(3, 7, __import__("random").Random(5))
    telme.write_clip(tmp_path / "silent.avi", frames, telme.SYNTH_FPS)  # video stream only
    write_wav(tmp_path / "voice.wav", audio, telme.SYNTH_AUDIO_RATE)
    table = run_predict(capsys, "--run", run, "--video", tmp_path / "silent.avi", "--text", text)
    assert "audio missing" in table and "no audio stream" in table and "visual" not in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "class" not in line]
    assert len(rows) == 7 and abs(sum(float(r.split("|")[2]) for r in rows) - 1) < 1e-3
    both = json.loads(run_predict(capsys, "--run", run, "--video", tmp_path / "silent.avi",
                                  "--audio", tmp_path / "voice.wav", "--text", text, "--json"))
    assert both["missing"] == {} and list(both["phases"]) == ["fusion"]
    text_only = json.loads(run_predict(capsys, "--run", run, "--text", text, "--json"))
    assert set(text_only["missing"]) == {"audio", "video"}
    assert text_only["prediction"] in telme.EMOTIONS["meld"]
    (tmp_path / "bad.txt").write_text("Ross: hi\nno colon here\n")
    with pytest.raises(SystemExit, match=r"bad.txt:2: expected 'Speaker: utterance'"):
        run_predict(capsys, "--run", run, "--text", text, "--history", tmp_path / "bad.txt")
    (tmp_path / "latin1.txt").write_bytes("Ross: café\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"latin1.txt: not UTF-8 text$"):
        run_predict(capsys, "--run", run, "--text", text, "--history", tmp_path / "latin1.txt")


def test_predict_stops_on_what_it_cannot_read_unless_zeros_are_asked_for(demo_run, tmp_path, capsys):
    out, _ = demo_run
    clip = Path(telme.load_splits(telme.read_run_config(out))["test"][0].video)
    bad = {"truncated": clip.read_bytes()[:len(clip.read_bytes()) // 3], "empty": b"", "text": b"not a video\n"}
    for name, data in bad.items():
        (tmp_path / f"{name}.mp4").write_bytes(data)
    (tmp_path / "folder.mp4").mkdir()
    for name, problem in (("truncated", "cannot decode"), ("empty", "empty file (0 bytes)"),
                          ("text", "cannot decode"), ("folder", "is a directory")):
        line = one_line_exit(capsys, ["predict", "--run", str(out), "--text", "Hi", "--video", str(tmp_path / f"{name}.mp4")])
        assert line.startswith(f"telme: {tmp_path / name}.mp4: ") and problem in line, line
    assert "is empty" in one_line_exit(capsys, ["predict", "--run", str(out), "--text", " ", "--video", str(clip)])
    zeros = json.loads(run_predict(capsys, "--run", out, "--text", "Hi", "--video", tmp_path / "text.mp4",
                                   "--missing-as-zeros", "--json"))
    assert set(zeros["missing"]) == {"audio", "video"} and zeros["prediction"] in telme.EMOTIONS["meld"]
    # The Python entry point: a run loaded once, many utterances.
    model = telme.Predictor(out)
    assert model.predict("Hi", video=str(clip))["probabilities"] == json.loads(run_predict(
        capsys, "--run", out, "--text", "Hi", "--video", clip, "--json"))["probabilities"]


def test_predict_csv_gives_eval_predictions_with_or_without_labels(demo_run, tmp_path, capsys):
    out, _ = demo_run
    data = Path(telme.read_run_config(out).data_dir)
    test_csv, clips = (data / name for name in telme.MELD_SPLITS["test"])
    rows = list(csv.DictReader(test_csv.open()))
    write_rows(tmp_path / "mine.csv", [c for c in rows[0] if c != "Emotion"],
               [[r[c] for c in rows[0] if c != "Emotion"] for r in rows])
    telme.main(["predict", "--run", str(out), "--csv", str(test_csv), "--clips", str(clips),
                "--out", str(tmp_path / "labelled.csv")])
    telme.main(["predict", "--run", str(out), "--csv", str(tmp_path / "mine.csv"), "--clips", str(clips),
                "--out", str(tmp_path / "unlabelled.csv")])
    evaluated = [r for r in csv.DictReader((out / "predictions.csv").open()) if r["split"] == "test"]
    for name in ("labelled", "unlabelled"):
        got = list(csv.DictReader((tmp_path / f"{name}.csv").open()))
        assert [r["fusion_prediction"] for r in got] == [r["fusion_prediction"] for r in evaluated]
        assert [r["label"] for r in got] == ([r["label"] for r in evaluated] if name == "labelled" else [""] * len(got))


# --------------------------------------------------------------------------------------------------
# 6. Evaluation: several seeds, mean and std of each phase
# --------------------------------------------------------------------------------------------------
def fake_run(path: Path, seed: int, wf1: dict, seconds=None) -> Path:
    """A run directory holding only what summarize reads."""
    path.mkdir(parents=True)
    metrics = {phase: {"dev_wf1": dev, "test_wf1": test, "best_epoch": 1, "per_class": {}, "confusion": {}}
               for phase, (dev, test) in wf1.items()}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "config.json").write_text(json.dumps({"config": {"seed": seed}, "device": "NVIDIA H100"}))
    if seconds is not None:
        (path / "wall_clock_s").write_text(str(seconds))
    return path


def test_summarize_gives_mean_and_sample_std_per_phase(tmp_path, capsys):
    runs = [fake_run(tmp_path / "seed42", 42, {"teacher": (60, 61), "fusion": (66, 67)}, 100),
            fake_run(tmp_path / "seed43", 43, {"teacher": (62, 63), "fusion": (68, 65)}, 300),
            fake_run(tmp_path / "seed44", 44, {"teacher": (64, 65), "fusion": (67, 69)})]
    telme.main(["summarize", "--out", str(tmp_path), *map(str, runs)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [42, 43, 44] and summary["wall_clock_s"] == [100.0, 300.0, None]
    assert list(summary["phases"]) == ["teacher", "fusion"]
    teacher = summary["phases"]["teacher"]
    assert teacher["n"] == 3 and teacher["dev_wf1"]["mean"] == pytest.approx(62.0)
    assert teacher["dev_wf1"]["std"] == pytest.approx(2.0)  # sample std of 60, 62, 64
    fusion = summary["phases"]["fusion"]["test_wf1"]
    assert fusion["values"] == [67, 65, 69] and fusion["std"] == pytest.approx(2.0)
    table = capsys.readouterr().out
    fusion_row = next(line for line in table.splitlines() if line.startswith("| fusion"))
    assert [" ".join(cell.split()) for cell in fusion_row.strip("|").split("|")] == [
        "fusion", "67.00 ± 1.00", "67.00 ± 2.00", "3"]
    assert "3.3 min per run" in table
    with pytest.raises(SystemExit, match="metrics.json not found"):
        telme.summarize([tmp_path / "seed45"], tmp_path)


def test_summarize_refuses_other_configurations_and_repeated_runs(tmp_path):
    runs = [fake_run(tmp_path / f"seed{seed}", seed, {"fusion": (60, 61)}) for seed in (42, 43)]
    with pytest.raises(SystemExit, match="seed42 repeats .*seed42 \\(seed 42\\)"):
        telme.summarize([runs[0], runs[0]], tmp_path)
    copy = shutil.copytree(runs[0], tmp_path / "copy")
    with pytest.raises(SystemExit, match="copy repeats .*seed42 \\(seed 42\\)"):
        telme.summarize([runs[0], copy], tmp_path)
    config = json.loads((runs[1] / "config.json").read_text())
    config["config"].update(lr=[1e-5] * 3, out="elsewhere", device="cuda:1")
    (runs[1] / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="differ in lr; summarize averages runs that differ in their seed alone"):
        telme.summarize(runs, tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_summarize_a_real_run(demo_run, tmp_path):
    out, results = demo_run
    summary = telme.summarize([out], tmp_path)
    assert summary["phases"]["fusion"]["test_wf1"]["mean"] == pytest.approx(results["fusion"]["test_wf1"])
    assert summary["phases"]["fusion"]["test_wf1"]["std"] == 0.0 and summary["seeds"] == [42]


# --------------------------------------------------------------------------------------------------
# 6. Evaluation: official checkpoints as a telme run
# --------------------------------------------------------------------------------------------------
# telme's module names -> the official code's, written out independently of telme.OFFICIAL_MODULES.
TO_OFFICIAL = {
    "teacher": [("encoder.", "text_model."), ("project.", "W."), ("classifier.", "classifier.")],
    "audio": [("encoder.", "model."), ("classifier.", "W.")],
    "visual": [("encoder.", "model."), ("classifier.", "W.")],
    "fusion": [("attention.", "multihead_attn."), ("student_norm.", "AV_LayerNorm."), ("gate.", "W_hav."),
               ("shift.", "W_av."), ("output_norm.", "LayerNorm."), ("classifier.", "W.")],
}


OFFICIAL_LAYOUT = {"teacher": "teacher.bin", "audio": "student_audio/total_student.bin",
                   "visual": "student_video/total_student.bin", "fusion": "total_fusion.bin"}


def write_official_checkpoint(directory: Path, states: dict) -> None:
    """telme state dicts saved under the official file names and key names (a key of no known
    module kept as it is)."""
    for phase, state in states.items():
        renamed = {}
        for key, value in state.items():
            prefix = next((p for p in TO_OFFICIAL[phase] if key.startswith(p[0])), ("", ""))
            renamed[prefix[1] + key[len(prefix[0]):]] = value
        (directory / OFFICIAL_LAYOUT[phase]).parent.mkdir(parents=True, exist_ok=True)
        torch.save(renamed, directory / OFFICIAL_LAYOUT[phase])


def import_args(demo_out: Path, official: Path, run: Path, *extra):
    models = demo_out / "inputs" / "models"
    return ["import-official", "--dir", str(official), "--dataset", "meld", "--out", str(run),
            "--text-model", str(models / "text"), "--audio-model", str(models / "audio"),
            "--video-model", str(models / "video"), "--data-dir", str(demo_out / "inputs" / "data"),
            "--cache-dir", str(demo_out / "inputs" / "cache"), "--quiet", "--feature-dim", "48", "--image-size", "32",
            "--max-text-tokens", "48", "--max-audio-samples", "48000", "--batch-size", "8", *extra]


def test_import_official_gives_the_logits_of_the_same_weights_in_telme(demo_run, tmp_path):
    out, _ = demo_run
    from safetensors.torch import load_file
    states = {phase: load_file(out / f"{phase}.safetensors") for phase in ("teacher", "audio", "visual")}
    torch.manual_seed(5)
    fusion = telme.ShiftingFusion(48, 7, 3, 0.2, 0.1, "batch").eval()  # the official scope (D2)
    states["fusion"] = fusion.state_dict()
    write_official_checkpoint(tmp_path / "save_model", states)
    run = tmp_path / "imported"
    telme.main(import_args(out, tmp_path / "save_model", run, "--compat", "none"))
    config = json.loads((run / "config.json").read_text())
    assert config["official_behaviours"]["D2"] and not config["official_behaviours"]["D1"]

    reference_cfg = telme.read_run_config(out)
    imported_cfg = telme.read_run_config(run)
    rt = telme.Runtime(torch.device("cpu"))
    splits = {s: u for s, u in telme.load_splits(reference_cfg).items() if s in ("dev", "test")}
    reference = telme.frozen_outputs(reference_cfg, rt, out, splits)
    imported = telme.frozen_outputs(imported_cfg, rt, run, splits)
    loaded = telme.ShiftingFusion(48, 7, 3, 0.2, 0.1, "batch")
    telme.load_weights(loaded, telme.weights_path(run, "fusion"))
    for split in splits:
        for name, value in reference[split].items():
            assert torch.equal(value, imported[split][name]), (split, name)
        with torch.no_grad():  # the whole split as one batch both times: D2 mixes batch mates
            args = [imported[split][f"f_{p}"] for p in ("teacher", "audio", "visual")]
            assert torch.equal(loaded.eval()(*args), fusion(*args))
    # eval runs on the imported directory and scores every phase.
    results = telme.evaluate(run, quiet=True)
    assert list(results) == list(telme.PHASES)
    for phase in ("teacher", "audio", "visual"):
        assert results[phase]["test_wf1"] == pytest.approx(
            telme.split_scores(reference["test"][f"z_{phase}"], reference["test"]["label"].numpy(),
                               telme.EMOTIONS["meld"])["wf1"])


def test_import_official_records_compat_and_names_bad_keys(demo_run, tmp_path):
    out, _ = demo_run
    from safetensors.torch import load_file
    states = {phase: load_file(out / f"{phase}.safetensors") for phase in ("teacher", "audio", "visual")}
    states["fusion"] = telme.ShiftingFusion(48, 7, 3, 0.2, 0.1, "batch").state_dict()
    write_official_checkpoint(tmp_path / "good", states)
    telme.main(import_args(out, tmp_path / "good", tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["compat"] == "official"
    assert config["official_behaviours"] == {f"D{i}": True for i in range(1, 17) if i != 9}
    for phase in telme.PHASES:
        assert (tmp_path / "run" / f"{phase}.safetensors").is_file()
    # A missing and an unexpected key, both named as the official code names them.
    del states["teacher"]["classifier.bias"]
    states["teacher"]["pooler.dense.weight"] = torch.zeros(2)
    write_official_checkpoint(tmp_path / "bad", states)
    bad_keys = r"missing keys: classifier\.bias; unexpected keys: pooler\.dense\.weight"
    with pytest.raises(SystemExit, match=bad_keys):
        telme.main(import_args(out, tmp_path / "bad", tmp_path / "bad_run"))
    assert not (tmp_path / "bad_run").exists()
    # A fusion whose attention is per modality (768 wide) does not fit the official one.
    states = {p: s for p, s in states.items() if p != "teacher"}
    states["fusion"] = telme.ShiftingFusion(48, 7, 3, 0.2, 0.1, "modality").state_dict()
    write_official_checkpoint(tmp_path / "good", {"fusion": states["fusion"]})
    bad_shape = r"shape mismatches: multihead_attn\.in_proj_bias \(144,\) \(expected \(288,\)\)"
    with pytest.raises(SystemExit, match=bad_shape):
        telme.main(import_args(out, tmp_path / "good", tmp_path / "bad_run"))


# --------------------------------------------------------------------------------------------------
# 7. Synthetic data and the offline demo
# --------------------------------------------------------------------------------------------------
def test_demo_metrics_contract_and_fusion_beats_teacher(demo_run):
    out, results = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["teacher", "audio", "visual", "fusion"]
    for m in metrics.values():
        assert {"dev_wf1", "test_wf1", "best_epoch", "per_class", "confusion"} <= set(m)
        assert set(m["per_class"]["test"]) == set(telme.EMOTIONS["meld"])
        assert {"precision", "recall", "f1", "support"} == set(m["per_class"]["test"]["joy"])
        matrix = np.array(m["confusion"]["test"])
        assert matrix.shape == (7, 7) and matrix.sum() == sum(
            r["support"] for r in m["per_class"]["test"].values())
        assert m["best_epoch"] >= 1
    assert metrics["fusion"]["test_wf1"] >= metrics["teacher"]["test_wf1"] + 5
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["tau"] == 4.0 and "torch" in config["versions"]
    for phase in telme.PHASES:
        assert (out / f"{phase}.safetensors").is_file()


def test_the_demo_replaces_only_a_demo_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "teacher.safetensors").write_bytes(b"weights")
    (run / "config.json").write_text(json.dumps({"config": {"data_dir": "/data/MELD.Raw"}}))
    with pytest.raises(SystemExit, match="holds a run that is not a demo's; choose another --out"):
        telme.demo(run)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "teacher.safetensors"]


# --------------------------------------------------------------------------------------------------
# 8. Benchmark
# --------------------------------------------------------------------------------------------------
def test_bench_phase_times_a_full_size_fusion_with_the_batches_training_and_eval_use():
    utterances = [telme.Utterance(str(i), "A", "", i % 7, "unused.mp4", "unused.mp4") for i in range(8)]
    # ShiftingFusion at dim 768, 7 classes; D2 attends over 1536-wide samples, evaluated in batches of 4.
    for asf_attention, eval_batch, millions in (("modality", 16, 5.32), ("batch", 4, 12.40)):
        cfg = telme.make_config("meld", quiet=True, eval_batch_size=16, asf_attention=asf_attention)
        result = telme.bench_phase(("fusion", cfg, utterances, (1, 2), (1, 2), 0))
        assert result["phase"] == "fusion" and result["eval_batch"] == eval_batch
        assert result["parameters_m"] == pytest.approx(millions, abs=0.01)


def test_bench_names_an_unknown_phase_before_it_builds_anything(tmp_path):
    with pytest.raises(SystemExit, match="--phases takes teacher,audio,visual,fusion, not teachr"):
        telme.bench(telme.make_config("meld"), tmp_path, 1, None, "b", phases=("teachr",))
    assert not any(tmp_path.iterdir())


def test_projection_follows_the_measured_rates_and_the_recipe(capsys):
    """Twice as fast everywhere, half the hours; more epochs or smaller batches, more hours; the
    printed total is the sum of the phases."""
    def projected(rate, start_s, fusion_epoch_s, **recipe):
        steps = [{"phase": p, "steps_per_s": rate, "eval_batches_per_s": 2 * rate, "eval_batch": 16,
                  "start_s": start_s} for p in telme.PHASES]
        results = {"steps": steps, "fusion_epoch_s": fusion_epoch_s}
        telme.print_projection(results, telme.make_config("meld", **recipe))
        return results["projected_hours"]

    base = projected(1.0, 30.0, 60.0)
    assert f"total {sum(base.values()):.2f} h" in capsys.readouterr().out
    fast = projected(2.0, 15.0, 30.0)
    assert fast == pytest.approx({p: h / 2 for p, h in base.items()})
    once, twice = projected(1.0, 0.0, 60.0), projected(1.0, 0.0, 60.0, epochs=(20, 20, 20))
    assert twice["teacher"] == pytest.approx(2 * once["teacher"])  # epochs alone
    # The students and the fusion also pay passes of the frozen encoders that run once.
    assert all(once[p] < twice[p] < 2 * once[p] for p in ("students", "fusion"))
    assert projected(1.0, 0.0, 60.0, batch_size=2)["teacher"] > once["teacher"]


# --------------------------------------------------------------------------------------------------
# 9. Command line: bad flags, --help, --resume, --threads
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, problem", [
    (["--epochs", "0"], "--epochs must be at least 1, not 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--lr", "-1e-3"], "--lr must be above 0, not -0.001"),
    (["--lr=-1e-3"], "--lr must be above 0, not -0.001"),
    (["--dropout", "1"], "--dropout must be below 1, not 1.0"),
    (["--text-model", "/no/such/dir"], "--text-model /no/such/dir: no such directory"),
    (["--audio-model", "./models/audio"], "--audio-model ./models/audio: no such directory"),
    (["--video-model", "models/no/video"], "--video-model models/no/video: no such directory"),
    (["--text-model", "nobody-telme/no-such-model"], "not in the Hugging Face cache"),
    (["--device", "tpu9"], "--device tpu9: expected auto, cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "--device cuda: torch sees no CUDA GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")),
])
def test_each_bad_setting_is_one_line_within_seconds_and_writes_nothing(tiny_setup, capsys, monkeypatch,
                                                                        extra, problem):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as with HF_HUB_OFFLINE=1
    cfg = tiny_setup("bad")
    line = one_line_exit(capsys, ["train", *cli_flags(cfg), *extra])
    assert line.startswith("telme: ") and problem in line, line
    assert not Path(cfg.out).exists()


def test_a_bad_flag_exits_1_with_one_line_on_stderr():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, telme.__file__, "train", "--data-dir", ".", "--lr", "-1e-3"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == "telme: --lr must be above 0, not -0.001\n"


def test_help_is_complete(capsys):
    parser = telme.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        text = command.format_help()
        assert "[default: ]" not in text, name
        assert "--threads" in text, name
        assert all(action.help for action in command._actions), (name, [a.dest for a in command._actions if not a.help])


def test_resume_keeps_the_run_configuration(tmp_path):
    telme.write_run_config(telme.make_config("meld", out=str(tmp_path), seed=7), telme.make_runtime(
        telme.make_config("meld", device="cpu")), tmp_path)
    parser = telme.build_parser()
    cfg = telme.resume_config(parser.parse_args(["train", "--resume", str(tmp_path), "--device", "cpu"]))
    assert cfg.seed == 7 and cfg.device == "cpu" and cfg.out == str(tmp_path)
    with pytest.raises(SystemExit, match="--lr cannot be changed"):
        telme.resume_config(parser.parse_args(["train", "--resume", str(tmp_path), "--lr", "1e-3"]))
    # How steps run may change: a compiled run that fails to compile resumes eagerly, and back.
    assert telme.resume_config(parser.parse_args(["train", "--resume", str(tmp_path), "--compile"])).compile
    # The run's own values may be repeated (run.sh repeats its whole command when it resumes).
    same = ["--dataset", "meld", "--seed", "7", "--lr", "1e-6,1e-5,1e-5", "--out", str(tmp_path / ".")]
    assert telme.resume_config(parser.parse_args(["train", "--resume", str(tmp_path), *same])).seed == 7
    with pytest.raises(SystemExit, match="--seed cannot be changed"):
        telme.resume_config(parser.parse_args(["train", "--resume", str(tmp_path), "--seed", "42"]))
    with pytest.raises(SystemExit, match="name different runs"):
        telme.resume_config(parser.parse_args(["train", "--resume", str(tmp_path), "--out", "elsewhere"]))


# --------------------------------------------------------------------------------------------------
# 9. Command line: the run.sh driver, the Docker image
# --------------------------------------------------------------------------------------------------
def stand_in_run_sh(tmp_path, line="$*", make_out=True):
    """run.sh with a stand-in python that appends `line` (by default the telme.py command it is
    given) to tmp_path/calls, and makes the --out folder; MELD_DIR and TELME_OUT (tmp_path/runs) set.
    Returns a function that runs `bash run.sh ARGS...`, and the log file."""
    import subprocess
    log, fake = tmp_path / "calls", tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "{line}" >> {log}\n' + (
        'while (($#)); do [[ $1 == --out ]] && mkdir -p "$2"; shift; done\n' if make_out else ""))
    fake.chmod(0o755)
    (tmp_path / "meld").mkdir()
    (tmp_path / "meld" / "train_sent_emo.csv").write_text("")
    env = {"PATH": "/usr/bin:/bin", "TELME_PYTHON": str(fake), "MELD_DIR": str(tmp_path / "meld"),
           "TELME_OUT": str(tmp_path / "runs")}
    script = Path(telme.__file__).parent / "run.sh"
    return lambda *args: subprocess.run(["bash", str(script), *args], env=env, check=True), log


def test_threads_reach_torch_and_run_sh_passes_them(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    data = telme.synth(tmp_path / "data", "meld", dialogues=1)
    try:
        for n in (1, 2):
            telme.main(["stats", "--data-dir", str(data), "--threads", str(n)])
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert telme.default_threads("train") == 3 and telme.default_threads("demo") == telme.DEMO_THREADS
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert telme.default_threads("eval") == len(os.sched_getaffinity(0))
    run_sh, log = stand_in_run_sh(tmp_path)
    run_sh("meld", "--threads", "1")
    calls = log.read_text().splitlines()
    assert len(calls) == 5 and all(c.endswith("--threads 1") for c in calls)  # prepare, 3 phases, eval


def test_run_sh_seeds_runs_the_recipe_once_per_seed_then_summarizes(tmp_path):
    run_sh, log = stand_in_run_sh(tmp_path)
    run_sh("meld", "--seeds", "2", "--lr", "1e-5")
    calls = log.read_text().splitlines()
    assert calls[0].startswith("telme.py prepare --dataset meld") and calls[0].endswith("--lr 1e-5")
    # The recipe compiles the training steps; the user's flags come after, so --no-compile wins.
    assert all(c.endswith("--compile --lr 1e-5") or "--compile --lr 1e-5 --seed" in c
               for c in calls if c.startswith(("telme.py prepare", "telme.py train")))
    runs = tmp_path / "runs"
    for seed in (42, 43):
        assert sum(f"--out {runs}/seed{seed} " in c and c.endswith(f"--seed {seed}") and "--lr 1e-5" in c
                   for c in calls) == 3  # teacher, students, fusion
        assert f"telme.py eval --run {runs}/seed{seed}" in calls
        assert (runs / f"seed{seed}" / "wall_clock_s").read_text().strip().isdigit()
    assert calls[-1] == f"telme.py summarize --out {runs} {runs}/seed42 {runs}/seed43"
    log.unlink()
    run_sh("demo", "iemocap", "--seeds", "2", "--quiet")
    assert log.read_text().splitlines() == [
        f"telme.py demo --dataset iemocap --out {runs}/seed42 --seed 42 --quiet",
        f"telme.py demo --dataset iemocap --out {runs}/seed43 --seed 43 --quiet",
        f"telme.py summarize --out {runs} {runs}/seed42 {runs}/seed43"]


def test_run_sh_resumes_a_run_it_began(tmp_path):
    """Run again on a folder that holds a run (config.json), the recipe resumes it: every train call
    carries --resume, and no wall-clock is written for a run done in parts."""
    run_sh, log = stand_in_run_sh(tmp_path, make_out=False)
    out = tmp_path / "runs"
    out.mkdir()
    run_sh("meld")
    trains = [c for c in log.read_text().splitlines() if c.startswith("telme.py train")]
    assert len(trains) == 3 and not any("--resume" in c for c in trains)
    assert (out / "wall_clock_s").is_file()
    (out / "wall_clock_s").unlink()
    log.unlink()
    (out / "config.json").write_text("{}")
    run_sh("meld")
    trains = [c for c in log.read_text().splitlines() if c.startswith("telme.py train")]
    assert len(trains) == 3 and all(c.endswith(f"--resume {out}") for c in trains)
    assert not (out / "wall_clock_s").exists()


def test_run_sh_seeds_with_gpus_places_one_seed_per_gpu_then_summarizes(tmp_path):
    """--seeds 3 --gpus 2: seeds 42 and 43 on GPUs 0 and 1, then 44 on GPU 0; the summary last."""
    run_sh, log = stand_in_run_sh(tmp_path, line="gpu=${CUDA_VISIBLE_DEVICES:-none} $*")
    runs = tmp_path / "runs"
    run_sh("meld", "--seeds", "3", "--gpus", "2")
    calls = log.read_text().splitlines()
    for seed, gpu in ((42, 0), (43, 1), (44, 0)):
        mine = [c for c in calls if f"--out {runs}/seed{seed} " in c or c.endswith(f"--run {runs}/seed{seed}")]
        assert len(mine) == 4 and all(c.startswith(f"gpu={gpu} ") for c in mine), mine
        assert "--gpus" not in " ".join(mine)
    assert calls[-1] == f"gpu=none telme.py summarize --out {runs} {runs}/seed42 {runs}/seed43 {runs}/seed44"


def test_dockerfile_builds_from_what_the_repository_holds():
    """The base image's torch is the one requirements.txt pins, every file the image copies is in the
    repository, nothing runs telme at build time, and the container's user is not root."""
    here = Path(telme.__file__).parent
    lines = (here / "Dockerfile").read_text().splitlines()
    pins = dict(line.split("==") for line in (here / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    base = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(base) == 1 and base[0].startswith(f"pytorch/pytorch:{pins['torch']}-cuda")
    copied = [name for line in lines if line.startswith("COPY ")
              for name in line.split()[1:-1] if not name.startswith("--")]
    assert "requirements.txt" in copied and all((here / name).is_file() for name in copied)
    assert not any("telme.py" in line or "run.sh" in line for line in lines if line.startswith("RUN "))
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and not user[-1].startswith(("root", "0"))
    ignored = (here / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data"} <= set(ignored)
