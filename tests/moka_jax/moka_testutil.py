"""Shared builders for the MokA tests: a tiny decoder, a multimodal layout, adapters with non-zero B."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.config import ModelConfig
from kvzip_jax.models import init_params
from kvzip_jax.models.llava import AUDIO, IMAGE, PAD, TEXT
from kvzip_jax.sharding import path_str

TINY_LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.from_hf_dict({**TINY_LLAMA, **overrides})


def tiny_params(config: ModelConfig, seed: int = 0):
    return init_params(config, seed)


def layout(batch: int = 3, length: int = 20, seed: int = 0):
    """modality_ids and key_mask like the AVT prompts: system text | image | audio | question (keys) | answer | pad.
    Rows differ in block sizes; the last row has no audio; padding at the end of rows 1 and 2."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, length), TEXT, np.int8)
    keys = np.zeros((batch, length), bool)
    answers = np.zeros((batch, length), bool)
    for b in range(batch):
        n_img, n_aud = int(rng.integers(2, 5)), (0 if b == batch - 1 else int(rng.integers(2, 4)))
        n_q, n_ans, n_pad = int(rng.integers(2, 5)), 2, b * 2
        pos = 1
        ids[b, pos : pos + n_img] = IMAGE
        pos += n_img
        ids[b, pos : pos + n_aud] = AUDIO
        pos += n_aud + 1
        keys[b, pos : pos + n_q] = True
        pos += n_q
        answers[b, pos : pos + n_ans] = True
        if n_pad:
            ids[b, length - n_pad :] = PAD
    return ids, keys, answers


def with_random_adapters(params, seed: int = 1, scale: float = 0.3):
    """Every lora_a / lora_b leaf replaced by random values (B != 0, so the adapter term is non-zero)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.key(seed)
    out = []
    for i, (path, x) in enumerate(leaves):
        name = path_str(path)
        if name.endswith(("/lora_a", "/lora_b")):
            x = scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def adapter_leaves(params) -> dict[str, jnp.ndarray]:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)
            if path_str(p).endswith(("/lora_a", "/lora_b"))}
