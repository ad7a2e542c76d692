"""Shared helpers of the KVzip tests: fast perturbed random params for tiny ModelConfig models."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.config import ModelConfig
from kvzip_jax.models import abstract_params


@functools.lru_cache(maxsize=None)
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
