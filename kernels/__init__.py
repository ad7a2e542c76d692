"""Kernels with their jnp references, one dispatcher per op. Imports only jax.

Backends: "reference" (jnp; the oracle and the CPU path). The Pallas GPU/TPU kernels plug in here.
"""

from kernels.dispatch import paged_attention

__all__ = ["paged_attention"]
