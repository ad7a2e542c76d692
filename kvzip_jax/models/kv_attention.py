"""Per-layer "write the new K/V into the cache, then attend" for each cache form, and KVzip's chunk scoring.

The decoder scans over layers and calls one of these with the layer's slice of the cache state; they return the
attention output and the updated cache state (and, when asked, the KVzip scores of the chunk being repeated).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.config import ModelConfig
from kvzip_jax.models.layers import KEY_BLOCK, attend, attend_blockwise
from kvzip_kernels import kvzip_scores, kvzip_scores_backend, kvzip_scores_from_lse, paged_attention
from kvzip_kernels.backend import REFERENCE


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


def gather_cache_rows(cache_k: jax.Array, layer: jax.Array, rows: jax.Array) -> jax.Array:
    """Keys of one layer at per-row slots, read from the stacked [L, B, Hkv, S, D] cache in place (one gather, no
    copy of the layer): rows [B, n] -> [B, Hkv, n, D]. Slots past the cache are clipped; callers mask them."""
    batch_idx = jnp.arange(rows.shape[0], dtype=jnp.int32)[:, None]
    return cache_k[layer, batch_idx, :, jnp.clip(rows, 0, cache_k.shape[3] - 1)].transpose(0, 2, 1, 3)


def chunk_scores(
    q: jax.Array,
    cache_k: jax.Array,
    layer: jax.Array,
    repeat_keys: jax.Array,
    spec: ScoreChunk,
    n_valid: jax.Array,
    config: ModelConfig,
    block: int | None = None,
    backend: str | None = None,
) -> jax.Array:
    """KVzip importance of the chunk's pairs in one layer (official `_get_score`, in float32).

    q [B, T, Hkv, G, D] are the repeat-input queries (post-RoPE); cache_k [L, B, Hkv, S, D] the stacked, read-only
    cache holding [system | context] (only the system and chunk rows of `layer` are gathered: O(chunk), never a
    layer's whole cache); repeat_keys [B, Hkv, T, D] the repeat input's own keys. The softmax runs over
    [system | chunk | repeat] keys only, causal inside the repeat block; the score of a chunk pair is its max
    probability over the G query heads of its group and all valid repeat rows. The scale and soft cap are the
    model's own (query_pre_attn_scalar for Gemma3), not a hard-coded 1/sqrt(d). Returns [B, Hkv, chunk_size],
    zero past each row's chunk length.

    The math is `kvzip_kernels.kvzip_scores` (two passes, no [T, n_sys + m + T] matrix; a fused Pallas kernel on GPU /
    TPU). `block` overrides its key block size (None: the backend's default); `backend` its choice (None: the
    `kvzip_kernels.use_backend` context, "auto" by default).
    """
    m, n_sys = spec.chunk_size, spec.n_sys
    rows = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(n_sys, dtype=jnp.int32), (q.shape[0], n_sys)),
        n_sys + spec.chunk_start[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :],
    ], axis=1)  # [B, n_sys + m]; a short last chunk's tail is clipped in the gather and masked by chunk_len
    context = gather_cache_rows(cache_k, layer, rows)  # [B, Hkv, n_sys + m, D]
    keys = jnp.concatenate([context.astype(q.dtype), repeat_keys.astype(q.dtype)], axis=2)
    return kvzip_scores(
        q, keys, n_sys=n_sys, chunk_len=spec.chunk_len, n_valid=n_valid, scale=config.attn_scale,
        softcap=config.attn_logit_softcap, backend=backend, block_keys=block,
    )


# Fused scores are recomputed exactly when a row's [system | chunk | repeat] denominator, relative to its attention
# max, falls below exp(-60): then every score-set logit lies more than ~60 below that max and the shared scaling
# may have lost terms to float32 underflow (exp(-87) is the smallest normal). Above it the largest term is at
# most ~69 below the max (a few thousand keys), still a normal float32, and what underflows is negligible.
FUSED_SCORE_MIN_DENOMINATOR = float(np.exp(-60.0))


def dense_score_attend(q, k, v, ck, cv, layer, cache_len, window, config: ModelConfig, n_valid, score: ScoreChunk):
    """KVzip's scoring forward in one layer: the repeat input attends over [cached system | context | itself] and
    scores the chunk's pairs, reading the cache in place and writing nothing to it (so no rollback, no copy of a
    layer's cache, and temporaries bounded by the chunk). Returns (attention output, scores [B, Hkv, m]).

    The repeat K/V go through the cache dtype first, exactly as if they had been written to it and read back.
    On the jnp reference backend (CPU) the attention loop also accumulates the score softmax's log-sum-exp (its
    keys are a subset of what a full-attention layer sees), so only the second pass over the chunk's m keys is
    left; a Pallas backend runs its own fused two-pass kernel. Sliding-window layers are never scored (KVzip
    evicts only full-attention layers): their scores are zeros on every backend.
    """
    k = k.astype(ck.dtype).astype(q.dtype)
    v = v.astype(cv.dtype).astype(q.dtype)
    t = q.shape[1]
    slots = cache_len[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    kw = dict(new_kv=(k, v), scale=config.attn_scale, softcap=config.attn_logit_softcap)
    full_layer = window >= jnp.iinfo(jnp.int32).max
    if kvzip_scores_backend() != REFERENCE:
        out = attend_blockwise(q, ck, cv, layer, slots, cache_len, window, **kw)
        scores = chunk_scores(q, ck, layer, k.transpose(0, 2, 1, 3), score, n_valid, config)
        return out, jnp.where(full_layer, scores, 0.0)
    score_set = (score.n_sys, score.chunk_start, score.chunk_len)
    out, stats = attend_blockwise(q, ck, cv, layer, slots, cache_len, window, score_set=score_set, **kw)
    row_ok = (jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None])[:, None, None, :]  # [B, 1, 1, T]
    exact_enough = jnp.all(jnp.where(row_ok, stats.relative_denominator >= FUSED_SCORE_MIN_DENOMINATOR, True))

    def from_lse():
        rows = score.n_sys + score.chunk_start[:, None] + jnp.arange(score.chunk_size, dtype=jnp.int32)[None, :]
        chunk_keys = gather_cache_rows(ck, layer, rows)
        return kvzip_scores_from_lse(q, chunk_keys.astype(q.dtype), stats.lse, chunk_len=score.chunk_len,
                                     n_valid=n_valid, scale=config.attn_scale, softcap=config.attn_logit_softcap)

    def two_pass():
        return chunk_scores(q, ck, layer, k.transpose(0, 2, 1, 3), score, n_valid, config)

    def not_fused():  # sliding layers skip scoring (their window may hide part of the score set)
        no_scores = jnp.zeros((q.shape[0], q.shape[2], score.chunk_size), jnp.float32)
        return jax.lax.cond(full_layer, two_pass, lambda: no_scores)

    scores = jax.lax.cond(full_layer & exact_enough, from_lse, not_fused)
    return out, scores


def observed_attention(probs: jax.Array, n_valid: jax.Array, reduce: str) -> jax.Array:
    """Attention each cached pair received from the valid new queries: probs [B, Hkv, G, T, S] reduced over the
    G query heads of its group and the T rows by "mean" (SnapKV) or "max" (H2O). Returns [B, Hkv, S]."""
    row_ok = (jnp.arange(probs.shape[3])[None, :] < n_valid[:, None])[:, None, None, :, None]
    if reduce == "max":
        return jnp.where(row_ok, probs, 0.0).max(axis=(2, 3))
    total = jnp.where(row_ok, probs, 0.0).sum(axis=(2, 3))
    return total / (probs.shape[2] * jnp.maximum(n_valid, 1))[:, None, None]


def dense_write_attend(q, k, v, ck, cv, layer, slots, window, config: ModelConfig, n_valid, observe: str | None = None):
    """Dense cache: scatter the T new K/V of every row into its slots, attend over the layer's slots (causal by
    slot, and `window` for sliding layers). Multi-token steps over a cache longer than one key block use the
    blockwise attention over the cache in place, whose memory does not grow with the cache.

    Optionally also returns the attention the cached pairs received from the new queries (`observe` = "mean" |
    "max", for the SnapKV / H2O baselines); else None in its place."""
    batch_idx = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
    scale, softcap = config.attn_scale, config.attn_logit_softcap
    ck = ck.at[layer, batch_idx, :, slots].set(k.astype(ck.dtype), mode="drop")
    cv = cv.at[layer, batch_idx, :, slots].set(v.astype(cv.dtype), mode="drop")
    if observe is None and q.shape[1] > 1 and ck.shape[3] > KEY_BLOCK:
        # Written first, then read in place: no copy of the layer's cache, so a prefill chunk's temporaries do
        # not grow with the context.
        out = attend_blockwise(q, ck, cv, layer, slots, slots[:, -1] + 1, window, scale=scale, softcap=softcap)
        return out, ck, cv, None
    keys, values = ck[layer].astype(q.dtype), cv[layer].astype(q.dtype)
    key_slots = jnp.arange(keys.shape[2], dtype=jnp.int32)[None, None, :]
    mask = (key_slots <= slots[:, :, None]) & (slots[:, :, None] - key_slots < window)  # [B, T, S]
    if observe is not None:
        out, probs = attend(q, keys, values, mask[:, None], scale=scale, softcap=softcap, return_probs=True)
        return out, ck, cv, observed_attention(probs, n_valid, observe)
    return attend(q, keys, values, mask[:, None], scale=scale, softcap=softcap), ck, cv, None


def paged_write_attend(q, k, v, pages, table, num_pages, lengths, q_positions, n_valid, window, config: ModelConfig):
    """Head-wise paged cache: append the valid new K/V at the end of each head sequence, then paged attention.

    pages = (k_pages, v_pages, pos_pages); table [B, Hkv, P], num_pages and lengths [B, Hkv] are this layer's.
    Appends that would pass a head's allocated pages are dropped here; the host API refuses them before.
    """
    k_pages, v_pages, pos_pages = pages
    n_total, page = k_pages.shape[:2]
    t = q.shape[1]
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
