"""KV caches as frozen pytree dataclasses: passed into the forward, returned from it, never owned by a module.

`DenseKVCache` is the working form for prefill, KVzip scoring and uncompressed generation. Slot `s` of row `b`
holds the token written `s`-th into that row; `length[b]` slots are valid. Attention masks use slot indices (as
transformers masks by cache position) while RoPE uses the positions given to the forward, so the two may differ
(e.g. multimodal position ids or a position offset).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvzip_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
    k: jax.Array  # [L, B, Hkv, S_cap, D]
    v: jax.Array  # [L, B, Hkv, S_cap, D]
    length: jax.Array  # int32 [B]: valid slots per row

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def zeros(cls, config: ModelConfig, batch_size: int, capacity: int, dtype=jnp.float32) -> DenseKVCache:
        """An empty cache. `zeros`, never `empty`: jax >= 0.11 returns uninitialised memory for `empty`."""
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"batch_size ({batch_size}) and capacity ({capacity}) must be >= 1")
        shape = (config.num_layers, batch_size, config.num_kv_heads, capacity, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros((batch_size,), jnp.int32))

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def rollback(self, length: jax.Array) -> DenseKVCache:
        """Forget every slot at or beyond `length` (per row). Stale slots are masked, so nothing is rewritten."""
        return dataclasses.replace(self, length=jnp.minimum(self.length, jnp.asarray(length, jnp.int32)))

