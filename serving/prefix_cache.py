"""Unified multimodal prefix cache (spec 1.4): two pools managed together.

1. EmbeddingCache: image content hash -> vision embeddings. A hit skips preprocessing, encoding and the
   E->P transfer for that image.
2. PrefixKVCache: KV blocks of the unified token sequence (system prompt, image placeholders, text), keyed
   by a hash chain over token ids. Every block covering image placeholder tokens also carries the extra
   keys (image hash, offset inside the image), so two different images never share a block even though
   their placeholder token ids are identical (vLLM PR #11187 scheme). Only full blocks are cacheable.

Both pools keep reference counts (an entry in use by a request in flight is never evicted) and evict in
LRU order among unreferenced entries only.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence

IMAGE_PLACEHOLDER = 151655  # Qwen2.5-VL <|image_pad|>


def block_keys(token_ids: Sequence[int], mm_spans: Sequence[tuple[int, int, int]], block_size: int,
               parent: int = 0) -> list[int]:
    """Hash-chain keys of the full blocks of `token_ids`.

    mm_spans: (image_hash, start, length) for every image placeholder run in the sequence.
    key_j = hash((key_{j-1}, hash(tokens of block j), ((image_hash, offset_of_first_covered_token), ...)))
    """
    keys = []
    n_full = len(token_ids) // block_size
    spans = sorted(mm_spans, key=lambda s: s[1])
    for j in range(n_full):
        lo, hi = j * block_size, (j + 1) * block_size
        extra = tuple((h, max(lo, s) - s) for (h, s, ln) in spans if s < hi and s + ln > lo)
        parent = hash((parent, hash(tuple(token_ids[lo:hi])), extra))
        keys.append(parent)
    return keys


class _RefLRU:
    """Entries with a size and a refcount; LRU order kept only for refcount-0 entries (the evictable set)."""

    def __init__(self, capacity: int, what: str):
        if capacity < 0:
            raise ValueError(f"{what} capacity = {capacity} must be >= 0")
        self.capacity = capacity
        self.what = what
        self.size = {}  # key -> size
        self.ref = {}  # key -> refcount
        self.lru: OrderedDict = OrderedDict()  # refcount-0 keys, oldest first
        self.on_evict = None  # called with each evicted key (an owner of the entries' values drops them)
        self.used = 0
        self.evictions = 0

    def __contains__(self, key):
        return key in self.size

    def acquire(self, key):
        r = self.ref[key]
        if r == 0:
            del self.lru[key]
        self.ref[key] = r + 1

    def release(self, key):
        # A real exception, not an assert: a double release would otherwise corrupt the refcounts (and the
        # evictable set) silently under `python -O`.
        if key not in self.ref:
            raise RuntimeError(f"{self.what}: release of entry {key!r}, which is not in the cache")
        r = self.ref[key] - 1
        if r < 0:
            raise RuntimeError(f"{self.what}: double release of entry {key!r}: its refcount is already 0")
        self.ref[key] = r
        if r == 0:
            self.lru[key] = None  # most recently used

    def touch(self, key):
        if self.ref[key] == 0:
            self.lru.move_to_end(key)

    def insert_unreferenced(self, key, size: int) -> bool:
        """Insert (or refresh) an entry nobody holds any more: it becomes the most recently used."""
        if key in self.size:
            if self.ref[key] == 0:
                self.lru.move_to_end(key)
            return True
        if not self._make_room(size):
            return False
        self.size[key] = size
        self.ref[key] = 0
        self.lru[key] = None
        self.used += size
        return True

    def insert_acquired(self, key, size: int) -> bool:
        """Insert a new entry already referenced once by the caller. False if it cannot fit."""
        if key in self.size:
            self.acquire(key)
            return True
        if not self._make_room(size):
            return False
        self.size[key] = size
        self.ref[key] = 1
        self.used += size
        return True

    def _make_room(self, size: int) -> bool:
        """Evict least recently used unreferenced entries until `size` fits; False if it still cannot."""
        while self.used + size > self.capacity and self.lru:
            old, _ = self.lru.popitem(last=False)
            self.used -= self.size.pop(old)
            del self.ref[old]
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(old)
        return self.used + size <= self.capacity

    def check(self):
        """Invariants, raised explicitly (not `assert`, which `python -O` drops) so tests that call this can fail."""
        if not self.used == sum(self.size.values()) <= self.capacity:
            raise RuntimeError(f"{self.what}: size accounting broken (used {self.used}, capacity {self.capacity})")
        if set(self.lru) != {k for k, r in self.ref.items() if r == 0}:
            raise RuntimeError(f"{self.what}: LRU set broken")
        if any(r < 0 for r in self.ref.values()):
            raise RuntimeError(f"{self.what}: negative refcount")


class EmbeddingCache:
    """image hash -> embeddings of `v_tokens` tokens; capacity in vision tokens."""

    def __init__(self, capacity_tokens: int):
        self.pool = _RefLRU(capacity_tokens, "embedding cache")
        self.hits = 0
        self.misses = 0

    def lookup_acquire(self, image_hash: int) -> bool:
        """On a hit, pin the entry for the caller (release after prefill consumed it)."""
        if image_hash in self.pool:
            self.pool.acquire(image_hash)
            self.hits += 1
            return True
        self.misses += 1
        return False

    def insert_acquired(self, image_hash: int, v_tokens: int) -> bool:
        return self.pool.insert_acquired(image_hash, v_tokens)

    def release(self, image_hash: int):
        self.pool.release(image_hash)


class PrefixKVCache:
    """Prefix KV blocks by hash-chain key; capacity in blocks."""

    def __init__(self, capacity_blocks: int, block_size: int):
        self.pool = _RefLRU(capacity_blocks, "prefix KV cache")
        self.block_size = block_size
        self.lookups = 0
        self.hit_tokens = 0
        self.query_tokens = 0

    def match_acquire(self, keys: Sequence[int], total_tokens: int) -> list[int]:
        """Longest cached prefix of `keys`; pins the matched blocks and returns them."""
        got = []
        for k in keys:
            if k not in self.pool:
                break
            got.append(k)
        for k in got:
            self.pool.acquire(k)
        self.lookups += 1
        self.query_tokens += total_tokens
        self.hit_tokens += len(got) * self.block_size
        return got

    def insert_acquired(self, keys: Sequence[int]) -> list[int]:
        """Insert computed blocks (in chain order), pinned by the caller; returns the keys actually held."""
        held = []
        for k in keys:
            if not self.pool.insert_acquired(k, 1):
                break  # a chain with a hole is useless past the hole
            held.append(k)
        return held

    def release(self, keys: Sequence[int]):
        for k in keys:
            self.pool.release(k)

    def insert_unreferenced(self, keys: Sequence[int]) -> int:
        """Publish blocks a finished prefill computed (its KV went on to decode); returns how many fit."""
        pool = self.pool
        size, ref, lru = pool.size, pool.ref, pool.lru
        cap = pool.capacity
        n = 0
        for k in keys:  # inlined _RefLRU.insert_unreferenced (size 1): the simulator's hottest cache path
            if k in size:
                if ref[k] == 0:
                    lru.move_to_end(k)
            else:
                if pool.used + 1 > cap:
                    if not lru:
                        break
                    old, _ = lru.popitem(last=False)
                    del size[old]
                    del ref[old]
                    pool.used -= 1
                    pool.evictions += 1
                size[k] = 1
                ref[k] = 0
                lru[k] = None
                pool.used += 1
            n += 1
        return n


class PromptKeyer:
    """Builds the shareable prefix (system prompt + image placeholders) of a request and its block keys.

    The user's own text follows the images and is unique per request in the synthetic workloads, so only
    blocks entirely inside the shareable prefix are ever looked up; memoised by (system prompt, images)
    because the keys depend on nothing else."""

    def __init__(self, block_size: int, memo_size: int = 8192):
        self.block_size = block_size
        self.memo: OrderedDict = OrderedDict()
        self.memo_size = memo_size

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _sys_tokens(sys_prompt: int, sys_len: int) -> tuple:
        return tuple((sys_prompt * 7919 + 13 * i) % 150000 for i in range(sys_len))

    def sys_tokens(self, sys_prompt: int, sys_len: int) -> list[int]:
        """Token ids of a shared system prompt (deterministic stand-in for the tokenizer's output)."""
        return list(self._sys_tokens(sys_prompt, sys_len))

    def keys(self, req) -> list[int]:
        mk = (req.sys_prompt, req.sys_len, tuple((im.hash, im.v_tokens) for im in req.images))
        hit = self.memo.get(mk)
        if hit is not None:
            self.memo.move_to_end(mk)
            return hit
        ks = self._fast_keys(req)
        self.memo[mk] = ks
        if len(self.memo) > self.memo_size:
            self.memo.popitem(last=False)
        return ks

    def explicit(self, req) -> tuple[list[int], list[tuple[int, int, int]]]:
        """The shareable prefix as explicit token ids and image spans (reference for the fast path)."""
        toks = self.sys_tokens(req.sys_prompt, req.sys_len)
        spans = []
        for im in req.images:
            spans.append((im.hash, len(toks), im.v_tokens))
            toks.extend([IMAGE_PLACEHOLDER] * im.v_tokens)
        return toks, spans

    def _fast_keys(self, req) -> list[int]:
        """Same keys as block_keys(*explicit(req)) without materialising the placeholder runs: a block that
        lies inside one image is the constant placeholder tuple plus its (image hash, offset) extra key.
        Equality with the reference is a unit test."""
        bs = self.block_size
        toks, spans = self.explicit(req) if not req.images else (None, None)
        if toks is not None:
            return block_keys(toks, spans, bs)
        sys_t = self._sys_tokens(req.sys_prompt, req.sys_len)
        total = len(sys_t) + sum(im.v_tokens for im in req.images)
        span_list = []
        pos = len(sys_t)
        for im in req.images:
            span_list.append((im.hash, pos, im.v_tokens))
            pos += im.v_tokens
        const = hash((IMAGE_PLACEHOLDER,) * bs)
        keys, parent = [], 0
        n_full = total // bs
        n_sys = len(sys_t)
        j = 0
        while j < n_full:
            lo, hi = j * bs, (j + 1) * bs
            inside = next((sp for sp in span_list if sp[1] <= lo and hi <= sp[1] + sp[2]), None)
            if inside is not None:  # a run of whole blocks inside one image
                h, s, ln = inside
                j_end = min(n_full, (s + ln) // bs)
                for jj in range(j, j_end):
                    parent = hash((parent, const, ((h, jj * bs - s),)))
                    keys.append(parent)
                j = j_end
                continue
            # boundary block (system prompt / image edges): build its tokens explicitly
            extra = tuple((h, max(lo, s) - s) for (h, s, ln) in span_list if s < hi and s + ln > lo)
            block = tuple(sys_t[t] if t < n_sys else IMAGE_PLACEHOLDER for t in range(lo, hi))
            parent = hash((parent, hash(block), extra))
            keys.append(parent)
            j += 1
        return keys
