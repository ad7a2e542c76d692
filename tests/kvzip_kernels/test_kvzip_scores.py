"""`kvzip_kernels.kvzip_scores`: the jnp reference against a naive full-matrix softmax written here, and the Pallas GPU
(Triton) and TPU (Mosaic) kernels in CPU interpret mode against the reference.

Kernel cases use block sizes that are legal on the real backends (powers of two >= 16 for Triton, multiples of 8
for Mosaic; D in {64, 128}) and small enough that every pass has several row, key and chunk-column blocks, with
dead blocks to skip; one case per backend runs the default (hardware-sized) tiles. Interpret mode is slow: each
case compiles once (jit) and runs two sets of chunk_len / n_valid values through the same executable.

The real-size checks run no kernel: at the Llama-3.1-8B scoring shape they read what each pallas_call asks of the
hardware from its jaxpr (`pallas_inspect`) and lower it for "cuda" and "tpu" on this CPU. Lowering is not
compiling: Triton's and Mosaic's own compilers (register and VMEM allocation) run only on a device.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

import kvzip_kernels.kvzip_scores_gpu as scores_gpu
from kvzip_kernels.backend import resolve_precision
from kvzip_kernels.kvzip_scores import kvzip_scores, kvzip_scores_reference
from tests.kvzip_kernels.pallas_inspect import lowered_text, pallas_calls

B, HKV, T, M = 2, 2, 20, 24


def _oracle(q, keys, n_sys, chunk_len, n_valid, scale, softcap):
    """KVzip §1.5 verbatim in float64: the whole [T, n_sys + chunk_len + n_valid] softmax, then the max."""
    q, keys = np.asarray(q, np.float64), np.asarray(keys, np.float64)
    b_, t, h_, _g, _d = q.shape
    m = keys.shape[2] - n_sys - t
    out = np.zeros((b_, h_, m))
    for b in range(b_):
        nv, cl = int(n_valid[b]), int(chunk_len[b])
        if nv == 0:
            continue
        cols = np.concatenate([np.arange(n_sys), n_sys + np.arange(cl), n_sys + m + np.arange(nv)])
        z = np.einsum("thgd,hsd->hgts", q[b, :nv], keys[b][:, cols]) * scale
        if softcap is not None:
            z = np.tanh(z / softcap) * softcap
        allowed = np.ones((nv, len(cols)), bool)
        allowed[:, n_sys + cl :] = np.tril(np.ones((nv, nv), bool))
        z = np.where(allowed, z, -np.inf)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b, :, :cl] = p[..., n_sys : n_sys + cl].max(axis=(1, 2))
    return out


def _inputs(seed, g, d, n_sys, dtype=jnp.float32, t=T, m=M):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, HKV, g, d)).astype(np.float32)
    keys = rng.standard_normal((B, HKV, n_sys + m + t, d)).astype(np.float32)
    keys[:, :, n_sys : n_sys + 3] += 0.5 * q[:, :3].mean(axis=3).transpose(0, 2, 1, 3)  # a few sharp chunk scores
    return jnp.asarray(q, dtype), jnp.asarray(keys, dtype)


# (chunk_len, n_valid) per batch row: full / partial chunk with all / some rows; empty chunk; one slot and one row.
VALUES = [([M, 9], [T, 13]), ([0, 1], [7, 1])]


@functools.partial(jax.jit, static_argnames=("n_sys", "scale", "softcap", "block"))
def _reference(q, keys, chunk_len, n_valid, *, n_sys, scale, softcap, block=256):
    return kvzip_scores_reference(q, keys, n_sys=n_sys, chunk_len=chunk_len, n_valid=n_valid, scale=scale,
                                  softcap=softcap, block=block)


def _lens(chunk_len, n_valid):
    return jnp.asarray(chunk_len, jnp.int32), jnp.asarray(n_valid, jnp.int32)


# ------------------------------------------------------------------------------------------ reference vs oracle
@pytest.mark.parametrize(
    "g, n_sys, softcap, block",
    [(1, 5, None, 256), (4, 5, 2.0, 16), (7, 0, None, 7), (4, 3, None, 1)],
    ids=["g1", "g4-softcap-blocks", "g7-nosys-odd-block", "g4-block1"],
)
def test_reference_matches_full_softmax(g, n_sys, softcap, block):
    q, keys = _inputs(0, g, 16, n_sys)
    scale = 1 / 4
    for chunk_len, n_valid in [*VALUES, ([5, M], [0, 2])]:  # n_valid = 0: all zeros
        ours = _reference(q, keys, *_lens(chunk_len, n_valid), n_sys=n_sys, scale=scale, softcap=softcap,
                          block=block)
        ref = _oracle(q, keys, n_sys, chunk_len, n_valid, scale, softcap)
        assert ours.shape == (B, HKV, M) and ours.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6, rtol=1e-5)
        for b in range(B):
            assert (np.asarray(ours)[b, :, chunk_len[b] :] == 0).all()


def test_dispatcher_auto_on_cpu_is_the_reference():
    q, keys = _inputs(1, 4, 16, 5)
    chunk_len, n_valid = _lens(*VALUES[0])
    kw = dict(n_sys=5, chunk_len=chunk_len, n_valid=n_valid, scale=0.25)
    auto = kvzip_scores(q, keys, **kw) if jax.default_backend() == "cpu" else kvzip_scores(q, keys, **kw,
                                                                                        backend="reference")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(kvzip_scores_reference(q, keys, **kw)))


# ------------------------------------------------------------------------------ Pallas kernels, interpret mode
KERNEL_CASES = [
    # g, d, n_sys, dtype, softcap, block_rows (rows are T * G: 20, 80, 140 -> 2, 3, 5 row blocks)
    pytest.param(1, 64, 5, jnp.float32, None, 16, id="g1-d64-f32"),
    pytest.param(4, 128, 5, jnp.bfloat16, None, 32, id="g4-d128-bf16"),
    pytest.param(7, 64, 0, jnp.float32, 2.0, 32, id="g7-d64-f32-softcap-nosys"),
]


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("g, d, n_sys, dtype, softcap, block_rows", KERNEL_CASES)
def test_kernel_interpret_matches_reference(backend, g, d, n_sys, dtype, softcap, block_rows):
    q, keys = _inputs(2, g, d, n_sys, dtype)
    scale = d**-0.5
    run = jax.jit(functools.partial(kvzip_scores, n_sys=n_sys, scale=scale, softcap=softcap, backend=backend,
                                    interpret=True, block_keys=16, block_rows=block_rows))
    for chunk_len, n_valid in VALUES:
        chunk_len, n_valid = _lens(chunk_len, n_valid)
        ours = np.asarray(run(q, keys, chunk_len=chunk_len, n_valid=n_valid))
        ref = np.asarray(_reference(q, keys, chunk_len, n_valid, n_sys=n_sys, scale=scale, softcap=softcap))
        assert ours.shape == (B, HKV, M)
        # Same f32 math in a different summation order: agreement to fp32 rounding.
        np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=2e-5)
        for b in range(B):
            assert (ours[b, :, int(chunk_len[b]) :] == 0).all()


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_kernel_interpret_default_tiles(backend):
    """The default tiles (GPU 128 rows x 64 keys, TPU 256 x 512) at a tiny shape: one row block and one block per
    key segment, each mostly padding, which the masks must hide."""
    g, d, n_sys = 4, 128, 5
    q, keys = _inputs(5, g, d, n_sys, jnp.bfloat16)
    run = jax.jit(functools.partial(kvzip_scores, n_sys=n_sys, scale=d**-0.5, backend=backend, interpret=True))
    for chunk_len, n_valid in VALUES:
        chunk_len, n_valid = _lens(chunk_len, n_valid)
        ours = np.asarray(run(q, keys, chunk_len=chunk_len, n_valid=n_valid))
        ref = np.asarray(_reference(q, keys, chunk_len, n_valid, n_sys=n_sys, scale=d**-0.5, softcap=None))
        np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=2e-5)


# ---------------------------------------------------------------------------------------------- matmul precision
def _dot_precisions(fn, *args):
    """The `precision` of every dot_general in fn's jaxpr, kernel and loop bodies included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                        walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_precision_reaches_every_dot(backend, dtype):
    """The caller's precision (a name or a `jax.lax.Precision`) is what every dot of every backend runs at, except
    where the TPU kernel documents otherwise: HIGH as HIGHEST (Mosaic has no HIGH), and bf16 dots at Mosaic's
    default (exact either way)."""
    b, t, hkv, g, d, n_sys, m = 1, 20, 2, 4, 128, 5, 24
    q = jax.ShapeDtypeStruct((b, t, hkv, g, d), dtype)
    keys = jax.ShapeDtypeStruct((b, hkv, n_sys + m + t, d), dtype)
    lens = jax.ShapeDtypeStruct((b,), jnp.int32)
    # None takes jax's default_matmul_precision setting ("highest" in this suite's conftest), else the platform's.
    for precision in (None, "default", "high", jax.lax.Precision.HIGHEST):
        fn = functools.partial(_positional_scores, n_sys=n_sys, backend=backend, precision=precision)
        want = resolve_precision(precision)
        if backend == "pallas_tpu" and dtype != jnp.float32:
            want = jax.lax.Precision.DEFAULT
        elif backend == "pallas_tpu" and want == jax.lax.Precision.HIGH:
            want = jax.lax.Precision.HIGHEST
        found = _dot_precisions(fn, q, keys, lens, lens)
        assert len(found) >= 2  # both passes
        assert all(p == (None if want is None else (want, want)) for p in found), (precision, found)


def _positional_scores(q, keys, chunk_len, n_valid, **kw):
    return kvzip_scores(q, keys, chunk_len=chunk_len, n_valid=n_valid, scale=0.1, **kw)


# ----------------------------------------------------------------------------- no Triton: an error, not a fallback
@pytest.mark.parametrize("stub", [None, types.SimpleNamespace()], ids=["no-triton-module", "no-compiler-params"])
def test_pallas_gpu_without_triton_raises(monkeypatch, stub):
    """Without Triton's CompilerParams pallas_call would route the kernel to the Mosaic GPU lowering and fail there
    obscurely: the kernel says what is missing and what to use instead."""
    monkeypatch.setattr(scores_gpu, "pltriton", stub)
    kw = _bad()
    missing = r'no jax\.experimental\.pallas\.triton\.CompilerParams.*backend="reference"'
    with pytest.raises(RuntimeError, match=missing):
        kvzip_scores(kw.pop("q"), kw.pop("keys"), **kw, backend="pallas_gpu", interpret=True)


def test_gpu_module_imports_without_triton(monkeypatch):
    """A jax without the Pallas Triton backend still imports the module (and so `kvzip_kernels`); the reference
    backend keeps working and the GPU kernel raises when called."""
    import jax.experimental.pallas as pallas_pkg

    monkeypatch.delattr(pallas_pkg, "triton", raising=False)
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # "import ..." now raises ImportError
    try:
        importlib.reload(scores_gpu)
        assert scores_gpu.pltriton is None
        kw = _bad()
        q, keys = kw.pop("q"), kw.pop("keys")
        assert kvzip_scores(q, keys, **kw, backend="reference").shape == (B, HKV, 8)
        with pytest.raises(RuntimeError, match="CompilerParams"):
            kvzip_scores(q, keys, **kw, backend="pallas_gpu", interpret=True)
    finally:
        monkeypatch.undo()
        importlib.reload(scores_gpu)
    assert scores_gpu.pltriton is not None


# ------------------------------------------------------------------------------------------------- bad inputs
def _bad(**overrides):
    q, keys = _inputs(3, 2, 16, 4, t=6, m=8)
    kw = dict(q=q, keys=keys, n_sys=4, chunk_len=jnp.asarray([8, 2], jnp.int32),
              n_valid=jnp.asarray([6, 1], jnp.int32), scale=0.25)
    kw.update(overrides)
    return kw


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(q=jnp.zeros((2, 6, 2, 16))), r"q must be \[B, T, Hkv, G, D\]"),
        (dict(keys=jnp.zeros((2, 3, 18, 16))), r"keys must be \[B=2, Hkv=2"),
        (dict(keys=jnp.zeros((2, 2, 10, 16))), r"keys width 10 .* m = 0"),
        (dict(n_sys=-1), r"n_sys must be a static int >= 0, got -1"),
        (dict(keys=jnp.zeros((2, 2, 18, 16), jnp.bfloat16)), r"q dtype float32 differs from keys dtype bfloat16"),
        (dict(q=jnp.zeros((2, 6, 2, 2, 16), jnp.int32), keys=jnp.zeros((2, 2, 18, 16), jnp.int32)),
         r"q must be floating point"),
        (dict(chunk_len=jnp.asarray([8], jnp.int32)), r"chunk_len must be \[B=2\]"),
        (dict(n_valid=jnp.asarray([6.0, 1.0])), r"n_valid must be an integer array"),
        (dict(chunk_len=jnp.asarray([8, 9], jnp.int32)), r"chunk_len\[1\] = 9 is outside \[0, 8\]"),
        (dict(chunk_len=jnp.asarray([-1, 2], jnp.int32)), r"chunk_len\[0\] = -1 is outside \[0, 8\]"),
        (dict(n_valid=jnp.asarray([7, 1], jnp.int32)), r"n_valid\[0\] = 7 is outside \[0, 6\]"),
        (dict(backend="cuda"), r"kvzip_scores: unknown backend 'cuda'"),
        (dict(block_keys=0), r"block_keys must be a positive int or None, got 0"),
        (dict(backend="pallas_gpu", block_keys=24), r"block_keys = 24 must be a power of two >= 16"),
        (dict(backend="pallas_gpu", block_rows=8), r"block_rows = 8 must be a power of two >= 16"),
        (dict(backend="pallas_tpu", block_keys=12), r"block_keys = 12 must be a positive multiple of 8"),
        (dict(q=_inputs(3, 2, 16, 4, jnp.bfloat16, t=6, m=8)[0], keys=_inputs(3, 2, 16, 4, jnp.bfloat16, t=6, m=8)[1],
              backend="pallas_tpu", block_rows=24), r"block_rows = 24 must be a positive multiple of 16 for bfloat16"),
        (dict(precision="tf64"), r"unknown matmul precision 'tf64'"),
    ],
)
def test_bad_inputs_raise_before_any_kernel(overrides, message):
    kw = _bad(**overrides)
    with pytest.raises(ValueError, match=message):
        kvzip_scores(kw.pop("q"), kw.pop("keys"), **kw, interpret=True)


def test_traced_lengths_skip_the_value_check():
    kw = _bad()
    q, keys = kw.pop("q"), kw.pop("keys")
    out = jax.jit(lambda c, n: kvzip_scores(q, keys, n_sys=4, chunk_len=c, n_valid=n, scale=0.25))(
        kw["chunk_len"], kw["n_valid"])
    assert out.shape == (B, HKV, 8)


# ------------------------------------------------------------------- lowering for the real backends, on this CPU
@pytest.mark.parametrize("backend, platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
def test_kernels_lower_for_their_platform(backend, platform):
    """Cross-platform export runs the Pallas -> Triton / Mosaic lowering here, which enforces what interpret mode
    does not (Triton's power-of-two tiles, Mosaic's block-shape rule) at default block sizes and an odd head dim
    (zero-padded for Triton, whole-dim blocks for Mosaic)."""
    from jax import export

    b, t, hkv, g, d, n_sys, m = 1, 100, 2, 6, 80, 3, 200
    q = jax.ShapeDtypeStruct((b, t, hkv, g, d), jnp.bfloat16)
    keys = jax.ShapeDtypeStruct((b, hkv, n_sys + m + t, d), jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((b,), jnp.int32)
    fn = jax.jit(lambda q, k, c, n: kvzip_scores(q, k, n_sys=n_sys, chunk_len=c, n_valid=n, scale=0.1, softcap=30.0,
                                                 backend=backend))
    # Triton kernels are a custom call without export-compatibility guarantees: fine, nothing is serialized.
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(fn, platforms=[platform], disabled_checks=checks)(q, keys, lens, lens).mlir_module()
    assert text.count("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") == 2  # the two passes


@pytest.mark.parametrize("m", [2048, 8192])
@pytest.mark.parametrize("backend, platform", [("pallas_gpu", "cuda"), ("pallas_tpu", "tpu")])
def test_llama8b_scoring_lowers_with_hardware_sized_tiles(backend, platform, m):
    """Llama-3.1-8B scoring (B 1, Hkv 8, G 4, D 128, bf16, n_sys 64, chunk m, T = m + 32 repeat rows) at the default
    tiles, from `jax.ShapeDtypeStruct`s (nothing allocated). The jaxpr gives each pallas_call's grid and matmul
    operands; the asserts are the hardware's limits (TPU: a bounded number of ~0.35 us grid steps, SMEM-sized scalar
    prefetch, bf16 matmul rows in whole 16-row sublane tiles; GPU: tensor-core sized 128-row tiles, powers of two).
    Then the Pallas -> Triton / Mosaic lowering runs, which enforces the block-shape rules. Lowering is not
    compiling: Triton's and Mosaic's compilers (registers, shared memory, VMEM) run only on a device."""
    b, hkv, g, d, n_sys, t = 1, 8, 4, 128, 64, m + 32
    structs = (jax.ShapeDtypeStruct((b, t, hkv, g, d), jnp.bfloat16),
               jax.ShapeDtypeStruct((b, hkv, n_sys + m + t, d), jnp.bfloat16),
               jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    fn = functools.partial(_positional_scores, n_sys=n_sys, backend=backend, softcap=None)
    lse, best = calls = pallas_calls(fn, *structs)
    assert (lse.name, best.name) == ("kvzip_scores_lse", "kvzip_scores_max")
    for call in calls:
        assert call.dot_operands
        for lhs, rhs in call.dot_operands:
            assert lhs.dtype == rhs.dtype == jnp.bfloat16
            if platform == "tpu":
                assert lhs.shape[0] % 16 == 0 and rhs.shape[0] % 16 == 0 and lhs.shape[0] >= 256, call
            else:
                assert all(x >= 16 and x & (x - 1) == 0 for x in (*lhs.shape, *rhs.shape)), call
        if platform == "tpu":
            assert call.grid_steps <= 100_000, call  # 128 x 128 blocks took 267,280 steps in pass 1 at m 8192
            assert call.scalar_prefetch_bytes <= 1 << 20, call
    if platform == "cuda":
        assert all(lhs.shape[0] >= 128 for lhs, _ in lse.dot_operands), lse  # pass 1 holds 128 query rows
    text = lowered_text(fn, *structs, platform=platform)
    assert text.count("xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") == 2


# ----------------------------------------------------------------------------------- real backends (skipped here)
def _real_backend_case(backend):
    """Realistic sizes: several default-size blocks per pass, a short last chunk, padded repeat rows."""
    rng = np.random.default_rng(4)
    b, t, hkv, g, d, n_sys, m = 2, 300, 4, 4, 128, 37, 512
    q = jnp.asarray(rng.standard_normal((b, t, hkv, g, d)), jnp.bfloat16)
    keys = jnp.asarray(rng.standard_normal((b, hkv, n_sys + m + t, d)), jnp.bfloat16)
    chunk_len, n_valid = _lens([m, 200], [t, 171])
    kw = dict(n_sys=n_sys, chunk_len=chunk_len, n_valid=n_valid, scale=d**-0.5, softcap=50.0)
    ours = np.asarray(jax.jit(functools.partial(kvzip_scores, backend=backend, **kw))(q, keys))
    ref = np.asarray(kvzip_scores_reference(q, keys, **kw))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-4)
    assert ours[1, :, 200:].max() == 0.0


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:.*Triton.*:DeprecationWarning")
def test_pallas_gpu_on_gpu():
    _real_backend_case("pallas_gpu")


@pytest.mark.tpu
def test_pallas_tpu_on_tpu():
    _real_backend_case("pallas_tpu")
