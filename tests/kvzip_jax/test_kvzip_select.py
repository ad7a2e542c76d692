"""KVzip selection (kvzip_jax/kvzip/select.py): spec §7.1 invariants 5, 10, 11, 12 and pitfalls P1, P4, P5."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.kvzip import select as S

RATIOS = [0.05, 0.1, 0.2, 0.3, 0.37, 0.5, 0.75, 0.9, 1.0]


def rand_scores(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)  # continuous: no ties


def at(mask, bv):
    """mask [L, B, H, n_c] at the (b, j) pairs selected by bv [B, n_c] → [L, H, k]."""
    return mask.transpose(0, 2, 1, 3)[:, :, bv]


def official_pair(scores_1d: np.ndarray, r: float) -> np.ndarray:
    """Literal transcription of KVScore._threshold (sort, index max(int(N r)-1, 0), strict >)."""
    if r >= 1:
        return np.ones_like(scores_1d, bool)
    srt = np.sort(scores_1d)[::-1]
    n = max(int(len(srt) * r) - 1, 0)
    return scores_1d > srt[n]


def test_pair_matches_official_transcription_and_off_by_one():
    s = rand_scores((4, 1, 3, 97))
    N = s.size
    for r in RATIOS:
        res = S.keep_mask(s, r)
        np.testing.assert_array_equal(res.mask[:, 0], official_pair(s[:, 0].reshape(-1), r).reshape(4, 3, 97))
        if r < 1:  # P4: int(N r) - 1 pairs kept, not int(N r)
            assert res.mask.sum() == int(N * r) - 1
            assert res.kept_ratio[0] == pytest.approx((int(N * r) - 1) / N)
        else:
            assert res.mask.all() and res.kept_ratio[0] == 1.0 and np.isnan(res.threshold[0])


def test_float64_product_like_official():
    # 100 * 0.29 == 28.999999999999996 in float64: the official int(N*r) gives 28, so 27 pairs are kept.
    s = rand_scores((1, 1, 1, 100))
    assert S.keep_mask(s, 0.29).mask.sum() == 27


@pytest.mark.parametrize("level", S.LEVELS)
def test_nested_and_at_most_r(level):
    """Invariant 5: kept(r1) ⊆ kept(r2) for r1 < r2; the real kept fraction is <= r."""
    s = rand_scores((3, 2, 4, 64), seed=1)
    s[0, 0, 0, :10] = 0.5  # some ties too
    prev = None
    for r in RATIOS:
        res = S.keep_mask(s, r, level)
        assert (res.kept_ratio <= r + 1e-12).all()
        if prev is not None:
            assert not (prev & ~res.mask).any()
        prev = res.mask


def test_head_level_whole_rows():
    """Invariant 11: a union of whole (layer, head) rows; kept fraction a multiple of 1/(L·H)."""
    L, H, n_c = 4, 4, 50
    s = rand_scores((L, 1, H, n_c), seed=2)
    hs = rand_scores((L, H), seed=3)
    for r in RATIOS:
        res = S.keep_mask(s, r, "head", head_scores=hs)
        m = res.mask[:, 0]
        assert (m.all(axis=-1) | ~m.any(axis=-1)).all()
        k = res.kept_ratio[0] * L * H
        assert k == pytest.approx(round(k))
        # identical to the official rule on the broadcast [L, H, n_c] head scores
        bc = np.broadcast_to(hs[:, :, None], (L, H, n_c)).reshape(-1)
        np.testing.assert_array_equal(m.reshape(-1), official_pair(bc, r))


def test_head_level_is_not_rule_on_heads_alone():
    # L·H = 10 heads, n_c = 100, r = 0.35: broadcast index 349 → 3 heads kept; the rule on 10 heads would keep 2.
    hs = np.linspace(0.9, 0.1, 10, dtype=np.float32).reshape(2, 5)
    res = S.keep_mask(np.zeros((2, 1, 5, 100), np.float32), 0.35, "head", head_scores=hs)
    assert res.mask[:, 0, :, 0].sum() == 3


def test_p1_saturation_evicts_everything_at_head_level():
    """P1: when the fraction of heads at exactly 1.0 exceeds r, τ = 1.0 and every head is evicted."""
    L, H = 7, 4
    hs = np.full((L, H), 0.5, np.float32)
    hs.reshape(-1)[:8] = 1.0  # 8/28 = 28.6% saturated, like Qwen2.5-7B
    hs.reshape(-1)[8:12] = [0.9, 0.8, 0.7, 0.6]
    res = S.keep_mask(np.zeros((L, 1, H, 30), np.float32), 0.25, "head", head_scores=hs)
    assert res.threshold[0] == 1.0 and not res.mask.any() and res.kept_ratio[0] == 0.0
    res = S.keep_mask(np.zeros((L, 1, H, 30), np.float32), 0.4, "head", head_scores=hs)
    # broadcast index int(840*0.4)-1 = 335 → head rank 11 (0.6): the 11 heads above it are kept
    assert res.kept_ratio[0] == pytest.approx(11 / 28) and res.threshold[0] == np.float32(0.6)


def test_ties_at_threshold_all_evicted():
    s = np.full((2, 1, 2, 25), 0.25, np.float32)
    s[0, 0, 0, :5] = 0.9
    res = S.keep_mask(s, 0.5)  # τ = 0.25 (tied mass): only the 5 values above it survive
    assert res.mask.sum() == 5 and res.threshold[0] == np.float32(0.25)
    assert res.kept_ratio[0] == pytest.approx(5 / 100)


@pytest.mark.parametrize("level", ["pair", "pair-uniform"])
def test_budget_accounting(level):
    """Invariant 12: the kept fraction equals the target within 1e-2 (continuous scores, no ties)."""
    s = rand_scores((4, 2, 4, 300), seed=4)
    for r in [0.1, 0.25, 0.3, 0.5, 0.8]:
        res = S.keep_mask(s, r, level)
        np.testing.assert_allclose(res.kept_ratio, r, atol=1e-2)
        assert (res.mask.mean(axis=(0, 2, 3)) == res.kept_ratio).all()


def test_pair_uniform_per_head_budget_and_stable_ties():
    s = rand_scores((2, 1, 3, 40), seed=5)
    s[1, 0, 2] = 0.5  # a fully tied head: lower positions first
    res = S.keep_mask(s, 0.3, "pair-uniform")
    assert (res.mask.sum(axis=-1) == 12).all()
    np.testing.assert_array_equal(res.mask[1, 0, 2], np.arange(40) < 12)
    top = np.argsort(-s[0, 0, 0])[:12]
    assert set(np.flatnonzero(res.mask[0, 0, 0])) == set(top)


def test_p5_pair_is_global_across_layers():
    """P5: one budget over all layers: a layer with uniformly low scores can lose every pair."""
    s = rand_scores((3, 1, 4, 50), seed=6) * 0.5 + 0.5
    s[1] *= 0.1  # layer 1: every score below every other layer's
    res = S.keep_mask(s, 0.5)
    assert not res.mask[1].any() and res.mask[[0, 2]].any()
    assert S.keep_mask(s, 0.5, "pair-uniform").mask[1].sum() == 4 * 25  # uniform keeps it


def test_ragged_valid_rows():
    """Rows have their own budgets; invalid positions are never counted and are False in the mask."""
    L, B, H, n_c = 3, 3, 2, 40
    s = rand_scores((L, B, H, n_c), seed=7)
    lengths = [40, 25, 7]
    valid = np.arange(n_c)[None, :] < np.array(lengths)[:, None]
    for level in S.LEVELS:
        res = S.keep_mask(s, 0.4, level, valid=valid)
        assert not at(res.mask, ~valid).any()
        for b, n in enumerate(lengths):
            alone = S.keep_mask(s[:, b : b + 1, :, :n], 0.4, level)  # same as the row scored on its own
            np.testing.assert_array_equal(res.mask[:, b, :, :n], alone.mask[:, 0])
            assert res.kept_ratio[b] == alone.kept_ratio[0]
            assert res.kept_ratio[b] == pytest.approx(res.mask[:, b].sum() / (L * H * n))
    assert S.keep_mask(s, 1.0, valid=valid).mask.sum() == L * H * sum(lengths)


def test_layers_mask_excluded_layers_kept_and_not_counted():
    L, B, H, n_c = 6, 2, 2, 30
    s = rand_scores((L, B, H, n_c), seed=8)
    layers = np.array([False, False, False, False, False, True])  # Gemma3-like: one global layer in six
    valid = np.ones((B, n_c), bool)
    valid[1, 20:] = False
    for level in S.LEVELS:
        res = S.keep_mask(s, 0.3, level, layers=layers, valid=valid)
        assert at(res.mask[:5], valid).all() and not at(res.mask, ~valid).any()
        only = S.keep_mask(s[5:], 0.3, level, valid=valid)
        np.testing.assert_array_equal(res.mask[5:], only.mask)
        np.testing.assert_array_equal(res.kept_ratio, only.kept_ratio)
    hs = rand_scores((L, H), seed=9)
    np.testing.assert_array_equal(
        S.keep_mask(s, 0.3, "head", layers=layers, head_scores=hs).mask[5:],
        S.keep_mask(s[5:], 0.3, "head", head_scores=hs[5:]).mask,
    )


def test_jax_jit_pair_equals_numpy_and_determinism():
    s = rand_scores((3, 2, 4, 33), seed=10)
    s[0, 1, 1, :6] = 0.75  # ties
    valid = np.ones((2, 33), bool)
    valid[0, 30:] = False
    layers = np.array([True, False, True])
    for r in [0.1, 0.3, 1.0]:
        ref = S.keep_mask(s, r, valid=valid, layers=layers)
        fn = jax.jit(lambda x, r=r: S.keep_mask_pair(x, r, valid=valid, layers=layers))
        m, t = fn(jnp.asarray(s))
        np.testing.assert_array_equal(np.asarray(m), ref.mask)
        np.testing.assert_array_equal(np.asarray(t), ref.threshold)
        m2, _ = S.keep_mask_pair(jnp.asarray(s, jnp.bfloat16), r, valid=valid, layers=layers)
        assert np.asarray(m2).dtype == bool
        again = S.keep_mask(s.copy(), r, valid=valid, layers=layers)
        np.testing.assert_array_equal(again.mask, ref.mask)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda x, v: S.keep_mask_pair(x, 0.3, valid=v))(jnp.asarray(s), jnp.asarray(valid))


def test_bf16_scores_ties_preserved():
    s = jnp.asarray(rand_scores((2, 1, 2, 64), seed=11), jnp.bfloat16)  # bf16 rounding creates ties (P1)
    res = S.keep_mask(s, 0.3)
    ref = official_pair(np.asarray(s, np.float32)[:, 0].reshape(-1), 0.3).reshape(2, 2, 64)
    np.testing.assert_array_equal(res.mask[:, 0], ref)
    assert res.kept_ratio[0] <= 0.3


def test_head_scores_from_and_file_round_trip(tmp_path):
    L, B, H, n_c = 3, 2, 2, 10
    s = rand_scores((L, B, H, n_c), seed=12)
    valid = np.ones((B, n_c), bool)
    valid[1, 5:] = False
    s[:, 1, :, 5:] = 2.0  # beyond row 1's context: must be ignored
    hs = S.head_scores_from(s, valid)
    np.testing.assert_array_equal(hs, np.maximum(s[:, 0].max(-1), s[:, 1, :, :5].max(-1)))
    assert hs.shape == (L, H) and hs.dtype == np.float32
    p1, p2 = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    S.save_head_scores(p1, hs, {"family": "qwen2", "source": "calib sample 0", "model": "tiny"})
    other = rand_scores((L, H), seed=13)
    S.save_head_scores(p2, other, {"family": "qwen2", "source": "calib sample 1"})
    np.testing.assert_array_equal(S.load_head_scores([p1], (L, H)), hs)
    np.testing.assert_array_equal(S.load_head_scores([p1, p2], (L, H)), np.maximum(hs, other))
    _, meta = S.read_head_scores(p1)
    assert meta["num_layers"] == L and meta["num_kv_heads"] == H and meta["family"] == "qwen2"
    assert meta["source"] == "calib sample 0" and meta["model"] == "tiny"
    with np.load(p1, allow_pickle=False) as z:  # the documented format
        assert json.loads(str(z["meta"]))["format"] == S.HEAD_SCORE_FORMAT
    p3 = str(tmp_path / "other_model.npz")
    S.save_head_scores(p3, np.zeros((28, 4), np.float32), {"family": "qwen2"})
    with pytest.raises(ValueError, match=r"\(28, 4\).*\(3, 2\)"):
        S.load_head_scores([p1, p3], (L, H))
    with pytest.raises(ValueError, match="empty"):
        S.load_head_scores([], (L, H))
    with pytest.raises(ValueError, match="num_layers"):
        S.save_head_scores(str(tmp_path / "x.npz"), hs, {"num_layers": 5})


def test_bad_inputs():
    s = rand_scores((2, 1, 2, 10))
    for r in [0.0, -0.1, 1.5, float("nan")]:
        with pytest.raises(ValueError, match=f"got {r}"):
            S.keep_mask(s, r)
    with pytest.raises(ValueError, match="pair, pair-uniform, head"):
        S.keep_mask(s, 0.3, "layer")
    with pytest.raises(ValueError, match="shape"):
        S.keep_mask(s[0], 0.3)
    with pytest.raises(ValueError, match=r"head_scores must have shape \(L, Hkv\) = \(2, 2\)"):
        S.keep_mask(s, 0.3, "head", head_scores=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="valid must have shape"):
        S.keep_mask(s, 0.3, valid=np.ones((1, 9), bool))
    with pytest.raises(ValueError, match="empty context"):
        S.keep_mask(s, 0.3, valid=np.zeros((1, 10), bool))
    with pytest.raises(ValueError, match="none of the 2 layers"):
        S.keep_mask(s, 0.3, layers=np.zeros(2, bool))
    bad = s.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        S.keep_mask(bad, 0.3)


# ------------------------------------------------------------------------------ found by mutation testing
def test_jax_pair_equals_numpy_on_signed_scores():
    """The jax path must push invalid and excluded pairs below every real score, negative ones included (the
    selector takes any float scores): filling them with 0 instead of -inf would rank them above negative scores."""
    s = np.random.default_rng(14).standard_normal((3, 2, 2, 20)).astype(np.float32)
    valid = np.ones((2, 20), bool)
    valid[1, 12:] = False
    layers = np.array([True, False, True])
    for r in [0.3, 0.7, 0.95]:
        ref = S.keep_mask(s, r, valid=valid, layers=layers)
        m, t = S.keep_mask_pair(jnp.asarray(s), r, valid=valid, layers=layers)
        np.testing.assert_array_equal(np.asarray(m), ref.mask, err_msg=f"r={r}")
        np.testing.assert_array_equal(np.asarray(t), ref.threshold)


@pytest.mark.parametrize("level", S.LEVELS)
def test_every_level_returns_a_bool_mask(level):
    s = rand_scores((2, 2, 2, 12), seed=15)
    valid = np.ones((2, 12), bool)
    valid[0, 9:] = False
    for r in [0.3, 1.0]:
        res = S.keep_mask(s, r, level, valid=valid)
        assert res.mask.dtype == np.bool_, f"{level} r={r}: mask dtype {res.mask.dtype}"
        assert not res.mask[:, 0, :, 9:].any()  # invalid positions are never kept


def test_bad_shapes_dtypes_and_head_score_formats(tmp_path):
    s = rand_scores((2, 1, 2, 10))
    with pytest.raises(ValueError, match=r"scores must have shape \[L, B, Hkv, n_c\], got \(2, 1, 2, 10, 1\)"):
        S.keep_mask(s[..., None], 0.3)
    with pytest.raises(TypeError, match="valid must be a bool array, got dtype int64"):
        S.keep_mask(s, 0.3, valid=np.ones((1, 10), np.int64))
    with pytest.raises(TypeError, match="layers must be a bool array, got dtype float32"):
        S.keep_mask(s, 0.3, layers=np.ones(2, np.float32))
    path = str(tmp_path / "foreign.npz")
    for fmt in ("zz.other_tool.scores", "a.other_tool.scores"):  # after and before ours in string order
        np.savez(path, head_scores=np.zeros((2, 2), np.float32),
                 meta=json.dumps({"format": fmt, "num_layers": 2, "num_kv_heads": 2}))
        with pytest.raises(ValueError, match=f"meta format is '{fmt}', expected 'kvzip_jax.head_scores'"):
            S.read_head_scores(path)


def test_a_failed_head_score_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The file is written to a temporary name and renamed: a failure in between leaves neither a partial file
    nor the temporary one behind (found by mutation testing)."""

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(S.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        S.save_head_scores(str(tmp_path / "heads.npz"), np.ones((2, 2), np.float32), {"family": "llama"})
    assert os.listdir(tmp_path) == []
