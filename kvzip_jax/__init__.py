"""kvzip_jax: functional Flax LLMs with explicit KV caches, Hugging Face checkpoints and KVzip compression."""
