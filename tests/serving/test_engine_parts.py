"""Unit tests of the serving engine's host-side parts (no model): page pool, head-wise sequence pages,
incremental detokenization with stop strings, sampling parameters and the batched row sampler."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from serving.engine.detokenize import Detokenizer
from serving.engine.pages import OutOfPages, PagePool, SequenceKV
from serving.engine.sampling import MAX_SEED, RowSampling, SamplingParams, sample_rows


# ---- PagePool ------------------------------------------------------------------------------------------------
def test_pool_never_hands_out_page_zero_and_counts_pages():
    pool = PagePool(10)
    assert (pool.free, pool.used) == (9, 0)
    a = pool.alloc(4)
    b = pool.alloc(5)
    got = np.concatenate([a, b])
    assert 0 not in got
    assert sorted(got.tolist()) == list(range(1, 10))
    assert (pool.free, pool.used) == (0, 9)
    with pytest.raises(OutOfPages):
        pool.alloc(1)
    pool.release(a)
    assert (pool.free, pool.used) == (4, 5)
    again = pool.alloc(4)
    assert sorted(again.tolist()) == sorted(a.tolist())
    pool.release(again)
    pool.release(b)
    assert (pool.free, pool.used) == (9, 0)
    assert pool.refs[0] == 1 and not pool.refs[1:].any()


def test_pool_out_of_pages_changes_nothing():
    pool = PagePool(5)
    pool.alloc(2)
    with pytest.raises(OutOfPages, match="3 pages asked, 2 free"):
        pool.alloc(3)
    assert (pool.free, pool.used) == (2, 2)
    assert len(pool.alloc(2)) == 2


def test_pool_share_and_release():
    pool = PagePool(6)
    ids = pool.alloc(3)
    pool.share(ids[:2])
    assert pool.refs[ids].tolist() == [2, 2, 1]
    pool.release(ids)  # the first owner goes: the shared pages stay in use
    assert pool.used == 2
    assert pool.refs[ids].tolist() == [1, 1, 0]
    pool.release(ids[:2])
    assert pool.used == 0
    with pytest.raises(ValueError, match="not in use"):
        pool.share(ids[:1])


def test_pool_double_free_and_page_zero_raise():
    pool = PagePool(4)
    ids = pool.alloc(2)
    pool.release(ids)
    with pytest.raises(ValueError, match="double free"):
        pool.release(ids)
    with pytest.raises(ValueError, match="double free"):
        pool.release(np.array([0]))
    pool.release(np.array([], np.int32))  # nothing to do
    assert pool.used == 0
    with pytest.raises(ValueError, match="got 1"):
        PagePool(1)


# ---- SequenceKV ----------------------------------------------------------------------------------------------
def _pages_by_loop(kv: SequenceKV) -> list[int]:
    out = []
    for layer in range(kv.table.shape[0]):
        for head in range(kv.table.shape[1]):
            out.extend(kv.table[layer, head, :kv.num_pages[layer, head]].tolist())
    return out


def test_grow_gives_every_head_exactly_the_pages_it_needs():
    pool = PagePool(100)
    kv = SequenceKV.empty(2, 3)
    assert kv.pages_to_hold(10, 4) == 2 * 3 * 3
    kv.grow(pool, 10, 4)
    assert (kv.num_pages == 3).all()  # ceil(10 / 4)
    assert pool.used == 18
    kv.advance(10, 4)
    assert (kv.lengths == 10).all() and kv.next_position == 10
    kv.grow(pool, 2, 4)  # 12 pairs still fit in 3 pages
    assert pool.used == 18 and (kv.num_pages == 3).all()
    kv.grow(pool, 3, 4)  # 13 pairs need a fourth page per head
    assert (kv.num_pages == 4).all() and pool.used == 24
    owned = kv.owned()
    assert len(set(owned.tolist())) == 24 and 0 not in owned
    # entries past a head's num_pages stay 0
    assert (kv.table[:, :, 4:] == 0).all()


def test_grow_with_ragged_heads():
    """A compressed context: heads of different lengths each get ceil((length + tokens) / page) pages."""
    pool = PagePool(100)
    kv = SequenceKV.empty(1, 3)
    kv.grow(pool, 8, 4)
    kv.lengths = np.array([[1, 4, 8]], np.int32)
    assert kv.pages_to_hold(5, 4) == 0 + 1 + 2  # ceil(6/4)=2, ceil(9/4)=3, ceil(13/4)=4 against 2 each
    kv.grow(pool, 5, 4)
    assert kv.num_pages.tolist() == [[2, 3, 4]]
    assert kv.owned().tolist() == _pages_by_loop(kv)
    assert pool.used == 9


def test_grow_is_all_or_nothing():
    pool = PagePool(12)  # 11 usable pages
    kv = SequenceKV.empty(2, 2)
    kv.grow(pool, 4, 4)  # 4 pages
    before = (kv.table.copy(), kv.num_pages.copy(), kv.lengths.copy(), pool.used)
    with pytest.raises(OutOfPages):
        kv.grow(pool, 12, 4)  # needs 3 more per head = 12 > 7 free
    assert np.array_equal(kv.table, before[0])
    assert np.array_equal(kv.num_pages, before[1])
    assert np.array_equal(kv.lengths, before[2])
    assert pool.used == before[3] == 4


def test_owned_order_and_relocated_round_trip():
    pool = PagePool(200)
    kv = SequenceKV.empty(2, 2)
    kv.grow(pool, 5, 4)
    kv.advance(5, 4)
    kv.lengths = kv.lengths + np.array([[0, 4], [8, 0]], np.int32)  # make the heads ragged
    kv.grow(pool, 3, 4)
    owned = kv.owned()
    assert owned.tolist() == _pages_by_loop(kv)
    new_ids = np.arange(100, 100 + len(owned), dtype=np.int32)
    moved = kv.relocated(new_ids)
    assert moved.owned().tolist() == new_ids.tolist()
    assert np.array_equal(moved.num_pages, kv.num_pages)
    assert np.array_equal(moved.lengths, kv.lengths)
    assert moved.next_position == kv.next_position
    assert moved.table.shape == kv.table.shape
    back = moved.relocated(owned)
    assert np.array_equal(back.table, kv.table)
    assert kv.owned().tolist() == owned.tolist()  # the original is untouched


def test_advance_clips_at_capacity():
    pool = PagePool(20)
    kv = SequenceKV.empty(1, 2)
    kv.grow(pool, 6, 4)  # 2 pages per head: capacity 8
    kv.advance(6, 4)
    kv.advance(4, 4)  # a decode dispatch past the end (its extra steps write nothing)
    assert (kv.lengths == 8).all()
    assert kv.next_position == 10


# ---- Detokenizer ---------------------------------------------------------------------------------------------
class FakeTokenizer:
    """Every id is a byte string; decode joins them and replaces an incomplete UTF-8 tail with U+FFFD."""

    eos_token_id = None

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        assert skip_special_tokens
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


PIECES = [b"he", b"llo", b" ", b"\xc3", b"\xa9", b"!", b"hel", b"lo", b" w", b"orld", b"abc", b"EN", b"x", b"D"]
TOK = FakeTokenizer(PIECES)


def _ids(*pieces: bytes) -> list[int]:
    return [PIECES.index(p) for p in pieces]


def test_detokenizer_releases_text_incrementally():
    assert TOK.decode(_ids(b"he", b"\xc3")).endswith("\ufffd")
    d = Detokenizer(TOK)
    released = [d.push([i]) for i in _ids(b"he", b"llo", b" ", b"\xc3", b"\xa9", b"!")]
    assert released == ["he", "llo", " ", "", "\u00e9", "!"]  # never half a character
    assert "".join(released) + d.finish() == "hello \u00e9!"
    assert not d.stopped


def test_detokenizer_stop_string_spanning_two_tokens():
    d = Detokenizer(TOK, stop=("lo w",))
    out = d.push(_ids(b"hel"))
    out += d.push(_ids(b"lo"))  # "hello": "lo" may start the stop string, it is held back
    assert out == "hel" and not d.stopped
    out += d.push(_ids(b" w"))
    assert d.stopped
    assert out == "hel"  # right before the stop string
    assert d.push(_ids(b"orld")) == "" and d.finish() == ""


def test_detokenizer_partial_stop_prefix_held_then_released():
    d = Detokenizer(TOK, stop=("END",))
    assert d.push(_ids(b"abc")) == "abc"
    assert d.push(_ids(b"EN")) == ""  # could still become "END"
    assert d.finish() == "EN"  # the request ended: the partial match is plain text
    assert not d.stopped

    d = Detokenizer(TOK, stop=("END",))
    assert d.push(_ids(b"abc", b"EN")) == "abc"
    assert d.push(_ids(b"x")) == "ENx"  # it stopped matching: released

    d = Detokenizer(TOK, stop=("END",))
    assert d.push(_ids(b"abc", b"EN")) == "abc"
    assert d.push(_ids(b"D")) == "" and d.stopped


# ---- SamplingParams ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(max_tokens=0), "max_tokens.*got 0"),
    (dict(max_tokens=2.5), "max_tokens.*2.5"),
    (dict(top_p=0.0), "top_p.*got 0"),
    (dict(top_p=1.5), "top_p.*1.5"),
    (dict(top_k=-1), "top_k.*got -1"),
    (dict(top_k=2**31), "top_k must be in \\[0, 2147483647\\].*got 2147483648"),
    (dict(temperature=-0.5), "temperature.*-0.5"),
    (dict(seed=-1), "seed.*got -1"),
    (dict(seed=MAX_SEED + 1), f"seed.*got {MAX_SEED + 1}"),
    (dict(stop=("ok", "")), "stop string must not be empty"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_are_valid():
    sp = SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9, top_k=5, seed=MAX_SEED, stop=("x",))
    assert sp.seed == MAX_SEED


# ---- sample_rows ---------------------------------------------------------------------------------------------
def _rows(n, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    return RowSampling(full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
                       full(seed, jnp.uint32))


def _logits(rows=6, vocab=40, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32))


def test_greedy_rows_take_the_argmax():
    logits = _logits()
    positions = jnp.arange(6, dtype=jnp.int32)
    out = sample_rows(logits, _rows(6), positions)
    assert np.array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))
    # top_k = 1 is greedy even at temperature 1
    out = sample_rows(logits, _rows(6, temperature=1.0, top_k=1, seed=3), positions)
    assert np.array_equal(np.asarray(out), np.argmax(np.asarray(logits), -1))


def test_mixed_rows_greedy_and_sampled():
    logits = _logits(rows=4)
    rows = RowSampling(jnp.array([0.0, 1.0, 0.0, 1.0], jnp.float32), jnp.array([0, 0, 0, 1], jnp.int32),
                       jnp.ones(4, jnp.float32), jnp.array([1, 2, 3, 4], jnp.uint32))
    out = np.asarray(sample_rows(logits, rows, jnp.zeros(4, jnp.int32)))
    arg = np.argmax(np.asarray(logits), -1)
    assert out[0] == arg[0] and out[2] == arg[2] and out[3] == arg[3]


def test_same_seed_and_position_same_draw_within_top_k():
    n, vocab = 64, 40
    one = _logits(rows=1, vocab=vocab, seed=5)
    logits = jnp.broadcast_to(one, (n, vocab))
    positions = jnp.arange(n, dtype=jnp.int32)
    rows = _rows(n, temperature=1.0, top_k=3, seed=11)
    a = np.asarray(sample_rows(logits, rows, positions))
    b = np.asarray(sample_rows(logits, rows, positions))
    assert np.array_equal(a, b)
    top3 = set(np.argsort(-np.asarray(one[0]))[:3].tolist())
    assert set(a.tolist()) <= top3
    assert len(set(a.tolist())) > 1  # it really samples (64 draws over 3 tokens)
    # a row's draw depends on its own seed and position only: reversed row order, same draws
    rev = np.asarray(sample_rows(logits, rows, positions[::-1]))
    assert np.array_equal(rev, a[::-1])
    # another seed gives other draws
    c = np.asarray(sample_rows(logits, _rows(n, temperature=1.0, top_k=3, seed=12), positions))
    assert not np.array_equal(a, c)


def test_top_p_keeps_the_nucleus():
    logits = jnp.broadcast_to(jnp.array([[5.0, 4.0, 0.0, -1.0, -2.0]], jnp.float32), (64, 5))
    out = np.asarray(sample_rows(logits, _rows(64, temperature=1.0, top_p=0.5, seed=7), jnp.arange(64)))
    assert set(out.tolist()) == {0}  # token 0 alone holds more than half the mass
