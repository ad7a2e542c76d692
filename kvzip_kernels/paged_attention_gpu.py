"""Paged decode attention as a split-K (flash-decoding) Pallas kernel with the Triton lowering (GPU; also runs in
CPU interpret mode).

Decode reads every kept K/V byte once and does little arithmetic on it, so the kernel is bound by memory bandwidth
and the whole GPU has to be reading. One program per (batch row, kv head) (the previous schedule) is 8 programs at
batch 1 on a 132-SM H100. Here each head's pages are split across `num_splits` programs:

- Pass 1, grid (B, Hkv, splits, row tiles): the program reads its head's length, takes its share of the head's
  pages (`[s * pages // S, (s + 1) * pages // S)`: every split of a head gets the same number of pages to within
  one, whatever the head's length, so ragged heads balance across their programs) and runs an online softmax over
  them, `pages_per_step` pages gathered through the page table into one [block_keys, D] tile per loop step (>= 64
  keys: wide enough for the tensor cores and for several pages' loads in flight). It writes its unnormalised
  output with its running max and sum (float32).
- Pass 2 (jnp, one fused XLA reduction over the splits): rescales each split by exp(m_s - max m) and divides by the
  summed weights. Its traffic is splits x rows x D x 4 bytes per head, small next to the K/V it summarises.

The split count is static (from shapes, not lengths): enough programs for `WAVES` waves of the GPU's SMs at this
batch (the SM count of the default device when it is a GPU, else an H100's 132), at most one split per
`pages_per_step` table entries. At batch 64 x 8 heads that is 1-2 splits; at batch 1 it is ~66.

The G query heads of a kv head and its T new tokens are one [T*G, D] tile (padded to a power of two >= 16, split in
tiles of `max_rows`), so each K/V byte is read once per group. A split whose last step runs past its share repeats
its last page (a cache hit) and masks it. Triton needs power-of-2 sizes on every load and tiles of at least 16 for
`dot`: `check_gpu_shapes` refuses page sizes and head dims that are not. Semantics are those of
`paged_attention_reference`.

Precision: the dots run at `precision` (see `kvzip_kernels.backend.resolve_precision`). With float32 caches,
DEFAULT and HIGH let Triton use TF32 (10-bit mantissa: ~1e-3 relative error in each logit and value product);
HIGHEST keeps IEEE float32. bf16 caches are exact in every mode (products accumulate in float32).
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
BLOCK_KEYS = 64  # keys per loop step (pages_per_step = BLOCK_KEYS // page)
H100_SMS = 132  # the SM count assumed when the default device is not a GPU (lowering on a CPU host)
WAVES = 4  # programs per SM the split count aims for: enough to hide the imbalance of ragged heads
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


def default_sm_count() -> int:
    """The SM count of the default device when it is a GPU (jax reports it as `core_count`), else an H100's."""
    device = jax.devices()[0]
    count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(count) if count else H100_SMS


def split_count(programs_per_split: int, table_width: int, pages_per_step: int, sm_count: int) -> int:
    """Splits per head so that the grid holds WAVES x sm_count programs, each split at least one loop step of the
    table (a head never has more pages than table entries)."""
    wanted = -(-WAVES * sm_count // programs_per_split)
    return max(1, min(wanted, -(-table_width // pages_per_step)))


def _partial_kernel(len_ref, win_ref, table_ref, q_ref, qpos_ref, k_ref, v_ref, pos_ref, o_ref, m_ref, l_ref, *,
                    scale, softcap, num_pages, num_splits, pages_per_step, hkv, width, precision):
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page = k_ref.shape[1]
    d = k_ref.shape[2]
    # Clamped like the page ids: a traced length past the table must not walk into the next head's table row.
    n = jnp.clip(len_ref[b, h], 0, width * page)
    window = win_ref[0]
    block_keys = pages_per_step * page
    q = q_ref[...]  # [R, D]
    qpos = qpos_ref[...]  # [R, 1]
    rows = q.shape[0]
    head_pages = pl.cdiv(n, page)
    # This split's share of the head's pages: equal to within one page for every split, whatever the length.
    start = (s * head_pages) // num_splits
    end = ((s + 1) * head_pages) // num_splits
    row_base = (b * hkv + h) * width  # the flat table's row of this head
    in_step = jnp.arange(pages_per_step, dtype=jnp.int32)
    key_offsets = jnp.arange(block_keys, dtype=jnp.int32)
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32, precision=precision)

    def step(i, carry):
        m, total, acc = carry
        first = start + i * pages_per_step
        # Slots past the split's end repeat its last page (already in cache) and are masked below; page ids are
        # clamped so that a corrupt table entry can never address outside the pool.
        slots = jnp.minimum(first + in_step, end - 1)
        page_ids = jnp.clip(table_ref[row_base + slots], 0, num_pages - 1)  # [pages_per_step]
        k = k_ref[page_ids].reshape(block_keys, d).astype(q.dtype)
        v = v_ref[page_ids].reshape(block_keys, d)
        kpos = pos_ref[page_ids].reshape(1, block_keys)
        token = first * page + key_offsets
        stored = (token < end * page) & (token < n)  # [block_keys]
        logits = dot(q, k, (((1,), (1,)), ((), ()))) * scale
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        ok = stored[None, :] & (kpos <= qpos) & (qpos - kpos < window)
        logits = jnp.where(ok, logits, MASKED)  # also drops NaN logits of slots past the length
        m_new = jnp.maximum(m, logits.max(axis=1))
        p = jnp.where(ok, jnp.exp(logits - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        # p is 0 there, but 0 * NaN is NaN: zero the values of slots past the length too.
        v = jnp.where(stored[:, None], v, jnp.zeros((), v.dtype))
        pv = dot(p.astype(v.dtype), v, (((1,), (0,)), ((), ())))
        return m_new, total * alpha + p.sum(axis=1), acc * alpha[:, None] + pv

    init = (
        jnp.full((rows,), MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )
    m, total, acc = jax.lax.fori_loop(0, pl.cdiv(end - start, pages_per_step), step, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = total


def merge_splits(acc, m, total):
    """acc [..., S, R, D], m / total [..., S, R] (float32) -> [..., R, D]: the splits' softmaxes as one.

    A split that saw no pair has m = MASKED and weight exp(MASKED - max m) = 0 beside any split that did; a row no
    split saw (an empty head, a padding row) has total 0 and output exactly 0, not 0/0."""
    top = m.max(axis=-2, keepdims=True)
    weight = jnp.exp(m - top)
    total = (total * weight).sum(axis=-2)
    acc = (acc * weight[..., None]).sum(axis=-3)
    return acc / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=("scale", "softcap", "interpret", "max_rows", "block_keys", "num_splits", "num_warps",
                     "num_stages", "precision", "sm_count"),
)
def paged_attention_gpu(q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions, window, *, scale: float,
                        softcap: float | None = None, interpret: bool = False, max_rows: int = MAX_ROWS,
                        block_keys: int = BLOCK_KEYS, num_splits: int | None = None, num_warps: int = 4,
                        num_stages: int = 2, precision: jax.lax.Precision | None = None, sm_count: int | None = None):
    """q [B, T, Hkv, G, D]; k/v_pages [N, page, D]; pos_pages [N, page]; page_table [B, Hkv, P]; lengths [B, Hkv];
    q_positions [B, T]; window: int32 scalar (int32 max = no window). Returns [B, T, Hkv, G, D] in q's dtype.

    block_keys: keys per loop step (a power of two; at least one page). num_splits: programs per head (None: from
    the shapes and the SM count, see `split_count`; 1 with block_keys = page is the previous one-program-per-head
    schedule). Inputs are assumed checked (see `kvzip_kernels.dispatch`); page size and head_dim must pass
    `check_gpu_shapes`.
    """
    b, t, hkv, g, d = q.shape
    n_pool, page = k_pages.shape[:2]
    width = page_table.shape[-1]
    check_gpu_shapes(page, d)
    if not _is_pow2(max_rows) or max_rows < MIN_TILE:
        raise ValueError(f"max_rows must be a power of two >= {MIN_TILE}, got {max_rows}")
    if not _is_pow2(block_keys):
        raise ValueError(f"block_keys must be a power of two, got {block_keys}")
    pages_per_step = max(1, block_keys // page)
    rows, block_rows = row_tiling(t * g, max_rows)
    row_tiles = rows // block_rows
    if num_splits is None:
        num_splits = split_count(b * hkv * row_tiles, width, pages_per_step, sm_count or default_sm_count())
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # Row r = t * G + g of a (row, kv head) tile; padding rows get position -1 so they see nothing (output 0).
    q_rows = q.transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    qpos = jnp.repeat(q_positions.astype(jnp.int32), g, axis=1)
    qpos = jnp.pad(qpos, ((0, 0), (0, rows - t * g)), constant_values=-1)[:, :, None]  # [B, R, 1]
    win = jnp.reshape(jnp.asarray(window, jnp.int32), (1,))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, j, s, r: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(
        _partial_kernel, scale=np.float32(scale), softcap=None if softcap is None else np.float32(softcap),
        num_pages=n_pool, num_splits=num_splits, pages_per_step=pages_per_step, hkv=hkv, width=width,
        precision=precision,
    )
    acc, m, total = pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits, row_tiles),
        in_specs=[
            whole(lengths.shape),
            whole((1,)),
            whole((b * hkv * width,)),
            pl.BlockSpec((None, None, block_rows, d), lambda i, j, s, r: (i, j, r, 0)),
            pl.BlockSpec((None, block_rows, 1), lambda i, j, s, r: (i, r, 0)),
            whole(k_pages.shape),
            whole(v_pages.shape),
            whole(pos_pages.shape),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_rows, d), lambda i, j, s, r: (i, j, s, r, 0)),
            pl.BlockSpec((None, None, None, block_rows), lambda i, j, s, r: (i, j, s, r)),
            pl.BlockSpec((None, None, None, block_rows), lambda i, j, s, r: (i, j, s, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, num_splits, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, num_splits, rows), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_gpu",
    )(lengths.astype(jnp.int32), win, page_table.astype(jnp.int32).reshape(-1), q_rows, qpos, k_pages, v_pages,
      pos_pages.astype(jnp.int32))
    # Only the real rows go through the merge: XLA fuses the slice into the reduction's reads.
    out = merge_splits(acc[:, :, :, : t * g], m[:, :, :, : t * g], total[:, :, :, : t * g])
    return out.astype(q.dtype).reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4)
