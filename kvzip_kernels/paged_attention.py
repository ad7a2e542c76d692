"""Decode attention over a head-wise paged KV cache: the jnp reference (the oracle and the CPU path).

Every (row, kv head) is its own ragged sequence of `lengths[b, h]` pairs stored in the pages its table row lists.
The G query heads of a group attend to it together (no K/V replication). Masks come from the stored positions:
a query at position p sees stored pairs with position <= p (and p - position < window for sliding layers), so
T >= 1 new tokens are causal among themselves once they are written to the pages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvzip_kernels.logits import grouped_logits, stable_softmax, weighted_values


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    pos_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    precision: jax.lax.Precision | None = None,
) -> jax.Array:
    """q [B, T, Hkv, G, D]; k/v_pages [N, page, D]; pos_pages [N, page]; page_table [B, Hkv, P];
    lengths [B, Hkv]; q_positions [B, T]. Returns [B, T, Hkv, G, D] in q's dtype.

    Reads all P table entries (work proportional to the table, not to the kept pairs: this is the oracle, the
    fast kernels read only the pages that hold pairs). Pairs past a head's length are masked in the logits and
    zeroed in the values, so whatever unused pages hold (even NaN) cannot leak into the output.
    """
    b, hkv, p = page_table.shape
    page = k_pages.shape[1]
    keys = k_pages[page_table].reshape(b, hkv, p * page, -1).astype(q.dtype)
    values = v_pages[page_table].reshape(b, hkv, p * page, -1)
    key_pos = pos_pages[page_table].reshape(b, hkv, p * page)
    stored = jnp.arange(p * page, dtype=jnp.int32)[None, None, :] < lengths[:, :, None]  # [B, Hkv, S]
    qpos = q_positions[:, None, :, None]  # [B, 1, T, 1]
    kpos = key_pos[:, :, None, :]  # [B, Hkv, 1, S]
    mask = stored[:, :, None, :] & (kpos <= qpos)
    if window is not None:
        mask = mask & (qpos - kpos < window)
    logits = grouped_logits(q, keys, scale=scale, softcap=softcap, precision=precision)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = stable_softmax(logits).astype(values.dtype)
    values = jnp.where(stored[..., None], values, jnp.zeros((), values.dtype))
    return weighted_values(probs, values, precision).astype(q.dtype)
