"""Hugging Face checkpoints without torch: config.json + model.safetensors (or a sharded index), read per tensor
with `safe_open(framework="numpy")` (bf16 works there, unlike `safetensors.numpy.load_file`), placed straight onto
their mesh shardings; and the same layout written back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from kvzip_jax.config import ModelConfig
from kvzip_jax.models.decoder import abstract_params
from kvzip_jax.models.safetensors_index import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    TensorIndex,
    place_tensors,
)
from kvzip_jax.sharding import DEFAULT_RULES, PARAM_LOGICAL_AXES, path_str

# Tensors some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Prefixes seen on disk for the text decoder (multimodal wrappers save it under language_model).
PREFIXES = ("model.", "language_model.model.", "model.language_model.")
LM_HEAD_PREFIXES = ("", "language_model.")


@dataclasses.dataclass(frozen=True)
class _Rule:
    ours: str  # our param path
    hf: str  # HF name after the prefix; '{i}' marks per-layer tensors
    transpose: bool = False


def _rules(config: ModelConfig) -> list[_Rule]:
    attn = "layers/attn"
    rules = [_Rule("embed", "embed_tokens.weight"), _Rule("final_norm/scale", "norm.weight")]
    for name in ("q", "k", "v", "o"):
        rules.append(_Rule(f"{attn}/{name}_proj/kernel", f"layers.{{i}}.self_attn.{name}_proj.weight", True))
    for name in ("q", "k", "v"):
        if config.qkv_bias:
            rules.append(_Rule(f"{attn}/{name}_proj/bias", f"layers.{{i}}.self_attn.{name}_proj.bias"))
    if config.o_bias:
        rules.append(_Rule(f"{attn}/o_proj/bias", "layers.{i}.self_attn.o_proj.bias"))
    if config.qk_norm:
        rules.append(_Rule(f"{attn}/q_norm/scale", "layers.{i}.self_attn.q_norm.weight"))
        rules.append(_Rule(f"{attn}/k_norm/scale", "layers.{i}.self_attn.k_norm.weight"))
    for name in ("gate", "up", "down"):
        rules.append(_Rule(f"layers/mlp/{name}_proj/kernel", f"layers.{{i}}.mlp.{name}_proj.weight", True))
        if config.mlp_bias:
            rules.append(_Rule(f"layers/mlp/{name}_proj/bias", f"layers.{{i}}.mlp.{name}_proj.bias"))
    rules.append(_Rule("layers/attn_in_norm/scale", "layers.{i}.input_layernorm.weight"))
    if config.gemma_norms:
        rules.append(_Rule("layers/attn_out_norm/scale", "layers.{i}.post_attention_layernorm.weight"))
        rules.append(_Rule("layers/mlp_in_norm/scale", "layers.{i}.pre_feedforward_layernorm.weight"))
        rules.append(_Rule("layers/mlp_out_norm/scale", "layers.{i}.post_feedforward_layernorm.weight"))
    else:
        rules.append(_Rule("layers/mlp_in_norm/scale", "layers.{i}.post_attention_layernorm.weight"))
    return rules


def _lm_head_rule() -> _Rule:
    return _Rule("lm_head", "lm_head.weight", True)


def _iter_tensors(config: ModelConfig, index: TensorIndex) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    rules = _rules(config)
    if not config.tie_word_embeddings:
        rules.append(_lm_head_rule())
    for rule in rules:
        names = [rule.hf.format(i=i) for i in range(config.num_layers)] if "{i}" in rule.hf else [rule.hf]
        prefixes = LM_HEAD_PREFIXES if rule.ours == "lm_head" else PREFIXES
        resolved = [index.resolve(n, prefixes) for n in names]
        missing = [n for n, r in zip(names, resolved, strict=True) if r is None]
        if missing:
            raise CheckpointError(
                f"checkpoint {index.path} lacks tensor {missing[0]} needed by the config"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        arrays = [index.get(r) for r in resolved]
        if rule.transpose:
            arrays = [a.T for a in arrays]
        array = np.stack(arrays) if "{i}" in rule.hf else arrays[0]
        yield rule.ours, array, resolved


def load_params(
    path: str | os.PathLike,
    config: ModelConfig | None = None,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
) -> tuple[ModelConfig, nnx.State]:
    """Read an HF checkpoint directory into our param State, each tensor placed on its mesh sharding.

    dtype: None keeps the checkpoint's dtype (bf16 stays bf16); otherwise every tensor is cast.
    """
    path = os.fspath(path)
    config = config or ModelConfig.from_pretrained(path)
    return config, params_from_tensors(TensorIndex(path), config, dtype=dtype, mesh=mesh, rules=rules)


def params_from_tensors(
    index, config: ModelConfig, *, dtype=None, mesh: Mesh | None = None, rules=DEFAULT_RULES
) -> nnx.State:
    """HF-named tensors -> our param State: the one path every loader (safetensors, GGUF) goes through.

    index: anything with `path` (named in errors), `weight_map` (every HF tensor name it holds), `resolve(name,
    prefixes)` and `get(full_name) -> np.ndarray`, like `TensorIndex`.
    """
    path = index.path
    loaded: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for ours, array, names in _iter_tensors(config, index):
        loaded[ours] = array
        used.update(names)
    unexpected = [
        n for n in index.weight_map if n not in used and not n.endswith(IGNORED_SUFFIXES)
        and not (config.tie_word_embeddings and n.endswith("lm_head.weight"))
    ]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} has {len(unexpected)} tensors the config does not use, e.g. {unexpected[0]}"
            " (is config.json the one saved with these weights?)"
        )
    target_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(loaded["embed"].dtype)
    abstract = abstract_params(config, target_dtype)

    return place_tensors(loaded, abstract, mesh=mesh, axes=PARAM_LOGICAL_AXES, mesh_rules=rules)


def save_params(
    path: str | os.PathLike, config: ModelConfig, params: nnx.State, *, max_shard_bytes: int | None = None
) -> None:
    """Write config.json + safetensors in the HF layout (sharded with an index when over max_shard_bytes)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    flat = {path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    rules = _rules(config) + ([] if config.tie_word_embeddings else [_lm_head_rule()])
    tensors: dict[str, np.ndarray] = {}
    for rule in rules:
        array = flat[rule.ours]
        if "{i}" in rule.hf:
            for i in range(config.num_layers):
                tensors["model." + rule.hf.format(i=i)] = _to_torch_layout(array[i], rule.transpose)
        else:
            prefix = "" if rule.ours == "lm_head" else "model."
            tensors[prefix + rule.hf] = _to_torch_layout(array, rule.transpose)
    with open(os.path.join(path, "config.json"), "w") as f:
        hf = config.to_hf_dict()
        hf["torch_dtype"] = hf["dtype"] = str(next(iter(tensors.values())).dtype)
        json.dump(hf, f, indent=2)
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _to_torch_layout(array: np.ndarray, transpose: bool) -> np.ndarray:
    return np.ascontiguousarray(array.T if transpose else array)


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
    if not max_bytes:
        return [tensors]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards
