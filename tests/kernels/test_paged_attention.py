"""`kernels.paged_attention` (the dispatcher) against a naive numpy reference on a head-wise paged cache.

Each (row, kv head) is a ragged sequence read through its own page table. The T new tokens of a row are stored
at the end of every head sequence of that row (as `paged_write_attend` does before attending), so every query
sees at least itself; context pairs have gappy, increasing positions (as after KVzip eviction). Unused pages and
table entries past a head's pages point at pages poisoned with NaN: they must not leak into the output.
Shapes stay legal for GPU/TPU kernels (page size 16, D in {64, 128}).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import paged_attention

PAGE = 16
P_MAX = 4  # table width: 64 slots per head sequence at most
HKV = 3
BATCH = 2


def _case(seed: int, g: int, d: int, t: int, dtype):
    """Build a random paged cache. Returns (inputs dict, per-(b, h) dense views for the numpy reference)."""
    rng = np.random.default_rng(seed)
    cap = P_MAX * PAGE
    # Ragged lengths: 0 (empty head), full (every table page), page boundaries and in-between.
    lengths = np.array([[0, PAGE, cap], [PAGE + 1, PAGE - 1, 2 * PAGE + 7]], np.int32)[:BATCH, :HKV]
    lengths = np.where((lengths > 0) & (lengths < t), t, lengths).astype(np.int32)
    num_pages = np.maximum(-(-lengths // PAGE), 1)
    # Pool: real pages first, then poison pages (NaN K/V, position 0 so a position mask alone would admit them).
    n_real = int(num_pages.sum())
    n_poison = 3
    n_total = n_real + n_poison
    k_pool = rng.standard_normal((n_total, PAGE, d)).astype(np.float32)
    v_pool = rng.standard_normal((n_total, PAGE, d)).astype(np.float32)
    pos_pool = np.zeros((n_total, PAGE), np.int32)
    k_pool[n_real:] = np.nan
    v_pool[n_real:] = np.nan
    # Pages are handed out in a shuffled order so that a head's pages are not contiguous in the pool.
    order = rng.permutation(n_real)
    table = np.empty((BATCH, HKV, P_MAX), np.int32)
    q_positions = np.zeros((BATCH, t), np.int32)
    dense = {}
    used = 0
    for b in range(BATCH):
        base = 200 + 10 * b  # new tokens' positions: after every stored context position
        q_positions[b] = base + np.arange(t)
        for h in range(HKV):
            n = int(lengths[b, h])
            pages = order[used : used + num_pages[b, h]]
            used += num_pages[b, h]
            # past num_pages: point at poison pages (the slots past `n` inside real pages are poisoned below)
            table[b, h] = np.concatenate([pages, n_real + rng.integers(0, n_poison, P_MAX - len(pages))])
            ctx = n - t if n else 0
            ctx_pos = np.sort(rng.choice(200, size=ctx, replace=False)).astype(np.int32)
            pos = np.concatenate([ctx_pos, q_positions[b]]) if n else np.zeros(0, np.int32)
            slots = [(pages[j // PAGE], j % PAGE) for j in range(num_pages[b, h] * PAGE)]
            for j, (pg, off) in enumerate(slots):
                if j < n:
                    pos_pool[pg, off] = pos[j]
                else:  # the unused tail of a real page: NaN, position 0
                    k_pool[pg, off] = np.nan
                    v_pool[pg, off] = np.nan
                    pos_pool[pg, off] = 0
            idx = [pg * PAGE + off for pg, off in slots[:n]]
            dense[b, h] = (idx, pos)
    q = rng.standard_normal((BATCH, t, HKV, g, d)).astype(np.float32)
    inputs = dict(
        q=jnp.asarray(q, dtype), k_pages=jnp.asarray(k_pool, dtype), v_pages=jnp.asarray(v_pool, dtype),
        pos_pages=jnp.asarray(pos_pool), page_table=jnp.asarray(table), lengths=jnp.asarray(lengths),
        q_positions=jnp.asarray(q_positions),
    )
    return inputs, dense


def _reference(inputs, dense, *, scale, softcap=None, window=None):
    """Naive numpy (float64) attention per (row, kv head, group head, query) over the head's stored pairs."""
    q = np.asarray(inputs["q"].astype(jnp.float32), np.float64)
    kf = np.asarray(inputs["k_pages"].astype(jnp.float32), np.float64).reshape(-1, q.shape[-1])
    vf = np.asarray(inputs["v_pages"].astype(jnp.float32), np.float64).reshape(-1, q.shape[-1])
    qpos = np.asarray(inputs["q_positions"])
    b_, t_, hkv, g_, d = q.shape
    out = np.zeros_like(q)
    for b in range(b_):
        for h in range(hkv):
            idx, pos = dense[b, h]
            if not idx:
                continue  # an empty head sequence attends to nothing: output 0
            k, v = kf[idx], vf[idx]
            for t in range(t_):
                ok = pos <= qpos[b, t]
                if window is not None:
                    ok &= qpos[b, t] - pos < window
                for g in range(g_):
                    z = k @ q[b, t, h, g] * scale
                    if softcap is not None:
                        z = np.tanh(z / softcap) * softcap
                    z = np.where(ok, z, -np.inf)
                    p = np.exp(z - z.max())
                    out[b, t, h, g] = (p / p.sum()) @ v
    return out


_jitted = jax.jit(paged_attention, static_argnames=("scale", "softcap", "window", "backend"))


def _call(inputs, **kw):
    """Jitted (one compile per shape, as in the decoder); the input checks run at trace time."""
    return _jitted(**inputs, **kw)


# Every G in {1, 4, 7} with both D in {64, 128}; f32 and bf16 and T in {1, 3} each appear with every G.
GRID = [
    (1, 64, 1, jnp.float32), (1, 128, 3, jnp.bfloat16), (4, 128, 3, jnp.float32), (4, 64, 1, jnp.bfloat16),
    (7, 64, 3, jnp.float32), (7, 128, 1, jnp.bfloat16),
]


@pytest.mark.parametrize("g,d,t,dtype", GRID, ids=[f"G{g}-D{d}-T{t}-{jnp.dtype(x).name}" for g, d, t, x in GRID])
def test_matches_numpy_reference(g, d, t, dtype):
    inputs, dense = _case(seed=g * 100 + d + t, g=g, d=d, t=t, dtype=dtype)
    scale = d**-0.5
    out = _call(inputs, scale=scale)
    assert out.shape == inputs["q"].shape and out.dtype == inputs["q"].dtype
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all(), "poisoned (NaN) pages leaked into the output"
    ref = _reference(inputs, dense, scale=scale)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    # The empty head sequence (row 0, head 0) yields exactly zero, not NaN or a mean of garbage.
    assert np.all(out[0, :, 0] == 0)


def test_sliding_window_and_softcap():
    t = 3
    inputs, dense = _case(seed=7, g=4, d=64, t=t, dtype=jnp.float32)
    scale = 0.3  # large logits so the soft cap bites
    for window, softcap in [(5, None), (None, 2.0), (24, 1.5), (1, None)]:
        out = np.asarray(paged_attention(**inputs, scale=scale, window=window, softcap=softcap))
        ref = _reference(inputs, dense, scale=scale, window=window, softcap=softcap)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5, err_msg=f"window={window} softcap={softcap}")
    plain = np.asarray(paged_attention(**inputs, scale=scale))
    capped = np.asarray(paged_attention(**inputs, scale=scale, softcap=2.0))
    windowed = np.asarray(paged_attention(**inputs, scale=scale, window=5))
    assert np.abs(plain - capped).max() > 1e-3, "softcap had no effect"
    assert np.abs(plain - windowed).max() > 1e-3, "window had no effect"
    # window=1: each new query sees only itself, so its output is its own value row.
    only_self = np.asarray(paged_attention(**inputs, scale=scale, window=1))
    vf = np.asarray(inputs["v_pages"]).reshape(-1, 64)
    for (b, h), (idx, _pos) in dense.items():
        if idx:
            np.testing.assert_allclose(only_self[b, :, h, 0], vf[idx[-t:]], atol=1e-6)


def test_causal_among_new_tokens():
    """With T=3 the first new token must not see the two after it (they are stored, with later positions)."""
    inputs, dense = _case(seed=11, g=4, d=64, t=3, dtype=jnp.float32)
    out = np.asarray(_call(inputs, scale=0.125))
    # Changing the V of the last new token (the last stored pair of every head) only changes query t=2.
    v = np.asarray(inputs["v_pages"]).copy()
    for (b, h), (idx, _pos) in dense.items():
        if idx:
            v.reshape(-1, 64)[idx[-1]] += 10.0
    out2 = np.asarray(_call({**inputs, "v_pages": jnp.asarray(v)}, scale=0.125))
    np.testing.assert_array_equal(out[:, :2], out2[:, :2])
    assert np.abs(out[:, 2] - out2[:, 2])[[0, 1], :, :].max() > 1e-3


def test_unused_pages_do_not_matter():
    """Rewriting every slot no head owns (other finite garbage, any position) leaves the output bit-identical."""
    inputs, dense = _case(seed=3, g=4, d=64, t=1, dtype=jnp.float32)
    out = np.asarray(_call(inputs, scale=0.125))
    owned = np.zeros(inputs["k_pages"].shape[0] * PAGE, bool)
    for idx, _ in dense.values():
        owned[idx] = True
    rng = np.random.default_rng(0)
    k = np.asarray(inputs["k_pages"]).reshape(-1, 64).copy()
    v = np.asarray(inputs["v_pages"]).reshape(-1, 64).copy()
    pos = np.asarray(inputs["pos_pages"]).reshape(-1).copy()
    k[~owned] = 1e4 * rng.standard_normal((int((~owned).sum()), 64))
    v[~owned] = 1e4
    pos[~owned] = rng.integers(-5, 300, int((~owned).sum()))
    out2 = _call({**inputs, "k_pages": jnp.asarray(k.reshape(inputs["k_pages"].shape)),
                  "v_pages": jnp.asarray(v.reshape(inputs["v_pages"].shape)),
                  "pos_pages": jnp.asarray(pos.reshape(inputs["pos_pages"].shape))}, scale=0.125)
    np.testing.assert_array_equal(out, np.asarray(out2))


def test_package_exports_the_dispatcher():
    assert kernels.paged_attention is paged_attention


def _bad(inputs, **changes):
    return {**inputs, **changes}


@pytest.mark.parametrize(
    "change,pattern",
    [
        (lambda x: dict(q=x["q"][0]), r"q must be \[B, T, Hkv, G, D\].*\(1, 3, 4, 64\)"),
        (lambda x: dict(q=jnp.zeros((2, 1, 3, 4, 128), jnp.float32)), r"head_dim.*64.*128"),
        (lambda x: dict(v_pages=x["v_pages"][:, :8]), r"k_pages \(\d+, 16, 64\).*v_pages \(\d+, 8, 64\)"),
        (lambda x: dict(v_pages=x["v_pages"].astype(jnp.bfloat16)), r"float32.*bfloat16"),
        (lambda x: dict(pos_pages=x["pos_pages"][:, :8]), r"pos_pages must be \(\d+, 16\).*\(\d+, 8\)"),
        (lambda x: dict(page_table=x["page_table"][:1]), r"page_table must be \[B=2, Hkv=3, P\].*\(1, 3, 4\)"),
        (lambda x: dict(page_table=x["page_table"].astype(jnp.float32)), r"page_table.*integer.*float32"),
        (lambda x: dict(lengths=x["lengths"][:, :2]), r"lengths must be \[B=2, Hkv=3\].*\(2, 2\)"),
        (lambda x: dict(lengths=x["lengths"].astype(jnp.float32)), r"lengths.*integer.*float32"),
        (lambda x: dict(q_positions=x["q_positions"][:, None]), r"q_positions must be \[B=2, T=1\].*\(2, 1, 1\)"),
        (lambda x: dict(q_positions=x["q_positions"].astype(jnp.float32)), r"q_positions.*integer"),
        (lambda x: dict(pos_pages=x["pos_pages"].astype(jnp.float32)), r"pos_pages.*integer"),
    ],
    ids=["q-ndim", "head-dim", "kv-shape", "kv-dtype", "pos-shape", "table-shape", "table-float", "len-shape",
         "len-float", "qpos-shape", "qpos-float", "pos-float"],
)
def test_bad_inputs_raise_value_error(change, pattern):
    inputs, _ = _case(seed=0, g=4, d=64, t=1, dtype=jnp.float32)
    with pytest.raises(ValueError, match=pattern):
        paged_attention(**_bad(inputs, **change(inputs)), scale=0.125)


def test_unknown_backend():
    inputs, _ = _case(seed=0, g=4, d=64, t=1, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"unknown backend 'triton'.*reference"):
        paged_attention(**inputs, scale=0.125, backend="triton")
    out = _call(inputs, scale=0.125, backend="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_call(inputs, scale=0.125)))
