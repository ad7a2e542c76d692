"""Checkpoint loading (single file, sharded indexes, bf16), saving back to the HF layout, loading onto a mesh."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.models import load_params, save_params
from kvzip_jax.models.hf_io import INDEX_FILE, SINGLE_FILE
from kvzip_jax.sharding import cache_sharding, make_mesh

ATOL = 1e-4
TOKENS = np.random.default_rng(3).integers(0, 128, size=(2, 10))
QWEN2_TIED = dict(tie_word_embeddings=True)  # q/k/v biases, tied head


def _leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].dtype == lb[k].dtype, k
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def test_single_file_and_sharded_indexes_load_the_same(loaded_factory, tmp_path):
    model, path, config, params = loaded_factory("qwen2")
    assert os.path.exists(os.path.join(path, SINGLE_FILE))
    # Our writer, sharded.
    ours = tmp_path / "ours"
    save_params(ours, config, params, max_shard_bytes=20_000)
    with open(ours / INDEX_FILE) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 2
    assert not (ours / SINGLE_FILE).exists()
    _, from_ours = load_params(ours)
    _assert_same_params(params, from_ours)
    # transformers' writer, sharded.
    hf = tmp_path / "hf"
    model.save_pretrained(hf, max_shard_size="20KB")
    with open(hf / INDEX_FILE) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    _, from_hf = load_params(hf)
    _assert_same_params(params, from_hf)


def test_bf16_checkpoint_stays_bf16(hf_model_factory, tmp_path):
    import torch

    model, _ = hf_model_factory("llama")
    bf16 = type(model)(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    bf16.save_pretrained(tmp_path)
    config, params = load_params(tmp_path, dtype=None)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    # Values are the bf16 tensors, bit for bit (q_proj of layer 1, transposed to [in, out]).
    ref = bf16.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q_proj"]["kernel"][...][1], np.float32), ref)
    # Asking for fp32 casts every tensor.
    _, as_f32 = load_params(tmp_path, dtype=jnp.float32)
    assert {x.dtype for x in jax.tree_util.tree_leaves(as_f32)} == {jnp.dtype(jnp.float32)}
    # And bf16 params save back as bf16.
    save_params(tmp_path / "again", config, params)
    _, again = load_params(tmp_path / "again")
    _assert_same_params(params, again)


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", dict(tie_word_embeddings=False, attention_bias=True)),
        ("qwen2", QWEN2_TIED),
        ("qwen3", {}),
        ("gemma3", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24)),
    ],
    ids=["llama-untied-bias", "qwen2-tied", "qwen3", "gemma3"],
)
def test_save_params_round_trips_through_transformers(family, overrides, loaded_factory, hf_logits_fn, tmp_path):
    import transformers

    model, _, config, params = loaded_factory(family, **overrides)
    save_params(tmp_path, config, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    np.testing.assert_array_equal(hf_logits_fn(reloaded, TOKENS), hf_logits_fn(model, TOKENS))
    # And ours reads it back to the identical params and config.
    config2, params2 = load_params(tmp_path)
    assert config2 == config
    _assert_same_params(params, params2)


@pytest.mark.parametrize("data,model_axis", [(1, 8), (2, 4)])
def test_mesh_load_gives_single_device_logits(data, model_axis, loaded_factory, ours_logits_fn):
    assert len(jax.devices()) >= 8, "conftest must force 8 host devices"
    overrides = dict(tie_word_embeddings=False, attention_bias=True)
    _, path, config, params = loaded_factory("llama", **overrides)
    mesh = make_mesh(data=data, model=model_axis)
    _, sharded = load_params(path, dtype=jnp.float32, mesh=mesh)

    q = sharded["layers"]["attn"]["q_proj"]["kernel"][...]
    gate = sharded["layers"]["mlp"]["gate_proj"]["kernel"][...]
    down = sharded["layers"]["mlp"]["down_proj"]["kernel"][...]
    embed = sharded["embed"][...]
    assert q.sharding.spec == P(None, None, "model")
    assert gate.sharding.spec == P(None, None, "model")
    assert down.sharding.spec == P(None, "model", None)
    assert embed.sharding.spec == P("model", None)
    assert len(q.sharding.device_set) == data * model_axis
    # Really split: each device holds 1/model of the q kernel.
    assert q.addressable_shards[0].data.shape == (2, 64, 64 // model_axis)

    tokens = jnp.asarray(TOKENS, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1], dtype=jnp.int32), TOKENS.shape)
    cache = DenseKVCache.zeros(config, 2, TOKENS.shape[1])
    cache = jax.device_put(cache, cache_sharding(cache, mesh))
    from kvzip_jax.models import forward

    logits, _ = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, config=config))(sharded, tokens, positions, cache)
    single = ours_logits_fn(params, config, TOKENS)
    np.testing.assert_allclose(np.asarray(logits), single, atol=ATOL, rtol=0)
