"""MokA on the scanned decoder (spec section 7: 1 zero-init identity, 2 first-step gradients, 7 no label leakage,
9 batch independence, 10 decode equivalence and the text-path merge, 12 parameter counts) and its bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import ModelConfig
from kvzip_jax.generate import decode_step
from kvzip_jax.models import forward as base_forward
from kvzip_jax.models.llava import IMAGE, PAD, TEXT
from kvzip_jax.sharding import make_mesh, shard_params
from moka_jax import generate as moka_generate
from moka_jax.config import MokAConfig, model_param_count
from moka_jax.context import make_context
from moka_jax.model import (
    MOKA_LOGICAL_AXES,
    adapter_param_count,
    adapter_param_count_for,
    apply_moka,
    forward,
    merge_text_path,
    unmerge_text_path,
)
from tests.moka_jax.moka_testutil import adapter_leaves, layout, tiny_config, tiny_params, with_random_adapters

CONFIG = tiny_config()
BASE = tiny_params(CONFIG)


def embeds(ids: np.ndarray, seed: int = 7):
    return jax.random.normal(jax.random.key(seed), (*ids.shape, CONFIG.hidden_size))


def positions(ids: np.ndarray):
    return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


@functools.partial(jax.jit, static_argnames=("moka",))
def _logits(params, x, positions, ctx, moka):
    return forward(params, x, positions, None, config=CONFIG, moka=moka, context=ctx)[0]


def logits_of(params, moka, x, ids, keys, **kw):
    ctx = make_context(moka, ids, keys, **kw)
    return np.asarray(_logits(params, jnp.asarray(x), positions(ids), ctx, moka))


# One method per adapter layout (routed A + shared B with attention, routed A and B, parallel pairs): the
# adapter-level tests cover all six methods, and each compile here costs seconds.
@pytest.mark.xla_optimized  # bitwise equal to a different program: as the optimized compiler builds both (conftest)
@pytest.mark.parametrize("method", ["moka", "unimodal_lora", "multi_lora"])
def test_fresh_adapters_leave_the_model_unchanged(method):
    moka = MokAConfig(method=method)
    ids, keys, _ = layout()
    x = embeds(ids)
    adapted = apply_moka(BASE, CONFIG, moka, seed=3)
    base = np.asarray(base_forward(BASE, x, positions(ids), None, config=CONFIG)[0])
    np.testing.assert_array_equal(logits_of(adapted, moka, x, ids, keys), base)
    if method == "moka":  # dropout on (training mode): still the base model while B = 0
        np.testing.assert_array_equal(logits_of(adapted, moka, x, ids, keys, dropout_key=jax.random.key(0)), base)


def test_first_step_moves_only_b_and_every_a_gradient_is_zero():
    moka = MokAConfig()
    ids, keys, _ = layout()
    x = embeds(ids)
    targets = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, ids.shape))
    adapted = apply_moka(BASE, CONFIG, moka, seed=3)
    ctx = make_context(moka, ids, keys, dropout_key=jax.random.key(4))  # host-side: built before tracing

    @jax.jit  # run eagerly, the backward pass through the scanned layers dispatches op by op (~25 s on 2 cores)
    def grad_of(params, ctx):
        def loss(params):
            logits = forward(params, x, positions(ids), None, config=CONFIG, moka=moka, context=ctx)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return jax.grad(loss)(params)

    grads = grad_of(adapted, ctx)
    for name, g in adapter_leaves(grads).items():
        g = np.asarray(g)
        if name.endswith("lora_a"):
            assert np.all(g == 0.0), name
        else:
            assert np.abs(g).max() > 0, name
    tx = optax.adamw(1e-2, weight_decay=0.0)
    lora = adapter_leaves(adapted)
    lora_grads = adapter_leaves(grads)
    updates, _ = tx.update(lora_grads, tx.init(lora), lora)
    stepped = optax.apply_updates(lora, updates)
    for name in lora:
        same = np.array_equal(np.asarray(stepped[name]), np.asarray(lora[name]))
        assert same == name.endswith("lora_a"), name


def test_answers_never_reach_earlier_positions_but_the_question_reaches_the_image():
    moka = MokAConfig()
    ids, keys, answers = layout()
    adapted = with_random_adapters(apply_moka(BASE, CONFIG, moka))
    x = np.asarray(embeds(ids))
    base = logits_of(adapted, moka, x, ids, keys)
    for row in range(ids.shape[0]):
        first_answer = int(np.flatnonzero(answers[row])[0])
        changed = x.copy()
        changed[row, answers[row]] += 1.0
        got = logits_of(adapted, moka, changed, ids, keys)
        np.testing.assert_allclose(got[row, :first_answer], base[row, :first_answer], rtol=1e-5, atol=1e-5)
        first_key, first_image = int(np.flatnonzero(keys[row])[0]), int(np.flatnonzero(ids[row] == IMAGE)[0])
        changed = x.copy()
        changed[row, first_key] += 1.0
        got = logits_of(adapted, moka, changed, ids, keys)
        assert np.abs(got[row, first_image] - base[row, first_image]).max() > 1e-4  # documented non-causality


def test_each_row_alone_equals_the_batch():
    moka = MokAConfig()
    ids, keys, _ = layout()
    adapted = with_random_adapters(apply_moka(BASE, CONFIG, moka))
    x = embeds(ids)
    batch = logits_of(adapted, moka, x, ids, keys)
    for row in range(ids.shape[0]):
        alone = logits_of(adapted, moka, x[row : row + 1], ids[row : row + 1], keys[row : row + 1], max_keys=16)
        real = ids[row] != PAD
        np.testing.assert_allclose(alone[0][real], batch[row][real], rtol=1e-5, atol=1e-5)


def test_cached_decode_on_merged_weights_equals_full_recompute():
    moka = MokAConfig()
    ids, keys, _ = layout(batch=2, length=16)
    ids[:, 12:] = PAD  # both rows: a 12-token prompt, then 4 generated (teacher-forced) tokens
    ids[1, 10:] = PAD
    lengths = np.array([12, 10])
    adapted = with_random_adapters(apply_moka(BASE, CONFIG, moka))
    tokens = np.random.default_rng(1).integers(5, CONFIG.vocab_size, ids.shape).astype(np.int32)
    tokens[ids == IMAGE] = 0
    new = np.random.default_rng(2).integers(5, CONFIG.vocab_size, (2, 4)).astype(np.int32)

    ctx = make_context(moka, ids, keys)
    cache = DenseKVCache.zeros(CONFIG, 2, 20)
    first, cache = moka_generate.prefill(adapted, CONFIG, moka, tokens, lengths, ctx, cache)
    merged = merge_text_path(adapted, CONFIG, moka)
    stepped = [np.asarray(first)]
    for step in range(3):
        logits, cache = decode_step(merged, jnp.asarray(new[:, step]), cache, config=CONFIG)
        stepped.append(np.asarray(logits))

    # Full recompute: the prompt plus the fed tokens as plain (non-key) text.
    full_tokens = np.zeros((2, 15), np.int32)
    full_ids = np.full((2, 15), PAD, np.int8)
    full_keys = np.zeros((2, 15), bool)
    for b, n in enumerate(lengths):
        full_tokens[b, :n], full_tokens[b, n : n + 3] = tokens[b, :n], new[b, :3]
        full_ids[b, :n], full_ids[b, n : n + 3] = ids[b, :n], TEXT
        full_keys[b, :n] = keys[b, :n]
    full = logits_of(adapted, moka, full_tokens, full_ids, full_keys)
    for step, got in enumerate(stepped):
        want = full[np.arange(2), lengths - 1 + step]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # The unmerged text path gives the same decode logits, and unmerge restores the base kernels.
    text_path = forward(adapted, jnp.asarray(new[:, :1]), positions(new[:, :1]), None, config=CONFIG, moka=moka)[0]
    merged_path = base_forward(merged, jnp.asarray(new[:, :1]), positions(new[:, :1]), None, config=CONFIG)[0]
    np.testing.assert_allclose(np.asarray(text_path), np.asarray(merged_path), rtol=1e-5, atol=1e-5)
    restored = unmerge_text_path(merged, adapted, CONFIG, moka)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(BASE), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_generate_matches_greedy_recompute():
    moka = MokAConfig()
    ids, keys, _ = layout(batch=2, length=14)
    ids[1, 12:] = PAD
    lengths = np.array([14, 12])
    adapted = with_random_adapters(apply_moka(BASE, CONFIG, moka))
    tokens = np.random.default_rng(3).integers(5, CONFIG.vocab_size, ids.shape).astype(np.int32)
    out = moka_generate.generate(adapted, CONFIG, moka, tokens, lengths, make_context(moka, ids, keys),
                                 max_new_tokens=4, stop_token_ids=())
    # Recompute each step from scratch: prompt + tokens so far as plain text, right-padded to one shape.
    for b, n in enumerate(lengths):
        seq_tokens = np.zeros((1, 18), np.int32)
        seq_ids = np.full((1, 18), PAD, np.int8)
        seq_keys = np.zeros((1, 18), bool)
        seq_tokens[0, :n], seq_ids[0, :n], seq_keys[0, :n] = tokens[b, :n], ids[b, :n], keys[b, :n]
        for step, tok in enumerate(out.tokens[b]):
            want = int(np.argmax(logits_of(adapted, moka, seq_tokens, seq_ids, seq_keys)[0, n - 1 + step]))
            assert tok == want
            seq_tokens[0, n + step], seq_ids[0, n + step] = tok, TEXT


LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


@pytest.mark.parametrize(("method", "modalities", "millions"), [
    ("lora", ("text", "image"), 9.99), ("moka", ("text", "image"), 14.55), ("moka", ("text", "image", "audio"), 19.10),
    ("multi_lora", ("text", "image"), 19.99), ("multi_lora", ("text", "image", "audio"), 29.98),
])
def test_parameter_counts_on_the_llama2_7b_shape(method, modalities, millions):
    config = ModelConfig.from_hf_dict(LLAMA2_7B)
    moka = MokAConfig(method=method, modalities=modalities)
    count = adapter_param_count_for(config, moka)
    assert round(count / 1e6, 2) == millions
    shapes = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
    assert count == model_param_count(moka, shapes, 32)


def test_adapted_params_shard_over_a_mesh_with_the_same_logits():
    moka = MokAConfig()
    ids, keys, _ = layout()
    adapted = with_random_adapters(apply_moka(BASE, CONFIG, moka))
    x = embeds(ids)
    mesh = make_mesh(data=1, model=8)
    sharded = shard_params(adapted, mesh, table=MOKA_LOGICAL_AXES)
    # Sharded reductions add in another order: float32 rounding only.
    np.testing.assert_allclose(logits_of(sharded, moka, x, ids, keys), logits_of(adapted, moka, x, ids, keys),
                               rtol=1e-4, atol=5e-5)
    assert adapter_param_count(adapted) == adapter_param_count_for(CONFIG, moka)


# ------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    moka = MokAConfig(modalities=("text", "image"))
    ids, keys, _ = layout()
    with pytest.raises(ValueError, match=r"modality id 2 \(audio\) is not one of the configured"):
        make_context(moka, ids, keys)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        MokAConfig(rank=0)
    with pytest.raises(ValueError, match=r"rank 40 is larger than layers/attn/k_proj \(64 -> 32\)"):
        apply_moka(BASE, CONFIG, MokAConfig(rank=40))
    with pytest.raises(ValueError, match=r"match no linear module; the modules are \[.*layers/mlp/down_proj"):
        apply_moka(BASE, CONFIG, MokAConfig(target_modules=("query", "value")))
    bad_keys = keys.copy()
    bad_keys[0, np.flatnonzero(ids[0] == IMAGE)[0]] = True
    with pytest.raises(ValueError, match="key_mask marks position 1 of row 0"):
        make_context(MokAConfig(), ids, bad_keys)
    with pytest.raises(ValueError, match=r"row \d has \d question-key tokens, more than max_keys=1"):
        make_context(MokAConfig(), ids, keys, max_keys=1)
    with pytest.raises(ValueError, match="not among the modalities"):
        MokAConfig(text_modality="speech")
    with pytest.raises(ValueError, match="the context covers"):
        moka_generate.prefill(apply_moka(BASE, CONFIG, MokAConfig()), CONFIG, MokAConfig(), np.zeros((3, 5), np.int32),
                              [5, 5, 5], make_context(MokAConfig(), ids, keys), DenseKVCache.zeros(CONFIG, 3, 8))
