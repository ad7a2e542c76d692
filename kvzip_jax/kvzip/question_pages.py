"""Pages for questions, allocated on demand: many questions decode against one compressed context at once.

A compressed context's pool holds only the pages of its kept pairs (page rounding aside). To ask R questions, each
question becomes a row of a working `PagedKVCache` whose page table lists, per (layer, kv head):

- the context's *full* pages, shared by every question on that context (read-only: nothing is ever written
  into them);
- private pages taken from the free region of the pool, past the context's pages: the first one starts as a copy
  of the context's partial last page (copy-on-write, as vLLM does for prefix blocks), the others receive the
  question and answer tokens.

So a context's pairs are stored once however many questions are asked in one batch, and decode memory is
allocated by pages as the questions need it, not preallocated per head. When the free region is too small the
pool grows (to 1.25x or what is needed, in whole `POOL_GROWTH` multiples, so few shapes are compiled); the free
pages are reused by the next call. Host-side planning is numpy; the copies run on the device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.cache import PagedKVCache

POOL_GROWTH = 64  # pool sizes are multiples of this many pages
TABLE_MULTIPLE = 8  # working page tables are this many entries wide, rounded up (fewer compiled shapes)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def context_pages(cache: PagedKVCache) -> int:
    """Pages of the pool the context's tables use (they are a prefix of the pool; the rest is free)."""
    table, num_pages = np.asarray(cache.page_table), np.asarray(cache.num_pages)
    used = np.arange(table.shape[-1]) < num_pages[..., None]
    return int(table[used].max()) + 1 if used.any() else 0


@dataclasses.dataclass(frozen=True)
class QuestionPlan:
    """Where R question rows read and write, planned on the host."""

    page_table: np.ndarray  # int32 [L, R, Hkv, P]
    num_pages: np.ndarray  # int32 [L, R, Hkv]
    lengths: np.ndarray  # int32 [L, R, Hkv]: the context's pairs
    copy_src: np.ndarray  # int32 [L * R * Hkv]: partial context page to copy (0 where none)
    copy_dst: np.ndarray  # int32 [L * R * Hkv]: its private copy (pool size = none: dropped)
    pool_pages: int  # pool size the plan needs (grown if larger than today's)
    private_pages: int


def plan_questions(table: np.ndarray, lengths: np.ndarray, rows: np.ndarray, slots: int, *, page_size: int,
                   first_free: int, pool_pages: int) -> QuestionPlan:
    """Page tables for question rows `rows[r]` (the context row each question asks) that each append up to
    `slots` tokens; private pages are numbered from `first_free` on."""
    lens = lengths[:, rows]  # [L, R, H]
    full, partial = lens // page_size, lens % page_size
    private = -(-(partial + slots) // page_size)  # >= 1 since slots >= 1
    first_private = first_free + np.concatenate([[0], np.cumsum(private.ravel())[:-1]]).reshape(private.shape)
    total = int(private.sum())
    needed = first_free + total
    if needed > pool_pages:
        pool_pages = _round_up(max(needed, pool_pages + pool_pages // 4), POOL_GROWTH)
    num_pages = (full + private).astype(np.int32)
    width = _round_up(int(num_pages.max()), TABLE_MULTIPLE)
    steps = np.arange(width)
    context_table = table[:, rows]  # [L, R, H, P_context]
    shared = context_table[..., np.minimum(steps, context_table.shape[-1] - 1)]
    own = first_private[..., None] + (steps - full[..., None])
    work = np.where(steps < full[..., None], shared, np.where(steps < num_pages[..., None], own, 0))
    last = np.minimum(full, context_table.shape[-1] - 1)[..., None]
    src = np.take_along_axis(context_table, last, axis=-1)[..., 0]  # the partial page, where there is one
    has_partial = partial > 0
    return QuestionPlan(
        page_table=work.astype(np.int32), num_pages=num_pages, lengths=lens.astype(np.int32),
        copy_src=np.where(has_partial, src, 0).astype(np.int32).ravel(),
        copy_dst=np.where(has_partial, first_private, pool_pages).astype(np.int32).ravel(),
        pool_pages=pool_pages, private_pages=total,
    )


@functools.partial(jax.jit, donate_argnames=("k", "v", "pos"))
def _copy_pages(k, v, pos, src, dst):
    """Copy pages src -> dst in place (the pool is donated; dst out of range: skipped)."""
    return (k.at[dst].set(k[src], mode="drop"), v.at[dst].set(v[src], mode="drop"),
            pos.at[dst].set(pos[src], mode="drop"))


@functools.partial(jax.jit, static_argnames=("pool_pages",))
def _grown(k, v, pos, *, pool_pages: int):
    """The pool with free pages appended up to `pool_pages` (zero; positions -1). A new buffer: not donated."""
    extra = pool_pages - k.shape[0]
    return (jnp.concatenate([k, jnp.zeros((extra, *k.shape[1:]), k.dtype)]),
            jnp.concatenate([v, jnp.zeros((extra, *v.shape[1:]), v.dtype)]),
            jnp.concatenate([pos, jnp.full((extra, *pos.shape[1:]), -1, pos.dtype)]))


def working_cache(base: PagedKVCache, plan: QuestionPlan, next_position: np.ndarray) -> PagedKVCache:
    """The decode cache of a plan: `base`'s pool (grown if needed, partial pages copied; donated) with the
    question rows' tables. `next_position [R]`: each row's next RoPE position (its context's)."""
    k, v, pos = base.k_pages, base.v_pages, base.pos_pages
    if plan.pool_pages > k.shape[0]:
        k, v, pos = _grown(k, v, pos, pool_pages=plan.pool_pages)
    k, v, pos = _copy_pages(k, v, pos, jnp.asarray(plan.copy_src), jnp.asarray(plan.copy_dst))
    return PagedKVCache(
        k_pages=k, v_pages=v, pos_pages=pos, page_table=jnp.asarray(plan.page_table),
        num_pages=jnp.asarray(plan.num_pages), lengths=jnp.asarray(plan.lengths),
        next_position=jnp.asarray(np.asarray(next_position, np.int32)),
    )
