"""KVzip scoring (spec shared/research/kvzip.md §1.4-1.5, invariants 7.1.1-3 and 10, pitfalls P3, P10, P16).

The reference here is independent of `chunk_scores`: one plain dense forward of [prefix | context | repeat input]
(positions 0..N-1, which are exactly the scoring positions of §1.4) runs the model's own layer modules with a
numpy float64 attention in place of the cache, records every layer's post-RoPE q and k, and then applies the
official `_get_score` formula (§1.5) in numpy: softmax over [system | this chunk | repeat] keys, causal only in
the repeat block, max over the G query heads of the group (query head h*G+g -> kv head h) and all repeat rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kvzip_testutil import GEMMA, LLAMA, PROMPT, contexts, perturbed_params

from kvzip_jax.config import FULL, SLIDING, ModelConfig
from kvzip_jax.kvzip import compressor
from kvzip_jax.kvzip.prompts import repeat_inputs
from kvzip_jax.models import graphdef_for
from kvzip_jax.models.kv_attention import ScoreChunk, chunk_scores
from kvzip_jax.models.layers import rope_tables

CHUNK = 16
CTX_LENS = (45, 30)  # ragged rows: chunks 16+16+13 and 16+14 (last chunk short)
REF_LEN = 80  # >= n_s + n_c + n_in of every reference sequence (at most 4 + 45 + 28 = 77)

LLAMA_G4 = dataclasses.replace(LLAMA, num_heads=8, num_kv_heads=2)
CONFIGS = {"llama": LLAMA, "llama_g4": LLAMA_G4, "gemma3": GEMMA}


def official_scale(config: ModelConfig) -> float:
    """What the config asks for (query_pre_attn_scalar for Gemma3), written out independently of attn_scale."""
    return float(config.query_pre_attn_scalar or config.head_dim) ** -0.5


# ------------------------------------------------------------------------------------------ the naive reference
def manual_forward(params, config: ModelConfig, tokens, positions, past=None):
    """A plain forward of one row through the model's layer modules with a hand-written attention (no cache).

    tokens, positions [T]. `past` (optional): per layer (K [Hkv, S, D], V [Hkv, S, D], key positions [S],
    visible [Hkv, S]) of cached pairs that the new tokens may attend to (a per-head mask: evicted pairs False).
    Trailing padding tokens are harmless (attention is causal by position). Returns numpy float64
    (logits [T, V], per-layer q [T, Hkv, G, D] and k [T, Hkv, D] post-RoPE).
    """
    out = _manual_forward_jit(params, jnp.asarray(np.asarray(tokens, np.int32)),
                              jnp.asarray(np.asarray(positions, np.int32)), past, config=config)
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


@functools.partial(jax.jit, static_argnames=("config",))
def _manual_forward_jit(params, tokens, pos, past, *, config: ModelConfig):
    model = nnx.merge(graphdef_for(config), params)
    graph, stacked = nnx.split(model.layers)
    x = model.embed_tokens(tokens[None])
    qs, ks = [], []
    hi = jax.lax.Precision.HIGHEST
    for layer_id, kind in enumerate(config.layer_types):
        layer = nnx.merge(graph, jax.tree.map(lambda a, i=layer_id: a[i], stacked))
        cos, sin = rope_tables(config, kind, pos[None])
        window = config.sliding_window if kind == SLIDING else None

        def kv_attend(q, k, v, layer_id=layer_id, window=window):
            q, k, v = q[0], k[0], v[0]  # [T, H, G, D], [T, H, D], [T, H, D]
            qs.append(q)
            ks.append(k)
            keys, values = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [H, T, D]
            kpos = pos
            vis = jnp.ones((keys.shape[0], pos.shape[0]), bool)
            if past is not None:
                pk, pv, ppos, pvis = past[layer_id]
                keys = jnp.concatenate([pk, keys], axis=1)
                values = jnp.concatenate([pv, values], axis=1)
                kpos = jnp.concatenate([ppos, pos])
                vis = jnp.concatenate([pvis, vis], axis=1)
            allowed = (kpos[None, :] <= pos[:, None])[None] & vis[:, None, :]  # [H, Tq, S]
            if window is not None:
                allowed &= (pos[:, None] - kpos[None, :] < window)[None]
            z = jnp.einsum("thgd,hsd->hgts", q, keys, precision=hi) * official_scale(config)
            if config.attn_logit_softcap is not None:
                z = jnp.tanh(z / config.attn_logit_softcap) * config.attn_logit_softcap
            z = jnp.where(allowed[:, None], z, -jnp.inf)
            p = jnp.exp(z - z.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            return jnp.einsum("hgts,hsd->thgd", p, values, precision=hi)[None]

        x = layer(x, cos, sin, kv_attend)
    return model.logits(x)[0], qs, ks


def reference_chunk_score(q, k, n_sys, start, length, n_in, scale, softcap=None):
    """Official `_get_score` for one layer on a dense forward of [sys | context | repeat] (all post-RoPE).

    q [N, H, G, D], k [N, H, D]; the repeat input is the last n_in rows; the chunk is context[start:start+length].
    Returns [H, length]."""
    n = q.shape[0]
    rep = np.arange(n - n_in, n)
    cols = np.concatenate([np.arange(n_sys), n_sys + start + np.arange(length), rep])
    kbar = k[cols]  # [n_sys + m + n_in, H, D]
    z = np.einsum("ihgd,jhd->hgij", q[rep], kbar) * scale
    if softcap is not None:
        z = np.tanh(z / softcap) * softcap
    causal = np.ones((n_in, len(cols)), bool)
    causal[:, n_sys + length :] = np.tril(np.ones((n_in, n_in), bool))
    z = np.where(causal, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p[..., n_sys : n_sys + length].max(axis=(1, 2))  # [H, length]


def reference_scores(params, config, ctxs, scale, layers=None):
    """[L, B, Hkv, n_c_max] by one dense forward per (row, chunk)."""
    n_sys = PROMPT.n_sys
    out = np.zeros((config.num_layers, len(ctxs), config.num_kv_heads, max(map(len, ctxs))))
    for b, ctx in enumerate(ctxs):
        for chunk in repeat_inputs(PROMPT, ctx, CHUNK):
            seq = list(PROMPT.prefix_ids) + list(ctx) + list(chunk.ids)
            n = len(seq)
            padded = seq + [0] * (REF_LEN - n)  # one compiled shape; the causal padding never reaches seq
            _, qs, ks = manual_forward(params, config, padded, np.arange(REF_LEN))
            for layer in layers if layers is not None else range(config.num_layers):
                out[layer, b, :, chunk.start : chunk.start + chunk.length] = reference_chunk_score(
                    qs[layer][:n], ks[layer][:n], n_sys, chunk.start, chunk.length, len(chunk.ids), scale
                )
    return out


# ------------------------------------------------------------------------------------------------- fixtures
_SCORED: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def scored():
    """factory(name) -> (params, contexts, ScoredContext); each model is scored once per module."""

    def get(name):
        if name not in _SCORED:
            config = CONFIGS[name]
            params = perturbed_params(config)
            ctxs = contexts()
            _SCORED[name] = (params, ctxs, compressor.score(params, config, PROMPT, ctxs, chunk_size=CHUNK,
                                                            progress=False))
        return _SCORED[name]

    return get


# --------------------------------------------------------------------------------------- end-to-end scoring
@pytest.mark.parametrize("name", ["llama", "llama_g4", "gemma3"])
def test_scores_equal_naive_dense_reference(name, scored):
    params, ctxs, sc = scored(name)
    config = CONFIGS[name]
    assert config.num_groups > 1
    s = sc.scores
    L, H = config.num_layers, config.num_kv_heads
    assert s.shape == (L, 2, H, max(CTX_LENS))
    assert s.dtype == np.float32
    assert sc.n_ctx == CTX_LENS and sc.n_sys == PROMPT.n_sys
    full_layers = [i for i, t in enumerate(config.layer_types) if t == FULL]
    ref = reference_scores(params, config, ctxs, official_scale(config), layers=full_layers)
    np.testing.assert_allclose(s[full_layers], ref[full_layers], atol=2e-6, rtol=1e-5)
    for b, n in enumerate(CTX_LENS):
        assert (s[:, b, :, n:] == 0).all(), "scores past a row's context must be zero"
        # P10 / every position scored: a softmax probability is > 0, so a position never written would be 0.
        assert (s[full_layers][:, b, :, :n] > 0).all()
    assert ((s >= 0) & (s <= 1)).all()
    # Not a degenerate score (e.g. all equal): the ranking carries information.
    assert np.unique(s[full_layers][:, 0, :, : CTX_LENS[0]]).size > 0.9 * len(full_layers) * H * CTX_LENS[0]


def test_p3_gemma_scale_is_query_pre_attn_scalar(scored):
    """Scores use 1/sqrt(query_pre_attn_scalar)=1/sqrt(24), not the hard-coded 1/sqrt(head_dim)=1/sqrt(16)."""
    params, ctxs, sc = scored("gemma3")
    assert GEMMA.query_pre_attn_scalar != GEMMA.head_dim
    layer = GEMMA.layer_types.index(FULL)
    wrong = reference_scores(params, GEMMA, ctxs[:1], GEMMA.head_dim**-0.5, layers=[layer])[layer, 0]
    right = reference_scores(params, GEMMA, ctxs[:1], 24**-0.5, layers=[layer])[layer, 0]
    ours = sc.scores[layer, 0, :, : CTX_LENS[0]]
    np.testing.assert_allclose(ours, right[:, : CTX_LENS[0]], atol=2e-6, rtol=1e-5)
    assert np.abs(ours - wrong[:, : CTX_LENS[0]]).max() > 1e-3


def test_determinism_scoring_twice_is_identical(scored):
    params, ctxs, sc = scored("llama")
    again = compressor.score(params, LLAMA, PROMPT, ctxs, chunk_size=CHUNK, progress=False)
    np.testing.assert_array_equal(sc.scores, again.scores)
    np.testing.assert_array_equal(np.asarray(sc.cache.k), np.asarray(again.cache.k))


def test_scoring_leaves_the_cache_rolled_back(scored):
    """After scoring the dense cache holds exactly [prefix | context] per row (repeat inputs forgotten)."""
    _, _ctxs, sc = scored("llama")
    assert np.asarray(sc.cache.length).tolist() == [PROMPT.n_sys + n for n in CTX_LENS]


# ------------------------------------------------------------------------------- chunk_scores in isolation
def _numpy_chunk_scores(q, keys, n_sys, start, length, m, slots, n_valid, scale, softcap):
    """Direct transcription of §1.5 on chunk_scores' inputs: q [B,T,H,G,D], keys [B,H,S,D] -> [B, H, m]."""
    q, keys = np.asarray(q, np.float64), np.asarray(keys, np.float64)
    b_, _t, h_, _g, _d = q.shape
    out = np.zeros((b_, h_, m))
    for b in range(b_):
        nv, st, ln = int(n_valid[b]), int(start[b]), int(length[b])
        cols = np.concatenate([np.arange(n_sys), n_sys + st + np.arange(ln), slots[b, :nv]])
        z = np.einsum("thgd,hsd->hgts", q[b, :nv], keys[b][:, cols]) * scale
        if softcap is not None:
            z = np.tanh(z / softcap) * softcap
        allowed = np.ones((nv, len(cols)), bool)
        allowed[:, n_sys + ln :] = np.tril(np.ones((nv, nv), bool))
        z = np.where(allowed, z, -np.inf)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b, :, :ln] = p[..., n_sys : n_sys + ln].max(axis=(1, 2))
    return out


def _isolated_case(seed=0, g=4):
    rng = np.random.default_rng(seed)
    b, t, h, d, n_sys, m = 2, 7, 2, 16, 3, 8
    n_ctx = np.array([29, 20])
    s_cap = n_sys + int(n_ctx.max()) + t + 2  # 2 stale slots at the end
    q = rng.standard_normal((b, t, h, g, d)).astype(np.float32)
    keys = rng.standard_normal((b, h, s_cap, d)).astype(np.float32)
    slots = (n_sys + n_ctx)[:, None] + np.arange(t)[None, :]
    start, length = np.array([16, 16]), np.array([8, 4])  # row 1: a short last chunk
    n_valid = np.array([7, 5])  # row 1: 2 padding rows
    return q, keys, slots.astype(np.int32), start, length, n_valid, n_sys, m


_chunk_scores = jax.jit(chunk_scores, static_argnames=("config",))


def _run_isolated(q, keys, slots, start, length, n_valid, n_sys, m, config):
    spec = ScoreChunk(chunk_start=jnp.asarray(start, jnp.int32), chunk_len=jnp.asarray(length, jnp.int32),
                      n_sys=n_sys, chunk_size=m)
    repeat = np.take_along_axis(keys, slots[:, None, :, None], axis=2)  # the repeat input's own keys
    return np.asarray(_chunk_scores(jnp.asarray(q), jnp.asarray(keys)[None], jnp.int32(0), jnp.asarray(repeat), spec,
                                   jnp.asarray(n_valid, jnp.int32), config=config))


@pytest.mark.parametrize("config", [LLAMA_G4, dataclasses.replace(LLAMA_G4, attn_logit_softcap=1.5),
                                    dataclasses.replace(LLAMA_G4, query_pre_attn_scalar=40)],
                         ids=["plain", "softcap", "qpas"])
def test_chunk_scores_matches_transcription(config):
    case = _isolated_case(g=config.num_groups)
    q, keys, slots, start, length, n_valid, n_sys, m = case
    ours = _run_isolated(*case, config)
    ref = _numpy_chunk_scores(q, keys, n_sys, start, length, m, slots, n_valid, official_scale(config),
                              config.attn_logit_softcap)
    assert ours.shape == (2, 2, m)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-5)
    assert (ours[1, :, length[1] :] == 0).all() and (ours[:, :, :4] > 0).all()


def test_p3_softcap_and_scale_are_used():
    case = _isolated_case(g=4)
    plain = _run_isolated(*case, LLAMA_G4)
    capped = _run_isolated(*case, dataclasses.replace(LLAMA_G4, attn_logit_softcap=1.5))
    scaled = _run_isolated(*case, dataclasses.replace(LLAMA_G4, query_pre_attn_scalar=40))
    assert np.abs(plain - capped).max() > 1e-3, "attn_logit_softcap ignored by the score"
    assert np.abs(plain - scaled).max() > 1e-3, "query_pre_attn_scalar ignored by the score"


def test_chunk_locality_invariant_3():
    """Perturbing keys of other chunks (and stale slots past the repeat input) leaves the chunk's scores
    bit-identical; perturbing keys inside the chunk, the system prefix or the repeat block changes them."""
    q, keys, slots, start, length, n_valid, n_sys, _m = case = _isolated_case(seed=1)
    base = _run_isolated(*case, LLAMA_G4)
    rng = np.random.default_rng(5)
    outside = np.ones(keys.shape[2], bool)
    outside[:n_sys] = False
    for b in range(2):
        other = outside.copy()
        other[n_sys + start[b] : n_sys + start[b] + length[b]] = False
        other[slots[b, : n_valid[b]]] = False
        k2 = keys.copy()
        k2[b][:, other] += 5 * rng.standard_normal(k2[b][:, other].shape).astype(np.float32)
        np.testing.assert_array_equal(_run_isolated(q, k2, *case[2:], LLAMA_G4)[b], base[b])
    for where in ("chunk", "sys", "repeat"):
        k2 = keys.copy()
        idx = {"chunk": n_sys + start[0] + 1, "sys": 0, "repeat": slots[0, 2]}[where]
        k2[0, :, idx] += 3.0
        assert np.abs(_run_isolated(q, k2, *case[2:], LLAMA_G4)[0] - base[0]).max() > 1e-4, where
    # Padding query rows (past n_valid) never contribute.
    q2 = q.copy()
    q2[1, n_valid[1] :] *= 50
    np.testing.assert_array_equal(_run_isolated(q2, *case[1:], LLAMA_G4)[1], base[1])


def test_g_grouping_query_head_to_kv_head():
    """Query head h*G+g belongs to kv head h: making one query head of group 1 sharp on a chunk key raises
    only kv head 1's score there."""
    q, keys, _slots, start, _length, _n_valid, n_sys, _m = case = _isolated_case(seed=2, g=4)
    base = _run_isolated(*case, LLAMA_G4)
    q2 = q.copy()
    target = n_sys + start[0] + 3
    q2[0, 0, 1, 2] = 10 * keys[0, 1, target]  # group 1, member g=2 looks at chunk position 3
    out = _run_isolated(q2, *case[1:], LLAMA_G4)
    assert out[0, 1, 3] > 0.9 > base[0, 1, 3]
    np.testing.assert_array_equal(out[0, 0], base[0, 0])


# ---------------------------------------------------------------------------------------------- bad input
def test_p16_positions_beyond_the_model_raise():
    """n_s + n_c + n_in must fit in max_position_embeddings: row 0 has 4 + 45 = 49 slots and the longest repeat
    input is 2 + 8 + 2 + 16 = 28 tokens, so the last scoring position is 76."""
    config = dataclasses.replace(LLAMA, max_position_embeddings=76)
    params = perturbed_params(LLAMA)
    with pytest.raises(ValueError, match=r"a context of 45 tokens does not fit this model's 76 positions.*16-token "
                                         r"chunk\] needs 77; contexts of up to 44 tokens fit"):
        compressor.score(params, config, PROMPT, contexts(), chunk_size=CHUNK, progress=False)


def test_p16_positions_exactly_at_the_limit_are_scored(scored):
    """The same contexts with one more position (max_position_embeddings 77: last position 76) must score, with
    the same scores: the limit is inclusive of the last real position (found by mutation testing)."""
    params, ctxs, sc = scored("llama")
    config = dataclasses.replace(LLAMA, max_position_embeddings=77)
    at_limit = compressor.score(params, config, PROMPT, ctxs, chunk_size=CHUNK, progress=False)
    np.testing.assert_array_equal(at_limit.scores, sc.scores)


def test_bad_scoring_input(scored):
    params, ctxs, _ = scored("llama")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        compressor.score(params, LLAMA, PROMPT, ctxs, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="empty context"):
        compressor.score(params, LLAMA, PROMPT, [ctxs[0], []], chunk_size=CHUNK, progress=False)
    with pytest.raises(ValueError, match="no contexts"):
        compressor.score(params, LLAMA, PROMPT, [], chunk_size=CHUNK, progress=False)
    with pytest.raises(ValueError, match=r"token id 128 is out of range.*128"):
        compressor.score(params, LLAMA, PROMPT, [[*ctxs[0][:-1], 128]], chunk_size=CHUNK, progress=False)


# ----------------------------------------------------------- the fused log-sum-exp path of the CPU reference
def _fused_case(outlier: float = 0.0):
    """One layer of a stacked cache [L=2, B=2, H=2, S, D] and a repeat input; `outlier` puts one huge logit on a
    context slot outside the chunk (row 0), far above every logit of the score set."""
    rng = np.random.default_rng(7)
    b, t, h, g, d, n_sys, m, s = 2, 9, 2, 2, 16, 3, 8, 40
    cache_len = np.array([n_sys + 30, n_sys + 22], np.int32)
    q = rng.standard_normal((b, t, h, g, d)).astype(np.float32)
    ck = rng.standard_normal((2, b, h, s, d)).astype(np.float32)
    cv = rng.standard_normal((2, b, h, s, d)).astype(np.float32)
    if outlier:
        ck[1, 0, :, n_sys + 2] = outlier * q[0].mean(axis=(0, 2)) / np.linalg.norm(q[0].mean(axis=(0, 2)))
    k = rng.standard_normal((b, t, h, d)).astype(np.float32)
    v = rng.standard_normal((b, t, h, d)).astype(np.float32)
    spec = ScoreChunk(chunk_start=jnp.asarray([16, 16], jnp.int32), chunk_len=jnp.asarray([8, 3], jnp.int32),
                      n_sys=n_sys, chunk_size=m)
    n_valid = jnp.asarray([9, 6], jnp.int32)
    arrays = tuple(jnp.asarray(x) for x in (q, k, v, ck, cv))
    return arrays, jnp.asarray(cache_len), spec, n_valid


@pytest.mark.parametrize("outlier", [0.0, 400.0], ids=["shared-max", "large-gap-fallback"])
def test_fused_scores_equal_the_two_pass_scores(outlier):
    """On CPU the attention loop accumulates the score softmax's log-sum-exp; the scores must equal the separate
    two-pass computation, also when one context logit dwarfs the score set (the exact fallback is taken)."""
    from kvzip_jax.models.kv_attention import dense_score_attend
    from kvzip_jax.models.layers import attend_blockwise

    (q, k, v, ck, cv), cache_len, spec, n_valid = _fused_case(outlier)
    layer, window = jnp.int32(1), jnp.int32(np.iinfo(np.int32).max)
    run = jax.jit(lambda *a: dense_score_attend(*a, LLAMA_G4, n_valid, spec))
    out, scores = run(q, k, v, ck, cv, layer, cache_len, window)
    repeat_keys = k.transpose(0, 2, 1, 3)
    two_pass = chunk_scores(q, ck, layer, repeat_keys, spec, n_valid, LLAMA_G4)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(two_pass), rtol=1e-5, atol=1e-7)
    slots = cache_len[:, None] + jnp.arange(q.shape[1])[None, :]
    plain = attend_blockwise(q, ck, cv, layer, slots, cache_len, window, new_kv=(k, v),
                             scale=LLAMA_G4.attn_scale, softcap=None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5, atol=1e-6)
    if outlier:  # the case really is one the shared scaling cannot carry
        _, stats = attend_blockwise(q, ck, cv, layer, slots, cache_len, window, new_kv=(k, v),
                                    score_set=(spec.n_sys, spec.chunk_start, spec.chunk_len),
                                    scale=LLAMA_G4.attn_scale, softcap=None)
        assert float(stats.relative_denominator.min()) < np.exp(-60.0)
    # A sliding-window layer is not scored.
    _, sliding = run(q, k, v, ck, cv, layer, cache_len, jnp.int32(1000))
    assert not np.asarray(sliding).any()


# ------------------------------------------------------------ first layer from the raw parameters, numpy only
def _numpy_rope(x, positions, theta):
    """x [T, N, D] rotated by the standard split-half RoPE, written as a complex rotation: the pair
    (x[i], x[i + D/2]) is the complex number x[i] + j*x[i + D/2], multiplied by exp(j * position * theta^(-2i/D))."""
    half = x.shape[-1] // 2
    freq = theta ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    rot = np.exp(1j * positions[:, None].astype(np.float64) * freq[None, :])[:, None, :]  # [T, 1, D/2]
    z = (x[..., :half] + 1j * x[..., half:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def test_first_layer_scores_equal_a_numpy_reference_from_the_raw_parameters(scored):
    """Layer 0's scores, rebuilt in float64 numpy from the checkpoint arrays alone: token embedding, RMSNorm,
    q/k projections, RoPE, query head j -> kv head j // G, then the score of §1.5 (softmax of each repeat-input
    query over [system prefix | this chunk | repeat input (causal)] keys, probability on each chunk key, max over
    the group's query heads and every repeat row). Unlike `reference_scores` above, nothing here runs the
    project's modules, RoPE tables or attention, so a fault shared by those and the scorer cannot cancel out.
    Layer 0 is the one whose input is the raw embedding: no MLP or earlier layer is needed."""
    params, ctxs, sc = scored("llama_g4")
    c = LLAMA_G4
    h_kv, groups, d = c.num_kv_heads, c.num_groups, c.head_dim
    (_, rope), = c.rope  # one layer type: full attention
    embed = np.asarray(params["embed"][...], np.float64)
    layer = params["layers"]
    norm = np.asarray(layer["attn_in_norm"]["scale"][...][0], np.float64)
    wq = np.asarray(layer["attn"]["q_proj"]["kernel"][...][0], np.float64)  # [hidden, heads * D], x @ W
    wk = np.asarray(layer["attn"]["k_proj"]["kernel"][...][0], np.float64)
    n_sys = PROMPT.n_sys
    for b, ctx in enumerate(ctxs):
        for chunk in repeat_inputs(PROMPT, ctx, CHUNK):
            seq = np.array([*PROMPT.prefix_ids, *ctx, *chunk.ids])
            pos = np.arange(len(seq))  # the repeat input sits right after [prefix | context]
            x = embed[seq]
            x = norm * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps)
            q = _numpy_rope((x @ wq).reshape(len(seq), c.num_heads, d), pos, rope.theta)
            k = _numpy_rope((x @ wk).reshape(len(seq), h_kv, d), pos, rope.theta)
            n_in = len(chunk.ids)
            rep = np.arange(len(seq) - n_in, len(seq))
            chunk_keys = n_sys + chunk.start + np.arange(chunk.length)
            keys = np.concatenate([np.arange(n_sys), chunk_keys, rep])
            for h in range(h_kv):
                best = np.zeros(chunk.length)
                for j in range(h * groups, (h + 1) * groups):  # the query heads that share kv head h
                    logits = q[rep, j] @ k[keys, h].T / np.sqrt(d)  # [n_in, n_sys + m + n_in]
                    logits[:, n_sys + chunk.length :][np.triu(np.ones((n_in, n_in), bool), 1)] = -np.inf
                    p = np.exp(logits - logits.max(-1, keepdims=True))
                    p /= p.sum(-1, keepdims=True)
                    best = np.maximum(best, p[:, n_sys : n_sys + chunk.length].max(axis=0))
                got = sc.scores[0, b, h, chunk.start : chunk.start + chunk.length]
                np.testing.assert_allclose(got, best, atol=2e-6, rtol=1e-5, err_msg=f"row {b} chunk {chunk.start}")
    assert np.unique(sc.scores[0, 0, :, : len(ctxs[0])]).size > 50  # a ranking with information, not a constant


def test_rows_two_chunks_apart_score_as_they_do_alone(scored):
    """A batch whose rows differ by two or more chunks (45 and 10 tokens: 3 chunks and 1): each row's scores equal
    that row scored on its own (found by mutation testing: the existing rows differ by one chunk only)."""
    params, ctxs, _ = scored("llama")
    rows = [ctxs[0], ctxs[1][:10]]
    batch = compressor.score(params, LLAMA, PROMPT, rows, chunk_size=CHUNK, progress=False)
    for b, row in enumerate(rows):
        alone = compressor.score(params, LLAMA, PROMPT, [row], chunk_size=CHUNK, progress=False)
        np.testing.assert_allclose(batch.scores[:, b, :, : len(row)], alone.scores[:, 0], atol=1e-6, rtol=1e-5)
