"""Per-layer "write the new K/V into the cache, then attend" for each cache form, and KVzip's chunk scoring.

The decoder scans over layers and calls one of these with the layer's slice of the cache state; they return the
attention output and the updated cache state (and, when asked, the KVzip scores of the chunk being repeated).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels import paged_attention
from kvzip_jax.config import ModelConfig
from kvzip_jax.models.layers import KEY_BLOCK, attend, attend_blockwise


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreChunk:
    """Which context chunk a KVzip scoring forward reconstructs (context-relative, per row).

    The dense cache holds [system prefix (n_sys slots) | context]; the forward's new tokens are the repeat input.
    """

    chunk_start: jax.Array  # int32 [B]: first context position of the chunk
    chunk_len: jax.Array  # int32 [B]: tokens in the chunk (0 for rows with no chunk at this step)
    n_sys: int = dataclasses.field(metadata=dict(static=True))
    chunk_size: int = dataclasses.field(metadata=dict(static=True))


SCORE_BLOCK = 256  # key columns per block of the two-pass scoring


def chunk_scores(
    q: jax.Array,
    keys: jax.Array,
    spec: ScoreChunk,
    repeat_slots: jax.Array,
    n_valid: jax.Array,
    config: ModelConfig,
    block: int = SCORE_BLOCK,
) -> jax.Array:
    """KVzip importance of the chunk's pairs in one layer (official `_get_score`, in float32).

    q [B, T, Hkv, G, D] are the repeat-input queries (post-RoPE); keys [B, Hkv, S, D] the layer's cache with the
    repeat keys already written at `repeat_slots` [B, T]. The softmax runs over [system | chunk | repeat] keys only,
    causal inside the repeat block; the score of a chunk pair is its max probability over the G query heads of its
    group and all valid repeat rows. The scale and soft cap are the model's own (query_pre_attn_scalar for Gemma3),
    not a hard-coded 1/sqrt(d). Returns [B, Hkv, chunk_size], zero past each row's chunk length.

    Computed blockwise in two passes so that no [T, n_sys + m + T] matrix exists (memory independent of the chunk
    size squared): pass 1 accumulates each row's log-sum-exp over blocks of `block` keys; pass 2 revisits only the
    chunk's columns and takes max_rows exp(logit - lse).
    """
    b, t = q.shape[:2]
    m, n_sys, s = spec.chunk_size, spec.n_sys, keys.shape[2]
    chunk_idx = n_sys + spec.chunk_start[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :]  # [B, m]

    def gather(idx):  # idx [B, n] -> [B, Hkv, n, D]
        return jnp.take_along_axis(keys, jnp.clip(idx, 0, s - 1)[:, None, :, None], axis=2)

    # The subsampled keys are O(m) rows: a copy of them is cheap; their logits are what must stay blockwise.
    subsampled = jnp.concatenate([keys[:, :, :n_sys], gather(chunk_idx), gather(repeat_slots)], axis=2)
    width = subsampled.shape[2]
    block = min(block, width)
    rows = jnp.arange(t, dtype=jnp.int32)
    row_ok = rows[None, :] < n_valid[:, None]  # [B, T]
    scale, cap = np.float32(config.attn_scale), config.attn_logit_softcap
    neg = jnp.finfo(jnp.float32).min

    def block_logits(start):
        """Logits [B, Hkv, G, T, block] of columns start..start+block and their validity [B, 1, 1, T, block]."""
        cols = start + jnp.arange(block, dtype=jnp.int32)
        kb = jax.lax.dynamic_slice_in_dim(subsampled, start, block, axis=2)
        logits = jnp.einsum("bthgd,bhsd->bhgts", q, kb, preferred_element_type=jnp.float32) * scale
        if cap is not None:
            logits = jnp.tanh(logits / np.float32(cap)) * np.float32(cap)
        in_chunk = (cols >= n_sys) & (cols < n_sys + m)
        chunk_ok = in_chunk[None, None, :] & ((cols - n_sys)[None, None, :] < spec.chunk_len[:, None, None])
        rep = cols - n_sys - m  # repeat key index
        repeat_ok = (rep[None, None, :] >= 0) & (rep[None, None, :] <= rows[None, :, None]) & (
            rep[None, None, :] < n_valid[:, None, None]
        )
        ok = (cols < n_sys)[None, None, :] | chunk_ok | repeat_ok  # [B, T, block]
        ok = ok & row_ok[:, :, None]
        return logits, ok[:, None, None]

    def lse_step(j, carry):
        mx, total = carry
        start = jnp.minimum(j * block, width - block)
        logits, ok = block_logits(start)
        fresh = (start + jnp.arange(block))[None, None, None, None, :] >= j * block  # skip overlapped columns
        ok = ok & fresh
        logits = jnp.where(ok, logits, neg)
        new_mx = jnp.maximum(mx, logits.max(axis=-1))
        total = total * jnp.exp(mx - new_mx) + jnp.where(ok, jnp.exp(logits - new_mx[..., None]), 0.0).sum(-1)
        return new_mx, total

    shape = q.shape[:1] + (q.shape[2], q.shape[3], t)
    mx, total = jax.lax.fori_loop(
        0, -(-width // block), lse_step, (jnp.full(shape, neg, jnp.float32), jnp.zeros(shape, jnp.float32))
    )
    lse = mx + jnp.log(jnp.where(total > 0, total, 1.0))

    chunk_block = min(block, m)

    def max_step(j, scores):
        start = jnp.minimum(j * chunk_block, m - chunk_block)
        cols = n_sys + start + jnp.arange(chunk_block, dtype=jnp.int32)
        kb = jax.lax.dynamic_slice_in_dim(subsampled, n_sys + start, chunk_block, axis=2)
        logits = jnp.einsum("bthgd,bhsd->bhgts", q, kb, preferred_element_type=jnp.float32) * scale
        if cap is not None:
            logits = jnp.tanh(logits / np.float32(cap)) * np.float32(cap)
        ok = ((cols - n_sys)[None, None, :] < spec.chunk_len[:, None, None]) & row_ok[:, :, None]
        probs = jnp.where(ok[:, None, None], jnp.exp(logits - lse[..., None]), 0.0)
        return jax.lax.dynamic_update_slice_in_dim(scores, probs.max(axis=(2, 3)), start, axis=2)

    scores = jnp.zeros((b, q.shape[2], m), jnp.float32)
    return jax.lax.fori_loop(0, -(-m // chunk_block), max_step, scores)


def observed_attention(probs: jax.Array, n_valid: jax.Array, reduce: str) -> jax.Array:
    """Attention each cached pair received from the valid new queries: probs [B, Hkv, G, T, S] reduced over the
    G query heads of its group and the T rows by "mean" (SnapKV) or "max" (H2O). Returns [B, Hkv, S]."""
    row_ok = (jnp.arange(probs.shape[3])[None, :] < n_valid[:, None])[:, None, None, :, None]
    if reduce == "max":
        return jnp.where(row_ok, probs, 0.0).max(axis=(2, 3))
    total = jnp.where(row_ok, probs, 0.0).sum(axis=(2, 3))
    return total / (probs.shape[2] * jnp.maximum(n_valid, 1))[:, None, None]


def dense_write_attend(
    q, k, v, ck, cv, layer, slots, window, config: ModelConfig, n_valid, score: ScoreChunk | None,
    observe: str | None = None,
):
    """Dense cache: scatter the T new K/V of every row into its slots, attend over the layer's slots (causal by
    slot, and `window` for sliding layers). Multi-token steps over a cache longer than one key block use the
    blockwise attention, whose memory does not grow with the cache.

    Optionally also returns per-pair scores: KVzip chunk scores (`score`) or the attention the cached pairs
    received from the new queries (`observe` = "mean" | "max", for the SnapKV / H2O baselines)."""
    batch_idx = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
    ck = ck.at[layer, batch_idx, :, slots].set(k.astype(ck.dtype), mode="drop")
    cv = cv.at[layer, batch_idx, :, slots].set(v.astype(cv.dtype), mode="drop")
    keys, values = ck[layer].astype(q.dtype), cv[layer].astype(q.dtype)
    scale, softcap = config.attn_scale, config.attn_logit_softcap
    if observe is None and q.shape[1] > 1 and keys.shape[2] > KEY_BLOCK:
        out = attend_blockwise(q, keys, values, slots, window, scale=scale, softcap=softcap)
        scores = None if score is None else chunk_scores(q, keys, score, slots, n_valid, config)
        return out, ck, cv, scores
    key_slots = jnp.arange(keys.shape[2], dtype=jnp.int32)[None, None, :]
    mask = (key_slots <= slots[:, :, None]) & (slots[:, :, None] - key_slots < window)  # [B, T, S]
    if observe is not None:
        out, probs = attend(q, keys, values, mask[:, None], scale=scale, softcap=softcap, return_probs=True)
        return out, ck, cv, observed_attention(probs, n_valid, observe)
    out = attend(q, keys, values, mask[:, None], scale=scale, softcap=softcap)
    scores = None if score is None else chunk_scores(q, keys, score, slots, n_valid, config)
    return out, ck, cv, scores


def paged_write_attend(q, k, v, pages, table, num_pages, lengths, q_positions, n_valid, window, config: ModelConfig):
    """Head-wise paged cache: append the valid new K/V at the end of each head sequence, then paged attention.

    pages = (k_pages, v_pages, pos_pages); table [B, Hkv, P], num_pages and lengths [B, Hkv] are this layer's.
    Appends that would pass a head's allocated pages are dropped here; the host API refuses them before.
    """
    k_pages, v_pages, pos_pages = pages
    n_total, page = k_pages.shape[:2]
    b, t = q.shape[:2]
    steps = jnp.arange(t, dtype=jnp.int32)
    index = lengths[:, :, None] + steps[None, None, :]  # [B, Hkv, T]: position in the head sequence
    slot_page = index // page
    page_id = jnp.take_along_axis(table, jnp.clip(slot_page, 0, table.shape[-1] - 1), axis=2)
    ok = (slot_page < num_pages[:, :, None]) & (steps[None, None, :] < n_valid[:, None, None])
    page_id = jnp.where(ok, page_id, n_total)  # out of range: the scatter drops it
    offset = index % page
    k_pages = k_pages.at[page_id, offset].set(k.transpose(0, 2, 1, 3).astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page_id, offset].set(v.transpose(0, 2, 1, 3).astype(v_pages.dtype), mode="drop")
    pos = jnp.broadcast_to(q_positions[:, None, :], index.shape)
    pos_pages = pos_pages.at[page_id, offset].set(pos, mode="drop")
    new_lengths = jnp.minimum(lengths + n_valid[:, None], num_pages * page)
    out = paged_attention(
        q, k_pages, v_pages, pos_pages, table, new_lengths, q_positions, scale=config.attn_scale,
        softcap=config.attn_logit_softcap, window=window,
    )
    return out, (k_pages, v_pages, pos_pages), new_lengths
