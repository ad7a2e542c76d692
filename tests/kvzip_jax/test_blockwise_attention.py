"""The blockwise (online-softmax) attention used for multi-token steps over long caches (prefill chunks and KVzip
scoring, the cache read in place) equals the direct one, and long prefills through it keep parity with
transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.models.layers import attend, attend_blockwise


@pytest.mark.parametrize("mode", ["written", "aside"])
# window 50 is shorter than the new tokens themselves; block 32 gives several new-key blocks, the last one shifted.
@pytest.mark.parametrize("window,softcap,block", [(None, None, 256), (300, 5.0, 32), (50, None, 32)])
def test_blockwise_equals_writing_then_attending(mode, window, softcap, block):
    """Blockwise attention over a layer of a stacked cache, read in place, equals the direct masked attention
    after writing the new K/V at slots cache_len + t. "written": the new K/V are in the cache (prefill);
    "aside": they are passed as `new_kv` and never written (KVzip scoring). Several key blocks, rows of
    different lengths, and stale slots past what is visible hold NaN (they must not leak in)."""
    rng = np.random.default_rng(4)
    n_layers, b, t, hkv, g, d, s = 3, 2, 70, 2, 2, 16, 1100
    cache_len = np.array([1030, 400])
    layer = 1
    ck = rng.standard_normal((n_layers, b, hkv, s, d)).astype(np.float32)
    cv = rng.standard_normal((n_layers, b, hkv, s, d)).astype(np.float32)
    k_new = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v_new = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    slots = cache_len[:, None] + np.arange(t)[None, :]
    # Reference: the layer's visible cache with the new K/V written after it, then the plain masked attention.
    width = s + t
    keys, values = np.zeros((b, hkv, width, d), np.float32), np.zeros((b, hkv, width, d), np.float32)
    for row, n in enumerate(cache_len):
        keys[row, :, :n], values[row, :, :n] = ck[layer, row, :, :n], cv[layer, row, :, :n]
        keys[row, :, n : n + t] = k_new[row].transpose(1, 0, 2)
        values[row, :, n : n + t] = v_new[row].transpose(1, 0, 2)
        stale = n + t if mode == "written" else n
        if mode == "written":
            ck[:, row, :, n : n + t] = k_new[row].transpose(1, 0, 2)
            cv[:, row, :, n : n + t] = v_new[row].transpose(1, 0, 2)
        ck[:, row, :, stale:], cv[:, row, :, stale:] = np.nan, 1e30
    win = np.iinfo(np.int32).max if window is None else window
    key = np.arange(width)[None, None, :]
    mask = (key <= slots[:, :, None]) & (slots[:, :, None] - key < win)
    q = rng.standard_normal((b, t, hkv, g, d)).astype(np.float32)
    ref = attend(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(mask)[:, None], scale=0.25,
                 softcap=softcap)
    kv_len = slots[:, -1] + 1 if mode == "written" else cache_len
    new_kv = None if mode == "written" else (jnp.asarray(k_new), jnp.asarray(v_new))
    out = jax.jit(lambda *a: attend_blockwise(*a, new_kv=new_kv, scale=0.25, softcap=softcap, block=block))(
        jnp.asarray(q), jnp.asarray(ck), jnp.asarray(cv), jnp.int32(layer), jnp.asarray(slots, jnp.int32),
        jnp.asarray(kv_len, jnp.int32), jnp.int32(win),
    )
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("gemma3", dict(sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24)),
    ],
)
def test_long_prefill_parity_with_transformers(loaded_factory, hf_logits_fn, family, overrides):
    """A 700-token prompt: the cache is longer than one key block, so prefill goes through the blockwise path."""
    from kvzip_jax.cache import DenseKVCache
    from kvzip_jax.generate import prefill

    model, _, config, params = loaded_factory(family, max_position_embeddings=4096, **overrides)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, 700))
    ref = hf_logits_fn(model, tokens)
    last, _ = prefill(params, config, tokens.tolist(), DenseKVCache.zeros(config, 1, 704), chunk_size=256)
    assert np.abs(np.asarray(last)[0] - ref[0, -1]).max() <= 1e-4


def test_chunk_scores_blockwise_equals_single_block():
    """The two-pass scoring gives the same scores whatever the block size (several blocks, a shifted last one,
    short chunk and padded repeat rows in the second row)."""
    from kvzip_jax.config import ModelConfig
    from kvzip_jax.models.kv_attention import ScoreChunk, chunk_scores

    config = ModelConfig(family="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    rng = np.random.default_rng(3)
    b, t, s, n_sys, m = 2, 50, 200, 5, 40
    q = jnp.asarray(rng.standard_normal((b, t, 2, 2, 16)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((b, 2, s, 16)), jnp.float32)
    spec = ScoreChunk(chunk_start=jnp.asarray([0, 40], jnp.int32), chunk_len=jnp.asarray([40, 23], jnp.int32),
                      n_sys=n_sys, chunk_size=m)
    slots = jnp.asarray(np.stack([np.arange(t) + 120, np.arange(t) + 140]), jnp.int32)
    n_valid = jnp.asarray([50, 31], jnp.int32)
    repeat = jnp.take_along_axis(keys, slots[:, None, :, None], axis=2)
    args = (q, keys[None], jnp.int32(0), repeat, spec, n_valid)
    one = chunk_scores(*args, config, block=1024)
    many = jax.jit(lambda *a: chunk_scores(*a, config, block=16))(*args)
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), rtol=1e-5, atol=1e-7)
    assert np.asarray(one)[1, :, 23:].max() == 0.0 and np.asarray(one).min() >= 0.0
