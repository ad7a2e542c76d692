"""Flax NNX decoders (llama / qwen2 / qwen3 / gemma3), Hugging Face checkpoint I/O and GGUF loading."""

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
from kvzip_jax.models.gguf_io import load_gguf
from kvzip_jax.models.hf_io import CheckpointError, load_params, params_from_tensors, save_params

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
    "load_gguf",
    "load_params",
    "params_from_tensors",
    "save_params",
]
