"""Flax NNX decoders (llama / qwen2 / qwen3 / gemma3) and Hugging Face checkpoint I/O."""

from kvzip_jax.models.decoder import (
    Transformer,
    abstract_params,
    embed,
    forward,
    forward_hidden,
    forward_scores,
    graphdef_for,
    init_params,
)
from kvzip_jax.models.hf_io import CheckpointError, load_params, save_params

__all__ = [
    "CheckpointError",
    "Transformer",
    "abstract_params",
    "embed",
    "forward",
    "forward_hidden",
    "forward_scores",
    "graphdef_for",
    "init_params",
    "load_params",
    "save_params",
]
