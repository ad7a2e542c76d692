"""KVzip chunk scoring as two Pallas kernels for GPU (Triton lowering; also runs in CPU interpret mode).

Pass 1, grid (B, Hkv, row blocks): each program keeps one [block_rows, D] tile of queries and streams the key
blocks it needs (all system blocks, the live chunk blocks, the causal part of the live repeat blocks) with an
online max / sum, then writes the rows' log-sum-exp. Pass 2, grid (B, Hkv, chunk-column blocks): each program
keeps one [block_keys, D] tile of chunk keys and streams the valid query rows with their lse, keeping the running
max of exp(logit - lse). Neither pass materialises more than a [block_rows, block_keys] tile of logits.

Triton wants every tile a power of two: block sizes must be powers of two >= 16 (the dot's minimum), and the head
dim is zero-padded to one in the wrapper (`pack_for_kernels`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kvzip_kernels.kvzip_scores import pack_for_kernels

try:  # the Triton-specific CompilerParams live here in jax 0.10 and 0.11
    from jax.experimental.pallas import triton as pltriton

    _COMPILER_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=2)
except (ImportError, AttributeError):  # the Triton backend is deprecated from 0.11: fall back to the default lowering
    _COMPILER_PARAMS = None

BLOCK_KEYS = 64
BLOCK_ROWS = 64
_NEG = float(np.finfo(np.float32).min)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _logits(q, k, scale, softcap):
    """[rows, D] x [cols, D] -> [rows, cols] float32 (bf16 products are exact in f32, the sum accumulates in f32)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    return s


def _lse_kernel(clen_ref, nval_ref, q_ref, k_ref, lse_ref, *, n_sys, s0, m0, g, bk, br, scale, softcap):
    b = pl.program_id(0)
    r0 = pl.program_id(2) * br
    clen, nval = clen_ref[b], nval_ref[b]
    q = q_ref[...]
    rows = r0 + jnp.arange(br, dtype=jnp.int32)
    lane = jnp.arange(bk, dtype=jnp.int32)

    def step(base, ok_of):
        def body(i, carry):
            mx, total = carry
            s = _logits(q, k_ref[pl.ds(base + i * bk, bk), :], scale, softcap)
            ok = ok_of(i * bk + lane)
            s = jnp.where(ok, s, _NEG)
            new_mx = jnp.maximum(mx, s.max(axis=1))
            # Masked entries are zeroed explicitly: with a finite "minus infinity", exp(NEG - NEG) would be 1.
            p = jnp.where(ok, jnp.exp(s - new_mx[:, None]), 0.0)
            return new_mx, total * jnp.exp(mx - new_mx) + p.sum(axis=1)

        return body

    carry = (jnp.full((br,), _NEG, jnp.float32), jnp.zeros((br,), jnp.float32))
    carry = jax.lax.fori_loop(0, s0 // bk, step(0, lambda c: (c < n_sys)[None, :]), carry)
    # Only the chunk blocks holding valid pairs: the trip count is data dependent (chunk_len <= m).
    carry = jax.lax.fori_loop(0, pl.cdiv(clen, bk), step(s0, lambda c: (c < clen)[None, :]), carry)
    # Repeat keys: only up to the last row of this block (causal) and below n_valid.
    t_hi = jnp.minimum(nval, jax.lax.div(r0 + br - 1, g) + 1)  # both non-negative: truncation is floor
    carry = jax.lax.fori_loop(
        0, pl.cdiv(t_hi, bk), step(s0 + m0, lambda j: (j[None, :] * g <= rows[:, None]) & (j < nval)[None, :]), carry
    )
    mx, total = carry
    lse_ref[...] = mx + jnp.log(jnp.where(total > 0, total, 1.0))


def _max_kernel(clen_ref, nval_ref, q_ref, lse_ref, k_ref, out_ref, *, s0, g, bk, br, scale, softcap):
    b, c = pl.program_id(0), pl.program_id(2)
    clen, nval = clen_ref[b], nval_ref[b]
    k = k_ref[pl.ds(s0 + c * bk, bk), :]
    col_ok = (c * bk + jnp.arange(bk, dtype=jnp.int32)) < clen
    n_rows = nval * g  # rows are ordered (t, g): the valid ones come first

    def body(i, best):
        s = _logits(q_ref[pl.ds(i * br, br), :], k, scale, softcap)
        ok = ((i * br + jnp.arange(br, dtype=jnp.int32)) < n_rows)[:, None] & col_ok[None, :]
        p = jnp.where(ok, jnp.exp(s - lse_ref[pl.ds(i * br, br)][:, None]), 0.0)
        return jnp.maximum(best, p.max(axis=0))

    trips = jnp.where(c * bk < clen, pl.cdiv(n_rows, br), 0)  # a column block past chunk_len stays 0
    out_ref[...] = jax.lax.fori_loop(0, trips, body, jnp.zeros((bk,), jnp.float32))


def kvzip_scores_gpu(
    q, keys, *, n_sys, chunk_len, n_valid, scale, softcap=None, interpret=False, block_keys=None, block_rows=None
):
    """Same contract as `kvzip_kernels.kvzip_scores` (inputs already checked there). Returns float32 [B, Hkv, m]."""
    b, t, hkv, g, d = q.shape
    m = keys.shape[2] - n_sys - t
    bk, br = block_keys or BLOCK_KEYS, block_rows or BLOCK_ROWS
    for name, v in (("block_keys", bk), ("block_rows", br)):
        if not _is_pow2(v) or v < 16:
            raise ValueError(f"kvzip_scores (pallas_gpu): {name} = {v} must be a power of two >= 16")
    d_pad = max(16, pl.next_power_of_2(d))
    q_rows, keys_p, (s0, m0) = pack_for_kernels(q, keys, n_sys, bk, br, d_pad)
    rp, wp = q_rows.shape[2], keys_p.shape[2]
    scale, softcap = float(scale), None if softcap is None else float(softcap)
    lens = pl.BlockSpec((b,), lambda *_: (0,))  # whole [B] arrays, read with the row's program id
    # Whole per-(b, h) key / q / lse arrays as blocks: the kernels slice power-of-two tiles out of them.
    keys_spec = pl.BlockSpec((None, None, wp, d_pad), lambda i, h, j: (i, h, 0, 0))

    lse = pl.pallas_call(
        functools.partial(_lse_kernel, n_sys=n_sys, s0=s0, m0=m0, g=g, bk=bk, br=br, scale=scale, softcap=softcap),
        grid=(b, hkv, rp // br),
        in_specs=[lens, lens, pl.BlockSpec((None, None, br, d_pad), lambda i, h, r: (i, h, r, 0)), keys_spec],
        out_specs=pl.BlockSpec((None, None, br), lambda i, h, r: (i, h, r)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rp), jnp.float32),
        compiler_params=_COMPILER_PARAMS,
        interpret=interpret,
        name="kvzip_scores_lse",
    )(chunk_len, n_valid, q_rows, keys_p)

    scores = pl.pallas_call(
        functools.partial(_max_kernel, s0=s0, g=g, bk=bk, br=br, scale=scale, softcap=softcap),
        grid=(b, hkv, m0 // bk),
        in_specs=[
            lens,
            lens,
            pl.BlockSpec((None, None, rp, d_pad), lambda i, h, c: (i, h, 0, 0)),
            pl.BlockSpec((None, None, rp), lambda i, h, c: (i, h, 0)),
            keys_spec,
        ],
        out_specs=pl.BlockSpec((None, None, bk), lambda i, h, c: (i, h, c)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, m0), jnp.float32),
        compiler_params=_COMPILER_PARAMS,
        interpret=interpret,
        name="kvzip_scores_max",
    )(chunk_len, n_valid, q_rows, lse, keys_p)
    return scores[:, :, :m]
