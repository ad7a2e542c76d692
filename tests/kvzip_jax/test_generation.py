"""Prefill + decode against one full forward, greedy generation against transformers, stops, sampling, donation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.generate import (
    SamplingConfig,
    _generation_loop,
    _prefill_chunk,
    decode_step,
    generate,
    prefill,
    sample,
)

ATOL = 1e-4
GEMMA_SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24)
# Per family, a config whose greedy continuations are varied (Gemma3 with tied, sqrt(hidden)-scaled embeddings
# just repeats the last token, so its generation case unties them and adds the final soft cap).
GEN_CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3", dict(GEMMA_SLIDING, tie_word_embeddings=False, final_logit_softcapping=3.0)),
}
PROMPTS = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12, 13, 100, 101]]
MAX_NEW = 16


# --------------------------------------------------------------------------- (a) prefill + decode
@pytest.mark.parametrize("family,overrides", [("llama", {}), ("gemma3", GEMMA_SLIDING)], ids=["llama", "gemma3"])
def test_chunked_prefill_then_decode_equals_full_forward(family, overrides, loaded_factory, ours_logits_fn):
    _, _, config, params = loaded_factory(family, **overrides)
    total, prompt_len = 14, 9  # 5 decode steps; the window (4) is shorter than the sequence for gemma3
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, total))
    full = ours_logits_fn(params, config, tokens)  # [2, total, V]
    assert np.std(full, axis=1).mean() > 0.1
    for chunk in (2, 4, prompt_len):  # 2 and 4 do not divide 9
        cache = DenseKVCache.zeros(config, 2, total)
        logits, cache = prefill(params, config, tokens[:, :prompt_len].tolist(), cache, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(logits), full[:, prompt_len - 1], atol=ATOL, rtol=0)
        assert np.asarray(cache.length).tolist() == [prompt_len, prompt_len]
        for t in range(prompt_len, total):
            logits, cache = decode_step(params, jnp.asarray(tokens[:, t], jnp.int32), cache, config=config)
            diff = np.abs(np.asarray(logits) - full[:, t]).max()
            assert diff <= ATOL, f"chunk {chunk}, decode position {t}: max |diff| {diff:.3g}"
        assert np.asarray(cache.length).tolist() == [total, total]
    # A cache with exactly prompt + 1 slots: the last chunk's right padding (slots 10, 11) falls off the end.
    cache = DenseKVCache.zeros(config, 2, prompt_len + 1)
    logits, cache = prefill(params, config, tokens[:, :prompt_len].tolist(), cache, chunk_size=4)
    np.testing.assert_allclose(np.asarray(logits), full[:, prompt_len - 1], atol=ATOL, rtol=0)
    logits, cache = decode_step(params, jnp.asarray(tokens[:, prompt_len], jnp.int32), cache, config=config)
    np.testing.assert_allclose(np.asarray(logits), full[:, prompt_len], atol=ATOL, rtol=0)


def test_ragged_batch_equals_rows_alone(loaded_factory):
    _, _, config, params = loaded_factory("gemma3", **GEMMA_SLIDING)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7]]
    feed = np.array([[11, 22], [33, 44], [55, 66]], np.int32)  # 3 decode steps, one token per row each
    cache = DenseKVCache.zeros(config, 2, 16)
    logits, cache = prefill(params, config, prompts, cache, chunk_size=4)  # row 0 has no tokens in chunk 3
    batch = [np.asarray(logits)]
    for step in feed:
        logits, cache = decode_step(params, jnp.asarray(step), cache, config=config)
        batch.append(np.asarray(logits))
    assert np.asarray(cache.length).tolist() == [5 + 3, 9 + 3]
    for row, prompt in enumerate(prompts):
        alone = DenseKVCache.zeros(config, 1, 16)
        logits, alone = prefill(params, config, [prompt], alone, chunk_size=4)
        rows = [np.asarray(logits)]
        for step in feed:
            logits, alone = decode_step(params, jnp.asarray(step[row : row + 1]), alone, config=config)
            rows.append(np.asarray(logits))
        for i, (b, a) in enumerate(zip(batch, rows, strict=True)):
            diff = np.abs(b[row] - a[0]).max()
            assert diff <= ATOL, f"row {row}, step {i}: batched vs alone max |diff| {diff:.3g}"


# --------------------------------------------------------------------------- (b) greedy vs transformers
def _hf_greedy(model, prompt, max_new_tokens):
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_greedy_generate_matches_transformers(case, loaded_factory):
    family, overrides = GEN_CASES[case]
    model, _, config, params = loaded_factory(family, **overrides)
    result = generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[])
    for row, prompt in enumerate(PROMPTS):
        ref = _hf_greedy(model, prompt, MAX_NEW)
        assert len(ref) == MAX_NEW
        assert len(set(ref)) > 2, f"reference continuation {ref} is too uniform for the test to mean anything"
        assert result.tokens[row] == ref, f"row {row}: ours {result.tokens[row]} vs transformers {ref}"
    assert result.finished == [False, False]


# --------------------------------------------------------------------------- (c) EOS / stop tokens
def _truncate_at(tokens, stop):
    return tokens[: tokens.index(stop) + 1] if stop in tokens else tokens


def test_stop_tokens_end_rows_independently(loaded_factory):
    _, _, config, params = loaded_factory("llama")
    base = generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[]).tokens
    a, b = base
    # A stop token that ends row 0 early, and row 1 somewhere else (or never).
    stop = next(t for t in a[1:-2] if (b.index(t) if t in b else None) != a.index(t))
    result = generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[stop])
    expected = [_truncate_at(a, stop), _truncate_at(b, stop)]
    assert result.tokens == expected
    assert len(result.tokens[0]) < MAX_NEW
    assert result.finished == [stop in a, stop in b]
    # A finished row stops advancing its cache: it holds the prompt and every generated token but the last.
    lengths = [len(p) + len(t) - 1 for p, t in zip(PROMPTS, result.tokens, strict=True)]
    assert np.asarray(result.cache.length).tolist() == lengths

    # The config's EOS ids are the default stop set.
    eos_config = dataclasses.replace(config, eos_token_ids=(stop,))
    by_eos = generate(params, eos_config, PROMPTS, max_new_tokens=MAX_NEW)
    assert by_eos.tokens == expected and by_eos.finished == result.finished

    # Two stop ids: each row ends at the first one it produces; when all rows are done the loop ends early.
    stops = [a[1], b[1]]
    both = generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=stops)
    for row, toks in enumerate(base):
        end = min(toks.index(s) for s in stops if s in toks)
        assert both.tokens[row] == toks[: end + 1]
    assert both.finished == [True, True]


# --------------------------------------------------------------------------- (d) sampling
@pytest.fixture(scope="module")
def logits():
    return jax.random.normal(jax.random.key(42), (4, 128)) * 3.0


def test_sampling_is_deterministic_by_seed(logits):
    cfg = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9)
    keys = jax.random.split(jax.random.key(0), 64)
    draw = jax.vmap(lambda k: sample(logits, k, cfg))
    first, again = np.asarray(draw(keys)), np.asarray(draw(keys))
    np.testing.assert_array_equal(first, again)
    other = np.asarray(draw(jax.random.split(jax.random.key(1), 64)))
    assert (first != other).any()
    assert len(np.unique(first[:, 0])) > 1  # really sampling, not argmax


def test_top_k_one_and_tiny_top_p_are_greedy(logits):
    greedy = np.asarray(jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.key(0), SamplingConfig())), greedy)
    for cfg in (SamplingConfig(temperature=1.5, top_k=1), SamplingConfig(temperature=1.5, top_p=1e-6)):
        draws = jax.vmap(lambda k, cfg=cfg: sample(logits, k, cfg))(jax.random.split(jax.random.key(3), 32))
        np.testing.assert_array_equal(np.asarray(draws), np.broadcast_to(greedy, draws.shape))


def test_samples_stay_in_top_k_and_top_p_sets(logits):
    k = 5
    draws = np.asarray(
        jax.vmap(lambda key: sample(logits, key, SamplingConfig(temperature=2.0, top_k=k)))(
            jax.random.split(jax.random.key(7), 256)
        )
    )
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    for row in range(logits.shape[0]):
        assert set(draws[:, row].tolist()) <= set(top[row].tolist())
        assert len(set(draws[:, row].tolist())) > 1
    # top-p: probs [0.5, 0.3, 0.15, 0.05] with top_p=0.7 keep exactly tokens {0, 1}.
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    draws = np.asarray(
        jax.vmap(lambda key: sample(jnp.log(probs), key, SamplingConfig(temperature=1.0, top_p=0.7)))(
            jax.random.split(jax.random.key(8), 256)
        )
    )
    assert set(draws[:, 0].tolist()) == {0, 1}


def test_generate_sampling_seeded_and_top_k_one_is_greedy(loaded_factory):
    _, _, config, params = loaded_factory("llama")
    hot = SamplingConfig(temperature=1.0)
    one = generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, sampling=hot, stop_token_ids=[], seed=0)
    two = generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, sampling=hot, stop_token_ids=[], seed=0)
    other = generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, sampling=hot, stop_token_ids=[], seed=1)
    assert one.tokens == two.tokens
    assert one.tokens != other.tokens
    greedy = generate(params, config, PROMPTS, max_new_tokens=MAX_NEW, stop_token_ids=[])
    assert one.tokens != greedy.tokens
    top1 = generate(
        params, config, PROMPTS, max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=1.0, top_k=1),
        stop_token_ids=[], seed=5,
    )
    assert top1.tokens == greedy.tokens


# --------------------------------------------------------------------------- (e) donation, compile once
def test_decode_step_and_prefill_donate_the_cache(loaded_factory):
    _, _, config, params = loaded_factory("llama")
    cache = DenseKVCache.zeros(config, 2, 12)
    _, new = prefill(params, config, PROMPTS, cache, chunk_size=4)
    assert cache.k.is_deleted() and cache.v.is_deleted()
    _, newer = decode_step(params, jnp.array([1, 2], jnp.int32), new, config=config)
    assert new.k.is_deleted() and new.v.is_deleted()
    assert not newer.k.is_deleted()
    assert np.asarray(newer.length).tolist() == [6, 10]


def test_generation_compiles_once_for_repeated_shapes(loaded_factory):
    _, _, config, params = loaded_factory("llama")
    first = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    second = [[9, 8, 7, 6, 5, 4], [3, 2, 1]]  # different tokens and lengths, same padded shape
    generate(params, config, first, max_new_tokens=6, chunk_size=4, seed=0)
    sizes = (_generation_loop._cache_size(), _prefill_chunk._cache_size(), decode_step._cache_size())
    for seed in (1, 2):
        generate(params, config, second, max_new_tokens=6, chunk_size=4, seed=seed)
    assert (_generation_loop._cache_size(), _prefill_chunk._cache_size(), decode_step._cache_size()) == sizes
