"""Shared helpers of the KVzip tests: fast perturbed random params for tiny ModelConfig models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.config import FULL, SLIDING, ModelConfig, RopeConfig
from kvzip_jax.kvzip.prompts import KVzipPrompt
from kvzip_jax.models import abstract_params


@functools.cache
def perturbed_params(config: ModelConfig, seed: int = 0, scale: float = 0.1):
    """Random params as `init_params` draws them (std-0.02 weights, neutral norm scales: 1, or 0 for Gemma's
    (1 + w) norms), with every leaf, norm scales included, perturbed by `scale` noise so nothing is degenerate.
    Filled on the host into `abstract_params(config)` (no compile), cached per (config, seed, scale)."""
    rng = np.random.default_rng(seed)
    paths, tree = jax.tree_util.tree_flatten_with_path(abstract_params(config))
    leaves = []
    for path, leaf in paths:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in jax.tree_util.keystr(path):
            value = (0.0 if config.gemma_norms else 1.0) + scale * noise
        else:
            value = (0.02 + scale) * noise
        leaves.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(tree, leaves)


# Tiny models and a hand-built prompt shared by the KVzip tests (G = 2; Gemma3-like: sliding/full, window 8,
# query_pre_attn_scalar 24 != head_dim 16).
PROMPT = KVzipPrompt(prefix_ids=(1, 2, 3, 4), postfix_ids=(5, 6), first_repeat_ids=(7, 8, 9), later_repeat_ids=(10, 11))
CTX_LENS = (45, 30)  # ragged rows
LLAMA = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
GEMMA = ModelConfig(
    family="gemma3", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=256,
    rope=((FULL, RopeConfig(theta=1_000_000.0)), (SLIDING, RopeConfig(theta=10_000.0))),
    layer_types=(SLIDING, FULL, SLIDING, FULL), sliding_window=8, query_pre_attn_scalar=24, qk_norm=True,
    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=False,
)


def contexts(seed: int = 0, lengths=CTX_LENS) -> list[list[int]]:
    """Random context token ids (never the prompt's ids 1..11) of the given lengths."""
    rng = np.random.default_rng(seed)
    return [rng.integers(12, 128, n).tolist() for n in lengths]
