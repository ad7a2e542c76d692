"""Compaction: a dense working cache + a keep mask -> the head-wise paged cache that holds only the kept pairs.

Page allocation is decided on the host (a one-off per context: the pool size must be concrete); the gather and
scatter of the pairs run on the device. Kept pairs stay in position order inside each head sequence, keep their
original positions, and are bit-identical to their prefill values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.cache import DenseKVCache, PagedKVCache

DEFAULT_PAGE_SIZE = 16


def plan_pages(counts: np.ndarray, headroom: int, page_size: int, min_table_width: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per head sequence: pages for its kept pairs + `headroom` appended tokens. Returns (page_table, num_pages);
    the table is at least `min_table_width` entries wide (unused entries point at page 0 and are never read)."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if headroom < 0:
        raise ValueError(f"headroom must be >= 0, got {headroom}")
    num_pages = np.maximum(-(-(counts + headroom) // page_size), 1).astype(np.int32)
    first = np.concatenate([[0], np.cumsum(num_pages.ravel())[:-1]]).reshape(num_pages.shape)
    steps = np.arange(max(int(num_pages.max()), min_table_width), dtype=np.int32)
    table = np.where(steps < num_pages[..., None], first[..., None] + steps, 0).astype(np.int32)
    return table, num_pages


def compact(
    cache: DenseKVCache, keep: np.ndarray, *, headroom: int, page_size: int = DEFAULT_PAGE_SIZE,
    pad_to: tuple[int, int] | None = None,
) -> PagedKVCache:
    """Copy the pairs where `keep [L, B, Hkv, S_cap]` is True into a new paged pool with `headroom` free slots
    per head sequence for the tokens that questions and answers will append.

    The pool is exactly as large as the kept pairs need (page rounding and headroom aside), so its shape changes
    with the ratio and every new shape compiles the decode step again. `pad_to = (pool pages, table width)`
    allocates at least that much (e.g. `shape_of` a ratio-1.0 compaction of the same contexts), so compressions of
    one batch at many ratios share one compiled shape: for sweeps, at the cost of the memory saving."""
    keep = np.asarray(keep, bool)
    num_layers, batch, heads, capacity, _ = cache.k.shape
    if keep.shape != (num_layers, batch, heads, capacity):
        raise ValueError(f"keep mask has shape {keep.shape}, expected {(num_layers, batch, heads, capacity)}")
    beyond = np.arange(capacity)[None, :] >= np.asarray(jax.device_get(cache.length))[:, None]  # [B, S]
    if (keep & beyond[None, :, None, :]).any():
        raise ValueError("the keep mask selects slots beyond a row's cache length")
    counts = keep.sum(-1).astype(np.int32)
    min_pages, min_width = pad_to or (0, 0)
    table, num_pages = plan_pages(counts, headroom, page_size, min_width)
    n_pages = max(int(num_pages.sum()), min_pages)
    # Pool index of the j-th stored pair of each head sequence: page table[j // page_size], slot j % page_size.
    j = np.arange(capacity)
    page_of = np.take_along_axis(
        table, np.broadcast_to(np.minimum(j // page_size, table.shape[-1] - 1), keep.shape), axis=-1
    )
    pool_index = page_of * page_size + j % page_size
    dest = np.maximum(np.cumsum(keep, axis=-1) - 1, 0)  # order-preserving rank of each kept pair
    target = np.where(keep, np.take_along_axis(pool_index, dest, axis=-1), n_pages * page_size)
    return _build_pool(cache, jnp.asarray(target.astype(np.int32)), n_pages, page_size, table, num_pages, counts)


def shape_of(cache: PagedKVCache) -> tuple[int, int]:
    """(pool pages, page-table width) of a compacted cache: the `pad_to` that reproduces its shape."""
    return int(cache.k_pages.shape[0]), int(cache.page_table.shape[-1])


@functools.partial(jax.jit, static_argnames=("n_pages", "page_size"))
def _scatter_pool(k, v, target, *, n_pages: int, page_size: int):
    """Scatter every dense pair to its pool index (`target`; out of range = evicted, dropped). One compile per
    pool shape, not per call."""
    dim, size = k.shape[-1], n_pages * page_size
    flat_target = target.reshape(-1)
    k_pool = jnp.zeros((size, dim), k.dtype).at[flat_target].set(k.reshape(-1, dim), mode="drop")
    v_pool = jnp.zeros((size, dim), v.dtype).at[flat_target].set(v.reshape(-1, dim), mode="drop")
    positions = jnp.broadcast_to(jnp.arange(k.shape[3], dtype=jnp.int32), target.shape).reshape(-1)
    pos_pool = jnp.full((size,), -1, jnp.int32).at[flat_target].set(positions, mode="drop")
    return (k_pool.reshape(n_pages, page_size, dim), v_pool.reshape(n_pages, page_size, dim),
            pos_pool.reshape(n_pages, page_size))


def _build_pool(cache, target, n_pages, page_size, table, num_pages, counts) -> PagedKVCache:
    k_pages, v_pages, pos_pages = _scatter_pool(cache.k, cache.v, target, n_pages=n_pages, page_size=page_size)
    return PagedKVCache(
        k_pages=k_pages, v_pages=v_pages, pos_pages=pos_pages, page_table=jnp.asarray(table),
        num_pages=jnp.asarray(num_pages), lengths=jnp.asarray(counts),
        next_position=jnp.copy(cache.length),  # a copy: the paged cache gets donated, the dense one may live on
    )
