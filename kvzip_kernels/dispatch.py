"""One dispatcher per op: checks the inputs once and picks the backend.

Shapes and dtypes are static under jit, so those checks cost nothing at run time. Values (page indices, lengths)
are checked only when the arrays are concrete (an eager call on the host); under jit they are tracers and the
kernels clamp what they read instead.

The backend comes from the `backend` argument, else from the innermost `use_backend(...)` context, else "auto".
The context is how a caller that does not pass `backend` itself (the decoder) is switched to a Pallas kernel. It is
a `jax.make_user_context`, part of jit's cache key: entering it makes a jitted function retrace, never silently
reuse an executable compiled for another backend.
"""

from __future__ import annotations

import importlib
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_kernels.backend import (
    AUTO,
    BACKENDS,
    PALLAS_GPU,
    PALLAS_TPU,
    REFERENCE,
    requested_backend,
    resolve_backend,
    resolve_precision,
)
from kvzip_kernels.paged_attention import paged_attention_reference

PAGED_ATTENTION_BACKENDS = (REFERENCE, PALLAS_GPU, PALLAS_TPU)
NO_WINDOW = np.iinfo(np.int32).max
# KVZIP_KERNELS_DEBUG=1: the page-table and length checks also run on traced values (inside jit, as a host
# callback that fails the computation), not only on concrete arrays. Costs a device-to-host copy per call.
DEBUG_ENV = "KVZIP_KERNELS_DEBUG"
_warned_fallbacks: set[tuple[int, int]] = set()


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_paged_inputs(q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions) -> None:
    if q.ndim != 5:
        raise ValueError(f"q must be [B, T, Hkv, G, D], got shape {q.shape}")
    b, t, hkv, _, d = q.shape
    if k_pages.shape != v_pages.shape or k_pages.ndim != 3:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be [N, page, D]")
    if k_pages.shape[2] != d:
        raise ValueError(f"head_dim of the pages ({k_pages.shape[2]}) does not match the queries ({d})")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages dtype {k_pages.dtype} differs from v_pages dtype {v_pages.dtype}")
    if not (jnp.issubdtype(q.dtype, jnp.floating) and jnp.issubdtype(k_pages.dtype, jnp.floating)):
        raise ValueError(f"q ({q.dtype}) and the cache ({k_pages.dtype}) must be floating point")
    if jnp.promote_types(q.dtype, k_pages.dtype) != q.dtype:
        # The kernels take the logits in the queries' dtype: a cache that does not convert to it exactly (wider,
        # or float16 under bf16 queries) would be rounded without a word.
        raise ValueError(f"the cache dtype {k_pages.dtype} does not convert exactly to the queries' {q.dtype}; "
                         f"cast the queries to {jnp.promote_types(q.dtype, k_pages.dtype)} or store the cache as "
                         f"{q.dtype}")
    if pos_pages.shape != k_pages.shape[:2]:
        raise ValueError(f"pos_pages must be {k_pages.shape[:2]}, got {pos_pages.shape}")
    if page_table.ndim != 3 or page_table.shape[:2] != (b, hkv):
        raise ValueError(f"page_table must be [B={b}, Hkv={hkv}, P], got {page_table.shape}")
    if lengths.shape != (b, hkv):
        raise ValueError(f"lengths must be [B={b}, Hkv={hkv}], got {lengths.shape}")
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions must be [B={b}, T={t}], got {q_positions.shape}")
    for name, arr in (("page_table", page_table), ("lengths", lengths), ("q_positions", q_positions),
                      ("pos_pages", pos_pages)):
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {arr.dtype}")


def _check_paged_values(k_pages, page_table, lengths, debug: bool) -> None:
    """Value checks: lengths within the table, used page indices within the pool. On concrete arrays always; on
    traced ones (under jit) only in debug mode, as a host callback that raises when the values arrive."""
    n_pool, page = k_pages.shape[:2]
    if _is_concrete(page_table) and _is_concrete(lengths):
        _check_table_values(np.asarray(jax.device_get(page_table)), np.asarray(jax.device_get(lengths)), n_pool, page)
    elif debug:
        jax.debug.callback(
            lambda table, lens: _check_table_values(np.asarray(table), np.asarray(lens), n_pool, page),
            page_table, lengths,
        )


def _check_table_values(table: np.ndarray, lengths: np.ndarray, n_pool: int, page: int) -> None:
    width = table.shape[-1]
    lens = lengths.astype(np.int64)
    bad = np.argwhere((lens < 0) | (lens > width * page))
    if bad.size:
        b, h = bad[0]
        raise ValueError(f"lengths[{b}, {h}] = {lens[b, h]} is outside [0, P*page = {width}*{page} = {width * page}]")
    table = table.astype(np.int64)
    used = np.arange(width)[None, None, :] < -(-lens // page)[:, :, None]
    bad = np.argwhere(used & ((table < 0) | (table >= n_pool)))
    if bad.size:
        b, h, i = bad[0]
        raise ValueError(f"page_table[{b}, {h}, {i}] = {table[b, h, i]} is outside the pool [0, N={n_pool}) "
                         f"(that page holds pairs: lengths[{b}, {h}] = {lens[b, h]})")


def _window_scalar(window):
    """None -> no window; a Python int must be >= 1; an array (traced per layer by the decoder) passes as is."""
    if window is None:
        return jnp.int32(NO_WINDOW)
    if isinstance(window, (int, np.integer)):
        if window < 1:
            raise ValueError(f"window must be >= 1 (a query always sees itself), got {window}")
        return jnp.int32(min(int(window), NO_WINDOW))
    return jnp.asarray(window, jnp.int32)


def _kernel_module(backend: str):
    """The Pallas kernels are imported on first use: importing the library never pulls in Triton or Mosaic."""
    name = {PALLAS_GPU: "kvzip_kernels.paged_attention_gpu", PALLAS_TPU: "kvzip_kernels.paged_attention_tpu"}[backend]
    return importlib.import_module(name)


def _pick_backend(backend: str | None, interpret: bool | None, page: int, head_dim: int) -> tuple[str, bool]:
    requested, interpret = requested_backend(backend, interpret)
    chosen = resolve_backend(requested, PAGED_ATTENTION_BACKENDS, "paged_attention")
    if requested == AUTO and chosen == PALLAS_GPU and not _kernel_module(PALLAS_GPU).gpu_shapes_ok(page, head_dim):
        # auto never fails on a shape the Triton kernel cannot tile (an explicit request does), but says so once
        if (page, head_dim) not in _warned_fallbacks:
            _warned_fallbacks.add((page, head_dim))
            warnings.warn(f"paged_attention: the pallas_gpu kernel cannot tile page size {page} / head_dim "
                          f"{head_dim} (each must be a power of two >= 16); using the jnp reference", stacklevel=3)
        chosen = REFERENCE
    return chosen, interpret


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    pos_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    window: int | jax.Array | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    precision=None,
    debug: bool | None = None,
) -> jax.Array:
    """Attention of T new queries per row over a head-wise paged cache; see `paged_attention_reference`.

    backend: "auto" (the platform's Pallas kernel, else the reference) | "reference" | "pallas_gpu" |
    "pallas_tpu"; None takes the `use_backend` context (default "auto"). interpret: run a Pallas backend in
    interpret mode (CPU); None takes the context (default False). precision: the dots' matmul precision
    ("default" | "high" | "highest" or a `jax.lax.Precision`; None: jax's `default_matmul_precision`); with a
    float32 cache on GPU anything below "highest" means TF32 products (see `resolve_precision`). debug: also check
    traced page tables and lengths when the values arrive (None: the KVZIP_KERNELS_DEBUG environment variable).
    Raises ValueError on bad input, before any kernel runs. The queries may be wider than the cache (a bf16 cache
    under float32 activations), never narrower or of another float format.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    _check_paged_inputs(q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions)
    if debug is None:
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    _check_paged_values(k_pages, page_table, lengths, debug)
    precision = resolve_precision(precision)
    win = _window_scalar(window)
    page, head_dim = k_pages.shape[1], k_pages.shape[2]
    chosen, interpret = _pick_backend(backend, interpret, page, head_dim)
    if chosen == REFERENCE:
        return paged_attention_reference(
            q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions, scale=scale, softcap=softcap,
            window=window, precision=precision,
        )
    module = _kernel_module(chosen)
    if chosen == PALLAS_GPU:
        module.check_gpu_shapes(page, head_dim)  # an explicit request on an untileable shape: name value and limit
    kernel = module.paged_attention_gpu if chosen == PALLAS_GPU else module.paged_attention_tpu
    return kernel(
        q, k_pages, v_pages, pos_pages, page_table, lengths, q_positions, win, scale=float(scale),
        softcap=None if softcap is None else float(softcap), interpret=bool(interpret), precision=precision,
    )
