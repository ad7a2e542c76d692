"""Orbax persistence of compressed contexts (issue 3 item 7): identical arrays, identical answers, shape checks."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.config import FULL, SLIDING, ModelConfig, RopeConfig
from kvzip_jax.kvzip import compressor
from kvzip_jax.kvzip.prompts import KVzipPrompt
from kvzip_jax.models import abstract_params
from kvzip_jax.store import (
    CACHE_FIELDS,
    FORMAT_VERSION,
    METADATA_FILE,
    config_from_json,
    config_to_json,
    load_compressed,
    read_metadata,
    save_compressed,
)

PROMPT = KVzipPrompt(prefix_ids=(1, 2, 3, 4), postfix_ids=(5, 6), first_repeat_ids=(7, 8, 9), later_repeat_ids=(10, 11))
LLAMA = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                    rope=((FULL, RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=64)),),
                    eos_token_ids=(2, 3), bos_token_id=1)
GEMMA = ModelConfig(
    family="gemma3", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=256,
    rope=((FULL, RopeConfig(theta=1_000_000.0)), (SLIDING, RopeConfig(theta=10_000.0))),
    layer_types=(SLIDING, FULL, SLIDING, FULL), sliding_window=8, query_pre_attn_scalar=24, qk_norm=True,
    hidden_act="gelu_pytorch_tanh", final_logit_softcap=30.0,
)
QUESTIONS = ([20, 21, 22, 23, 24], [30, 31, 32])


def random_params(config: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    paths, tree = jax.tree_util.tree_flatten_with_path(abstract_params(config))
    leaves = []
    for path, leaf in paths:
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        base = (0.0 if config.gemma_norms else 1.0) if "scale" in jax.tree_util.keystr(path) else 0.0
        leaves.append(jnp.asarray(base + 0.1 * noise, leaf.dtype))
    return jax.tree_util.tree_unflatten(tree, leaves)


def compress(config, params, ratio=0.3, headroom=16):
    rng = np.random.default_rng(1)
    ctxs = [rng.integers(12, 128, n).tolist() for n in (37, 22)]
    return compressor.compress(params, config, PROMPT, ctxs, ratio=ratio, chunk_size=16, headroom=headroom,
                               progress=False)


@pytest.fixture(scope="module")
def setup():
    """One compression (compiles scoring once); the store is config-agnostic, so llama alone exercises it."""
    params = random_params(LLAMA)
    return LLAMA, params, compress(LLAMA, params)


def cache_arrays(ctx) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(ctx.context_cache, name)) for name in CACHE_FIELDS}


@pytest.mark.parametrize("config", [LLAMA, GEMMA], ids=["llama", "gemma3"])
def test_config_round_trips_exactly(config):
    encoded = json.loads(json.dumps(config_to_json(config)))
    assert "fields" not in encoded  # the HF dict is enough for these configs
    assert config_from_json(encoded) == config


@pytest.mark.parametrize(
    "odd",
    [dataclasses.replace(LLAMA, o_bias=True),  # no llama HF field for it
     dataclasses.replace(GEMMA, attn_logit_softcap=50.0)],  # from_hf_dict drops it for gemma3 (as transformers)
    ids=["llama-o_bias", "gemma3-attn-softcap"],
)
def test_config_falls_back_to_fields_when_hf_is_lossy(odd):
    encoded = json.loads(json.dumps(config_to_json(odd)))
    assert "fields" in encoded
    assert config_from_json(encoded) == odd


def test_round_trip_identical_arrays_and_answers(setup, tmp_path):
    config, params, ctx = setup
    before = cache_arrays(ctx)
    save_compressed(tmp_path / "ctx", ctx, model_fingerprint={"name": "tiny", "n": 1})
    # Saving neither donated nor changed the live cache: it still answers, and its arrays are unchanged.
    assert all(np.array_equal(before[k], v) for k, v in cache_arrays(ctx).items())
    live = ctx.ask(params, QUESTIONS, max_new_tokens=6)

    restored = load_compressed(tmp_path / "ctx", config)
    assert restored.config == config
    for name, value in cache_arrays(restored).items():
        assert value.dtype == before[name].dtype and value.shape == before[name].shape, name
        assert np.array_equal(value, before[name]), name
    np.testing.assert_array_equal(restored.base_lengths, ctx.base_lengths)
    np.testing.assert_array_equal(restored.base_next_position, ctx.base_next_position)
    assert (restored.prompt, restored.headroom, restored.ratio, restored.level) == (
        ctx.prompt, ctx.headroom, ctx.ratio, ctx.level)
    assert restored.report == ctx.report

    again = restored.ask(params, QUESTIONS, max_new_tokens=6)
    assert again.tokens == live.tokens and again.finished == live.finished
    probe = [[40, 41], [42, 43]]
    np.testing.assert_array_equal(restored.logits(params, probe), ctx.logits(params, probe))

    # Without a config the saved one is used; it is equal to the original.
    assert load_compressed(tmp_path / "ctx").config == config
    meta = read_metadata(tmp_path / "ctx")
    assert meta["version"] == FORMAT_VERSION and meta["model_fingerprint"] == {"name": "tiny", "n": 1}


def test_bf16_cache_round_trips_bitwise(setup, tmp_path):
    _, _, ctx = setup
    cache = dataclasses.replace(ctx.cache, k_pages=ctx.cache.k_pages.astype(jnp.bfloat16),
                                v_pages=ctx.cache.v_pages.astype(jnp.bfloat16))
    bf16 = dataclasses.replace(ctx, cache=cache)
    save_compressed(tmp_path / "bf16", bf16)
    restored = load_compressed(tmp_path / "bf16", LLAMA, dtype=jnp.bfloat16)
    for name in CACHE_FIELDS:
        a, b = np.asarray(getattr(bf16.context_cache, name)), np.asarray(getattr(restored.cache, name))
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    with pytest.raises(ValueError, match=r"dtype: saved bfloat16 vs model float32"):
        load_compressed(tmp_path / "bf16", LLAMA, dtype=jnp.float32)


@pytest.mark.parametrize(
    ("field", "value"), [("num_layers", 3), ("num_kv_heads", 1), ("head_dim", 8)]
)
def test_shape_mismatch_names_both_values(setup, tmp_path, field, value):
    config, _, ctx = setup
    save_compressed(tmp_path / "ctx", ctx)
    changes = {field: value}
    if field == "num_layers":
        changes.update(layer_types=(FULL,) * value, sliding_window=None)
    other = dataclasses.replace(config, **changes)
    with pytest.raises(ValueError, match=rf"{field}: saved {getattr(config, field)!r} vs model {value!r}"):
        load_compressed(tmp_path / "ctx", other)


def test_existing_directory_and_bad_paths(setup, tmp_path):
    _, _, ctx = setup
    save_compressed(tmp_path / "ctx", ctx)
    with pytest.raises(FileExistsError, match="already holds"):
        save_compressed(tmp_path / "ctx", ctx)
    save_compressed(tmp_path / "ctx", ctx, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no compressed context directory"):
        load_compressed(tmp_path / "missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=METADATA_FILE):
        load_compressed(tmp_path / "empty")
    with open(tmp_path / "ctx" / METADATA_FILE) as f:
        meta = json.load(f)
    meta["version"] = FORMAT_VERSION + 1
    with open(tmp_path / "ctx" / METADATA_FILE, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="format version"):
        load_compressed(tmp_path / "ctx")
    with pytest.raises(TypeError, match="model_fingerprint must be JSON-serializable: Object of type object"):
        save_compressed(tmp_path / "ctx2", ctx, model_fingerprint={"x": object()})
    assert not os.path.exists(tmp_path / "ctx2")
    # A rejected overwrite leaves the saved context where it was.
    with pytest.raises(TypeError, match="model_fingerprint must be JSON-serializable"):
        save_compressed(tmp_path / "ctx", ctx, model_fingerprint={"x": object()}, overwrite=True)
    assert os.path.exists(tmp_path / "ctx" / METADATA_FILE)
