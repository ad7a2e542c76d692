"""GGUF checkpoints (llama.cpp's single-file format) in: metadata -> our ModelConfig, tensors -> our params.

Read with the `gguf` package's numpy-only `GGUFReader` (memory-mapped, no torch). Every tensor is dequantized to
float32 with `gguf.quants.dequantize` (the same routine transformers uses, so both see identical weights), renamed
from llama.cpp's names to the HF names `hf_io` consumes, with llama.cpp's Q/K row permutation undone, and handed
to `hf_io.params_from_tensors` (dtype casting, mesh placement) like a safetensors checkpoint.

Only the `llama` architecture is mapped (Llama, SmolLM, Mistral-style files). The tokenizer is not read here:
`lm.LanguageModel` builds it through transformers' GGUF conversion, which is optional.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from jax.sharding import Mesh

from kvzip_jax.config import ModelConfig, UnsupportedModelError
from kvzip_jax.models.hf_io import CheckpointError, params_from_tensors
from kvzip_jax.sharding import DEFAULT_RULES

GGUF_SUFFIX = ".gguf"
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
Q = GGMLQuantizationType
# The types gguf-py can dequantize that hold plain weights (not the IQ* lattice codes, untested here).
SUPPORTED_QUANT_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)
# llama.cpp per-layer name -> HF name after 'model.layers.{i}.'
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def find_gguf(path: str | os.PathLike) -> str | None:
    """The GGUF file `path` names: itself if it ends in .gguf, the one .gguf in a directory without config.json,
    else None (an HF checkpoint directory)."""
    path = os.fspath(path)
    if path.endswith(GGUF_SUFFIX) and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(GGUF_SUFFIX))
    if len(found) > 1:
        raise CheckpointError(
            f"{path} holds {len(found)} GGUF files ({', '.join(found)}); pass the path of the one to load"
        )
    return os.path.join(path, found[0]) if found else None


def open_gguf(file: str | os.PathLike) -> GGUFReader:
    """GGUFReader, with whatever it raises on a truncated or corrupt file turned into a CheckpointError. The last
    file read is kept (keyed by its path, size and modification time): parsing a real model's metadata (its whole
    vocabulary) takes seconds, and loading a model reads the config, the tokenizer check and the tensors."""
    file = os.fspath(file)
    try:
        stat = os.stat(file)
        return _read_gguf(os.path.realpath(file), stat.st_size, stat.st_mtime_ns)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        size = os.path.getsize(file) if os.path.exists(file) else 0
        raise CheckpointError(f"cannot read GGUF file {file} ({size} bytes; truncated or corrupt?): {e}") from e


@functools.lru_cache(maxsize=1)
def _read_gguf(file: str, _size: int, _mtime_ns: int) -> GGUFReader:
    return GGUFReader(file)


def _fields(reader: GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _f32(value) -> float:
    # GGUF stores floats as float32: 1e-5 arrives as 9.9999997e-06; keep the value the writer meant.
    return float(str(np.float32(value)))


def hf_config_dict(reader: GGUFReader, file: str = "") -> dict[str, Any]:
    """An HF-style config.json dict for the model described by the GGUF metadata (fed to ModelConfig)."""
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} in {file} is not supported; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        # Llama 3.1-style rope: llama.cpp bakes the llama3 scaling into per-frequency factors and drops the
        # parameters our config (and transformers' GGUF loader) would need to reproduce it.
        raise UnsupportedModelError(f"{file} carries rope_freqs.weight (llama3 rope scaling); not supported yet")

    def need(key: str):
        full = f"{arch}.{key}"
        if full not in meta:
            raise CheckpointError(f"GGUF file {file} lacks metadata key {full}")
        return meta[full]

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // heads
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    if not vocab:
        raise CheckpointError(f"GGUF file {file} has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10_000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = _rope_scaling(meta, arch, file)
    if scaling:
        hf["rope_scaling"] = scaling
    return hf


def _rope_scaling(meta: dict[str, Any], arch: str, file: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        out: dict[str, Any] = {"rope_type": "yarn", "factor": _f32(factor)}
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta.get(f"{arch}.rope.scaling.{gguf_key}"):
                out[hf_key] = _f32(meta[f"{arch}.rope.scaling.{gguf_key}"])
        return out
    raise UnsupportedModelError(
        f"GGUF rope scaling type {kind!r} in {file} is not supported; supported: none, linear, yarn"
    )


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def _expected_shape(gguf_name: str, c: ModelConfig) -> tuple[int, ...]:
    """HF layout ([out, in]) implied by the metadata, to check every tensor before it is dequantized."""
    kind = gguf_name.split(".")[-2]
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "token_embd": (c.vocab_size, c.hidden_size),
        "output": (c.vocab_size, c.hidden_size),
        "attn_q": (q, c.hidden_size),
        "attn_k": (kv, c.hidden_size),
        "attn_v": (kv, c.hidden_size),
        "attn_output": (c.hidden_size, q),
        "ffn_gate": (c.intermediate_size, c.hidden_size),
        "ffn_up": (c.intermediate_size, c.hidden_size),
        "ffn_down": (c.hidden_size, c.intermediate_size),
    }.get(kind, (c.hidden_size,))


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time Q/K row order: per head it stores the rotary pairs interleaved (x0, x_{d/2},
    x1, ...) for its rope kernel; HF keeps each head's two halves apart."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFTensors:
    """The hf_io tensor-index interface over a GGUF file: HF names in, dequantized float32 HF-layout arrays out."""

    def __init__(self, file: str, reader: GGUFReader, config: ModelConfig):
        self.path = file
        self.config = config
        self._tensors = {}
        layers = config.num_layers
        for t in reader.tensors:
            hf = _hf_name(t.name)
            if hf is None:
                raise CheckpointError(f"GGUF file {file} has tensor {t.name}, which the llama mapping does not know")
            if hf.startswith("model.layers.") and int(t.name.split(".")[1]) >= layers:
                raise CheckpointError(f"GGUF tensor {t.name} is beyond the {layers} layers of block_count")
            if t.tensor_type not in SUPPORTED_QUANT_TYPES:
                raise CheckpointError(
                    f"GGUF tensor {t.name} in {file} has quant type {t.tensor_type.name}, which is not supported;"
                    f" supported: {', '.join(q.name for q in SUPPORTED_QUANT_TYPES)}"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
            expected = _expected_shape(t.name, config)
            if shape != expected:
                raise CheckpointError(
                    f"GGUF tensor {t.name} in {file} has shape {shape} but the metadata implies {expected}"
                )
            self._tensors[hf] = t
        self.weight_map = dict.fromkeys(self._tensors, file)

    def resolve(self, name: str, prefixes: tuple[str, ...]) -> str | None:
        return next((p + name for p in prefixes if p + name in self._tensors), None)

    def get(self, full_name: str) -> np.ndarray:
        t = self._tensors[full_name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(f"cannot dequantize GGUF tensor {t.name} ({t.tensor_type.name}): {e}") from e
        w = w.reshape(_expected_shape(t.name, self.config))
        if ".self_attn.q_proj." in full_name:
            w = _unpermute(w, self.config.num_heads)
        elif ".self_attn.k_proj." in full_name:
            w = _unpermute(w, self.config.num_kv_heads)
        return w


class GGUFModel(NamedTuple):
    file: str
    config: ModelConfig
    params: Any
    has_tokenizer: bool  # the metadata holds a vocabulary transformers can turn into a tokenizer


def load_gguf(path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None, rules=DEFAULT_RULES) -> GGUFModel:
    """Read a .gguf file (or the directory holding exactly one) into our config and params.

    dtype: None keeps the dequantized float32; otherwise every tensor is cast.
    """
    file = find_gguf(path)
    if file is None:
        raise CheckpointError(f"no .gguf file at {os.fspath(path)}")
    reader = open_gguf(file)
    config = ModelConfig.from_hf_dict(hf_config_dict(reader, file))
    params = params_from_tensors(_GGUFTensors(file, reader, config), config, dtype=dtype, mesh=mesh, rules=rules)
    return GGUFModel(file, config, params, "tokenizer.ggml.model" in reader.fields)
