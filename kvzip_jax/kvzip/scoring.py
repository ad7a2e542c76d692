"""KVzip scoring: for each context chunk, one reconstruction forward over the whole prefilled cache; every layer
scores that chunk's pairs (see `models.kv_attention.chunk_scores`).

Every row's chunks start at the same position (n_s + n_c, right after its context), as in the official code.
The official code appends each repeat input to the cache and rolls it back; here the repeat input attends as if
appended but is never written (`models.kv_attention.dense_score_attend`), which is the same computation with
nothing to roll back. The cache needs no slots beyond the context and is never copied, so the peak extra memory
is bounded by the chunk: the repeat input's activations and key-block temporaries of one layer at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import ModelConfig
from kvzip_jax.kvzip.prompts import RepeatChunk
from kvzip_jax.models.decoder import forward_scores
from kvzip_jax.models.kv_attention import ScoreChunk

# Step widths and the scored-key width are rounded up to this many tokens: a short context (or a context's last,
# partial chunk) then computes on little padding, and a handful of shapes covers every length.
STEP_WIDTH_MULTIPLE = 128


@functools.partial(jax.jit, static_argnames=("config",))  # pragma: no mutate (jit: speed, not scores)
def _score_chunk(params, tokens, cache: DenseKVCache, n_valid, score: ScoreChunk, *, config: ModelConfig):
    """Scores [L, B, Hkv, chunk_size] of one chunk; the cache is only read (not donated: it is kept)."""
    positions = cache.length[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    return forward_scores(params, tokens, positions, cache, score, config=config, n_valid=n_valid)


def score_context(
    params: nnx.State,
    config: ModelConfig,
    cache: DenseKVCache,
    chunks: Sequence[Sequence[RepeatChunk]],
    *,
    n_sys: int,
    chunk_size: int,
    progress: bool = True,
) -> tuple[np.ndarray, DenseKVCache]:
    """Scores [L, B, Hkv, n_c_max] (float32, zero past each row's context) for a cache holding, per row,
    [system prefix (n_sys) | context]; `chunks[b]` are row b's repeat inputs. Returns the cache, unchanged."""
    if len(chunks) != cache.batch_size:
        raise ValueError(f"{len(chunks)} rows of repeat chunks for a cache of batch size {cache.batch_size}")
    n_ctx = [sum(c.length for c in row) for row in chunks]
    width = max(len(c.ids) for row in chunks for c in row)
    lengths = np.asarray(jax.device_get(cache.length))
    if not np.array_equal(lengths, n_sys + np.array(n_ctx)):
        raise ValueError(f"cache lengths {lengths.tolist()} != n_sys {n_sys} + context lengths {n_ctx}")
    needed = int(lengths.max()) + width
    if needed > config.max_position_embeddings:
        raise ValueError(f"context + repeat input reach position {needed - 1}, beyond max_position_embeddings "
                         f"({config.max_position_embeddings}); use a shorter context or chunk size")
    num_layers, batch = config.num_layers, cache.batch_size
    scores = np.zeros((num_layers, batch, config.num_kv_heads, max(n_ctx)), np.float32)
    covered = np.zeros((batch, max(n_ctx)), np.int32)
    steps = max(len(row) for row in chunks)
    for step in tqdm(range(steps), desc="KVzip scoring", unit="chunk", disable=not progress):
        # A short step (the context's last, partial chunk) runs at a narrower padded width instead of the full
        # one: widths are rounded up to STEP_WIDTH_MULTIPLE, so at most a few shapes are ever compiled.
        longest = max(len(row[step].ids) for row in chunks if step < len(row))
        # Not mutated: the rounding only picks a compiled width >= longest, and n_valid masks the padding.
        padded = _round_up(longest, STEP_WIDTH_MULTIPLE)  # pragma: no mutate
        tokens = np.zeros((batch, min(width, padded)), np.int32)
        n_valid, start, length = (np.zeros(batch, np.int32) for _ in range(3))
        for b, row in enumerate(chunks):
            if step < len(row):
                c = row[step]
                tokens[b, : len(c.ids)] = c.ids
                n_valid[b], start[b], length[b] = len(c.ids), c.start, c.length
        # The scored keys span only this step's longest chunk, rounded up, not the whole chunk size: scoring a
        # 1K context with the 2K default chunk then gathers and scores half the keys.
        scored_width = min(chunk_size, _round_up(int(length.max()), STEP_WIDTH_MULTIPLE))
        spec = ScoreChunk(chunk_start=jnp.asarray(start), chunk_len=jnp.asarray(length), n_sys=n_sys,
                          chunk_size=scored_width)
        chunk = _score_chunk(params, jnp.asarray(tokens), cache, jnp.asarray(n_valid), spec, config=config)
        chunk = np.asarray(chunk)
        for b in range(batch):
            if length[b]:
                scores[:, b, :, start[b] : start[b] + length[b]] = chunk[:, b, :, : length[b]]
                covered[b, start[b] : start[b] + length[b]] += 1
    for b, n in enumerate(n_ctx):  # every context position scored exactly once (guards against silent no-ops)
        # Not mutated: `>= 1` is the same test, as the lengths sum to n and a position scored twice leaves a hole.
        if not (covered[b, :n] == 1).all():  # pragma: no mutate
            raise AssertionError(f"row {b}: context positions were not each scored exactly once")
    return scores, cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
