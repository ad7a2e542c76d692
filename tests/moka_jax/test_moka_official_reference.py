"""Spec invariant 11: the vectorised adapter term equals a NumPy port of the official per-sample loops.

The two official code paths (GeWu-Lab/MokA, PyTorch) are re-expressed here in NumPy, sample by sample and with the
official masks, in float64:

- AVT (`AudioVisualText/peft_hyper/tuners/lora.py`): three masked copies of x (text / video / audio) each go through
  their own A (`lora_A0/1/2`) and are scaled by alpha/r straight away; per sample, the video and the audio codes
  attend over the text codes of the question span (first..last question position, values = keys), the result is
  added with weight `blc_weight` (1.0) on that modality's positions; the three code streams are summed and go
  through the one B (`lora_B0`) with no further scale. Scores divide by sqrt(r) (code since 2025-12-28) or by
  sqrt(N_t), the number of question tokens of the sample (the code before that).
- VT (`VisualText/modified_peft/tuners/lora/layer.py`): text and image tokens go through `lora_A.text` /
  `lora_A.image`; per sample with image tokens and question tokens, the image codes (unscaled) attend over the
  question codes with 1/sqrt(r) and add `attn_weight` (0.05) times the result; every adapted token then goes through
  `lora_B.text` times alpha/r. A sample without question tokens gets no attention.

Padding (all masks zero) gets nothing in both. Decode steps use the text path only in both.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.models.llava import AUDIO, IMAGE, PAD, TEXT
from moka_jax.adapter import adapter_delta, text_path_delta
from moka_jax.config import MokAConfig
from moka_jax.context import make_context

RANK, ALPHA, D_IN, D_OUT = 4, 16.0, 24, 20
TOL = 1e-5


# ------------------------------------------------------------------------------------------ NumPy official semantics
def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def avt_official_delta(x, a_text, a_video, a_audio, b, text_mask, video_mask, audio_mask, question_mask, *,
                       lora_alpha=ALPHA, blc_weight=1.0, scale="sqrt_rank"):
    """The AVT adapter term (what the official layer adds to F.linear(x, W)), torch weight layout.

    x [B, T, in]; a_* [r, in] (torch Linear weights of lora_A0 / lora_A1 / lora_A2); b [out, r] (lora_B0);
    masks [B, T] of 0/1 (question ⊂ text). scale: "sqrt_rank" (final code) or "sqrt_num_keys" (N_t, older code).
    Every row must hold at least one question token (the official code indexes the first and last one)."""
    x = np.asarray(x, np.float64)
    r = a_text.shape[0]
    s = lora_alpha / r
    masks = [np.asarray(m, np.float64)[..., None] for m in (text_mask, video_mask, audio_mask, question_mask)]
    text_m, video_m, audio_m, question_m = masks
    # Each modality's A sees x with the other modalities' positions zeroed; alpha/r right after A.
    codes = [((x * m) @ np.asarray(a, np.float64).T) * s for m, a in ((text_m, a_text), (video_m, a_video),
                                                                      (audio_m, a_audio))]
    question_codes = codes[0] * question_m
    updated = []
    for stream, modality_m in ((codes[1], video_m), (codes[2], audio_m)):
        new = np.zeros_like(stream)
        for i in range(x.shape[0]):
            where = np.flatnonzero(question_m[i, :, 0] == 1)
            keys = question_codes[i, where[0]: where[-1] + 1]  # the contiguous question span; values = keys
            divisor = math.sqrt(r) if scale == "sqrt_rank" else math.sqrt(question_m[i].sum())
            att = _softmax(stream[i] @ keys.T / divisor) @ keys
            new[i] = stream[i] + modality_m[i] * att * blc_weight
        updated.append(new)
    return (codes[0] + updated[0] + updated[1]) @ np.asarray(b, np.float64).T


def vt_official_delta(x, a_text, a_image, b_text, text_mask, image_mask, question_mask, *,
                      lora_alpha=ALPHA, attn_weight=0.05):
    """The VT adapter term, torch weight layout: a_* [r, in] (lora_A.text / lora_A.image), b_text [out, r]
    (lora_B.text; lora_B.image is never used). Masks [B, T] booleans; a row without question tokens gets no
    attention."""
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    r = a_text.shape[0]
    text_m, image_m, question_m = (np.asarray(m).astype(bool) for m in (text_mask, image_mask, question_mask))
    codes = np.zeros((batch, length, r))
    codes[text_m] = x[text_m] @ np.asarray(a_text, np.float64).T
    codes[image_m] = x[image_m] @ np.asarray(a_image, np.float64).T
    for i in range(batch):
        image_idx = np.flatnonzero(image_m[i])
        question_idx = np.flatnonzero(question_m[i])
        if len(image_idx) == 0 or len(question_idx) == 0:
            continue
        query, keys = codes[i, image_idx], codes[i, question_idx]
        att = _softmax(query @ keys.T / math.sqrt(r)) @ keys
        codes[i, image_idx] = query + attn_weight * att
    out = np.zeros((batch, length, b_text.shape[0]))
    adapted = text_m | image_m
    out[adapted] = (codes[adapted] @ np.asarray(b_text, np.float64).T) * (lora_alpha / r)
    return out


def official_decode_delta(x, a_text, b_text, lora_alpha=ALPHA):
    """Both code paths on a decode step (one new token, masks dropped): alpha/r * B_text A_text x."""
    return (np.asarray(x, np.float64) @ np.asarray(a_text, np.float64).T) @ np.asarray(b_text, np.float64).T * (
        lora_alpha / a_text.shape[0])


# ------------------------------------------------------------------------------------------------- random batches
def avt_layout():
    """Rows of prompt-order segments, left-padded as the AVT collator does: (modality ids, question mask)."""
    rows = [
        # system text, video, audio, question span, answer text
        [(TEXT, 3, False), (IMAGE, 6, False), (AUDIO, 5, False), (TEXT, 2, False), (TEXT, 4, True), (TEXT, 3, False)],
        # audio before video, one question token, no answer
        [(TEXT, 2, False), (AUDIO, 4, False), (IMAGE, 3, False), (TEXT, 1, True)],
        # video only, long question, then answer
        [(TEXT, 1, False), (IMAGE, 8, False), (TEXT, 7, True), (TEXT, 2, False)],
        # audio only; the question comes first (keys after and before the queries are both fine)
        [(TEXT, 6, True), (AUDIO, 9, False), (TEXT, 3, False)],
        # text only (e.g. an instruction without media)
        [(TEXT, 5, False), (TEXT, 3, True), (TEXT, 4, False)],
    ]
    return _assemble(rows, left=True)


def vt_layout():
    """Rows (modality ids, question mask) right-padded as the VT collator does; keys = non-answer text after the last
    image token."""
    rows = [
        [(TEXT, 3, False), (IMAGE, 8, False), (TEXT, 5, True), (TEXT, 4, False)],
        [(TEXT, 2, False), (IMAGE, 4, False), (TEXT, 2, True)],
        # image at the end of the prompt and only answer tokens after it: no key at all
        [(TEXT, 4, False), (IMAGE, 6, False), (TEXT, 3, False)],
        # text only
        [(TEXT, 6, False), (TEXT, 3, False)],
        [(IMAGE, 5, False), (TEXT, 9, True), (TEXT, 1, False)],
    ]
    return _assemble(rows, left=False)


def _assemble(rows, left: bool):
    lengths = [sum(n for _, n, _ in row) for row in rows]
    width = max(lengths) + 3  # every row has some padding
    ids = np.full((len(rows), width), PAD, np.int32)
    question = np.zeros((len(rows), width), bool)
    for b, row in enumerate(rows):
        t = width - lengths[b] if left else 0
        for modality, n, is_question in row:
            ids[b, t: t + n] = modality
            question[b, t: t + n] = is_question
            t += n
    return ids, question


def _weights(rng, n_a):
    # Nonzero A and B at a scale where the softmax is neither flat nor one-hot.
    a = [rng.normal(0.0, 1.0 / math.sqrt(D_IN), (RANK, D_IN)) for _ in range(n_a)]
    b = rng.normal(0.0, 0.05, (D_OUT, RANK))
    return a, b


def _ours(x, a_torch, b_torch, ids, question, config):
    """Our adapter term with the official weights: A (r, in) -> (in, r) stacked by modality slot, B (out, r) ->
    (r, out); dropout off (no dropout key)."""
    context = make_context(config, ids, question)
    a = jnp.asarray(np.stack([w.T for w in a_torch]), jnp.float32)
    b = jnp.asarray(b_torch.T[None], jnp.float32)
    return np.asarray(adapter_delta(jnp.asarray(x, jnp.float32), a, b, context, config))


# ------------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("scale", ["sqrt_rank", "sqrt_num_keys"])
@pytest.mark.parametrize("blc_weight", [1.0, 0.7])
def test_avt_matches_official_loop(scale, blc_weight):
    rng = np.random.default_rng(11)
    ids, question = avt_layout()
    x = rng.normal(size=(*ids.shape, D_IN))
    (a_text, a_video, a_audio), b = _weights(rng, 3)
    want = avt_official_delta(x, a_text, a_video, a_audio, b, ids == TEXT, ids == IMAGE, ids == AUDIO, question,
                              blc_weight=blc_weight, scale=scale)
    config = MokAConfig(rank=RANK, alpha=ALPHA, dropout=0.05, modalities=("text", "image", "audio"),
                        cross_attn_weight=blc_weight, attn_scale=scale, scale_before_attention=True)
    got = _ours(x, [a_text, a_video, a_audio], b, ids, question, config)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # The test has teeth: the attention term is far above the tolerance, and padding gets exactly nothing.
    no_ca = avt_official_delta(x, a_text, a_video, a_audio, b, ids == TEXT, ids == IMAGE, ids == AUDIO, question,
                               blc_weight=0.0, scale=scale)
    assert np.abs(want - no_ca).max() > 100 * TOL
    assert np.all(got[ids == PAD] == 0.0)


def test_avt_modality_order_is_by_name():
    """Our modality order need not be the official A0/A1/A2 order: slots follow the names."""
    rng = np.random.default_rng(12)
    ids, question = avt_layout()
    x = rng.normal(size=(*ids.shape, D_IN))
    (a_text, a_video, a_audio), b = _weights(rng, 3)
    want = avt_official_delta(x, a_text, a_video, a_audio, b, ids == TEXT, ids == IMAGE, ids == AUDIO, question)
    config = MokAConfig(rank=RANK, alpha=ALPHA, modalities=("audio", "text", "image"), scale_before_attention=True)
    got = _ours(x, [a_audio, a_text, a_video], b, ids, question, config)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("attn_weight", [0.05, 1.0])
def test_vt_matches_official_loop(attn_weight):
    rng = np.random.default_rng(13)
    ids, question = vt_layout()
    x = rng.normal(size=(*ids.shape, D_IN))
    (a_text, a_image), b = _weights(rng, 2)
    want = vt_official_delta(x, a_text, a_image, b, ids == TEXT, ids == IMAGE, question, attn_weight=attn_weight)
    config = MokAConfig(rank=RANK, alpha=ALPHA, modalities=("text", "image"), cross_attn_weight=attn_weight,
                        scale_before_attention=False)
    got = _ours(x, [a_text, a_image], b, ids, question, config)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    assert np.all(np.isfinite(got))
    assert np.all(got[ids == PAD] == 0.0)
    # Row 2 has no keys: its image tokens get the plain per-modality term (no attention, no NaN).
    plain = vt_official_delta(x, a_text, a_image, b, ids == TEXT, ids == IMAGE, np.zeros_like(question))
    np.testing.assert_allclose(got[2], plain[2], rtol=0, atol=TOL)
    assert np.abs(want[0] - plain[0]).max() > 10 * TOL


def test_scale_placement_matters():
    """The two official paths really differ (AVT's s before the attention sharpens the softmax by s^2): evaluating
    one layout under the other's semantics does not match, so each parity test above pins its own flag."""
    rng = np.random.default_rng(14)
    ids, question = vt_layout()
    x = rng.normal(size=(*ids.shape, D_IN))
    (a_text, a_image), b = _weights(rng, 2)
    want = vt_official_delta(x, a_text, a_image, b, ids == TEXT, ids == IMAGE, question, attn_weight=1.0)
    config = MokAConfig(rank=RANK, alpha=ALPHA, modalities=("text", "image"), cross_attn_weight=1.0,
                        scale_before_attention=True)
    got = _ours(x, [a_text, a_image], b, ids, question, config)
    assert np.abs(got - want).max() > 100 * TOL


def test_decode_step_is_text_path():
    rng = np.random.default_rng(15)
    x = rng.normal(size=(3, 1, D_IN))
    (a_text, a_image, a_audio), b = _weights(rng, 3)
    want = official_decode_delta(x, a_text, b)
    for modalities in (("text", "image", "audio"), ("image", "audio", "text")):
        config = MokAConfig(rank=RANK, alpha=ALPHA, modalities=modalities)
        by_name = dict(zip(("text", "image", "audio"), (a_text, a_image, a_audio), strict=True))
        a = jnp.asarray(np.stack([by_name[m].T for m in modalities]), jnp.float32)
        b_ours = jnp.asarray(b.T[None], jnp.float32)
        got = np.asarray(text_path_delta(jnp.asarray(x, jnp.float32), a, b_ours, config))
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
        got = np.asarray(adapter_delta(jnp.asarray(x, jnp.float32), a, b_ours, None, config))
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
