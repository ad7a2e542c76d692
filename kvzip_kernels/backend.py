"""Backend names shared by every op's dispatcher, and the rule that picks one for the current platform."""

from __future__ import annotations

import jax
import jax.numpy as jnp

REFERENCE = "reference"  # pure jnp: the oracle and the CPU path
PALLAS_GPU = "pallas_gpu"  # Pallas, Triton lowering (also runs in CPU interpret mode)
PALLAS_TPU = "pallas_tpu"  # Pallas, Mosaic TPU (also runs in CPU interpret mode)
AUTO = "auto"

_PLATFORM_DEFAULT = {"gpu": PALLAS_GPU, "cuda": PALLAS_GPU, "rocm": PALLAS_GPU, "tpu": PALLAS_TPU}


BACKENDS = (AUTO, REFERENCE, PALLAS_GPU, PALLAS_TPU)

# (backend, interpret) of dispatcher calls that pass none. A `jax.make_user_context` is part of jit's cache key, so
# entering `use_backend` makes a jitted caller (the decoder) retrace instead of reusing another backend's executable.
_CONTEXT = jax.make_user_context(default_value=(AUTO, False))


def use_backend(backend: str, *, interpret: bool = False):
    """A context manager: within it, every op's dispatcher called without `backend` uses this one (and
    `interpret`). This is how code that does not pass a backend itself (the decoder, KVzip scoring) is switched."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    return _CONTEXT((backend, bool(interpret)))


def requested_backend(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
    """The explicit arguments, else the innermost `use_backend` context's, else ("auto", False)."""
    ctx_backend, ctx_interpret = _CONTEXT.value
    return (ctx_backend if backend is None else backend), bool(ctx_interpret if interpret is None else interpret)


def resolve_backend(backend: str, available: tuple[str, ...], op: str) -> str:
    """The concrete backend for `backend` ("auto" → the platform's kernel if `op` has one, else the reference).

    Raises ValueError naming the op, the value and the choices when `backend` is not one of `available`.
    """
    if backend == AUTO:
        preferred = _PLATFORM_DEFAULT.get(jax.default_backend(), REFERENCE)
        return preferred if preferred in available else REFERENCE
    if backend not in available:
        raise ValueError(f"{op}: unknown backend {backend!r}; available: {', '.join((AUTO, *available))}")
    return backend


# jax's matmul-precision names (`jax.default_matmul_precision` and the `precision=` strings) -> the lax enum.
_PRECISION_NAMES = {
    "default": jax.lax.Precision.DEFAULT, "fastest": jax.lax.Precision.DEFAULT, "bfloat16": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH, "tensorfloat32": jax.lax.Precision.HIGH, "bfloat16_3x": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST, "float32": jax.lax.Precision.HIGHEST,
}


def resolve_precision(precision) -> jax.lax.Precision | None:
    """The matmul precision a kernel's dots run at: `precision` ("default" | "high" | "highest", their jax aliases,
    or a `jax.lax.Precision`), else jax's `default_matmul_precision` setting at trace time, else None (the
    platform's default). What it means for float32 inputs on GPU: DEFAULT and HIGH let Triton use TF32 (a 10-bit
    mantissa, ~1e-3 relative error per product); HIGHEST keeps IEEE float32. bf16 inputs are exact in every mode
    (products accumulate in float32). Raises ValueError naming the value and the choices for an unknown explicit
    `precision`."""
    if precision is None:
        setting = jax.config.jax_default_matmul_precision
        # A setting jax accepts but this enum cannot express (an algorithm name such as "BF16_BF16_F32") is left
        # to the dots themselves: None makes them take jax's setting.
        return _PRECISION_NAMES.get(setting.lower()) if isinstance(setting, str) else None
    if isinstance(precision, jax.lax.Precision):
        return precision
    if isinstance(precision, str) and precision.lower() in _PRECISION_NAMES:
        return _PRECISION_NAMES[precision.lower()]
    raise ValueError(f"unknown matmul precision {precision!r}; choose one of {', '.join(_PRECISION_NAMES)} "
                     "or a jax.lax.Precision")


def mosaic_precision(precision: jax.lax.Precision | None, dtype) -> jax.lax.Precision | None:
    """What a Mosaic TPU kernel's dot is asked for. Mosaic lowers DEFAULT and HIGHEST only, so HIGH rounds up to
    HIGHEST. The mode concerns float32 operands alone (bf16 products are exact in the float32 accumulator):
    narrower inputs get DEFAULT rather than a float32 contraction of bf16 data. DEFAULT, not None: a None dot
    would take jax's `default_matmul_precision` setting at trace time."""
    if jnp.dtype(dtype) != jnp.float32:
        return jax.lax.Precision.DEFAULT
    return jax.lax.Precision.HIGHEST if precision == jax.lax.Precision.HIGH else precision
