"""`kvzip_kernels.cpu_attention`: the fused AVX2 flash-attention forward against a float64 numpy softmax attention,
eagerly and under jit, on shapes whose T and S are not multiples of the kernel's blocks (48 query rows, 256 keys,
16-wide panels), with large logits; its input checks; and the build cache and the unavailable path.

The kernel tests skip (with the reason) where the library cannot be built or the CPU lacks AVX2/FMA.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvzip_kernels.cpu_attention as cpu_attention
from kvzip_kernels.cpu_attention import cpu_attention_available, fused_attention_cpu


@pytest.fixture(scope="module")
def kernel():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = cpu_attention_available()
    if not ok:
        reason = "; ".join(str(w.message) for w in caught) or str(cpu_attention._state.get("reason"))
        pytest.skip(f"fused CPU attention unavailable: {reason}")
    return fused_attention_cpu


def reference(q, k, v, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bntd,bnsd->bnts", q, k) * scale
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.einsum("bnts,bnsd->bntd", e / e.sum(axis=-1, keepdims=True), v)


def inputs(b, n, t, s, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, n, x, d)).astype(np.float32) for x in (t, s, s))


# (B, N, T, S, D): B*N in {1, 3, 16}; T != S; T and S multiples of no block; one Whisper-length head pair.
SHAPES = [
    (1, 1, 37, 201, 8),
    (1, 3, 37, 201, 64),
    (1, 3, 201, 37, 128),
    (2, 8, 50, 300, 64),
    (1, 1, 1, 1, 64),
    (1, 1, 100, 1000, 40),  # D = 16j + 8: a half value panel after whole ones
    (1, 2, 1500, 1500, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(kernel, shape):
    q, k, v = inputs(*shape, seed=sum(shape))
    scale = float(np.random.default_rng(shape[2]).uniform(0.05, 0.5))
    got = np.asarray(kernel(q, k, v, scale=scale))
    assert got.shape == q.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(q, k, v, scale), atol=1e-5, rtol=1e-5)


def test_under_jit_matches_eager(kernel):
    q, k, v = (jnp.asarray(x) for x in inputs(2, 3, 61, 259, 64, seed=5))
    jitted = jax.jit(lambda q, k, v: kernel(q, k, v, scale=0.125))
    got = np.asarray(jitted(q, k, v))
    np.testing.assert_allclose(got, reference(q, k, v, 0.125), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got, np.asarray(kernel(q, k, v, scale=0.125)))


def test_large_logits_stay_finite(kernel):
    # scale 10 on unit-variance D=64 vectors: logits up to ~250, where an unshifted exp overflows and most
    # probabilities underflow to exactly 0. Any float32 computation rounds such logits by ~|logit| * 2^-24 * a few
    # (jax.nn.dot_product_attention in float32 is 4e-5 off the float64 reference here, the kernel 7e-5), and the
    # softmax turns absolute logit errors into relative ones: the tolerance is that rounding, not 1e-5.
    q, k, v = inputs(1, 3, 53, 517, 64, seed=7)
    got = np.asarray(kernel(q, k, v, scale=10.0))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference(q, k, v, 10.0), atol=3e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "shapes, dtype, match",
    [
        (((1, 1, 4, 16), (1, 1, 4, 16), (1, 1, 4, 16)), np.float16, "float32, got float16"),
        (((1, 1, 4, 12), (1, 1, 4, 12), (1, 1, 4, 12)), np.float32, "D=12 must be a positive multiple of 8"),
        (((1, 1, 4, 264), (1, 1, 4, 264), (1, 1, 4, 264)), np.float32, "D=264 .* at most 256"),
        (((1, 4, 16), (1, 4, 16), (1, 4, 16)), np.float32, r"q must have rank 4.*\(1, 4, 16\)"),
        (((1, 1, 4, 16), (1, 1, 5, 16), (1, 1, 6, 16)), np.float32, r"k \(1, 1, 5, 16\) and v \(1, 1, 6, 16\)"),
        (((1, 2, 4, 16), (1, 1, 5, 16), (1, 1, 5, 16)), np.float32, "must agree in B, N and D"),
    ],
)
def test_bad_input_raises(shapes, dtype, match):
    q, k, v = (np.zeros(s, dtype) for s in shapes)
    with pytest.raises(ValueError, match=match):
        fused_attention_cpu(q, k, v, scale=1.0)


def test_second_build_reuses_the_cached_library(kernel, monkeypatch, tmp_path):
    # A cache of its own: in the shared one, another test process may be building the same file right now.
    monkeypatch.setenv("KVZIP_KERNELS_CACHE", str(tmp_path))
    compiler = os.environ.get("CXX") or "c++"
    path = cpu_attention._library_path(compiler, (*cpu_attention._FLAGS, f"-I{jax.ffi.include_dir()}"))
    cpu_attention._build()
    assert path.exists() and path.parent == tmp_path
    before = path.stat().st_mtime_ns
    cpu_attention._build()
    assert path.stat().st_mtime_ns == before
    assert not list(path.parent.glob(path.stem + ".*.tmp"))  # no temporary left behind


def test_unavailable_warns_once(monkeypatch, tmp_path):
    # A failing compiler (`false` exits 1): available() is False, one warning says why, the call raises.
    monkeypatch.setattr(cpu_attention, "_state", {})
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("KVZIP_KERNELS_CACHE", str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_attention.cpu_attention_available()
        assert not cpu_attention.cpu_attention_available()
    messages = [str(w.message) for w in caught if "fused CPU attention" in str(w.message)]
    assert len(messages) == 1
    assert "unavailable" in messages[0]
    assert not list(tmp_path.iterdir())  # the failed build's temporary file is removed
    q = np.zeros((1, 1, 4, 16), np.float32)
    with pytest.raises(RuntimeError, match="unavailable"):
        fused_attention_cpu(q, q, q, scale=1.0)


def test_encoders_take_the_fused_path_and_its_gradient(monkeypatch):
    """The encoders' unmasked float32 attention on CPU runs the fused kernel (its custom call is in the jaxpr), and
    differentiating through it gives the jnp path's gradients (the kernel is forward-only; its VJP recomputes)."""
    from kvzip_jax.models import vision

    if not cpu_attention_available():
        pytest.skip("the fused CPU attention is unavailable here (see the warning)")
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 300, 64)), jnp.float32) for _ in range(3))
    scale = np.float32(0.125)
    assert "ffi_call" in str(jax.make_jaxpr(lambda *a: vision._attend(*a, None, scale))(q, k, v))
    assert "ffi_call" not in str(jax.make_jaxpr(lambda *a: vision._attend(*a, jnp.ones((1, 300), bool), scale))(
        q, k, v))

    monkeypatch.setenv(cpu_attention.DISABLE_ENV, "1")  # switched off: the jnp path, no build, no warning
    assert "ffi_call" not in str(jax.make_jaxpr(lambda *a: vision._attend(*a, None, scale))(q, k, v))
    monkeypatch.delenv(cpu_attention.DISABLE_ENV)

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, None, scale)))

    fused = jax.grad(loss(vision._attend), argnums=(0, 1, 2))(q, k, v)
    plain = jax.grad(loss(vision._attend_jnp), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_nan_keys_propagate_and_vmap_and_jvp_work():
    """A NaN in the keys makes the rows that see it NaN, as the jnp path does (the kernel may not hide corrupt
    activations); vmap runs the call per element; forward-mode derivatives come from the jnp path's JVP."""
    from kvzip_jax.models import vision

    if not cpu_attention_available():
        pytest.skip("the fused CPU attention is unavailable here (see the warning)")
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 40, 64)), jnp.float32) for _ in range(3))
    for key in (0, 7, 133 % 40):  # positions in different 8-lane groups of a block
        bad = k.at[0, 1, key, 3].set(jnp.nan)
        out = np.asarray(fused_attention_cpu(q, bad, v, scale=0.125))
        assert np.isnan(out[0, 1]).all() and np.isfinite(out[0, 0]).all(), key
    batched = jax.vmap(lambda q, k, v: fused_attention_cpu(q, k, v, scale=0.125))(q[None], k[None], v[None])
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(fused_attention_cpu(q, k, v, scale=0.125)))
    scale = np.float32(0.125)
    tangents = tuple(jnp.asarray(rng.standard_normal(q.shape), jnp.float32) for _ in range(3))
    out, tangent = jax.jvp(lambda *a: vision._attend(*a, None, scale), (q, k, v), tangents)
    ref_out, ref_tangent = jax.jvp(lambda *a: vision._attend_jnp(*a, None, scale), (q, k, v), tangents)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(ref_tangent), atol=1e-5, rtol=1e-5)
