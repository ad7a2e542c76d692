"""Bad input: each a clear error naming the offending value and the limit, never a silent truncation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from kvzip_jax.generate import SamplingConfig, generate, prefill
from kvzip_jax.models import CheckpointError, load_params, save_params


@pytest.fixture(scope="module")
def llama(loaded_factory):
    _, path, config, params = loaded_factory("llama")
    return path, config, params


def _copy_checkpoint(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path: str, **changes) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        hf = json.load(f)
    hf.update(changes)
    with open(file, "w") as f:
        json.dump(hf, f)


# --------------------------------------------------------------------------- checkpoints
def test_unsupported_architecture_in_checkpoint(llama, tmp_path):
    path = _copy_checkpoint(llama[0], tmp_path / "ckpt")
    _edit_config(path, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM") as err:
        load_params(path)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


def test_missing_shard(llama, tmp_path):
    _, config, params = llama
    save_params(tmp_path, config, params, max_shard_bytes=20_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2
    os.remove(tmp_path / shards[1])
    with pytest.raises(CheckpointError, match=re.escape(shards[1]) + ".*missing"):
        load_params(tmp_path)


def test_no_weights_at_all(llama, tmp_path):
    path = _copy_checkpoint(llama[0], tmp_path / "ckpt")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape("no model.safetensors or model.safetensors.index.json")):
        load_params(path)


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:-8], id="truncated-by-8-bytes"),
        pytest.param(lambda b: b[:8] + b"\xff" * 64 + b[72:], id="header-overwritten"),
        pytest.param(lambda b: b"\xff" * 8 + b[8:], id="header-length-overwritten"),
    ],
)
def test_corrupt_safetensors(corrupt, llama, tmp_path):
    path = _copy_checkpoint(llama[0], tmp_path / "ckpt")
    file = os.path.join(path, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(corrupt(data))
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*model\.safetensors"):
        load_params(path)


def test_corrupt_shard_of_an_index(llama, tmp_path):
    _, config, params = llama
    save_params(tmp_path, config, params, max_shard_bytes=20_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    with open(tmp_path / shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=re.escape(shard)):
        load_params(tmp_path)


@pytest.mark.parametrize(
    "changes,pattern",
    [
        (dict(intermediate_size=96),
         r"has shape \(2, (64, 128|128, 64)\) but the config expects \(2, (64, 96|96, 64)\)"),
        (dict(hidden_size=48), r"has shape \([^)]*64[^)]*\) but the config expects \([^)]*48[^)]*\)"),
        (dict(vocab_size=100), r"embed has shape \(128, 64\) but the config expects \(100, 64\)"),
    ],
    ids=["intermediate", "hidden", "vocab"],
)
def test_weight_shapes_that_do_not_match_config(changes, pattern, llama, tmp_path):
    path = _copy_checkpoint(llama[0], tmp_path / "ckpt")
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=pattern):
        load_params(path)


def test_layer_count_and_missing_tensors_do_not_match_config(llama, tmp_path):
    path = _copy_checkpoint(llama[0], tmp_path / "ckpt")
    _edit_config(path, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"lacks tensor layers\.2\."):
        load_params(path)
    _edit_config(path, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"tensors the config does not use, e\.g\. model\.layers\.1\."):
        load_params(path)
    _edit_config(path, num_hidden_layers=2, attention_bias=True)
    with pytest.raises(CheckpointError, match=r"lacks tensor layers\.0\.self_attn\.q_proj\.bias"):
        load_params(path)


# --------------------------------------------------------------------------- token ids
def test_token_id_beyond_vocab(llama):
    _, config, params = llama
    assert config.vocab_size == 128
    with pytest.raises(ValueError, match="token id 128 is out of range: the vocabulary size is 128"):
        generate(params, config, [[1, 2, 3], [5, 128]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token id 1000 is out of range: the vocabulary size is 128"):
        prefill(params, config, [[1000, 2]], DenseKVCache.zeros(config, 1, 8))
    with pytest.raises(ValueError, match="token id -1 is negative"):
        generate(params, config, [[1, -1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="stop token id 500 is out of range: the vocabulary size is 128"):
        generate(params, config, [[1, 2]], max_new_tokens=2, stop_token_ids=[3, 500])


# --------------------------------------------------------------------------- capacity and positions
def test_prompt_plus_new_tokens_beyond_cache_capacity(llama):
    _, config, params = llama
    prompt = list(range(10))
    with pytest.raises(ValueError, match=r"10 tokens \+ max_new_tokens=20 needs 29 cache slots but the cache "
                                         r"capacity is 16"):
        generate(params, config, [prompt], max_new_tokens=20, capacity=16)
    with pytest.raises(ValueError, match="needs 10 cache slots but the cache capacity is 8"):
        prefill(params, config, [prompt], DenseKVCache.zeros(config, 1, 8))
    # A cache that already holds 6 tokens has room for only 4 more of its 10 slots.
    cache = DenseKVCache.zeros(config, 1, 10)
    cache = DenseKVCache(k=cache.k, v=cache.v, length=jnp.array([6], jnp.int32))
    with pytest.raises(ValueError, match="needs 11 cache slots but the cache capacity is 10"):
        prefill(params, config, [[1, 2, 3, 4, 5]], cache)
    with pytest.raises(ValueError, match="2 prompts for a cache of batch size 1"):
        prefill(params, config, [[1], [2]], DenseKVCache.zeros(config, 1, 8))


def test_positions_beyond_max_position_embeddings(llama):
    _, config, params = llama
    limit = config.max_position_embeddings
    assert limit == 2048
    with pytest.raises(ValueError, match=rf"position 2108 is beyond max_position_embeddings \({limit}\)"):
        generate(params, config, [list(range(10))], max_new_tokens=2100)
    cache = DenseKVCache.zeros(config, 1, 2100)
    cache = DenseKVCache(k=cache.k, v=cache.v, length=jnp.array([2040], jnp.int32))
    with pytest.raises(ValueError, match=rf"position 2049 is beyond max_position_embeddings \({limit}\)"):
        prefill(params, config, [list(range(10))], cache)


# --------------------------------------------------------------------------- prompts and sampling
def test_empty_prompts(llama):
    _, config, params = llama
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(params, config, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="no prompts given"):
        generate(params, config, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        prefill(params, config, [[]], DenseKVCache.zeros(config, 1, 4))


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(temperature=-0.5), r"temperature must be >= 0, got -0\.5"),
        (dict(top_k=-3), r"top_k must be >= 0, got -3"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1\.5"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    ],
)
def test_bad_sampling_params(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingConfig(**kwargs)


def test_bad_max_new_tokens(llama):
    _, config, params = llama
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(params, config, [[1, 2]], max_new_tokens=0)


def test_bad_cache_and_mesh_sizes(llama):
    _, config, _ = llama
    from kvzip_jax.sharding import make_mesh

    with pytest.raises(ValueError, match=r"batch_size \(0\) and capacity \(4\) must be >= 1"):
        DenseKVCache.zeros(config, 0, 4)
    with pytest.raises(ValueError, match=r"batch_size \(1\) and capacity \(0\) must be >= 1"):
        DenseKVCache.zeros(config, 1, 0)
    # Caches are values (pytrees passed through jit and donated): a field cannot be reassigned in place.
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'length'"):
        DenseKVCache.zeros(config, 1, 4).length = None
    with pytest.raises(ValueError, match="mesh data=4 x model=4 needs 16 devices; 8 available"):
        make_mesh(data=4, model=4)
    assert np.asarray(DenseKVCache.zeros(config, 1, 4).length).tolist() == [0]
