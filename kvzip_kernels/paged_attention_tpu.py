"""Paged decode attention as a Mosaic TPU Pallas kernel (also runs in CPU interpret mode).

Grid (B, Hkv, row blocks, P): a (row, kv head, block of query rows) per parallel step, the head's page-table
slots on the sequential axis. The
page table, the lengths and the window are scalar-prefetched into SMEM, so the K/V/position index_maps can look up
each step's page. Steps past a head's last page reuse the last page's block index: Pallas skips the DMA when the
block index does not change, so pages that hold no pair of the head are never fetched, and the body is skipped by
`pl.when`. The online-softmax state (m, l, acc) lives in VMEM scratch across the sequential axis.

Block shapes are legal for Mosaic whatever the page size and head_dim: every block's last two dims equal the
array's (one page of K/V; one page of positions stored as [N, 1, page]) or are a multiple of 8 rows by the full
head_dim (query and output rows).
Semantics are those of `paged_attention_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SUBLANES = 8  # query rows are padded to a multiple of the sublane count so the [rows, D] tiles are whole vregs
MAX_ROWS = 256  # query rows per block: bounds the VMEM of q, the output and the f32 accumulator for long steps
MASKED = -1e30  # finite "minus infinity": exp(MASKED - m) underflows to 0 without inf - inf = NaN


def _interpret_arg(interpret: bool):
    """The TPU interpreter (models DMAs and semaphores) where this jax has it, else the generic one."""
    if not interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def row_tiling(n_rows: int, max_rows: int) -> tuple[int, int]:
    """(padded rows, rows per block): whole sublane tiles, split into MAX_ROWS blocks for long steps."""
    if n_rows <= max_rows:
        rows = -(-n_rows // SUBLANES) * SUBLANES
        return rows, rows
    return -(-n_rows // max_rows) * max_rows, max_rows


def _page_index(b, h, j, table_ref, len_ref, *, hkv, width, page, num_pages):
    """Pool index of step j's page of head (b, h): clamped to the head's last page holding pairs (no new DMA past
    it) and into the pool (a length-0 head still names some block; it is fetched once and never used)."""
    head = b * hkv + h
    last = jnp.maximum(pl.cdiv(len_ref[head], page) - 1, 0)
    return jnp.clip(table_ref[head * width + jnp.minimum(j, last)], 0, num_pages - 1)


def _kernel(table_ref, len_ref, win_ref, q_ref, qpos_ref, k_ref, v_ref, pos_ref, o_ref, m_sc, l_sc, acc_sc, *,
            scale, softcap, hkv):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    n = len_ref[b * hkv + h]
    page = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * page < n)
    def _step():
        q = q_ref[...]  # [R, D]
        k = k_ref[...].astype(q.dtype)  # [page, D]
        v = v_ref[...]
        qpos = qpos_ref[...]  # [R, 1]
        kpos = pos_ref[...]  # [1, page]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        slot = j * page + jax.lax.broadcasted_iota(jnp.int32, (1, page), 1)
        ok = (slot < n) & (kpos <= qpos) & (qpos - kpos < win_ref[0])
        s = jnp.where(ok, s, MASKED)  # also drops NaN logits of slots past the length
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        # p is 0 there, but 0 * NaN is NaN: zero the values of slots past the length too.
        stored_col = j * page + jax.lax.broadcasted_iota(jnp.int32, (page, 1), 0) < n
        v = jnp.where(stored_col, v, jnp.zeros((), v.dtype))
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        m_sc[...] = m_new
        l_sc[...] = l_sc[...] * alpha + p.sum(axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        total = l_sc[...]
        # A head with no visible pair (length 0) has total == 0: its output is 0, not 0/0.
        o_ref[...] = (acc_sc[...] / jnp.where(total > 0, total, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "interpret", "max_rows"))
def paged_attention_tpu(q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions, window, *, scale: float,
                        softcap: float | None = None, interpret: bool = False, max_rows: int = MAX_ROWS):
    """q [B, T, Hkv, G, D]; k/v_pages [N, page, D]; pos_pages [N, page]; page_table [B, Hkv, P]; lengths [B, Hkv];
    q_positions [B, T]; window: int32 scalar (int32 max = no window). Returns [B, T, Hkv, G, D] in q's dtype.

    Inputs are assumed checked (see `kvzip_kernels.dispatch`).
    """
    b, t, hkv, g, d = q.shape
    n_pool, page = k_pages.shape[:2]
    width = page_table.shape[-1]
    if max_rows < SUBLANES or max_rows % SUBLANES:
        raise ValueError(f"max_rows must be a positive multiple of {SUBLANES}, got {max_rows}")
    rows, block_rows = row_tiling(t * g, max_rows)
    # Row r = t * G + g of a (row, kv head) tile; padding rows get position -1 so they see nothing (output 0).
    q_rows = q.transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    qpos = jnp.repeat(q_positions.astype(jnp.int32), g, axis=1)
    qpos = jnp.pad(qpos, ((0, 0), (0, rows - t * g)), constant_values=-1)[:, :, None]  # [B, R, 1]
    pos3 = pos_pages.astype(jnp.int32).reshape(n_pool, 1, page)
    # SMEM pads 2-D arrays to whole tiles: the scalar tables travel flat.
    table_flat = page_table.astype(jnp.int32).reshape(-1)
    lens_flat = lengths.astype(jnp.int32).reshape(-1)
    win = jnp.reshape(jnp.asarray(window, jnp.int32), (1,))

    page_index = functools.partial(_page_index, hkv=hkv, width=width, page=page, num_pages=n_pool)

    def kv_map(i, h, r, j, table_ref, len_ref, win_ref):
        return page_index(i, h, j, table_ref, len_ref), 0, 0

    def rows_map(i, h, r, j, *_):
        return i, h, r, 0

    kernel = functools.partial(
        _kernel, scale=np.float32(scale), softcap=None if softcap is None else np.float32(softcap), hkv=hkv
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, hkv, rows // block_rows, width),
        in_specs=[
            pl.BlockSpec((None, None, block_rows, d), rows_map),
            pl.BlockSpec((None, block_rows, 1), lambda i, h, r, j, *_: (i, r, 0)),
            pl.BlockSpec((None, page, d), kv_map),
            pl.BlockSpec((None, page, d), kv_map),
            pl.BlockSpec((None, 1, page), kv_map),
        ],
        out_specs=pl.BlockSpec((None, None, block_rows, d), rows_map),
        scratch_shapes=[
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, d), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="paged_attention_tpu",
    )(table_flat, lens_flat, win, q_rows, qpos, k_pages, v_pages, pos3)
    return out[:, :, : t * g].reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4)
