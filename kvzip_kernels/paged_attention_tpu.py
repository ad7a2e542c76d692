"""Paged decode attention as a Mosaic TPU Pallas kernel (also runs in CPU interpret mode).

Design. The grid is (B, Hkv, row blocks), every step independent ("parallel": megacore chips split it across
their TensorCores), so its size follows the work (512 steps at batch 64 x 8 kv heads), not the page count. A step
owns one (row, kv head) and one block of its query rows, and walks the head's cdiv(length, block_k) key blocks
itself in a `lax.fori_loop`; block_k = pages_per_block * page keys (128 by default) is the width of both matmuls.

Memory. K, V, the stored positions and the page table stay in HBM (`memory_space=ANY`); only the lengths (B*Hkv
int32) and the window are scalar-prefetched. A step copies its head's table into SMEM a slice of `table_chunk`
entries at a time (8 KiB by default, whatever the context), so SMEM holds a few KiB at every shape. Page ids are
clamped into the pool before any copy: entries past a head's pages may be garbage and are never read at all.

DMA pattern. Key block i is one async copy per page for K, V and positions, from the clamped pool page into slot
i % 2 of a [2, block_k, D] VMEM buffer (positions into [2, pages_per_block, page]). Block i + 1 is started before
block i is waited on and computed, so the copies of one block overlap the matmuls of the previous one; each step
issues 3 copies per page of the head and none for pages past its length (the last block's missing pages are
simply not copied: their stale rows are masked). A new table slice is loaded (synchronously, once per
table_chunk / pages_per_block blocks) just before the first block that needs it is started. Decode is
HBM-bandwidth bound: the copies move each used K/V page once per row block (once in total when T*G fits one row
block), and the position pages add 4 bytes per key.

Positions. A page of positions lands as one [1, page] row of the position buffer; the logits need them as one
[1, block_k] lane row. Mosaic has no general sublane-to-lane reshape, so the row is gathered with a one-hot
matmul (exact: 16-bit halves of each int32 in float32 at HIGHEST precision) and a sublane sum.

Rows. The T*G query rows of a head are padded to whole sublane tiles of the narrowest dtype that feeds a matmul
(16 rows for bf16: Mosaic wants bf16 left operands with rows divisible by 16, jax issue 24486), split in blocks of
at most `max_rows` (rounded up to that tile) so long steps bound the VMEM of q, the logits and the accumulator.

Masks (semantics of `paged_attention_reference`): slot < length, stored position <= query position, and query
position - stored position < window. Slots past the length are masked in the logits and zeroed in the values
(they may hold NaN, or stale data of the buffer's previous block). A length-0 head issues no copy and gives 0.

Limits, not yet measured on a TPU (no timing here comes from a device): each grid step starts cold (its table
slice and first block are waited on before any matmul), a bubble per (row, kv head, row block) that a cross-step
prefetch would hide; one block in flight may be too shallow to saturate HBM at batch 1, where only 8 steps run
(pages_per_block is the knob); sliding-window layers still copy every page of the head, since stored positions
are gappy and only known once copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kvzip_kernels.backend import mosaic_precision

SUBLANES = 8  # 32-bit rows per vreg tile; 16-bit dtypes pack twice as many rows per tile
MAX_ROWS = 256  # query rows per block: bounds the VMEM of q, the output and the f32 accumulator for long steps
PAGES_PER_BLOCK = 8  # 128 keys per block at page 16: the MXU width of v5e, half of v6e's
TABLE_CHUNK = 2048  # page-table entries per SMEM slice: 8 KiB, 32K keys per slice at page 16
MASKED = -1e30  # finite "minus infinity": exp(MASKED - m) underflows to 0 without inf - inf = NaN


def _interpret_arg(interpret: bool):
    """The TPU interpreter (models DMAs and semaphores) where this jax has it, else the generic one."""
    if not interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def row_tile(*dtypes) -> int:
    """Rows of one sublane tile of the narrowest dtype: 8 for 32-bit, 16 for bf16, 32 for 8-bit."""
    return SUBLANES * (4 // min(jnp.dtype(x).itemsize for x in dtypes))


def row_tiling(n_rows: int, max_rows: int, tile: int = SUBLANES) -> tuple[int, int]:
    """(padded rows, rows per block): whole `tile`-row tiles, split into blocks of max_rows (rounded up to a
    whole tile) for long steps."""
    max_rows = -(-max_rows // tile) * tile
    if n_rows <= max_rows:
        rows = -(-n_rows // tile) * tile
        return rows, rows
    return -(-n_rows // max_rows) * max_rows, max_rows


def table_slice(width: int, table_chunk: int) -> int:
    """Table entries per SMEM slice: the whole table row when it is shorter than a slice."""
    return min(width, table_chunk)


def smem_bytes(batch: int, hkv: int, width: int, table_chunk: int = TABLE_CHUNK) -> tuple[int, int]:
    """(scalar-prefetch bytes, SMEM scratch bytes) of one call: the lengths and the window; one table slice."""
    return 4 * (batch * hkv + 1), 4 * table_slice(width, table_chunk)


def _positions_row(pos, *, page, precision=jax.lax.Precision.HIGHEST):
    """[pages, page] int32 -> [1, pages * page] (row-major): a one-hot matmul moves each page to its lanes.

    Both 16-bit halves are exact in float32 (one nonzero product per output), so every int32 comes back."""
    pages = pos.shape[0]
    width = pages * page
    col = jax.lax.broadcasted_iota(jnp.int32, (page, width), 1)
    row = jax.lax.broadcasted_iota(jnp.int32, (page, width), 0)
    # spread[j, c] = 1 where lane c holds offset j of its page; own[i, c] = 1 where lane c belongs to page i.
    spread = functools.reduce(jnp.logical_or, [col == row + i * page for i in range(pages)])
    spread = spread.astype(jnp.float32)
    lane = jax.lax.broadcasted_iota(jnp.int32, (pages, width), 1)
    first = jax.lax.broadcasted_iota(jnp.int32, (pages, width), 0) * page
    own = (lane >= first) & (lane < first + page)

    def gather(half):
        tiled = jax.lax.dot_general(half.astype(jnp.float32), spread, (((1,), (0,)), ((), ())),
                                    precision=precision, preferred_element_type=jnp.float32)
        return jnp.sum(jnp.where(own, tiled, 0.0), axis=0, keepdims=True).astype(jnp.int32)

    return gather(pos >> 16) * 65536 + gather(pos & 0xFFFF)


def _kernel(len_ref, win_ref, q_ref, qpos_ref, table_hbm, k_hbm, v_hbm, pos_hbm, o_ref, m_sc, l_sc, acc_sc,
            k_buf, v_buf, pos_buf, table_smem, sems, table_sem, *, scale, softcap, hkv, pages_per_block, chunk,
            precision):
    b, h = pl.program_id(0), pl.program_id(1)
    n_pool, page = k_hbm.shape[0], k_hbm.shape[1]
    width = table_hbm.shape[2]
    block_k = pages_per_block * page
    # Clamped like the page ids: a traced length past the table must not index past the SMEM slice.
    n = jnp.clip(len_ref[b * hkv + h], 0, width * page)
    n_pages = pl.cdiv(n, page)
    n_blocks = pl.cdiv(n, block_k)

    def load_table(first_entry):
        """The table slice holding entry `first_entry` (a multiple of chunk); the last slice of a row ends at the
        row's end, so it may overlap the one before it and never reads past the table."""
        start = jnp.minimum(first_entry, width - chunk)
        copy = pltpu.make_async_copy(table_hbm.at[b, h, pl.ds(start, chunk)], table_smem, table_sem)
        copy.start()
        copy.wait()
        return start

    def page_copies(slot, p, page_id):
        """The K, V and position copies of the block's page p into buffer slot `slot`."""
        dst = pl.ds(p * page, page)
        return (
            pltpu.make_async_copy(k_hbm.at[page_id], k_buf.at[slot, dst], sems.at[0, slot]),
            pltpu.make_async_copy(v_hbm.at[page_id], v_buf.at[slot, dst], sems.at[1, slot]),
            pltpu.make_async_copy(pos_hbm.at[pl.ds(page_id, 1)], pos_buf.at[slot, pl.ds(p, 1)], sems.at[2, slot]),
        )

    def start_block(block, slot, table_start):
        for p in range(pages_per_block):
            entry = block * pages_per_block + p

            @pl.when(entry < n_pages)  # pages past the head's last are never copied, their entries never read
            def _start(entry=entry, p=p):
                # Clamped: a table entry is only data until it is known to name a pool page.
                page_id = jnp.clip(table_smem[entry - table_start], 0, n_pool - 1)
                for dma in page_copies(slot, p, page_id):
                    dma.start()

    def wait_block(block, slot):
        for p in range(pages_per_block):
            # A wait needs only the semaphore and the destination's size: any in-pool source page names them.
            @pl.when(block * pages_per_block + p < n_pages)
            def _wait(p=p):
                for dma in page_copies(slot, p, 0):
                    dma.wait()

    m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
    q = q_ref[...]  # [R, D]
    qpos = qpos_ref[...]  # [R, 1]
    window = win_ref[0]

    @pl.when(n_blocks > 0)
    def _prologue():
        start_block(0, 0, load_table(0))

    def body(i, table_start):
        slot = i % 2
        nxt = i + 1
        first_entry = nxt * pages_per_block
        # Block i + 1 may open a new table slice; its entries are read only when its copies start, here.
        table_start = jax.lax.cond((nxt < n_blocks) & (first_entry % chunk == 0),
                                   lambda: load_table(first_entry), lambda: table_start)

        @pl.when(nxt < n_blocks)
        def _prefetch():
            start_block(nxt, 1 - slot, table_start)

        wait_block(i, slot)
        k = k_buf[slot].astype(q.dtype)  # [block_k, D]
        v = v_buf[slot]
        kpos = _positions_row(pos_buf[slot], page=page)  # [1, block_k]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        slot_ids = i * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        ok = (slot_ids < n) & (kpos <= qpos) & (qpos - kpos < window)
        s = jnp.where(ok, s, MASKED)  # also drops NaN logits of slots past the length
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        # p is 0 there, but 0 * NaN is NaN: zero the values of slots past the length (NaN or stale rows) too.
        stored = i * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < n
        v = jnp.where(stored, v, jnp.zeros((), v.dtype))
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        m_sc[...] = m_new
        l_sc[...] = l_sc[...] * alpha + p.sum(axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha + pv
        return table_start

    jax.lax.fori_loop(0, n_blocks, body, jnp.int32(0))
    total = l_sc[...]
    # A head with no visible pair (length 0) has total == 0: its output is 0, not 0/0.
    o_ref[...] = (acc_sc[...] / jnp.where(total > 0, total, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "interpret", "max_rows", "precision",
                                             "pages_per_block", "table_chunk"))
def paged_attention_tpu(q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions, window, *, scale: float,
                        softcap: float | None = None, interpret: bool = False, max_rows: int = MAX_ROWS,
                        precision: jax.lax.Precision | None = None, pages_per_block: int = PAGES_PER_BLOCK,
                        table_chunk: int = TABLE_CHUNK):
    """q [B, T, Hkv, G, D]; k/v_pages [N, page, D]; pos_pages [N, page]; page_table [B, Hkv, P]; lengths [B, Hkv];
    q_positions [B, T]; window: int32 scalar (int32 max = no window). Returns [B, T, Hkv, G, D] in q's dtype.

    precision: of the two attention matmuls (`backend.mosaic_precision`: HIGH runs as HIGHEST, bf16 as DEFAULT;
    None: the platform's default). Tunables (static): max_rows (query
    rows per grid step, a multiple of 8, rounded up to 16 for bf16), pages_per_block (keys per matmul =
    pages_per_block * page), table_chunk (page-table entries per SMEM slice, a multiple of pages_per_block).
    Inputs are assumed checked (see `kvzip_kernels.dispatch`).
    """
    b, t, hkv, g, d = q.shape
    page = k_pages.shape[1]
    width = page_table.shape[-1]
    if max_rows < SUBLANES or max_rows % SUBLANES:
        raise ValueError(f"max_rows must be a positive multiple of {SUBLANES}, got {max_rows}")
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block must be >= 1, got {pages_per_block}")
    if table_chunk < pages_per_block or table_chunk % pages_per_block:
        raise ValueError(f"table_chunk must be a positive multiple of pages_per_block={pages_per_block}, "
                         f"got {table_chunk}")
    chunk = table_slice(width, table_chunk)
    precision = mosaic_precision(precision, q.dtype)
    rows, block_rows = row_tiling(t * g, max_rows, row_tile(q.dtype, v_pages.dtype))
    # Row r = t * G + g of a (row, kv head) tile; padding rows get position -1 so they see nothing (output 0).
    q_rows = q.transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    qpos = jnp.repeat(q_positions.astype(jnp.int32), g, axis=1)
    qpos = jnp.pad(qpos, ((0, 0), (0, rows - t * g)), constant_values=-1)[:, :, None]  # [B, R, 1]
    lens_flat = lengths.astype(jnp.int32).reshape(-1)  # SMEM pads 2-D arrays to whole tiles: flat
    win = jnp.reshape(jnp.asarray(window, jnp.int32), (1,))

    def rows_map(i, h, r, *_):
        return i, h, r, 0

    kernel = functools.partial(
        _kernel, scale=np.float32(scale), softcap=None if softcap is None else np.float32(softcap), hkv=hkv,
        pages_per_block=pages_per_block, chunk=chunk, precision=precision,
    )
    block_k = pages_per_block * page
    in_hbm = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, rows // block_rows),
        in_specs=[
            pl.BlockSpec((None, None, block_rows, d), rows_map),
            pl.BlockSpec((None, block_rows, 1), lambda i, h, r, *_: (i, r, 0)),
            in_hbm, in_hbm, in_hbm, in_hbm,  # table, K, V, positions: copied by the kernel
        ],
        out_specs=pl.BlockSpec((None, None, block_rows, d), rows_map),
        scratch_shapes=[
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, d), jnp.float32),
            pltpu.VMEM((2, block_k, d), k_pages.dtype),
            pltpu.VMEM((2, block_k, d), v_pages.dtype),
            pltpu.VMEM((2, pages_per_block, page), jnp.int32),
            pltpu.SMEM((chunk,), jnp.int32),
            pltpu.SemaphoreType.DMA((3, 2)),
            pltpu.SemaphoreType.DMA(()),
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=_interpret_arg(interpret),
        name="paged_attention_tpu",
    )(lens_flat, win, q_rows, qpos, page_table.astype(jnp.int32), k_pages, v_pages, pos_pages.astype(jnp.int32))
    return out[:, :, : t * g].reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4)
