"""Baselines under KVzip's query-agnostic protocol, on the same prefilled dense cache, the same compaction and the
same head-wise paged cache: only the scores and the budget rule differ.

As in the paper's App. A, SnapKV / PyramidKV / H2O select per layer across heads (AdaKV-style non-uniform head
budgets: the official threshold rule applied within each layer); StreamingLLM keeps sinks + the most recent
context tokens in every head; random scores are a floor. Each function returns a `ScoredContext`, so any ratio
can be compressed from one scoring pass and compared with KVzip at equal budgets.

- SnapKV (query-agnostic): the observation window is the tail of the context (32 tokens, 16 under 1K tokens),
  its queries recomputed at their original positions; scores = attention received, averaged over the window
  rows and the G query heads of the group, max-pooled over positions (kernel 7); window pairs always kept.
- SnapKV query-aware: the observation window is the question turn, appended after the context (rolled back).
  Compressing with the first question and reusing the cache for the others is `snapkv(..., question=first)`.
- PyramidKV: SnapKV scores with per-layer budgets decreasing linearly with depth (beta = 20, as kvpress).
- H2O: the max attention each pair received from any query during prefill (the paper's stronger variant).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import ModelConfig
from kvzip_jax.generate import DEFAULT_CHUNK, balanced_chunk, check_token_ids, pad_prompts
from kvzip_jax.kvzip.compressor import ScoredContext, bucketed_capacity, prefill_contexts
from kvzip_jax.kvzip.prompts import KVzipPrompt, context_ids, question_ids
from kvzip_jax.kvzip.select import SelectionResult, check_ratio, keep_mask, keep_mask_pair
from kvzip_jax.models.decoder import forward_observe

FORCE_KEEP = 2.0  # above any attention probability: pairs that a method always keeps


def _force_keep(scores: np.ndarray, row: int, start: int, stop: int) -> None:
    """Mark context positions [start, stop) of `row` as always kept; later positions rank higher, so that the
    official strict-threshold rule never evicts a whole block of tied forced pairs when the budget is tight."""
    scores[:, row, :, start:stop] = FORCE_KEEP + np.arange(stop - start, dtype=np.float32) / max(stop - start, 1)
SNAPKV_WINDOW, SNAPKV_SHORT_WINDOW, SNAPKV_KERNEL = 32, 16, 7
PYRAMID_BETA = 20.0
STREAMING_SINKS = 4


@functools.partial(jax.jit, static_argnames=("config", "reduce"))
def _observe(params, tokens, cache: DenseKVCache, n_valid, *, config: ModelConfig, reduce: str):
    positions = cache.length[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return forward_observe(params, tokens, positions, cache, config=config, reduce=reduce, n_valid=n_valid)


def layerwise_selector(layer_ratios=None):
    """Official threshold rule within each layer (all heads and positions of that layer share one budget).
    `layer_ratios(ratio, num_layers) -> [L]` gives per-layer ratios (PyramidKV); None: the same ratio everywhere."""

    def select(scores, ratio, level, valid, layers, head_scores):
        del level, head_scores
        r = check_ratio(ratio)
        num_layers = scores.shape[0]
        ratios = np.full(num_layers, r)
        if layer_ratios is not None:  # spread over the evicted layers only (Gemma3's sliding layers are not)
            ratios[layers] = layer_ratios(r, int(layers.sum()))
        mask = np.zeros(scores.shape, bool)
        for layer in range(num_layers):
            if not layers[layer]:
                mask[layer] = valid[:, None, :]
                continue
            mask[layer : layer + 1], _ = keep_mask_pair(scores[layer : layer + 1], float(ratios[layer]), valid=valid)
        kept = (mask[layers] & valid[None, :, None, :]).sum(axis=(0, 2, 3))
        total = layers.sum() * scores.shape[2] * valid.sum(-1)
        return SelectionResult(mask=mask, kept_ratio=kept / total, threshold=np.full(scores.shape[1], np.nan))

    return select


def pyramid_ratios(ratio: float, num_layers: int, beta: float = PYRAMID_BETA) -> np.ndarray:
    """Linear per-layer budgets from 2r - r/beta (first layer) down to r/beta (last), mean r. Budgets above 1
    are capped and their excess spread over the other layers, so the mean stays r (and r = 1 keeps all)."""
    low = ratio / beta
    high = 2 * ratio - low
    ratios = np.linspace(high, low, num_layers) if num_layers > 1 else np.array([ratio], float)
    for _ in range(num_layers):
        excess = np.clip(ratios - 1.0, 0.0, None).sum()
        ratios = np.minimum(ratios, 1.0)
        open_layers = ratios < 1.0
        if excess <= 1e-12 or not open_layers.any():
            break
        ratios[open_layers] += excess / open_layers.sum()
    return ratios


def uniform_selector(scores, ratio, level, valid, layers, head_scores):
    del level, head_scores
    return keep_mask(scores, ratio, "pair-uniform", valid=valid, layers=layers)


def _max_pool(x: np.ndarray, kernel: int) -> np.ndarray:
    """Max over a centred window of `kernel` positions along the last axis (same length, edges clipped)."""
    half = kernel // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1)
    return windows.max(axis=-1)


def _context_scores(observed: np.ndarray, n_sys: int, n_ctx: Sequence[int]) -> np.ndarray:
    """observed [L, B, Hkv, S] -> context columns [L, B, Hkv, n_c_max], zero past each row's context."""
    out = np.zeros((*observed.shape[:3], max(n_ctx)), np.float32)
    for b, n in enumerate(n_ctx):
        out[:, b, :, :n] = observed[:, b, :, n_sys : n_sys + n]
    return out


def _scored(config, prompt, cache, scores, n_ctx, times, method, selector) -> ScoredContext:
    return ScoredContext(config, prompt, cache, scores, tuple(n_ctx), times, method=method, selector=selector)


def snapkv(
    params: nnx.State,
    config: ModelConfig,
    prompt: KVzipPrompt,
    contexts: Sequence[Sequence[int]],
    *,
    question: Sequence[Sequence[int]] | None = None,
    window: int | None = None,
    kernel: int = SNAPKV_KERNEL,
    pyramid: bool = False,
) -> ScoredContext:
    """SnapKV (or PyramidKV with `pyramid=True`). Query-agnostic by default; `question` (one per row, raw ids
    of the question text) makes it query-aware: the question turn is the observation window."""
    n_ctx = [len(c) for c in contexts]
    n_sys = prompt.n_sys
    turns = None if question is None else [question_ids(prompt, q) for q in question]
    extra = 0 if turns is None else max(len(t) for t in turns)
    cache, prefill_s = prefill_contexts(params, config, prompt, contexts, extra_slots=max(extra, 1))
    t0 = time.perf_counter()
    if turns is None:
        # Recompute the last `w` context tokens' queries at their own positions (the copy of the cache is
        # discarded, so the prefilled pairs stay bit-identical).
        ws = [window or (SNAPKV_SHORT_WINDOW if n < 1000 else SNAPKV_WINDOW) for n in n_ctx]
        ws = [min(w, n) for w, n in zip(ws, n_ctx, strict=True)]
        rows = [context_ids(prompt, c) for c in contexts]
        obs = [r[len(r) - w :] for r, w in zip(rows, ws, strict=True)]
        start = jnp.asarray([len(r) - w for r, w in zip(rows, ws, strict=True)], jnp.int32)
        observe_cache = cache.rollback(start)
    else:
        obs, observe_cache = turns, cache
    tokens, lengths = pad_prompts(obs)
    check_token_ids(tokens, config)
    observed, _ = _observe(params, jnp.asarray(tokens), observe_cache, jnp.asarray(lengths), config=config,
                           reduce="mean")
    scores = _max_pool(_context_scores(np.asarray(observed), n_sys, n_ctx), kernel)
    if turns is None:
        for b, (n, w) in enumerate(zip(n_ctx, ws, strict=True)):
            _force_keep(scores, b, n - w, n)
    for b, n in enumerate(n_ctx):
        scores[:, b, :, n:] = 0.0
    times = {"prefill_s": prefill_s, "score_s": time.perf_counter() - t0}
    selector = layerwise_selector(pyramid_ratios if pyramid else None)
    name = ("pyramidkv" if pyramid else "snapkv") + ("" if turns is None else "-query")
    return _scored(config, prompt, cache, scores, n_ctx, times, name, selector)


def pyramidkv(params, config, prompt, contexts, **kwargs) -> ScoredContext:
    return snapkv(params, config, prompt, contexts, pyramid=True, **kwargs)


def h2o(
    params: nnx.State,
    config: ModelConfig,
    prompt: KVzipPrompt,
    contexts: Sequence[Sequence[int]],
    *,
    prefill_chunk: int = DEFAULT_CHUNK,
) -> ScoredContext:
    """H2O: max attention each pair received from any query during a chunked prefill."""
    rows = [context_ids(prompt, c) for c in contexts]
    tokens, lengths = pad_prompts(rows)
    check_token_ids(tokens, config)
    t0 = time.perf_counter()
    cache = DenseKVCache.zeros(config, len(rows), bucketed_capacity(tokens.shape[1] + 1, config),
                               params["embed"][...].dtype)
    chunk = balanced_chunk(tokens.shape[1], prefill_chunk)  # `prefill`'s chunks: the same K/V, bit for bit
    tokens = np.pad(tokens, ((0, 0), (0, -tokens.shape[1] % chunk)))
    received = None
    for begin in range(0, tokens.shape[1], chunk):
        n_valid = np.clip(lengths - begin, 0, chunk).astype(np.int32)
        observed, cache = _observe_donated(params, jnp.asarray(tokens[:, begin : begin + chunk]), cache,
                                           jnp.asarray(n_valid), config=config)
        received = observed if received is None else jnp.maximum(received, observed)
    jax.block_until_ready(cache.k)
    scores = _context_scores(np.asarray(received), prompt.n_sys, [len(c) for c in contexts])
    times = {"prefill_s": time.perf_counter() - t0, "score_s": 0.0}
    return _scored(config, prompt, cache, scores, [len(c) for c in contexts], times, "h2o", layerwise_selector())


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _observe_donated(params, tokens, cache, n_valid, *, config):
    positions = cache.length[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return forward_observe(params, tokens, positions, cache, config=config, reduce="max", n_valid=n_valid)


def streaming_llm(params, config, prompt, contexts, *, sinks: int = STREAMING_SINKS) -> ScoredContext:
    """StreamingLLM: the first `sinks` context tokens + the most recent ones, the same in every head."""
    n_ctx = [len(c) for c in contexts]
    cache, prefill_s = prefill_contexts(params, config, prompt, contexts, extra_slots=1)
    scores = np.zeros((config.num_layers, len(contexts), config.num_kv_heads, max(n_ctx)), np.float32)
    for b, n in enumerate(n_ctx):
        scores[:, b, :, :n] = (np.arange(n) + 1) / (n + 1)  # more recent, more kept
        _force_keep(scores, b, 0, min(sinks, n))
    return _scored(config, prompt, cache, scores, n_ctx, {"prefill_s": prefill_s, "score_s": 0.0},
                   "streaming_llm", uniform_selector)


def random_baseline(params, config, prompt, contexts, *, seed: int = 0) -> ScoredContext:
    """Uniform random scores, selected per layer across heads: the floor any method should beat."""
    n_ctx = [len(c) for c in contexts]
    cache, prefill_s = prefill_contexts(params, config, prompt, contexts, extra_slots=1)
    rng = np.random.default_rng(seed)
    scores = rng.random((config.num_layers, len(contexts), config.num_kv_heads, max(n_ctx))).astype(np.float32)
    for b, n in enumerate(n_ctx):
        scores[:, b, :, n:] = 0.0
    return _scored(config, prompt, cache, scores, n_ctx, {"prefill_s": prefill_s, "score_s": 0.0}, "random",
                   layerwise_selector())


BASELINES = {
    "snapkv": snapkv,
    "pyramidkv": pyramidkv,
    "h2o": h2o,
    "streaming_llm": streaming_llm,
    "random": random_baseline,
}
