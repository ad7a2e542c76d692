"""A notebook-friendly handle: config + params (+ tokenizer), loaded from or saved to an HF checkpoint directory.

Tokenizers and chat templates come from transformers' AutoTokenizer (the optional `hf` extra); everything else
needs only jax and safetensors (or gguf, for llama.cpp's .gguf files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.config import ModelConfig
from kvzip_jax.generate import DEFAULT_CHUNK, DEFAULT_SAMPLING, SamplingConfig, generate, stream_text
from kvzip_jax.models.gguf_io import find_gguf, hf_config_dict, load_gguf, open_gguf
from kvzip_jax.models.hf_io import load_params, save_params
from kvzip_jax.smollm2 import smollm2_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def cache_dir() -> str:
    """Where converted tokenizers are kept: $KVZIP_JAX_CACHE, else $XDG_CACHE_HOME/kvzip_jax (~/.cache/kvzip_jax)."""
    explicit = os.environ.get("KVZIP_JAX_CACHE")
    if explicit:
        return explicit
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvzip_jax")


def enable_compilation_cache(path: str | None = None, min_compile_seconds: float = 1.0) -> str | None:
    """Turn on JAX's persistent compilation cache (default folder: `cache_dir()`/xla), so that a later process
    reuses the XLA executables this one compiled: the demo and the CLI call it, notebooks may. Executables that
    took less than `min_compile_seconds` to compile are not worth a disk read and are not kept. Returns the
    folder, or None (with a warning) when it cannot be created."""
    folder = path or os.path.join(cache_dir(), "xla")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a read-only or missing home costs compile time, never the run
        warnings.warn(f"no persistent compilation cache ({folder}: {e})", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return folder


def _gguf_tokenizer_key(gguf_file: str) -> str:
    """Names one GGUF file version and the transformers that converted its tokenizer."""
    import transformers

    stat = os.stat(gguf_file)
    ident = f"{os.path.abspath(gguf_file)}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """AutoTokenizer from a checkpoint directory, or built from a GGUF file's metadata (vocab, merges, chat
    template) by transformers' GGUF conversion when gguf_file names that file.

    The GGUF conversion takes 10-20 s; its result is saved under `cache_dir()` (keyed by the file's path, size,
    modification time and the transformers version) and later loads take a fraction of a second."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("tokenizers and chat templates need transformers: pip install 'kvzip-jax[hf]'") from e
    if gguf_file is None:
        return AutoTokenizer.from_pretrained(os.fspath(path))
    cached = os.path.join(cache_dir(), "tokenizers", _gguf_tokenizer_key(gguf_file))
    if os.path.exists(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_file) or ".", gguf_file=os.path.basename(gguf_file))
    scratch = None
    try:  # written to a scratch folder and renamed, so a concurrent or interrupted run never sees half a tokenizer
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        scratch = tempfile.mkdtemp(dir=os.path.dirname(cached))
        tokenizer.save_pretrained(scratch)
        os.replace(scratch, cached)
    except OSError as e:  # a read-only or full cache only costs the conversion next time
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        warnings.warn(f"could not cache the converted GGUF tokenizer in {cached}: {e}", stacklevel=2)
    return tokenizer


DEFAULT_MODEL = "smollm2"


def resolve_model_path(path: str | os.PathLike) -> str | os.PathLike:
    """`path` itself, or for ``"smollm2"`` (when no such file or folder exists) the installed SmolLM2 GGUF."""
    if os.fspath(path) == DEFAULT_MODEL and not os.path.exists(path):
        return smollm2_gguf()
    return path


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory or GGUF file, without reading any weights."""
    path = resolve_model_path(path)
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return ModelConfig.from_hf_dict(hf_config_dict(open_gguf(gguf_file), gguf_file))
    if not os.path.isfile(os.path.join(os.fspath(path), "config.json")):
        raise FileNotFoundError(f"{os.fspath(path)} is neither a .gguf file nor a checkpoint directory with "
                                "config.json")
    return ModelConfig.from_pretrained(path)


def pretrained_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint directory or GGUF file, or None when it has none or transformers is
    missing (what `LanguageModel.from_pretrained` attaches)."""
    if not _transformers_available():
        return None
    path = resolve_model_path(path)
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return load_tokenizer(path, gguf_file) if "tokenizer.ggml.model" in open_gguf(gguf_file).fields else None
    has_tokenizer = any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)
    return load_tokenizer(path) if has_tokenizer else None


def _transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


@dataclasses.dataclass
class LanguageModel:
    config: ModelConfig
    params: nnx.State
    tokenizer: Any = None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None, tokenizer: Any = True
    ) -> LanguageModel:
        """Load an HF checkpoint directory, a .gguf file, a directory holding exactly one .gguf file, or
        ``"smollm2"``: the SmolLM2-135M-Instruct GGUF that `make setup` installs (`kvzip_jax.smollm2`).

        GGUF weights are dequantized to float32 (then cast to dtype if given). A GGUF tokenizer is built from the
        file's metadata by transformers; without transformers installed the model loads with no tokenizer.
        ``tokenizer``: True loads the checkpoint's own (`pretrained_tokenizer`), False none, anything else is
        used as the tokenizer (one already loaded, e.g. to check inputs before the weights are read).
        """
        path = resolve_model_path(path)
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            loaded = load_gguf(gguf_file, dtype=dtype, mesh=mesh)
            config, params = loaded.config, loaded.params
            if tokenizer is True:  # not `pretrained_tokenizer`: it would parse the file's metadata again (seconds)
                tokenizer = load_tokenizer(path, gguf_file) if loaded.has_tokenizer and _transformers_available() \
                    else None
        else:
            config, params = load_params(path, dtype=dtype, mesh=mesh)
        if tokenizer is True:
            tokenizer = pretrained_tokenizer(path)
        return cls(config, params, None if tokenizer is False else tokenizer)

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
        if isinstance(prompts, str):
            raise TypeError("generate takes a list of prompts: generate([prompt]) (or stream(prompt) for one)")
        if not len(prompts):
            raise ValueError("no prompts given: generate needs at least one prompt")
        texts = isinstance(prompts[0], str)
        ids = [self.encode(p, chat=chat) for p in prompts] if texts else [list(p) for p in prompts]
        empty = [i for i, p in enumerate(ids) if not p]
        if empty:
            raise ValueError(f"prompt #{empty[0] + 1} is empty (0 tokens)")
        result = generate(
            self.params, self.config, ids, max_new_tokens=max_new_tokens, sampling=sampling,
            stop_token_ids=self._stops(stop_token_ids), chunk_size=chunk_size, seed=seed,
        )
        if not texts:
            return result.tokens
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        chat: bool = False,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        stop_token_ids: Sequence[int] | None = None,
        seed: int = 0,
    ) -> Iterator[str] | Iterator[int]:
        """One prompt, its answer as it is generated: text pieces (with a tokenizer; they join to what
        `generate` returns) or token ids (for token-id prompts). The same tokens as `generate`."""
        text = isinstance(prompt, str)
        if not text and (not len(prompt) or isinstance(prompt[0], (list, tuple))):
            raise ValueError("stream takes one prompt (a str or a list of token ids); use generate for a batch")
        ids = self.encode(prompt, chat=chat) if text else [int(t) for t in prompt]
        steps = generate(self.params, self.config, [ids], max_new_tokens=max_new_tokens, sampling=sampling,
                         stop_token_ids=self._stops(stop_token_ids), seed=seed, stream=True)
        tokens = (row[0] for row in steps if row[0] is not None)
        return stream_text(self.tokenizer, tokens) if text else tokens

    def _stops(self, stop_token_ids: Sequence[int] | None) -> Sequence[int] | None:
        if stop_token_ids is None and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return sorted({*self.config.eos_token_ids, self.tokenizer.eos_token_id})
        return stop_token_ids

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))
