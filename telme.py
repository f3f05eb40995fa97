"""TelME: Teacher-leading Multimodal Fusion Network for Emotion Recognition in Conversation.

A single-file reference implementation of Yun et al., NAACL 2024 (arXiv:2401.12987). A text teacher
(RoBERTa over the dialogue history) distils its knowledge into an audio student (data2vec-audio) and
a visual student (TimeSformer); an attention-based shifting fusion then moves the teacher's feature
by a bounded amount in the direction the students point to.

Commands (README.md; `python telme.py CMD --help` lists every flag; --threads 1 on a shared CPU):
    python telme.py demo                                    # synthetic data, tiny models, CPU, minutes
    python telme.py prepare --dataset meld --data-dir MELD.Raw          # decode every clip once
    python telme.py train   --dataset meld --data-dir MELD.Raw --out runs/meld   # --resume, --overwrite
    torchrun --nproc_per_node=8 telme.py train --dataset meld --data-dir MELD.Raw --out runs/meld
    python telme.py eval    --run runs/meld        # metrics.json, report.md, predictions.csv (--out: other data)
    python telme.py predict --run runs/meld --video clip.mp4 --text "Oh my God!" --history dialogue.txt
    python telme.py predict --run runs/meld --csv my.csv --clips my_clips --out predictions.csv
    python telme.py summarize --out runs/meld runs/meld/seed42 runs/meld/seed43    # mean ± std
    python telme.py import-official --dir save_model/ --dataset meld   # the official weights, for eval
    python telme.py stats   --dataset meld --data-dir MELD.Raw      # dialogue, utterance and class counts
    python telme.py synth   --out data/synth --dialogues 40        # a synthetic dataset in MELD's layout
    python telme.py bench                                   # decoding, cache and training-speed table

Map of the file (paper order), and where each piece of the paper lives:
    Config and presets ............ Config: every flag, with where its value comes from; PRESETS
    1. Data ....................... read_meld_csv, read_iemocap: CSV -> dialogues; teacher_input_ids:
                                    the teacher's prompt; MediaCache: clips decoded once
                                    (decode_audio, decode_frames)
    2. Encoders ................... TextTeacher (F_T), AudioStudent (F_A), VisualStudent (F_V)
    3. Distillation (3.3) ......... dist_loss (L_resp, response level), feature_kd_loss (L_feat,
                                    feature level), student_loss (L = CE + alpha L_resp + beta L_feat)
    4. Shifting fusion (3.4) ...... ShiftingFusion (ASF): attention over [F_A, F_V], gate g, shift H,
                                    its bound lam, Z = LN(F_T + lam H)
    5. Training (3.5) ............. train -> train_teacher, train_students, train_fusion, each through
                                    fit: the best dev epoch, the lr schedule (schedule_lengths),
                                    checkpoints for --resume, DistributedDataParallel under torchrun
    6. Evaluation ................. split_scores (weighted F1), evaluate (metrics.json), write_report
                                    (report.md, confusion.png), write_predictions; Predictor, predict_csv;
                                    summarize; import_official
    7. Synthetic data and demo .... synth (the label split across modalities), write_tiny_models, demo
    8. Benchmark .................. bench: decoding, the caches and full-size training steps
    9. Command line ............... main
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import math
import multiprocessing
import os
import pickle
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
import torchaudio
import transformers
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from safetensors.torch import load_file, save
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer


# ==================================================================================================
# Config and presets
# ==================================================================================================
@dataclass
class Config:
    dataset: str = "meld"
    """meld or iemocap; selects the class set and the dataset's preset of the official values"""
    data_dir: str = ""
    """the dataset as released (MELD.Raw or IEMOCAP_full_release); prepare and train need it"""
    cache_dir: str = ""
    """decoded-media cache; default: $TELME_CACHE or ~/.cache/telme"""
    out: str = ""
    """run directory for weights, config.json and metrics.json; default: runs/<dataset>"""
    text_model: str = "FacebookAI/roberta-large"
    """teacher encoder: any Hugging Face masked-LM encoder, hub name or local directory (paper: RoBERTa-large)"""
    audio_model: str = "facebook/data2vec-audio-base-960h"
    """audio student encoder, hub name or local directory (paper)"""
    video_model: str = "facebook/timesformer-base-finetuned-k400"
    """visual student encoder, hub name or local directory (paper)"""
    epochs: tuple = (10, 10, 10)
    """epochs of the teacher, student and fusion phases; one number sets all three (official code)"""
    lr: tuple = (1e-6, 1e-5, 1e-5)
    """AdamW learning rate of the teacher, student and fusion phases; one number sets all three (official code)"""
    batch_size: int = 4
    """utterances per optimiser step, every phase (official code)"""
    eval_batch_size: int = 16
    """utterances per forward-only batch (evaluation, frozen outputs); audio and D2 keep batch_size"""
    seed: int = 42
    """seed for python, numpy, torch and the data order (official code)"""
    device: str = "auto"
    """auto (cuda when present, else cpu), cpu, cuda, cuda:N"""
    amp: str = "bf16"
    """autocast on CUDA: bf16, fp16 (with a gradient scaler) or off; always off on a CPU"""
    compile: bool = False
    """torch.compile each phase's training step (inductor): minutes to compile, then less host time per step"""
    compile_mode: str = "default"
    """--compile's mode: default, or reduce-overhead (CUDA graphs, one per shape; clipping and AdamW compiled too)"""
    max_text_tokens: int = 512
    """teacher input length: the last max_text_tokens-1 tokens of history+prompt, then the mask (paper)"""
    max_audio_samples: int = 400000
    """audio kept per utterance, the last samples at 16 kHz (official code: 25 s)"""
    text_bucket: int = 0
    """pad prompts to a multiple of this many tokens, at most max_text_tokens (outputs equal to rounding); 0: off"""
    audio_buckets: bool = False
    """pad audio batches to 0.25 x 2^k s, at most max_audio_samples (static shapes; F_A moves slightly: README)"""
    audio_rate: int = 16000
    """sample rate the audio encoder was trained on (data2vec-audio: 16 kHz)"""
    num_frames: int = 8
    """frames sampled uniformly over each clip for the visual student (TimeSformer-base: 8)"""
    image_size: int = 224
    """short side resize, then centre crop, in pixels (TimeSformer-base: 224)"""
    feature_dim: int = 768
    """width of F_T, F_A, F_V; the teacher projects to it, the students' hidden size must equal it (paper)"""
    mask_time_length: int = 3
    """data2vec-audio SpecAugment span; the released 10 fails on short clips (official code: 3)"""
    tau: float = 4.0
    """temperature of the response-level distillation (official code, MELD)"""
    alpha: float = 1.0
    """weight of the response-level distillation loss (official code, MELD)"""
    beta: float = 1.0
    """weight of the feature-level distillation loss (official code)"""
    kd_temperature: float = 1.0
    """temperature t of the feature-level similarity softmaxes (official code)"""
    theta: float = 0.1
    """shifting fusion: the displacement's norm is at most theta times the teacher's (official code, MELD)"""
    heads: int = 3
    """attention heads of the shifting fusion (official code, MELD)"""
    dropout: float = 0.2
    """dropout of the shifting fusion (official code)"""
    asf_attention: str = "modality"
    """modality: attend over [F_A, F_V] of each utterance; batch: across the batch as the official code (D2)"""
    warmup_epochs: float = 1.0
    """linear warmup length in epochs, then linear decay to 0 (official code)"""
    grad_clip: float = 10.0
    """gradient-norm clipping threshold, applied to unscaled gradients (official code)"""
    compat: str = "none"
    """none: telme's fixes; official: the official code's D1-D16 (README: Differences; D8, D10 MELD only; no D9)"""
    official_audio_rate: bool = False
    """D1: decode audio at 22050 Hz but feed it as 16 kHz, as the official code (pitch and speed x0.73)"""
    official_audio_pooling: bool = False
    """D3: audio left-padded without attention mask, F_A = frame 0 (official code)"""
    official_schedule: bool = False
    """D4: warmup and decay lengths counted in samples, not optimiser steps (official code)"""
    official_clipping: bool = False
    """D5: under --amp fp16 (set by --compat official), clip scaled gradients before unscaling (official code)"""
    official_speakers: bool = False
    """D6: speaker indices as the official preprocessing gives them (prompt_speakers)"""
    official_frames: bool = False
    """D7: frames in BGR order, normalised with VideoMAE's (ImageNet) statistics (official code)"""
    official_long_clips: bool = False
    """D8: clips longer than 30 s replaced by zeros (official MELD code; --compat official sets it on MELD only)"""
    official_text: bool = False
    """D10: MELD text keeps the CSV's C1 control characters, not the punctuation they stood for (official code)"""
    official_frame_indices: bool = False
    """D11: the official frame rule: MELD every (N//8)-th of N frames; IEMOCAP every step-th in [start-1 s, end+1 s]"""
    official_audio_normalisation: bool = False
    """D12: the whole clip normalised to zero mean and unit variance before its tail is kept (official code)"""
    official_audio_padding: bool = False
    """D13: with D3, a batch padded to its longest clip only, with no 0.25 s minimum (official code)"""
    official_precision: bool = False
    """D14: teacher in fp32; students (one gradient scaler for both) and fusion under --amp; eval in fp32 (official)"""
    official_fusion_batches: bool = False
    """D15: with D3, fusion training recomputes F_T, F_A, F_V in every shuffled batch, as the official code (slower)"""
    official_cudnn: bool = False
    """D16: cudnn.deterministic on and cudnn.benchmark off, as the official seeding (slower convolutions on CUDA)"""
    workers: int = 0
    """processes decoding media in prepare; 0 means every core"""
    loader_workers: int = -1
    """DataLoader workers while training; -1 means 4 on CUDA, 0 on a CPU"""
    quiet: bool = False
    """no progress bars, nor the line a minute that replaces them when stderr is not a terminal"""
    strict: bool = False
    """any missing or undecodable clip exits non-zero before training (default: that modality replaced by zeros)"""


# The official code's values per dataset; applied before command-line flags.
PRESETS = {
    "meld": dict(lr=(1e-6, 1e-5, 1e-5), epochs=(10, 10, 10), tau=4.0, alpha=1.0, beta=1.0,
                 theta=0.1, heads=3, dropout=0.2),
    "iemocap": dict(lr=(1e-5, 1e-5, 1e-5), epochs=(10, 10, 8), tau=2.0, alpha=0.1, beta=1.0,
                    theta=0.2, heads=4, dropout=0.2),
}
PHASES = ("teacher", "audio", "visual", "fusion")
AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}  # --amp
# The official code's behaviours that telme fixes by default (README: Differences), each with its switch;
# D2 is the fusion's attention scope (asf_attention "batch"), D9 concerns only the official inference.
OFFICIAL_SWITCHES = {"D1": "official_audio_rate", "D3": "official_audio_pooling", "D4": "official_schedule",
                     "D5": "official_clipping", "D6": "official_speakers", "D7": "official_frames",
                     "D8": "official_long_clips", "D10": "official_text", "D11": "official_frame_indices",
                     "D12": "official_audio_normalisation", "D13": "official_audio_padding",
                     "D14": "official_precision", "D15": "official_fusion_batches", "D16": "official_cudnn"}
# Each numeric flag's smallest value and whether that value is allowed; each textual flag's values (make_config).
LOWER_BOUNDS = {"epochs": (1, True), "lr": (0, False), "batch_size": (1, True), "eval_batch_size": (1, True),
                "max_text_tokens": (2, True), "text_bucket": (0, True), "max_audio_samples": (1, True),
                "audio_rate": (1, True), "num_frames": (1, True), "image_size": (1, True), "feature_dim": (1, True),
                "mask_time_length": (1, True), "tau": (0, False), "alpha": (0, True), "beta": (0, True),
                "kd_temperature": (0, False), "theta": (0, True), "heads": (1, True), "dropout": (0, True),
                "warmup_epochs": (0, True), "grad_clip": (0, False), "workers": (0, True), "loader_workers": (-1, True)}
CHOICES = {"asf_attention": ("modality", "batch"), "amp": tuple(AUTOCAST_TYPES),
           "compile_mode": ("default", "reduce-overhead"), "compat": ("none", "official")}


def make_config(dataset: str = "meld", **overrides) -> Config:
    """The dataset's preset, then the overrides; derived defaults resolved once here."""
    if dataset not in PRESETS:
        raise SystemExit(f"telme: unknown dataset {dataset!r}; expected one of {sorted(PRESETS)}")
    cfg = Config(dataset=dataset, **{**PRESETS[dataset], **overrides})
    for name in ("epochs", "lr"):  # one number sets all three phases
        value = getattr(cfg, name)
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if len(value) not in (1, 3):
            raise SystemExit(f"telme: --{name} takes one value or three (teacher,students,fusion), "
                             f"not {len(value)}: {','.join(map(str, value))}")
        setattr(cfg, name, value * 3 if len(value) == 1 else value)
    cfg.cache_dir = cfg.cache_dir or os.environ.get("TELME_CACHE", str(Path.home() / ".cache" / "telme"))
    cfg.out = cfg.out or f"runs/{cfg.dataset}"
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"telme: --{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                             f"not {getattr(cfg, name)!r}")
    if cfg.compat == "official":  # D1-D16 together; without it each switch keeps its own value
        cfg.asf_attention = "batch"  # D2
        cfg.amp = "fp16"  # the official code's autocast and gradient scaler, which D5 is about
        for d, name in OFFICIAL_SWITCHES.items():  # the official IEMOCAP code has no D8 rule, its text no C1 (D10)
            if d not in ("D8", "D10") or cfg.dataset == "meld":
                setattr(cfg, name, True)
    for name in ("official_audio_padding", "official_fusion_batches"):
        if getattr(cfg, name) and not cfg.official_audio_pooling:
            raise SystemExit(f"telme: --{name.replace('_', '-')} needs --official-audio-pooling (D3)")
    if cfg.audio_buckets and cfg.official_audio_pooling:
        raise SystemExit("telme: --audio-buckets pads beyond the official audio padding; "
                         "not with --official-audio-pooling (D3) or --compat official")
    for name, (low, inclusive) in LOWER_BOUNDS.items():
        values = getattr(cfg, name)
        for value in values if isinstance(values, tuple) else (values,):
            if not (value >= low if inclusive else value > low):  # also catches nan
                raise SystemExit(f"telme: --{name.replace('_', '-')} must be "
                                 f"{'at least' if inclusive else 'above'} {low}, not {value}")
    if not cfg.dropout < 1:
        raise SystemExit(f"telme: --dropout must be below 1, not {cfg.dropout}")
    attended = cfg.feature_dim * (2 if cfg.asf_attention == "batch" else 1)  # see ShiftingFusion
    if attended % cfg.heads:
        raise SystemExit(f"telme: --heads {cfg.heads} does not divide the fusion's attention width "
                         f"{attended} (--feature-dim {cfg.feature_dim}, --asf-attention {cfg.asf_attention})")
    return cfg


def compat_switches(cfg: Config) -> dict[str, bool]:
    """Which of the official code's behaviours D1-D16 are on (True) in this configuration."""
    switches = {"D2": cfg.asf_attention == "batch"} | {d: getattr(cfg, name) for d, name in OFFICIAL_SWITCHES.items()}
    return dict(sorted(switches.items(), key=lambda item: int(item[0][1:])))


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (they become the --help texts)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}


# ==================================================================================================
# 1. Data
# ==================================================================================================
EMOTIONS = {
    "meld": ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"],
    "iemocap": ["ang", "exc", "fru", "hap", "neu", "sad"],
}
# MELD as released: the CSV of each split and the folder of its clips.
MELD_SPLITS = {
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
MELD_COLUMNS = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID",
                "Utterance_ID", "Season", "Episode", "StartTime", "EndTime"]
MELD_REQUIRED = ["Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID"]
# The MELD CSVs hold C1 control characters (cp1252 bytes read as latin-1) where punctuation was: those seen
# in MELD become plain ASCII, any other its cp1252 meaning (the five cp1252 leaves undefined are dropped).
MELD_C1_PUNCTUATION = str.maketrans({
    **{chr(b): bytes([b]).decode("cp1252", errors="ignore") for b in range(0x80, 0xa0)},
    "\x91": "'", "\x92": "'", "\x93": '"', "\x94": '"', "\x85": "...", "\x96": "-", "\x97": "-", "\xa0": " ",
})

# IEMOCAP as released (README: Data). Test: Session 5; dev: the 12 Session 1-4 dialogues of the official
# code's IEMOCAP_dev.csv (647 utterances), which chose the paper's best epochs; train: the other 108.
IEMOCAP_SESSIONS = ("Session1", "Session2", "Session3", "Session4", "Session5")
IEMOCAP_TEST_SESSION = "Session5"
IEMOCAP_DEV_DIALOGUES = frozenset({
    "Ses01M_impro01", "Ses01M_script03_1", "Ses02F_impro02", "Ses02F_impro07", "Ses02M_script01_2",
    "Ses03F_impro01", "Ses03M_impro02", "Ses03M_impro08a", "Ses03M_script02_2", "Ses03M_script03_2",
    "Ses04F_impro07", "Ses04F_script02_1"})
IEMOCAP_DROPPED = {"xxx", "oth", "sur", "fea", "dis"}  # labels outside the paper's six classes
# `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`; other transcription lines are not turns.
IEMOCAP_TURN = re.compile(r"^(\S+) \[(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)\]:\s?(.*)$")
# The official code's split CSVs; their paths begin with IEMOCAP_CSV_PREFIX, read as --data-dir.
IEMOCAP_CSV = {split: f"IEMOCAP_{split}.csv" for split in ("train", "dev", "test")}
IEMOCAP_COLUMNS = ["Utterance", "Speaker", "Dialogue_ID", "Start_Time", "End_Time", "Wav_Path",
                   "Video_Path", "Emotion"]
IEMOCAP_CSV_PREFIX = "./dataset/IEMOCAP_full_release/"


@dataclass
class Utterance:
    dialogue: str  # dialogue id, unique within its split
    speaker: str
    text: str
    label: int  # index into EMOTIONS[dataset]
    video: str  # clip holding the utterance's frames
    audio: str  # file holding the utterance's sound (the same clip on MELD)
    start: float | None = None  # window inside `video` (IEMOCAP: the dialogue's avi), seconds
    end: float | None = None


class DataError(Exception):
    """Bad dataset input; the message names the file, the row and the problem."""


def csv_rows(path: Path, columns: list[str]):
    """(row number, row) of a dataset CSV, row 1 the header; checks that it holds `columns`, rows with every field,
    and each dialogue's rows together (the teacher's history is the rows before: a split dialogue would be two)."""
    row_number = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(f"{path}:1: empty file; expected a header with {', '.join(columns)}")
            missing = [c for c in columns if c not in reader.fieldnames]
            if missing:
                raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}")
            last_row = {}  # each dialogue's last row so far
            for row_number, row in enumerate(reader, start=2):
                if any(row[c] is None for c in columns):  # a short row: DictReader fills it with None
                    raise DataError(f"{path}:{row_number}: {sum(v is not None for v in row.values())} fields, "
                                    f"the header has {len(reader.fieldnames)}")
                dialogue = row["Dialogue_ID"].strip()
                if dialogue in last_row and last_row[dialogue] != row_number - 1:
                    raise DataError(f"{path}:{row_number}: rows of dialogue {dialogue} are not contiguous")
                last_row[dialogue] = row_number
                yield row_number, row
            if row_number == 1:
                raise DataError(f"{path}:2: no utterances after the header")
    except UnicodeDecodeError:
        raise DataError(f"{path}:{row_number + 1}: not UTF-8 text") from None
    except csv.Error as error:  # e.g. an unclosed quote that runs on past the field size limit
        raise DataError(f"{path}:{row_number + 1}: not a valid CSV row ({error})") from None


def row_label(path: Path, row_number: int, row: dict, classes: list[str]) -> int:
    emotion = row["Emotion"].strip().lower()
    if emotion not in classes:
        raise DataError(f"{path}:{row_number}: unknown emotion {row['Emotion']!r}")
    return classes.index(emotion)


def read_meld_csv(path: Path, clip_dir: Path, labelled: bool = True, raw_text: bool = False) -> list[Utterance]:
    """A CSV in MELD's layout, clips dia<D>_utt<U>.mp4 in `clip_dir`; unlabelled (predict --csv): label 0."""
    utterances = []
    required = MELD_REQUIRED if labelled else [c for c in MELD_REQUIRED if c != "Emotion"]
    for row_number, row in csv_rows(path, required):
        dialogue = row["Dialogue_ID"].strip()
        clip = str(clip_dir / f"dia{dialogue}_utt{row['Utterance_ID'].strip()}.mp4")
        utterances.append(Utterance(
            dialogue=dialogue, speaker=row["Speaker"].translate(MELD_C1_PUNCTUATION).strip(),
            # D10: the official code tokenizes the C1 characters as they are.
            text=(row["Utterance"] if raw_text else row["Utterance"].translate(MELD_C1_PUNCTUATION)).strip(),
            label=row_label(path, row_number, row, EMOTIONS["meld"]) if labelled else 0, video=clip, audio=clip))
    return utterances


def iemocap_speaker(utterance_id: str) -> str:
    """F or M: the first letter of the utterance id's last part (Ses01F_impro01_F000 -> F) (D6)."""
    return utterance_id.strip().rsplit("_", 1)[-1][:1]


def release_text(path: Path) -> str:
    """A text file of the IEMOCAP release: UTF-8, else latin-1 (any byte), lest a stray accented byte stop reading."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1")


def divx_folder(avi_dir: Path) -> Path:
    """avi/DivX or avi/Divx: the folder's case varies across the release's sessions."""
    return next((avi_dir / name for name in ("DivX", "Divx") if (avi_dir / name).is_dir()), avi_dir / "DivX")


def read_iemocap_dialogue(transcript: Path) -> list[Utterance]:
    """The six-class turns of one dialogue, in time order, from its transcription and EmoEvaluation."""
    classes = EMOTIONS["iemocap"]
    dialog, session_dir = transcript.stem, transcript.parents[2]  # SessionN/dialog/transcriptions/<dialog>.txt
    labels_path = session_dir / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: not found (it holds the labels of {dialog})")
    labels = {}
    # Label lines: `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[V, A, D]`; not the annotators' (C-E1: ...).
    for row_number, line in enumerate(release_text(labels_path).splitlines(), start=1):
        parts = line.split("\t")
        if line.startswith("[") and len(parts) >= 3:
            label = parts[2].strip()
            if label not in classes and label not in IEMOCAP_DROPPED:
                raise DataError(f"{labels_path}:{row_number}: unknown emotion {label!r}")
            labels[parts[1].strip()] = label
    turns = [match.groups() for line in release_text(transcript).splitlines()
             if (match := IEMOCAP_TURN.match(line.strip())) and labels.get(match[1]) in classes]
    unmatched = sorted({t for t, label in labels.items() if label in classes} - {turn[0] for turn in turns})
    if unmatched:
        warn(f"telme: {transcript}: no 'TURN [start-end]: text' line for {len(unmatched)} labelled "
            f"turn(s), left out: {', '.join(unmatched[:3])}{' ...' if len(unmatched) > 3 else ''}")
    wav_dir = session_dir / "sentences" / "wav" / dialog
    video = str(divx_folder(session_dir / "dialog" / "avi") / f"{dialog}.avi")
    return sorted((Utterance(dialogue=dialog, speaker=iemocap_speaker(turn), text=text.strip(),
                             label=classes.index(labels[turn]), video=video, audio=str(wav_dir / f"{turn}.wav"),
                             start=float(start), end=float(end)) for turn, start, end, text in turns),
                  key=lambda u: (u.start, u.audio))


def read_iemocap(data_dir: Path) -> dict[str, list[Utterance]]:
    """train, dev and test from the official split CSVs when --data-dir holds them, else from the release tree."""
    csvs = {split: data_dir / name for split, name in IEMOCAP_CSV.items()}
    if csvs["train"].is_file():
        if not csvs["dev"].is_file():
            raise SystemExit(f"telme: {csvs['dev']} not found; IEMOCAP_train.csv needs it (dev picks the best epoch)")
        return {split: read_iemocap_csv(data_dir, path) for split, path in csvs.items() if path.is_file()}
    if not (data_dir / IEMOCAP_SESSIONS[0]).is_dir():
        raise SystemExit(f"telme: {data_dir / IEMOCAP_SESSIONS[0]} not found; --data-dir must be IEMOCAP_full_release "
                         "(https://sail.usc.edu/iemocap/): Session1/ ... Session5/, or the official IEMOCAP_*.csv")
    transcripts = {session: data_dir / session / "dialog" / "transcriptions" for session in IEMOCAP_SESSIONS}
    by_session = {session: {path.stem: read_iemocap_dialogue(path) for path in sorted(folder.glob("*.txt"))}
                  for session, folder in transcripts.items() if folder.is_dir()}
    test = by_session.pop(IEMOCAP_TEST_SESSION, None)
    development = {name: turns for dialogs in by_session.values() for name, turns in dialogs.items() if turns}
    if not development:
        raise DataError(f"{data_dir}: no labelled turns in Session1-4/dialog/transcriptions")
    dev = IEMOCAP_DEV_DIALOGUES & set(development)
    if not dev:
        raise DataError(f"{data_dir}: none of the official dev dialogues ({', '.join(sorted(IEMOCAP_DEV_DIALOGUES))}) "
                        "holds labelled turns in Session1-4")
    splits = {"train": [u for name in sorted(development) if name not in dev for u in development[name]],
              "dev": [u for name in sorted(dev) for u in development[name]]}
    if test is not None:
        splits["test"] = [u for name, turns in sorted(test.items()) for u in turns]
    return splits


def release_path(data_dir: Path, path: str) -> str:
    """A path of the official split CSVs on this machine: ./dataset/IEMOCAP_full_release/ is --data-dir."""
    resolved = data_dir / path.strip().removeprefix(IEMOCAP_CSV_PREFIX)
    if resolved.parent.name.lower() == "divx":
        resolved = divx_folder(resolved.parent.parent) / resolved.name
    return str(resolved)


def read_iemocap_csv(data_dir: Path, path: Path) -> list[Utterance]:
    """One split from the official code's IEMOCAP_{split}.csv, its paths below `data_dir`."""
    utterances = []
    for row_number, row in csv_rows(path, IEMOCAP_COLUMNS):
        label = row_label(path, row_number, row, EMOTIONS["iemocap"])
        try:
            start, end = float(row["Start_Time"]), float(row["End_Time"])
        except ValueError:
            raise DataError(f"{path}:{row_number}: Start_Time/End_Time are not numbers") from None
        utterances.append(Utterance(
            dialogue=row["Dialogue_ID"].strip(), speaker=iemocap_speaker(row["Speaker"]),
            text=row["Utterance"].strip(), label=label,
            video=release_path(data_dir, row["Video_Path"]), audio=release_path(data_dir, row["Wav_Path"]),
            start=start, end=end))
    return utterances


def load_splits(cfg: Config, required=("train", "dev")) -> dict[str, list[Utterance]]:
    """train, dev and (when present) test utterances, in dialogue order; MELD's `required` splits must be there."""
    data_dir = Path(cfg.data_dir)
    try:
        if cfg.dataset == "iemocap":
            return read_iemocap(data_dir)
        csvs = {split: data_dir / name for split, (name, _) in MELD_SPLITS.items()}
        if not required and not (csvs["dev"].is_file() or csvs["test"].is_file()):
            raise SystemExit(f"telme: {data_dir} has no dev_sent_emo.csv or test_sent_emo.csv: nothing to evaluate")
        for split in required:
            if not csvs[split].is_file():
                raise SystemExit(f"telme: {csvs[split]} not found; --data-dir must be MELD.Raw (README: Data, from "
                                 "https://affective-meld.github.io/): the *_sent_emo.csv and their clip folders")
        if required and not csvs["test"].is_file():
            warn(f"telme: {csvs['test']} not found: no test split (test_wf1 null)")
        return {split: read_meld_csv(path, data_dir / MELD_SPLITS[split][1], raw_text=cfg.official_text)
                for split, path in csvs.items() if path.is_file()}
    except DataError as error:
        raise SystemExit(f"telme: {error}")


def dialogues(utterances: list[Utterance]) -> list[list[Utterance]]:
    """Consecutive utterances sharing a dialogue id."""
    return [list(group) for _, group in itertools.groupby(utterances, key=lambda u: u.dialogue)]


# --- Teacher input: "<s_a> u_1 <s_b> u_2 ... <s_x> u_k </s> Now <s_x> feels <mask>" ---------------
SPEAKER_TOKENS = [f"<s{i}>" for i in range(1, 10)]
SPEAKER_SPLIT = re.compile(r"\s*(" + "|".join(map(re.escape, SPEAKER_TOKENS)) + r")\s*")  # see prompt_token_ids


def speaker_indices(speakers: list[str]) -> list[int]:
    """Each speaker's order of first appearance within one dialogue, capped at 9 (0-based: 0..8)."""
    order: dict[str, int] = {}
    return [order.setdefault(s, min(len(order), len(SPEAKER_TOKENS) - 1)) for s in speakers]


def prompt_speakers(cfg: Config, utterances: list[Utterance]) -> list[int] | None:
    """teacher_input_ids' speaker indices: None for ours (speaker_indices per dialogue), else D6: the official ones,
    over the split in row order, a dialogue's first utterance indexed in the previous dialogue's list; uncapped
    (<s10> and on are plain text to the tokenizer); on IEMOCAP the speaker is the utterance id (each one new)."""
    if not cfg.official_speakers:
        return None
    keys = [Path(u.audio).stem if cfg.dataset == "iemocap" else u.speaker for u in utterances]
    indices, known = [], {}
    for k, (key, u) in enumerate(zip(keys, utterances)):
        indices.append(known.setdefault(key, len(known)))
        if k > 0 and u.dialogue != utterances[k - 1].dialogue:
            known = {}
    return indices


def add_speaker_tokens(tokenizer) -> None:
    tokenizer.add_tokens(SPEAKER_TOKENS, special_tokens=True)


def teacher_input_ids(utterances: list[Utterance], tokenizer, max_tokens: int,
                      speaker_ids: list[int] | None = None) -> list[list[int]]:
    """Each utterance's prompt as token ids, cut from the left, the mask last; speaker_ids: see prompt_speakers."""
    ids, first = [], 0
    for dialogue in dialogues(utterances):
        indices = (speaker_indices([u.speaker for u in dialogue]) if speaker_ids is None
                   else speaker_ids[first:first + len(dialogue)])
        speakers = [f"<s{i + 1}>" for i in indices]  # past <s9> (D6 only) plain text, as officially
        first += len(dialogue)
        for k in range(len(dialogue)):
            history = " ".join(f"{s} {v.text}" for s, v in zip(speakers[:k + 1], dialogue[:k + 1]))
            prompt = f"{history} {tokenizer.sep_token} Now {speakers[k]} feels"
            ids.append(prompt_token_ids(prompt, tokenizer)[-(max_tokens - 1):] + [tokenizer.mask_token_id])
    return ids


def prompt_token_ids(prompt: str, tokenizer) -> list[int]:
    """The ids the paper's teacher read: the official slow RobertaTokenizer (transformers 4.27) dropped the whitespace
    beside each speaker token (not the separator's) and encoded the pieces apart, which a fast one does not."""
    ids = []
    for i, piece in enumerate(SPEAKER_SPLIT.split(prompt)):  # text, speaker, text, ..., text
        if i % 2:  # a speaker token
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


# --- Media decoding -------------------------------------------------------------------------------
# Only what is used is decoded, so that a long MELD clip or an utterance inside an IEMOCAP dialogue's
# video costs about what a short clip does. Audio decoding seeks to just before the kept tail; the codec
# restarts cold after a seek, and AUDIO_SEEK_MARGIN seconds cover that warm-up.
AUDIO_SEEK_MARGIN = 1.0


class MediaError(Exception):
    """A clip that is missing or cannot be decoded; the message says why."""


# What a damaged file makes PyAV raise (truncated containers, broken packets, odd metadata).
DECODE_ERRORS = (av.error.FFmpegError, UnicodeDecodeError, ValueError, ZeroDivisionError)


@contextmanager
def decoding(path: str, kind: str | None = None):
    """(container, first `kind` stream: "audio", "video" or None); any failure, in the block too, is a MediaError."""
    if os.path.isdir(path):
        raise MediaError("is a directory")
    if not os.path.isfile(path):
        raise MediaError("file not found")
    if os.path.getsize(path) == 0:
        raise MediaError("empty file (0 bytes)")
    try:
        with av.open(path) as container:
            streams = container.streams.audio if kind == "audio" else container.streams.video
            if kind and not streams:
                raise MediaError(f"no {kind} stream")
            yield container, streams[0] if kind else None
    except DECODE_ERRORS as error:
        raise MediaError(f"cannot decode: {error}") from None


def stream_span(container, stream) -> tuple[float, float]:
    """(first, last) presentation time of `stream` in seconds; last is inf when no duration is declared."""
    first = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
    if stream.duration:
        return first, first + float(stream.duration * stream.time_base)
    return first, container.duration / av.time_base if container.duration else math.inf


# D1: the official code loads audio with librosa's default rate, then declares 16 kHz to the model.
OFFICIAL_AUDIO_LOAD_RATE = 22050
# D8: the official MELD code replaces a clip longer than this by zeros: a waveform of 1412 samples
# and frames that are zero after normalisation (cached as an array of no frames; see Collate).
OFFICIAL_MAX_CLIP_SECONDS = 30.0
OFFICIAL_LONG_CLIP_AUDIO_SAMPLES = 1412


def decode_audio(path: str, rate: int, max_samples: int | None) -> np.ndarray:
    """Mono float32 waveform at `rate` Hz (the channels' mean), its last max_samples (None: all)."""
    with decoding(path, "audio") as (container, stream):
        source_rate = stream.codec_context.sample_rate
        if not source_rate:
            raise MediaError("audio stream declares no sample rate")
        first, last = stream_span(container, stream)
        entry = (first if max_samples is None else max(first, last - max_samples / rate)) - AUDIO_SEEK_MARGIN
        if first < entry < math.inf:
            container.seek(int(entry / stream.time_base), stream=stream)
        to_float = av.AudioResampler(format="fltp")  # planar float, every channel kept
        chunks, decoded_from = [], None
        for frame in container.decode(stream):
            if decoded_from is None:
                decoded_from = frame.time or 0.0
            chunks.extend(c.to_ndarray().mean(axis=0) for c in to_float.resample(frame))  # (samples,) mono
    if not chunks:
        raise MediaError("audio stream decodes to nothing")
    waveform = np.concatenate(chunks).astype(np.float32)
    begin = max(0, round((first - decoded_from) * source_rate))
    # Begin on an absolute sample index that the resampler's period divides: the output samples then
    # fall on the same grid wherever decoding began.
    period = source_rate // math.gcd(source_rate, rate)
    begin += -(round(decoded_from * source_rate) + begin) % period
    waveform = waveform[begin:]
    if not waveform.size:
        raise MediaError("audio stream decodes to nothing")
    if not waveform.any():
        raise MediaError("audio is silent (every sample is zero)")
    waveform = torchaudio.functional.resample(torch.from_numpy(waveform), source_rate, rate).numpy()
    return waveform if max_samples is None else waveform[-max_samples:]


def decode_frames(path: str, num_frames: int, size: int, start: float | None = None,
                  end: float | None = None) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 RGB: the frames shown at the centres of num_frames equal segments
    of the clip (or of the window [start, end] s), resized to a short side of `size`, then centre-cropped."""
    with decoding(path, "video") as (container, stream):
        keyframes = keyframe_times(path, start, end)
        stream.thread_type = "AUTO"
        first, last = stream_span(container, stream)
        t0, t1 = (first, last) if start is None else (start, end)
        if t1 == math.inf:
            raise MediaError("video stream declares no duration")
        frame_time = 1.0 / float(stream.average_rate) if stream.average_rate else 0.0  # how long a frame shows
        frames, shown = [], None  # shown: the last decoded frame
        for target in [t0 + (i + 0.5) * (t1 - t0) / num_frames for i in range(num_frames)]:
            # Decoding goes on to the next target unless a keyframe lies in between, where a seek is
            # faster: a long clip (or window) costs at most a keyframe interval per target.
            if shown is None or any(shown.time < k <= target for k in keyframes):
                decoded = decode_from(container, stream, keyframes, target, first)
            while shown is None or shown.time + frame_time <= target:
                if (following := next(decoded, None)) is None:  # the stream ended before its declared duration
                    break
                shown = following
            if shown is None:
                raise MediaError("video stream decodes to nothing")
            frames.append(resize_and_crop(shown, size))
    return np.stack(frames)


# D11: the official IEMOCAP code widens each utterance's window by a second on either side.
OFFICIAL_WINDOW_MARGIN = 1.0


def official_frame_indices(count: int, num_frames: int) -> list[int]:
    """D11: the official MELD pick among `count` frames (0-based): the first num_frames whose 1-based index
    count // num_frames divides; a clip of fewer frames gives them all, then its last repeated."""
    step = max(1, count // num_frames)
    kept = [k - 1 for k in range(step, count + 1, step)][:num_frames]
    return kept + [kept[-1]] * (num_frames - len(kept))


def official_window_frame_indices(fps: float, start: float, end: float, num_frames: int) -> list[int]:
    """D11: the official IEMOCAP pick (0-based) in [start, end] s widened a second each side: every step-th
    frame, the first num_frames, the last repeated when fewer; where the official step is 0, every frame."""
    low, high = max(start - OFFICIAL_WINDOW_MARGIN, 0.0), end + OFFICIAL_WINDOW_MARGIN
    step = max(1, math.floor(fps * (high - low) / num_frames))
    first, last = max(1, math.ceil(fps * low)), math.floor(fps * high)
    kept = [k - 1 for k in range(first + step - 1, last + 1, step)][:num_frames] or [first - 1]
    return kept + [kept[-1]] * (num_frames - len(kept))


def official_frames(path: str, num_frames: int, size: int, start: float | None = None,
                    end: float | None = None) -> np.ndarray:
    """D11: the frames the official code picks, by frame count (MELD) or in the widened window of a dialogue
    video (IEMOCAP), resized and cropped as decode_frames does; a frame's index is its time x the frame rate."""
    with decoding(path, "video") as (container, stream):
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or 0)
        if not fps:
            raise MediaError("video stream declares no frame rate")
        first, last = stream_span(container, stream)
        if start is None:
            # The container's frame count, as the official reader takes it.
            count = stream.frames or (round((last - first) * fps) if last < math.inf else 0)
            if not count:
                raise MediaError("video stream declares no frame count")
            indices = official_frame_indices(count, num_frames)
        else:
            indices = official_window_frame_indices(fps, start, end, num_frames)
        earliest = first + indices[0] / fps
        found = {}
        for frame in decode_from(container, stream, keyframe_times(path, earliest, earliest), earliest, first):
            index = round((frame.time - first) * fps)
            if index in indices:
                found[index] = resize_and_crop(frame, size)
            if index >= indices[-1]:
                break
    if not found:
        raise MediaError("video stream decodes to nothing")
    shown = found[min(found)]  # an index the stream lacks (past its end) repeats the pick before it
    return np.stack([shown := found.get(index, shown) for index in indices])  # indices ascend


def keyframe_times(path: str, start: float | None, end: float | None) -> list[float]:
    """Times (s) of the video keyframes from the one before `start` to `end`, from packet headers alone."""
    with decoding(path, "video") as (container, stream):
        if start is not None:
            container.seek(int(start / stream.time_base), stream=stream)
        packets = itertools.takewhile(lambda p: end is None or p.dts is None or p.dts * stream.time_base <= end,
                                      container.demux(stream))
        return [float(p.pts * stream.time_base) for p in packets if p.is_keyframe and p.pts is not None]


def decode_from(container, stream, keyframes: list[float], time: float, first: float):
    """The stream's frames that have a time, decoded from the last of `keyframes` at or before `time` s."""
    keyframe = max((k for k in keyframes if k <= time), default=first)
    if keyframe > first:  # `first`: the stream's start
        container.seek(int(keyframe / stream.time_base), stream=stream)
    return (f for f in container.decode(stream) if f.time is not None)


def resize_and_crop(frame: av.VideoFrame, size: int) -> np.ndarray:
    scale = size / min(frame.width, frame.height)
    width, height = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
    image = frame.reformat(width=width, height=height, format="rgb24",
                           interpolation="BILINEAR").to_ndarray()  # (H, W, 3)
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


# --- Media cache: every clip decoded once, read back memory-mapped --------------------------------
# Part of every entry's key: bump it when what an entry holds changes under the same settings (a new dtype).
MEDIA_CACHE_FORMAT = 1
# float16: half of float32 like int16, without int16's clipping of the AAC decoder's overshoots past full
# scale; its 11-bit precision is below the recordings' noise floor, and waveforms are normalised anyway.
AUDIO_CACHE_DTYPE = np.float16
# A writer renames its temporary file within seconds; one this old was left by a killed prepare.
STALE_TEMPORARY_SECONDS = 3600


class MediaCache:
    """Decoded audio and frames, one .npy per file (path, size, mtime), window and decoding settings, or a
    .err holding why it could not be decoded (zeros for that modality); a changed file or setting is decoded
    again. Entries are written atomically: a killed prepare leaves whole entries, the next decodes the rest."""

    def __init__(self, cfg: Config):
        self.root = Path(cfg.cache_dir)
        self.settings = {
            # D1: the official waveform is 22050 samples per second played to the model as 16000.
            "audio": dict(rate=OFFICIAL_AUDIO_LOAD_RATE if cfg.official_audio_rate else cfg.audio_rate,
                          max_samples=cfg.max_audio_samples),
            "video": dict(num_frames=cfg.num_frames, size=cfg.image_size),
        }
        # D8, D11 and D12 change what an entry holds; in the settings, they are part of its key.
        if cfg.official_frame_indices:
            self.settings["video"]["official_indices"] = True
        if cfg.official_audio_normalisation:
            self.settings["audio"]["normalise_whole_clip"] = True
        if cfg.official_long_clips:  # applied in decode_media
            for settings in self.settings.values():
                settings["stand_in_beyond_seconds"] = OFFICIAL_MAX_CLIP_SECONDS

    def location(self, kind: str, u: Utterance) -> Path:
        """The entry's path, less its suffix: .npy for the array, .err for the reason it has none."""
        path, start, end = (u.audio, None, None) if kind == "audio" else (u.video, u.start, u.end)
        try:
            stat = os.stat(path)
            identity = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            identity = None
        raw = json.dumps([MEDIA_CACHE_FORMAT, kind, os.path.abspath(path), identity, start, end,
                          self.settings[kind]])
        key = hashlib.sha1(raw.encode()).hexdigest()
        return self.root / kind / key[:2] / key

    def load(self, kind: str, u: Utterance) -> np.ndarray | None:
        """The decoded array, or None when the clip could not be decoded."""
        npy = self.location(kind, u).with_suffix(".npy")
        if npy.exists():
            return np.load(npy, mmap_mode="r")
        if npy.with_suffix(".err").exists():
            return None
        raise FileNotFoundError(f"{npy}: not in the media cache; run `telme.py prepare` first")

    def missing_jobs(self, utterances: list[Utterance]) -> list[list[tuple]]:
        """One job per utterance that lacks an entry: the entries it lacks (each decoded once)."""
        jobs, seen = [], set()
        for u in utterances:
            job = []
            for kind, path, *window in (("audio", u.audio, None, None), ("video", u.video, u.start, u.end)):
                base = self.location(kind, u)
                if base not in seen and not any(base.with_suffix(s).exists() for s in (".npy", ".err")):
                    seen.add(base)
                    job.append((kind, path, *window, str(base), self.settings[kind]))
            if job:
                jobs.append(job)
        return jobs

    def sweep_temporaries(self) -> None:
        """Delete the partial files that killed writers left behind."""
        cutoff = time.time() - STALE_TEMPORARY_SECONDS
        for temporary in self.root.glob("*/*/.*"):
            try:
                if temporary.stat().st_mtime < cutoff:
                    temporary.unlink()
            except FileNotFoundError:  # its writer finished, or another sweep got there first
                pass

    def prepare(self, utterances: list[Utterance], workers: int, quiet: bool = False) -> dict[str, float]:
        """Decode what is not cached, a clip per worker task; counts cached, decoded, clips, workers, seconds."""
        self.sweep_temporaries()
        jobs = self.missing_jobs(utterances)
        # Under torchrun every process lists the missing entries before any writes one, then takes its share.
        barrier()
        cached = 2 * len(utterances) - sum(map(len, jobs))  # an audio and a video entry per utterance
        counts = {"cached": cached, "decoded": 0, "clips": len(jobs), "workers": 0}
        started = time.perf_counter()
        rank, world = rank_and_world()
        jobs = jobs[rank::world]  # under torchrun each process decodes its share
        if jobs:
            # Every core by default, shared among the processes torchrun started on this machine.
            workers = workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            workers = counts["workers"] = min(workers, len(jobs))
            # spawn, not fork: a fork of a process running torch threads can hang. Leaving `with` ends idle workers.
            with (multiprocessing.get_context("spawn").Pool(workers, initializer=torch.set_num_threads, initargs=(1,))
                  if workers > 1 else nullcontext()) as pool:
                results = pool.imap_unordered(decode_job, jobs) if pool else map(decode_job, jobs)
                counts["decoded"] = sum(progress(results, "decoding", quiet, total=len(jobs), unit="clip"))
        # Every process's count; gathering also waits until every share is on disk.
        counts["decoded"] = sum(gather_objects(counts["decoded"]))
        counts["seconds"] = time.perf_counter() - started
        return counts


def decode_job(job: list[tuple]) -> int:
    """Decode and write one clip's missing entries (a fault as its .err file); how many decoded."""
    decoded = 0
    for kind, path, start, end, base, settings in job:
        try:
            array = decode_media(kind, path, start, end, settings)
            atomic_write(Path(base).with_suffix(".npy"), lambda f: np.save(f, array))
            decoded += 1
        except MediaError as error:
            reason = str(error)
            atomic_write(Path(base).with_suffix(".err"), lambda f: f.write(reason.encode()))
    return decoded


def decode_media(kind: str, path: str, start, end, settings: dict) -> np.ndarray:
    """One cache entry's array (audio as AUDIO_CACHE_DTYPE); predict decodes here too, to see what training saw."""
    limit = settings.get("stand_in_beyond_seconds")
    if limit is not None and media_seconds(path, start, end) > limit:  # D8: nothing is decoded
        if kind == "audio":
            return np.zeros(OFFICIAL_LONG_CLIP_AUDIO_SAMPLES, AUDIO_CACHE_DTYPE)
        return np.zeros((0, settings["size"], settings["size"], 3), np.uint8)
    if kind == "video":
        decode = official_frames if settings.get("official_indices") else decode_frames  # D11
        return decode(path, settings["num_frames"], settings["size"], start, end)
    if not settings.get("normalise_whole_clip"):
        return decode_audio(path, settings["rate"], settings["max_samples"]).astype(AUDIO_CACHE_DTYPE)
    # D12: the official processor normalises the whole clip; only then is its tail kept.
    waveform = normalise_waveform(decode_audio(path, settings["rate"], None))
    return waveform[-settings["max_samples"]:].astype(AUDIO_CACHE_DTYPE)


def media_seconds(path: str, start: float | None, end: float | None) -> float:
    """Length of the span to decode: the window when there is one, else the container's duration."""
    if start is not None:
        return end - start
    with decoding(path) as (container, _):
        return container.duration / av.time_base if container.duration else 0.0


def current_umask() -> int:
    mask = os.umask(0o22)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """write(file) into a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp's 0600, as open() would have made it
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json(path: Path, content) -> None:
    """`content` as indented JSON, written atomically (config.json, metrics.json, summary.json)."""
    atomic_write(path, lambda f: f.write(json.dumps(content, indent=2).encode()))


# --- Batches --------------------------------------------------------------------------------------
class UtteranceDataset(Dataset):
    """Utterances of one split as model inputs: teacher prompts and/or cached media."""

    def __init__(self, utterances, text_ids=None, media: MediaCache | None = None, kinds=()):
        self.utterances, self.text_ids, self.media, self.kinds = utterances, text_ids, media, kinds

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, i):
        item = {"index": i, "label": self.utterances[i].label}
        if self.text_ids is not None:
            item["input_ids"] = self.text_ids[i]
        for kind in self.kinds:
            item[kind] = self.media.load(kind, self.utterances[i])
        return item


# TimeSformer-base's own processor statistics: the stand-in where no video model is loaded
# (the teacher phase, audio-only batches), so that frames are never normalised by accident.
TIMESFORMER_IMAGE_STATS = ((0.45, 0.45, 0.45), (0.225, 0.225, 0.225))


@dataclass
class Collate:
    """Items into padded tensors: text left-padded (the mask token stays last), audio right-padded with a mask,
    frames normalised; a missing modality is zeros (after normalisation), as the model is never told of it."""

    pad_id: int = 0
    text_bucket: int = 0  # prompts padded to a multiple of this (0: to the longest), at most max_text
    max_text: int = 512
    image_mean: tuple = TIMESFORMER_IMAGE_STATS[0]
    image_std: tuple = TIMESFORMER_IMAGE_STATS[1]
    num_frames: int = 8
    image_size: int = 224
    min_audio_samples: int = 4000  # 0.25 s: enough frames for data2vec's time masking
    audio_left_pad: bool = False  # D3: official padding, on the left and with no attention mask
    audio_normalised: bool = False  # D12: waveforms normalised over the whole clip before caching
    pad_to_longest: bool = False  # D13: no min_audio_samples floor (with D3)
    audio_buckets: bool = False  # pad to min_audio_samples x 2^k, at most max_audio
    max_audio: int = 400000
    bgr: bool = False  # D7: channels in OpenCV's order, as the official code feeds them

    def __call__(self, items):
        batch = {"index": torch.tensor([it["index"] for it in items]),
                 "label": torch.tensor([it["label"] for it in items])}
        if "input_ids" in items[0]:
            ids = [torch.tensor(it["input_ids"], dtype=torch.long) for it in items]
            length = max(map(len, ids))
            if self.text_bucket:  # static shapes; the output is the prompt's own (TextTeacher)
                length = max(length, min(self.max_text, -(-length // self.text_bucket) * self.text_bucket))
            batch["input_ids"] = torch.stack([F.pad(x, (length - len(x), 0), value=self.pad_id) for x in ids])
            batch["attention_mask"] = torch.stack([F.pad(torch.ones_like(x), (length - len(x), 0)) for x in ids])
        if "audio" in items[0]:
            waves = [None if it["audio"] is None else
                     np.asarray(it["audio"], np.float32) if self.audio_normalised else normalise_waveform(it["audio"])
                     for it in items]
            lengths = [len(w) for w in waves if w is not None]
            # D13: the official batch is as long as its longest clip, however short that is.
            length = max(lengths) if self.pad_to_longest and lengths else max([self.min_audio_samples] + lengths)
            if self.audio_buckets:  # static shapes, with the mask marking the real samples as before
                length = max(length, min(self.max_audio, self.min_audio_samples
                                         * 2 ** math.ceil(math.log2(length / self.min_audio_samples))))
            audio = torch.zeros((len(items), length))
            for row, w in enumerate(waves):
                if w is not None:
                    first = length - len(w) if self.audio_left_pad else 0
                    audio[row, first:first + len(w)] = torch.from_numpy(w)
            # A clip shorter than min_audio_samples (or none) is unmasked up to that length, silence
            # included: data2vec's time masking needs that many frames in the mask.
            unmasked = torch.tensor([max(self.min_audio_samples, 0 if w is None else len(w)) for w in waves])
            mask = (torch.arange(length) < unmasked[:, None]).long()
            if self.audio_left_pad:
                mask.fill_(1)  # D3: the official model sees the padding zeros as sound
            batch["audio"], batch["audio_mask"] = audio, mask
        if "video" in items[0]:
            shape = (self.num_frames, self.image_size, self.image_size, 3)
            # Zeros after normalisation: a missing clip, and D8's stand-in for a long one (no frames).
            blank = [it["video"] is None or len(it["video"]) == 0 for it in items]
            frames = torch.from_numpy(np.stack([np.zeros(shape, np.uint8) if b else np.asarray(it["video"])
                                                for b, it in zip(blank, items)]))
            if self.bgr:
                frames = frames.flip(-1)  # D7: RGB -> BGR, normalised below as if it were RGB
            mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
            video = ((frames.float() / 255 - mean) / std).permute(0, 1, 4, 2, 3)  # (B, T, 3, S, S)
            batch["video"] = video.masked_fill(torch.tensor(blank).view(-1, 1, 1, 1, 1), 0.0)
        return batch


def normalise_waveform(waveform: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance, as data2vec-audio's feature extractor does."""
    w = np.asarray(waveform, dtype=np.float32)
    return (w - w.mean()) / np.sqrt(w.var() + 1e-7)


# ==================================================================================================
# 2. Encoders
# ==================================================================================================
class TextTeacher(nn.Module):
    """F_T = W h_mask + b: the encoder's output at the mask token, projected (paper, section 3.2)."""

    def __init__(self, encoder: nn.Module, num_classes: int, feature_dim: int):
        super().__init__()
        self.encoder = encoder
        self.project = nn.Linear(encoder.config.hidden_size, feature_dim)
        self.classifier = nn.Linear(feature_dim, num_classes)
        # RoBERTa-family embeddings number positions from the first non-pad token; absolute ones (BERT family)
        # would count the left padding, so that an output depended on its batch mates: those are passed here.
        self.explicit_positions = (not hasattr(getattr(encoder, "embeddings", None), "padding_idx")
                                   and "position_ids" in inspect.signature(encoder.forward).parameters)

    def forward(self, input_ids, attention_mask):
        positions = ({"position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0)}  # (B, L)
                     if self.explicit_positions else {})
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **positions).last_hidden_state
        h_mask = hidden[:, -1]  # (B, H): left padding keeps the mask token last
        feature = self.project(h_mask)  # (B, D): F_T = W h_mask + b
        return feature, self.classifier(feature)  # z_T


class AudioStudent(nn.Module):
    """F_A = the masked mean of data2vec-audio's frame outputs (D3); z_A = W F_A."""

    def __init__(self, encoder: nn.Module, num_classes: int, first_frame: bool = False):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)
        self.first_frame = first_frame

    def forward(self, audio, audio_mask, time_masks=None):  # time_masks: see host_time_masks
        hidden = self.encoder(audio, attention_mask=audio_mask, mask_time_indices=time_masks).last_hidden_state
        if self.first_frame:  # D3 (official): frame 0, padding for all but the batch's longest clip
            feature = hidden[:, 0]
        else:  # D3: average only the frames that cover real samples, not the padding
            frames = self.encoder._get_feature_vector_attention_mask(hidden.shape[1], audio_mask)
            weights = frames.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            feature = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)
        return feature, self.classifier(feature)


class VisualStudent(nn.Module):
    """F_V = TimeSformer's CLS output over the sampled frames; z_V = W F_V."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, video):  # (B, T, 3, S, S)
        feature = self.encoder(pixel_values=video).last_hidden_state[:, 0]  # (B, D)
        return feature, self.classifier(feature)


def encoder_config(name: str, cfg: Config, kind: str):
    """The encoder's Hugging Face config, with the official audio masking span."""
    overrides = {"mask_time_length": cfg.mask_time_length} if kind == "audio" else {}
    return AutoConfig.from_pretrained(name, **overrides)


def pretrained_encoder(name: str, cfg: Config, kind: str) -> nn.Module:
    """A pretrained encoder by hub name or local directory (the real loading path)."""
    encoder = AutoModel.from_pretrained(name, config=encoder_config(name, cfg, kind))
    if kind != "text" and encoder.config.hidden_size != cfg.feature_dim:
        raise SystemExit(f"telme: {name} has hidden size {encoder.config.hidden_size}, but "
                         f"--feature-dim is {cfg.feature_dim}; the fusion needs them equal")
    return encoder


HUB_PROBE_SECONDS = 3  # how long check_model waits for the hub to answer before going offline


def check_model(flag: str, name: str) -> None:
    """Stop with one line, before anything is written, on a missing local path or a hub name uncached offline."""
    from huggingface_hub import constants, try_to_load_from_cache
    from urllib.parse import urlparse
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise SystemExit(f"telme: {flag} {name}: a file; expected a model directory or a hub name")
    try:  # a hub name is "name" or "owner/name" (no leading ".", "/" or "~"); anything else is a local path
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repository name
        raise SystemExit(f"telme: {flag} {name}: no such directory") from None
    if not constants.HF_HUB_OFFLINE:
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_SECONDS).close()
            return
        except OSError:  # unreachable: offline mode, so a cached model loads without minutes of retries
            constants.HF_HUB_OFFLINE = True
    if not isinstance(cached, str):
        raise SystemExit(f"telme: {flag} {name}: no such directory, and not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) while the hub is unreachable or HF_HUB_OFFLINE is set; "
                         f"fetch it first with `hf download {name}` (README: offline), or pass a local model directory")


def image_statistics(name: str) -> tuple[list[float], list[float]]:
    """Mean and std from the video model's own image processor (D7)."""
    processor = transformers.AutoImageProcessor.from_pretrained(name)
    return list(processor.image_mean), list(processor.image_std)


# A student (its phase) -> the media kind it reads (the cache's word, the batch key, the encoder's directory).
STUDENT_MEDIA = {"audio": "audio", "visual": "video"}


def build_student(kind: str, encoder: nn.Module, num_classes: int, first_frame: bool = False) -> nn.Module:
    """The audio or visual student; first_frame: the official audio pooling (D3)."""
    return AudioStudent(encoder, num_classes, first_frame) if kind == "audio" else VisualStudent(encoder, num_classes)


# ==================================================================================================
# 3. Distillation losses (paper, section 3.3)
# ==================================================================================================
def pearson(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Pearson correlation: the cosine of the mean-centred rows."""
    return F.cosine_similarity(u - u.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True),
                               dim=-1, eps=eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Response-level KD (DIST): the student's class scores correlate with the teacher's, both per
    sample and per class; rho is the Pearson correlation (`pearson`)."""
    # p_s = softmax(z_s / tau), p_t = softmax(z_t / tau)
    p_s = F.softmax(student_logits.float() / tau, dim=-1)  # (B, C)
    p_t = F.softmax(teacher_logits.float() / tau, dim=-1)
    # L_inter = 1 - mean_i rho(p_s[i, :], p_t[i, :]): each sample's distribution across classes
    inter = 1 - pearson(p_s, p_t).mean()
    # L_intra = 1 - mean_c rho(p_s[:, c], p_t[:, c]): each class's scores across the batch
    intra = 1 - pearson(p_s.T, p_t.T).mean()
    # L_resp = tau^2 (L_inter + L_intra)
    return tau ** 2 * (inter + intra)


def feature_kd_loss(teacher_features: torch.Tensor, student_features: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Feature-level KD: the student's features relate to the teacher's as the teacher's relate to
    each other, compared as distributions over the batch."""
    # T^ = F_T / ||F_T||, S^ = F_S / ||F_S||, row by row
    t = F.normalize(teacher_features.float(), dim=-1)  # (B, D)
    s = F.normalize(student_features.float(), dim=-1)
    # P = softmax(T^ T^T / t), row-wise: teacher-teacher similarities
    p = F.softmax(t @ t.T / temperature, dim=-1)  # (B, B)
    # Q = softmax(T^ S^T / t), row-wise: teacher-student similarities
    log_q = F.log_softmax(t @ s.T / temperature, dim=-1)  # (B, B)
    # L_feat = (1/B) sum_i KL(P_i || Q_i)
    return F.kl_div(log_q, p, reduction="batchmean")


def student_loss(student_logits, student_features, teacher_logits, teacher_features, labels,
                 cfg: Config) -> torch.Tensor:
    """A student's training loss against the frozen teacher's logits and features."""
    # L = CE(z_s, y) + alpha L_resp + beta L_feat
    return (F.cross_entropy(student_logits.float(), labels)
            + cfg.alpha * dist_loss(student_logits, teacher_logits, cfg.tau)
            + cfg.beta * feature_kd_loss(teacher_features, student_features, cfg.kd_temperature))


# ==================================================================================================
# 4. Attention-based modality Shifting Fusion (paper, section 3.4)
# ==================================================================================================
class ShiftingFusion(nn.Module):
    """A multimodal adaptation gate (Rahman et al., 2020) after self-attention over the students."""

    def __init__(self, dim: int, num_classes: int, heads: int, dropout: float, theta: float,
                 attention: str = "modality"):
        super().__init__()
        self.theta, self.attention_scope = theta, attention
        # modality: the sequence [F_A, F_V] of each utterance; batch (D2): one sequence of B samples.
        self.attention = nn.MultiheadAttention(dim if attention == "modality" else 2 * dim, heads)
        self.student_norm = nn.LayerNorm(2 * dim)
        self.gate = nn.Linear(3 * dim, dim)
        self.shift = nn.Linear(2 * dim, dim)
        self.output_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def displacement(self, f_t, f_a, f_v):
        """lam and H of ASF (paper, section 3.4): the teacher's feature moves by lam * H."""
        n = torch.cat([f_a, f_v], dim=-1)  # (B, 2D)
        if self.attention_scope == "modality":
            tokens = torch.stack([f_a, f_v])  # (2, B, D): sequence, batch, features
            attended = self.attention(tokens, tokens, tokens, need_weights=False)[0]
            attended = attended.transpose(0, 1).reshape(n.shape)  # (B, 2D)
        else:  # D2: a 2-D input is one unbatched sequence, so samples attend to each other
            attended = self.attention(n, n, n, need_weights=False)[0]
        a = self.dropout(self.student_norm(attended + n))  # A = Dropout(LN(MHA(N) + N))
        g = F.relu(self.gate(torch.cat([a, f_t], dim=-1)))  # g = ReLU(W_g [A; F_T] + b_g)
        h = g * self.shift(a)  # H = g * (W_h A + b_h)
        # lam = min(theta ||F_T|| / (||H|| + 1e-6), 1), ||H|| taken as 1 where it is 0: the shift
        # lam H is at most theta times the teacher's feature
        h_norm = h.norm(dim=-1)  # (B,)
        lam = torch.clamp(self.theta * f_t.norm(dim=-1) / (h_norm.masked_fill(h_norm == 0, 1) + 1e-6), max=1.0)
        return lam, h

    def forward(self, f_t, f_a, f_v):
        lam, h = self.displacement(f_t, f_a, f_v)
        z = self.dropout(self.output_norm(f_t + lam.unsqueeze(-1) * h))  # Z = Dropout(LN(F_T + lam H))
        return self.classifier(z)


def build_fusion(cfg: Config) -> ShiftingFusion:
    return ShiftingFusion(cfg.feature_dim, len(EMOTIONS[cfg.dataset]), cfg.heads, cfg.dropout, cfg.theta,
                          cfg.asf_attention)


# ==================================================================================================
# 5. Training: teacher, then the students, then the fusion (paper, section 3.5)
# ==================================================================================================
@dataclass
class Runtime:
    """Device and precision, chosen once per command (make_runtime)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    official_precision: bool = False  # D14

    def autocast_dtype(self, use: str) -> torch.dtype | None:
        """The autocast dtype (None: float32) of a phase's training step, "frozen" (the frozen encoders' outputs it
        reads) or "eval" (dev, test, predict): --amp, but D14 (official) trains the teacher and evaluates in float32."""
        return None if self.official_precision and use in ("teacher", "eval") else self.amp_dtype

    def autocast(self, use: str):
        dtype = self.autocast_dtype(use)
        return nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self, phase: str) -> torch.amp.GradScaler:
        """Loss scaling for fp16, whose range is too narrow for small gradients; bf16 needs none."""
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype(phase) == torch.float16)

    def synchronize(self) -> None:  # for timing: wait for the device's queued work
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_runtime(cfg: Config) -> Runtime:
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun, one process per GPU
    if launched and name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"telme: --device {cfg.device}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"telme: --device {cfg.device}: torch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"telme: --device {cfg.device}: torch sees {torch.cuda.device_count()} GPU(s)")
    if launched and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.official_cudnn:  # D16: the official seeding's cuDNN settings
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return Runtime(device, AUTOCAST_TYPES[cfg.amp] if device.type == "cuda" else None, cfg.official_precision)


# --- Several processes (torchrun): DistributedDataParallel; rank 0 alone writes and logs ----------
def rank_and_world() -> tuple[int, int]:  # (0, 1) unless launched by torchrun
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def gather_objects(value) -> list:  # every rank's value, in rank order
    gathered = [value] * rank_and_world()[1]
    if len(gathered) > 1:
        dist.all_gather_object(gathered, value)
    return gathered


def finish_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def log(message: str) -> None:
    if is_main_process():
        tqdm.write(message, file=sys.stdout)


def warn(message: str) -> None:  # data left out without stopping the run; stderr, as stdout may be JSON (stats)
    if is_main_process():
        tqdm.write(message, file=sys.stderr)


PROGRESS_SECONDS = 60  # when stderr is not a terminal (a log file): a progress line this often


def progress(iterable, description: str, quiet: bool, **kwargs):
    """A tqdm bar on a terminal, else a line about every PROGRESS_SECONDS (a CPU teacher epoch takes minutes); under
    --quiet nothing."""
    silent, terminal = quiet or not is_main_process(), sys.stderr.isatty()
    bar = tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, disable=silent or not terminal, **kwargs)
    total, unit = f"/{bar.total}" if bar.total else "", kwargs.get("unit", "batch")
    # Lines too go through the (disabled) bar: iterated bare, a DataLoader gave the demo's teacher other figures.
    started = last = time.time()
    for done, item in enumerate(bar, start=1):
        yield item
        if not (silent or terminal) and time.time() - last >= PROGRESS_SECONDS:
            last = time.time()
            print(f"{description}: {unit} {done}{total}, {last - started:.0f} s", file=sys.stderr, flush=True)


def schedule_lengths(cfg: Config, train_loader: DataLoader, epochs: int) -> tuple[int, int]:
    """Warmup and total length of fit's lr schedule in scheduler steps (one per optimiser step); at step s,
    lr(s) = lr * s / warmup while s < warmup, then lr * max(0, (total - s) / (total - warmup))."""
    # D4 (official): counted in samples but stepped once per batch, so both last batch_size times longer.
    per_epoch = len(train_loader.dataset) if cfg.official_schedule else len(train_loader)
    return int(per_epoch * cfg.warmup_epochs), per_epoch * epochs


def clip_and_step(optimizer, scaler, params, cfg: Config) -> None:
    """Clip the gradient norm at cfg.grad_clip, then step (the scaler skips non-finite steps)."""
    if not cfg.official_clipping:  # D5: clip the true gradients; the official code clips the loss-scaled ones
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_loader(dataset, cfg: Config, rt: Runtime, collate, shuffle: bool, seed: int = 0) -> DataLoader:
    """Under torchrun each process reads its own shard (reshuffled by fit's set_epoch): the batch is world x size."""
    workers = cfg.loader_workers if cfg.loader_workers >= 0 else (4 if rt.device.type == "cuda" else 0)
    if isinstance(dataset, FeatureDataset):  # tensors in memory: worker processes would only add IPC
        workers = 0
    # Training shards are disjoint (drop_last: each epoch leaves out at most world-1 random items);
    # evaluation shards are padded with repeats to equal length, and run_model drops the repeats.
    sampler = (DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=shuffle)
               if rank_and_world()[1] > 1 else None)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=loader_batch_size(dataset, cfg, shuffle), shuffle=shuffle and sampler is None,
                      sampler=sampler, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=rt.device.type == "cuda", generator=generator)


def loader_batch_size(dataset, cfg: Config, training: bool) -> int:
    """cfg.eval_batch_size for forward-only passes whose outputs do not depend on batch mates, else cfg.batch_size:
    F_A does (data2vec's positional convolutions carry the padding into the last real frames), as does D2's fusion."""
    batch_bound = "audio" in getattr(dataset, "kinds", ()) or (
        isinstance(dataset, FeatureDataset) and cfg.asf_attention == "batch")
    return cfg.batch_size if training or batch_bound else cfg.eval_batch_size


# --- The run directory: everything a later phase, eval or predict needs -------------------------
def weights_path(run: Path, phase: str) -> Path:
    return run / f"{phase}.safetensors"


def save_weights(module: nn.Module, path: Path, **metadata) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda f: f.write(save(state, metadata={k: str(v) for k, v in metadata.items()})))


def load_weights(module: nn.Module, path: Path) -> nn.Module:
    if not path.is_file():
        raise SystemExit(f"telme: {path} not found; train that phase first")
    module.load_state_dict(load_file(path))
    return module


def safetensors_metadata(path: Path) -> dict:  # reads the header alone
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


# --- Resuming: a checkpoint after every epoch, replaced by a marker when the phase completes -----
def checkpoint_path(run: Path, phase: str) -> Path:
    return run / "checkpoints" / f"{phase}.pt"


def complete_marker(run: Path, phase: str) -> Path:
    return run / "checkpoints" / f"{phase}.complete"


def phase_complete(run: Path, phase: str) -> bool:
    return complete_marker(run, phase).is_file()


# The phases trained on each phase's weights (the students distil the teacher, the fusion reads all three).
DEPENDENT_PHASES = {"teacher": ("audio", "visual", "fusion"), "audio": ("fusion",), "visual": ("fusion",), "fusion": ()}


def replace_weights(run: Path, phase: str, model: nn.Module, **metadata) -> None:
    """Write a phase's new best weights; only then remove what was trained on its old ones and their metrics.json
    entries, so that a run failing before its first epoch ends leaves the earlier run's weights intact."""
    dependent = DEPENDENT_PHASES[phase]
    stale = [p for p in dependent if weights_path(run, p).is_file()]
    save_weights(model, weights_path(run, phase), **metadata)
    if stale:
        log(f"telme: {run}: new {phase} weights; removed the {', '.join(stale)} weights trained on the old ones")
    for p in dependent:
        for path in (checkpoint_path(run, p), complete_marker(run, p), weights_path(run, p)):
            path.unlink(missing_ok=True)
    metrics, entries = run / "metrics.json", {phase, *dependent}
    if metrics.is_file() and entries & set(everything := json.loads(metrics.read_text())):
        kept = {p: m for p, m in everything.items() if p not in entries}
        write_json(metrics, kept)


def saved_epoch(run: Path, phase: str) -> int | None:
    """The last epoch a phase's checkpoint holds (memory-mapped: its tensors are not read); None without one."""
    try:
        return torch.load(checkpoint_path(run, phase), map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except (EOFError, OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError):
        return None


def save_checkpoint(path: Path, epoch: int, best: dict, model, optimizer, schedule, scaler, generator) -> None:
    """All that resumes after `epoch` as if never stopped, every random stream included, in weights_only types."""
    kind, key, *rest = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": (kind, key.tolist(), *rest), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all(), "loader": generator.get_state()}  # "cuda": [] without a GPU
    state = {"epoch": epoch, "best": best, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": rng}
    atomic_write(path, lambda f: torch.save(state, f))


def restore_checkpoint(path: Path, model, optimizer, schedule, scaler, generator) -> tuple[int, dict]:
    """Load what save_checkpoint wrote into the training objects; returns (last completed epoch, best so far)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SystemExit(f"telme: {path}: truncated or damaged checkpoint ({reason}); "
                         "delete it to restart the phase") from None
    for key, part in (("model", model), ("optimizer", optimizer), ("schedule", schedule), ("scaler", scaler)):
        if state[key]:  # the scaler's is empty when it was saved disabled (on a CPU, or without fp16)
            part.load_state_dict(state[key])
    rng = state["rng"]
    random.setstate(rng["python"])
    kind, key, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(key, np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["loader"])
    return state["epoch"], state["best"]


def encoder_dir(run: Path, kind: str) -> Path:
    return run / "encoders" / kind


def save_encoder_config(run: Path, kind: str, encoder: nn.Module, extra=None) -> None:
    """The encoder's config (and tokenizer or image statistics), so the run rebuilds offline."""
    if not is_main_process():
        return
    directory = encoder_dir(run, kind)
    encoder.config.save_pretrained(directory)
    if kind == "text":
        extra.save_pretrained(directory)
    elif kind == "video":  # TimeSformer's processor class is VideoMAE's
        transformers.VideoMAEImageProcessor(image_mean=extra[0], image_std=extra[1]).save_pretrained(directory)


def saved_encoder(run: Path, kind: str) -> nn.Module:
    return AutoModel.from_config(AutoConfig.from_pretrained(encoder_dir(run, kind)))


def load_teacher(run: Path, cfg: Config, rt: Runtime):
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir(run, "text"))
    teacher = TextTeacher(saved_encoder(run, "text"), len(EMOTIONS[cfg.dataset]), cfg.feature_dim)
    return load_weights(teacher, weights_path(run, "teacher")).to(rt.device).eval(), tokenizer


def load_student(run: Path, kind: str, cfg: Config, rt: Runtime) -> nn.Module:
    phase = {media: student for student, media in STUDENT_MEDIA.items()}[kind]
    student = build_student(kind, saved_encoder(run, kind), len(EMOTIONS[cfg.dataset]), cfg.official_audio_pooling)
    return load_weights(student, weights_path(run, phase)).to(rt.device).eval()


# D7: the official code normalises with VideoMAE's image-processor statistics (ImageNet's).
VIDEOMAE_IMAGE_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def make_collate(cfg: Config, pad_id: int = 0, image_stats=None) -> Collate:
    mean, std = VIDEOMAE_IMAGE_STATS if cfg.official_frames else image_stats or TIMESFORMER_IMAGE_STATS  # D7
    return Collate(pad_id=pad_id, image_mean=tuple(mean), image_std=tuple(std), num_frames=cfg.num_frames,
                   image_size=cfg.image_size, audio_left_pad=cfg.official_audio_pooling, bgr=cfg.official_frames,
                   audio_normalised=cfg.official_audio_normalisation, pad_to_longest=cfg.official_audio_padding,
                   text_bucket=cfg.text_bucket, max_text=cfg.max_text_tokens, audio_buckets=cfg.audio_buckets,
                   max_audio=cfg.max_audio_samples)


def text_forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def audio_forward(model, batch):
    return model(batch["audio"], batch["audio_mask"], batch.get("time_masks"))


def video_forward(model, batch):
    return model(batch["video"])


FORWARDS = {"teacher": text_forward, "audio": audio_forward, "visual": video_forward}


def host_time_masks(encoder: nn.Module, forward):
    """`forward` drawing data2vec-audio's time masks on the host as its own forward would, outside any graph."""
    # transformers exposes no public function for it; this one is what the model's forward calls.
    from transformers.models.data2vec.modeling_data2vec_audio import _compute_mask_indices
    config = encoder.config
    if not (getattr(config, "apply_spec_augment", True) and getattr(config, "mask_time_prob", 0) > 0):
        return forward  # no time masks: SpecAugment off, or not an audio encoder

    def masked_forward(model, batch):
        frames = int(encoder._get_feat_extract_output_lengths(batch["audio"].shape[1]))
        frame_mask = encoder._get_feature_vector_attention_mask(frames, batch["audio_mask"])
        drawn = _compute_mask_indices((len(frame_mask), frames), config.mask_time_prob,
                                      config.mask_time_length, frame_mask, config.mask_time_min_masks)
        return forward(model, batch | {"time_masks": torch.from_numpy(drawn).to(batch["audio"].device)})
    return masked_forward


@torch.no_grad()
def run_model(model, loader, forward, rt: Runtime, quiet: bool, description: str, use: str = "eval"):
    """Every item's (features, logits) in dataset order, float32 on the CPU (on every rank under torchrun); `use`:
    "eval", or "frozen" for outputs a training step reads (Runtime.autocast_dtype)."""
    model.eval()
    indices, features, logits = [], [], []
    for batch in progress(loader, description, quiet):
        with rt.autocast(use):
            f, z = forward(model, to_device(batch, rt.device))
        indices.append(batch["index"])
        if f is not None:  # kept on the device: one transfer at the end, no host sync per batch
            features.append(f.float())
        logits.append(z.float())
    features, logits = (torch.cat(features).cpu() if features else None), torch.cat(logits).cpu()
    if rank_and_world()[1] == 1:
        return features, logits
    # Every rank's shard placed at its dataset indices: the repeats that pad the last shard count once.
    size = len(loader.dataset)
    whole = [None if features is None else features.new_zeros(size, features.shape[-1]),
             logits.new_zeros(size, logits.shape[-1])]
    seen = torch.zeros(size, dtype=torch.bool)
    for shard_indices, *shard in gather_objects((torch.cat(indices), features, logits)):
        seen[shard_indices] = True
        for target, values in zip(whole, shard):
            if target is not None:
                target[shard_indices] = values
    assert seen.all(), "a distributed evaluation missed items"
    return tuple(whole)


def make_optimizer(params: list, lr: float) -> torch.optim.Optimizer:
    # fused: one pass over all parameters; AdamW is memory-bound, most of a fusion step's time (5.3M parameters).
    return torch.optim.AdamW(params, lr=lr, fused=True)


def compiled_step(trained: nn.Module, optimizer, cfg: Config, device: torch.device) -> tuple:
    """The module and train_step's update, compiled as --compile and --compile-mode ask (launches bound a GPU step)."""
    if not cfg.compile:
        return trained, clip_and_step
    if cfg.compile_mode != "reduce-overhead":
        return torch.compile(trained, mode=cfg.compile_mode), clip_and_step
    for group in optimizer.param_groups:  # lr a device tensor the schedule updates in place, not a compiled constant
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    return torch.compile(trained, mode=cfg.compile_mode), torch.compile(clip_and_step, mode=cfg.compile_mode)


def train_step(model: nn.Module, batch: dict, loss_fn, optimizer, scaler, params: list, cfg: Config,
               rt: Runtime, phase: str, update=clip_and_step) -> torch.Tensor:
    """One optimiser step; the loss stays on the device (reading it would make the host wait for the GPU)."""
    torch.compiler.cudagraph_mark_step_begin()  # a new training step: CUDA graphs' outputs may be reused
    with rt.autocast(phase):
        loss = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    update(optimizer, scaler, params, cfg)
    return loss.detach()


def fit(phase: str, model: nn.Module, loaders: dict, forward, loss_fn, epochs: int, lr: float,
        cfg: Config, rt: Runtime, run: Path, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Train `model`, keeping the epoch of best dev weighted F1; `scaler`: carried on from an earlier phase (D14)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr)
    schedule = transformers.get_linear_schedule_with_warmup(
        optimizer, *schedule_lengths(cfg, loaders["train"], epochs))
    scaler = rt.grad_scaler(phase) if scaler is None else scaler
    best, done = {"dev_wf1": -1.0}, 0
    checkpoint, weights = checkpoint_path(run, phase), weights_path(run, phase)
    if checkpoint.is_file():  # an interrupted run of this phase: continue after its last epoch
        done, best = restore_checkpoint(checkpoint, model, optimizer, schedule, scaler, loaders["train"].generator)
        log(f"[{phase:7s}] resuming after epoch {done} from {checkpoint}")
        written = {"best_epoch": str(done), "dev_wf1": str(best["dev_wf1"])}
        if (is_main_process() and best["best_epoch"] == done and not (
                weights.is_file() and written.items() <= safetensors_metadata(weights).items())):
            # Stopped between this best epoch's checkpoint and its weights (any there are an earlier run's).
            replace_weights(run, phase, model, best_epoch=done, dev_wf1=best["dev_wf1"])
    # DDP under torchrun; an encoder's pooler and data2vec's mask embedding go unused on some steps.
    trained = model if rank_and_world()[1] == 1 else DistributedDataParallel(
        model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None, find_unused_parameters=True)
    trained, update = compiled_step(trained, optimizer, cfg, rt.device)
    if cfg.compile:
        log(f"[{phase:7s}] --compile: the first steps compile the training step (minutes on a GPU)")
    for epoch in range(done + 1, epochs + 1):
        model.train()
        if isinstance(loaders["train"].sampler, DistributedSampler):
            loaders["train"].sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
        started, total_loss = time.time(), torch.zeros((), device=rt.device)
        for batch in progress(loaders["train"], f"{phase} {epoch}/{epochs}", cfg.quiet):
            total_loss += train_step(trained, to_device(batch, rt.device), loss_fn, optimizer, scaler,
                                     params, cfg, rt, phase, update)
            schedule.step()
        reports = {}
        for split in [s for s in ("dev", "test") if s in loaders]:
            logits = run_model(model, loaders[split], forward, rt, cfg.quiet, f"{phase} {split}")[1]
            reports[split] = split_scores(logits, dataset_labels(loaders[split].dataset), EMOTIONS[cfg.dataset])
        dev_wf1 = reports["dev"]["wf1"]  # every rank holds the same (gathered) reports
        improved = dev_wf1 > best["dev_wf1"]
        if improved:
            best = phase_metrics(reports, epoch)
        if rank_and_world()[1] > 1:  # the mean over the ranks
            dist.all_reduce(total_loss)
            total_loss /= rank_and_world()[1]
        loss = total_loss.item() / len(loaders["train"])
        if not is_main_process():  # rank 0 alone writes weights, logs and checkpoints
            continue
        test_wf1 = f"{reports['test']['wf1']:6.2f}" if "test" in reports else "   n/a"
        line = (f"[{phase:7s}] epoch {epoch:2d}/{epochs} loss {loss:.4f} "
                f"dev_wf1 {dev_wf1:6.2f} test_wf1 {test_wf1} best_epoch {best['best_epoch']:2d} "
                f"lr {schedule.get_last_lr()[0]:.2e} time {time.time() - started:.1f}s")
        log(line)
        with open(run / "train.log", "a") as f:
            f.write(line + "\n")
        # The checkpoint first: a run stopped before the best weights below are written writes them on resuming.
        save_checkpoint(checkpoint, epoch, best, model, optimizer, schedule, scaler, loaders["train"].generator)
        if improved:
            replace_weights(run, phase, model, best_epoch=epoch, dev_wf1=dev_wf1)
    if is_main_process():
        update_metrics(run, phase, best)
        write_json(complete_marker(run, phase), {"epochs": epochs, "best_epoch": best["best_epoch"],
                                                 "scaler": scaler.state_dict()})
        checkpoint.unlink(missing_ok=True)  # done: a small marker replaces the (optimizer-sized) checkpoint
    barrier()  # the next phase, on any rank, reads what rank 0 has just written
    return best


def teacher_dataset(cfg: Config, tokenizer, utterances: list[Utterance], **media) -> UtteranceDataset:
    """Each utterance's dialogue prompt as token ids (speakers indexed as cfg asks); `media`: UtteranceDataset's."""
    return UtteranceDataset(utterances, text_ids=teacher_input_ids(
        utterances, tokenizer, cfg.max_text_tokens, prompt_speakers(cfg, utterances)), **media)


def train_teacher(cfg: Config, rt: Runtime, run: Path, splits: dict) -> dict:
    """Phase 1: fine-tune the text encoder on the dialogue prompt with cross-entropy."""
    transformers.set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.text_model)
    add_speaker_tokens(tokenizer)
    encoder = pretrained_encoder(cfg.text_model, cfg, "text")
    encoder.resize_token_embeddings(len(tokenizer))
    save_encoder_config(run, "text", encoder, tokenizer)
    teacher = TextTeacher(encoder, len(EMOTIONS[cfg.dataset]), cfg.feature_dim).to(rt.device)
    collate = make_collate(cfg, pad_id=tokenizer.pad_token_id)
    loaders = {split: make_loader(teacher_dataset(cfg, tokenizer, utts), cfg, rt, collate,
                                  shuffle=split == "train", seed=cfg.seed) for split, utts in splits.items()}
    return fit("teacher", teacher, loaders, text_forward, teacher_loss, cfg.epochs[0], cfg.lr[0], cfg, rt, run)


def teacher_loss(model, batch):
    return F.cross_entropy(text_forward(model, batch)[1].float(), batch["label"])


def prepare_media(cfg: Config, splits: dict) -> MediaCache:
    """Decode the clips not cached yet and log every media fault (earlier ones too); --strict stops at one."""
    media = MediaCache(cfg)
    everything = [u for utts in splits.values() for u in utts]
    counts = media.prepare(everything, cfg.workers, cfg.quiet)
    faults = {"audio": 0, "video": 0}
    for u in everything:
        reasons = {kind: error.read_text() for kind in faults
                   if (error := media.location(kind, u).with_suffix(".err")).exists()}
        for kind in reasons:
            faults[kind] += 1
        if len(reasons) == 2 and u.audio == u.video and len(set(reasons.values())) == 1:
            reasons = {"audio and video": reasons["video"]}  # one clip: one line
        for kind, reason in reasons.items():
            log(f"media fault: {u.audio if kind == 'audio' else u.video}: {reason} ({kind} replaced by zeros)")
    decoded = (f"; {counts['clips']} clips decoded in {counts['seconds']:.0f} s "
               f"({counts['clips'] / counts['seconds']:.1f} clips/s)" if counts["clips"] else "")
    log(f"media: {len(everything)} utterances, {counts['cached']} entries cached, "
        f"{counts['decoded']} decoded, {sum(faults.values())} faults "
        f"(audio {faults['audio']}, video {faults['video']}){decoded}; cache {media.root}")
    if cfg.strict and sum(faults.values()):
        raise SystemExit(f"telme: {sum(faults.values())} media faults (listed above): stopped before any "
                         "model runs (train --strict; predict --csv without --missing-as-zeros)")
    return media


def train_students(cfg: Config, rt: Runtime, run: Path, splits: dict, media: MediaCache) -> None:
    """Phase 2: the audio, then the visual student, each distilled from the frozen teacher."""
    # The frozen teacher's (F_T, z_T), computed once: in eval mode, what it would give at every step.
    teacher = frozen_outputs(cfg, rt, run, {"train": splits["train"]}, encoders=("teacher",))["train"]
    t_features, t_logits = teacher["f_teacher"].to(rt.device), teacher["z_teacher"].to(rt.device)
    # D14: one gradient scaler for both students, as in the official code: the visual starts at the audio's last scale.
    scaler = rt.grad_scaler("audio") if cfg.official_precision else None
    if scaler is not None and phase_complete(run, "audio") and (  # resumed after the audio student
            state := json.loads(complete_marker(run, "audio").read_text()).get("scaler")):
        scaler.load_state_dict(state)
    for phase, kind in STUDENT_MEDIA.items():
        if phase_complete(run, phase):  # done before an interruption (train --resume)
            continue
        transformers.set_seed(cfg.seed)
        encoder = pretrained_encoder(getattr(cfg, f"{kind}_model"), cfg, kind)
        image_stats = image_statistics(cfg.video_model) if kind == "video" else None
        save_encoder_config(run, kind, encoder, image_stats)
        student = build_student(kind, encoder, len(EMOTIONS[cfg.dataset]), cfg.official_audio_pooling).to(rt.device)
        collate = make_collate(cfg, image_stats=image_stats)
        loaders = {split: make_loader(UtteranceDataset(utts, media=media, kinds=(kind,)), cfg, rt, collate,
                                      shuffle=split == "train", seed=cfg.seed) for split, utts in splits.items()}
        loss_fn = student_step_loss(host_time_masks(encoder, FORWARDS[phase]), t_features, t_logits, cfg)
        fit(phase, student, loaders, FORWARDS[phase], loss_fn, cfg.epochs[1], cfg.lr[1], cfg, rt, run, scaler)


def student_step_loss(forward, t_features: torch.Tensor, t_logits: torch.Tensor, cfg: Config):
    """A student's loss on a batch, against the frozen teacher's outputs for the batch's utterances."""
    def loss_fn(model, batch):
        s_features, s_logits = forward(model, batch)
        i = batch["index"]
        return student_loss(s_logits, s_features, t_logits[i], t_features[i], batch["label"], cfg)
    return loss_fn


class FeatureDataset(Dataset):
    """Frozen F_T, F_A, F_V and the label of each utterance of one split (any logits z_* left out)."""

    def __init__(self, features: dict):
        self.features = {k: v for k, v in features.items() if k.startswith("f_") or k == "label"}

    def __len__(self):
        return len(self.features["label"])

    def __getitem__(self, i):
        return {"index": i, **{k: v[i] for k, v in self.features.items()}}


def frozen_outputs(cfg: Config, rt: Runtime, run: Path, splits: dict, media: MediaCache | None = None,
                   encoders=("teacher", "audio", "visual")) -> dict:
    """Each split's labels and the frozen `encoders`' features F_<phase> and logits z_<phase>, computed once."""
    if media is None and set(encoders) - {"teacher"}:
        media = prepare_media(cfg, splits)
    teacher, tokenizer = load_teacher(run, cfg, rt)
    image_stats = image_statistics(str(encoder_dir(run, "video"))) if "visual" in encoders else None
    collate = make_collate(cfg, tokenizer.pad_token_id, image_stats)
    outputs = {split: {"label": torch.tensor([u.label for u in utts])} for split, utts in splits.items()}
    for phase in encoders:
        model = teacher if phase == "teacher" else load_student(run, STUDENT_MEDIA[phase], cfg, rt)
        for split, utts in splits.items():
            dataset = (teacher_dataset(cfg, tokenizer, utts) if phase == "teacher" else
                       UtteranceDataset(utts, media=media, kinds=(STUDENT_MEDIA[phase],)))
            loader = make_loader(dataset, cfg, rt, collate, shuffle=False)
            use = "frozen" if split == "train" else "eval"  # D14: a training step reads the train split's outputs
            outputs[split][f"f_{phase}"], outputs[split][f"z_{phase}"] = run_model(
                model, loader, FORWARDS[phase], rt, cfg.quiet, f"{phase} {split}", use)
        del model
    return outputs


def fusion_forward(model, batch):
    return None, model(batch["f_teacher"], batch["f_audio"], batch["f_visual"])


def fusion_loss(model, batch):
    return F.cross_entropy(fusion_forward(model, batch)[1].float(), batch["label"])


def train_fusion(cfg: Config, rt: Runtime, run: Path, splits: dict, media: MediaCache) -> dict:
    """Phase 3: the shifting fusion on the frozen encoders' features, computed once (D15: per training batch)."""
    if not cfg.official_fusion_batches:
        return fit_fusion(cfg, rt, run, frozen_outputs(cfg, rt, run, splits, media), cfg.epochs[2])
    outputs = frozen_outputs(cfg, rt, run, {split: utts for split, utts in splits.items() if split != "train"}, media)
    loader, features = per_batch_features(cfg, rt, run, splits["train"], media)
    return fit_fusion(cfg, rt, run, outputs, cfg.epochs[2], loader,
                      lambda model, batch: fusion_loss(model, batch | features(batch)))


def per_batch_features(cfg: Config, rt: Runtime, run: Path, utterances: list[Utterance], media: MediaCache):
    """D15: the official fusion training runs the frozen encoders in each shuffled batch (under D3 a clip's F_A
    depends on its batch mates): the loader of prompts and media, and a batch's F_T, F_A, F_V."""
    teacher, tokenizer = load_teacher(run, cfg, rt)
    models = {"teacher": teacher, **{phase: load_student(run, kind, cfg, rt) for phase, kind in STUDENT_MEDIA.items()}}
    dataset = teacher_dataset(cfg, tokenizer, utterances, media=media, kinds=("audio", "video"))
    collate = make_collate(cfg, tokenizer.pad_token_id, image_statistics(str(encoder_dir(run, "video"))))

    @torch.no_grad()
    def features(batch: dict) -> dict:
        with rt.autocast("frozen"):
            return {f"f_{phase}": FORWARDS[phase](model, batch)[0].float() for phase, model in models.items()}
    return make_loader(dataset, cfg, rt, collate, shuffle=True, seed=cfg.seed), features


def fit_fusion(cfg: Config, rt: Runtime, run: Path, outputs: dict, epochs: int, train_loader=None,
               loss_fn=fusion_loss) -> dict:
    """The shifting fusion trained on `outputs`' features and labels; D15: `train_loader` for the train split."""
    transformers.set_seed(cfg.seed)
    fusion = build_fusion(cfg).to(rt.device)
    loaders = {split: make_loader(FeatureDataset(out), cfg, rt, None, shuffle=split == "train", seed=cfg.seed)
               for split, out in outputs.items()}
    if train_loader is not None:
        loaders["train"] = train_loader
    return fit("fusion", fusion, loaders, fusion_forward, loss_fn, epochs, cfg.lr[2], cfg, rt, run)


# The phases each value of `train --phase` runs.
PHASE_GROUPS = {"teacher": ("teacher",), "students": ("audio", "visual"), "fusion": ("fusion",),
                "all": PHASES}


def train(cfg: Config, phase: str = "all", resume: bool = False, overwrite: bool = False) -> dict:
    """Train the phases of `phase` (teacher, students, fusion or all) into cfg.out, every input checked first.
    Weights or checkpoints of these or later phases need `resume` (continue) or `overwrite` (train anew)."""
    run = Path(cfg.out)
    first = PHASES.index(PHASE_GROUPS[phase][0])
    untrained = [p for p in PHASES[:first] if not weights_path(run, p).is_file()]
    if untrained:  # a later phase reads the earlier phases' weights: say so before decoding or writing anything
        raise SystemExit(f"telme: {run} has no {', '.join(untrained)} weights; --phase {phase} needs them")
    if resume and overwrite:
        raise SystemExit("telme: --resume continues a run, --overwrite starts its phases anew: give one")
    held = [p for p in PHASES[first:] if weights_path(run, p).is_file() or checkpoint_path(run, p).is_file()]
    if held and not (resume or overwrite):
        raise SystemExit(f"telme: {run} already holds {', '.join(held)} weights or checkpoints; --resume {run} "
                         f"continues that run, --overwrite trains --phase {phase} anew (and removes later phases)")
    rt = make_runtime(cfg)
    splits = load_splits(cfg)
    log(f"telme: {cfg.dataset} " + ", ".join(f"{s} {len(u)}" for s, u in splits.items())
        + f" utterances; device {rt.device}; run {run}")
    # The complete phases built on a phase to train go too: its new weights remove them (an interrupted --overwrite).
    todo = []
    for p in PHASE_GROUPS[phase]:
        if not (resume and phase_complete(run, p)) or any(p in DEPENDENT_PHASES[q] for q in todo):
            todo.append(p)
    for p, flag in (("teacher", "text_model"), ("audio", "audio_model"), ("visual", "video_model")):
        if p in todo:  # the pretrained encoders the phases to train start from
            check_model("--" + flag.replace("_", "-"), getattr(cfg, flag))
    media = prepare_media(cfg, splits) if set(todo) - {"teacher"} else None  # decoded once; --strict stops on a fault
    if is_main_process():  # every input checked: from here on the run directory changes
        run.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_run_config(cfg, rt, run)
            for p in todo:  # a phase trained anew starts from its first epoch
                checkpoint_path(run, p).unlink(missing_ok=True)
                complete_marker(run, p).unlink(missing_ok=True)
    if resume:
        log(f"telme: resuming {run}; complete: {', '.join(p for p in PHASE_GROUPS[phase] if p not in todo) or 'none'}")
    barrier()  # every rank sees the same checkpoints when deciding what to skip
    if "teacher" in todo:
        train_teacher(cfg, rt, run, splits)
    if "audio" in todo or "visual" in todo:
        train_students(cfg, rt, run, splits, media)
    if "fusion" in todo:
        train_fusion(cfg, rt, run, splits, media)
    return json.loads((run / "metrics.json").read_text())


def git_commit() -> str | None:
    """The code's commit, "-dirty" if tracked files differ; $TELME_GIT_COMMIT (the Dockerfile's) without .git."""
    if os.environ.get("TELME_GIT_COMMIT"):
        return os.environ["TELME_GIT_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    try:
        commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if changes else "")


def write_run_config(cfg: Config, rt: Runtime, run: Path) -> None:
    import sklearn
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or "cpu"
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "torchaudio": torchaudio.__version__,
                "av": av.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}
    content = {"config": dataclasses.asdict(cfg), "classes": EMOTIONS[cfg.dataset],
               "versions": versions, "device": device, "git_commit": git_commit(),
               "official_behaviours": compat_switches(cfg)}
    write_json(run / "config.json", content)


def read_run_config(run: Path) -> Config:
    path = run / "config.json"
    if not path.is_file():
        raise SystemExit(f"telme: {path} not found; is {run} a run directory?")
    return make_config(**json.loads(path.read_text())["config"])


# ==================================================================================================
# 6. Evaluation
# ==================================================================================================
def split_scores(logits: torch.Tensor, labels: np.ndarray, classes: list[str]) -> dict:
    """One split's weighted F1 (x100, the paper's metric), per-class precision/recall/F1, confusion matrix."""
    predictions = logits.argmax(-1).numpy()
    everything = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=everything, zero_division=0)
    wf1 = f1_score(labels, predictions, labels=everything, average="weighted", zero_division=0)
    return {"wf1": 100 * float(wf1),
            "per_class": {c: {"precision": 100 * float(precision[i]), "recall": 100 * float(recall[i]),
                              "f1": 100 * float(f1[i]), "support": int(support[i])}
                          for i, c in enumerate(classes)},
            "confusion": confusion_matrix(labels, predictions, labels=everything).tolist()}


def dataset_labels(dataset) -> np.ndarray:
    return (dataset.features["label"].numpy() if isinstance(dataset, FeatureDataset)
            else np.array([u.label for u in dataset.utterances]))


def phase_metrics(reports: dict, best_epoch: int) -> dict:
    """One phase's entry of metrics.json (README: Using a run); a split that is not there scores None."""
    return {**{f"{split}_wf1": reports[split]["wf1"] if split in reports else None for split in ("dev", "test")},
            "best_epoch": best_epoch,
            **{key: {split: r[key] for split, r in reports.items()} for key in ("per_class", "confusion")}}


def update_metrics(run: Path, phase: str, metrics: dict) -> None:
    path = run / "metrics.json"
    everything = (json.loads(path.read_text()) if path.is_file() else {}) | {phase: metrics}
    everything = {p: everything[p] for p in PHASES if p in everything}
    write_json(path, everything)


def trained_phases(run: Path) -> list[str]:
    trained = [p for p in PHASES if weights_path(run, p).is_file()]
    if not trained:
        raise SystemExit(f"telme: {run} holds no trained phase")
    return trained


def load_fusion(run: Path, cfg: Config, rt: Runtime) -> ShiftingFusion:
    return load_weights(build_fusion(cfg), weights_path(run, "fusion")).to(rt.device).eval()


def eval_outputs(run: Path, cfg: Config, rt: Runtime, splits: dict) -> dict:
    """For each split, the labels and every trained phase's logits z_<phase>."""
    trained = trained_phases(run)
    outputs = frozen_outputs(cfg, rt, run, splits, encoders=[p for p in trained if p != "fusion"])
    if "fusion" in trained:
        fusion = load_fusion(run, cfg, rt)
        for s, out in outputs.items():
            loader = make_loader(FeatureDataset(out), cfg, rt, None, shuffle=False)
            out["z_fusion"] = run_model(fusion, loader, fusion_forward, rt, cfg.quiet, s)[1]
    return outputs


def same_data(run: Path, saved: Config, data_dir: str, splits: dict) -> bool:
    """Whether `data_dir` holds the run's data: the same folder or, that one gone, the class counts of metrics.json."""
    if Path(data_dir).resolve() == Path(saved.data_dir).resolve():
        return True
    if Path(saved.data_dir).exists() or not (run / "metrics.json").is_file():
        return False
    recorded = next(iter(json.loads((run / "metrics.json").read_text()).values()))["per_class"]
    return set(recorded) == set(splits) and all(
        recorded[s][c]["support"] == sum(u.label == i for u in utts)
        for s, utts in splits.items() for i, c in enumerate(EMOTIONS[saved.dataset]))


def evaluate(run: Path, split: str = "test", quiet: bool = False, per_class: bool = True,
             out: Path | None = None, **overrides) -> dict:
    """Each trained phase's scores on the dev and test splits there are, into the run or (for other data) `out`."""
    saved = read_run_config(run)
    cfg = dataclasses.replace(saved, quiet=quiet, **overrides)
    rt = make_runtime(cfg)
    splits = {s: u for s, u in load_splits(cfg, required=()).items() if s in ("dev", "test")}
    if out is None and not same_data(run, saved, cfg.data_dir, splits):
        raise SystemExit(f"telme: {cfg.data_dir} is not the data {run} was trained on ({saved.data_dir}); "
                         "give --out DIR for its metrics, report and predictions (the run's stay as they are)")
    target = out or run
    classes = EMOTIONS[cfg.dataset]
    outputs = eval_outputs(run, cfg, rt, splits)
    results = {}
    for phase in trained_phases(run):
        reports = {s: split_scores(o[f"z_{phase}"], o["label"].numpy(), classes) for s, o in outputs.items()}
        best_epoch = int(safetensors_metadata(weights_path(run, phase)).get("best_epoch", 0))
        results[phase] = phase_metrics(reports, best_epoch)
    if is_main_process():
        if target == run:
            for phase, metrics in results.items():
                update_metrics(run, phase, metrics)
        else:
            write_json(target / "metrics.json", results)
        if per_class:
            print_per_class(results, split)
        write_report(target, results, cfg, split if split in splits else next(iter(splits)), run)
        write_predictions(target / "predictions.csv", splits, outputs, classes)
    return results


def write_predictions(path: Path, splits: dict, outputs: dict, classes: list[str], labelled: bool = True) -> None:
    """Each utterance: split, dialogue, clip name, speaker, text, label or "", each phase's class and probabilities."""
    phases = [p for p in PHASES if f"z_{p}" in next(iter(outputs.values()))]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["split", "dialogue", "utterance", "speaker", "text", "label"]
                    + [f"{p}_{c}" for p in phases for c in ("prediction", *classes)])
    for split, utts in splits.items():
        probabilities = [F.softmax(outputs[split][f"z_{p}"].float(), -1) for p in phases]
        for i, u in enumerate(utts):
            predicted = [[classes[int(q[i].argmax())], *(f"{x:.6f}" for x in q[i].tolist())] for q in probabilities]
            writer.writerow([split, u.dialogue, Path(u.audio or u.video).stem, u.speaker, u.text,
                             classes[u.label] if labelled else "", *itertools.chain(*predicted)])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


# --- report.md: what a reader wants from a run, in one page ----------------------------------------
# Test weighted F1 the paper reports: unimodal rows on MELD, the full model on both.
PAPER_WF1 = {"meld": {"teacher": 66.57, "audio": 46.60, "visual": 36.72, "fusion": 67.37},
             "iemocap": {"fusion": 70.48}}


def wf1_cell(wf1: float | None) -> str:
    return f"{wf1:.2f}" if wf1 is not None else "n/a"


def md_table(header: list[str], rows: list[list], rule: str = "") -> str:
    """A markdown table; under the header, `rule` or dashes as wide as the (padded) header cell."""
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in (header, *rows)]
    lines.insert(1, "|" + "|".join(rule or "-" * (len(h) + 2) for h in header) + "|")
    return "\n".join(lines)


def write_report(target: Path, results: dict, cfg: Config, split: str, run: Path) -> None:
    """TARGET/report.md and confusion.png: the phases, the final phase's per-class scores and confusion on `split`."""
    classes, paper = EMOTIONS[cfg.dataset], PAPER_WF1.get(cfg.dataset, {})
    final = list(results)[-1]  # the last trained phase: fusion once the run is complete
    phases = [[phase, m["best_epoch"], wf1_cell(m["dev_wf1"]), wf1_cell(m["test_wf1"]),
               f"{paper[phase]:.2f}" if phase in paper else ""] for phase, m in results.items()]
    lines = [f"# telme report: {run.name}", "",
             f"Dataset `{cfg.dataset}`" + (f", data `{cfg.data_dir}`" if cfg.data_dir else "")
             + (f", weights of run `{run}`" if run != target else "")
             + "; weighted F1 x100, each phase at the epoch with the best dev "
             "weighted F1. Written by `telme.py eval` from the saved weights.", "",
             "## Phases", "",
             md_table(["phase", "best epoch", "dev W-F1", "test W-F1", "paper test W-F1"], phases, "---")]
    if paper:
        lines += ["", f"The paper's figures are on the released {cfg.dataset.upper()} test split; "
                  "they compare with ours only when this run trained on that data."]
    per_class = [[c, *(f"{r[k]:.2f}" for k in ("precision", "recall", "f1")), r["support"]]
                 for c, r in results[final]["per_class"][split].items()]
    counts = np.array(results[final]["confusion"][split])
    normalised = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # rows: true classes
    header = ["true \\ predicted", *classes]
    lines += ["", f"## {final}, {split} split: per class", "",
              md_table(["class", "precision", "recall", "F1", "support"], per_class, "---"),
              "", f"## {final}, {split} split: confusion matrix (rows true, columns predicted)", "",
              "Counts:", "", md_table(header, [[c, *row] for c, row in zip(classes, counts)], "---"),
              "", "Row-normalised (% of each true class):", "",
              md_table(header, [[c, *(f"{100 * x:.1f}" for x in row)] for c, row in zip(classes, normalised)], "---"),
              "", "![confusion matrix](confusion.png)", "",
              "In the image, the shade is the row-normalised share, the number the count.", ""]
    atomic_write(target / "confusion.png", lambda f: f.write(confusion_png(counts, normalised, classes)))
    atomic_write(target / "report.md", lambda f: f.write("\n".join(lines).encode()))


CONFUSION_CELL = 64  # pixels per cell of confusion.png
CONFUSION_FONT_SIZE = 16
CONFUSION_LOW, CONFUSION_HIGH = np.array([255, 255, 255]), np.array([8, 48, 107])  # shares 0 and 1


def confusion_png(counts: np.ndarray, shares: np.ndarray, classes: list[str]) -> bytes:
    """The confusion matrix as a PNG: rows true, columns predicted; shade = row-normalised share, number = count."""
    font = ImageFont.load_default(size=CONFUSION_FONT_SIZE)
    cell, pad = CONFUSION_CELL, CONFUSION_FONT_SIZE // 2
    margin = 3 * pad + max(math.ceil(font.getlength(name)) for name in classes + ["predicted"])
    image = Image.new("RGB", (margin + len(classes) * cell,) * 2, "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin - pad, pad), "predicted", fill="black", font=font, anchor="ra")  # the corner:
    draw.text((pad, margin - pad), "true", fill="black", font=font, anchor="ld")  # what each edge holds
    for i, name in enumerate(classes):
        middle = margin + i * cell + cell // 2
        draw.text((margin - pad, middle), name, fill="black", font=font, anchor="rm")  # left: true
        column = Image.new("RGB", (margin, cell), "white")  # top: predicted, read bottom to top
        ImageDraw.Draw(column).text((pad, cell // 2), name, fill="black", font=font, anchor="lm")
        image.paste(column.rotate(90, expand=True), (margin + i * cell, 0))
        for j in range(len(classes)):
            top, left = margin + i * cell, margin + j * cell
            shade = CONFUSION_LOW + shares[i, j] * (CONFUSION_HIGH - CONFUSION_LOW)
            draw.rectangle((left + 1, top + 1, left + cell - 1, top + cell - 1),
                           fill=tuple(int(c) for c in shade.round()))
            draw.text((left + cell // 2, top + cell // 2), str(int(counts[i, j])), font=font, anchor="mm",
                      fill="white" if shares[i, j] > 0.5 else "black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def print_per_class(results: dict, split: str) -> None:
    for phase, m in results.items():
        if split in m["per_class"]:
            print(f"\n{phase} ({split}, best epoch {m['best_epoch']})")
            print(f"  {'class':10s} {'prec':>6s} {'recall':>6s} {'f1':>6s} {'support':>7s}")
            for c, r in m["per_class"][split].items():
                print(f"  {c:10s} {r['precision']:6.2f} {r['recall']:6.2f} {r['f1']:6.2f} {r['support']:7d}")


def print_summary(results: dict) -> None:
    rows = [[f"{phase:8s}", f"{wf1_cell(m['dev_wf1']):>8}", f"{wf1_cell(m['test_wf1']):>9}"]
            for phase, m in results.items()]
    print("\n" + md_table([f"{'phase':8s}", "dev W-F1", "test W-F1"], rows))


# --- Inference: one new utterance, from its clip, its text and the dialogue so far ----------------
NEW_SPEAKER = "(new speaker)"  # predict's default speaker: someone who has not spoken in the history


def read_history(path: Path) -> list[tuple[str, str]]:
    """A dialogue history file: `Speaker: utterance` lines, blank lines skipped."""
    if not path.is_file():
        raise SystemExit(f"telme: {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SystemExit(f"telme: {path}: not UTF-8 text") from None
    turns = [(number, line, *line.partition(":")) for number, line in enumerate(lines, start=1) if line.strip()]
    for number, line, speaker, colon, text in turns:
        if not colon or not speaker.strip() or not text.strip():
            raise SystemExit(f"telme: {path}:{number}: expected 'Speaker: utterance', got {line.strip()!r}")
    return [(speaker.strip(), text.strip()) for _, _, speaker, _, text in turns]


class Predictor:
    """A trained run, loaded once, for many predictions (the Python entry point; `telme.py predict` too):

        model = telme.Predictor("runs/meld")           # device="auto"
        result = model.predict("Oh my God!", history=[("Ross", "Hi.")], speaker="Rachel",
                               video="clip.mp4")       # audio: the clip's own sound unless given
        result["prediction"], result["probabilities"]  # the fusion's class and its distribution

    A named file that cannot be decoded stops it, unless `missing_as_zeros` (zeros, as in training)."""

    def __init__(self, run, device: str = "auto", missing_as_zeros: bool = False):
        run = Path(run)
        self.cfg = dataclasses.replace(read_run_config(run), device=device, quiet=True)
        self.rt = make_runtime(self.cfg)
        self.missing_as_zeros = missing_as_zeros
        self.classes, self.trained = EMOTIONS[self.cfg.dataset], trained_phases(run)
        teacher, self.tokenizer = load_teacher(run, self.cfg, self.rt)
        self.models = {"teacher": teacher} | {phase: load_student(run, kind, self.cfg, self.rt)
                                              for phase, kind in STUDENT_MEDIA.items() if phase in self.trained}
        self.fusion = load_fusion(run, self.cfg, self.rt) if "fusion" in self.trained else None
        image_stats = image_statistics(str(encoder_dir(run, "video"))) if "visual" in self.trained else None
        self.collate = make_collate(self.cfg, self.tokenizer.pad_token_id, image_stats)
        self.settings = MediaCache(self.cfg).settings

    def media(self, video: str | None, audio: str | None) -> tuple[dict, dict]:
        """The decoded inputs and {kind: why it is zeros} for the modalities that are."""
        item, missing = {"video": None, "audio": None}, {}
        for kind, path in (("video", video), ("audio", audio or video)):  # the clip's own sound by default
            if not path:
                missing[kind] = "no file given"
                continue
            if not os.path.isfile(path):
                raise SystemExit(f"telme: {path}: is a directory, not a {kind} file" if os.path.isdir(path)
                                 else f"telme: {path} not found")
            try:
                item[kind] = decode_media(kind, path, None, None, self.settings[kind])
            except MediaError as error:
                # A named file stops here; a clip without a sound track is not a bad file: its audio is zeros.
                if (kind == "video" or audio is not None) and not self.missing_as_zeros:
                    raise SystemExit(f"telme: {path}: {error} (--missing-as-zeros: zeros in its place)") from None
                missing[kind] = f"{path}: {error}"
        return item, missing

    def predict(self, text: str, history=(), speaker: str = NEW_SPEAKER, video: str | None = None,
                audio: str | None = None) -> dict:
        """Every trained phase's class probabilities for one utterance after `history` ((speaker, utterance) pairs),
        with eval's prompt, decoding and collation; a modality without a file goes in as zeros."""
        if not text.strip():
            raise SystemExit("telme: the utterance's text is empty; predict needs what is said")
        media, missing = self.media(video, audio) if self.trained != ["teacher"] else ({}, {})
        # The history and the new utterance form one dialogue; the prompt is built for its last turn.
        utterances = [Utterance("predict", who, said, 0, video or "", audio or "")
                      for who, said in [*history, (speaker, text)]]
        item = {"index": 0, "label": 0, **media,
                "input_ids": teacher_input_ids(utterances, self.tokenizer, self.cfg.max_text_tokens)[-1]}
        batch, features, logits = to_device(self.collate([item]), self.rt.device), {}, {}
        with torch.no_grad(), self.rt.autocast("eval"):
            for phase, model in self.models.items():
                f, z = FORWARDS[phase](model, batch)
                features[f"f_{phase}"], logits[phase] = f.float(), z.float()
            if self.fusion is not None:  # the features as eval feeds them to the fusion: float32
                logits["fusion"] = fusion_forward(self.fusion, features)[1].float()
        probabilities = {phase: F.softmax(z[0], dim=-1).cpu() for phase, z in logits.items()}
        phases = {phase: {"prediction": self.classes[int(p.argmax())],
                          "probabilities": dict(zip(self.classes, p.tolist()))} for phase, p in probabilities.items()}
        final = self.trained[-1]  # the fusion once the run is complete
        return {"model": final, **phases[final], "missing": missing, "phases": phases}


def predict_csv(run: Path, path: Path, clips: Path, out: Path, device: str = "auto", cache_dir: str = "",
                missing_as_zeros: bool = False) -> None:
    """Each row of a CSV in MELD's layout (Emotion optional), after its dialogue's earlier rows, as eval predicts it."""
    saved = read_run_config(run)
    cfg = dataclasses.replace(saved, device=device, quiet=True, strict=not missing_as_zeros,
                              cache_dir=cache_dir or saved.cache_dir)
    with open(path, newline="", encoding="utf-8-sig") as f:
        labelled = "Emotion" in next(csv.reader(f), [])
    try:
        utterances = read_meld_csv(path, clips, labelled, raw_text=cfg.official_text)
    except DataError as error:
        raise SystemExit(f"telme: {error}") from None
    outputs = eval_outputs(run, cfg, make_runtime(cfg), {"predict": utterances})
    write_predictions(out, {"predict": utterances}, outputs, EMOTIONS[cfg.dataset], labelled)
    log(f"telme: {len(utterances)} utterances predicted into {out}")


def print_prediction(result: dict, all_phases: bool) -> None:
    shown = list(result["phases"]) if all_phases else [result["model"]]
    print(f"{result['model']}: {result['prediction']}")
    for kind, reason in result["missing"].items():
        print(f"{kind} missing ({reason}): zeros in its place, as in training")
    rows = [[f"{c:10s}", *(f"{result['phases'][p]['probabilities'][c]:7.4f}" for p in shown)]
            for c in result["probabilities"]]
    print("\n" + md_table([f"{'class':10s}", *(f"{p:>7s}" for p in shown)], rows))


# --- Several seeds: mean and std of each phase ---------------------------------------------------
def summarize(runs: list[Path], out: Path) -> dict:
    """Each phase's dev and test weighted F1 over `runs` (one per seed): mean, sample std, values; out/summary.json."""
    if not runs:
        raise SystemExit("telme: summarize needs at least one run directory")
    for path in (run / name for run in runs for name in ("metrics.json", "config.json")):
        if not path.is_file():
            raise SystemExit(f"telme: {path} not found; did that run finish?")
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    configs = [json.loads((run / "config.json").read_text()) for run in runs]
    seeds, first = [c["config"]["seed"] for c in configs], configs[0]["config"]
    for i, (run, config) in enumerate(zip(runs, [c["config"] for c in configs])):
        earlier = next((r for r, s in zip(runs[:i], seeds) if r.resolve() == run.resolve() or s == seeds[i]), None)
        if earlier is not None:
            raise SystemExit(f"telme: {run} repeats {earlier} (seed {seeds[i]}); summarize takes each seed's run once")
        # Runs of one recipe differ in their seed, and where and how they ran (what a resume may change).
        differ = sorted(k for k in set(config) | set(first)
                        if k not in ("seed", "out", *RESUME_OVERRIDES) and config.get(k) != first.get(k))
        if differ:
            raise SystemExit(f"telme: {run} and {runs[0]} differ in {', '.join(differ)}; summarize "
                             "averages runs that differ in their seed alone")
    summary = {"runs": [str(r) for r in runs], "seeds": seeds, "devices": [c.get("device") for c in configs],
               # run.sh writes each run's wall-clock seconds (its phases and eval) to wall_clock_s.
               "wall_clock_s": [float((r / "wall_clock_s").read_text()) if (r / "wall_clock_s").is_file()
                                else None for r in runs],
               "phases": {}}
    for phase in [p for p in PHASES if any(p in m for m in metrics)]:
        found = [m[phase] for m in metrics if phase in m]
        entry = summary["phases"][phase] = {"n": len(found), "best_epoch": [m["best_epoch"] for m in found]}
        for metric in ("dev_wf1", "test_wf1"):
            values = [m[metric] for m in found if m[metric] is not None]
            entry[metric] = {"mean": statistics.fmean(values) if values else None,
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    write_json(out / "summary.json", summary)
    print_seed_summary(summary)
    return summary


def print_seed_summary(summary: dict) -> None:
    def cell(m):
        return f"{m['mean']:6.2f} ± {m['std']:5.2f}" if m["mean"] is not None else f"{'n/a':>14s}"
    rows = [[f"{phase:8s}", cell(m["dev_wf1"]), cell(m["test_wf1"]), f"{m['n']:5d}"]
            for phase, m in summary["phases"].items()]
    print("\n" + md_table([f"{'phase':8s}", f"{'dev W-F1':14s}", f"{'test W-F1':14s}", "seeds"], rows))
    clock = [t for t in summary["wall_clock_s"] if t is not None]
    print(f"seeds {summary['seeds']}; devices {sorted(set(map(str, summary['devices'])))}"
          + (f"; wall-clock {statistics.fmean(clock) / 60:.1f} min per run" if clock else ""))


# --- Official checkpoints as a telme run ----------------------------------------------------------
# Each phase's state dict in the official save_model/ folder; the fusion's name is not fixed there (--fusion-file).
OFFICIAL_FILES = {"teacher": "teacher.bin", "audio": "student_audio/total_student.bin",
                  "visual": "student_video/total_student.bin", "fusion": "total_fusion.bin"}
# Each official module name -> telme's, per phase; in the fusion (paper, section 3.4) the shapes tell them apart:
# W_hav: [A; F_T] 2304 -> 768 (gate g), W_av: A 1536 -> 768 (shift H), AV_LayerNorm: N' (1536), LayerNorm: F_T + lam H.
OFFICIAL_MODULES = {"teacher": {"text_model": "encoder", "W": "project", "classifier": "classifier"},
                    "audio": {"model": "encoder", "W": "classifier"},
                    "visual": {"model": "encoder", "W": "classifier"},
                    "fusion": {"multihead_attn": "attention", "AV_LayerNorm": "student_norm", "W_hav": "gate",
                               "W_av": "shift", "LayerNorm": "output_norm", "W": "classifier"}}


def official_state(path: Path, phase: str) -> dict[str, torch.Tensor]:
    """An official state dict, its keys as the official code names them."""
    if not path.is_file():
        raise SystemExit(f"telme: {path} not found (the official {phase} weights)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a zip/pickle, or holding more than tensors (refused unread)
        raise SystemExit(f"telme: {path}: not a loadable state dict: {error}") from None


def load_official(module: nn.Module, state: dict, path: Path, phase: str) -> None:
    """The official `state` into a meta-device module; keys that do not fit stop it, in the official code's names."""
    official = {telme: name for name, telme in OFFICIAL_MODULES[phase].items()}

    def name(key: str) -> str:  # a key of telme's module -> the official one
        module_name, _, rest = key.partition(".")
        return f"{official.get(module_name, module_name)}.{rest}"
    expected = {name(k): v for k, v in module.state_dict().items()}
    # Buffers that telme's transformers version does not save (position ids) may be in older files.
    unsaved = {name(n) for n, _ in module.named_buffers()} - set(expected)
    wrong = {"missing keys": sorted(set(expected) - set(state)),
             "unexpected keys": sorted(set(state) - set(expected) - unsaved),
             "shape mismatches": sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                                        for k, v in expected.items() if k in state and state[k].shape != v.shape)}
    if any(wrong.values()):
        raise SystemExit(f"telme: {path}: does not fit telme's {phase} model; "
                         + "; ".join(f"{what}: {', '.join(keys)}" for what, keys in wrong.items() if keys))
    module.load_state_dict({k: state[name(k)] for k in module.state_dict()}, assign=True)


def import_official(cfg: Config, directory: Path, fusion_file: str = OFFICIAL_FILES["fusion"]) -> Path:
    """The official code's saved weights as a telme run directory, so that `eval --run` reproduces its inference."""
    # The official fusion attends across the batch (D2): its attention weights only fit that scope.
    cfg = dataclasses.replace(cfg, asf_attention="batch")
    files = {phase: directory / name for phase, name in (OFFICIAL_FILES | {"fusion": fusion_file}).items()}
    states = {phase: official_state(path, phase) for phase, path in files.items()}
    classes = len(EMOTIONS[cfg.dataset])
    tokenizer = AutoTokenizer.from_pretrained(cfg.text_model)
    add_speaker_tokens(tokenizer)
    configs = {kind: encoder_config(getattr(cfg, f"{kind}_model"), cfg, kind) for kind in ("text", "audio", "video")}
    configs["text"].vocab_size = len(tokenizer)  # the official teacher was resized for <s1>..<s9> too
    with torch.device("meta"):  # shapes only, no memory: every weight comes from the files
        encoders = {kind: AutoModel.from_config(config) for kind, config in configs.items()}
        models = {"teacher": TextTeacher(encoders["text"], classes, cfg.feature_dim),
                  **{phase: build_student(kind, encoders[kind], classes, cfg.official_audio_pooling)
                     for phase, kind in STUDENT_MEDIA.items()}, "fusion": build_fusion(cfg)}
    for phase, model in models.items():
        load_official(model, states[phase], files[phase], phase)
    run = Path(cfg.out)
    write_run_config(cfg, make_runtime(cfg), run)
    save_encoder_config(run, "text", encoders["text"], tokenizer)
    save_encoder_config(run, "audio", encoders["audio"])
    save_encoder_config(run, "video", encoders["video"], image_statistics(cfg.video_model))
    for phase, model in models.items():  # best_epoch 0: not selected by telme
        save_weights(model, weights_path(run, phase), best_epoch=0, imported_from=files[phase])
    return run


# ==================================================================================================
# 7. Synthetic data and the offline demo
# ==================================================================================================
# Each class is a (group, bit) pair, label = 2 * group + bit: the text names only the group, the audio's pitch and
# the video's colour each carry the bit (noisily) and hint at the group; only the fusion of all three has the label.
SYNTH_GROUP_WORDS = [["ugh", "hate", "stop", "enough"], ["wow", "great", "yes", "really"],
                     ["okay", "fine", "whatever", "sure"], ["what", "huh", "seriously", "wait"]]
SYNTH_FILLER = ["i", "you", "the", "it", "we", "just", "that", "know", "think", "this", "so", "well"]
SYNTH_SPEAKERS = ["Ross", "Rachel", "Monica", "Chandler", "Joey", "Phoebe", "Janice", "Gunther"]
SYNTH_FPS, SYNTH_WIDTH, SYNTH_HEIGHT, SYNTH_AUDIO_RATE = 8, 64, 48, 48000
SYNTH_VIDEO_CODECS = {".mp4": ("libx264", {"preset": "ultrafast", "crf": "12"}),
                      ".avi": ("mpeg4", {"qscale": "2"})}  # near-lossless: the colour carries the label
SYNTH_WAV_RATE = 16000  # IEMOCAP's sentence wavs: 16 kHz mono, 16-bit
SYNTH_TURN_GAP = 0.5  # seconds of grey between two turns of a synthetic IEMOCAP dialogue video
SYNTH_DROPPED_RATE = 0.15  # share of synthetic IEMOCAP turns labelled outside the six classes
MELD_SENTIMENT = {"anger": "negative", "disgust": "negative", "fear": "negative", "joy": "positive",
                  "neutral": "neutral", "sadness": "negative", "surprise": "positive"}


def write_clip(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None,
               rate: int = SYNTH_AUDIO_RATE) -> None:
    """(N, H, W, 3) uint8 frames and (channels, samples) float audio, coded as MELD's .mp4 or IEMOCAP's .avi."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec, options = SYNTH_VIDEO_CODECS[path.suffix]
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=fps, options=options, width=frames.shape[2], height=frames.shape[1])
        layout = {1: "mono", 2: "stereo", 6: "5.1"}[audio.shape[0]] if audio is not None else None
        sound = container.add_stream("aac", rate=rate, layout=layout) if audio is not None else None
        for image in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            for first in range(0, audio.shape[1], 1024):  # AAC's frame size
                samples = np.ascontiguousarray(audio[:, first:first + 1024], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
                frame.sample_rate, frame.pts = rate, first
                container.mux(sound.encode(frame))
            container.mux(sound.encode())


def synth_utterance(label: int, num_classes: int, rng: random.Random) -> tuple[str, np.ndarray, np.ndarray]:
    """Text, frames and audio of one synthetic utterance of class `label`."""
    groups = (num_classes + 1) // 2
    group, bit = divmod(label, 2)
    if 2 * group + 1 >= num_classes:  # a class alone in its group: its bit carries nothing
        bit = rng.randrange(2)
    words = rng.sample(SYNTH_FILLER, rng.randint(2, 4)) + rng.sample(SYNTH_GROUP_WORDS[group], 2)
    rng.shuffle(words)
    text = " ".join(words).capitalize() + rng.choice([".", "!", "?"])
    seconds = rng.uniform(1.0, 2.5)
    # Audio: pitch low/high carries the bit (90% of the time); a 20% pitch step hints at the group.
    audio_bit = bit if rng.random() < 0.9 else 1 - bit
    audio_hint = group if rng.random() < 0.5 else rng.randrange(groups)
    pitch = (300.0 if audio_bit == 0 else 1500.0) * (1 + 0.2 * audio_hint)
    t = np.arange(int(seconds * SYNTH_AUDIO_RATE)) / SYNTH_AUDIO_RATE
    noise = np.random.default_rng(rng.randrange(2 ** 32))
    tone = 0.3 * np.sin(2 * np.pi * pitch * t) + 0.02 * noise.standard_normal(t.size)
    audio = np.stack([tone, tone]).astype(np.float32)  # stereo, as MELD
    # Video: red or blue carries the bit (85% of the time); brightness hints at the group.
    video_bit = bit if rng.random() < 0.85 else 1 - bit
    video_hint = group if rng.random() < 0.5 else rng.randrange(groups)
    colour = np.array([200, 40, 40] if video_bit == 0 else [40, 40, 200]) * (0.5 + 0.5 * video_hint / groups)
    count = max(2, int(seconds * SYNTH_FPS))
    frames = colour + noise.integers(-20, 21, size=(count, SYNTH_HEIGHT, SYNTH_WIDTH, 3))
    return text, np.clip(frames, 0, 255).astype(np.uint8), audio


def synth(out: Path, dataset: str = "meld", dialogues: int = 40, seed: int = 0) -> Path:
    """A synthetic dataset in the released layout of `dataset`; `dialogues` as `synth --dialogues` counts them."""
    rng = random.Random(seed)
    if dataset == "iemocap":
        return synth_iemocap(out, dialogues, rng)
    classes = EMOTIONS["meld"]
    for split, (csv_name, clip_dir) in MELD_SPLITS.items():
        rows = []
        for d in range(dialogues if split == "train" else max(2, dialogues // 4)):
            cast = rng.sample(SYNTH_SPEAKERS, rng.randint(2, 3))
            for u in range(rng.randint(3, 7)):
                label = rng.randrange(len(classes))
                text, frames, audio = synth_utterance(label, len(classes), rng)
                write_clip(out / clip_dir / f"dia{d}_utt{u}.mp4", frames, SYNTH_FPS, audio)
                rows.append([len(rows) + 1, text, rng.choice(cast), classes[label], MELD_SENTIMENT[classes[label]],
                             d, u, 1, 1, f"00:00:{u * 3:02d},000", f"00:00:{u * 3 + 2:02d},500"])
        with open(out / csv_name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([MELD_COLUMNS, *rows])
    return out


def synth_iemocap(out: Path, dialogues: int, rng: random.Random) -> Path:
    """IEMOCAP_full_release in miniature: its transcript and evaluation formats, a wav per turn, an avi per dialogue."""
    classes = EMOTIONS["iemocap"]
    # Sessions 1-4 take the dialogues in turn; Session 5 (the test split) a quarter as many.
    counts = {session: len(range(i, dialogues, 4)) for i, session in enumerate(IEMOCAP_SESSIONS[:4])}
    counts[IEMOCAP_TEST_SESSION] = max(2, dialogues // 4)
    grey = np.full((round(SYNTH_TURN_GAP * SYNTH_FPS), SYNTH_HEIGHT, SYNTH_WIDTH, 3), 128, np.uint8)
    for number, (session, count) in enumerate(counts.items(), start=1):
        root = out / session
        # The release spells the video folder DivX in some sessions and Divx in others.
        avi_dir = root / "dialog" / "avi" / ("DivX" if number % 2 else "Divx")
        for dialog in itertools.islice(synth_dialogue_names(session), count):
            transcript, evaluation = [], ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            video, cursor, turns = [grey], SYNTH_TURN_GAP, {"F": 0, "M": 0}  # grey before, between, after turns
            for _ in range(rng.randint(3, 7)):
                speaker, label = rng.choice("FM"), rng.randrange(len(classes))
                emotion = (rng.choice(sorted(IEMOCAP_DROPPED)) if rng.random() < SYNTH_DROPPED_RATE
                           else classes[label])
                text, frames, audio = synth_utterance(label, len(classes), rng)
                turn = f"{dialog}_{speaker}{turns[speaker]:03d}"
                turns[speaker] += 1
                start, end = cursor, cursor + len(frames) / SYNTH_FPS
                transcript.append(f"{turn} [{start:08.4f}-{end:08.4f}]: {text}")
                evaluation += [f"[{start:.4f} - {end:.4f}]\t{turn}\t{emotion}\t[2.5000, 2.5000, 2.5000]",
                               f"C-E1:\t{emotion};\t()", "A-E1:\tval 3; act 2; dom  2;\t()", ""]
                wav = root / "sentences" / "wav" / dialog / f"{turn}.wav"
                wav.parent.mkdir(parents=True, exist_ok=True)
                samples = torchaudio.functional.resample(torch.from_numpy(audio[0]), SYNTH_AUDIO_RATE, SYNTH_WAV_RATE)
                with wave.open(str(wav), "wb") as f:
                    f.setparams((1, 2, SYNTH_WAV_RATE, 0, "NONE", "not compressed"))  # mono, 16-bit PCM
                    f.writeframes((samples.numpy().clip(-1, 1) * 32767).astype("<i2").tobytes())
                video += [frames, grey]
                cursor = end + SYNTH_TURN_GAP
            write_clip(avi_dir / f"{dialog}.avi", np.concatenate(video), SYNTH_FPS)
            for folder, lines in (("transcriptions", transcript), ("EmoEvaluation", evaluation)):
                (root / "dialog" / folder).mkdir(parents=True, exist_ok=True)
                (root / "dialog" / folder / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
    return out


def synth_dialogue_names(session: str):
    """A session's dialogue names: an official dev one first (dev is never empty), then the release's pattern."""
    prefix = f"Ses0{session[-1]}"
    yield from sorted(name for name in IEMOCAP_DEV_DIALOGUES if name.startswith(prefix))[:1]
    for k in itertools.count():
        name = f"{prefix}{'FM'[k % 2]}_{('impro', 'script')[k // 2 % 2]}{k // 4 + 1:02d}"
        if name not in IEMOCAP_DEV_DIALOGUES:
            yield name


def word_level_tokenizer(corpus: list[str]):
    """A BERT-style word-level tokenizer trained offline on `corpus` (for tiny models)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(specials.values()))
    tokenizer.train_from_iterator(corpus + ["Now feels"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


def write_tiny_models(out: Path, corpus: list[str], dim: int, image_size: int, num_frames: int, seed: int = 0) -> dict:
    """Small random-weight encoders saved as model directories, so that they load as the real ones do."""
    from transformers import (BertConfig, BertModel, Data2VecAudioConfig, Data2VecAudioModel,
                              TimesformerConfig, TimesformerModel)
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer(corpus)
    small = dict(hidden_size=dim, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * dim)
    encoders = {
        "text": BertModel(BertConfig(vocab_size=len(tokenizer) + len(SPEAKER_TOKENS),
                                     max_position_embeddings=512, **small)),
        "audio": Data2VecAudioModel(Data2VecAudioConfig(
            conv_dim=(32, 32, 32), conv_kernel=(10, 4, 4), conv_stride=(5, 4, 4), conv_pos_kernel_size=5,
            num_conv_pos_embeddings=2, num_conv_pos_embedding_groups=4, **small)),
        "video": TimesformerModel(TimesformerConfig(image_size=image_size, patch_size=image_size // 4,
                                                    num_frames=num_frames, **small)),
    }
    paths = {kind: str(out / kind) for kind in encoders}
    for kind, encoder in encoders.items():
        encoder.save_pretrained(paths[kind])
    tokenizer.save_pretrained(paths["text"])
    mean, std = TIMESFORMER_IMAGE_STATS
    transformers.VideoMAEImageProcessor(image_mean=mean, image_std=std).save_pretrained(paths["video"])
    return paths


# Tiny models and learning rates that a CPU trains in minutes; everything else is the preset.
DEMO = dict(epochs=(15, 6, 12), lr=(1e-3, 1e-3, 1e-3), batch_size=8, max_text_tokens=48,
            image_size=32, feature_dim=48, max_audio_samples=48000)
DEMO_DIALOGUES = 48  # synthetic training dialogues (a quarter as many each in dev and test)
DEMO_THREADS = 1  # the demo's torch threads: its tiny models gain little from a second one (README: threads)


def demo(out: Path, dataset: str = "meld", seed: int = 42, quiet: bool = False) -> dict:
    """Synthetic data -> tiny encoders -> all three phases -> eval in the run directory `out` (inputs in out/inputs)."""
    started = time.time()
    # A demo run directory is the demo's to replace; any other run is refused (train's check).
    config = out / "config.json"
    again = config.is_file() and json.loads(config.read_text())["config"]["data_dir"] == str(out / "inputs" / "data")
    if any(weights_path(out, p).is_file() for p in PHASES) and not again:
        raise SystemExit(f"telme: {out} holds a run that is not a demo's; choose another --out")
    data = synth(out / "inputs" / "data", dataset, DEMO_DIALOGUES, seed=seed)
    corpus = [u.text for utts in load_splits(make_config(dataset, data_dir=str(data))).values() for u in utts]
    models = write_tiny_models(out / "inputs" / "models", corpus, DEMO["feature_dim"], DEMO["image_size"], 8, seed)
    cfg = make_config(dataset, data_dir=str(data), out=str(out), cache_dir=str(out / "inputs" / "cache"), seed=seed,
                      quiet=quiet, **{f"{kind}_model": path for kind, path in models.items()}, **DEMO)
    train(cfg, overwrite=again)
    results = evaluate(Path(cfg.out), quiet=quiet, per_class=False)
    print(f"\ndemo finished in {time.time() - started:.0f} s; run directory {cfg.out}; "
          f"per-class reports: python telme.py eval --run {cfg.out}")
    print_summary(results)
    return results


# ==================================================================================================
# 8. Benchmark: decoding once, the caches, full-size training steps
# ==================================================================================================
# MELD's clip format. The footage, random 64-pixel blocks panning 3 pixels per frame, gives h264 motion to encode.
BENCH_CLIP = dict(width=1280, height=720, fps=24, seconds=(2.0, 6.0), audio_rate=48000, block=64, pan=3)
# Teacher prompt lengths, drawn uniformly so that compiling meets new ones (batches of 4 pad to 166 tokens; MELD: 160).
BENCH_TEXT_TOKENS = (64, 192)
# (warm-up, timed) training steps and forward-only batches per phase (a full-size step: tens of seconds on a
# CPU). On a GPU each new input length first pays for cuDNN plans, matmul heuristics and the allocator's growth
# (the teacher: 6.8 steps/s after 30 warm-up steps, 10.1 after 200): the warm-up spans the bench's lengths.
BENCH_STEPS = {"cpu": (1, 1), "cuda": (200, 50)}
BENCH_EVAL_BATCHES = {"cpu": (1, 1), "cuda": (20, 20)}
MELD_SIZES = {"train": 9989, "dev": 1109, "test": 2610}  # for the fusion epoch and the projection


def bench_clips(out: Path, count: int, seed: int = 0) -> list[Utterance]:
    """`count` clips in MELD's format, written with write_clip; one utterance per clip."""
    rng = np.random.default_rng(seed)
    width, height, fps, rate = (BENCH_CLIP[k] for k in ("width", "height", "fps", "audio_rate"))
    block, pan = BENCH_CLIP["block"], BENCH_CLIP["pan"]
    utterances = []
    for i in range(count):
        seconds = rng.uniform(*BENCH_CLIP["seconds"])
        frame_count = int(seconds * fps)
        span = width + pan * frame_count  # the texture pans across this width
        blocks = rng.integers(0, 256, (-(-height // block), -(-span // block), 3), dtype=np.uint8)
        texture = blocks.repeat(block, 0).repeat(block, 1)
        frames = np.stack([texture[:height, pan * k:pan * k + width] for k in range(frame_count)])  # (N, H, W, 3)
        t = np.arange(int(seconds * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.02 * rng.standard_normal(t.size)
        path = out / f"dia{i}_utt0.mp4"
        write_clip(path, frames, fps, np.stack([tone, tone]).astype(np.float32), rate)
        utterances.append(Utterance(str(i), "A", "", i % len(EMOTIONS["meld"]), str(path), str(path)))
    return utterances


def bench_phase(job: tuple) -> dict:
    """Steps/s, eval batches/s and peak memory (its own: a fresh process) of one phase, full size, random weights."""
    phase, cfg, utterances, (warmup, steps), (eval_warmup, eval_batches), threads = job
    if threads:
        torch.set_num_threads(threads)
    rt = make_runtime(cfg)
    transformers.set_seed(cfg.seed)
    # The clips repeated: one pass of each loader spans its batches (a MELD epoch starts its workers once).
    needed = max((warmup + steps) * cfg.batch_size, (eval_warmup + eval_batches) * cfg.eval_batch_size)
    utterances = utterances * -(-needed // len(utterances))
    classes, n = len(EMOTIONS[cfg.dataset]), len(utterances)
    if phase == "teacher":  # prompts are token ids in memory; the teacher phase opens no media
        # RoBERTa-large (RobertaConfig's defaults are roberta-base), its vocabulary plus <s1>..<s9>
        text = AutoConfig.for_model("roberta", vocab_size=50265 + len(SPEAKER_TOKENS), hidden_size=1024,
                                    num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                                    max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
        model = TextTeacher(AutoModel.from_config(text), classes, cfg.feature_dim)
        lengths = torch.randint(BENCH_TEXT_TOKENS[0], BENCH_TEXT_TOKENS[1] + 1, (n,)).tolist()
        ids = [torch.randint(3, text.vocab_size, (k,)).tolist() for k in lengths]
        dataset, collate = UtteranceDataset(utterances, text_ids=ids), make_collate(cfg, pad_id=text.pad_token_id)
        forward, loss_fn = text_forward, teacher_loss
    elif phase == "fusion":  # the frozen encoders' features, computed once
        model = build_fusion(cfg)
        features = {k: torch.randn(n, cfg.feature_dim) for k in ("f_teacher", "f_audio", "f_visual")}
        dataset = FeatureDataset(features | {"label": torch.tensor([u.label for u in utterances])})
        collate, forward, loss_fn = None, fusion_forward, fusion_loss
    else:  # a student on cached media, against the frozen teacher's precomputed outputs
        kind, forward = STUDENT_MEDIA[phase], audio_forward if phase == "audio" else video_forward
        config = (AutoConfig.for_model("data2vec-audio", mask_time_length=cfg.mask_time_length) if kind == "audio"
                  else AutoConfig.for_model("timesformer", num_frames=cfg.num_frames, image_size=cfg.image_size))
        model = build_student(kind, AutoModel.from_config(config), classes)  # data2vec-audio-base, TimeSformer-base
        dataset, collate = UtteranceDataset(utterances, media=MediaCache(cfg), kinds=(kind,)), make_collate(cfg)
        loss_fn = student_step_loss(host_time_masks(model.encoder, forward) if kind == "audio" else forward,
                                    torch.randn(n, cfg.feature_dim, device=rt.device),
                                    torch.randn(n, classes, device=rt.device), cfg)
    model.to(rt.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scaler = make_optimizer(params, cfg.lr[1]), rt.grad_scaler(phase)
    trained, update = compiled_step(model, optimizer, cfg, rt.device)  # compiled during the warm-up steps
    batches = iter(make_loader(dataset, cfg, rt, collate, shuffle=True, seed=cfg.seed))
    waited, begun = 0.0, time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            rt.synchronize()
            started, waited = time.perf_counter(), 0.0
        before = time.perf_counter()
        batch = to_device(next(batches), rt.device)
        waited += time.perf_counter() - before
        train_step(trained, batch, loss_fn, optimizer, scaler, params, cfg, rt, phase, update)
    rt.synchronize()
    elapsed, warmup_s = time.perf_counter() - started, started - begun  # compiling included, under --compile
    # Forward-only batches as evaluation runs them (run_model returns outputs on the host: the device is done).
    loader = make_loader(dataset, cfg, rt, collate, shuffle=False)
    batches = iter(loader)
    run_model(model, itertools.islice(batches, eval_warmup), forward, rt, cfg.quiet, "warm-up")
    eval_started = time.perf_counter()
    run_model(model, itertools.islice(batches, eval_batches), forward, rt, cfg.quiet, "timed")
    eval_elapsed = time.perf_counter() - eval_started
    if rt.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(rt.device)
    else:  # the process's peak RSS, libraries included
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    # start_s: what a training run of this phase pays once beyond its steps (compiling, cuDNN plans)
    return {"phase": phase, "steps_per_s": steps / elapsed, "data_share": waited / elapsed, "warmup_s": warmup_s,
            "start_s": max(0.0, warmup_s - warmup * elapsed / steps), "eval_batch": loader.batch_size,
            "eval_batches_per_s": eval_batches / eval_elapsed,
            "peak_gib": peak / 2 ** 30, "parameters_m": sum(p.numel() for p in params) / 1e6}


def bench(cfg: Config, out: Path, clips: int, steps: int | None, parts: str, phases: tuple = PHASES) -> dict:
    """Print (a) decoding and the cache, (b) training steps per phase, (c) a MELD-sized fusion epoch, the projection."""
    if set(phases) - set(PHASES):
        raise SystemExit(f"telme: --phases takes {','.join(PHASES)}, not {','.join(phases)}")
    rt = make_runtime(cfg)
    kind = "cuda" if rt.device.type == "cuda" else "cpu"
    device = torch.cuda.get_device_name(rt.device) if kind == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    started = time.perf_counter()
    print(f"telme bench on {rt.device} ({device}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"amp {rt.amp_dtype}, compile {cfg.compile} ({cfg.compile_mode}), text bucket {cfg.text_bucket}, "
          f"audio buckets {cfg.audio_buckets}; load average {os.getloadavg()[0]:.1f}")
    cfg = dataclasses.replace(cfg, cache_dir=str(out / "cache"), quiet=True)
    results = {"device": device}
    if "a" in parts or "b" in parts:  # decoded as prepare runs, into the cache (b)'s students read
        utterances = bench_clips(out / "clips", clips)
        decoded = MediaCache(cfg).prepare(utterances, cfg.workers, quiet=True)
    if "a" in parts:
        size = sum(p.stat().st_size for p in Path(cfg.cache_dir).rglob("*.npy"))
        print(f"\n(a) decoding {clips} clips in MELD's format (1280x720 h264 24 fps, 2-6 s, 48 kHz stereo AAC) with "
              f"`prepare` ({decoded['workers']} workers, start-up included): {clips / decoded['seconds']:.2f} clips/s, "
              f"{size / clips / 1e6:.2f} MB/clip in the cache")
    if "b" in parts:
        warmup, timed = BENCH_STEPS[kind][0], steps or BENCH_STEPS[kind][1]
        print(f"\n(b) training steps, full-size encoders with random weights, batch {cfg.batch_size} ({timed} "
              f"timed after {warmup} warm-up; teacher prompts {BENCH_TEXT_TOKENS[0]}-{BENCH_TEXT_TOKENS[1]} "
              f"tokens); forward-only batches as evaluation runs them\n| phase | parameters (M) | steps/s "
              f"| s/step | waiting for data | warm-up s | peak {'GPU memory' if kind == 'cuda' else 'RSS'} (GiB) "
              f"| eval batch | eval batches/s |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        results["steps"] = []
        for phase in phases:  # a row as each phase ends
            # A fresh process per phase (not a daemonic Pool worker: those cannot start DataLoader workers).
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                job = (phase, cfg, utterances, (warmup, timed), BENCH_EVAL_BATCHES[kind], torch.get_num_threads())
                results["steps"].append(r := pool.submit(bench_phase, job).result())
            print(f"| {phase} | {r['parameters_m']:.1f} | {r['steps_per_s']:.3f} | {1 / r['steps_per_s']:.3f} "
                  f"| {100 * r['data_share']:.1f}% | {r['warmup_s']:.1f} | {r['peak_gib']:.2f} | {r['eval_batch']} "
                  f"| {r['eval_batches_per_s']:.3f} |", flush=True)
    if "c" in parts:  # one epoch of fit_fusion (train, then dev and test) on MELD-sized feature caches
        outputs = {split: {k: torch.randn(n, cfg.feature_dim) for k in ("f_teacher", "f_audio", "f_visual")}
                   | {"label": torch.randint(len(EMOTIONS[cfg.dataset]), (n,))} for split, n in MELD_SIZES.items()}
        run = out / "fusion-run"
        run.mkdir(parents=True, exist_ok=True)
        epoch_started = time.perf_counter()
        fit_fusion(cfg, rt, run, outputs, epochs=1)
        rt.synchronize()
        results["fusion_epoch_s"] = time.perf_counter() - epoch_started
        print(f"\n(c) fusion epoch from the feature caches, MELD-sized (train {MELD_SIZES['train']}, dev "
              f"{MELD_SIZES['dev']}, test {MELD_SIZES['test']}; dim {cfg.feature_dim}; batch "
              f"{cfg.batch_size}): {results['fusion_epoch_s']:.1f} s")
    if "b" in parts and "c" in parts and set(phases) == set(PHASES):
        print_projection(results, make_config("meld"))
    print(f"\nbench: {time.perf_counter() - started:.0f} s in all")
    return results


def print_projection(results: dict, meld: Config) -> None:
    """The MELD recipe's wall-clock on this device, projected from the measured rates."""
    measured = {r["phase"]: r for r in results["steps"]}

    def forward_seconds(phase: str, splits) -> float:  # one forward-only pass over these splits
        batches = sum(math.ceil(MELD_SIZES[s] / measured[phase]["eval_batch"]) for s in splits)
        return batches / measured[phase]["eval_batches_per_s"]

    def training_seconds(phase: str, epochs: int) -> float:  # each epoch trains, then evaluates dev and test
        steps = math.ceil(MELD_SIZES["train"] / meld.batch_size) / measured[phase]["steps_per_s"]
        return measured[phase]["start_s"] + epochs * (steps + forward_seconds(phase, ("dev", "test")))

    # Frozen outputs are computed once: the teacher's on train for the students, all three encoders' on every
    # split for the fusion. Each fusion epoch was timed with its start (compiling): nine starts too many.
    seconds = {"teacher": training_seconds("teacher", meld.epochs[0]),
               "students": forward_seconds("teacher", ("train",)) + training_seconds("audio", meld.epochs[1])
               + training_seconds("visual", meld.epochs[1]),
               "fusion": sum(forward_seconds(p, MELD_SIZES) for p in ("teacher", "audio", "visual"))
               + meld.epochs[2] * results["fusion_epoch_s"]}
    hours = results["projected_hours"] = {phase: value / 3600 for phase, value in seconds.items()}
    print(f"\nprojected MELD recipe on this device (epochs {meld.epochs}, batch {meld.batch_size}; "
          f"decoding not included): " + ", ".join(f"{p} {h:.2f} h" for p, h in hours.items())
          + f"; total {sum(hours.values()):.2f} h")


# ==================================================================================================
# 9. Command line
# ==================================================================================================
def parse_numbers(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(x) for x in text.split(","))
    return parse


def add_config_flags(parser: argparse.ArgumentParser, names=None):
    """A flag per Config field (or in `names`), docstring as help, the preset's value if unset; returns add_argument."""
    docs = field_docs(Config)
    for f in [f for f in dataclasses.fields(Config) if names is None or f.name in names]:
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":  # --X and --no-X: run.sh's recipes pass --compile, and a --no-compile after it wins
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=docs[f.name])
            continue
        kind = {"int": int, "float": float, "str": str,
                "tuple": parse_numbers(int if f.name == "epochs" else float)}[f.type]
        default = f.default
        if f.name in PRESETS["meld"]:  # the dataset's preset
            default = ", ".join(f"{d} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                for d, v in ((d, PRESETS[d][f.name]) for d in PRESETS))
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=docs[f.name] + (f" [default: {default}]" if default != "" else ""))
    return parser.add_argument


def config_from_args(args: argparse.Namespace) -> Config:
    return make_config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)})


# What `train --resume` may change: where things are and how they run. The compile flags change which
# dropout masks are drawn, --text-bucket the last float bits; the others leave the results as they were.
RESUME_OVERRIDES = ("data_dir", "cache_dir", "device", "loader_workers", "workers", "quiet", "compile",
                    "compile_mode", "text_bucket")


def resume_config(args: argparse.Namespace) -> Config:
    """The interrupted run's configuration: flags may repeat it (run.sh does) and change only RESUME_OVERRIDES."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    saved = read_run_config(Path(args.resume))
    if "out" in given and Path(given.pop("out")).resolve() != Path(args.resume).resolve():
        raise SystemExit(f"telme: --out and --resume {args.resume} name different runs")
    requested = make_config(**{"dataset": saved.dataset, **given})
    changed = sorted(k for k in given if k not in RESUME_OVERRIDES and getattr(requested, k) != getattr(saved, k))
    if changed:
        raise SystemExit(f"telme: --resume {args.resume} keeps its config.json; "
                         f"--{changed[0].replace('_', '-')} cannot be changed")
    return dataclasses.replace(saved, out=args.resume, **{k: v for k, v in given.items() if k in RESUME_OVERRIDES})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telme.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    datasets = dict(choices=sorted(PRESETS), default="meld")
    # Each command's flags in --help order; `add` is the add_argument of the command named last.
    add_config_flags(commands.add_parser("prepare", help="decode every clip once into the media cache"))
    add = add_config_flags(commands.add_parser("train", help="train the phases, best epoch chosen on dev"))
    add("--phase", choices=["teacher", "students", "fusion", "all"], default="all", help="teacher (text), students "
        "(audio, then visual; needs the teacher), fusion (needs all three), or all in turn [default: all]")
    add("--resume", metavar="RUN", help="continue an interrupted run from its last completed epoch, with the "
        "configuration in RUN/config.json")
    add("--overwrite", action="store_true", help="train phases that --out already holds anew; their old weights, "
        "and those of the phases trained on them, go once new weights exist")
    add = commands.add_parser("eval", help="recompute metrics.json of a run and print reports").add_argument
    add("--run", required=True, help="a trained run directory")
    add("--out", help="folder for metrics.json, report.md, confusion.png and predictions.csv [default: the run "
        "itself; needed for data other than the run's]")
    add("--split", choices=["dev", "test"], default="test", help="split whose per-class table is printed")
    add("--quiet", action="store_true", help="no progress bars or lines")
    for flag, what in (("--data-dir", "the dataset"), ("--cache-dir", "the media cache"),
                       ("--device", "the device to run on")):
        add(flag, help=f"{what}, where not as in the run's config.json")
    add = commands.add_parser("predict", help="the emotion of one new utterance from its clip, text and dialogue "
                              "history").add_argument
    add("--run", required=True, help="a trained run directory")
    add("--text", help="what is said in the utterance (this or --csv)")
    add("--csv", help="many utterances: a CSV in MELD's layout (Utterance, Speaker, Dialogue_ID, Utterance_ID; "
        "Emotion optional), each predicted with its dialogue's earlier rows as history, into --out")
    add("--clips", help="with --csv: the folder of its clips dia<D>_utt<U>.mp4 [default: the CSV's folder]")
    add("--out", help="with --csv: the predictions file to write (eval's predictions.csv columns)")
    add("--cache-dir", help="with --csv: the media cache [default: the run's]")
    add("--missing-as-zeros", action="store_true", help="a named file that cannot be decoded goes in as zeros (as "
        "in training) instead of stopping with an error")
    add("--video", help="the utterance's clip (mp4, avi, ...); without it, no visual input")
    add("--audio", help="a separate recording (wav, ...); default: the clip's own sound")
    add("--history", help="the dialogue so far: a file of 'Speaker: utterance' lines")
    add("--speaker", default=NEW_SPEAKER, help="who says it; a name from the history reuses that speaker's token "
        "[default: someone new]")
    add("--all-phases", action="store_true", help="also the teacher's and each student's probabilities")
    add("--json", action="store_true", help="print JSON instead of a table")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add = commands.add_parser("stats", help="dialogue, utterance and class counts as JSON").add_argument
    add("--dataset", **datasets, help="[default: meld]")
    add("--data-dir", required=True, help="the dataset as released")
    add = commands.add_parser("synth", help="write a synthetic dataset in the released layout").add_argument
    add("--out", required=True, help="folder for the dataset")
    add("--dataset", **datasets, help="whose released layout [default: meld]")
    add("--dialogues", type=int, default=40, help="MELD: train dialogues (dev, test: a quarter); IEMOCAP: Session "
        "1-4 dialogues (Session 5: a quarter)")
    add("--seed", type=int, default=0, help="seed of the texts and media [default: 0]")
    add = commands.add_parser("summarize", help="mean ± std over runs of several seeds").add_argument
    add("runs", nargs="+", help="run directories, one per seed")
    add("--out", required=True, help="folder for summary.json")
    add = add_config_flags(commands.add_parser("import-official", help="the official code's saved weights as a run "
                                               "directory for eval (compat official unless --compat none)"))
    add("--dir", required=True, help="the official save_model/ folder")
    add("--fusion-file", default=OFFICIAL_FILES["fusion"],
        help=f"the fusion's state dict, inside --dir [default: {OFFICIAL_FILES['fusion']}]")
    add = commands.add_parser("demo", help="synth + tiny models + all phases + eval, offline").add_argument
    add("--out", default="runs/demo", help="the run directory; the demo's data, models and media cache go in "
        "OUT/inputs [default: runs/demo]")
    add("--dataset", **datasets, help="the layout of the synthetic data [default: meld]")
    add("--seed", type=int, default=42, help="seed of data, models and training [default: 42]")
    add("--quiet", action="store_true", help="no progress bars or lines")
    bench_cmd = commands.add_parser("bench", help="print decoding, cache and training-speed figures")
    add = bench_cmd.add_argument
    add("--out", default="", help="folder for the clips and caches [default: a temporary one]")
    add("--clips", type=int, default=8, help="synthetic MELD-format clips to decode")
    add("--steps", type=int, default=0, help=f"timed steps per phase [default: {BENCH_STEPS['cpu'][1]} on a CPU, "
        f"{BENCH_STEPS['cuda'][1]} on CUDA]")
    add("--parts", default="abc", help="a: decoding, b: training steps, c: fusion epoch")
    add("--phases", type=lambda text: tuple(text.split(",")), default=PHASES,
        help=f"the phases (b) times [default: {','.join(PHASES)}]")
    add_config_flags(bench_cmd, ("device", "amp", "compile", "compile_mode", "text_bucket", "audio_buckets",
                                 "workers", "loader_workers", "batch_size", "eval_batch_size"))
    for name, command in commands.choices.items():
        default = DEMO_THREADS if name == "demo" else "$OMP_NUM_THREADS if set, else the cores this process may use"
        command.add_argument("--threads", type=int, help=f"torch CPU threads [default: {default}]; on a CPU shared "
                             "with other jobs, 1 keeps threads from spinning while they wait for a core (README)")
    return parser


def join_negative_values(argv: list[str]) -> list[str]:
    """`--lr -1e-3` as `--lr=-1e-3` for make_config's range check: argparse takes "-1e-3" (unlike "-1") for a flag."""
    joined = []
    for token in argv:
        if re.match(r"-\.?\d", token) and joined and joined[-1].startswith("--") and "=" not in joined[-1]:
            joined[-1] += "=" + token
        else:
            joined.append(token)
    return joined


def default_threads(command: str) -> int:
    if command == "demo":
        return DEMO_THREADS
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def interrupted(run: Path, phase: str) -> str:
    """The line Ctrl-C during train ends with: what the run directory holds, and how to continue."""
    if not (run / "config.json").is_file():
        return "telme: interrupted before training began; nothing was written"
    epochs = {p: saved_epoch(run, p) for p in PHASES}
    saved = [f"{p} complete" if phase_complete(run, p) else f"{p} up to epoch {epochs[p]}"
             for p in PHASES if phase_complete(run, p) or epochs[p] is not None]
    return (f"telme: interrupted; {run} holds " + (", ".join(saved) or "no finished epoch")
            + f"; continue with: python telme.py train --resume {run} --phase {phase}")


def main(argv=None) -> None:
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    args.threads = args.threads if args.threads is not None else default_threads(args.command)
    if args.threads < 1:
        raise SystemExit(f"telme: --threads must be at least 1, not {args.threads}")
    torch.set_num_threads(args.threads)

    if args.command == "prepare":
        cfg = config_from_args(args)
        make_runtime(cfg)  # under torchrun: joins the other processes, which share the decoding
        prepare_media(cfg, load_splits(cfg))
    elif args.command == "train":
        cfg = resume_config(args) if args.resume else config_from_args(args)
        try:
            train(cfg, args.phase, resume=bool(args.resume), overwrite=args.overwrite)
        except KeyboardInterrupt:
            print(interrupted(Path(cfg.out), args.phase), file=sys.stderr)
            sys.exit(130)
    elif args.command == "predict" and args.csv:
        if args.text is not None or not args.out:
            raise SystemExit("telme: predict --csv takes --out (the predictions file) and no --text")
        csv_path = Path(args.csv)
        if not csv_path.is_file():
            raise SystemExit(f"telme: {csv_path} not found")
        predict_csv(Path(args.run), csv_path, Path(args.clips or csv_path.parent),
                    Path(args.out), args.device, args.cache_dir or "", args.missing_as_zeros)
    elif args.command == "predict":
        if args.text is None:
            raise SystemExit("telme: predict needs --text (one utterance) or --csv (many)")
        result = Predictor(args.run, args.device, args.missing_as_zeros).predict(
            args.text, read_history(Path(args.history)) if args.history else [], args.speaker, args.video, args.audio)
        if not args.all_phases:
            result["phases"] = {result["model"]: result["phases"][result["model"]]}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_prediction(result, args.all_phases)
    elif args.command == "eval":
        results = evaluate(Path(args.run), args.split, args.quiet, out=Path(args.out) if args.out else None,
                           **{k: v for k in ("data_dir", "cache_dir", "device") if (v := getattr(args, k)) is not None})
        if is_main_process():
            print_summary(results)
    elif args.command == "stats":
        splits, classes = load_splits(make_config(args.dataset, data_dir=args.data_dir)), EMOTIONS[args.dataset]
        print(json.dumps({split: {"dialogues": len(dialogues(utts)), "utterances": len(utts),
                                  "classes": {c: sum(u.label == i for u in utts) for i, c in enumerate(classes)}}
                          for split, utts in splits.items()}, indent=2))
    elif args.command == "synth":
        synth(Path(args.out), args.dataset, args.dialogues, args.seed)
    elif args.command == "demo":
        demo(Path(args.out), args.dataset, args.seed, quiet=args.quiet)
    elif args.command == "summarize":
        summarize([Path(r) for r in args.runs], Path(args.out))
    elif args.command == "import-official":
        # The official weights were trained with D1-D16, so their inference needs them too.
        args.compat = getattr(args, "compat", "official")
        args.out = getattr(args, "out", f"runs/{getattr(args, 'dataset', 'meld')}-official")
        run = import_official(config_from_args(args), Path(args.dir), args.fusion_file)
        log(f"telme: imported {args.dir} into {run}; evaluate it with: python telme.py eval --run {run}")
    elif args.command == "bench":
        with tempfile.TemporaryDirectory(prefix="telme-bench-") as scratch:
            bench(config_from_args(args), Path(args.out or scratch), args.clips, args.steps, args.parts, args.phases)
    finish_distributed()


if __name__ == "__main__":
    main()
