import numpy as np
import pytest
from serving_testutil import COST

from serving.prefix_cache import IMAGE_PLACEHOLDER, EmbeddingCache, PrefixKVCache, PromptKeyer, block_keys
from serving.workloads import WorkloadSpec, generate

BS = 16


def seq(sys_len, imgs, text):
    toks = list(range(1000, 1000 + sys_len))
    spans = []
    for h, v in imgs:
        spans.append((h, len(toks), v))
        toks += [IMAGE_PLACEHOLDER] * v
    return toks + list(text), spans


def test_different_images_never_share_blocks():
    a = block_keys(*seq(20, [(111, 64)], []), BS)
    b = block_keys(*seq(20, [(222, 64)], []), BS)
    assert a[0] == b[0]  # the first block holds system-prompt tokens only
    assert not set(a[1:]) & set(b[1:])  # identical placeholder ids, different image hash -> different keys
    assert block_keys(*seq(20, [(111, 64)], []), BS) == a


def test_hash_chain_is_prefix_closed_and_position_dependent():
    full = block_keys(*seq(20, [(7, 100)], range(50)), BS)
    part = block_keys(*seq(20, [(7, 100)], range(10)), BS)
    assert full[:len(part)] == part
    # same image at a different position (longer system prompt): the common first block is shared,
    # everything from the divergence on differs
    other = block_keys(*seq(36, [(7, 100)], []), BS)
    assert other[0] == full[0]
    assert not set(other[1:]) & set(full[1:])


def test_fast_keys_equal_reference_keys():
    keyer = PromptKeyer(BS)
    reqs = generate(WorkloadSpec(rate=20, duration=30, seed=11, dup_rate=0.2), COST)
    for r in reqs:
        toks, spans = keyer.explicit(r)
        assert keyer.keys(r) == block_keys(toks, spans, BS)


def test_refcounts_block_eviction_and_lru_order():
    c = PrefixKVCache(capacity_blocks=3, block_size=BS)
    held = c.insert_acquired([1, 2, 3])
    assert held == [1, 2, 3]
    assert c.insert_acquired([4]) == []  # everything referenced: nothing evictable, nothing inserted
    c.release([1, 2, 3])
    c.pool.touch(1)  # 1 becomes most recently used -> 2 is the LRU
    assert c.insert_acquired([4]) == [4]
    assert 2 not in c.pool and 1 in c.pool and 3 in c.pool
    got = c.match_acquire([1, 3], total_tokens=48)
    assert got == [1, 3]
    c.insert_unreferenced([5])  # 1, 3, 4 are referenced: 5 cannot fit
    assert 5 not in c.pool
    c.pool.check()
    c.release([1])
    with pytest.raises(RuntimeError, match=r"prefix KV cache: double release of entry 1: its refcount is already 0"):
        c.release([1])
    with pytest.raises(RuntimeError, match=r"prefix KV cache: release of entry 99, which is not in the cache"):
        c.release([99])
    c.pool.check()  # the failed releases changed nothing


def test_match_stops_at_first_missing_block():
    c = PrefixKVCache(10, BS)
    c.insert_unreferenced([1, 2, 3])
    c.pool.lru.pop(2); c.pool.size.pop(2); c.pool.ref.pop(2); c.pool.used -= 1  # noqa: E702  (evict the middle)
    assert c.match_acquire([1, 2, 3], 48) == [1]


def test_embedding_hit_rate_equals_duplicate_fraction_on_replay():
    reqs = generate(WorkloadSpec(rate=30, duration=120, dup_rate=0.3, seed=4), COST)
    ec = EmbeddingCache(capacity_tokens=10**9)
    total = dups = 0
    seen = set()
    for r in reqs:
        for im in r.images:
            total += 1
            dups += im.hash in seen
            seen.add(im.hash)
            if not ec.lookup_acquire(im.hash):
                assert ec.insert_acquired(im.hash, im.v_tokens)
            ec.release(im.hash)
    assert ec.hits / total == pytest.approx(dups / total)
    assert ec.hits / total == pytest.approx(0.3, abs=0.04)


def test_capacity_is_validated():
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCache(-1)
    rng = np.random.default_rng(0)
    ec = EmbeddingCache(1000)
    for h in rng.integers(0, 50, 500):
        if not ec.lookup_acquire(int(h)):
            ec.insert_acquired(int(h), 100)
        ec.release(int(h))
        ec.pool.check()
        assert ec.pool.used <= 1000
