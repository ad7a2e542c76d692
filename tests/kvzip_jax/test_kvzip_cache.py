"""KVzip compression into the head-wise paged cache, and answering from it (spec shared/research/kvzip.md §1.6-1.7,
§2, invariants 7.1.4-12, pitfalls P1, P4, P5, P15).

References are independent of the paged path: a dense library forward on the uncompressed sequence (ratio 1.0),
and a hand-written masked dense forward (the model's layer modules with a test-written attention over the dense
prefill K/V where evicted pairs are masked out) for ratio 0.3.
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

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import FULL, SLIDING, ModelConfig
from kvzip_jax.generate import generate
from kvzip_jax.kvzip import compressor
from kvzip_jax.kvzip.prompts import question_ids
from kvzip_jax.kvzip.question_pages import plan_questions
from kvzip_jax.kvzip.select import head_scores_from, load_head_scores, save_head_scores
from kvzip_jax.models import forward, graphdef_for
from kvzip_jax.models.layers import rope_tables

N_SYS = len(PROMPT.prefix_ids)
CHUNK = 16
CTX_LENS = (45, 30)
HEADROOM = 16

CONFIGS = {"llama": LLAMA, "gemma3": GEMMA}
QUESTIONS = ([20, 21, 22, 23, 24], [30, 31, 32, 33, 34])  # equal lengths (CompressedContext.logits needs that)
OTHER_QUESTIONS = ([40, 41, 42], [50, 51, 52, 53, 54, 55])


_SCORED: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def scored():
    """factory(name) -> (config, params, contexts, ScoredContext); each model is scored once per module."""

    def get(name):
        if name not in _SCORED:
            config = CONFIGS[name]
            params = perturbed_params(config)
            ctxs = contexts()
            sc = compressor.score(params, config, PROMPT, ctxs, chunk_size=CHUNK, progress=False)
            _SCORED[name] = (config, params, ctxs, sc)
        return _SCORED[name]

    return get


# ------------------------------------------------------------------------------------------------- helpers
def read_paged(cache):
    """{(l, b, h): (positions [n], K [n, D], V [n, D])} of every head sequence, read through its page table in
    storage order; also checks that tables only use the sequence's own pages and that the pool is partitioned
    (context pages first, then any free pages)."""
    table, num_pages = np.asarray(cache.page_table), np.asarray(cache.num_pages)
    lengths, pos = np.asarray(cache.lengths), np.asarray(cache.pos_pages)
    kp, vp = np.asarray(cache.k_pages), np.asarray(cache.v_pages)
    page = pos.shape[1]
    owned = np.concatenate([table[idx][: num_pages[idx]] for idx in np.ndindex(num_pages.shape)])
    # The context's pages are partitioned among heads and come first; free pages (borrowed by questions) follow.
    assert sorted(owned.tolist()) == list(range(len(owned))), "pool pages are not partitioned among heads"
    out = {}
    for idx in np.ndindex(lengths.shape):
        j = np.arange(lengths[idx])
        assert (j // page < num_pages[idx]).all()
        pages, off = table[idx][j // page], j % page
        out[idx] = (pos[pages, off], kp[pages, off], vp[pages, off])
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _dense_logits(params, tokens, *, config):
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = forward(params, tokens, positions, DenseKVCache.zeros(config, b, t), config=config)
    return logits


def dense_logits(params, config, rows):
    """Library dense forward of each (ragged) row from scratch; rows are right-padded, which a causal forward
    never lets reach the real tokens. Returns a list of [len(row), V]."""
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    out = np.asarray(_dense_logits(params, jnp.asarray(tokens), config=config))
    return [out[i, : len(r)] for i, r in enumerate(rows)]


def masked_reference_logits(params, config, sc, keep, tokens_b, b):
    """Logits of `tokens_b` appended at positions total + t to row b, attending to the dense prefill K/V of the
    pairs where keep[l, b, h] is True (evicted pairs masked out), through the model's own layer modules."""
    total = N_SYS + CTX_LENS[b]
    k, v = np.asarray(sc.cache.k[:, b]), np.asarray(sc.cache.v[:, b])  # [L, H, S, D]
    cap = k.shape[2]
    past = [(k[layer], v[layer], np.arange(cap, dtype=np.int32), keep[layer, b] & (np.arange(cap) < total))
            for layer in range(config.num_layers)]
    positions = total + np.arange(len(tokens_b), dtype=np.int32)
    out = _masked_forward(params, jnp.asarray(np.asarray(tokens_b, np.int32)), jnp.asarray(positions),
                          jax.tree.map(jnp.asarray, past), config=config)
    return np.asarray(out)


@functools.partial(jax.jit, static_argnames=("config",))
def _masked_forward(params, tokens, pos, past, *, config: ModelConfig):
    model = nnx.merge(graphdef_for(config), params)
    graph, stacked = nnx.split(model.layers)
    x = model.embed_tokens(tokens[None])
    hi = jax.lax.Precision.HIGHEST
    scale = float(config.query_pre_attn_scalar or config.head_dim) ** -0.5
    for layer_id, kind in enumerate(config.layer_types):
        layer = nnx.merge(graph, jax.tree.map(lambda a, i=layer_id: a[i], stacked))
        cos, sin = rope_tables(config, kind, pos[None])
        window = config.sliding_window if kind == SLIDING else None

        def kv_attend(q, k, v, layer_id=layer_id, window=window):
            q, k, v = q[0], k[0], v[0]
            pk, pv, ppos, pvis = past[layer_id]
            keys = jnp.concatenate([pk, k.transpose(1, 0, 2)], axis=1)
            values = jnp.concatenate([pv, v.transpose(1, 0, 2)], axis=1)
            kpos = jnp.concatenate([ppos, pos])
            vis = jnp.concatenate([pvis, jnp.ones((pk.shape[0], pos.shape[0]), bool)], axis=1)
            allowed = (kpos[None, :] <= pos[:, None])[None] & vis[:, None, :]
            if window is not None:
                allowed &= (pos[:, None] - kpos[None, :] < window)[None]
            z = jnp.einsum("thgd,hsd->hgts", q, keys, precision=hi) * scale
            z = jnp.where(allowed[:, None], z, -jnp.inf)
            p = jnp.exp(z - z.max(-1, keepdims=True))
            p = p / p.sum(-1, keepdims=True)
            return jnp.einsum("hgts,hsd->thgd", p, values, precision=hi)[None]

        x = layer(x, cos, sin, kv_attend)
    return model.logits(x)[0]


def totals():
    return [N_SYS + n for n in CTX_LENS]


# ----------------------------------------------------------------------------------- ratio 1.0 == full cache
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_ratio_one_equals_full_cache(name, scored):
    config, params, ctxs, sc = scored(name)
    cc = sc.compress(1.0, headroom=HEADROOM)
    assert cc.report.kept_ratios == (1.0, 1.0) and cc.report.kept_ratio == 1.0
    got = cc.logits(params, QUESTIONS)
    rows = [list(PROMPT.prefix_ids) + c + list(q) for c, q in zip(ctxs, QUESTIONS, strict=True)]
    for b, ref in enumerate(dense_logits(params, config, rows)):
        np.testing.assert_allclose(got[b], ref[-len(QUESTIONS[b]) :], atol=1e-5, rtol=0)
    assert np.std(got, axis=-1).mean() > 0.1
    # Greedy answers equal generate() on the uncompressed [prefix | context | question | postfix].
    ans = cc.ask(params, OTHER_QUESTIONS, max_new_tokens=8)
    prompts = [list(PROMPT.prefix_ids) + c + question_ids(PROMPT, q)
               for c, q in zip(ctxs, OTHER_QUESTIONS, strict=True)]
    ref = generate(params, config, prompts, max_new_tokens=8)
    assert ans.tokens == ref.tokens
    assert all(len(set(t)) > 2 for t in ans.tokens), f"degenerate answers {ans.tokens}"


# ---------------------------------------------------------------------------------- masked == compacted (8)
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_masked_equals_compacted(name, scored):
    config, params, ctxs, sc = scored(name)
    cc = sc.compress(0.3, headroom=HEADROOM)
    _, keep = sc.keep_mask(0.3)
    stored = read_paged(cc.cache)
    for (layer, b, h), (pos, _k, _v) in stored.items():
        np.testing.assert_array_equal(pos, np.flatnonzero(keep[layer, b, h]))
    got = cc.logits(params, QUESTIONS)
    full = dense_logits(params, config,
                        [list(PROMPT.prefix_ids) + c + list(q) for c, q in zip(ctxs, QUESTIONS, strict=True)])
    for b in range(2):
        ref = masked_reference_logits(params, config, sc, keep, QUESTIONS[b], b)
        np.testing.assert_allclose(got[b], ref, atol=2e-5, rtol=0)
        # Eviction is real: the full-cache logits are different.
        assert np.abs(got[b] - full[b][-len(QUESTIONS[b]) :]).max() > 1e-3


# ------------------------------------------------------------------- kept sets: nested, protected, positions
def test_nested_protected_positions_and_bit_identical(scored):
    config, _params, _ctxs, sc = scored("llama")
    L, H = config.num_layers, config.num_kv_heads
    masks, reports = {}, {}
    dense_k, dense_v = np.asarray(sc.cache.k), np.asarray(sc.cache.v)
    for r in (0.1, 0.3, 0.5):
        _selection, keep = sc.keep_mask(r)
        masks[r] = keep
        cc = sc.compress(r, headroom=HEADROOM)
        reports[r] = cc.report
        assert np.asarray(cc.cache.next_position).tolist() == totals()  # positions never renumbered
        stored = read_paged(cc.cache)
        for (layer, b, h), (pos, k, v) in stored.items():
            assert (pos[:N_SYS] == np.arange(N_SYS)).all(), "system prefix pair evicted"
            np.testing.assert_array_equal(pos, np.flatnonzero(keep[layer, b, h]))
            assert (pos < totals()[b]).all() and (np.diff(pos) > 0).all()
            np.testing.assert_array_equal(k, dense_k[layer, b, h, pos])  # bit-identical to the prefill values
            np.testing.assert_array_equal(v, dense_v[layer, b, h, pos])
        for b, n in enumerate(CTX_LENS):
            n_pairs = L * H * n
            kept = sum(len(stored[layer, b, h][0]) - N_SYS for layer in range(L) for h in range(H))
            assert cc.report.kept_ratios[b] == pytest.approx(kept / n_pairs, abs=1e-12)
            assert kept / n_pairs <= r
            s = sc.scores[:, b, :, :n]
            if np.unique(s).size == s.size:  # no ties: exactly int(N r) - 1 pairs (official off-by-one, P4)
                assert kept == int(n_pairs * r) - 1
    assert (masks[0.1] <= masks[0.3]).all() and (masks[0.3] <= masks[0.5]).all()
    assert masks[0.1].sum() < masks[0.3].sum() < masks[0.5].sum()
    # Non-uniform budgets (P5, global across layers and heads): the heads do not all keep the same count.
    counts = masks[0.3][:, 0, :, N_SYS : totals()[0]].sum(-1)
    assert np.unique(counts).size > 1


def expected_kept_positions(config, designed, b, n, ratio):
    """{(layer, kv head): sorted cache positions} row b must keep, computed here from the rule in select.py's
    docstring alone: N = valid evictable pairs of the row, keep the top max(int(N*r) - 1, 0) scores (the scores
    are distinct, so strict > threshold is exactly that top-k), plus the whole system prefix; a sliding layer keeps
    only its window."""
    full = [i for i, t in enumerate(config.layer_types) if t == FULL]
    s = designed[full][:, b, :, :n]  # [L_ev, H, n]: padding past the row's context must play no part
    k = max(int(s.size * ratio) - 1, 0)
    top = np.argsort(-s, axis=None, kind="stable")[:k]
    kept = np.zeros(s.shape, bool)
    kept.flat[top] = True
    total = N_SYS + n
    out = {}
    for layer in range(config.num_layers):
        for h in range(config.num_kv_heads):
            if layer in full:
                ctx = N_SYS + np.flatnonzero(kept[full.index(layer), h])
                out[layer, h] = np.concatenate([np.arange(N_SYS), ctx])
            else:
                out[layer, h] = np.arange(max(total - config.sliding_window + 1, 0), total)
    return out


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_compressed_cache_holds_exactly_the_top_scored_pairs(name, scored):
    """Designed distinct scores (a seeded permutation, also filling the padding past row 1's context), then the
    positions each head sequence really holds, read from the paged cache itself, must be the ones an independent
    top-k picks. Every other cache test compares the pool with `keep_mask`, which goes through the compressor's
    own selector: an inverted or random selection would pass those, not this."""
    config, _params, _ctxs, sc = scored(name)
    rng = np.random.default_rng(123)
    designed = (rng.permutation(sc.scores.size).reshape(sc.scores.shape) / sc.scores.size).astype(np.float32)
    assert np.unique(designed).size == designed.size  # distinct in float32 too: no ties at the threshold
    sc_designed = dataclasses.replace(sc, scores=designed)
    for ratio in (0.3, 0.55):
        cc = sc_designed.compress(ratio, headroom=HEADROOM)
        stored = read_paged(cc.cache)
        for b, n in enumerate(CTX_LENS):
            expected = expected_kept_positions(config, designed, b, n, ratio)
            for (layer, h), positions in expected.items():
                got = stored[layer, b, h][0]
                np.testing.assert_array_equal(got, positions, err_msg=f"r={ratio} layer {layer} row {b} head {h}")
            assert np.asarray(cc.cache.lengths)[:, b].tolist() == [
                [len(expected[layer, h]) for h in range(config.num_kv_heads)] for layer in range(config.num_layers)
            ]


@pytest.mark.parametrize("ratio", [0.3, 1.0])
def test_new_tokens_get_position_after_the_context(ratio, scored):
    """The t-th appended token is stored with position n_s + n_c + t whatever the ratio (read from pos_pages
    through the question rows' working tables, in the private pages after the context's pairs)."""
    config, params, _, sc = scored("llama")
    cc = sc.compress(ratio, headroom=HEADROOM)
    base = np.asarray(cc.cache.lengths)
    work = cc._working_cache(np.arange(2), len(QUESTIONS[0]))
    toks = jnp.asarray(np.asarray(QUESTIONS, np.int32))
    positions = work.next_position[:, None] + jnp.arange(toks.shape[1], dtype=jnp.int32)[None, :]
    _, work = compressor._logits_all(params, toks, positions, work, config=config)
    table, pos = np.asarray(work.page_table), np.asarray(work.pos_pages)
    page = pos.shape[1]
    for idx in np.ndindex(base.shape):
        j = base[idx] + np.arange(len(QUESTIONS[0]))
        got = pos[table[idx][j // page], j % page]
        np.testing.assert_array_equal(got, totals()[idx[1]] + np.arange(len(QUESTIONS[0])))


# -------------------------------------------------------------------------------------- rollback (9), reuse
def test_rollback_and_multi_question_reuse(scored):
    _config, params, _, sc = scored("llama")
    cc = sc.compress(0.3, headroom=HEADROOM)
    lengths0, next0 = np.asarray(cc.cache.lengths).copy(), np.asarray(cc.cache.next_position).copy()
    stored0 = read_paged(cc.cache)
    a1 = cc.ask(params, OTHER_QUESTIONS, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(cc.cache.lengths), lengths0)
    np.testing.assert_array_equal(np.asarray(cc.cache.next_position), next0)
    np.testing.assert_array_equal(np.asarray(a1.cache.lengths), lengths0)
    stored1 = read_paged(cc.cache)
    for idx, (pos, k, v) in stored0.items():
        np.testing.assert_array_equal(stored1[idx][0], pos)
        np.testing.assert_array_equal(stored1[idx][1], k)
        np.testing.assert_array_equal(stored1[idx][2], v)
    assert cc.ask(params, OTHER_QUESTIONS, max_new_tokens=6).tokens == a1.tokens
    other = cc.ask(params, [list(reversed(q)) for q in OTHER_QUESTIONS], max_new_tokens=6)
    assert other.tokens != a1.tokens
    assert cc.ask(params, OTHER_QUESTIONS, max_new_tokens=6).tokens == a1.tokens
    l1 = cc.logits(params, QUESTIONS)
    np.testing.assert_array_equal(cc.logits(params, QUESTIONS), l1)
    np.testing.assert_array_equal(np.asarray(cc.cache.lengths), lengths0)


# --------------------------------------------------------------------------------------- head level, budgets
def test_head_level_whole_rows_and_file_round_trip(scored, tmp_path):
    config, _params, _, sc = scored("llama")
    L, H = config.num_layers, config.num_kv_heads
    r = 0.5
    cc = sc.compress(r, level="head", headroom=HEADROOM)
    stored = read_paged(cc.cache)
    for b, n in enumerate(CTX_LENS):
        n_ctx_kept = [len(stored[layer, b, h][0]) - N_SYS for layer in range(L) for h in range(H)]
        assert set(n_ctx_kept) <= {0, n}, f"row {b}: heads keep part of their context: {n_ctx_kept}"
        assert 0 < sum(n_ctx_kept) < L * H * n
        assert cc.report.kept_ratios[b] * L * H == pytest.approx(round(cc.report.kept_ratios[b] * L * H))
        assert cc.report.kept_ratios[b] <= r
    valid = np.arange(max(CTX_LENS))[None, :] < np.array(CTX_LENS)[:, None]
    hs = head_scores_from(sc.scores, valid)
    path = str(tmp_path / "heads.npz")
    save_head_scores(path, hs, {"family": config.family, "num_layers": L, "num_kv_heads": H})
    loaded = load_head_scores([path], (L, H))
    np.testing.assert_array_equal(loaded, hs)
    keep_a = sc.keep_mask(r, "head", head_scores=hs)[1]
    keep_b = sc.keep_mask(r, "head", head_scores=loaded)[1]
    np.testing.assert_array_equal(keep_a, keep_b)
    from_file = sc.compress(r, level="head", head_scores=loaded, headroom=HEADROOM)
    stored_f = read_paged(from_file.cache)
    for idx, (pos, _, _) in stored_f.items():
        np.testing.assert_array_equal(pos, np.flatnonzero(keep_a[idx]))
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(3, 2\)"):
        load_head_scores([path], (3, 2))
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(1, 2\)"):
        sc.compress(r, level="head", head_scores=hs[:1])


@pytest.mark.parametrize("level", ["pair", "pair-uniform"])
@pytest.mark.parametrize("r", [0.2, 0.4])
def test_budget_accounting(level, r, scored):
    config, _, _, sc = scored("llama")
    L, H = config.num_layers, config.num_kv_heads
    selection, keep = sc.keep_mask(r, level)
    for b, n in enumerate(CTX_LENS):
        kept = keep[:, b, :, N_SYS : N_SYS + n].sum()
        assert kept / (L * H * n) == pytest.approx(selection.kept_ratio[b], abs=1e-12)
        assert abs(kept / (L * H * n) - r) <= 1e-2
        if level == "pair-uniform":  # every head gets exactly int(n r)
            assert (keep[:, b, :, N_SYS : N_SYS + n].sum(-1) == int(n * r)).all()


# -------------------------------------------------------------------------------------------------- memory
def test_memory_is_kept_pairs_plus_rounding_and_question_pages_come_on_demand(scored):
    """The compressed pool holds the kept pairs and their page rounding, nothing preallocated for decoding; a
    call borrows pages per question (a copy of the context's partial last page + the question's tokens), and
    several questions on one context share its full pages (the pool grows by their private pages only)."""
    config, params, _, sc = scored("llama")
    L, H, D = config.num_layers, config.num_kv_heads, config.head_dim
    per_pair = 2 * D * 4  # K + V, float32
    page = 16
    cc = sc.compress(0.3, headroom=HEADROOM, page_size=page)
    _, keep = sc.keep_mask(0.3)
    counts = keep.sum(-1)  # [L, B, H]
    pages = np.maximum(-(-counts // page), 1)
    np.testing.assert_array_equal(np.asarray(cc.cache.num_pages), pages)
    np.testing.assert_array_equal(np.asarray(cc.cache.lengths), counts)
    assert cc.cache.k_pages.shape == (pages.sum(), page, D)
    assert cc.report.compressed_kv_bytes == cc.cache.nbytes() == pages.sum() * page * per_pair
    assert cc.report.kept_kv_bytes == counts.sum() * per_pair
    assert cc.report.dense_kv_bytes == L * H * sum(totals()) * per_pair
    # The batch's kept ratio weighs each row by its context length.
    assert cc.report.kept_ratio == pytest.approx(np.average(cc.report.kept_ratios, weights=CTX_LENS))
    assert 0 <= cc.report.compressed_kv_bytes - cc.report.kept_kv_bytes < page * L * 2 * H * per_pair
    assert cc.report.compressed_kv_bytes < cc.report.dense_kv_bytes

    # Four questions on context row 0, one on row 1: each (layer, question, head) needs its own pages for the
    # partial page + 5 question + 3 generated tokens; the context's full pages are not copied.
    questions = [[20 + i, 21, 22] for i in range(5)]
    rows = [0, 0, 0, 0, 1]
    slots = 3 + len(PROMPT.postfix_ids) + 3 - 1
    answers = cc.ask(params, questions, rows=rows, max_new_tokens=3)
    private = -(-(counts[:, rows] % page + slots) // page)
    assert cc.cache.k_pages.shape[0] >= pages.sum() + private.sum()
    assert cc.cache.k_pages.shape[0] < pages.sum() + private.sum() + 64 + pages.sum() // 4 + 1
    assert private.max() <= -(-(page - 1 + slots) // page)  # bounded by the question, not by the context
    plan = plan_questions(np.asarray(cc.cache.page_table), counts, np.array(rows), slots, page_size=page,
                          first_free=int(pages.sum()), pool_pages=int(pages.sum()))
    full = counts[:, rows] // page
    for idx in np.ndindex(full.shape):  # row r's first full pages are its context's very pages
        layer, r, h = idx
        np.testing.assert_array_equal(plan.page_table[idx][: full[idx]],
                                      np.asarray(cc.cache.page_table)[layer, rows[r], h][: full[idx]])
    assert plan.private_pages == private.sum()
    # The same questions one context row at a time give the same answers (rows do not interfere).
    for i, (q, r) in enumerate(zip(questions, rows, strict=True)):
        single = cc.ask(params, [q], rows=[r], max_new_tokens=3)
        assert single.tokens[0] == answers.tokens[i]
    assert cc.context_cache.k_pages.shape[0] == pages.sum()  # what is saved: the context alone
    assert cc.report.compressed_kv_bytes == pages.sum() * page * per_pair


# --------------------------------------------------------------------------------------------- Gemma3 (P15)
def test_p15_gemma_sliding_layers_keep_their_window(scored):
    config, _, _, sc = scored("gemma3")
    r = 0.3
    cc = sc.compress(r, headroom=HEADROOM)
    stored = read_paged(cc.cache)
    sliding = [i for i, t in enumerate(config.layer_types) if t == SLIDING]
    full = [i for i, t in enumerate(config.layer_types) if t == FULL]
    w = config.sliding_window
    for b, total in enumerate(totals()):
        for h in range(config.num_kv_heads):
            for layer in sliding:
                np.testing.assert_array_equal(stored[layer, b, h][0], np.arange(total - w + 1, total))
            for layer in full:
                assert (stored[layer, b, h][0][:N_SYS] == np.arange(N_SYS)).all()
        kept = sum(len(stored[layer, b, h][0]) - N_SYS for layer in full for h in range(config.num_kv_heads))
        n_pairs = len(full) * config.num_kv_heads * CTX_LENS[b]
        assert kept / n_pairs == pytest.approx(cc.report.kept_ratios[b], abs=1e-12)
        assert 0 < kept / n_pairs <= r


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_compress_and_ask_input(scored):
    _config, params, _, sc = scored("llama")
    for bad in (0, 0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            sc.compress(bad)
    with pytest.raises(ValueError, match="unknown selection level 'bogus'"):
        sc.compress(0.3, level="bogus")
    cc = sc.compress(0.3, headroom=HEADROOM)
    # 12 question ids + 2 postfix = 14 tokens, + 4 new tokens - 1 = 17 slots > headroom 16.
    with pytest.raises(ValueError, match=r"14 tokens.*max_new_tokens=4.*17 slots.*headroom is 16"):
        cc.ask(params, [list(range(20, 32))] * 2, max_new_tokens=4)
    cc.ask(params, [list(range(20, 29))] * 2, max_new_tokens=6)  # 9 + 2 + 6 - 1 = 16 slots: fits exactly
    with pytest.raises(ValueError, match="1 questions for 2 compressed contexts: ask one question per context row, "
                                         "or pass rows="):
        cc.ask(params, [[20, 21]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        cc.ask(params, [[20], [21]], max_new_tokens=0)
    with pytest.raises(ValueError, match="17 tokens exceed the decode headroom of 16"):
        cc.logits(params, [list(range(20, 37))] * 2)
    assert cc.logits(params, [list(range(20, 36))] * 2).shape[:2] == (2, 16)  # exactly the headroom: fits
    assert 0.0 <= cc.report.times["compact_s"] < 600.0  # a duration, not a clock reading
    with pytest.raises(ValueError, match=r"token id 999 .*vocabulary size is 128"):
        cc.ask(params, [[999], [20]], max_new_tokens=2)
    # Failed calls leave the compressed context usable and unchanged.
    np.testing.assert_array_equal(np.asarray(cc.cache.lengths), cc.base_lengths)


def test_prefill_checks_the_positions_that_follow_the_context_at_the_exact_limit(scored):
    """[prefix | context] plus `extra_positions` positions after the longest row must fit max_position_embeddings:
    positions 0 .. longest + extra - 1 exist exactly when longest + extra <= the limit (found by mutation testing:
    an off-by-one there passed every other test)."""
    config, params, ctxs, _ = scored("llama")
    longest, extra = N_SYS + max(CTX_LENS), 7
    fits = dataclasses.replace(config, max_position_embeddings=longest + extra)
    cache, _ = compressor.prefill_contexts(params, fits, PROMPT, ctxs, extra_slots=0, extra_positions=extra)
    assert int(np.asarray(cache.length).max()) == longest
    short = dataclasses.replace(config, max_position_embeddings=longest + extra - 1)
    with pytest.raises(ValueError, match=rf"position {longest + extra - 1} is beyond max_position_embeddings "
                                         rf"\({longest + extra - 1}\)"):
        compressor.prefill_contexts(params, short, PROMPT, ctxs, extra_slots=0, extra_positions=extra)



def test_pad_to_reproduces_the_full_cache_shape_and_bad_compaction_input(scored):
    """`shape_of` a ratio-1 compaction, passed as `pad_to`, gives every ratio the same pool shape (one compiled
    decode for a sweep); a keep mask of the wrong shape, or a page size < 1, is refused (found by mutation testing)."""
    from kvzip_jax.kvzip.compact import compact, plan_pages, shape_of

    _config, _params, _ctxs, sc = scored("llama")
    full = shape_of(sc.compress(1.0, headroom=HEADROOM).cache)
    small = sc.compress(0.3, headroom=HEADROOM).cache
    assert shape_of(small) != full  # without padding the pool shrinks
    padded = sc.compress(0.3, headroom=HEADROOM, pad_to=full).cache
    assert (padded.k_pages.shape[0], padded.page_table.shape[-1]) == full
    _, keep = sc.keep_mask(0.3)
    with pytest.raises(ValueError, match=r"keep mask has shape \(2, 2, 2, \d+\), expected \(2, 2, 2, \d+\)"):
        compact(sc.cache, keep[..., :-1], headroom=HEADROOM)
    table, num_pages = plan_pages(np.array([[3, 0]]), headroom=2, page_size=1)  # one slot per page is legal
    assert num_pages.tolist() == [[5, 2]] and table.shape == (1, 2, 5)
    with pytest.raises(ValueError, match="page_size must be >= 1, got 0"):
        plan_pages(np.array([[3]]), headroom=2, page_size=0)


def test_decode_cache_is_a_donatable_copy_that_decodes_like_the_context(scored):
    """`decode_cache` gives token-level loops a cache of their own: appending the questions to it gives the
    logits `CompressedContext.logits` gives, and donating it leaves the context usable."""
    config, params, _, sc = scored("llama")
    cc = sc.compress(0.3, headroom=HEADROOM)
    expected = cc.logits(params, QUESTIONS)
    work = cc.decode_cache(len(QUESTIONS[0]))
    toks = jnp.asarray(np.asarray(QUESTIONS, np.int32))
    positions = work.next_position[:, None] + jnp.arange(toks.shape[1], dtype=jnp.int32)[None, :]
    got, _ = compressor._logits_all(params, toks, positions, work, config=config)  # donates `work`
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cc.logits(params, QUESTIONS), expected)
