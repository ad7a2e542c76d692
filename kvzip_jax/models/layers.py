"""Building blocks of one decoder layer (single-layer shapes; the decoder stacks them on a leading axis)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvzip_jax.config import ModelConfig
from kvzip_kernels.logits import grouped_logits, stable_softmax, weighted_values

INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    return (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


# XLA:CPU (jaxlib 0.10) runs fp32 dots through YNNPACK, which sums each output over the whole contraction in one
# sequential pass: over down_proj's 1,536 inputs that rounds 3-6x worse than torch's blocked sgemm, and SmolLM2's
# logits drift 1.3e-4 from transformers'. Contractions longer than CPU_BLOCKED_ABOVE inputs run in blocks of
# CPU_CONTRACTION_BLOCK and add the partial sums. Shorter ones stay one dot: blocking every linear of ViT-B/16 cost
# 14% of its forward on a quiet machine, blocking only the long ones ~nothing. Other backends block dots themselves.
CPU_CONTRACTION_BLOCK = 256
CPU_BLOCKED_ABOVE = 1024


def contract_in_blocks(x: jax.Array, kernel: jax.Array, *, blocked: bool = True) -> jax.Array:
    """x [..., in] @ kernel [in, out]; on CPU, in blocks of CPU_CONTRACTION_BLOCK inputs when `in` is longer than
    CPU_BLOCKED_ABOVE (see above) and `blocked`."""
    d_in = kernel.shape[0]
    if not blocked or d_in <= max(CPU_BLOCKED_ABOVE, CPU_CONTRACTION_BLOCK) or jax.default_backend() != "cpu":
        return jnp.einsum("...i,io->...o", x, kernel)
    y = None
    for start in range(0, d_in, CPU_CONTRACTION_BLOCK):
        part = jnp.einsum("...i,io->...o", x[..., start : start + CPU_CONTRACTION_BLOCK],
                          kernel[start : start + CPU_CONTRACTION_BLOCK])
        y = part if y is None else y + part
    return y


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] (the transpose of torch's Linear.weight).

    A class of our own (not nnx.Linear) so adapters can subclass it: every call site passes the forward's
    `adapter_context` (per-token data such as MokA's modality ids and question-key mask); the base layer ignores it.
    `cpu_blocked` (a class attribute, not state): long contractions run in blocks on CPU (`contract_in_blocks`).
    """

    cpu_blocked = True

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: jax.Array, adapter_context=None) -> jax.Array:
        del adapter_context  # read by adapter subclasses only
        y = contract_in_blocks(x, self.kernel[...], blocked=self.cpu_blocked)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """RMSNorm in float32. Llama style: w * normed; Gemma style: normed * (1 + w), cast as transformers does."""

    def __init__(self, dim: int, *, eps: float, gemma: bool, dtype):
        self.eps = eps
        self.gemma = gemma
        self.scale = nnx.Param(jnp.zeros((dim,), dtype) if gemma else jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...] * normed.astype(x.dtype)


def rope_tables(config: ModelConfig, layer_type: str, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] in float32 for integer positions [B, T] (split-half layout, as transformers)."""
    inv_freq, scaling = config.rope_for(layer_type).inv_freq_and_scaling(config.head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * np.float32(scaling), jnp.sin(emb) * np.float32(scaling)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, D]; cos/sin [B, T, D]. Rotates the two halves, in x's dtype like transformers."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float, softcap: float | None,
    return_probs: bool = False,
):
    """Grouped-query attention without replicating K/V.

    q [B, T, Hkv, G, D]; k, v [B, Hkv, S, D]; mask [B, Hkv or 1, T, S] (True = may attend).
    Returns [B, T, Hkv, G, D] (and the float32 probabilities [B, Hkv, G, T, S] with `return_probs`).
    Logits and softmax in float32.
    """
    logits = grouped_logits(q, k, scale=scale, softcap=softcap)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = stable_softmax(logits)
    out = weighted_values(probs.astype(v.dtype), v)
    return (out, probs) if return_probs else out



def causal_self_attend(q: jax.Array, k: jax.Array, v: jax.Array, window, *, scale: float, softcap: float | None):
    """Attention of T tokens over themselves only (no cache): the training forward.

    q [B, T, Hkv, G, D]; k, v [B, T, Hkv, D] as the projections produce them. Causal, plus `window` for sliding
    layers. One plain masked softmax: differentiable, and at training lengths the [T, T] logits are small."""
    t = q.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < window)  # [T, S]
    keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return attend(q, keys, values, mask[None, None], scale=scale, softcap=softcap)

class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, gemma=c.gemma_norms, dtype=dtype)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, gemma=c.gemma_norms, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array, adapter_context=None):
        """x [B, T, H] -> q [B, T, Hkv, G, D], k and v [B, T, Hkv, D] with norms and RoPE applied."""
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x, adapter_context).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x, adapter_context).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x, adapter_context).reshape(b, t, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.reshape(b, t, c.num_kv_heads, c.num_groups, c.head_dim), k, v

    def output(self, attn_out: jax.Array, adapter_context=None) -> jax.Array:
        b, t = attn_out.shape[:2]
        return self.o_proj(attn_out.reshape(b, t, -1), adapter_context)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        self.gelu = c.hidden_act == "gelu_pytorch_tanh"
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, adapter_context=None) -> jax.Array:
        gate = self.gate_proj(x, adapter_context)
        gate = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return self.down_proj(gate * self.up_proj(x, adapter_context), adapter_context)


KEY_BLOCK = 512  # keys per block of the blockwise (online-softmax) attention


def _online_softmax_step(q, kb, vb, ok, carry, *, scale: float, softcap: float | None, ok_score=None,
                         touches_score=True):
    """One key block of an online softmax. q [B, Hkv, G, T, D] (heads first); kb, vb [B, Hkv, block, D]; ok
    broadcastable to [B, Hkv, G, T, block]; carry (running max, denominator [B, Hkv, G, T], numerator
    [B, Hkv, G, T, D]).

    With `ok_score` (a subset of `ok`) the carry also holds those keys' share of the denominator, scaled by the
    same running max: a second softmax over a subset of the keys, for one masked sum. `touches_score` (a traced
    bool) skips that sum for blocks with no such key."""
    m, denom, acc = carry[:3]
    neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(ok, grouped_logits(q, kb, scale=scale, softcap=softcap, heads_first=True), neg)
    m_new = jnp.maximum(m, logits.max(axis=-1))
    p = jnp.where(ok, jnp.exp(logits - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    denom = denom * correction + p.sum(axis=-1)
    acc = acc * correction[..., None] + jnp.einsum("bhgts,bhsd->bhgtd", p.astype(vb.dtype), vb,
                                                   preferred_element_type=jnp.float32)
    if ok_score is None:
        return m_new, denom, acc
    denom_score = carry[3] * correction
    denom_score = jax.lax.cond(touches_score, lambda: denom_score + jnp.where(ok_score, p, 0.0).sum(axis=-1),
                               lambda: denom_score)
    return m_new, denom, acc, denom_score


def _online_softmax_init(q: jax.Array, with_score: bool = False):
    b, t, hkv, g, d = q.shape
    zero = jnp.zeros((b, hkv, g, t), jnp.float32)
    base = (jnp.full((b, hkv, g, t), jnp.finfo(jnp.float32).min, jnp.float32), zero,
            jnp.zeros((b, hkv, g, t, d), jnp.float32))
    return (*base, zero) if with_score else base


def _online_softmax_output(carry, q: jax.Array) -> jax.Array:
    _, denom, acc = carry[:3]
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)


class ScoreSetStats(NamedTuple):
    """KVzip's [system | chunk | repeat] softmax, accumulated by the attention loop, per query row [B, Hkv, G, T]:
    its log-sum-exp, and its denominator relative to the attention's running max (tiny when every score-set
    logit lies far below that max: the shared scaling may then have underflowed and the caller recomputes)."""

    lse: jax.Array
    relative_denominator: jax.Array


def attend_blockwise(
    q: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    layer: jax.Array,
    q_slots: jax.Array,
    kv_len: jax.Array,
    window: jax.Array | int,
    *,
    new_kv: tuple[jax.Array, jax.Array] | None = None,
    score_set: tuple[int, jax.Array, jax.Array] | None = None,
    scale: float,
    softcap: float | None,
    block: int = KEY_BLOCK,
):
    """Blockwise (online-softmax) attention over a layer of the stacked dense cache, read in place.

    Query t of row b sits at slot q_slots[b, t]; cache slot s is visible to it when s < kv_len[b], s <= its slot
    and slot - s < window. With `new_kv` = (k, v) [B, T, Hkv, D], the T queries also attend to these keys of their
    own, not written anywhere, as if stored at their query slots (causal, windowed): KVzip's scoring forward reads
    the context this way and is then forgotten. Prefill writes its K/V first and passes None.

    `score_set` = (n_sys, chunk_start [B], chunk_len [B]) also accumulates KVzip's chunk-local softmax over
    [cache slots < n_sys | the chunk's slots | all new keys] in the same loop (it must be a subset of what the
    queries see: full-attention layers) and returns (out, ScoreSetStats).

    Each key block is sliced straight out of the stacked [L, B, Hkv, S, D] arrays at `layer`, and the cache only
    passes through the loops unmodified, so XLA copies no part of it: the temporaries are [B, Hkv, G, T, block]
    whatever the context length. q [B, T, Hkv, G, D]; q_slots [B, T]; kv_len [B]. Returns [B, T, Hkv, G, D].
    """
    _, b, hkv, s, d = cache_k.shape
    t = q.shape[1]
    cache_block = min(block, s)
    qp = q_slots[:, None, None, :, None]  # [B, 1, 1, T, 1]
    q_heads_first = q.transpose(0, 2, 3, 1, 4)  # once, not in every block's dot
    visible_len = kv_len[:, None, None, None, None]

    def cache_step(j, carry):
        # The last block is shifted left to stay in bounds; columns it shares with the previous block are masked.
        start = jnp.minimum(j * cache_block, s - cache_block)
        kp = (start + jnp.arange(cache_block, dtype=jnp.int32))[None, None, None, None, :]
        where = (layer, 0, 0, start, 0)
        kb = jax.lax.dynamic_slice(cache_k, where, (1, b, hkv, cache_block, d))[0].astype(q.dtype)
        vb = jax.lax.dynamic_slice(cache_v, where, (1, b, hkv, cache_block, d))[0].astype(q.dtype)
        ok = (kp < visible_len) & (kp <= qp) & (qp - kp < window) & (kp >= j * cache_block)
        ok_score, touches = None, True
        if score_set is not None:
            n_sys, chunk_start, chunk_len = score_set
            first = n_sys + chunk_start[:, None, None, None, None]
            ok_score = ok & ((kp < n_sys) | ((kp >= first) & (kp < first + chunk_len[:, None, None, None, None])))
            # Most cache blocks hold no system or chunk slot: they skip the score sum.
            chunk_lo, chunk_hi = n_sys + chunk_start, n_sys + chunk_start + chunk_len
            touches = (start < n_sys) | jnp.any((start < chunk_hi) & (start + cache_block > chunk_lo))
        return _online_softmax_step(q_heads_first, kb, vb, ok, carry, scale=scale, softcap=softcap, ok_score=ok_score,
                                    touches_score=touches)

    # Blocks past every row's visible slots (and every query) are never read.
    last = jnp.minimum(jnp.max(kv_len), jnp.max(q_slots) + 1)
    n_cache_blocks = jnp.minimum(-(-last // cache_block), -(-s // cache_block))
    carry = jax.lax.fori_loop(0, n_cache_blocks, cache_step, _online_softmax_init(q, score_set is not None))
    if new_kv is not None:
        new_block = min(block, t)
        keys, values = (x.transpose(0, 2, 1, 3) for x in new_kv)  # [B, Hkv, T, D]: O(T) copies
        rows = jnp.arange(t, dtype=jnp.int32)[None, None, None, :, None]

        def new_step(j, carry):
            start = jnp.minimum(j * new_block, t - new_block)
            kp = (start + jnp.arange(new_block, dtype=jnp.int32))[None, None, None, None, :]
            kb = jax.lax.dynamic_slice_in_dim(keys, start, new_block, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(values, start, new_block, axis=2)
            ok = (kp <= rows) & (rows - kp < window) & (kp >= j * new_block)
            ok_score = None if score_set is None else ok
            return _online_softmax_step(q_heads_first, kb, vb, ok, carry, scale=scale, softcap=softcap,
                                        ok_score=ok_score)

        carry = jax.lax.fori_loop(0, -(-t // new_block), new_step, carry)
    out = _online_softmax_output(carry, q)
    if score_set is None:
        return out
    m, _, _, denom_score = carry
    lse = m + jnp.log(jnp.where(denom_score > 0, denom_score, 1.0))
    return out, ScoreSetStats(lse=lse, relative_denominator=denom_score)
