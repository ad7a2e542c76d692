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

    def next_positions(self) -> jax.Array:
        """RoPE position of each row's next token (slot == position in the dense working form)."""
        return self.length


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Head-wise paged cache: every (layer, row, kv head) is its own ragged sequence read through its page table.

    Memory is proportional to the pairs kept (plus page rounding): the pool holds the pages that the tables
    reference, and possibly free pages after them that questions borrow (`kvzip.question_pages`). Positions are
    never renumbered: each stored pair keeps its original RoPE position in `pos_pages`, which also drives causal
    and sliding-window masks.
    """

    k_pages: jax.Array  # [N_pages, page_size, D]
    v_pages: jax.Array  # [N_pages, page_size, D]
    pos_pages: jax.Array  # int32 [N_pages, page_size]: original position of each stored pair
    page_table: jax.Array  # int32 [L, B, Hkv, P_max]; entries past num_pages point at page 0 and are never read
    num_pages: jax.Array  # int32 [L, B, Hkv]: pages owned by each head sequence
    lengths: jax.Array  # int32 [L, B, Hkv]: valid pairs per head sequence
    next_position: jax.Array  # int32 [B]: RoPE position of each row's next token

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def batch_size(self) -> int:
        return self.page_table.shape[1]

    def next_positions(self) -> jax.Array:
        return self.next_position

    def nbytes(self) -> int:
        """K and V bytes of the pool (free pages included)."""
        return self.k_pages.nbytes + self.v_pages.nbytes

    def metadata_nbytes(self) -> int:
        return self.pos_pages.nbytes + self.page_table.nbytes + self.num_pages.nbytes + self.lengths.nbytes

    def rollback(self, lengths: jax.Array, next_position: jax.Array) -> PagedKVCache:
        """Restore saved lengths and positions: appended pairs are forgotten, the kept ones were never touched."""
        return dataclasses.replace(self, lengths=lengths, next_position=next_position)
