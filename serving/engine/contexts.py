"""KVzip-compressed contexts served by id: a long text compressed once, then any number of requests start from
its KV instead of prefilling the text again.

A served context keeps its compressed pool where it was made (the default device). An instance that gets a
request naming it loads the context's pages into its own pool once ("resident"); every request then shares those
pages (reference counts) and writes only into pages of its own. A head whose last context page is only partly
filled would have the request append into it, so that page is copied first (copy-on-write, as vLLM's prefix
blocks); full pages are never written.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvzip_jax.kvzip.compressor import CompressedContext
from serving.engine.pages import PagePool, SequenceKV


@dataclasses.dataclass
class ServedContext:
    cid: str
    compressed: CompressedContext  # one row
    kv: SequenceKV  # the context as a sequence over the compressed pool's own page ids
    context_tokens: int  # tokens of the context text (the prefill every request saves)
    created: float
    resident: dict = dataclasses.field(default_factory=dict)  # instance id -> SequenceKV in that instance's pool
    loading: set = dataclasses.field(default_factory=set)  # instance ids whose load is under way
    requests: int = 0

    @classmethod
    def from_compressed(cls, cid: str, compressed: CompressedContext, context_tokens: int, page_size: int,
                        created: float) -> ServedContext:
        if compressed.batch_size != 1:
            raise ValueError(f"a served context is one context; this one has {compressed.batch_size} rows")
        cache = compressed.cache
        if cache.page_size != page_size:
            raise ValueError(f"the context was compressed with page_size {cache.page_size}; the engine pages by "
                             f"{page_size}")
        table = np.asarray(cache.page_table)[:, 0]
        num_pages = np.asarray(cache.num_pages)[:, 0]
        kv = SequenceKV(table.astype(np.int32), num_pages.astype(np.int32),
                        np.asarray(compressed.base_lengths)[:, 0].astype(np.int32),
                        int(np.asarray(compressed.base_next_position)[0]))
        return cls(cid, compressed, kv, context_tokens, created)

    @property
    def num_pages(self) -> int:
        return int(self.kv.num_pages.sum())

    def pages(self, padded_ids: np.ndarray):
        """The context's pages (K, V, positions) in `owned()` order padded like `padded_ids` (the executor's
        padding of the destination ids); the importing executor places them on its devices."""
        ids = np.zeros(len(padded_ids), np.int32)
        owned = self.kv.owned()
        ids[:len(owned)] = owned
        cache = self.compressed.cache
        return tuple(x[ids] for x in (cache.k_pages, cache.v_pages, cache.pos_pages))


def share_for_request(resident: SequenceKV, pool: PagePool, page_size: int) -> tuple[SequenceKV, np.ndarray,
                                                                                     np.ndarray]:
    """A request's own view of a resident context: every page shared, except each head's partly filled last page,
    which gets a private copy. Returns (sequence, copy sources, copy destinations); the caller copies the pages
    on the device before anything is appended. Needs `copies_needed(resident)` free pages."""
    kv = dataclasses.replace(resident, table=resident.table.copy(), num_pages=resident.num_pages.copy(),
                             lengths=resident.lengths.copy())
    pool.share(kv.owned())
    partial = (kv.lengths % page_size != 0) & (kv.num_pages > 0)
    layers, heads = np.nonzero(partial)
    last = kv.num_pages[layers, heads] - 1
    src = kv.table[layers, heads, last]
    dst = pool.alloc(len(src))
    kv.table[layers, heads, last] = dst
    pool.release(src)  # the request holds its copy instead of a share of the original
    return kv, src.astype(np.int32), dst


def copies_needed(resident: SequenceKV, page_size: int) -> int:
    return int(((resident.lengths % page_size != 0) & (resident.num_pages > 0)).sum())
