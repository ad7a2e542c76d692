"""`kvzip_kernels.paged_attention` (the dispatcher) against a naive numpy reference on a head-wise paged cache.

Each (row, kv head) is a ragged sequence read through its own page table. The T new tokens of a row are stored
at the end of every head sequence of that row (as `paged_write_attend` does before attending), so every query
sees at least itself; context pairs have gappy, increasing positions (as after KVzip eviction). Unused pages and
table entries past a head's pages point at pages poisoned with NaN: they must not leak into the output.
Shapes stay legal for GPU/TPU kernels (page size 16, D in {64, 128}).

The Pallas kernels (Triton and Mosaic TPU) run here in CPU interpret mode on tiny shapes, are lowered for their
real platform without a device (the lowering enforces the block-shape rules that interpret mode does not), and
drive the decoder end to end; `gpu` / `tpu` marked tests run them compiled where such a device is present.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvzip_kernels
from kvzip_kernels import paged_attention, use_backend
from kvzip_kernels.dispatch import NO_WINDOW
from kvzip_kernels.paged_attention_gpu import H100_SMS, WAVES, paged_attention_gpu
from kvzip_kernels.paged_attention_tpu import paged_attention_tpu
from tests.kvzip_kernels.pallas_inspect import lowered_text, pallas_calls

PAGE = 16
P_MAX = 4  # table width: 64 slots per head sequence at most


def _case(seed: int, g: int, d: int, t: int, dtype, lengths=None):
    """Build a random paged cache. Returns (inputs dict, per-(b, h) dense views for the numpy reference)."""
    rng = np.random.default_rng(seed)
    cap = P_MAX * PAGE
    # Ragged lengths: 0 (empty head), full (every table page), page boundaries and in-between.
    if lengths is None:
        lengths = [[0, PAGE, cap], [PAGE + 1, PAGE - 1, 2 * PAGE + 7]]
    lengths = np.array(lengths, np.int32)
    batch, hkv = lengths.shape
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
    table = np.empty((batch, hkv, P_MAX), np.int32)
    q_positions = np.zeros((batch, t), np.int32)
    dense = {}
    used = 0
    for b in range(batch):
        base = 200 + 10 * b  # new tokens' positions: after every stored context position
        q_positions[b] = base + np.arange(t)
        for h in range(hkv):
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
    q = rng.standard_normal((batch, t, hkv, g, d)).astype(np.float32)
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
    b_, t_, hkv, g_, _ = q.shape
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


def assert_matches_reference(out, inputs, dense, *, scale, softcap=None, window=None, leak="poisoned (NaN) pages"):
    """A kernel's output: q's shape and dtype, finite (nothing of `leak` got in), within the dtype's tolerance of
    the float64 reference. Returns it as float32 numpy."""
    assert out.shape == inputs["q"].shape and out.dtype == inputs["q"].dtype
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all(), f"{leak} leaked into the output"
    tol = 2e-5 if inputs["q"].dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(out, _reference(inputs, dense, scale=scale, softcap=softcap, window=window), atol=tol,
                               rtol=tol)
    return out


_jitted = jax.jit(paged_attention, static_argnames=("scale", "softcap", "window", "backend", "interpret"))


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
    for idx, _pos in dense.values():
        if idx:
            v.reshape(-1, 64)[idx[-1]] += 10.0
    out2 = np.asarray(_call({**inputs, "v_pages": jnp.asarray(v)}, scale=0.125))
    np.testing.assert_array_equal(out[:, :2], out2[:, :2])
    assert np.abs(out[:, 2] - out2[:, 2])[[0, 1], :, :].max() > 1e-3


def test_unused_pages_do_not_matter():
    """Rewriting every slot no head owns (other finite garbage, any position) leaves the output bit-identical."""
    inputs, dense = _case(seed=3, g=4, d=64, t=1, dtype=jnp.float32)
    out = np.asarray(_call(inputs, scale=0.125))
    out2 = _call({**inputs, **_garbage_in_unowned_slots(inputs, dense, seed=0)}, scale=0.125)
    np.testing.assert_array_equal(out, np.asarray(out2))


def _garbage_in_unowned_slots(inputs, dense, seed: int) -> dict:
    """k/v/pos pages with every slot no head owns rewritten: huge finite K/V, positions the masks would admit."""
    owned = np.zeros(inputs["k_pages"].shape[0] * PAGE, bool)
    for idx, _ in dense.values():
        owned[idx] = True
    rng = np.random.default_rng(seed)
    d = inputs["k_pages"].shape[-1]
    k = np.asarray(inputs["k_pages"]).reshape(-1, d).copy()
    v = np.asarray(inputs["v_pages"]).reshape(-1, d).copy()
    pos = np.asarray(inputs["pos_pages"]).reshape(-1).copy()
    k[~owned] = 1e4 * rng.standard_normal((int((~owned).sum()), d))
    v[~owned] = 1e4
    pos[~owned] = rng.integers(-5, 300, int((~owned).sum()))
    return {"k_pages": jnp.asarray(k.reshape(inputs["k_pages"].shape)),
            "v_pages": jnp.asarray(v.reshape(inputs["v_pages"].shape)),
            "pos_pages": jnp.asarray(pos.reshape(inputs["pos_pages"].shape))}


def test_package_exports_the_dispatcher():
    assert kvzip_kernels.paged_attention is paged_attention


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


# ------------------------------------------------------------------------------------------ Pallas kernels
# Interpret mode on CPU is slow (about 1-3 s per call here): two rows x two kv heads, a 4-page table, and a
# hand-picked set of cases instead of the cartesian product. Every case has an empty head, a full head
# (= P * page) and heads ending on / just past a page boundary.
PALLAS = ("pallas_gpu", "pallas_tpu")
KERNEL_LENGTHS = ([[0, P_MAX * PAGE], [PAGE + 1, 2 * PAGE]], [[PAGE - 1, 2 * PAGE + 7], [P_MAX * PAGE, 0]])
# (G, D, T, dtype, softcap, window): G in {1, 4, 7}, D in {64, 128}, T in {1, 3}, f32 and bf16, cap and window.
KERNEL_GRID = [
    (1, 64, 1, jnp.float32, None, None),
    (4, 128, 3, jnp.bfloat16, None, None),
    (7, 64, 3, jnp.float32, 1.5, 5),
    (7, 128, 1, jnp.bfloat16, None, 20),
]


def _wild_table(inputs):
    """Table entries past each head's used pages (all of an empty head's) -> indices outside the pool: they must
    be neither checked nor dereferenced."""
    table = np.asarray(inputs["page_table"]).copy()
    lens = np.asarray(inputs["lengths"])
    unused = np.arange(P_MAX)[None, None, :] >= -(-lens // PAGE)[:, :, None]
    n_pool = inputs["k_pages"].shape[0]
    table[unused] = np.where(np.arange(int(unused.sum())) % 2, -7, n_pool + 100)
    return {**inputs, "page_table": jnp.asarray(table)}


@pytest.mark.parametrize("backend", PALLAS)
@pytest.mark.parametrize(
    "case", range(len(KERNEL_GRID)),
    ids=[f"G{g}-D{d}-T{t}-{jnp.dtype(x).name}-cap{c}-win{w}" for g, d, t, x, c, w in KERNEL_GRID],
)
def test_pallas_interpret_matches_reference(backend, case):
    g, d, t, dtype, softcap, window = KERNEL_GRID[case]
    lengths = KERNEL_LENGTHS[case % 2]
    inputs, dense = _case(seed=500 + case, g=g, d=d, t=t, dtype=dtype, lengths=lengths)
    inputs = _wild_table(inputs)
    scale = 0.3 if softcap else d**-0.5  # large logits when the soft cap should bite
    # The decoder passes the window as a traced int32 (one per layer kind): so does one case here.
    win = jnp.int32(window) if window == 20 else window
    out = paged_attention(**inputs, scale=scale, softcap=softcap, window=win, backend=backend, interpret=True)
    out = assert_matches_reference(out, inputs, dense, scale=scale, softcap=softcap, window=window,
                                   leak="poisoned (NaN) pages or slots")
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    jnp_ref = paged_attention(**inputs, scale=scale, softcap=softcap, window=window, backend="reference")
    np.testing.assert_allclose(out, np.asarray(jnp_ref.astype(jnp.float32)), atol=tol, rtol=tol)
    for b, h in zip(*np.nonzero(np.asarray(inputs["lengths"]) == 0), strict=True):
        assert np.all(out[b, :, h] == 0), "an empty head sequence must give exactly 0"


@pytest.mark.parametrize("kernel,max_rows", [(paged_attention_gpu, 16), (paged_attention_tpu, 8)], ids=PALLAS)
def test_long_steps_split_the_query_rows(kernel, max_rows):
    """T*G = 21 query rows in tiles of max_rows (2 tiles for Triton, 3 blocks for TPU); each tile of a head runs
    its own online softmax over the same pages."""
    inputs, dense = _case(seed=21, g=7, d=64, t=3, dtype=jnp.float32, lengths=KERNEL_LENGTHS[0])
    out = kernel(**inputs, window=jnp.int32(NO_WINDOW), scale=0.125, interpret=True, max_rows=max_rows)
    np.testing.assert_allclose(np.asarray(out), _reference(inputs, dense, scale=0.125), atol=2e-5, rtol=2e-5)


# (num_splits, block_keys): one page per step split in two; two-page steps with a partial last step (a 3-page
# head); more splits than a head has pages (empty splits); four-page steps of the default width in 3 splits.
SPLITS = [(2, 16), (1, 32), (7, 16), (3, 64)]


@pytest.mark.parametrize("num_splits,block_keys", SPLITS, ids=[f"S{s}-K{k}" for s, k in SPLITS])
def test_gpu_split_k_matches_reference(num_splits, block_keys):
    """Each head's pages split across programs (ragged heads, an empty head, splits with no page) and merged:
    equal to the float64 reference, and 0 for the empty head."""
    for case, lengths in enumerate(KERNEL_LENGTHS):
        inputs, dense = _case(seed=40 + case, g=4, d=64, t=3, dtype=jnp.float32, lengths=lengths)
        inputs = _wild_table(inputs)
        out = paged_attention_gpu(**inputs, window=jnp.int32(NO_WINDOW), scale=0.125, interpret=True,
                                  num_splits=num_splits, block_keys=block_keys)
        out = np.asarray(out)
        np.testing.assert_allclose(out, _reference(inputs, dense, scale=0.125), atol=2e-5, rtol=2e-5)
        for b, h in zip(*np.nonzero(np.asarray(inputs["lengths"]) == 0), strict=True):
            assert np.all(out[b, :, h] == 0), "an empty head sequence must give exactly 0"


def _llama8b_decode_structs(batch: int, context: int, dtype=jnp.bfloat16):
    """The Llama-3.1-8B layer's paged decode inputs (Hkv 8, G 4, D 128, page 16, T 1) as shapes only: a table of
    context / 16 pages per head and a pool holding every head's pages (17 GB of K at batch 64 x 128K)."""
    hkv, g, d, width = 8, 4, 128, context // PAGE
    n_pool = batch * hkv * width
    s = jax.ShapeDtypeStruct
    return (s((batch, 1, hkv, g, d), dtype), s((n_pool, PAGE, d), dtype), s((n_pool, PAGE, d), dtype),
            s((n_pool, PAGE), jnp.int32), s((batch, hkv, width), jnp.int32), s((batch, hkv), jnp.int32),
            s((batch, 1), jnp.int32), s((), jnp.int32))


LLAMA8B = [(1, 8192), (1, 131072), (64, 8192), (64, 131072)]


@pytest.mark.parametrize("batch,context", LLAMA8B, ids=[f"B{b}-{c // 1024}K" for b, c in LLAMA8B])
def test_gpu_kernel_fills_an_h100_at_the_8b_shapes(batch, context):
    """The Triton lowering at the real shapes, and the schedule it gets: at batch 1 at least 4 programs per SM of
    an H100 (flash-decoding splits), matmul tiles of >= 16 query rows by >= 64 keys. Lowering is not compiling:
    Triton's own compiler and the device are not exercised here (the gpu-marked tests and
    `scripts/gpu_checks.sh` do that)."""
    structs = _llama8b_decode_structs(batch, context)
    fn = functools.partial(paged_attention_gpu, scale=0.088, softcap=None, sm_count=H100_SMS)
    assert "triton" in lowered_text(fn, *structs, platform="cuda")
    [call] = pallas_calls(fn, *structs)
    assert call.grid_steps >= WAVES * H100_SMS, call.grid
    if batch == 1:
        assert call.grid[2] > 1, "batch 1 must split each head's pages"
    for lhs, rhs in call.dot_operands:
        assert lhs.shape[0] >= 16 and min(rhs.shape) >= 16, (lhs.shape, rhs.shape)
    logits_keys = call.dot_operands[0][1].shape[0]
    assert logits_keys >= 64, f"{logits_keys} keys per step"


def test_gpu_precision_reaches_the_dots():
    """The dispatcher's precision reaches both matmuls of the kernel: "highest" keeps float32 products IEEE on GPU,
    "default" lets Triton use TF32; None takes jax's `default_matmul_precision` (the tests set "highest")."""
    structs = _llama8b_decode_structs(1, 8192, jnp.float32)
    highest, default = jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT
    for precision, expected in (("highest", highest), ("default", default), (None, highest)):
        def run(*args, precision=precision):
            return paged_attention(*args[:7], window=args[7], scale=0.088, backend="pallas_gpu", precision=precision)

        [call] = pallas_calls(run, *structs)
        assert len(call.dot_precisions) == 2
        assert all(p in (expected, (expected, expected)) for p in call.dot_precisions), call.dot_precisions


@pytest.mark.parametrize("backend", ["reference", "pallas_tpu"])
def test_slots_no_head_owns_are_never_read(backend):
    """Rewriting every slot no head owns (finite garbage, positions that the masks would admit) leaves the output
    bit-identical. (The Triton kernel reads no block past a head's length at all: its loop stops there.)"""
    inputs, dense = _case(seed=3, g=4, d=64, t=1, dtype=jnp.float32, lengths=KERNEL_LENGTHS[1])
    out = np.asarray(paged_attention(**inputs, scale=0.125, backend=backend, interpret=True))
    garbage = _garbage_in_unowned_slots(inputs, dense, seed=1)
    out2 = paged_attention(**{**inputs, **garbage}, scale=0.125, backend=backend, interpret=True)
    np.testing.assert_array_equal(out, np.asarray(out2))


@pytest.mark.parametrize(
    "kernel,platform,needle,small_tile",
    [(paged_attention_gpu, "cuda", "triton", 16), (paged_attention_tpu, "tpu", "tpu_custom_call", 8)],
    ids=["triton", "mosaic_tpu"],
)
def test_kernels_lower_for_the_real_backend(kernel, platform, needle, small_tile):
    """Cross-platform lowering on CPU runs the real Triton / Mosaic lowering (block-shape and power-of-2 rules,
    supported ops) without a device: G=7 and T=3 (padded rows, one tile or several), bf16 and f32, soft cap and a
    traced window. (It stops before Triton's / Mosaic's own compiler: see the gpu / tpu marked tests.)"""
    for max_rows in (None, small_tile):
        for dtype in (jnp.bfloat16, jnp.float32):
            inputs, _ = _case(seed=1, g=7, d=128, t=3, dtype=dtype, lengths=KERNEL_LENGTHS[0])
            tiling = {} if max_rows is None else {"max_rows": max_rows}

            def run(inputs, window, tiling=tiling):
                return kernel(**inputs, window=window, scale=0.1, softcap=2.0, **tiling)

            assert needle in lowered_text(run, inputs, jnp.int32(8), platform=platform)


def test_gpu_kernel_refuses_untileable_shapes(monkeypatch):
    inputs, _ = _case(seed=0, g=4, d=64, t=1, dtype=jnp.float32, lengths=KERNEL_LENGTHS[0])
    small = {**inputs, "k_pages": inputs["k_pages"][:, :8], "v_pages": inputs["v_pages"][:, :8],
             "pos_pages": inputs["pos_pages"][:, :8], "lengths": jnp.minimum(inputs["lengths"], 8)}
    with pytest.raises(ValueError, match=r"pallas_gpu.*page size.*power of two >= 16, got 8"):
        paged_attention(**small, scale=0.125, backend="pallas_gpu", interpret=True)
    # "auto" on a GPU falls back to the reference instead of failing on such a cache, and says so once.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kvzip_kernels.dispatch, "_warned_fallbacks", set())
    with pytest.warns(UserWarning, match=r"cannot tile page size 8 / head_dim 64.*using the jnp reference"):
        out = paged_attention(**small, scale=0.125, interpret=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paged_attention(**small, scale=0.125, interpret=True)
    ref = paged_attention(**small, scale=0.125, backend="reference")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_query_and_cache_dtypes():
    """A bf16 cache under float32 queries is fine (keys widen exactly); a cache that does not convert exactly to
    the queries' dtype (wider, or float16 under bf16), or is not floating point, is refused by name."""
    inputs, _ = _case(seed=0, g=4, d=64, t=1, dtype=jnp.float32, lengths=KERNEL_LENGTHS[0])
    narrow = {**inputs, "k_pages": inputs["k_pages"].astype(jnp.bfloat16),
              "v_pages": inputs["v_pages"].astype(jnp.bfloat16)}
    out = paged_attention(**narrow, scale=0.125)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match=r"cache dtype float32 does not convert exactly to the queries' bfloat16"):
        paged_attention(**{**inputs, "q": inputs["q"].astype(jnp.bfloat16)}, scale=0.125)
    half = {**inputs, "q": inputs["q"].astype(jnp.bfloat16), "k_pages": inputs["k_pages"].astype(jnp.float16),
            "v_pages": inputs["v_pages"].astype(jnp.float16)}
    with pytest.raises(ValueError, match=r"cache dtype float16 does not convert exactly to the queries' bfloat16"):
        paged_attention(**half, scale=0.125)
    ints = {**inputs, "k_pages": inputs["k_pages"].astype(jnp.int8), "v_pages": inputs["v_pages"].astype(jnp.int8)}
    with pytest.raises(ValueError, match=r"q \(float32\) and the cache \(int8\) must be floating point"):
        paged_attention(**ints, scale=0.125)


@pytest.mark.parametrize("backend", PALLAS)
def test_kernels_clamp_traced_lengths(backend):
    """Under jit (no value check) a length past the table is clamped to it: the kernels read the head's own
    table row only (never the next head's or past the end), and the output stays finite."""
    inputs, _ = _case(seed=0, g=4, d=64, t=1, dtype=jnp.float32, lengths=KERNEL_LENGTHS[0])
    long = inputs["lengths"].at[1, 1].set(10 * P_MAX * PAGE)
    run = jax.jit(lambda x: paged_attention(**x, scale=0.125, backend=backend, interpret=True))
    out = np.asarray(run({**inputs, "lengths": long}))
    at_table = np.asarray(run({**inputs, "lengths": inputs["lengths"].at[1, 1].set(P_MAX * PAGE)}))
    np.testing.assert_array_equal(out, at_table)


def test_precision_settings_jax_accepts():
    """An algorithm name jax accepts as its default matmul precision is left to the dots (None), not an error;
    an unknown explicit precision is one."""
    from kvzip_kernels.backend import resolve_precision

    with jax.default_matmul_precision("BF16_BF16_F32"):
        assert resolve_precision(None) is None
    with jax.default_matmul_precision("tensorfloat32"):
        assert resolve_precision(None) == jax.lax.Precision.HIGH
    with pytest.raises(ValueError, match=r"unknown matmul precision 'fp8'"):
        resolve_precision("fp8")


def test_debug_mode_checks_traced_tables(monkeypatch):
    """Under jit the table is a tracer and only the kernels' clamping protects the pool; debug mode (the argument
    or KVZIP_KERNELS_DEBUG=1) checks the values when they arrive and fails the call, naming the entry."""
    inputs, _ = _case(seed=0, g=4, d=64, t=1, dtype=jnp.float32, lengths=KERNEL_LENGTHS[0])
    bad = {**inputs, "page_table": inputs["page_table"].at[1, 1, 0].set(10_000)}
    jax.block_until_ready(_call(bad, scale=0.125))  # no debug: clamped, no error
    monkeypatch.setenv("KVZIP_KERNELS_DEBUG", "1")
    run = jax.jit(lambda x: paged_attention(**x, scale=0.125))
    with pytest.raises(Exception, match=r"page_table\[1, 1, 0\] = 10000 is outside the pool"):
        jax.block_until_ready(run(bad))
    jax.block_until_ready(run(inputs))  # good values pass


@pytest.mark.parametrize(
    "change,pattern",
    [
        (lambda x: dict(lengths=x["lengths"].at[1, 0].set(-1)), r"lengths\[1, 0\] = -1 is outside \[0, P\*page"),
        (lambda x: dict(lengths=x["lengths"].at[0, 1].set(P_MAX * PAGE + 1)), r"lengths\[0, 1\] = 65.*4\*16 = 64"),
        (lambda x: dict(page_table=x["page_table"].at[1, 1, 1].set(-1)), r"page_table\[1, 1, 1\] = -1.*\[0, N="),
        (lambda x: dict(page_table=x["page_table"].at[0, 1, 3].set(10_000)), r"page_table\[0, 1, 3\] = 10000"),
    ],
    ids=["len-negative", "len-past-table", "page-negative", "page-past-pool"],
)
@pytest.mark.parametrize("backend", ["reference", *PALLAS])
def test_bad_values_raise_before_any_kernel(change, pattern, backend):
    inputs, _ = _case(seed=0, g=4, d=64, t=1, dtype=jnp.float32, lengths=KERNEL_LENGTHS[0])
    with pytest.raises(ValueError, match=pattern):
        paged_attention(**{**inputs, **change(inputs)}, scale=0.125, backend=backend, interpret=True)


def test_bad_window_and_context_backend():
    inputs, _ = _case(seed=0, g=4, d=64, t=1, dtype=jnp.float32, lengths=KERNEL_LENGTHS[0])
    with pytest.raises(ValueError, match=r"window must be >= 1.*got 0"):
        paged_attention(**inputs, scale=0.125, window=0)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
        with use_backend("cuda"):
            pass


# The end-to-end check: the decoder (which passes no backend) switched to each kernel by the context.
def _tiny_decoder():
    from kvzip_jax.config import FULL, SLIDING, ModelConfig, RopeConfig
    from kvzip_jax.models import abstract_params

    # Gemma3-like: a sliding layer (traced window) and a full one, soft-capped logits; G = 2, head_dim 16.
    config = ModelConfig(
        family="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=256,
        rope=((FULL, RopeConfig(theta=1_000_000.0)), (SLIDING, RopeConfig(theta=10_000.0))),
        layer_types=(SLIDING, FULL), sliding_window=8, query_pre_attn_scalar=24, qk_norm=True,
        hidden_act="gelu_pytorch_tanh", tie_word_embeddings=False, attn_logit_softcap=3.0,
    )
    rng = np.random.default_rng(0)
    paths, tree = jax.tree_util.tree_flatten_with_path(abstract_params(config))
    leaves = [jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype) for _, leaf in paths]
    return config, jax.tree_util.tree_unflatten(tree, leaves)


def test_decoder_on_paged_cache_matches_reference_with_pallas_backends():
    from kvzip_jax.cache import DenseKVCache
    from kvzip_jax.kvzip.compact import compact
    from kvzip_jax.models import forward

    config, params = _tiny_decoder()
    b, n_ctx, t = 2, 40, 3
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (b, n_ctx)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(n_ctx, dtype=jnp.int32), (b, n_ctx))
    _, dense = jax.jit(forward, static_argnames="config")(
        params, tokens, positions, DenseKVCache.zeros(config, b, n_ctx), config=config
    )
    # Ragged per-head keep masks (one head keeps nothing of row 1's context), then a T=3 step on the paged cache.
    keep = rng.random((config.num_layers, b, config.num_kv_heads, n_ctx)) < rng.uniform(0.2, 0.9, (2, b, 2, 1))
    keep[:, 1, 0] = False
    paged = compact(dense, keep, headroom=t, page_size=PAGE)
    new = jnp.asarray(rng.integers(0, config.vocab_size, (b, t)), jnp.int32)
    new_pos = paged.next_position[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

    traces = []

    @jax.jit
    def run(params, tokens, positions, cache):
        traces.append(1)
        return forward(params, tokens, positions, cache, config=config)

    def step(backend):
        with use_backend(backend, interpret=True):
            logits, cache = run(params, new, new_pos, paged)
        return np.asarray(logits), cache

    ref_logits, ref_cache = step("reference")
    step("reference")
    assert len(traces) == 1
    assert np.isfinite(ref_logits).all()
    for backend in PALLAS:
        logits, cache = step(backend)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4, err_msg=backend)
        np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(ref_cache.lengths))
    # The context is part of jit's cache key: one trace per backend, none reused across backends.
    assert len(traces) == 1 + len(PALLAS)


# ------------------------------------------------------------------------------------------ real devices
def _on_device(backend):
    """The compiled kernel (explicitly, and as "auto" picks it on its platform) against the numpy reference."""
    for dtype, tol in ((jnp.bfloat16, 3e-2), (jnp.float32, 1e-4)):
        inputs, dense = _case(seed=9, g=8, d=128, t=3, dtype=dtype, lengths=KERNEL_LENGTHS[0])
        inputs = _wild_table(inputs)
        ref = _reference(inputs, dense, scale=0.088, softcap=2.0, window=24)
        for chosen in (backend, "auto"):
            out = _jitted(**inputs, scale=0.088, softcap=2.0, window=24, backend=chosen)
            np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, atol=tol, rtol=tol,
                                       err_msg=f"{chosen} {jnp.dtype(dtype).name}")


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_pallas_gpu_on_device_matches_reference():
    _on_device("pallas_gpu")


@pytest.mark.tpu
def test_pallas_tpu_on_device_matches_reference():
    _on_device("pallas_tpu")
