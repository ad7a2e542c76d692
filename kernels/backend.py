"""Backend names shared by every op's dispatcher, and the rule that picks one for the current platform."""

from __future__ import annotations

import jax

REFERENCE = "reference"  # pure jnp: the oracle and the CPU path
PALLAS_GPU = "pallas_gpu"  # Pallas, Triton lowering (also runs in CPU interpret mode)
PALLAS_TPU = "pallas_tpu"  # Pallas, Mosaic TPU with scalar-prefetched tables (also runs in CPU interpret mode)
AUTO = "auto"

_PLATFORM_DEFAULT = {"gpu": PALLAS_GPU, "cuda": PALLAS_GPU, "rocm": PALLAS_GPU, "tpu": PALLAS_TPU}


def resolve_backend(backend: str, available: tuple[str, ...], op: str) -> str:
    """The concrete backend for `backend` ("auto" → the platform's kernel if `op` has one, else the reference).

    Raises ValueError naming the op, the value and the choices when `backend` is not one of `available`.
    """
    if backend == AUTO:
        preferred = _PLATFORM_DEFAULT.get(jax.default_backend(), REFERENCE)
        return preferred if preferred in available else REFERENCE
    if backend not in available:
        raise ValueError(f"{op}: unknown backend {backend!r}; available: {', '.join((AUTO,) + available)}")
    return backend
