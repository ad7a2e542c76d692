"""The grouped-query attention logits every jnp attention path shares (reference kernels and the model's own)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def grouped_logits(q: jax.Array, keys: jax.Array, *, scale: float, softcap: float | None) -> jax.Array:
    """q [B, T, Hkv, G, D], keys [B, Hkv, S, D] -> float32 logits [B, Hkv, G, T, S]: scaled, then soft-capped
    (tanh(x / cap) * cap, as Gemma) when `softcap` is set. K/V are never replicated over the G query heads."""
    logits = jnp.einsum("bthgd,bhsd->bhgts", q, keys, preferred_element_type=jnp.float32) * np.float32(scale)
    if softcap is not None:
        logits = jnp.tanh(logits / np.float32(softcap)) * np.float32(softcap)
    return logits
