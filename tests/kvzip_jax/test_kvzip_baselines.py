"""Baselines under KVzip's query-agnostic protocol (spec shared/research/kvzip.md §4.1, §4.4, §7.1): SnapKV,
PyramidKV, H2O, StreamingLLM, random and query-aware SnapKV, on the same dense prefill and the same paged cache.

The SnapKV / H2O references are independent of the library's attention: a dense forward written here (the model's
layer modules with a test-written causal attention that records the softmax of every layer), reduced in numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from kvzip_testutil import GEMMA, PROMPT, contexts, perturbed_params
from kvzip_testutil import LLAMA as BASE_LLAMA

from kvzip_jax.config import SLIDING, ModelConfig
from kvzip_jax.kvzip import baselines, compressor
from kvzip_jax.kvzip.baselines import BASELINES, pyramid_ratios
from kvzip_jax.kvzip.compressor import ScoredContext, prefill_contexts
from kvzip_jax.kvzip.prompts import question_ids
from kvzip_jax.models import graphdef_for
from kvzip_jax.models.layers import rope_tables

N_SYS = len(PROMPT.prefix_ids)
CTX_LENS = (45, 30)
HEADROOM = 16
WINDOW = 16  # SnapKV's observation window for contexts under 1K tokens
QUESTIONS = ([20, 21, 22, 23, 24], [30, 31, 32])

LLAMA = dataclasses.replace(BASE_LLAMA, num_layers=4, layer_types=())
METHODS = (*BASELINES, "snapkv-query")
LAYERWISE = ("snapkv", "pyramidkv", "h2o", "random", "snapkv-query")  # official rule within each layer


def run_method(name, params, config, ctxs, **kwargs) -> ScoredContext:
    if name == "snapkv-query":
        return baselines.snapkv(params, config, PROMPT, ctxs, question=list(QUESTIONS), **kwargs)
    return BASELINES[name](params, config, PROMPT, ctxs, **kwargs)


@pytest.fixture(scope="module")
def llama():
    params = perturbed_params(LLAMA)
    ctxs = contexts()
    scored = {name: run_method(name, params, LLAMA, ctxs) for name in METHODS}
    return params, ctxs, scored


# ------------------------------------------------------------------------------------------- dense reference
@functools.partial(jax.jit, static_argnames=("config",))
def _reference_probs(params, tokens, *, config: ModelConfig):
    model = nnx.merge(graphdef_for(config), params)
    graph, stacked = nnx.split(model.layers)
    pos = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    x = model.embed_tokens(tokens[None])
    hi = jax.lax.Precision.HIGHEST
    scale = float(config.query_pre_attn_scalar or config.head_dim) ** -0.5
    probs = []
    for layer_id, kind in enumerate(config.layer_types):
        layer = nnx.merge(graph, jax.tree.map(lambda a, i=layer_id: a[i], stacked))
        cos, sin = rope_tables(config, kind, pos[None])
        allowed = pos[None, :] <= pos[:, None]
        if kind == SLIDING:
            allowed &= pos[:, None] - pos[None, :] < config.sliding_window

        def kv_attend(q, k, v, allowed=allowed):
            z = jnp.einsum("thgd,shd->hgts", q[0], k[0], precision=hi) * scale
            p = jax.nn.softmax(jnp.where(allowed, z, -jnp.inf), axis=-1)
            probs.append(p)
            return jnp.einsum("hgts,shd->thgd", p, v[0], precision=hi)[None]

        x = layer(x, cos, sin, kv_attend)
    return jnp.stack(probs)


_PROBS: dict = {}


def reference_probs(params, config: ModelConfig, b: int, ctx: list[int]) -> np.ndarray:
    """[L, Hkv, G, T, T]: the causal softmax of every layer of a plain dense forward of the unpadded row
    [prefix | ctx | question turn b], written here (precision HIGHEST, scale from query_pre_attn_scalar or
    head_dim, sliding window honoured). By causality its rows up to the context end are those of a forward of
    [prefix | ctx] alone, so one forward serves SnapKV (window rows), query-aware SnapKV (turn rows) and H2O."""
    key = (config, b)
    if key not in _PROBS:
        tokens = list(PROMPT.prefix_ids) + list(ctx) + question_ids(PROMPT, QUESTIONS[b])
        width = N_SYS + max(CTX_LENS) + max(len(q) for q in QUESTIONS) + len(PROMPT.postfix_ids)
        padded = tokens + [0] * (width - len(tokens))  # one compile for every row; causal: padding is inert
        probs = np.asarray(_reference_probs(params, jnp.asarray(padded, jnp.int32), config=config))
        _PROBS[key] = probs[..., : len(tokens), : len(tokens)]
    return _PROBS[key]


def max_pool(x: np.ndarray, kernel: int) -> np.ndarray:
    half = kernel // 2
    n = x.shape[-1]
    return np.stack([x[..., max(i - half, 0) : i + half + 1].max(-1) for i in range(n)], axis=-1)


def official_kept(scores: np.ndarray, ratio: float) -> int:
    """Pairs kept by the official rule over one score set: keep S > sorted_desc[int(N r) - 1] (all if r == 1)."""
    flat = np.sort(scores.reshape(-1))[::-1]
    if ratio >= 1.0:
        return flat.size
    return int((flat > flat[max(int(flat.size * ratio) - 1, 0)]).sum())


def context_keep(sc: ScoredContext, ratio: float) -> np.ndarray:
    """keep mask over the context slots [L, B, Hkv, n_c_max] from ScoredContext.keep_mask (cache slot space)."""
    _, keep = sc.keep_mask(ratio)
    out = np.zeros(sc.scores.shape, bool)
    for b, n in enumerate(sc.n_ctx):
        out[:, b, :, :n] = keep[:, b, :, N_SYS : N_SYS + n]
    return out


# ------------------------------------------------------------------------------------------------------ tests
def test_scores_shape_and_zero_past_context(llama):
    _, _, scored = llama
    for name, sc in scored.items():
        assert isinstance(sc, ScoredContext), name
        assert sc.scores.shape == (LLAMA.num_layers, 2, LLAMA.num_kv_heads, max(CTX_LENS)), name
        assert sc.n_ctx == CTX_LENS
        assert (sc.scores[:, 1, :, CTX_LENS[1] :] == 0).all(), name
        assert np.isfinite(sc.scores).all() and (sc.scores >= 0).all(), name
        for b, n in enumerate(CTX_LENS):
            assert (sc.scores[:, b, :, :n] > 0).mean() > 0.5, f"{name}: scores are mostly zero (P10)"
    assert scored["snapkv-query"].method == "snapkv-query" and scored["pyramidkv"].method == "pyramidkv"


def test_ratio_one_answers_equal_kvzip(llama):
    params, ctxs, scored = llama
    kvzip = compressor.score(params, LLAMA, PROMPT, ctxs, chunk_size=16, progress=False)
    ref = kvzip.compress(1.0, headroom=HEADROOM).ask(params, QUESTIONS, max_new_tokens=6).tokens
    assert all(len(set(t)) > 1 for t in ref), ref
    for name, sc in scored.items():
        cc = sc.compress(1.0, headroom=HEADROOM)
        assert cc.report.kept_ratios == (1.0, 1.0), name
        assert cc.ask(params, QUESTIONS, max_new_tokens=6).tokens == ref, name


def test_prefilled_pairs_bit_identical_to_plain_prefill(llama):
    params, ctxs, scored = llama
    plain, _ = prefill_contexts(params, LLAMA, PROMPT, ctxs, extra_slots=1)
    pk, pv = np.asarray(plain.k), np.asarray(plain.v)
    for name, sc in scored.items():
        k, v = np.asarray(sc.cache.k), np.asarray(sc.cache.v)
        assert np.asarray(sc.cache.length).tolist() == [N_SYS + n for n in CTX_LENS], name
        for b, n in enumerate(CTX_LENS):
            np.testing.assert_array_equal(k[:, b, :, : N_SYS + n], pk[:, b, :, : N_SYS + n], err_msg=name)
            np.testing.assert_array_equal(v[:, b, :, : N_SYS + n], pv[:, b, :, : N_SYS + n], err_msg=name)


@pytest.mark.parametrize("name", LAYERWISE)
def test_budget_accounting_per_layer(llama, name):
    """Per layer, the kept count is the official rule's over that layer's heads and positions (at the layer's own
    ratio); the real kept ratio is <= r, and within the off-by-one + truncation of r when nothing ties."""
    _, _, scored = llama
    sc = scored[name]
    L, H = LLAMA.num_layers, LLAMA.num_kv_heads
    for r in (0.1, 0.3, 0.5):
        selection, _ = sc.keep_mask(r)
        keep = context_keep(sc, r)
        ratios = pyramid_ratios(r, L) if name == "pyramidkv" else np.full(L, r)
        for b, n in enumerate(CTX_LENS):
            s = sc.scores[:, b, :, :n]
            for layer in range(L):
                assert keep[layer, b, :, :n].sum() == official_kept(s[layer], ratios[layer]), (name, r, b, layer)
            kept = keep[:, b, :, :n].sum()
            assert selection.kept_ratio[b] == pytest.approx(kept / (L * H * n), abs=1e-12)
            assert kept / (L * H * n) <= r + 1e-12
            if all(np.unique(s[layer]).size == s[layer].size for layer in range(L)):  # no ties in any layer
                expected = sum(max(int(H * n * ratios[layer]) - 1, 0) if ratios[layer] < 1 else H * n
                               for layer in range(L))
                assert kept == expected, (name, r, b)
                assert r - kept / (L * H * n) <= 2 / (H * n)  # at most int() truncation + 1 per layer
    if name != "pyramidkv":  # one budget per layer, non-uniform across its heads (AdaKV-style)
        counts = context_keep(sc, 0.6)[:, 0, :, : CTX_LENS[0]].sum(-1)
        assert np.unique(counts).size > 1, counts


@pytest.mark.parametrize("name", METHODS)
def test_nested_across_ratios(llama, name):
    _, _, scored = llama
    masks = [context_keep(scored[name], r) for r in (0.1, 0.3, 0.5, 0.8, 1.0)]
    for small, large in itertools.pairwise(masks):
        assert (small <= large).all(), name
    assert masks[0].sum() < masks[2].sum() < masks[-1].sum()


def _observed_reference(params, config, b, ctx, rows: slice, reduce: str) -> np.ndarray:
    """[L, Hkv, n_c]: attention received by each context pair of row b from query rows `rows` of the reference
    forward, reduced over those rows and the G heads of the group ("mean": SnapKV, "max": H2O)."""
    sel = reference_probs(params, config, b, ctx)[:, :, :, rows, N_SYS : N_SYS + len(ctx)]  # [L, Hkv, G, w, n_c]
    return sel.mean(axis=(2, 3)) if reduce == "mean" else sel.max(axis=(2, 3))


def test_snapkv_matches_window_attention_reference(llama):
    params, ctxs, scored = llama
    sc = scored["snapkv"]
    for b, ctx in enumerate(ctxs):
        n = len(ctx)
        total = N_SYS + n
        ref = max_pool(_observed_reference(params, LLAMA, b, ctx, slice(total - WINDOW, total), "mean"), 7)
        np.testing.assert_allclose(sc.scores[:, b, :, : n - WINDOW], ref[:, :, : n - WINDOW], atol=2e-6, rtol=1e-5)
    # The observation window is always kept when the layer budget covers it; below that, only (the most recent)
    # window pairs are kept.
    H = LLAMA.num_kv_heads
    for r in (0.1, 0.3, 0.4, 0.6, 0.9):
        keep = context_keep(sc, r)
        for b, n in enumerate(CTX_LENS):
            if int(H * n * r) - 1 >= H * WINDOW:
                assert keep[:, b, :, n - WINDOW : n].all(), (r, b)
            else:
                assert not keep[:, b, :, : n - WINDOW].any(), (r, b)
                assert keep[:, b, :, n - 1].all(), (r, b)


def test_snapkv_query_aware_scores_come_from_the_question(llama):
    params, ctxs, scored = llama
    aware, agnostic = scored["snapkv-query"], scored["snapkv"]
    assert not np.allclose(aware.scores, agnostic.scores)
    for b, ctx in enumerate(ctxs):
        n, turn = len(ctx), question_ids(PROMPT, QUESTIONS[b])
        total = N_SYS + n
        ref = max_pool(_observed_reference(params, LLAMA, b, ctx, slice(total, total + len(turn)), "mean"), 7)
        np.testing.assert_allclose(aware.scores[:, b, :, :n], ref, atol=2e-6, rtol=1e-5)
    # Different questions, different kept sets (so reusing a cache compressed for the first question differs).
    other = baselines.snapkv(params, LLAMA, PROMPT, ctxs, question=[[60, 61, 62, 63, 64], [70, 71]])  # same shape
    assert (context_keep(other, 0.3) != context_keep(aware, 0.3)).any()


def test_pyramid_ratios_unit():
    for L in (2, 4, 32):
        for r in (0.05, 0.1, 0.3, 0.5):
            ratios = pyramid_ratios(r, L)
            assert ratios.shape == (L,)
            assert ratios.mean() == pytest.approx(r, abs=1e-12)
            assert (np.diff(ratios) < 0).all(), (L, r, ratios)  # strictly decreasing with depth
            assert ratios[0] == pytest.approx(2 * r - r / 20) and ratios[-1] == pytest.approx(r / 20)
        np.testing.assert_allclose(pyramid_ratios(1.0, L), np.ones(L))  # r = 1 keeps everything
    # Capping: 2r - r/beta > 1 is capped at 1 and the excess spread over the other layers; mean stays r.
    for L, r in ((4, 0.8), (8, 0.7), (32, 0.9)):
        ratios = pyramid_ratios(r, L)
        assert (ratios <= 1.0 + 1e-12).all() and (ratios > 0).all()
        assert ratios.mean() == pytest.approx(r, abs=1e-12)
        assert (np.diff(ratios) <= 1e-12).all()  # still non-increasing with depth
        assert ratios[0] == 1.0
    assert pyramid_ratios(0.3, 1).tolist() == [0.3]


def test_pyramidkv_layer_budgets_decrease_with_depth(llama):
    _, _, scored = llama
    sc = scored["pyramidkv"]
    L, H = LLAMA.num_layers, LLAMA.num_kv_heads
    for r in (0.3, 0.5):
        keep = context_keep(sc, r)
        frac = np.array([[keep[layer, b, :, :n].sum() / (H * n) for layer in range(L)]
                         for b, n in enumerate(CTX_LENS)])
        assert (np.diff(frac, axis=1) < 0).all(), frac
        target = pyramid_ratios(r, L)  # averages to r (unit test above)
        assert (frac <= target + 1e-12).all()  # each layer within its budget (official rule: off-by-one, ties)
        assert (frac.mean(axis=1) > r - 0.1).all() and (frac.mean(axis=1) <= r).all(), frac
        # SnapKV scores, pyramid budgets: the same scores as snapkv.
        np.testing.assert_array_equal(sc.scores, scored["snapkv"].scores)


def test_h2o_matches_max_attention_received_during_prefill(llama):
    params, ctxs, scored = llama
    sc = scored["h2o"]
    for b, ctx in enumerate(ctxs):
        ref = _observed_reference(params, LLAMA, b, ctx, slice(0, N_SYS + len(ctx)), "max")
        np.testing.assert_allclose(sc.scores[:, b, :, : len(ctx)], ref, atol=2e-6, rtol=1e-5)
    for chunk in (7,):
        other = baselines.h2o(params, LLAMA, PROMPT, ctxs, prefill_chunk=chunk)
        np.testing.assert_allclose(other.scores, sc.scores, atol=1e-6, rtol=1e-6)
        assert (context_keep(other, 0.3) == context_keep(sc, 0.3)).all()


def test_streaming_llm_keeps_sinks_and_recent(llama):
    _, _, scored = llama
    sc = scored["streaming_llm"]
    for r in (0.2, 0.3, 0.6):
        keep = context_keep(sc, r)
        selection, _ = sc.keep_mask(r)
        for b, n in enumerate(CTX_LENS):
            k = int(n * r)
            expected = np.zeros(n, bool)
            expected[:4] = True
            expected[n - (k - 4) :] = True
            assert (keep[:, b, :, :n] == expected).all(), (r, b)  # the same in every layer and head
            assert selection.kept_ratio[b] == pytest.approx(k / n)


def test_random_is_deterministic_by_seed(llama):
    params, ctxs, scored = llama
    again = baselines.random_baseline(params, LLAMA, PROMPT, ctxs, seed=0)
    np.testing.assert_array_equal(again.scores, scored["random"].scores)
    assert (context_keep(again, 0.3) == context_keep(scored["random"], 0.3)).all()
    other = baselines.random_baseline(params, LLAMA, PROMPT, ctxs, seed=1)
    assert not np.array_equal(other.scores, again.scores)


@pytest.fixture(scope="module")
def gemma():
    params = perturbed_params(GEMMA)
    ctxs = contexts()
    return params, ctxs, {name: run_method(name, params, GEMMA, ctxs) for name in BASELINES}


@pytest.mark.parametrize("name", BASELINES)
def test_gemma3_sliding_layers_keep_their_window_only(gemma, name):
    _, _, scored = gemma
    sc = scored[name]
    sliding = GEMMA.sliding_layers
    selection, keep = sc.keep_mask(0.3)
    for b, n in enumerate(CTX_LENS):
        total = N_SYS + n
        window = np.zeros(keep.shape[-1], bool)
        window[total - GEMMA.sliding_window + 1 : total] = True
        for layer in np.flatnonzero(sliding):
            assert (keep[layer, b] == window).all(), (layer, b)
        full = keep[~sliding, b]
        assert full[:, :, :N_SYS].all()  # system prefix kept in full layers
        assert not full[:, :, total:].any()
        kept = full[:, :, N_SYS:total].sum() / (full.shape[0] * full.shape[1] * n)
        assert selection.kept_ratio[b] == pytest.approx(kept)
        assert kept <= 0.3


def test_gemma3_pyramidkv_budget_averages_to_r_over_evictable_layers(gemma):
    """PyramidKV's per-layer budgets must average to r over the layers that are evicted: on a hybrid model the
    sliding layers are not part of the budget, so the full layers' ratios should be the pyramid over them."""
    _, _, scored = gemma
    selection, _ = scored["pyramidkv"].keep_mask(0.3)
    for b in range(len(CTX_LENS)):
        assert selection.kept_ratio[b] == pytest.approx(0.3, abs=0.05), selection.kept_ratio
