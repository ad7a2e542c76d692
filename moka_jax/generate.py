"""Generation with a MokA-adapted decoder (spec section 1.8).

The prompt is prefilled in ONE forward with the full MokA path: non-text tokens attend to the question tokens
that follow them, so a chunked prefill that runs an image before its question would be wrong (and so would
sharing a multimodal prefix's KV across different questions). Every generated token is text and never a key, so
its adapter term is s * x A_text B: the decode loop runs the plain decoder on `merge_text_path` params, with
no adapter work per token, and equals a full recompute at every generated position.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import ModelConfig
from kvzip_jax.generate import (
    DEFAULT_SAMPLING,
    GenerationResult,
    SamplingConfig,
    check_capacity,
    check_positions,
    check_token_ids,
    continue_generation,
)
from moka_jax.config import MokAConfig
from moka_jax.context import MokAContext
from moka_jax.model import forward, merge_text_path


@functools.partial(jax.jit, static_argnames=("config", "moka"), donate_argnames=("cache",))
def _prefill(params, inputs, context, cache, n_valid, *, config: ModelConfig, moka: MokAConfig):
    positions = cache.length[:, None] + jnp.arange(inputs.shape[1], dtype=jnp.int32)[None, :]
    return forward(params, inputs, positions, cache, config=config, moka=moka, context=context, n_valid=n_valid,
                   logits_at="last")


def prefill(params: nnx.State, config: ModelConfig, moka: MokAConfig, inputs, lengths: Sequence[int],
            context: MokAContext, cache: DenseKVCache):
    """Append right-padded prompts (token ids [B, T] or embeddings [B, T, H]; row b's first lengths[b] count) to
    `cache` in one adapted forward. Returns (logits [B, V] at each row's last prompt token, cache)."""
    lengths = np.asarray(lengths, np.int64)
    b, t = inputs.shape[:2]
    if context.slot.shape != (b, t):
        raise ValueError(f"the context covers {tuple(context.slot.shape)} tokens, the prompts {(b, t)}")
    if lengths.shape != (b,) or (lengths < 1).any() or (lengths > t).any():
        raise ValueError(f"lengths {lengths.tolist()} must give each of the {b} rows 1..{t} tokens")
    if inputs.ndim == 2:
        check_token_ids(np.asarray(inputs), config)
    start = np.asarray(jax.device_get(cache.length))
    check_capacity(int((start + lengths).max()), cache.capacity, "the prompt")
    check_positions(int((start + lengths).max()) - 1, config)
    return _prefill(params, jnp.asarray(inputs), context, cache, jnp.asarray(lengths, jnp.int32), config=config,
                    moka=moka)


def generate(
    params: nnx.State,
    config: ModelConfig,
    moka: MokAConfig,
    inputs,
    lengths: Sequence[int],
    context: MokAContext,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = DEFAULT_SAMPLING,
    stop_token_ids: Sequence[int] | None = None,
    merged: nnx.State | None = None,
    seed: int = 0,
) -> GenerationResult:
    """Prefill the prompts with the MokA path, then decode on the text path folded into the base weights.
    `merged` (from `merge_text_path`) may be passed in to reuse it across calls."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if context.dropout_key is not None:
        raise ValueError("generation runs without dropout: build the context with dropout_key=None")
    lengths = np.asarray(lengths, np.int64)
    stops = tuple(config.eos_token_ids) if stop_token_ids is None else tuple(stop_token_ids)
    needed = int(lengths.max()) + max_new_tokens - 1
    check_positions(needed - 1, config)
    dtype = params["embed"][...].dtype
    cache = DenseKVCache.zeros(config, inputs.shape[0], needed, dtype)
    logits, cache = prefill(params, config, moka, inputs, lengths, context, cache)
    merged = merge_text_path(params, config, moka) if merged is None else merged
    return continue_generation(merged, config, logits, cache, max_new_tokens=max_new_tokens, sampling=sampling,
                               stop_token_ids=stops, seed=seed)
