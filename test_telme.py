"""Tests for telme.py: CPU only, offline, a few minutes. Run with `bash run.sh test` or `pytest`."""
import csv
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import telme


# --------------------------------------------------------------------------------------------------
# Distillation losses, against an independent derivation
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


# --------------------------------------------------------------------------------------------------
# Shifting fusion
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
    assert torch.all(lam <= 1)


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
# Teacher input
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


def bert_style_tokenizer():
    return telme.word_level_tokenizer([r[4] for r in FIXTURE_ROWS])


def roberta_style_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r[4] for r in FIXTURE_ROWS] + ["Now feels"], vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizer(tokenizer_object=bpe._tokenizer)


@pytest.fixture
def meld_fixture(tmp_path):
    for split, (csv_name, _) in telme.MELD_SPLITS.items():
        write_meld_csv(tmp_path / csv_name, FIXTURE_ROWS)
    return tmp_path


def test_speaker_indices_by_first_appearance_capped_at_nine():
    assert telme.speaker_indices(["b", "a", "b", "c", "a"]) == [0, 1, 0, 2, 1]
    assert telme.speaker_indices([str(i) for i in range(12)])[-3:] == [8, 8, 8]


@pytest.mark.parametrize("make_tokenizer", [bert_style_tokenizer, roberta_style_tokenizer])
def test_teacher_input_prompt_truncation_and_left_padding(meld_fixture, make_tokenizer):
    utterances = telme.read_meld_split(meld_fixture, "train")
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


# --------------------------------------------------------------------------------------------------
# Media decoding
# --------------------------------------------------------------------------------------------------
def write_wav(path: Path, samples: np.ndarray, rate: int):
    """samples: (channels, n) float in [-1, 1]."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples.shape[0])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples.T * 32767).astype("<i2").tobytes())


def test_audio_resampled_to_16k_mono_with_the_right_length_and_pitch(tmp_path):
    rate, seconds = 22050, 1.5
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    write_wav(tmp_path / "tone.wav", np.stack([tone, -tone * 0 + tone]), rate)
    waveform = telme.decode_audio(str(tmp_path / "tone.wav"), 16000, 400000)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert len(waveform) == 24000
    spectrum = np.abs(np.fft.rfft(waveform))
    assert abs(np.argmax(spectrum) * 16000 / len(waveform) - 1000) < 2
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


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = telme.demo(out, "meld", seed=42, quiet=True)
    return out, results


def test_demo_metrics_contract_and_fusion_beats_teacher(demo_run):
    out, results = demo_run
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert list(metrics) == ["teacher", "audio", "visual", "fusion"]
    for phase, m in metrics.items():
        assert {"dev_wf1", "test_wf1", "best_epoch", "per_class", "confusion"} <= set(m)
        assert set(m["per_class"]["test"]) == set(telme.EMOTIONS["meld"])
        assert {"precision", "recall", "f1", "support"} == set(m["per_class"]["test"]["joy"])
        matrix = np.array(m["confusion"]["test"])
        assert matrix.shape == (7, 7) and matrix.sum() == sum(
            r["support"] for r in m["per_class"]["test"].values())
        assert m["best_epoch"] >= 1
    assert metrics["fusion"]["test_wf1"] >= metrics["teacher"]["test_wf1"] + 5
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["config"]["tau"] == 4.0 and "torch" in config["versions"]
    for phase in telme.PHASES:
        assert (out / "run" / f"{phase}.safetensors").is_file()


def test_eval_recomputes_the_training_metrics(demo_run):
    out, results = demo_run
    for phase, m in results.items():
        log = (out / "run" / "train.log").read_text().splitlines()
        line = [l for l in log if l.startswith(f"[{phase:7s}] epoch {m['best_epoch']:2d}/")][0]
        assert f"dev_wf1 {m['dev_wf1']:6.2f}" in line


def test_config_presets_and_overrides():
    cfg = telme.make_config("iemocap", epochs=(3,), lr=(2e-5,))
    assert cfg.epochs == (3, 3, 3) and cfg.lr == (2e-5,) * 3
    assert (cfg.tau, cfg.alpha, cfg.theta, cfg.heads) == (2.0, 0.1, 0.2, 4)
    meld = telme.make_config("meld")
    assert meld.epochs == (10, 10, 10) and meld.lr == (1e-6, 1e-5, 1e-5) and meld.batch_size == 4
    args = ["train", "--dataset", "iemocap", "--epochs", "10,10,8", "--tau", "3"]
    parsed = telme.config_from_args(telme.build_parser().parse_args(args))
    assert parsed.epochs == (10, 10, 8) and parsed.tau == 3.0 and parsed.alpha == 0.1
