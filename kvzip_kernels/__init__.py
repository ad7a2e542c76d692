"""Kernels with their jnp references, one dispatcher per op. Imports only jax (and numpy).

Backends (`kvzip_kernels.backend`): "reference" (jnp; the oracle and the CPU path), "pallas_gpu" (Pallas, Triton
lowering), "pallas_tpu" (Pallas, Mosaic TPU; pages and tables copied from HBM by DMA), and "auto" (the platform's
kernel, else the reference). Both Pallas backends also run on CPU with `interpret=True`.

- `paged_attention`: decode attention over the head-wise paged cache (dispatcher, with input checks).
- `kvzip_scores`: KVzip's fused chunk scoring (max over queries and group of the softmax over
  [system | chunk | repeat] keys, computed blockwise), with its dispatcher and input checks;
  `kvzip_scores_from_lse` its second pass alone, for a caller that accumulated the log-sum-exp itself.
- `use_backend(backend, interpret=...)`: a context that sets the backend of dispatcher calls that pass none
  (how the decoder is switched to a kernel); read at trace time.
- `kvzip_kernels.cpu_attention.fused_attention_cpu`: a fused float32 flash attention for x86-64 CPUs (C++, an XLA
  FFI custom call compiled on first use), which the encoders run on CPU. Not imported here: importing the package
  never builds anything.
"""

from kvzip_kernels.backend import use_backend
from kvzip_kernels.dispatch import paged_attention
from kvzip_kernels.kvzip_scores import kvzip_scores, kvzip_scores_backend, kvzip_scores_from_lse, kvzip_scores_reference

__all__ = ["kvzip_scores", "kvzip_scores_backend", "kvzip_scores_from_lse", "kvzip_scores_reference",
           "paged_attention", "use_backend"]
