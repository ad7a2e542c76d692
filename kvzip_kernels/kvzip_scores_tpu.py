"""KVzip chunk scoring as two Pallas kernels for TPU (Mosaic; also runs in CPU interpret mode).

Both passes put the streamed axis last in the grid ("arbitrary") and keep their running state in VMEM scratch:

- pass 1, grid (B, Hkv, row blocks, key blocks): online max / sum of each query row over the key blocks, lse
  written at the last key block;
- pass 2, grid (B, Hkv, chunk-column blocks, row blocks): running max over rows of exp(logit - lse) per chunk
  column, written at the last row block.

chunk_len and n_valid are scalar-prefetched into SMEM. The index maps clamp every dead block (chunk slots past
chunk_len, repeat keys past the row block's causal limit or n_valid, query rows past n_valid) to the last live one:
an unchanged block index means no DMA, and `pl.when` skips the compute. Block shapes follow Mosaic's rule (last two
dims divisible by the dtype's sublane count (8 for float32, 16 for bf16) and 128, or whole): keys (block_keys, D),
queries (block_rows, D), lse (block_rows, 1) and scores (1, block_keys) of arrays whose last dims are D, D, 1 and
block_keys.

Blocks: 256 query rows x 512 keys per grid step by default. Each grid step costs ~0.35 us of fixed overhead, and a
128^3 bf16 matmul is ~0.02 us of a v5e MXU's 197 TFLOP/s, so the earlier 128 x 128 blocks spent more time stepping
than multiplying: at the Llama-3.1-8B scoring shape (Hkv 8, G 4, chunk 8192) pass 1 had 267,280 steps; these blocks
make it 35,088 (tests/kvzip_kernels/test_kvzip_scores.py checks <= 100,000 with `pallas_inspect`).

VMEM at D 128 bf16 (lane-sparse [rows, 1] float32 arrays pad to 128 lanes):
- pass 1: q 256 * 128 * 2 B = 64 KiB, keys 512 * 128 * 2 B = 128 KiB, both double-buffered: 384 KiB; lse out
  (256, 1) -> 256 * 128 * 4 B = 128 KiB, double-buffered: 256 KiB; max / sum scratch 2 * 128 KiB = 256 KiB; the
  [256, 512] float32 logits 512 KiB, ~4 such temporaries live: 2 MiB. ~2.9 MiB in all.
- pass 2: q 64 KiB + lse 128 KiB + keys 128 KiB, double-buffered: 640 KiB; out and scratch (1, 512) -> (8, 512)
  float32, 3 * 16 KiB; logits temporaries 2 MiB. ~2.7 MiB.
Both sit well inside the 16 MiB scoped-VMEM default of the smallest current TPU (v5e), leaving room to tune up.

Precision: the caller's `precision` goes to every dot. Mosaic's matmul has two modes: its default (DEFAULT / None)
and float32 contraction (HIGHEST). Its lowering rejects HIGH, so HIGH runs as HIGHEST: at least what was asked.
bf16 inputs are exact either way (float32 accumulation), so their dots keep Mosaic's default whatever is asked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvzip_kernels.backend import mosaic_precision
from kvzip_kernels.kvzip_scores import pack_for_kernels

BLOCK_KEYS = 512  # four full lane widths for the [rows, keys] logits tile
BLOCK_ROWS = 256  # a multiple of every dtype's sublane count (8 f32, 16 bf16, 32 8-bit)
_NEG = float(np.finfo(np.float32).min)


def _cdiv(a, b):
    return jax.lax.div(a + b - 1, b)  # operands are non-negative, so truncation is floor


def _logits(q, k, scale, softcap, precision):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    return s


def _key_block(k, s0b, r0b, bk, n_sys, clen, nval, g):
    """Where key block k lies: (first segment-relative column, column limit, causal factor).

    A column col of the block is valid for row r iff col < limit and col * factor <= r: the factor is G for repeat
    keys (row r is repeat token r // G) and 0 elsewhere (always true). One formula for the three segments keeps the
    kernel free of branches on vectors.
    """
    is_sys, is_chunk = k < s0b, (k >= s0b) & (k < r0b)
    start = (k - jnp.where(is_sys, 0, jnp.where(is_chunk, s0b, r0b))) * bk
    limit = jnp.where(is_sys, n_sys, jnp.where(is_chunk, clen, nval))
    factor = jnp.where(is_sys | is_chunk, 0, g)
    return start, limit, factor


def _lse_kernel(clen_ref, nval_ref, q_ref, k_ref, lse_ref, mx_scr, tot_scr, *, n_sys, s0b, r0b, g, bk, br, scale,
                softcap, precision):
    b, r, k = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    clen, nval = clen_ref[b], nval_ref[b]

    @pl.when(k == 0)
    def _init():
        mx_scr[...] = jnp.full(mx_scr.shape, _NEG, jnp.float32)
        tot_scr[...] = jnp.zeros(tot_scr.shape, jnp.float32)

    start, limit, factor = _key_block(k, s0b, r0b, bk, n_sys, clen, nval, g)
    last_row = r * br + br - 1
    live = (start < limit) & (start * factor <= last_row) & (r * br < nval * g)

    @pl.when(live)
    def _step():
        s = _logits(q_ref[...], k_ref[...], scale, softcap, precision)  # [br, bk]
        col = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        row = r * br + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        ok = (col < limit) & (col * factor <= row)
        s = jnp.where(ok, s, _NEG)
        mx = mx_scr[...]
        new_mx = jnp.maximum(mx, s.max(axis=1, keepdims=True))
        # Masked entries are zeroed explicitly: with a finite "minus infinity", exp(NEG - NEG) would be 1.
        p = jnp.where(ok, jnp.exp(s - new_mx), 0.0)
        tot_scr[...] = tot_scr[...] * jnp.exp(mx - new_mx) + p.sum(axis=1, keepdims=True)
        mx_scr[...] = new_mx

    @pl.when(k == pl.num_programs(3) - 1)
    def _finish():
        tot = tot_scr[...]
        lse_ref[...] = mx_scr[...] + jnp.log(jnp.where(tot > 0, tot, 1.0))


def _max_kernel(clen_ref, nval_ref, q_ref, lse_ref, k_ref, out_ref, best_scr, *, g, bk, br, scale, softcap,
                precision):
    b, c, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    clen, nval = clen_ref[b], nval_ref[b]

    @pl.when(r == 0)
    def _init():
        best_scr[...] = jnp.zeros(best_scr.shape, jnp.float32)

    @pl.when((c * bk < clen) & (r * br < nval * g))
    def _step():
        s = _logits(q_ref[...], k_ref[...], scale, softcap, precision)  # [br, bk]
        col = c * bk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        row = r * br + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        ok = (row < nval * g) & (col < clen)  # rows are ordered (t, g): the valid ones come first
        p = jnp.where(ok, jnp.exp(s - lse_ref[...]), 0.0)
        best_scr[...] = jnp.maximum(best_scr[...], p.max(axis=0, keepdims=True))

    @pl.when(r == pl.num_programs(3) - 1)
    def _finish():
        out_ref[...] = best_scr[...]


def kvzip_scores_tpu(
    q, keys, *, n_sys, chunk_len, n_valid, scale, softcap=None, interpret=False, block_keys=None, block_rows=None,
    precision=None,
):
    """Same contract as `kvzip_kernels.kvzip_scores` (inputs already checked there). Returns float32 [B, Hkv, m].

    precision: a `jax.lax.Precision` or None, given to every dot of float32 inputs (HIGH runs as HIGHEST; bf16 dots
    keep Mosaic's default: module docstring).
    block_keys / block_rows (None: BLOCK_KEYS, BLOCK_ROWS) must be multiples of the dtype's sublane count: both are
    the second-to-last dim of a q or key block."""
    b, t, hkv, g, d = q.shape
    m = keys.shape[2] - n_sys - t
    bk, br = block_keys or BLOCK_KEYS, block_rows or BLOCK_ROWS
    sublanes = 8 * max(1, 4 // jnp.dtype(q.dtype).itemsize)  # a vreg holds 8 x 128 32-bit words, packed below
    for name, v in (("block_keys", bk), ("block_rows", br)):
        if v < sublanes or v % sublanes:
            raise ValueError(f"kvzip_scores (pallas_tpu): {name} = {v} must be a positive multiple of {sublanes} "
                             f"for {jnp.dtype(q.dtype).name} inputs")
    precision = mosaic_precision(precision, q.dtype)
    q_rows, keys_p, (s0, m0) = pack_for_kernels(q, keys, n_sys, bk, br, d)
    rp, wp = q_rows.shape[2], keys_p.shape[2]
    s0b, r0b, n_row_blocks = s0 // bk, (s0 + m0) // bk, rp // br
    scale, softcap = float(scale), None if softcap is None else float(softcap)
    interpret = pltpu.InterpretParams() if interpret else False

    def last_live_row_block(nval):
        return jnp.maximum(_cdiv(nval * g, br) - 1, 0)

    def last_live_chunk_block(clen):  # absolute key-block index; the last system block (or 0) when the chunk is empty
        return jnp.maximum(jnp.where(clen > 0, s0b + _cdiv(clen, bk) - 1, s0b - 1), 0)

    def q_map(i, h, r, k, clen_ref, nval_ref):
        return i, h, jnp.minimum(r, last_live_row_block(nval_ref[i])), 0

    def key_map(i, h, r, k, clen_ref, nval_ref):
        clen, nval = clen_ref[i], nval_ref[i]
        t_hi = jnp.minimum(nval, jax.lax.div(r * br + br - 1, g) + 1)  # repeat keys this row block may see
        n_rep = _cdiv(t_hi, bk)
        last_chunk = last_live_chunk_block(clen)
        last_rep = jnp.where(n_rep > 0, r0b + n_rep - 1, last_chunk)
        idx = jnp.where(k < s0b, k, jnp.where(k < r0b, jnp.minimum(k, last_chunk), jnp.minimum(k, last_rep)))
        return i, h, jnp.where(r * br < nval * g, idx, 0), 0  # a dead row block fetches nothing new

    lse = pl.pallas_call(
        functools.partial(_lse_kernel, n_sys=n_sys, s0b=s0b, r0b=r0b, g=g, bk=bk, br=br, scale=scale,
                          softcap=softcap, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, n_row_blocks, wp // bk),
            in_specs=[pl.BlockSpec((None, None, br, d), q_map), pl.BlockSpec((None, None, bk, d), key_map)],
            out_specs=pl.BlockSpec((None, None, br, 1), lambda i, h, r, k, cl, nv: (i, h, r, 0)),
            scratch_shapes=[pltpu.VMEM((br, 1), jnp.float32), pltpu.VMEM((br, 1), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rp, 1), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="kvzip_scores_lse",
    )(chunk_len, n_valid, q_rows, keys_p)

    def row_map(i, h, c, r, clen_ref, nval_ref):
        # A dead column block (past chunk_len) pins the rows to block 0 instead of streaming them again.
        live_col = c * bk < clen_ref[i]
        return i, h, jnp.where(live_col, jnp.minimum(r, last_live_row_block(nval_ref[i])), 0), 0

    def chunk_key_map(i, h, c, r, clen_ref, nval_ref):
        return i, h, jnp.minimum(s0b + c, last_live_chunk_block(clen_ref[i])), 0

    scores = pl.pallas_call(
        functools.partial(_max_kernel, g=g, bk=bk, br=br, scale=scale, softcap=softcap, precision=precision),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, m0 // bk, n_row_blocks),
            in_specs=[
                pl.BlockSpec((None, None, br, d), row_map),
                pl.BlockSpec((None, None, br, 1), row_map),
                pl.BlockSpec((None, None, bk, d), chunk_key_map),
            ],
            out_specs=pl.BlockSpec((None, None, None, 1, bk), lambda i, h, c, r, cl, nv: (i, h, c, 0, 0)),
            scratch_shapes=[pltpu.VMEM((1, bk), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((b, hkv, m0 // bk, 1, bk), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="kvzip_scores_max",
    )(chunk_len, n_valid, q_rows, lse, keys_p)
    return scores.reshape(b, hkv, m0)[:, :, :m]
