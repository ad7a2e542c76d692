"""KVzip chunk scoring as two Pallas kernels for GPU (Triton lowering; also runs in CPU interpret mode).

Pass 1, grid (B, Hkv, row blocks): each program keeps one [block_rows, D] tile of queries and streams the key
blocks it needs (all system blocks, the live chunk blocks, the causal part of the live repeat blocks) with an
online max / sum, then writes the rows' log-sum-exp. Pass 2, grid (B, Hkv, chunk-column blocks): each program
keeps one [block_keys, D] tile of chunk keys and streams the valid query rows with their lse, keeping the running
max of exp(logit - lse). Neither pass materialises more than a [block_rows, block_keys] tile of logits.

Triton wants every tile a power of two: block sizes must be powers of two >= 16 (the dot's minimum), and the head
dim is zero-padded to one in the wrapper (`pack_for_kernels`).

Tiles: 128 query rows x 64 keys with 8 warps by default, the shape Triton's fused-attention tutorial uses at D 128:
each k tile loaded (16 KiB of shared memory per pipeline stage at D 128 bf16) feeds twice the rows of a 64-row tile,
and the [128, 128] q tile plus the [128, 64] float32 logits stay in registers across 256 threads (64 + 32 values
each). All four are keyword arguments of `kvzip_scores_gpu`.

Precision: the caller's `precision` goes to every dot. For float32 inputs Triton reads DEFAULT and HIGH as TF32
(inputs rounded to a 10-bit mantissa, ~1e-3 relative error per product, float32 accumulation) and HIGHEST as IEEE
float32 (several times slower); None is DEFAULT, i.e. TF32. bf16 / f16 inputs are exact in every mode. Interpret
mode runs the dots on the CPU, in float32 whatever the precision.
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
except ImportError:  # checked when the kernel is called, so that importing kvzip_kernels never fails over it
    pltriton = None

BLOCK_KEYS = 64
BLOCK_ROWS = 128
NUM_WARPS = 8
NUM_STAGES = 2
_NEG = float(np.finfo(np.float32).min)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _compiler_params(num_warps: int, num_stages: int):
    """Triton's launch parameters. Without them pallas_call would pick the Mosaic GPU lowering, which these kernels
    do not target: a missing Triton backend is an error here, not a silent change of compiler."""
    params = getattr(pltriton, "CompilerParams", None)
    if params is None:
        raise RuntimeError(
            f"kvzip_scores (pallas_gpu): this jax ({jax.__version__}) has no "
            "jax.experimental.pallas.triton.CompilerParams, which the Triton kernel needs; "
            'use backend="reference" (or a jax whose Pallas has the Triton backend)'
        )
    return params(num_warps=num_warps, num_stages=num_stages)


def _logits(q, k, scale, softcap, precision):
    """[rows, D] x [cols, D] -> [rows, cols] float32 (bf16 products are exact in f32, the sum accumulates in f32)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    return s


def _lse_kernel(clen_ref, nval_ref, q_ref, k_ref, lse_ref, *, n_sys, s0, m0, g, bk, br, scale, softcap,
                precision):
    b = pl.program_id(0)
    r0 = pl.program_id(2) * br
    clen, nval = clen_ref[b], nval_ref[b]
    q = q_ref[...]
    rows = r0 + jnp.arange(br, dtype=jnp.int32)
    lane = jnp.arange(bk, dtype=jnp.int32)

    def step(base, ok_of):
        def body(i, carry):
            mx, total = carry
            s = _logits(q, k_ref[pl.ds(base + i * bk, bk), :], scale, softcap, precision)
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


def _max_kernel(clen_ref, nval_ref, q_ref, lse_ref, k_ref, out_ref, *, s0, g, bk, br, scale, softcap, precision):
    b, c = pl.program_id(0), pl.program_id(2)
    clen, nval = clen_ref[b], nval_ref[b]
    k = k_ref[pl.ds(s0 + c * bk, bk), :]
    col_ok = (c * bk + jnp.arange(bk, dtype=jnp.int32)) < clen
    n_rows = nval * g  # rows are ordered (t, g): the valid ones come first

    def body(i, best):
        s = _logits(q_ref[pl.ds(i * br, br), :], k, scale, softcap, precision)
        ok = ((i * br + jnp.arange(br, dtype=jnp.int32)) < n_rows)[:, None] & col_ok[None, :]
        p = jnp.where(ok, jnp.exp(s - lse_ref[pl.ds(i * br, br)][:, None]), 0.0)
        return jnp.maximum(best, p.max(axis=0))

    trips = jnp.where(c * bk < clen, pl.cdiv(n_rows, br), 0)  # a column block past chunk_len stays 0
    out_ref[...] = jax.lax.fori_loop(0, trips, body, jnp.zeros((bk,), jnp.float32))


def kvzip_scores_gpu(
    q, keys, *, n_sys, chunk_len, n_valid, scale, softcap=None, interpret=False, block_keys=None, block_rows=None,
    precision=None, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
):
    """Same contract as `kvzip_kernels.kvzip_scores` (inputs already checked there). Returns float32 [B, Hkv, m].

    precision: a `jax.lax.Precision` or None, given to every dot (module docstring: for float32 inputs DEFAULT / HIGH
    / None mean TF32, HIGHEST IEEE float32). block_keys / block_rows (None: BLOCK_KEYS, BLOCK_ROWS), num_warps and
    num_stages are the Triton tile and launch parameters. Raises RuntimeError when this jax has no Pallas Triton
    backend."""
    b, t, hkv, g, d = q.shape
    m = keys.shape[2] - n_sys - t
    bk, br = block_keys or BLOCK_KEYS, block_rows or BLOCK_ROWS
    for name, v in (("block_keys", bk), ("block_rows", br)):
        if not _is_pow2(v) or v < 16:
            raise ValueError(f"kvzip_scores (pallas_gpu): {name} = {v} must be a power of two >= 16")
    compiler_params = _compiler_params(num_warps, num_stages)
    d_pad = max(16, pl.next_power_of_2(d))
    q_rows, keys_p, (s0, m0) = pack_for_kernels(q, keys, n_sys, bk, br, d_pad)
    rp, wp = q_rows.shape[2], keys_p.shape[2]
    scale, softcap = float(scale), None if softcap is None else float(softcap)
    lens = pl.BlockSpec((b,), lambda *_: (0,))  # whole [B] arrays, read with the row's program id
    # Whole per-(b, h) key / q / lse arrays as blocks: the kernels slice power-of-two tiles out of them.
    keys_spec = pl.BlockSpec((None, None, wp, d_pad), lambda i, h, j: (i, h, 0, 0))

    lse = pl.pallas_call(
        functools.partial(_lse_kernel, n_sys=n_sys, s0=s0, m0=m0, g=g, bk=bk, br=br, scale=scale, softcap=softcap,
                          precision=precision),
        grid=(b, hkv, rp // br),
        in_specs=[lens, lens, pl.BlockSpec((None, None, br, d_pad), lambda i, h, r: (i, h, r, 0)), keys_spec],
        out_specs=pl.BlockSpec((None, None, br), lambda i, h, r: (i, h, r)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rp), jnp.float32),
        compiler_params=compiler_params,
        interpret=interpret,
        name="kvzip_scores_lse",
    )(chunk_len, n_valid, q_rows, keys_p)

    scores = pl.pallas_call(
        functools.partial(_max_kernel, s0=s0, g=g, bk=bk, br=br, scale=scale, softcap=softcap,
                          precision=precision),
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
        compiler_params=compiler_params,
        interpret=interpret,
        name="kvzip_scores_max",
    )(chunk_len, n_valid, q_rows, lse, keys_p)
    return scores[:, :, :m]
