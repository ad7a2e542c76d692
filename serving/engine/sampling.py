"""Per-request sampling inside the engine's batched steps: every row has its own temperature, top-k, top-p and
seed, so requests with different settings share one decode batch.

A row's random key is `fold_in(key(seed), position of the token being drawn)`: a request's tokens depend only on
its own seed and prompt, never on which other requests share its batch or how many steps one dispatch runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MAX_SEED = 2**31 - 1
MAX_TOP_K = 2**31 - 1  # int32 on the device; any value >= the vocabulary means "off" anyway


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [0, {MAX_TOP_K}] (0 turns it off), got {self.top_k}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("a stop string must not be empty")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """The sampling settings of a batch's rows, as device arrays [B]."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @classmethod
    def from_params(cls, params: list[SamplingParams | None], rows: int) -> RowSampling:
        """Rows past len(params) (or None) are padding: greedy, never read."""
        t = np.zeros(rows, np.float32)
        k = np.zeros(rows, np.int32)
        p = np.ones(rows, np.float32)
        s = np.zeros(rows, np.uint32)
        for i, sp in enumerate(params):
            if sp is not None:
                t[i], k[i], p[i], s[i] = sp.temperature, sp.top_k, sp.top_p, sp.seed
        return cls(t, k, p, s)


def sample_rows(logits: jax.Array, rows: RowSampling, positions: jax.Array) -> jax.Array:
    """logits [B, V] -> token ids [B]. Filters apply in transformers' order: temperature, top-k, top-p; ties at a
    cut-off are kept. Greedy rows take the argmax; when no row samples, nothing but the argmax runs."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic():
        x = logits.astype(jnp.float32) / jnp.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
        vocab = x.shape[-1]
        neg = jnp.finfo(jnp.float32).min
        desc = -jnp.sort(-x, axis=-1)
        k = jnp.where(rows.top_k > 0, jnp.minimum(rows.top_k, vocab), vocab)
        desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], desc, neg)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.maximum(jnp.sum(mass_before < rows.top_p[:, None], axis=-1), 1)  # the top token always stays
        keep = jnp.minimum(keep, k)
        cutoff = jnp.take_along_axis(desc, (keep - 1)[:, None], axis=-1)
        x = jnp.where(x < cutoff, neg, x)
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(rows.seed, positions)
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(rows.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(rows.temperature > 0), stochastic, lambda: greedy)
