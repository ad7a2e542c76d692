"""The token-block prefix cache of one instance: full blocks of a prompt's KV, keyed by a hash chain, shared by
reference count with every later request whose prompt starts the same way.

A block is `page_size` prompt tokens: in the head-wise paged pool that is one page per (layer, kv head), all at
the same positions, so a block's pages can be put at the head of another request's page tables as they are. Keys
are `serving.prefix_cache.block_keys`: the chain covers every token before the block, and a block with image
placeholders also covers the images' content hashes, so two prompts share a block only when everything the block's
KV depends on is equal. Shared blocks are full and read-only: a request appends only to pages of its own.

The cache holds one pool reference per page it keeps. An entry is evictable when the cache is its pages' only
owner; eviction takes least recently used entries first, and a match touches a chain from its tail to its head, so
a chain is evicted from its tail (its head stays reachable for longer prompts that share less).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from serving.engine.pages import PagePool, SequenceKV


class PrefixKVCache:
    def __init__(self, pool: PagePool, page_size: int):
        self.pool = pool
        self.page_size = page_size
        self.blocks: OrderedDict[int, np.ndarray] = OrderedDict()  # key -> page ids [L, Hkv]; least recent first
        self.evicted = 0  # blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def pages(self) -> np.ndarray:
        """Every page the cache holds a reference to (the invariants count them)."""
        if not self.blocks:
            return np.zeros(0, np.int32)
        return np.concatenate([ids.ravel() for ids in self.blocks.values()])

    def match(self, keys: list[int], limit: int) -> list[np.ndarray]:
        """The longest run of cached blocks that starts `keys`, at most `limit` blocks; touched (kept longer)."""
        found = []
        for key in keys[:limit]:
            ids = self.blocks.get(key)
            if ids is None:
                break
            found.append(key)
        for key in reversed(found):
            self.blocks.move_to_end(key)
        return [self.blocks[k] for k in found]

    def view(self, blocks: list[np.ndarray]) -> SequenceKV:
        """A new sequence that starts with `blocks` (one more reference to each of their pages)."""
        n = len(blocks)
        layers, heads = blocks[0].shape
        table = np.stack(blocks, axis=-1).astype(np.int32)  # [L, Hkv, n]
        self.pool.share(table.ravel())
        full = np.full((layers, heads), n, np.int32)
        return SequenceKV(table, full, full * self.page_size, n * self.page_size)

    def insert(self, keys: list[int], kv: SequenceKV) -> int:
        """Keep the first len(keys) blocks of a prefilled sequence (those not kept already); returns how many
        are new. The sequence keeps its own references."""
        new = 0
        for j, key in enumerate(keys):
            if key in self.blocks:
                continue
            ids = np.ascontiguousarray(kv.table[:, :, j])
            self.pool.share(ids.ravel())
            self.blocks[key] = ids
            new += 1
        return new

    def evict(self, pages: int) -> int:
        """Free at least `pages` pages if it can, least recently used entries first, skipping entries a request
        still uses; returns the pages freed."""
        freed = 0
        for key in list(self.blocks):
            if freed >= pages:
                break
            ids = self.blocks[key]
            if np.all(self.pool.refs[ids] == 1):
                del self.blocks[key]
                self.pool.release(ids.ravel())
                freed += ids.size
                self.evicted += 1
        return freed

    def clear(self) -> None:
        """Drop every entry (the cache's references only: requests keep theirs)."""
        for ids in self.blocks.values():
            self.pool.release(ids.ravel())
        self.blocks.clear()
