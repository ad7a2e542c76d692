"""Paged decode attention as a Pallas kernel with the Triton lowering (GPU; also runs in CPU interpret mode).

One program per (row, kv head, tile of query rows). It reads the head's lengths entry, then runs an online softmax
over only the `cdiv(length, page)` pages that hold its pairs (a dynamic trip count: work is proportional to the
kept pairs, not to the table width), fetching each page through its page-table entry. The T new queries of the G
heads of a group are one [T*G, D] tile (split in tiles of 64 rows for long steps), so K/V are read once per group
(no replication).

Triton needs power-of-2 sizes on every load/store and tiles of at least 16 for `dot`: the wrapper flattens the
T*G query rows and pads them to a power-of-2 tile >= 16, and `check_gpu_shapes` refuses page sizes and head dims
that are not. Semantics are those of `paged_attention_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_TILE = 16  # Triton's dot needs every matmul dim >= 16
MAX_ROWS = 64  # query rows per program: the f32 accumulator [rows, D] must stay in registers
MASKED = -1e30  # finite "minus infinity": exp(MASKED - m) underflows to 0 without inf - inf = NaN


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(n - 1, 0).bit_length())


def row_tiling(n_rows: int, max_rows: int) -> tuple[int, int]:
    """(padded rows, rows per program): one power-of-2 tile of >= 16 rows, or tiles of MAX_ROWS for long steps."""
    if n_rows <= max_rows:
        rows = _pow2_at_least(n_rows, MIN_TILE)
        return rows, rows
    return -(-n_rows // max_rows) * max_rows, max_rows


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_gpu_shapes(page: int, head_dim: int) -> None:
    """Raise ValueError unless the page size and head_dim are tiles the Triton lowering accepts."""
    for name, value in (("page size", page), ("head_dim", head_dim)):
        if not _is_pow2(value) or value < MIN_TILE:
            raise ValueError(f"pallas_gpu paged attention needs a {name} that is a power of two >= {MIN_TILE}, "
                             f"got {value}; use backend='reference' for this cache")


def gpu_shapes_ok(page: int, head_dim: int) -> bool:
    try:
        check_gpu_shapes(page, head_dim)
    except ValueError:
        return False
    return True


def _kernel(len_ref, win_ref, table_ref, q_ref, qpos_ref, k_ref, v_ref, pos_ref, o_ref, *, scale, softcap,
            num_pages):
    b, h = pl.program_id(0), pl.program_id(1)
    n = len_ref[b, h]
    window = win_ref[0]
    page = k_ref.shape[1]
    q = q_ref[...]  # [R, D]
    qpos = qpos_ref[...]  # [R, 1]
    rows = q.shape[0]
    offsets = jnp.arange(page, dtype=jnp.int32)

    def step(i, carry):
        m, total, acc = carry
        # Clamped so that a corrupt table entry can never address outside the pool.
        page_id = jnp.clip(table_ref[b, h, i], 0, num_pages - 1)
        k = k_ref[page_id].astype(q.dtype)  # [page, D]
        v = v_ref[page_id]
        kpos = pos_ref[page_id]  # [1, page]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        stored = (i * page + offsets) < n  # [page]
        ok = stored[None, :] & (kpos <= qpos) & (qpos - kpos < window)
        s = jnp.where(ok, s, MASKED)  # also drops NaN logits of slots past the length
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        # p is 0 there, but 0 * NaN is NaN: zero the values of slots past the length too.
        v = jnp.where(stored[:, None], v, jnp.zeros((), v.dtype))
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, total * alpha + p.sum(axis=1), acc * alpha[:, None] + pv

    init = (
        jnp.full((rows,), MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, q.shape[1]), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(0, pl.cdiv(n, page), step, init)
    # A head with no visible pair (length 0) has total == 0: its output is 0, not 0/0.
    out = acc / jnp.where(total > 0, total, 1.0)[:, None]
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "interpret", "max_rows", "num_warps", "num_stages"))
def paged_attention_gpu(q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions, window, *, scale: float,
                        softcap: float | None = None, interpret: bool = False, max_rows: int = MAX_ROWS,
                        num_warps: int = 4, num_stages: int = 2):
    """q [B, T, Hkv, G, D]; k/v_pages [N, page, D]; pos_pages [N, page]; page_table [B, Hkv, P]; lengths [B, Hkv];
    q_positions [B, T]; window: int32 scalar (int32 max = no window). Returns [B, T, Hkv, G, D] in q's dtype.

    Inputs are assumed checked (see `kvzip_kernels.dispatch`); page size and head_dim must pass `check_gpu_shapes`.
    """
    b, t, hkv, g, d = q.shape
    n_pool, page = k_pages.shape[:2]
    check_gpu_shapes(page, d)
    if not _is_pow2(max_rows) or max_rows < MIN_TILE:
        raise ValueError(f"max_rows must be a power of two >= {MIN_TILE}, got {max_rows}")
    rows, block_rows = row_tiling(t * g, max_rows)
    # Row r = t * G + g of a (row, kv head) tile; padding rows get position -1 so they see nothing (output 0).
    q_rows = q.transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    qpos = jnp.repeat(q_positions.astype(jnp.int32), g, axis=1)
    qpos = jnp.pad(qpos, ((0, 0), (0, rows - t * g)), constant_values=-1)[:, :, None]  # [B, R, 1]
    pos3 = pos_pages.astype(jnp.int32).reshape(n_pool, 1, page)  # a [1, page] row per page: no in-kernel reshape
    win = jnp.reshape(jnp.asarray(window, jnp.int32), (1,))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j, r: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(
        _kernel, scale=np.float32(scale), softcap=None if softcap is None else np.float32(softcap),
        num_pages=n_pool,
    )
    out = pl.pallas_call(
        kernel,
        grid=(b, hkv, rows // block_rows),
        in_specs=[
            whole(lengths.shape),
            whole((1,)),
            whole(page_table.shape),
            pl.BlockSpec((None, None, block_rows, d), lambda i, j, r: (i, j, r, 0)),
            pl.BlockSpec((None, block_rows, 1), lambda i, j, r: (i, r, 0)),
            whole(k_pages.shape),
            whole(v_pages.shape),
            whole(pos3.shape),
        ],
        out_specs=pl.BlockSpec((None, None, block_rows, d), lambda i, j, r: (i, j, r, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_gpu",
    )(lengths.astype(jnp.int32), win, page_table.astype(jnp.int32), q_rows, qpos, k_pages, v_pages, pos3)
    return out[:, :, : t * g].reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4)
