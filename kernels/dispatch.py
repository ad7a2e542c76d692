"""One dispatcher per op: checks the inputs once (shapes and dtypes are static under jit, so this costs nothing at
run time) and picks the backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.paged_attention import paged_attention_reference

BACKENDS = ("auto", "reference")


def _check_paged_inputs(q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions) -> None:
    if q.ndim != 5:
        raise ValueError(f"q must be [B, T, Hkv, G, D], got shape {q.shape}")
    b, t, hkv, _, d = q.shape
    if k_pages.shape != v_pages.shape or k_pages.ndim != 3:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be [N, page, D]")
    if k_pages.shape[2] != d:
        raise ValueError(f"head_dim of the pages ({k_pages.shape[2]}) does not match the queries ({d})")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages dtype {k_pages.dtype} differs from v_pages dtype {v_pages.dtype}")
    if pos_pages.shape != k_pages.shape[:2]:
        raise ValueError(f"pos_pages must be {k_pages.shape[:2]}, got {pos_pages.shape}")
    if page_table.ndim != 3 or page_table.shape[:2] != (b, hkv):
        raise ValueError(f"page_table must be [B={b}, Hkv={hkv}, P], got {page_table.shape}")
    if lengths.shape != (b, hkv):
        raise ValueError(f"lengths must be [B={b}, Hkv={hkv}], got {lengths.shape}")
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions must be [B={b}, T={t}], got {q_positions.shape}")
    for name, arr in (("page_table", page_table), ("lengths", lengths), ("q_positions", q_positions),
                      ("pos_pages", pos_pages)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {arr.dtype}")


def paged_attention(
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
    backend: str = "auto",
) -> jax.Array:
    """Attention of T new queries per row over a head-wise paged cache; see `paged_attention_reference`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    _check_paged_inputs(q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions)
    return paged_attention_reference(
        q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions, scale=scale, softcap=softcap,
        window=window,
    )
