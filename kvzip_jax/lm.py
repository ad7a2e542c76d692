"""A notebook-friendly handle: config + params (+ tokenizer), loaded from or saved to an HF checkpoint directory.

Tokenizers and chat templates come from transformers' AutoTokenizer (the optional `hf` extra); everything else
needs only jax and safetensors (or gguf, for llama.cpp's .gguf files).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.config import ModelConfig
from kvzip_jax.generate import DEFAULT_CHUNK, DEFAULT_SAMPLING, SamplingConfig, generate
from kvzip_jax.models.gguf_io import find_gguf, load_gguf
from kvzip_jax.models.hf_io import load_params, save_params

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """AutoTokenizer from a checkpoint directory, or built from a GGUF file's metadata (vocab, merges, chat
    template) by transformers' GGUF conversion when gguf_file names that file."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("tokenizers and chat templates need transformers: pip install 'kvzip-jax[hf]'") from e
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(os.path.dirname(gguf_file) or ".", gguf_file=os.path.basename(gguf_file))
    return AutoTokenizer.from_pretrained(os.fspath(path))


def _transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


@dataclasses.dataclass
class LanguageModel:
    config: ModelConfig
    params: nnx.State
    tokenizer: Any = None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None, tokenizer: bool = True
    ) -> LanguageModel:
        """Load an HF checkpoint directory, a .gguf file, or a directory holding exactly one .gguf file.

        GGUF weights are dequantized to float32 (then cast to dtype if given). A GGUF tokenizer is built from the
        file's metadata by transformers; without transformers installed the model loads with no tokenizer.
        """
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            loaded = load_gguf(gguf_file, dtype=dtype, mesh=mesh)
            use_tokenizer = tokenizer and loaded.has_tokenizer and _transformers_available()
            return cls(loaded.config, loaded.params, load_tokenizer(path, gguf_file) if use_tokenizer else None)
        config, params = load_params(path, dtype=dtype, mesh=mesh)
        has_tokenizer = any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)
        return cls(config, params, load_tokenizer(path) if tokenizer and has_tokenizer else None)

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> None:
        save_params(path, self.config, self.params, max_shard_bytes=max_shard_bytes)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(os.fspath(path))

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer; pass token ids instead of text")
        if chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(self.tokenizer(text)["input_ids"])

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 64,
        chat: bool = False,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        stop_token_ids: Sequence[int] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        seed: int = 0,
    ) -> list[str] | list[list[int]]:
        """Text in, text out (with a tokenizer); token ids in, token ids out otherwise."""
        texts = isinstance(prompts[0], str)
        ids = [self.encode(p, chat=chat) for p in prompts] if texts else [list(p) for p in prompts]
        stops = stop_token_ids
        if stops is None and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            stops = sorted({*self.config.eos_token_ids, self.tokenizer.eos_token_id})
        result = generate(
            self.params, self.config, ids, max_new_tokens=max_new_tokens, sampling=sampling,
            stop_token_ids=stops, chunk_size=chunk_size, seed=seed,
        )
        if not texts:
            return result.tokens
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))
