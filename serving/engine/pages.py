"""Host-side bookkeeping of an instance's paged KV pool: which pages are free, and which pages a sequence owns.

The device pool (`k_pages, v_pages, pos_pages`, owned by the instance's executor) is only ever touched by that
instance's worker thread; these host objects are guarded by the engine's lock. A sequence's KV is head-wise
paged, the format KVzip produces: every (layer, kv head) is its own ragged sequence with its own pages, so a
compressed context (different lengths per head) and an uncompressed prompt (the same length everywhere) are the
same object here.
"""

from __future__ import annotations

import dataclasses

import numpy as np


class OutOfPages(RuntimeError):
    """The pool cannot hold a request right now (it waits; it is never dropped)."""


class PagePool:
    """Free list and reference counts of one pool. Page 0 is never handed out: padded page-table entries point
    at it, and rows without a sequence write nothing (their appends are masked), so it stays a safe dummy."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the reserved dummy), got {num_pages}")
        self.num_pages = num_pages
        self.refs = np.zeros(num_pages, np.int32)
        self.refs[0] = 1
        # a stack: the most recently freed pages are reused first (they are warm in cache)
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def alloc(self, n: int) -> np.ndarray:
        if n > len(self._free):
            raise OutOfPages(f"{n} pages asked, {len(self._free)} free of {self.num_pages - 1}")
        ids = np.asarray(self._free[len(self._free) - n:][::-1], np.int32)
        del self._free[len(self._free) - n:]
        self.refs[ids] = 1
        return ids

    def share(self, ids: np.ndarray) -> None:
        """One more owner for pages already in use (a shared read-only prefix)."""
        ids = np.asarray(ids, np.int32)
        if np.any(self.refs[ids] < 1):
            raise ValueError("sharing a page that is not in use")
        self.refs[ids] += 1

    def release(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int32)
        if ids.size == 0:
            return
        if np.any(ids == 0) or np.any(self.refs[ids] < 1):
            raise ValueError("releasing a page that is not in use (a double free)")
        np.subtract.at(self.refs, ids, 1)
        self._free.extend(int(i) for i in np.unique(ids[self.refs[ids] == 0]))


@dataclasses.dataclass
class SequenceKV:
    """The pages of one sequence in one pool: table [L, Hkv, P] (entries past num_pages are 0), num_pages and
    lengths [L, Hkv] (pairs stored per head), and the RoPE position of the sequence's next token."""

    table: np.ndarray
    num_pages: np.ndarray
    lengths: np.ndarray
    next_position: int

    @classmethod
    def empty(cls, num_layers: int, num_kv_heads: int) -> SequenceKV:
        z = np.zeros((num_layers, num_kv_heads), np.int32)
        return cls(np.zeros((num_layers, num_kv_heads, 0), np.int32), z, z.copy(), 0)

    def owned(self) -> np.ndarray:
        """Every page this sequence holds, in (layer, head, page) order: the order migrations copy them in."""
        width = self.table.shape[2]
        mask = np.arange(width)[None, None, :] < self.num_pages[:, :, None]
        return self.table[mask]

    def relocated(self, new_ids: np.ndarray) -> SequenceKV:
        """The same sequence in another pool whose pages `new_ids` (in `owned()` order) hold copies of ours."""
        width = self.table.shape[2]
        mask = np.arange(width)[None, None, :] < self.num_pages[:, :, None]
        table = np.zeros_like(self.table)
        table[mask] = new_ids
        return dataclasses.replace(self, table=table)

    def pages_to_hold(self, tokens: int, page_size: int) -> int:
        """How many more pages every head needs so that `tokens` more pairs fit (summed over heads)."""
        need = -(-(self.lengths + tokens) // page_size)
        return int(np.maximum(need - self.num_pages, 0).sum())

    def grow(self, pool: PagePool, tokens: int, page_size: int) -> None:
        """Give every head room for `tokens` more pairs (all or nothing: OutOfPages leaves it unchanged)."""
        need = np.maximum(-(-(self.lengths + tokens) // page_size) - self.num_pages, 0)
        total = int(need.sum())
        if total == 0:
            return
        ids = pool.alloc(total)
        width = int((self.num_pages + need).max())
        if width > self.table.shape[2]:
            self.table = np.pad(self.table, ((0, 0), (0, 0), (0, width - self.table.shape[2])))
        at = 0
        for (layer, head), k in np.ndenumerate(need):
            if k:
                start = self.num_pages[layer, head]
                self.table[layer, head, start:start + k] = ids[at:at + k]
                at += k
        self.num_pages = self.num_pages + need

    def advance(self, tokens: int, page_size: int) -> None:
        """Record `tokens` pairs appended to every head (the device did the writing)."""
        self.lengths = np.minimum(self.lengths + tokens, self.num_pages * page_size)
        self.next_position += tokens
