"""Selection of the kept context KV pairs from KVzip importance scores (spec shared/research/kvzip.md §1.7-1.8;
official `attention/score.py::KVScore._threshold/_threshold_uniform`, `attention/kvcache.py::*.prune`,
`model/wrapper.py::load_head_score`).

Shapes: scores ``[L, B, Hkv, n_c]`` (any float dtype, values normally in [0, 1]; a bf16 input is compared exactly
after a lossless cast to float32). ``ratio`` = fraction of context KV pairs **kept**, in (0, 1].
Optional ``valid [B, n_c]`` (False beyond a row's context length, for ragged batches) and ``layers [L]`` (True for
layers that are scored and evicted; Gemma3's sliding layers are False).

Levels:

- ``pair`` (official default): one global threshold per batch row over all evictable layers × heads × valid
  positions. N = number of those pairs; ``n = max(int(N*r) - 1, 0)``; ``τ = sorted_desc[n]``; keep ``S > τ``
  (strict: every pair tied at τ is evicted, so without ties exactly int(N*r)-1 pairs are kept and with ties fewer;
  pitfalls P1/P4). ``int(N*r)`` is Python's float64 product truncated, exactly as the official code computes it.
- ``pair-uniform`` (official ``_threshold_uniform``): per layer, head and row, keep the top ``k = int(n_row*r)``
  positions. The official code uses ``torch.topk`` whose tie order is unspecified; we break ties by lower position
  first (stable sort), which makes the kept set deterministic and nested across ratios.
- ``head`` (official: head scores broadcast to ``[L, 1, H, n_c]`` and then the ``pair`` rule): we apply the same
  rule to the broadcast scores (N = L_ev·H·n_row), in closed form: ``τ = heads_sorted_desc[n // n_row]``; whole
  (layer, head) rows are kept or dropped. Note this is *not* the same as applying the rule to the L·H head scores
  alone (``int(N*r)`` with N = L·H·n_row differs from n_row·int(L·H·r)). Without ``head_scores`` the head scores
  are taken from this row's own pair scores (max over its valid positions): a context-dependent head level.

Our extensions vs the official code (batch size 1 only there):

- Per batch row: each context has its own budget and threshold; rows never compete.
- ``valid``: invalid positions are never counted in N and are **False** in the returned mask (in every layer,
  including excluded ones).
- ``layers``: excluded layers are not counted in N and are **True** at every valid position of the mask (the caller
  treats them separately, e.g. Gemma3 sliding layers keep their window).
- ``ratio == 1`` keeps every valid pair (official: ``ratio >= 1``); ``ratio > 1`` or ``<= 0`` is a ValueError.
- ``threshold`` is NaN where no threshold applies (ratio 1, pair-uniform); the official code reports 0 there.
- ``kept_ratio`` is the real fraction kept among the row's valid evictable pairs (official ``r_ = mean(valid)``).

Head-score files (official: ``torch.save`` of an ``(L, H)`` tensor, loaded with ``torch.load`` and max-reduced
across files): we use ``.npz`` holding ``head_scores`` (float32 ``[L, Hkv]``) and ``meta`` (a JSON string with
``format``, ``version``, ``num_layers``, ``num_kv_heads``, ``family``, ``source`` and any other fingerprint
entries), read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LEVELS = ("pair", "pair-uniform", "head")
HEAD_SCORE_FORMAT = "kvzip_jax.head_scores"
HEAD_SCORE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SelectionResult:
    """``mask [L, B, Hkv, n_c]`` bool (True = kept); ``kept_ratio [B]`` real fraction of valid evictable pairs kept;
    ``threshold [B]`` the τ used (NaN where none applies)."""

    mask: np.ndarray
    kept_ratio: np.ndarray
    threshold: np.ndarray


# ----------------------------------------------------------------------------------------------------------- checks


def check_ratio(ratio: float) -> float:
    """ratio must be a real number in (0, 1]; returns it as a Python float."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise TypeError(f"ratio must be a number in (0, 1], got {ratio!r}")
    r = float(ratio)
    if not (0.0 < r <= 1.0):
        raise ValueError(f"ratio must be in (0, 1] (the fraction of context KV pairs kept), got {ratio}")
    return r


def official_index(num_pairs: int, ratio: float) -> int:
    """Official sort index: ``max(int(N*r) - 1, 0)`` (float64 product, truncated)."""
    return max(int(num_pairs * ratio) - 1, 0)


def _shape4(scores) -> tuple[int, int, int, int]:
    shape = tuple(scores.shape)
    if len(shape) != 4:
        raise ValueError(f"scores must have shape [L, B, Hkv, n_c], got {shape}")
    return shape  # type: ignore[return-value]


def _concrete_bool(x, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        import jax

        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"{name} must be concrete (numpy or a concrete jax array), not a traced value: the official budget "
                f"int(N*r) needs exact host arithmetic. Close over it instead of passing it as a jit argument"
            )
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(x)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array, got dtype {arr.dtype}")
    return arr


def _masks(shape4, valid, layers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid [B, n_c], layers [L], counts [B] = number of valid evictable pairs per row), with checks."""
    L, B, H, n_c = shape4
    if n_c < 1:
        raise ValueError(f"empty context: scores have n_c = {n_c} positions; need at least 1")
    valid_np = np.ones((B, n_c), bool) if valid is None else _concrete_bool(valid, (B, n_c), "valid")
    layers_np = np.ones((L,), bool) if layers is None else _concrete_bool(layers, (L,), "layers")
    n_layers = int(layers_np.sum())
    if n_layers == 0:
        raise ValueError(f"layers marks none of the {L} layers as evictable; nothing to select from")
    lengths = valid_np.sum(axis=1)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise ValueError(f"empty context: batch rows {empty.tolist()} have 0 valid positions (valid is all False)")
    counts = n_layers * H * lengths.astype(np.int64)
    return valid_np, layers_np, counts


def _host_scores(scores) -> np.ndarray:
    s = np.asarray(scores)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32)  # bf16/f16 → f32 is exact, so order and ties are preserved
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def _is_jax(x) -> bool:
    try:
        import jax
    except ImportError:  # pragma: no cover
        return False  # pragma: no mutate (unreachable: jax is a core dependency)
    return isinstance(x, jax.Array)


# ---------------------------------------------------------------------------------------------------------- pair


def keep_mask_pair(scores, ratio: float, *, valid=None, layers=None):
    """Official ``pair`` rule per batch row; returns ``(mask [L,B,H,n_c] bool, threshold [B])``.

    Works on numpy (host, O(N) selection with ``np.partition``) and on jax arrays (``jnp.sort``), including under
    ``jax.jit`` with ``scores`` traced: ``ratio``, ``valid`` and ``layers`` must be concrete (closed over), because
    the budget index ``int(N*r) - 1`` is computed exactly on the host. The output type follows ``scores``.
    Threshold is NaN for ``ratio == 1`` (everything valid kept)."""
    r = check_ratio(ratio)
    shape = _shape4(scores)
    valid_np, layers_np, counts = _masks(shape, valid, layers)
    _L, B, _H, _n_c = shape
    idx = np.array([official_index(int(c), r) for c in counts], np.int64)
    if _is_jax(scores):
        import jax.numpy as jnp

        base = jnp.broadcast_to(jnp.asarray(valid_np)[None, :, None, :], shape)  # [L,B,H,n_c]
        if r >= 1.0:
            return jnp.asarray(base), jnp.full((B,), jnp.nan, jnp.float32)
        ev = jnp.asarray(layers_np)[:, None, None, None] & jnp.asarray(valid_np)[None, :, None, :]
        s = scores.astype(jnp.float32)
        neg = jnp.where(ev, s, -jnp.inf)  # excluded/invalid pairs sort last and are never at index idx < count
        flat = jnp.moveaxis(neg, 1, 0).reshape(B, -1)
        desc = -jnp.sort(-flat, axis=1)
        tau = jnp.take_along_axis(desc, jnp.asarray(idx, jnp.int32)[:, None], axis=1)[:, 0]
        keep = s > tau[None, :, None, None]
        lay = jnp.asarray(layers_np)[:, None, None, None]
        mask = jnp.where(lay, keep, True) & base  # pragma: no mutate (bool * bool == & in jnp too)
        return mask, tau
    base = np.broadcast_to(valid_np[None, :, None, :], shape)
    s = _host_scores(scores)
    if r >= 1.0:
        return base.copy(), np.full((B,), np.nan, np.float32)
    lay_idx = np.flatnonzero(layers_np)
    tau = np.empty((B,), s.dtype)
    for b in range(B):
        flat = s[lay_idx, b][:, :, valid_np[b]].reshape(-1)
        n = int(idx[b])
        tau[b] = -np.partition(-flat, n)[n]  # the n-th largest (0-based) == sorted_desc[n]
    keep = s > tau[None, :, None, None]
    keep[~layers_np] = True
    return keep & base, tau


# -------------------------------------------------------------------------------------------------- pair-uniform


def _keep_mask_uniform(s: np.ndarray, r: float, valid_np, layers_np):
    L, _B, H, n_c = s.shape
    base = valid_np[None, :, None, :] & np.ones((L, 1, H, 1), bool)
    if r >= 1.0:
        return base
    lengths = valid_np.sum(axis=1)
    key = np.where(base, s, np.nan)
    # Stable sort of -score: ties keep position order (lower position first); invalid (NaN) positions sort last.
    order = np.argsort(-key, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n_c), order.shape), axis=-1)
    k = np.array([int(int(n) * r) for n in lengths], np.int64)  # official k = int(n_seq * ratio)
    keep = rank < k[None, :, None, None]
    keep[~layers_np] = True
    return keep & base


# ---------------------------------------------------------------------------------------------------------- head


def _keep_mask_head(hs: np.ndarray, r: float, valid_np, layers_np, H: int):
    """hs: [B, L, H] head scores per row (a context-independent [L, H] is broadcast by the caller)."""
    B, L, _ = hs.shape
    n_c = valid_np.shape[1]
    lengths = valid_np.sum(axis=1).astype(np.int64)
    n_layers = int(layers_np.sum())
    mask = np.empty((L, B, H, n_c), bool)
    tau = np.full((B,), np.nan, np.float32)
    for b in range(B):
        if r >= 1.0:
            keep_head = np.ones((L, H), bool)
        else:
            n_row = int(lengths[b])
            n = official_index(n_layers * H * n_row, r)  # official rule on the broadcast [L_ev, H, n_row] scores
            heads = hs[b][layers_np].reshape(-1)
            t = -np.partition(-heads, n // n_row)[n // n_row]  # sorted_desc[n] of the broadcast scores
            tau[b] = t
            keep_head = hs[b] > t
            keep_head[~layers_np] = True
        mask[:, b] = keep_head[:, :, None] & valid_np[b][None, None, :]  # pragma: no mutate (bool * bool == &)
    return mask, tau


def head_scores_from(scores, valid=None) -> np.ndarray:
    """Head scores ``[L, Hkv]`` = max over valid positions and over batch rows (official: ``score.amax(-1)`` of the
    calibration context, Alg. 1's last line). Returned as float32 numpy."""
    shape = _shape4(scores)
    valid_np, _, _ = _masks(shape, valid, None)
    s = _host_scores(scores)
    masked = np.where(valid_np[None, :, None, :], s, -np.inf)
    return masked.max(axis=(1, 3)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------- entry


def keep_mask(
    scores, ratio: float, level: str = "pair", *, valid=None, layers=None, head_scores=None
) -> SelectionResult:
    """Kept-pair mask for ``level`` in ``LEVELS`` (see the module docstring). Host numpy; returns numpy arrays.

    ``head_scores [L, Hkv]`` is used by ``level="head"`` only (context-independent head level, as loaded by
    :func:`load_head_scores`); without it each row's own head maxima are used."""
    if level not in LEVELS:
        raise ValueError(f"unknown selection level {level!r}; levels: {', '.join(LEVELS)}")
    r = check_ratio(ratio)
    shape = _shape4(scores)
    L, B, H, _n_c = shape
    valid_np, layers_np, counts = _masks(shape, valid, layers)
    if level == "head":
        if head_scores is None:
            s = _host_scores(scores)
            hs = np.where(valid_np[None, :, None, :], s, -np.inf).max(axis=3).transpose(1, 0, 2)  # [B, L, H]
        else:
            hs0 = np.asarray(head_scores)
            if hs0.shape != (L, H):
                raise ValueError(f"head_scores must have shape (L, Hkv) = {(L, H)}, got {hs0.shape}")
            hs0 = hs0.astype(np.float32) if hs0.dtype not in (np.float32, np.float64) else hs0
            if np.isnan(hs0).any():
                raise ValueError("head_scores contain NaN")
            hs = np.broadcast_to(hs0, (B, L, H))
        mask, tau = _keep_mask_head(hs, r, valid_np, layers_np, H)
    elif level == "pair-uniform":
        mask = _keep_mask_uniform(_host_scores(scores), r, valid_np, layers_np)
        tau = np.full((B,), np.nan, np.float32)
    else:
        mask, tau = keep_mask_pair(_host_scores(scores), r, valid=valid_np, layers=layers_np)
    kept = mask[layers_np].sum(axis=(0, 2, 3))  # evictable layers only; invalid positions are False already
    return SelectionResult(mask=mask, kept_ratio=kept / counts, threshold=np.asarray(tau, np.float32))


# ------------------------------------------------------------------------------------------------ head-score files


def save_head_scores(path: str, head_scores, config_fingerprint: Mapping[str, Any]) -> None:
    """Write ``head_scores [L, Hkv]`` to ``path`` (exactly that path; ``.npz`` is conventional) with JSON meta.

    ``config_fingerprint``: JSON-serializable facts about the model and calibration; ``family`` and ``source``
    (e.g. "scbench_qa_eng sample 0") are recorded as given (None when absent); ``num_layers``/``num_kv_heads``
    are taken from the array and must agree with the fingerprint if it has them. Written atomically."""
    hs = np.asarray(head_scores, dtype=np.float32)
    if hs.ndim != 2:
        raise ValueError(f"head_scores must have shape [L, Hkv], got {hs.shape}")
    if not np.isfinite(hs).all():
        raise ValueError("head_scores must be finite")
    fp = dict(config_fingerprint)
    for key, value in (("num_layers", hs.shape[0]), ("num_kv_heads", hs.shape[1])):
        if key in fp and int(fp[key]) != value:
            raise ValueError(f"config_fingerprint {key}={fp[key]} but head_scores has shape {hs.shape}")
    meta = {
        **fp,
        "format": HEAD_SCORE_FORMAT,
        "version": HEAD_SCORE_VERSION,
        "num_layers": int(hs.shape[0]),
        "num_kv_heads": int(hs.shape[1]),
        "family": fp.get("family"),
        "source": fp.get("source"),
    }
    text = json.dumps(meta, sort_keys=True)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".head_scores.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, head_scores=hs, meta=np.array(text))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_head_scores(path: str) -> tuple[np.ndarray, dict]:
    """(head_scores float32 [L, Hkv], meta dict) of one file; ValueError if it is not a head-score file."""
    with np.load(path, allow_pickle=False) as z:
        if "head_scores" not in z.files or "meta" not in z.files:
            raise ValueError(f"{path}: not a head-score file (needs 'head_scores' and 'meta', has {z.files})")
        hs = np.asarray(z["head_scores"], np.float32)
        meta = json.loads(str(z["meta"]))
    if meta.get("format") != HEAD_SCORE_FORMAT:
        raise ValueError(f"{path}: meta format is {meta.get('format')!r}, expected {HEAD_SCORE_FORMAT!r}")
    if hs.ndim != 2 or (meta.get("num_layers"), meta.get("num_kv_heads")) != hs.shape:
        raise ValueError(f"{path}: head_scores shape {hs.shape} disagrees with its meta")
    return hs, meta


def load_head_scores(paths: Sequence[str], expect_shape: tuple[int, int]) -> np.ndarray:
    """Element-wise max over the head-score files (official ``load_head_score``), as float32 ``[L, Hkv]``.

    A file whose shape is not ``expect_shape`` (another model) is a ValueError naming both shapes."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no head-score files given (paths is empty)")
    expect = tuple(int(x) for x in expect_shape)
    out = None
    for p in paths:
        hs, _ = read_head_scores(p)
        if hs.shape != expect:
            raise ValueError(
                f"{p}: head scores have shape (num_layers, num_kv_heads) = {hs.shape}, but this model needs "
                f"{expect}; the file is for another model"
            )
        out = hs if out is None else np.maximum(out, hs)
    return out
