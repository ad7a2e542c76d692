"""Invariants of one adapted linear's term (spec section 7: 4 routing, 5 reductions, 6 text invariance, 8 key
permutation, 9 batch and padding independence, 13 init), on random data with non-zero A and B."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.models.llava import AUDIO, IMAGE, PAD, TEXT
from moka_jax.adapter import adapter_delta, masked_softmax, text_path_delta
from moka_jax.config import METHODS, MokAConfig
from moka_jax.context import make_context
from tests.moka_jax.moka_testutil import layout

D_IN, D_OUT, R = 24, 16, 4


def weights(config: MokAConfig, seed: int = 0):
    ka, kb = jax.random.split(jax.random.key(seed))
    a = 0.5 * jax.random.normal(ka, (config.num_a, D_IN, config.rank))
    b = 0.5 * jax.random.normal(kb, (config.num_b, config.rank, D_OUT))
    return a, b


def inputs(batch: int, length: int, seed: int = 3):
    return jax.random.normal(jax.random.key(seed), (batch, length, D_IN))


def delta(config, x, ids, keys, a, b, **kw):
    return np.asarray(adapter_delta(x, a, b, make_context(config, ids, keys, **kw), config))


@pytest.mark.parametrize("method", METHODS)
def test_padding_gets_no_adapter_term_and_nothing_is_nan(method):
    config = MokAConfig(method=method, dropout=0.0)
    ids, keys, _ = layout()
    x = inputs(*ids.shape)
    a, b = weights(config)
    out = delta(config, x, ids, keys, a, b)
    assert np.isfinite(out).all()
    assert np.all(out[ids == PAD] == 0.0)
    assert np.abs(out[ids != PAD]).min(axis=-1).max() > 0


def test_text_only_input_is_lora_with_the_text_matrices():
    moka = MokAConfig(dropout=0.0)
    lora = MokAConfig(method="lora", dropout=0.0)
    ids = np.full((2, 9), TEXT, np.int8)
    keys = np.zeros_like(ids, bool)
    keys[:, 2:5] = True
    x = inputs(2, 9)
    a, b = weights(moka)
    got = delta(moka, x, ids, keys, a, b)
    want = delta(lora, x, ids, keys, a[moka.text_index][None], b)
    # Same math, different association (terms up to ~25): float32 rounding only.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(text_path_delta(x, a, b, moka)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["lambda zero", "no keys"])
def test_without_attention_moka_is_per_modality_a_and_shared_b(how):
    moka = MokAConfig(dropout=0.0, cross_attn_weight=0.0 if how == "lambda zero" else 1.0)
    no_ca = MokAConfig(method="moka_no_ca", dropout=0.0)
    ids, keys, _ = layout()
    if how == "no keys":
        keys = np.zeros_like(keys)
    x = inputs(*ids.shape)
    a, b = weights(moka)
    np.testing.assert_allclose(delta(moka, x, ids, keys, a, b), delta(no_ca, x, ids, keys, a, b), rtol=1e-6,
                               atol=1e-6)


def test_tied_a_matrices_without_attention_are_lora():
    no_ca = MokAConfig(method="moka_no_ca", dropout=0.0)
    lora = MokAConfig(method="lora", dropout=0.0)
    ids, keys, _ = layout()
    x = inputs(*ids.shape)
    a, b = weights(lora)
    tied = jnp.repeat(a, len(no_ca.modalities), axis=0)
    np.testing.assert_allclose(delta(no_ca, x, ids, keys, tied, b), delta(lora, x, ids, keys, a, b), rtol=1e-6,
                               atol=1e-6)


def test_a_row_without_keys_adds_nothing_and_has_finite_gradients():
    config = MokAConfig(dropout=0.0)
    ids, keys, _ = layout()
    keys[0] = False
    x = inputs(*ids.shape)
    a, b = weights(config)
    ctx = make_context(config, ids, keys)
    no_ca = MokAConfig(method="moka_no_ca", dropout=0.0)
    np.testing.assert_allclose(np.asarray(adapter_delta(x, a, b, ctx, config))[0],
                               delta(no_ca, x, ids, keys, a, b)[0], rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda a, b: adapter_delta(x, a, b, ctx, config).sum(), argnums=(0, 1))(a, b)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_masked_softmax_of_an_empty_row_is_zero_with_zero_gradient():
    logits = jnp.array([[1e4, -1e4, 3.0], [-5e3, -5e3, -5e3]])
    valid = jnp.array([[False, False, False], [True, False, True]])
    p = masked_softmax(logits, valid)
    np.testing.assert_array_equal(np.asarray(p[0]), 0.0)
    np.testing.assert_allclose(np.asarray(p[1]), [0.5, 0.0, 0.5])
    g = jax.grad(lambda z: (masked_softmax(z, valid) * jnp.arange(3.0)).sum())(logits)
    assert np.isfinite(np.asarray(g)).all()


def test_text_positions_depend_only_on_their_own_token():
    config = MokAConfig(dropout=0.0)
    ids, keys, _ = layout()
    x = inputs(*ids.shape)
    a, b = weights(config)
    base = delta(config, x, ids, keys, a, b)
    text = ids == TEXT
    noise = jax.random.normal(jax.random.key(9), x.shape)
    changed = jnp.where(jnp.asarray(text)[..., None], x, x + noise)  # every non-text token changes
    got = delta(config, changed, ids, keys, a, b)
    np.testing.assert_allclose(got[text], base[text], rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[ids == IMAGE], base[ids == IMAGE])


def test_queries_see_the_question_and_nothing_else():
    config = MokAConfig(dropout=0.0)
    ids, keys, answers = layout()
    x = inputs(*ids.shape)
    a, b = weights(config)
    base = delta(config, x, ids, keys, a, b)
    media = (ids == IMAGE) | (ids == AUDIO)
    for changed_where, should_change in ((answers, False), (keys, True)):
        noise = jax.random.normal(jax.random.key(5), x.shape)
        changed = jnp.where(jnp.asarray(changed_where)[..., None], x + noise, x)
        got = delta(config, changed, ids, keys, a, b)
        assert np.allclose(got[media], base[media], rtol=1e-6, atol=1e-6) != should_change


def test_key_order_does_not_matter():
    config = MokAConfig(dropout=0.0)
    ids, keys, _ = layout()
    x = np.asarray(inputs(*ids.shape))
    a, b = weights(config)
    base = delta(config, x, ids, keys, a, b)
    permuted = x.copy()
    for row in range(ids.shape[0]):
        where = np.flatnonzero(keys[row])
        permuted[row, where] = x[row, where[::-1]]
    got = delta(config, permuted, ids, keys, a, b)
    media = (ids == IMAGE) | (ids == AUDIO)
    np.testing.assert_allclose(got[media], base[media], rtol=1e-5, atol=1e-6)


def test_rows_are_independent_of_each_other_and_of_padding():
    config = MokAConfig(dropout=0.0)
    ids, keys, _ = layout()
    x = np.asarray(inputs(*ids.shape))
    a, b = weights(config)
    batch = delta(config, x, ids, keys, a, b)
    for row in range(ids.shape[0]):
        alone = delta(config, x[row : row + 1], ids[row : row + 1], keys[row : row + 1], a, b, max_keys=24)
        np.testing.assert_allclose(alone[0], batch[row], rtol=1e-6, atol=1e-6)
        # Left padding and extra padding: the real tokens' terms are unchanged (the adapter has no positions).
        pad = 5
        left_ids = np.concatenate([np.full((1, pad), PAD, np.int8), ids[row : row + 1]], axis=1)
        left_keys = np.concatenate([np.zeros((1, pad), bool), keys[row : row + 1]], axis=1)
        left_x = np.concatenate([np.random.default_rng(row).normal(size=(1, pad, D_IN)), x[row : row + 1]], axis=1)
        left = delta(config, jnp.asarray(left_x, jnp.float32), left_ids, left_keys, a, b)[0, pad:]
        real = ids[row] != PAD
        np.testing.assert_allclose(left[real], batch[row][real], rtol=1e-6, atol=1e-6)


def test_a_matrix_gets_gradient_only_from_its_own_tokens_and_text_also_from_keys():
    config = MokAConfig(dropout=0.0)
    ids, keys, _ = layout()
    no_audio = ids.copy()
    no_audio[no_audio == AUDIO] = TEXT
    x = inputs(*ids.shape)
    a, b = weights(config)
    audio = config.modalities.index("audio")
    text = config.text_index

    def grad_a(ids, keys, rows=None):
        ctx = make_context(config, ids, keys)
        weight = jnp.ones(ids.shape) if rows is None else jnp.asarray(rows, jnp.float32)
        return np.asarray(jax.grad(lambda a: (adapter_delta(x, a, b, ctx, config).sum(-1) * weight).sum())(a))

    assert np.all(grad_a(no_audio, keys)[audio] == 0.0)
    assert np.abs(grad_a(ids, keys)[audio]).max() > 0
    # Only the image tokens' outputs in the loss: A_text still learns, through the keys and values.
    image_only = grad_a(ids, keys, rows=(ids == IMAGE))
    assert np.abs(image_only[text]).max() > 0


@pytest.mark.parametrize("how", ["torch_kaiming", "he_uniform"])
def test_initialisation_matches_peft_bounds(how):
    from moka_jax.model import _init_a

    d_in = 4096
    a = np.asarray(_init_a(jax.random.key(0), (3, d_in, 8), d_in, how))
    bound = 1 / np.sqrt(d_in) if how == "torch_kaiming" else np.sqrt(6 / d_in)
    assert np.abs(a).max() <= bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.02 * bound  # uniform(-bound, bound)


def test_dropout_is_reproducible_per_key_and_off_without_one():
    config = MokAConfig(dropout=0.5)
    ids, keys, _ = layout()
    x = inputs(*ids.shape)
    a, b = weights(config)
    ctx = make_context(config, ids, keys)
    plain = np.asarray(adapter_delta(x, a, b, ctx, config))
    first = np.asarray(adapter_delta(x, a, b, ctx.with_dropout(jax.random.key(1)), config))
    again = np.asarray(adapter_delta(x, a, b, ctx.with_dropout(jax.random.key(1)), config))
    other = np.asarray(adapter_delta(x, a, b, ctx.with_dropout(jax.random.key(2)), config))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, plain) and not np.allclose(first, other)
    np.testing.assert_allclose(plain, delta(config.replace(dropout=0.0), x, ids, keys, a, b), rtol=1e-6)
