"""Attention kernels on one device, in one run: copy bandwidth, the paged decode kernel against itself and against
full-cache baselines, and the KVzip scoring kernel against its reference.

GPU (H200), everything (writes bench_attention.json / .csv under --out, default $OUT or demo_out/bench_attention):
    python scripts/bench_attention.py
CPU smoke test (tiny shapes, Pallas in interpret mode, a few repeats; checks that every path runs):
    python scripts/bench_attention.py --smoke

Sections (--sections; run as copy, scoring, [tune], then decode and baselines per (batch, context), largest first):
- copy: a jitted copy of a large array (--copy-gib); bandwidth = bytes read + written / median time.
- decode: `kvzip_kernels.paged_attention` (pallas_gpu) at one Llama-3-8B layer (Hkv=8, G=4, D=128, bf16, T=1 new token)
  for every --batches x --contexts x --ratios. Each (row, kv head) keeps round(r * context * f) pairs, f spread
  evenly over [1 - s, 1 + s] (s = --spread, 0.2; smaller where r * (1 + s) > 1, so ratio 1.0 keeps everything) and
  permuted per row: KVzip's head-wise budgets are non-uniform, the mean is r. Pairs sit in pages of the default page
  size, each head's pages contiguous (as compaction lays them out); unused table entries point to page 0. Stored
  positions are 0..length-1 and the new token sits at position = context, so every kept pair is visible.
  Achieved bandwidth = kept K+V bytes (sum of lengths * D * 2 * itemsize) / median time, also as % of the copy
  bandwidth; speedup against ratio 1.0 of the same (batch, context) and against the best full-cache baseline.
  Side by side ("old"): the same kernel on the previous schedule (one program per (row, kv head), one page per
  step, no split), timed on the same inputs.
- baselines: the full dense cache of the same (batch, context), each implementation given its own layout
  (named in brackets): `jax.nn.dot_product_attention` "cudnn" on [B, S, Hkv, D] (its documented layout), "xla" on
  [B, S, Hkv, D] and on [B, Hkv, S, D] (our DenseKVCache layout), and jax's shipped GPU decode kernel
  (`jax.experimental.pallas.ops.gpu.decode_attention.gqa`) on [B, Hkv, S, D], the layout its inner kernel reads.
  A baseline that fails (shape unsupported, import gone) is a row with status "error" and the message.
- tune (only when named): the decode kernel at --tune-shapes, ratio 0.3, on each of TUNE_GRID's schedules
  (block_keys 64/128 x num_warps 4/8 x num_stages 2/3/4), to pick the defaults on the real GPU.
- scoring: `kvzip_kernels.kvzip_scores` pallas_gpu against the reference at chunks --score-chunks (n_sys 64, T = m + 32
  repeat rows, B=1, Hkv=8, G=4, D=128, bf16): median time and XLA's temporaries of the compiled call
  (`memory_analysis().temp_size_in_bytes`), next to the bytes a full [T, keys] logits matrix would take.

Method: every kernel is first compared with a float32 reference at one small configuration (relative L2 error and
max abs diff printed); a kernel that fails its check is not timed. Every timed decode / baseline configuration is
also spot-checked: the first row of the first input set and the last row of the last set (the highest offsets of
the pool, where an index overflow would show) against the float32 reference; a row over tolerance is reported as
"spot check failed" and left out of the speedups and targets. Timings: one call to compile, one warm call, then
the median (scripts/bench_generate.median_time) of --repeats calls, each blocked until ready. To keep small
shapes out of the L2 cache, each timed call runs the op on n_sets distinct copies of the inputs (enough copies for
~--rotate-mib MiB, at most --max-sets, unrolled in one jitted call); time per op = median / n_sets.
Memory rule: a (batch, context) whose paged pool (sized for the largest ratio, n_sets copies) or dense cache needs
more than --mem-frac of the device's memory limit (memory_stats()["bytes_limit"]; on CPU of physical RAM) is
skipped and reported as skipped. Results are written after every (batch, context), so a run stopped by a timeout
still leaves its rows; --time-budget stops starting new groups once exceeded (largest groups run first).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import gc
import importlib.metadata
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere without installing the package
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_generate import hbm_bandwidth, median_time  # noqa: E402  (same folder: one timing rule everywhere)

from kvzip_jax.kvzip.compact import DEFAULT_PAGE_SIZE  # noqa: E402
from kvzip_kernels import kvzip_scores, paged_attention  # noqa: E402

HKV, GROUP, HEAD_DIM = 8, 4, 128  # Llama-3-8B: 32 query heads over 8 kv heads, head_dim 128
DTYPE = jnp.bfloat16
SECTIONS = ("copy", "decode", "baselines", "scoring")
OPTIONAL_SECTIONS = ("tune",)  # run only when named
# The decode kernel's schedules that the tune section times (each compiles once: ~12 compiles per shape).
TUNE_GRID = tuple(dict(block_keys=k, num_warps=w, num_stages=st) for k in (64, 128) for w in (4, 8) for st in (2, 3, 4))
# (implementation, storage layout of the dense cache): "bskd" = [B, S, Hkv, D] (dot_product_attention's documented
# layout), "bhsd" = [B, Hkv, S, D] (our DenseKVCache layout, and the one gqa's inner kernel reads: gqa swaps the axes
# of its [B, S, Hkv, D] arguments, so it is given swapaxes of bhsd storage and XLA cancels the two transposes).
BASELINES = (("dpa_cudnn", "bskd"), ("dpa_xla", "bskd"), ("dpa_xla", "bhsd"), ("gqa_decode_attention", "bhsd"))
BASELINE_NAMES = tuple(f"{n}[{layout}]" for n, layout in BASELINES)
REL_TOL = 2e-2  # bf16 operands and outputs: ||out - ref|| / ||ref|| lands between 1e-3 and 1e-2
SCORE_TOL = 1e-3  # scores are probabilities in [0, 1]; kernel and reference both accumulate in f32


# ------------------------------------------------------------------------------------------------ helpers
def _csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _csv_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _mix(h):
    """A 32-bit integer hash (lowbias32): every step is elementwise, so XLA fuses the whole fill into one pass."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def hash_fill(seed, amp, *, shape, dtype):
    """Uniform(-amp, amp) pseudo-random values without temporaries (jax.random would materialise its bits first).

    Random, not zeros: zeros hide unwritten outputs and can run faster than real data."""
    h = jnp.full(shape, seed, jnp.uint32) * jnp.uint32(0x9E3779B9)
    for axis in range(len(shape)):
        salt = jnp.uint32((0x632BE5AB * (axis + 1)) & 0xFFFFFFFF)
        h = _mix(h ^ (jax.lax.broadcasted_iota(jnp.uint32, shape, axis) + salt))
    u = (h >> 8).astype(jnp.float32) * np.float32(2.0 / (1 << 24)) - 1.0
    return (u * amp).astype(dtype)


def fill(seed: int, shape, amp: float = 1.0, dtype=DTYPE):
    return hash_fill(jnp.uint32(seed), jnp.float32(amp), shape=tuple(int(x) for x in shape), dtype=jnp.dtype(dtype))


def highest_precision():
    """float32 matmuls at full precision for the references (GPUs otherwise may use TF32)."""
    ctx = getattr(jax, "default_matmul_precision", None)
    return ctx("highest") if ctx is not None else contextlib.nullcontext()


def rel_err(out, ref) -> tuple[float, float]:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not np.isfinite(out).all():
        return math.inf, math.inf
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)), float(np.abs(out - ref).max())


def all_finite(outs) -> bool:
    return all(bool(jnp.isfinite(jnp.asarray(o, jnp.float32)).all()) for o in jax.tree.leaves(outs))


def time_op(fn, args, n_sets: int, repeats: int):
    """Compile, warm, then the median of `repeats` blocked calls; per-op seconds = median / n_sets.

    Returns (stats, outputs of the first call) so that the caller can check what was timed."""
    t0 = time.perf_counter()
    outs = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    finite = all_finite(outs)
    jax.block_until_ready(fn(*args))
    med = median_time(lambda: jax.block_until_ready(fn(*args)), repeats)
    return dict(median_s=med / n_sets, call_median_s=med, compile_s=compile_s, finite=finite), outs


def device_memory_limit() -> tuple[int, str]:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device memory_stats bytes_limit"
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host physical memory"
    except (ValueError, OSError, AttributeError):
        return 16 << 30, "assumed 16 GiB"


def n_sets_for(set_bytes: float, args) -> int:
    return int(min(args.max_sets, max(1, math.ceil(args.rotate_mib * 2**20 / max(set_bytes, 1)))))


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(args) -> dict:
    dev = jax.devices()[0]
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {n: _version(n) for n in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton")}
    return dict(
        command=" ".join(["python", *sys.argv]),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.machine()} {os.cpu_count()} cores", backend=jax.default_backend(),
        device=str(dev.device_kind), device_count=jax.device_count(), python=platform.python_version(),
        versions={k: v for k, v in versions.items() if v}, git_commit=commit, smoke=args.smoke,
        interpret=args.interpret, shape=dict(hkv=HKV, group=GROUP, head_dim=HEAD_DIM, dtype=jnp.dtype(DTYPE).name,
                                             page_size=args.page_size, new_tokens=1),
    )


# ------------------------------------------------------------------------------------------------ paged pool
def head_lengths(perms: np.ndarray, context: int, ratio: float, spread: float) -> np.ndarray:
    """[S, B, Hkv] kept pairs: round(r * context * f), f evenly spread over [1 - s, 1 + s] (mean 1), permuted."""
    s = 0.0 if ratio >= 1.0 else min(spread, (1.0 - ratio) / ratio)
    factors = np.linspace(1.0 - s, 1.0 + s, perms.shape[-1])[perms]
    return np.clip(np.rint(ratio * context * factors), 1, context).astype(np.int32)


def build_pool(batch: int, context: int, ratios: list[float], n_sets: int, page: int, spread: float, seed: int):
    """Host plan + device arrays of a pool holding n_sets independent caches sized for the largest ratio.

    Returns (pool dict, per-ratio list of (tables, lengths) with one [B, Hkv, P] table and [B, Hkv] lengths per set).
    A lower ratio uses the first pages of each head's range: its pairs are contiguous, as after compaction."""
    rng = np.random.default_rng(seed)
    perms = np.stack([np.stack([rng.permutation(HKV) for _ in range(batch)]) for _ in range(n_sets)])
    lengths = {r: head_lengths(perms, context, r, spread) for r in ratios}
    needed = {r: -(-lengths[r] // page) for r in ratios}
    alloc = np.maximum(np.max(np.stack(list(needed.values())), axis=0), 1)  # [S, B, Hkv] pages per head range
    first = (np.cumsum(alloc.ravel()) - alloc.ravel()).reshape(alloc.shape)
    n_pages, width = int(alloc.sum()), int(alloc.max())
    steps = np.arange(width)
    per_ratio = {}
    for r in ratios:
        table = np.where(steps < needed[r][..., None], first[..., None] + steps, 0).astype(np.int32)
        per_ratio[r] = ([jnp.asarray(table[s]) for s in range(n_sets)],
                        [jnp.asarray(lengths[r][s]) for s in range(n_sets)], lengths[r])
    rank = np.arange(n_pages, dtype=np.int64) - np.repeat(first.ravel(), alloc.ravel())  # page index in its head
    pos = (jnp.asarray(rank.astype(np.int32))[:, None] * page + jnp.arange(page, dtype=jnp.int32)[None, :])
    pool = dict(
        k_pages=fill(seed * 7 + 1, (n_pages, page, HEAD_DIM), amp=2.0),
        v_pages=fill(seed * 7 + 2, (n_pages, page, HEAD_DIM)),
        pos_pages=pos.astype(jnp.int32),
        q=fill(seed * 7 + 3, (batch, 1, HKV, GROUP, HEAD_DIM)),
        q_positions=jnp.full((batch, 1), context, jnp.int32),  # the new token follows every stored pair
    )
    return pool, per_ratio


def pool_bytes(batch: int, context: int, ratios: list[float], n_sets: int, page: int, spread: float) -> int:
    """Upper bound of the pool's device bytes (K, V, positions, tables), before building it."""
    r = max(ratios)
    s = 0.0 if r >= 1.0 else min(spread, (1.0 - r) / r)
    pages = n_sets * batch * HKV * (-(-min(context, math.ceil(r * context * (1 + s))) // page) + 1)
    itemsize = jnp.dtype(DTYPE).itemsize
    return pages * page * (2 * HEAD_DIM * itemsize + 4) + len(ratios) * pages * 4


def paged_fn(backend: str, interpret: bool, scale: float, schedule: dict | None = None):
    """The dispatcher's call, or with `schedule` (num_splits, block_keys) the Triton kernel itself on that
    schedule: {num_splits: 1, block_keys: page} is the previous kernel's one program per head, one page per step."""
    if schedule is not None:
        from kvzip_kernels.dispatch import NO_WINDOW
        from kvzip_kernels.paged_attention_gpu import paged_attention_gpu

        def run(q, k_pages, v_pages, pos_pages, tables, lengths, q_positions):
            return [paged_attention_gpu(q, k_pages, v_pages, pos_pages, t, n, q_positions, jnp.int32(NO_WINDOW),
                                        scale=scale, interpret=interpret, **schedule)
                    for t, n in zip(tables, lengths, strict=True)]

        return jax.jit(run)

    def run(q, k_pages, v_pages, pos_pages, tables, lengths, q_positions):
        return [paged_attention(q, k_pages, v_pages, pos_pages, t, n, q_positions, scale=scale, backend=backend,
                                interpret=interpret) for t, n in zip(tables, lengths, strict=True)]

    return jax.jit(run)


def paged_spot_check(pool, table, lengths, out, b: int, scale: float) -> float:
    """Relative L2 error of the kernel's row b against the float32 reference over that row's pages alone.

    Row b's pages are gathered into a small pool first, so the reference stays small at any batch; checking the
    last row of the last set (the pool's highest page indices) catches offset overflow on large pools."""
    hkv, width = table.shape[1:]
    idx = table[b]  # [Hkv, P]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    sub = dict(k=f32(pool["k_pages"][idx]).reshape(hkv * width, *pool["k_pages"].shape[1:]),
               v=f32(pool["v_pages"][idx]).reshape(hkv * width, *pool["v_pages"].shape[1:]),
               pos=pool["pos_pages"][idx].reshape(hkv * width, -1))
    sub_table = jnp.arange(hkv * width, dtype=jnp.int32).reshape(1, hkv, width)
    with highest_precision():
        ref = paged_attention(f32(pool["q"][b : b + 1]), sub["k"], sub["v"], sub["pos"], sub_table,
                              lengths[b : b + 1], pool["q_positions"][b : b + 1], scale=scale, backend="reference")
    return rel_err(out[b : b + 1], ref)[0]


# ------------------------------------------------------------------------------------------------ baselines
def load_gqa():
    """jax's shipped GPU decode attention, or (None, why): the module is deprecated in newer jax."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.pallas.ops.gpu.decode_attention import gqa
        return gqa, None
    except Exception as e:  # ImportError, or anything the deprecated module raises on import
        return None, f"{type(e).__name__}: {e}"


def baseline_fn(name: str, layout: str, context: int, scale: float, interpret: bool):
    """A jitted fn(q, ks, vs) -> list of [B, N, D] outputs over the n_sets dense caches stored in `layout`.

    q is [B, 1, N, D]; the [B, S, Hkv, D] view of bhsd storage is a swapaxes inside the jit."""
    view = (lambda x: x) if layout == "bskd" else (lambda x: jnp.swapaxes(x, 1, 2))
    if name.startswith("dpa_"):
        impl = name.removeprefix("dpa_")

        def one(q, k, v):
            out = jax.nn.dot_product_attention(q, view(k), view(v), scale=scale, implementation=impl)
            return out[:, 0]
    else:
        gqa, why = load_gqa()
        if gqa is None:
            raise RuntimeError(f"jax.experimental.pallas.ops.gpu.decode_attention.gqa unavailable: {why}")
        k_splits = 16
        if context % k_splits or context // k_splits < 16:
            raise ValueError(f"gqa needs a context divisible by k_splits={k_splits} with >= 16 per split, "
                             f"got {context}")
        kw = dict(sm_scale=scale, k_splits=k_splits, block_k=min(128, context // k_splits), interpret=interpret)
        accepted = inspect.signature(gqa).parameters
        kw = {k: v for k, v in kw.items() if k in accepted}

        def one(q, k, v):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return gqa(q[:, 0], view(k), view(v), **kw)

    return jax.jit(lambda q, ks, vs: [one(q, k, v) for k, v in zip(ks, vs, strict=True)])


def dense_data(seed: int, batch: int, context: int, layout: str):
    shape = (batch, context, HKV, HEAD_DIM) if layout == "bskd" else (batch, HKV, context, HEAD_DIM)
    return fill(seed, shape, amp=2.0), fill(seed + 1, shape)


def dense_reference(q, k, v, scale, layout: str = "bskd"):
    """float32, highest precision: q [B, 1, N, D], k/v in `layout` -> [B, N, D]."""
    if layout == "bhsd":
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    b, t, n, d = q.shape
    hkv = k.shape[2]
    with highest_precision():
        qg = q.astype(jnp.float32).reshape(b, t, hkv, n // hkv, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, n, d)


# ------------------------------------------------------------------------------------------------ sections
def section_copy(args, results):
    gib = args.copy_gib
    t0 = time.perf_counter()
    bw = hbm_bandwidth(gib, args.repeats)
    row = dict(section="copy", impl="jit copy (x * 1.0001, f32)", bytes=int(2 * gib * 2**30), gb_s=bw / 1e9,
               wall_s=time.perf_counter() - t0, status="ok")
    results["copy"] = [row]
    print(f"[copy] {gib:g} GiB array: {bw / 1e9:.1f} GB/s (read + write)", flush=True)
    return bw


def check_decode(args, scale) -> dict:
    """The Pallas decode kernel against the float32 reference at one small configuration (ratio 0.3, spread)."""
    b, ctx = 2, args.check_context
    pool, per_ratio = build_pool(b, ctx, [0.3], 1, args.page_size, args.spread, seed=args.seed + 101)
    tables, lengths, _ = per_ratio[0.3]
    ins = (pool["q"], pool["k_pages"], pool["v_pages"], pool["pos_pages"], tables, lengths, pool["q_positions"])
    row = dict(section="check", impl="pallas_gpu paged_attention", batch=b, context=ctx, ratio=0.3)
    try:
        out = paged_fn("pallas_gpu", args.interpret, scale)(*ins)[0]
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        with highest_precision():
            ref = paged_attention(f32(pool["q"]), f32(pool["k_pages"]), f32(pool["v_pages"]), pool["pos_pages"],
                                  tables[0], lengths[0], pool["q_positions"], scale=scale, backend="reference")
        rel, mad = rel_err(out, ref)
        row.update(rel_err=rel, max_abs_diff=mad, status="ok" if rel <= REL_TOL else "check failed")
    except Exception as e:  # record and go on: the kernel's rows become "not timed"
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
        traceback.print_exc()
    return row


def check_baselines(args, scale) -> dict[str, dict]:
    b, ctx = 2, args.check_context
    q = fill(args.seed + 201, (b, 1, HKV * GROUP, HEAD_DIM))
    rows = {}
    for (name, layout), label in zip(BASELINES, BASELINE_NAMES, strict=True):
        row = dict(section="check", impl=label, batch=b, context=ctx, ratio=1.0)
        try:
            k, v = dense_data(args.seed + 202, b, ctx, layout)
            ref = dense_reference(q, k, v, scale, layout)
            out = baseline_fn(name, layout, ctx, scale, args.interpret)(q, [k], [v])[0]
            rel, mad = rel_err(out, ref)
            row.update(rel_err=rel, max_abs_diff=mad, status="ok" if rel <= REL_TOL else "check failed")
        except Exception as e:  # an unsupported implementation is a reported row, not a crash
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
        rows[label] = row
    return rows


def run_decode_group(args, batch, context, scale, copy_bw, kernel_ok, results, cap):
    ratios = sorted(args.ratios, reverse=True)
    itemsize = jnp.dtype(DTYPE).itemsize
    set_bytes_min = batch * HKV * min(ratios) * context * HEAD_DIM * 2 * itemsize
    n_sets = n_sets_for(set_bytes_min, args)
    while n_sets > 1 and pool_bytes(batch, context, ratios, n_sets, args.page_size, args.spread) > cap:
        n_sets -= 1
    need = pool_bytes(batch, context, ratios, n_sets, args.page_size, args.spread)
    base = dict(section="decode", impl="pallas_gpu", batch=batch, context=context)
    if need > cap:
        for r in ratios:
            results["decode"].append(dict(base, ratio=r, status="skipped",
                                          error=f"pool {need / 1e9:.1f} GB > cap {cap / 1e9:.1f} GB"))
        return
    if not kernel_ok:
        for r in ratios:
            results["decode"].append(dict(base, ratio=r, status="not timed", error="kernel failed its check"))
        return
    pool, per_ratio = build_pool(batch, context, ratios, n_sets, args.page_size, args.spread, seed=args.seed)
    fn = paged_fn("pallas_gpu", args.interpret, scale)
    # The previous schedule, side by side: one program per (row, kv head), one page per loop step.
    old_fn = paged_fn("pallas_gpu", args.interpret, scale, dict(num_splits=1, block_keys=args.page_size))
    for r in ratios:
        tables, lengths, host_lengths = per_ratio[r]
        row = dict(base, ratio=r, n_sets=n_sets, kept_ratio=float(host_lengths.mean() / context))
        kept_pairs = int(host_lengths.sum()) / n_sets
        pages_read = int((-(-host_lengths // args.page_size)).sum()) / n_sets
        row["kv_bytes"] = int(kept_pairs * HEAD_DIM * 2 * itemsize)
        row["read_bytes"] = int(pages_read * args.page_size * (HEAD_DIM * 2 * itemsize + 4))
        try:
            ins = (pool["q"], pool["k_pages"], pool["v_pages"], pool["pos_pages"], tables, lengths,
                   pool["q_positions"])
            stats, outs = time_op(fn, ins, n_sets, args.repeats)
            row.update(stats)
            row["spot_rel_err"] = max(paged_spot_check(pool, tables[0], lengths[0], outs[0], 0, scale),
                                      paged_spot_check(pool, tables[-1], lengths[-1], outs[-1], batch - 1, scale))
            del outs
            row["gb_s"] = row["kv_bytes"] / row["median_s"] / 1e9
            if copy_bw:
                row["pct_copy_bw"] = 100 * row["kv_bytes"] / row["median_s"] / copy_bw
            row["status"] = _status(row)
        except Exception as e:  # out of memory or a compile failure at this shape: a reported row
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
        if row["status"] == "ok":
            try:  # the previous schedule failing must not turn the new kernel's good row into an error
                old_stats, old_outs = time_op(old_fn, ins, n_sets, args.repeats)
                del old_outs
                row["old_median_s"] = old_stats["median_s"]
                row["old_gb_s"] = row["kv_bytes"] / old_stats["median_s"] / 1e9
                row["speedup_vs_old"] = old_stats["median_s"] / row["median_s"]
            except Exception as e:
                row["old_error"] = f"{type(e).__name__}: {e}"[:300]
        results["decode"].append(row)
        print(f"[decode] B={batch} ctx={context} r={r}: {_fmt_row(row)}", flush=True)
    del pool, per_ratio, fn, old_fn
    gc.collect()


def run_baseline_group(args, batch, context, scale, copy_bw, checks, results, cap):
    """Each implementation gets the dense cache in its own layout, made just before it is timed and freed after."""
    itemsize = jnp.dtype(DTYPE).itemsize
    set_bytes = batch * context * HKV * HEAD_DIM * 2 * itemsize
    n_sets = n_sets_for(set_bytes, args)
    while n_sets > 1 and n_sets * set_bytes > cap:
        n_sets -= 1
    base = dict(section="baselines", batch=batch, context=context, ratio=1.0, kv_bytes=set_bytes)
    if n_sets * set_bytes > cap:
        for label in BASELINE_NAMES:
            results["baselines"].append(dict(base, impl=label, status="skipped",
                                             error=f"dense cache {set_bytes / 1e9:.1f} GB > cap {cap / 1e9:.1f} GB"))
        return
    q = fill(args.seed + 11, (batch, 1, HKV * GROUP, HEAD_DIM))
    for (name, layout), label in zip(BASELINES, BASELINE_NAMES, strict=True):
        row = dict(base, impl=label, n_sets=n_sets)
        check = checks.get(label, {})
        if check.get("status") != "ok":
            row.update(status="not timed", error=f"check {check.get('status')}: {check.get('error', '')}"[:500])
        else:
            try:
                data = [dense_data(args.seed + 20 + 2 * s, batch, context, layout) for s in range(n_sets)]
                ks, vs = [k for k, _ in data], [v for _, v in data]
                del data
                stats, outs = time_op(baseline_fn(name, layout, context, scale, args.interpret), (q, ks, vs),
                                      n_sets, args.repeats)
                row.update(stats)
                b = batch - 1  # the last row of the last set: the highest offsets
                ref = dense_reference(q[b : b + 1], ks[-1][b : b + 1], vs[-1][b : b + 1], scale, layout)
                row["spot_rel_err"] = rel_err(outs[-1][b : b + 1], ref)[0]
                del outs, ks, vs, ref
                row["gb_s"] = set_bytes / row["median_s"] / 1e9
                if copy_bw:
                    row["pct_copy_bw"] = 100 * set_bytes / row["median_s"] / copy_bw
                row["status"] = _status(row)
            except Exception as e:  # unsupported shape for this implementation: a reported row
                row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
        results["baselines"].append(row)
        print(f"[baseline] B={batch} ctx={context} {label}: {_fmt_row(row)}", flush=True)
        gc.collect()
    del q
    gc.collect()


def section_tune(args, results, scale, copy_bw, cap):
    """Time the decode kernel on every TUNE_GRID schedule at --tune-shapes (ratio 0.3, split count automatic):
    which tile width, warps and pipeline stages read fastest on this GPU. Rows go to results["tune"]."""
    itemsize = jnp.dtype(DTYPE).itemsize
    for batch, context in args.tune_shapes:
        n_sets = n_sets_for(batch * HKV * 0.3 * context * HEAD_DIM * 2 * itemsize, args)
        if pool_bytes(batch, context, [0.3], n_sets, args.page_size, args.spread) > cap:
            results["tune"].append(dict(batch=batch, context=context, status="skipped", error="over the memory cap"))
            continue
        pool, per_ratio = build_pool(batch, context, [0.3], n_sets, args.page_size, args.spread, seed=args.seed)
        tables, lengths, host_lengths = per_ratio[0.3]
        kv_bytes = int(host_lengths.sum()) / n_sets * HEAD_DIM * 2 * itemsize
        ins = (pool["q"], pool["k_pages"], pool["v_pages"], pool["pos_pages"], tables, lengths, pool["q_positions"])
        for schedule in TUNE_GRID:
            row = dict(batch=batch, context=context, ratio=0.3, **schedule)
            try:
                stats, outs = time_op(paged_fn("pallas_gpu", args.interpret, scale, schedule), ins, n_sets,
                                      args.repeats)
                row["spot_rel_err"] = paged_spot_check(pool, tables[0], lengths[0], outs[0], 0, scale)
                del outs
                row.update(stats, gb_s=kv_bytes / stats["median_s"] / 1e9)
                row["status"] = _status(row)
                if copy_bw:
                    row["pct_copy_bw"] = 100 * kv_bytes / stats["median_s"] / copy_bw
            except Exception as e:  # a schedule Triton cannot compile is a reported row
                row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
            results["tune"].append(row)
            print(f"[tune] B={batch} ctx={context} {schedule}: {_fmt_row(row)}", flush=True)
        del pool, per_ratio
        gc.collect()


def _status(row) -> str:
    if not row["finite"]:
        return "non-finite output"
    if not row.get("spot_rel_err", 0.0) <= REL_TOL:
        return f"spot check failed (rel err {row.get('spot_rel_err'):.3g})"
    return "ok"


def attach_speedups(results):
    full = {}
    for row in results["decode"]:
        if row.get("status") == "ok" and row["ratio"] == 1.0:
            full[(row["batch"], row["context"])] = row["median_s"]
    best = {}
    for row in results["baselines"]:
        if row.get("status") == "ok":
            key = (row["batch"], row["context"])
            if key not in best or row["median_s"] < best[key][0]:
                best[key] = (row["median_s"], row["impl"])
    for row in results["decode"]:
        if row.get("status") != "ok":
            continue
        key = (row["batch"], row["context"])
        if key in full:
            row["speedup_vs_r1"] = full[key] / row["median_s"]
        if key in best:
            row["speedup_vs_best_full"] = best[key][0] / row["median_s"]
            row["best_full"] = best[key][1]


def scores_fn(backend: str, n_sys: int, scale: float, interpret: bool):
    def run(q_list, key_list, chunk_len, n_valid):
        return [kvzip_scores(q, keys, n_sys=n_sys, chunk_len=chunk_len, n_valid=n_valid, scale=scale, backend=backend,
                             interpret=interpret if backend != "reference" else None)
                for q, keys in zip(q_list, key_list, strict=True)]

    return jax.jit(run)


def section_scoring(args, results):
    scale = HEAD_DIM**-0.5
    for m in args.score_chunks:
        t = m + args.repeat_rows
        width = args.n_sys + m + t
        q = fill(args.seed + 31, (1, t, HKV, GROUP, HEAD_DIM))
        keys = fill(args.seed + 32, (1, HKV, width, HEAD_DIM), amp=2.0)
        chunk_len, n_valid = jnp.array([m], jnp.int32), jnp.array([t], jnp.int32)

        set_bytes = (q.size + keys.size) * q.dtype.itemsize
        n_sets = min(n_sets_for(set_bytes, args), 4)
        qs = [q] + [fill(args.seed + 40 + 2 * s, q.shape) for s in range(1, n_sets)]
        ks = [keys] + [fill(args.seed + 41 + 2 * s, keys.shape, amp=2.0) for s in range(1, n_sets)]
        full_logits = HKV * GROUP * t * width * 4
        ref_out, rows = None, {}
        for backend in ("reference", "pallas_gpu"):
            row = dict(section="scoring", impl=backend, m=m, T=t, n_sys=args.n_sys, n_sets=n_sets,
                       full_logits_bytes=full_logits)
            try:
                fn1 = scores_fn(backend, args.n_sys, scale, args.interpret)
                out = fn1([q], [keys], chunk_len, n_valid)[0]
                if backend == "reference":
                    ref_out = out
                    row["max_abs_diff"] = 0.0
                else:
                    mad = float(jnp.abs(out - ref_out).max()) if ref_out is not None else math.nan
                    row["max_abs_diff"] = mad
                    if not (mad <= SCORE_TOL):
                        row.update(status="check failed", error=f"max abs diff {mad:.3g} > {SCORE_TOL}")
                        rows[backend] = row
                        continue
                try:
                    stats = fn1.lower([q], [keys], chunk_len, n_valid).compile().memory_analysis()
                    row["temp_bytes"] = int(stats.temp_size_in_bytes)
                    row["temp_over_full_logits"] = row["temp_bytes"] / full_logits
                except Exception as e:  # memory_analysis is optional on some backends
                    row["temp_bytes_error"] = f"{type(e).__name__}: {e}"[:200]
                stats, _ = time_op(scores_fn(backend, args.n_sys, scale, args.interpret),
                                   (qs, ks, chunk_len, n_valid), n_sets, args.repeats)
                row.update(stats)
                row["status"] = "ok" if row["finite"] else "non-finite output"
            except Exception as e:
                row.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
            rows[backend] = row
        ref_row, ker_row = rows["reference"], rows["pallas_gpu"]
        if ref_row.get("status") == "ok" and ker_row.get("status") == "ok":
            ker_row["speedup_vs_reference"] = ref_row["median_s"] / ker_row["median_s"]
        for row in rows.values():
            results["scoring"].append(row)
            print(f"[scoring] m={m} {row['impl']}: {_fmt_row(row)}", flush=True)
        del q, keys, qs, ks, ref_out
        gc.collect()


# ------------------------------------------------------------------------------------------------ targets
def targets(results, args) -> list[dict]:
    out = []
    large = args.large_gib * 2**30

    def verdict(values, threshold):
        if not values:
            return "n/a"
        return "yes" if min(values) >= threshold else "no"

    dec = [r for r in results["decode"] if r.get("status") == "ok"]
    big = [r for r in dec if r["kv_bytes"] >= large and "pct_copy_bw" in r]
    pct = [r["pct_copy_bw"] for r in big]
    out.append(dict(target=f"decode bandwidth >= 80% of copy bandwidth (rows with kept KV >= {args.large_gib:g} GiB)",
                    measured=f"min {min(pct):.0f}%, median {np.median(pct):.0f}% over {len(pct)} rows" if pct else "",
                    met=verdict(pct, 80.0)))
    r03 = [r for r in dec if abs(r["ratio"] - 0.3) < 1e-9]
    for key, thr, label in (("speedup_vs_r1", 3.0, "r=0.3 vs r=1.0 (same kernel) >= 3x"),
                            ("speedup_vs_best_full", 2.0, "r=0.3 vs best full-cache baseline >= 2x (paper ~2x)")):
        for scope, rows in (("large", [r for r in r03 if r["kv_bytes"] / 0.3 >= large]), ("all", r03)):
            vals = [r[key] for r in rows if key in r]
            measured = (f"min {min(vals):.2f}x, median {np.median(vals):.2f}x, max {max(vals):.2f}x over {len(vals)}"
                        if vals else "")
            out.append(dict(target=f"{label} [{scope} shapes]", measured=measured, met=verdict(vals, thr)))
    sc = {(r["m"], r["impl"]): r for r in results["scoring"] if r.get("status") == "ok"}
    at = 2048 if (2048, "pallas_gpu") in sc else (max((m for m, i in sc if i == "pallas_gpu"), default=None))
    sp = sc.get((at, "pallas_gpu"), {}).get("speedup_vs_reference")
    out.append(dict(target=f"scoring kernel >= 2x faster than the reference (m={at})",
                    measured=f"{sp:.2f}x" if sp else "", met=verdict([sp] if sp else [], 2.0)))
    temps = sorted((m, r["temp_bytes"]) for (m, i), r in sc.items() if i == "pallas_gpu" and "temp_bytes" in r)
    if len(temps) >= 2 and temps[0][1] > 0:
        (m0, t0), (m1, t1) = temps[0], temps[-1]
        growth, linear = t1 / t0, m1 / m0
        out.append(dict(target="scoring temporaries grow at most linearly in the chunk (not with its square)",
                        measured=f"temp x{growth:.2f} for chunk x{linear:g} ({t0 / 1e6:.1f} -> {t1 / 1e6:.1f} MB)",
                        met="yes" if growth <= 1.5 * linear else "no"))
    else:
        out.append(dict(target="scoring temporaries grow at most linearly in the chunk", measured="", met="n/a"))
    return out


# ------------------------------------------------------------------------------------------------ output
def _fmt_row(row) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('error', '')}"[:200]
    parts = [f"{1e6 * row['median_s']:.1f} us"]
    if "gb_s" in row:
        parts.append(f"{row['gb_s']:.1f} GB/s")
    if "pct_copy_bw" in row:
        parts.append(f"{row['pct_copy_bw']:.0f}% copy")
    if "temp_bytes" in row:
        parts.append(f"temp {row['temp_bytes'] / 1e6:.2f} MB")
    return ", ".join(parts)


def _cell(v, fmt="{:.3g}"):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_tables(results):
    meta = results["meta"]
    print("\n## bench_attention\n")
    print(f"- command: `{meta['command']}`")
    print(f"- date: {meta['date']}; machine: {meta['machine']}; device: {meta['device']} ({meta['backend']}); "
          f"Python {meta['python']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(f"- shape: one Llama-3-8B layer, Hkv={HKV}, G={GROUP}, D={HEAD_DIM}, bf16, T=1, page "
          f"{meta['shape']['page_size']}; memory cap {meta['mem_cap_bytes'] / 1e9:.1f} GB ({meta['mem_cap_rule']})"
          + ("; SMOKE (interpret mode: times mean nothing)" if meta["smoke"] else ""))
    if results.get("copy"):
        print(f"\n### copy bandwidth: {results['copy'][0]['gb_s']:.1f} GB/s (read + written, median)\n")
    if results["checks"]:
        print("\n### correctness checks (before timing)\n")
        print(md_table(["impl", "B", "context", "rel L2 err", "max abs diff", "status"],
                       [[r["impl"], r.get("batch", ""), r.get("context", r.get("m", "")), _cell(r.get("rel_err")),
                         _cell(r.get("max_abs_diff")),
                         r["status"] + (f" ({r['error'][:80]})" if r.get("error") else "")]
                        for r in results["checks"]]))
    if results["decode"]:
        print("\n### paged decode kernel (pallas_gpu): time per layer call, kept-KV bandwidth\n")
        rows = sorted(results["decode"], key=lambda r: (r["batch"], r["context"], -r["ratio"]))
        print(md_table(
            ["B", "context", "ratio", "kept", "kept KV MB", "us", "GB/s", "% copy", "old GB/s", "x vs old",
             "x vs r=1", "x vs best full", "best full", "status"],
            [[r["batch"], r["context"], r["ratio"], _cell(r.get("kept_ratio"), "{:.3f}"),
              _cell(r["kv_bytes"] / 1e6 if "kv_bytes" in r else None, "{:.1f}"),
              _cell(1e6 * r["median_s"] if "median_s" in r else None, "{:.1f}"), _cell(r.get("gb_s"), "{:.4g}"),
              _cell(r.get("pct_copy_bw"), "{:.0f}"), _cell(r.get("old_gb_s"), "{:.4g}"),
              _cell(r.get("speedup_vs_old"), "{:.2f}"), _cell(r.get("speedup_vs_r1"), "{:.2f}"),
              _cell(r.get("speedup_vs_best_full"), "{:.2f}"), r.get("best_full", ""),
              r["status"] + (f" ({r['error'][:60]})" if r.get("error") else "")] for r in rows]))
    if results["tune"]:
        print("\n### decode kernel schedules (ratio 0.3, automatic split count)\n")
        print(md_table(["B", "context", "block_keys", "num_warps", "num_stages", "us", "GB/s", "% copy", "status"],
                       [[r["batch"], r["context"], r.get("block_keys", ""), r.get("num_warps", ""),
                         r.get("num_stages", ""), _cell(1e6 * r["median_s"] if "median_s" in r else None, "{:.1f}"),
                         _cell(r.get("gb_s"), "{:.4g}"), _cell(r.get("pct_copy_bw"), "{:.0f}"),
                         r["status"] + (f" ({r['error'][:60]})" if r.get("error") else "")] for r in results["tune"]]))
    if results["baselines"]:
        print("\n### full dense cache baselines (ratio 1.0)\n")
        rows = sorted(results["baselines"], key=lambda r: (r["batch"], r["context"], r["impl"]))
        print(md_table(["B", "context", "impl", "KV MB", "us", "GB/s", "% copy", "status"],
                       [[r["batch"], r["context"], r["impl"], _cell(r["kv_bytes"] / 1e6, "{:.1f}"),
                         _cell(1e6 * r["median_s"] if "median_s" in r else None, "{:.1f}"),
                         _cell(r.get("gb_s"), "{:.4g}"), _cell(r.get("pct_copy_bw"), "{:.0f}"),
                         r["status"] + (f" ({r['error'][:60]})" if r.get("error") else "")] for r in rows]))
    if results["scoring"]:
        print("\n### KVzip scoring: pallas_gpu vs reference (B=1, Hkv=8, G=4, D=128, bf16)\n")
        print(md_table(["chunk m", "T", "impl", "us", "x vs ref", "temp MB", "full logits MB", "max abs diff",
                        "status"],
                       [[r["m"], r["T"], r["impl"], _cell(1e6 * r["median_s"] if "median_s" in r else None, "{:.1f}"),
                         _cell(r.get("speedup_vs_reference"), "{:.2f}"),
                         _cell(r["temp_bytes"] / 1e6 if "temp_bytes" in r else None, "{:.2f}"),
                         _cell(r["full_logits_bytes"] / 1e6, "{:.1f}"), _cell(r.get("max_abs_diff")),
                         r["status"] + (f" ({r['error'][:60]})" if r.get("error") else "")]
                        for r in results["scoring"]]))
    if results.get("targets"):
        print("\n### targets\n")
        print(md_table(["target", "measured", "met"], [[t["target"], t["measured"], t["met"]]
                                                        for t in results["targets"]]))


def write_results(results, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "bench_attention.json", "w") as f:
        json.dump(results, f, indent=2, default=str)
    rows = [r for key in ("copy", "checks", "decode", "baselines", "scoring", "tune") for r in results.get(key) or []]
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(out_dir / "bench_attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas in interpret mode, few repeats (CPU)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--batches", type=_csv_ints, default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=_csv_ints, default=[8192, 32768, 131072])
    p.add_argument("--ratios", type=_csv_floats, default=[1.0, 0.5, 0.3, 0.1])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    p.add_argument("--spread", type=float, default=0.2, help="head-wise budget spread around the mean ratio")
    p.add_argument("--copy-gib", type=float, default=4.0)
    p.add_argument("--score-chunks", type=_csv_ints, default=[1024, 2048, 4096])
    p.add_argument("--n-sys", type=int, default=64)
    p.add_argument("--repeat-rows", type=int, default=32, help="scoring: T = m + this")
    p.add_argument("--check-context", type=int, default=1024, help="context of the small correctness checks")
    p.add_argument("--rotate-mib", type=float, default=256.0, help="distinct input bytes per timed call (vs L2)")
    p.add_argument("--max-sets", type=int, default=8)
    p.add_argument("--mem-frac", type=float, default=0.6, help="skip configs needing more than this of the limit")
    p.add_argument("--large-gib", type=float, default=1.0, help="kept KV from which a shape counts as large")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; 0 = none")
    p.add_argument("--tune-shapes", type=lambda v: [tuple(map(int, x.split("x"))) for x in v.split(",")],
                   default=[(1, 32768), (16, 32768)], help="tune section: BATCHxCONTEXT list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for JSON/CSV (default $OUT, else demo_out/bench_attention)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS) - set(OPTIONAL_SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS + OPTIONAL_SECTIONS}")
    if args.smoke:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        smoke = dict(batches=[2], contexts=[256], ratios=[1.0, 0.3], repeats=3, copy_gib=1 / 32,
                     score_chunks=[64, 128], n_sys=16, repeat_rows=8, check_context=256, rotate_mib=1.0, max_sets=2,
                     tune_shapes=[(1, 256)])
        for k, v in smoke.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    args.interpret = jax.default_backend() != "gpu"
    out = args.out or os.environ.get("OUT") or str(ROOT / "demo_out" / "bench_attention")
    args.out = Path(out)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.interpret and not args.smoke:
        print("warning: no GPU; the Pallas GPU kernels run in interpret mode (slow, and the times mean nothing)")
    limit, rule = device_memory_limit()
    cap = int(args.mem_frac * limit)
    results = dict(meta=environment(args), copy=[], checks=[], decode=[], baselines=[], scoring=[], tune=[],
                   targets=[])
    results["meta"].update(mem_cap_bytes=cap, mem_cap_rule=f"{args.mem_frac:g} x {rule} ({limit / 1e9:.1f} GB)",
                           args={k: str(v) for k, v in vars(args).items()})
    print(f"device: {results['meta']['device']} ({results['meta']['backend']}), versions "
          f"{results['meta']['versions']}, {results['meta']['date']}; memory cap {cap / 1e9:.1f} GB", flush=True)
    t_start = time.perf_counter()
    scale = HEAD_DIM**-0.5
    copy_bw = section_copy(args, results) if "copy" in args.sections else None
    write_results(results, args.out)

    if "scoring" in args.sections:
        section_scoring(args, results)
        for r in results["scoring"]:
            if r["impl"] == "pallas_gpu":
                results["checks"].append(dict(section="check", impl="pallas_gpu kvzip_scores", m=r["m"],
                                              max_abs_diff=r.get("max_abs_diff"),
                                              status=r["status"],
                                              error=r.get("error", "")))
        write_results(results, args.out)

    if "tune" in args.sections:
        section_tune(args, results, scale, copy_bw, cap)
        write_results(results, args.out)

    do_decode, do_base = "decode" in args.sections, "baselines" in args.sections
    if do_decode or do_base:
        kernel_ok, base_checks = False, {}
        if do_decode:
            check = check_decode(args, scale)
            results["checks"].append(check)
            kernel_ok = check["status"] == "ok"
            print(f"[check] paged decode kernel: {check['status']} rel {check.get('rel_err')} "
                  f"max abs diff {check.get('max_abs_diff')} {check.get('error', '')}", flush=True)
        if do_base:
            base_checks = check_baselines(args, scale)
            results["checks"].extend(base_checks.values())
            for name, c in base_checks.items():
                print(f"[check] {name}: {c['status']} rel {c.get('rel_err')} max abs diff {c.get('max_abs_diff')} "
                      f"{c.get('error', '')[:200]}", flush=True)
        groups = sorted(((b, c) for b in args.batches for c in args.contexts), key=lambda bc: -bc[0] * bc[1])
        for batch, context in groups:  # largest first: the shapes the targets are about
            if args.time_budget and time.perf_counter() - t_start > args.time_budget:
                why = dict(status="skipped", error=f"time budget {args.time_budget:g} s spent")
                if do_decode:
                    results["decode"] += [dict(section="decode", impl="pallas_gpu", batch=batch, context=context,
                                               ratio=r, **why) for r in args.ratios]
                if do_base:
                    results["baselines"] += [dict(section="baselines", impl=n, batch=batch, context=context,
                                                  ratio=1.0, kv_bytes=batch * context * HKV * HEAD_DIM * 4, **why)
                                             for n in BASELINE_NAMES]
                continue
            try:
                if do_decode:
                    run_decode_group(args, batch, context, scale, copy_bw, kernel_ok, results, cap)
                if do_base:
                    run_baseline_group(args, batch, context, scale, copy_bw, base_checks, results, cap)
            except Exception as e:  # a failed group (out of memory) must not lose the others
                traceback.print_exc()
                results["decode"].append(dict(section="decode", impl="pallas_gpu", batch=batch, context=context,
                                              ratio=math.nan, status="error", error=f"{type(e).__name__}: {e}"[:500]))
                gc.collect()
            attach_speedups(results)
            write_results(results, args.out)

    results["targets"] = targets(results, args)
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    try:
        results["meta"]["environment"] = jax.print_environment_info(return_string=True)
    except Exception:  # informational only
        pass
    write_results(results, args.out)
    print_tables(results)
    print(f"\nwall {results['meta']['wall_s']:.1f} s; results: {args.out / 'bench_attention.json'}, "
          f"{args.out / 'bench_attention.csv'}")
    return results


if __name__ == "__main__":
    main()
