"""KVzip chunk scoring (KVzip `_get_score`): the jnp reference, the shared kernel input layout, and the dispatcher.

One scoring forward repeats a context chunk; every layer then scores the chunk's keys. Per (row b, kv head h):

- queries q [B, T, Hkv, G, D]: the T repeat-input tokens (post-RoPE), G query heads per kv head;
- keys [B, Hkv, n_sys + m + T, D] = [system prefix (n_sys) | chunk (m slots) | repeat keys (T)];
- a valid repeat row r (r < n_valid[b]) softmaxes over every system column, the chunk columns c < chunk_len[b]
  and the repeat columns j <= r (j < n_valid[b]); logits are scale * q.k in float32, tanh-capped when softcap is set;
- score[b, h, c] = max over the G heads and the valid rows of the probability at chunk column c (0 for c >= chunk_len).

Every implementation works in two passes so that no [T, n_sys + m + T] matrix ever exists (memory independent of
the chunk size squared): pass 1 gives each row's log-sum-exp over blocks of keys; pass 2 revisits only the chunk's
columns and takes the max over rows of exp(logit - lse).

Matmul precision is the caller's: `precision` (or jax's `default_matmul_precision`, via
`kvzip_kernels.backend.resolve_precision`) reaches every dot of every backend. For float32 inputs on GPU, DEFAULT and
HIGH mean TF32 (inputs rounded to a 10-bit mantissa, ~1e-3 relative error per product) in the Triton kernel and in
XLA's dots alike; HIGHEST means IEEE float32. bf16 inputs are exact in every mode (float32 accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_kernels.backend import (
    PALLAS_GPU,
    PALLAS_TPU,
    REFERENCE,
    requested_backend,
    resolve_backend,
    resolve_precision,
)
from kvzip_kernels.logits import grouped_logits

BACKENDS = (REFERENCE, PALLAS_GPU, PALLAS_TPU)
REFERENCE_BLOCK = 256  # key columns per block of the reference's two passes


def kvzip_scores_reference(
    q: jax.Array,
    keys: jax.Array,
    *,
    n_sys: int,
    chunk_len: jax.Array,
    n_valid: jax.Array,
    scale: float,
    softcap: float | None = None,
    block: int = REFERENCE_BLOCK,
    precision=None,
) -> jax.Array:
    """The oracle and the CPU path: blockwise two-pass jnp (temporaries [B, Hkv, G, T, block]).

    precision: what `kvzip_kernels.backend.resolve_precision` takes; the dots run at it. Returns float32
    [B, Hkv, m]."""
    precision = resolve_precision(precision)
    b, t, hkv, g, _ = q.shape
    width = keys.shape[2]
    m = width - n_sys - t
    block = min(block, width)
    rows = jnp.arange(t, dtype=jnp.int32)
    row_ok = rows[None, :] < n_valid[:, None]  # [B, T]
    neg = jnp.finfo(jnp.float32).min

    def lse_step(j, carry):
        mx, total = carry
        # A block may not run past the end: the last one is shifted left and its already-seen columns are masked.
        start = jnp.minimum(j * block, width - block)
        cols = start + jnp.arange(block, dtype=jnp.int32)
        logits = grouped_logits(q, jax.lax.dynamic_slice_in_dim(keys, start, block, axis=2), scale=scale,
                                softcap=softcap, precision=precision)
        chunk_ok = ((cols >= n_sys) & (cols < n_sys + m))[None, None, :] & (
            (cols - n_sys)[None, None, :] < chunk_len[:, None, None]
        )
        rep = cols - n_sys - m  # repeat key index
        repeat_ok = (rep[None, None, :] >= 0) & (rep[None, None, :] <= rows[None, :, None]) & (
            rep[None, None, :] < n_valid[:, None, None]
        )
        ok = (cols < n_sys)[None, None, :] | chunk_ok | repeat_ok  # [B, T, block]
        ok = (ok & row_ok[:, :, None] & (cols >= j * block)[None, None, :])[:, None, None]
        logits = jnp.where(ok, logits, neg)
        new_mx = jnp.maximum(mx, logits.max(axis=-1))
        total = total * jnp.exp(mx - new_mx) + jnp.where(ok, jnp.exp(logits - new_mx[..., None]), 0.0).sum(-1)
        return new_mx, total

    shape = (b, hkv, g, t)
    mx, total = jax.lax.fori_loop(
        0, -(-width // block), lse_step, (jnp.full(shape, neg, jnp.float32), jnp.zeros(shape, jnp.float32))
    )
    lse = mx + jnp.log(jnp.where(total > 0, total, 1.0))  # [B, Hkv, G, T]
    return kvzip_scores_from_lse(q, keys[:, :, n_sys : n_sys + m], lse, chunk_len=chunk_len, n_valid=n_valid,
                                 scale=scale, softcap=softcap, block=block, precision=precision)


def kvzip_scores_from_lse(
    q: jax.Array,
    chunk_keys: jax.Array,
    lse: jax.Array,
    *,
    chunk_len: jax.Array,
    n_valid: jax.Array,
    scale: float,
    softcap: float | None = None,
    block: int = REFERENCE_BLOCK,
    precision=None,
) -> jax.Array:
    """Pass 2 alone, blockwise jnp: score[b, h, c] = max over the G heads and valid rows of exp(logit - lse) at
    chunk column c, given each row's log-sum-exp over [system | chunk | repeat] (pass 1, or a forward that
    accumulated it alongside its attention). chunk_keys [B, Hkv, m, D]; lse [B, Hkv, G, T]; precision as in
    `kvzip_scores_reference`. Returns [B, Hkv, m]."""
    precision = resolve_precision(precision)
    b, t, hkv, _, _ = q.shape
    m = chunk_keys.shape[2]
    row_ok = jnp.arange(t, dtype=jnp.int32)[None, :] < n_valid[:, None]  # [B, T]
    chunk_block = min(block, m)

    def max_step(j, scores):
        start = jnp.minimum(j * chunk_block, m - chunk_block)
        cols = start + jnp.arange(chunk_block, dtype=jnp.int32)  # chunk-relative
        logits = grouped_logits(q, jax.lax.dynamic_slice_in_dim(chunk_keys, start, chunk_block, 2), scale=scale,
                                softcap=softcap, precision=precision)
        ok = (cols[None, None, :] < chunk_len[:, None, None]) & row_ok[:, :, None]
        probs = jnp.where(ok[:, None, None], jnp.exp(logits - lse[..., None]), 0.0)
        # Overlapping columns of a shifted last block get the same value twice: overwriting is exact.
        return jax.lax.dynamic_update_slice_in_dim(scores, probs.max(axis=(2, 3)), start, axis=2)

    return jax.lax.fori_loop(0, -(-m // chunk_block), max_step, jnp.zeros((b, hkv, m), jnp.float32))


def round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def pack_for_kernels(q: jax.Array, keys: jax.Array, n_sys: int, block_keys: int, block_rows: int, d_pad: int):
    """The layout both Pallas backends read: (q_rows [B, Hkv, Rp, Dp], keys_p [B, Hkv, S0 + M0 + R0, Dp], (S0, M0)).

    q rows are ordered (t, g) so that row r belongs to repeat token r // G: valid rows are then the first
    n_valid * G, and "repeat column j is causal for row r" is j * G <= r (no division in the kernels).
    Each key segment (system, chunk, repeat) is zero-padded to a multiple of `block_keys`, so every key block
    lies in exactly one segment: a block's mask is one comparison and dead blocks can be skipped whole.
    Zero padding of the head dim does not change q.k. Copies are O((T*G + W) * D): the size of the inputs.
    """
    b, t, hkv, g, d = q.shape
    m = keys.shape[2] - n_sys - t
    rows = t * g
    q_rows = q.transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, round_up(rows, block_rows) - rows), (0, d_pad - d)))

    def segment(x, n):
        return jnp.pad(x, ((0, 0), (0, 0), (0, round_up(n, block_keys) - n), (0, d_pad - d)))

    parts = (keys[:, :, :n_sys], n_sys), (keys[:, :, n_sys : n_sys + m], m), (keys[:, :, n_sys + m :], t)
    keys_p = jnp.concatenate([segment(x, n) for x, n in parts], axis=2)
    return q_rows, keys_p, (round_up(n_sys, block_keys), round_up(m, block_keys))


def _check_inputs(q, keys, n_sys, chunk_len, n_valid) -> None:
    if q.ndim != 5:
        raise ValueError(f"kvzip_scores: q must be [B, T, Hkv, G, D], got shape {q.shape}")
    b, t, hkv, _, d = q.shape
    if keys.ndim != 4 or keys.shape[0] != b or keys.shape[1] != hkv or keys.shape[3] != d:
        raise ValueError(f"kvzip_scores: keys must be [B={b}, Hkv={hkv}, n_sys + m + T, D={d}], got {keys.shape}")
    if not isinstance(n_sys, (int, np.integer)) or n_sys < 0:
        raise ValueError(f"kvzip_scores: n_sys must be a static int >= 0, got {n_sys!r}")
    m = keys.shape[2] - n_sys - t
    if t < 1 or m < 1:
        raise ValueError(
            f"kvzip_scores: keys width {keys.shape[2]} must be n_sys ({n_sys}) + m + T ({t}) with m >= 1 and "
            f"T >= 1; that leaves m = {m}"
        )
    for name, arr in (("q", q), ("keys", keys)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"kvzip_scores: {name} must be floating point, got {arr.dtype}")
    if q.dtype != keys.dtype:
        raise ValueError(f"kvzip_scores: q dtype {q.dtype} differs from keys dtype {keys.dtype}")
    for name, arr, hi in (("chunk_len", chunk_len, m), ("n_valid", n_valid, t)):
        if arr.shape != (b,):
            raise ValueError(f"kvzip_scores: {name} must be [B={b}], got shape {arr.shape}")
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"kvzip_scores: {name} must be an integer array, got {arr.dtype}")
        try:  # concrete (not traced): check the values too
            values = np.asarray(arr)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            continue
        bad = (values < 0) | (values > hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"kvzip_scores: {name}[{i}] = {int(values[i])} is outside [0, {hi}]")


def kvzip_scores_backend(backend: str | None = None) -> str:
    """The concrete backend `kvzip_scores` would run for `backend` (None: the `use_backend` context)."""
    return resolve_backend(requested_backend(backend, None)[0], BACKENDS, "kvzip_scores")


def kvzip_scores(
    q: jax.Array,
    keys: jax.Array,
    *,
    n_sys: int,
    chunk_len: jax.Array,
    n_valid: jax.Array,
    scale: float,
    softcap: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
    block_keys: int | None = None,
    block_rows: int | None = None,
    precision=None,
) -> jax.Array:
    """KVzip scores of the chunk's m key slots: float32 [B, Hkv, m] in [0, 1] (see the module docstring).

    backend: "auto" (the platform's Pallas kernel on GPU / TPU, else the reference), "reference", "pallas_gpu",
    "pallas_tpu"; None takes the `use_backend` context (default "auto"). interpret runs a Pallas backend in CPU
    interpret mode (tests); None takes the context (default False). block_keys / block_rows override the
    backend's key-column and query-row block sizes (None: the backend default; the reference uses block_keys only).
    precision: the matmul precision of every backend's dots, "default" | "high" | "highest" (or jax's aliases) or a
    `jax.lax.Precision`; None takes jax's `default_matmul_precision`, else the platform default. For float32 inputs
    on GPU, DEFAULT / HIGH (and the platform default) mean TF32, ~1e-3 relative error per product: pass "highest"
    for IEEE float32. On TPU the kernel runs HIGH as HIGHEST (Mosaic has no HIGH). bf16 inputs are exact in all.
    Inputs are checked here, before any kernel runs; chunk_len / n_valid values are checked when concrete.
    """
    backend, interpret = requested_backend(backend, interpret)
    choice = resolve_backend(backend, BACKENDS, "kvzip_scores")
    _check_inputs(q, keys, n_sys, chunk_len, n_valid)
    for name, v in (("block_keys", block_keys), ("block_rows", block_rows)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"kvzip_scores: {name} must be a positive int or None, got {v!r}")
    n_sys = int(n_sys)
    precision = resolve_precision(precision)
    chunk_len, n_valid = chunk_len.astype(jnp.int32), n_valid.astype(jnp.int32)
    kw = dict(n_sys=n_sys, chunk_len=chunk_len, n_valid=n_valid, scale=float(scale), softcap=softcap,
              precision=precision)
    if choice == REFERENCE:
        return kvzip_scores_reference(q, keys, **kw, block=block_keys or REFERENCE_BLOCK)
    # Imported here so that the reference path never loads Pallas (and the backends may import this module).
    if choice == PALLAS_GPU:
        from kvzip_kernels.kvzip_scores_gpu import kvzip_scores_gpu as kernel
    else:
        from kvzip_kernels.kvzip_scores_tpu import kvzip_scores_tpu as kernel
    return kernel(q, keys, **kw, interpret=interpret, block_keys=block_keys, block_rows=block_rows)
