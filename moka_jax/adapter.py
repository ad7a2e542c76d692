"""The adapter term of one adapted linear, vectorised over the batch (spec sections 1.2-1.4, 1.8).

    h = W0 x + delta(x),  delta(x) = s * B(A_m(i) x_i + lambda_m * softmax(q k^T / sqrt(r)) k)   (MokA, paper form)

All A matrices of a linear are applied in one matmul ([B, T, in] x [n_a, in, r]); each token keeps its own
modality's code through a one-hot contraction; the question keys are gathered into a static [B, K, r] buffer and
every token attends to them with a masked softmax (text tokens have lambda 0, so their codes stay unchanged).
The adapter runs in its parameters' dtype (float32 by default) whatever the activations' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moka_jax.config import MokAConfig
from moka_jax.context import MokAContext


def masked_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax over the last axis among `valid` entries; a row with none is all zeros (no NaN, no NaN gradient)."""
    any_valid = valid.any(axis=-1, keepdims=True)
    peak = jnp.where(any_valid, jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1, keepdims=True), 0.0)
    peak = jax.lax.stop_gradient(peak)
    # Invalid entries sit exactly at the peak before exp (exp(0) = 1, then zeroed): nothing overflows anywhere.
    e = jnp.where(valid, jnp.exp(jnp.where(valid, logits, peak) - peak), 0.0)
    return e / jnp.maximum(e.sum(axis=-1, keepdims=True), jnp.finfo(e.dtype).tiny)


def _mix32(h: jax.Array) -> jax.Array:
    """The lowbias32 integer hash (a bijection on uint32 with good avalanche)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout with a counter-based hash mask: two threefry words seed a hash of each element's index.
    `jax.random.bernoulli` over [B, T, in] cost ~25x this on CPU, more than the adapter itself, in every one of the
    seven adapted linears of every layer. (Indices wrap past 2^32 elements per call: the mask pattern repeats.)"""
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in range(x.ndim - 1, -1, -1):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= x.shape[axis]
    bits = _mix32(_mix32(index ^ seeds[0]) + seeds[1])
    keep = bits >= jnp.uint32(min(round(rate * 2.0**32), (1 << 32) - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def text_path_delta(x: jax.Array, a: jax.Array, b: jax.Array, config: MokAConfig) -> jax.Array:
    """The adapter term of text tokens with dropout off: s * x A_text B (what a generated token gets)."""
    x = x.astype(a.dtype)
    if config.a_mode == "parallel":
        z = jnp.einsum("...i,nir->...nr", x, a)
        return config.scaling * jnp.einsum("...nr,nro->...o", z, b)
    return config.scaling * ((x @ text_a(a, config)) @ text_b(b, config))


def text_a(a: jax.Array, config: MokAConfig) -> jax.Array:
    return a[..., config.text_index if config.a_mode == "routed" else 0, :, :]


def text_b(b: jax.Array, config: MokAConfig) -> jax.Array:
    return b[..., config.text_index if config.b_mode == "routed" else 0, :, :]


def text_path_weight(a: jax.Array, b: jax.Array, config: MokAConfig) -> jax.Array:
    """s * A_text B as one [..., in, out] matrix: the text path folded into a base kernel."""
    if config.a_mode == "parallel":
        return config.scaling * jnp.einsum("...nir,...nro->...io", a, b)
    return config.scaling * (text_a(a, config) @ text_b(b, config))


def adapter_delta(
    x: jax.Array, a: jax.Array, b: jax.Array, context: MokAContext | None, config: MokAConfig, salt: int = 0
) -> jax.Array:
    """x [B, T, in]; a [n_a, in, r]; b [n_b, r, out] (one layer's slice). Returns the adapter term [B, T, out] in
    the adapter dtype. `context` None: every token is text (decode steps), dropout off. `salt` makes each adapted
    linear draw its own dropout mask."""
    if context is None:
        return text_path_delta(x, a, b, config)
    x = x.astype(a.dtype)
    if config.dropout > 0.0 and context.dropout_key is not None:
        key = context.dropout_key if context.layer is None else jax.random.fold_in(context.dropout_key, context.layer)
        x = _dropout(x, config.dropout, jax.random.fold_in(key, salt))
    s = config.scaling
    adapted = context.adapted[..., None].astype(a.dtype)  # padding and inactive modalities get no adapter term
    route = jax.nn.one_hot(context.slot, len(config.modalities), dtype=a.dtype)
    codes = jnp.einsum("bti,nir->btnr", x, a)  # every A on every token: r is tiny, one matmul beats gathers
    if config.a_mode == "parallel":  # multiple LoRA: every pair on every token
        return s * jnp.einsum("btnr,nro->bto", codes, b) * adapted
    if config.a_mode == "routed":
        z = jnp.einsum("btnr,btn->btr", codes, route)
        text_codes = codes[:, :, config.text_index]
    else:
        z = text_codes = codes[:, :, 0]
    if config.scale_before_attention:  # the AVT code: s right after A, so the attention sees scaled codes
        z, text_codes = s * z, s * text_codes
    if config.cross_attention:
        # A one-hot [B, K, T] matmul, not a gather: its gradient is a matmul too (a scatter is slow on CPU).
        keys = jnp.einsum("bkt,btr->bkr", context.key_select.astype(a.dtype), text_codes)  # [B, K, r]
        logits = jnp.einsum("btr,bkr->btk", z, keys)
        if config.attn_scale == "sqrt_rank":
            logits = logits / jnp.sqrt(jnp.asarray(config.rank, a.dtype))
        else:  # the AVT code until 2025-12-28: sqrt of the row's number of question tokens
            logits = logits / jnp.sqrt(jnp.maximum(context.num_keys, 1).astype(a.dtype))[:, None, None]
        probs = masked_softmax(logits, context.key_valid[:, None, :])
        attended = jnp.einsum("btk,bkr->btr", probs, keys)
        z = z + context.query_weight[..., None].astype(a.dtype) * attended
    if config.b_mode == "routed":
        y = jnp.einsum("btnr,nro->bto", z[:, :, None, :] * route[..., None], b)
    else:
        y = z @ b[0]
    return (y if config.scale_before_attention else s * y) * adapted
