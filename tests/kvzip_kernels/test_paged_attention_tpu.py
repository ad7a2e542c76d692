"""The Mosaic TPU paged decode kernel: the paths that need long heads, and what it asks of a TPU at the real shapes.

Interpret mode (the TPU interpreter models the kernel's DMAs and semaphores and fills unwritten VMEM with NaN) runs
heads spanning several key blocks, table slices and row blocks against the float64 numpy reference of
`test_paged_attention`. The lowering tests run at the Llama-3.1-8B layer shape (batch 1 and 64, 8K and 128K
contexts) on shapes only: lowering is not compiling, Mosaic's own compiler and the device are not exercised (the
`tpu` marked test of `test_paged_attention` does that on a TPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_kernels.paged_attention_tpu import paged_attention_tpu, row_tiling, smem_bytes
from tests.kvzip_kernels.pallas_inspect import _eqns, lowered_text, pallas_calls
from tests.kvzip_kernels.test_paged_attention import (
    LLAMA8B,
    PAGE,
    _llama8b_decode_structs,
    assert_matches_reference,
)

WIDTH = 20  # table entries per head: 320 slots, up to 3 blocks of the default 128 keys
SMEM_BYTES = 1 << 20  # v5e / v6e scalar memory


def _long_case(seed: int, lengths, *, g: int, t: int, d: int, dtype):
    """A paged cache of ragged heads up to WIDTH pages, in the dense format of `_reference`. Stored positions are
    gappy and above 2**24 (every bit of an int32 position matters); unused slots and pool pages hold NaN with
    position 0 (the position mask alone would admit them); table entries past a head's pages point outside the
    pool."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    batch, hkv = lengths.shape
    n_pages = -(-lengths // PAGE)
    n_real = int(n_pages.sum())
    n_pool = n_real + 2
    k = rng.standard_normal((n_pool, PAGE, d)).astype(np.float32)
    v = rng.standard_normal((n_pool, PAGE, d)).astype(np.float32)
    k[n_real:], v[n_real:] = np.nan, np.nan
    pos = np.zeros((n_pool, PAGE), np.int32)
    table = np.where(np.arange(WIDTH) % 2, -7, n_pool + 100) * np.ones((batch, hkv, 1), np.int32)
    q_positions = (2**24 + 100_000 + 10 * np.arange(batch)[:, None] + np.arange(t)[None, :]).astype(np.int32)
    order, used, dense = rng.permutation(n_real), 0, {}
    for b in range(batch):
        for h in range(hkv):
            n = int(lengths[b, h])
            pages = order[used : used + n_pages[b, h]]
            used += n_pages[b, h]
            table[b, h, : len(pages)] = pages
            ctx = np.sort(rng.choice(100_000, size=max(n - t, 0), replace=False)) + 2**24
            stored = np.concatenate([ctx, q_positions[b]]).astype(np.int32) if n else np.zeros(0, np.int32)
            slots = [pages[j // PAGE] * PAGE + j % PAGE for j in range(len(pages) * PAGE)]
            pos.reshape(-1)[slots[:n]] = stored
            k.reshape(-1, d)[slots[n:]] = np.nan
            v.reshape(-1, d)[slots[n:]] = np.nan
            dense[b, h] = (slots[:n], stored)
    q = rng.standard_normal((batch, t, hkv, g, d)).astype(np.float32)
    inputs = dict(q=jnp.asarray(q, dtype), k_pages=jnp.asarray(k, dtype), v_pages=jnp.asarray(v, dtype),
                  pos_pages=jnp.asarray(pos), page_table=jnp.asarray(table), lengths=jnp.asarray(lengths),
                  q_positions=jnp.asarray(q_positions))
    return inputs, dense


# Ragged heads in one call: empty; 300 keys (3 blocks of 128, the last one and its last page partial); exactly two
# blocks of 128; a single partial page; 319 (one short of the table); one page past a block boundary.
LENGTHS = [[300, 0, 256], [9, 319, 129]]
# (G, T, dtype, softcap, window, max_rows, pages_per_block, table_chunk)
CASES = [
    (4, 1, jnp.float32, None, None, 256, 8, 2048),  # the defaults: one table slice, blocks of 128 keys
    (3, 2, jnp.bfloat16, 2.0, 60_000, 256, 8, 8),  # 6 rows padded to 16; one table slice per block
    (7, 3, jnp.float32, 1.5, 30_000, 8, 2, 6),  # 21 rows in 3 blocks of 8; slices of 6 entries, the last overlaps
    (7, 3, jnp.bfloat16, None, 20, 8, 4, 4),  # max_rows 8 -> 16 bf16 rows: 2 blocks; a window of new tokens only
]


@pytest.mark.parametrize("case", CASES, ids=[f"G{c[0]}-T{c[1]}-{jnp.dtype(c[2]).name}-ppb{c[6]}-chunk{c[7]}"
                                             for c in CASES])
def test_long_ragged_heads_match_reference(case):
    g, t, dtype, softcap, window, max_rows, pages_per_block, table_chunk = case
    d = 64 if dtype == jnp.float32 else 128
    inputs, dense = _long_case(CASES.index(case), LENGTHS, g=g, t=t, d=d, dtype=dtype)
    scale = 0.3 if softcap else d**-0.5
    no_window = np.iinfo(np.int32).max
    out = paged_attention_tpu(**inputs, window=jnp.int32(window or no_window), scale=scale, softcap=softcap,
                              interpret=True, max_rows=max_rows, pages_per_block=pages_per_block,
                              table_chunk=table_chunk)
    out = assert_matches_reference(out, inputs, dense, scale=scale, softcap=softcap, window=window,
                                   leak="NaN slots, pool pages or stale buffer rows")
    assert np.all(out[0, :, 1] == 0), "the empty head (row 0, kv head 1) must give exactly 0"


def test_row_tiling_pads_to_the_dtype_tile():
    assert row_tiling(4, 256, 16) == (16, 16)  # the 8B decode step: 4 rows -> one bf16 tile
    assert row_tiling(4, 256, 8) == (8, 8)
    assert row_tiling(21, 8, 8) == (24, 8)
    assert row_tiling(21, 8, 16) == (32, 16)  # max_rows rounds up to a whole bf16 tile


def test_bad_tunables_raise():
    inputs, _ = _long_case(0, [[20]], g=1, t=1, d=64, dtype=jnp.float32)
    kw = dict(window=jnp.int32(5), scale=0.1, interpret=True)
    with pytest.raises(ValueError, match=r"table_chunk must be a positive multiple of pages_per_block=4, got 6"):
        paged_attention_tpu(**inputs, **kw, pages_per_block=4, table_chunk=6)
    with pytest.raises(ValueError, match=r"max_rows must be a positive multiple of 8, got 12"):
        paged_attention_tpu(**inputs, **kw, max_rows=12)


# ------------------------------------------------------------------------------------------ the 8B shapes
def _kernel_refs(fn, *structs):
    """The kernel's operand and scratch refs but semaphores: (memory space, bytes, shape), read from the jaxpr."""
    closed = jax.make_jaxpr(fn)(*structs)
    [call] = [e for e in _eqns(closed.jaxpr) if e.primitive.name == "pallas_call"]
    kernel = call.params["jaxpr"]
    avals = [v.aval for v in getattr(kernel, "jaxpr", kernel).invars]
    return [(str(a.memory_space), math.prod(a.shape) * a.dtype.itemsize, a.shape)
            for a in avals if str(a.memory_space) != "semaphore_mem"]


@pytest.mark.parametrize("batch,context", LLAMA8B, ids=[f"B{b}-{c // 1024}K" for b, c in LLAMA8B])
def test_lowers_for_tpu_within_its_limits_at_the_8b_shapes(batch, context):
    """The Mosaic lowering at the real shapes, and what the kernel asks of the chip: SMEM (scalar prefetch and
    scratch) within 1 MiB, K/V/positions/table left in HBM, bf16 matmul left operands in whole 16-row tiles,
    128-key matmuls and a grid sized by (row, kv head), not by pages. Lowering is not compiling: Mosaic's own
    compiler and the device are not exercised here."""
    structs = _llama8b_decode_structs(batch, context)
    fn = functools.partial(paged_attention_tpu, scale=0.088, softcap=None)
    assert "tpu_custom_call" in lowered_text(fn, *structs, platform="tpu")

    [call] = pallas_calls(fn, *structs)
    prefetch, scratch = smem_bytes(batch, 8, context // PAGE)
    assert call.scalar_prefetch_bytes == prefetch <= 4 * (64 * 8 + 1)
    assert call.grid == (batch, 8, 1) and call.grid_steps <= 100_000
    bf16_lhs = [lhs for lhs, _ in call.dot_operands if lhs.dtype == jnp.bfloat16]
    assert len(bf16_lhs) == 2 and all(lhs.shape[0] % 16 == 0 for lhs in bf16_lhs), call.dot_operands
    assert all(rhs.shape[0] >= 128 for lhs, rhs in call.dot_operands if lhs.dtype == jnp.bfloat16)

    refs = _kernel_refs(fn, *structs)
    smem = sum(nbytes for space, nbytes, _ in refs if space == "smem")
    assert smem == prefetch + scratch and scratch <= 8192 and smem <= SMEM_BYTES, refs
    assert sum(space == "any" for space, _, _ in refs) == 4  # table, K, V, positions stay in HBM
    # Everything in VMEM, Pallas' double-buffered q / positions / output blocks included, is a few hundred KiB.
    vmem = sum(nbytes * (2 if space == "default" else 1) for space, nbytes, _ in refs if space in ("vmem", "default"))
    assert vmem <= 1 << 20, refs


def test_precision_reaches_the_attention_matmuls():
    """The `precision` keyword reaches both attention matmuls; the position gather is always exact (HIGHEST)."""
    structs = _llama8b_decode_structs(1, 8192, jnp.float32)
    HIGHEST = jax.lax.Precision.HIGHEST
    for precision in (jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT):
        fn = functools.partial(paged_attention_tpu, scale=0.088, precision=precision)
        [call] = pallas_calls(fn, *structs)
        attention = [p for (lhs, _), p in zip(call.dot_operands, call.dot_precisions, strict=True)
                     if lhs.shape[1] != PAGE]
        gather = [p for (lhs, _), p in zip(call.dot_operands, call.dot_precisions, strict=True)
                  if lhs.shape[1] == PAGE]
        assert len(attention) == 2 and all(p in (precision, (precision, precision)) for p in attention)
        assert len(gather) == 2 and all(p in (HIGHEST, (HIGHEST, HIGHEST)) for p in gather)
    # Mosaic lowers DEFAULT and HIGHEST only: HIGH rounds up; bf16 operands (exact products) always get DEFAULT.
    for dtype, precision, expected in ((jnp.float32, jax.lax.Precision.HIGH, HIGHEST),
                                       (jnp.bfloat16, HIGHEST, jax.lax.Precision.DEFAULT)):
        fn = functools.partial(paged_attention_tpu, scale=0.088, precision=precision)
        [call] = pallas_calls(fn, *_llama8b_decode_structs(1, 8192, dtype))
        attention = [p for (lhs, _), p in zip(call.dot_operands, call.dot_precisions, strict=True)
                     if lhs.shape[1] != PAGE]
        assert all(p in (expected, (expected, expected)) for p in attention), (dtype, attention)
