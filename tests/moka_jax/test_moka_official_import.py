"""Import of official PyTorch MokA adapter state dicts (AVT `lora_A0/1/2` + `lora_B0`; VT `lora_A.text` /
`lora_A.image` / `lora_B.text`), on synthetic state dicts with the official names and torch shapes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_moka_official_reference import avt_layout, avt_official_delta, vt_layout, vt_official_delta

from kvzip_jax.config import ModelConfig
from kvzip_jax.models import init_params
from kvzip_jax.models.llava import AUDIO, IMAGE, TEXT
from kvzip_jax.sharding import path_str
from moka_jax.adapter import adapter_delta
from moka_jax.config import MokAConfig
from moka_jax.context import make_context
from moka_jax.model import apply_moka
from moka_jax.official import MODULES, load_official_adapter, official_config, official_key

CONFIG = ModelConfig.from_hf_dict(dict(
    model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256))
RANK = 4
TOL = 1e-5


def _dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each official module."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}


def synthetic_state_dict(layout: str, config: ModelConfig = CONFIG, seed: int = 0, rank: int = RANK) -> dict:
    """Random adapter tensors under the official keys and torch shapes (A (r, in), B (out, r)), plus a few non-adapter
    keys a real file holds (VT saves the whole model; its dead lora_B.image is there too)."""
    rng = np.random.default_rng(seed)
    names = {"avt": ["lora_A0", "lora_A1", "lora_A2", "lora_B0"],
             "vt": ["lora_A.text", "lora_A.image", "lora_B.text", "lora_B.image"]}[layout]
    out = {}
    for layer in range(config.num_layers):
        for module, (d_in, d_out) in _dims(config).items():
            for name in names:
                shape = (rank, d_in) if "_A" in name else (d_out, rank)
                out[official_key(layout, layer, module, name)] = rng.normal(0.0, 0.1, shape).astype(np.float32)
            if layout == "vt":
                out[official_key(layout, layer, module, "base_layer")] = np.zeros((d_out, d_in), np.float32)
    if layout == "vt":
        out["base_model.model.model.multi_modal_projector.proj.weight"] = np.zeros((8, 8), np.float32)
        out["base_model.model.lm_head.weight"] = np.zeros((config.vocab_size, config.hidden_size), np.float32)
    return out


# The loader reads only the params' structure, shapes and dtypes and replaces the adapter leaves, so the tests run it
# on the abstract result of init_params + apply_moka (no XLA compile of the random init: seconds per shape here).
@functools.cache
def _base_params():
    return jax.eval_shape(lambda: init_params(CONFIG))


@functools.cache
def _adapted(moka: MokAConfig):
    return jax.eval_shape(lambda params: apply_moka(params, CONFIG, moka), _base_params())


def _leaves(params) -> dict[str, object]:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}


def _flat(params) -> dict[str, np.ndarray]:
    """The adapter leaves as numpy arrays."""
    return {p: np.asarray(x) for p, x in _leaves(params).items() if p.endswith(("/lora_a", "/lora_b"))}


_delta = jax.jit(adapter_delta, static_argnames=("config", "salt"))


def test_official_keys_and_configs():
    assert official_key("avt", 3, "self_attn.q_proj", "lora_A0") == (
        "base_model.model.model.layers.3.self_attn.q_proj.lora_A0.weight")
    assert official_key("vt", 0, "mlp.down_proj", "lora_B.text") == (
        "base_model.model.model.language_model.layers.0.mlp.down_proj.lora_B.text.weight")
    avt, vt = official_config("avt"), official_config("vt")
    assert avt.modalities == ("text", "image", "audio") and vt.modalities == ("text", "image")
    assert (avt.cross_attn_weight, avt.scale_before_attention) == (1.0, True)
    assert (vt.cross_attn_weight, vt.scale_before_attention) == (0.05, False)
    for c in (avt, vt):
        assert (c.rank, c.alpha, c.dropout, c.method, c.attn_scale) == (4, 16.0, 0.05, "moka", "sqrt_rank")
    assert official_config("avt", attn_scale="sqrt_num_keys").attn_scale == "sqrt_num_keys"
    with pytest.raises(ValueError, match="layout"):
        official_config("av")


@pytest.mark.parametrize("layout", ["avt", "vt"])
def test_every_tensor_lands_transposed(layout):
    moka = official_config(layout)
    state = synthetic_state_dict(layout)
    params = load_official_adapter(_adapted(moka), state, CONFIG, moka, layout)
    flat = _flat(params)
    names = {"avt": {"text": "lora_A0", "image": "lora_A1", "audio": "lora_A2"},
             "vt": {"text": "lora_A.text", "image": "lora_A.image"}}[layout]
    b_name = {"avt": "lora_B0", "vt": "lora_B.text"}[layout]
    for module, ours in MODULES.items():
        a, b = flat[f"layers/{ours}/lora_a"], flat[f"layers/{ours}/lora_b"]
        for layer in range(CONFIG.num_layers):
            for slot, modality in enumerate(moka.modalities):
                np.testing.assert_array_equal(a[layer, slot], state[official_key(layout, layer, module,
                                                                                  names[modality])].T)
            np.testing.assert_array_equal(b[layer, 0], state[official_key(layout, layer, module, b_name)].T)
    # Every adapter leaf is replaced, with its dtype; every other leaf is passed through as is.
    before, after = _leaves(_adapted(moka)), _leaves(params)
    assert before.keys() == after.keys()
    for path, leaf in before.items():
        if path.endswith(("/lora_a", "/lora_b")):
            assert (after[path].shape, after[path].dtype) == (leaf.shape, leaf.dtype)
        else:
            assert after[path] is leaf


def test_concrete_params_keep_their_placement():
    moka = official_config("avt")
    concrete = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), _adapted(moka))
    state = synthetic_state_dict("avt", seed=8)
    loaded = _leaves(load_official_adapter(concrete, state, CONFIG, moka, "avt"))
    for path, leaf in _leaves(concrete).items():
        assert isinstance(loaded[path], jax.Array)
        assert loaded[path].sharding == leaf.sharding
    want = state[official_key("avt", 0, "self_attn.o_proj", "lora_B0")].T
    np.testing.assert_array_equal(np.asarray(loaded["layers/attn/o_proj/lora_b"][0, 0]), want)


def test_avt_loaded_linear_matches_official_semantics():
    """The loaded adapter of layer 1's down_proj gives the official AVT term computed from the torch weights; also
    with our modalities in another order than A0/A1/A2."""
    state = synthetic_state_dict("avt", seed=1)
    ids, question = avt_layout()
    module, layer = "mlp.down_proj", 1
    d_in = _dims(CONFIG)[module][0]
    x = np.random.default_rng(2).normal(size=(*ids.shape, d_in))
    w = {n: state[official_key("avt", layer, module, n)] for n in ("lora_A0", "lora_A1", "lora_A2", "lora_B0")}
    for scale in ("sqrt_rank", "sqrt_num_keys"):
        want = avt_official_delta(x, w["lora_A0"], w["lora_A1"], w["lora_A2"], w["lora_B0"], ids == TEXT, ids == IMAGE,
                                  ids == AUDIO, question, scale=scale)
        for modalities in (("text", "image", "audio"), ("audio", "image", "text")):
            moka = official_config("avt", attn_scale=scale, modalities=modalities)
            params = load_official_adapter(_adapted(moka), state, CONFIG, moka, "avt")
            a = _leaves(params)["layers/mlp/down_proj/lora_a"][layer]
            b = _leaves(params)["layers/mlp/down_proj/lora_b"][layer]
            got = _delta(jnp.asarray(x, jnp.float32), a, b, make_context(moka, ids, question), moka)
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=TOL)


def test_vt_loaded_linear_matches_official_semantics():
    state = synthetic_state_dict("vt", seed=3)
    ids, question = vt_layout()
    module, layer = "self_attn.q_proj", 0
    x = np.random.default_rng(4).normal(size=(*ids.shape, CONFIG.hidden_size))
    w = {n: state[official_key("vt", layer, module, n)] for n in ("lora_A.text", "lora_A.image", "lora_B.text")}
    want = vt_official_delta(x, w["lora_A.text"], w["lora_A.image"], w["lora_B.text"], ids == TEXT, ids == IMAGE,
                             question)
    moka = official_config("vt")
    params = load_official_adapter(_adapted(moka), state, CONFIG, moka, "vt")
    a = _leaves(params)["layers/attn/q_proj/lora_a"][layer]
    b = _leaves(params)["layers/attn/q_proj/lora_b"][layer]
    got = _delta(jnp.asarray(x, jnp.float32), a, b, make_context(moka, ids, question), moka)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=TOL)


def test_vt_dead_image_b_is_optional_and_ignored():
    moka = official_config("vt")
    state = synthetic_state_dict("vt", seed=5)
    stripped = {k: v for k, v in state.items() if "lora_B.image" not in k}
    garbage = {k: (np.full((3, 3), np.nan, np.float32) if "lora_B.image" in k else v) for k, v in state.items()}
    loaded = [_flat(load_official_adapter(_adapted(moka), s, CONFIG, moka, "vt")) for s in (state, stripped, garbage)]
    for other in loaded[1:]:
        for path, value in loaded[0].items():
            np.testing.assert_array_equal(other[path], value)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    moka = official_config("avt")
    state = synthetic_state_dict("avt", seed=6)
    as_torch = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}
    flat = _flat(load_official_adapter(_adapted(moka), as_torch, CONFIG, moka, "avt"))
    key = official_key("avt", 1, "mlp.up_proj", "lora_A2")
    want = as_torch[key].float().numpy().T
    np.testing.assert_array_equal(flat["layers/mlp/up_proj/lora_a"][1, moka.modalities.index("audio")], want)


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_missing_tensor():
    moka = official_config("avt")
    state = synthetic_state_dict("avt")
    key = official_key("avt", 1, "self_attn.v_proj", "lora_A2")
    del state[key]
    with pytest.raises(ValueError, match=r"lacks 1 adapter tensors.*lora_A2.*expected shape \(4, 64\)") as err:
        load_official_adapter(_adapted(moka), state, CONFIG, moka, "avt")
    assert key in str(err.value)


def test_another_models_tensors():
    """A checkpoint of a wider model (e.g. the real LLaMA-2-7B: hidden 4096) into the tiny params."""
    moka = official_config("vt")
    wide = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256))
    state = synthetic_state_dict("vt", config=wide)
    with pytest.raises(ValueError, match=r"has shape \(4, 96\), expected \(4, 64\)"):
        load_official_adapter(_adapted(moka), state, CONFIG, moka, "vt")
    # A rank-8 checkpoint into rank-4 params.
    state = synthetic_state_dict("vt", rank=8)
    with pytest.raises(ValueError, match=r"lora_A\.text\.weight' has shape \(8, 64\), expected \(4, 64\)"):
        load_official_adapter(_adapted(moka), state, CONFIG, moka, "vt")


def test_modality_mismatch():
    avt_params = _adapted(official_config("avt"))
    with pytest.raises(ValueError, match=r"modalities \('text', 'image'\).*\('text', 'image', 'audio'\)"):
        load_official_adapter(avt_params, synthetic_state_dict("vt"), CONFIG, official_config("avt"), "vt")
    with pytest.raises(ValueError, match=r"modalities \('text', 'image', 'audio'\).*\('text', 'image'\)"):
        load_official_adapter(_adapted(official_config("vt")), synthetic_state_dict("avt"), CONFIG,
                              official_config("vt"), "avt")
    renamed = official_config("avt", modalities=("text", "video", "audio"))
    with pytest.raises(ValueError, match="modalities"):
        load_official_adapter(avt_params, synthetic_state_dict("avt"), CONFIG, renamed, "avt")
    lora = MokAConfig(method="unimodal_lora", modalities=("text", "image", "audio"))
    with pytest.raises(ValueError, match="one shared B"):
        load_official_adapter(_adapted(lora), synthetic_state_dict("avt"), CONFIG, lora, "avt")


def test_unexpected_adapter_keys():
    moka = official_config("avt")
    params = _adapted(moka)
    # A fourth A (a checkpoint trained with lora_r=4444).
    state = synthetic_state_dict("avt")
    extra = official_key("avt", 0, "self_attn.q_proj", "lora_A3")
    state[extra] = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match=r"1 adapter keys .* no place") as err:
        load_official_adapter(params, state, CONFIG, moka, "avt")
    assert extra in str(err.value)
    # A deeper model's layer.
    state = synthetic_state_dict("avt")
    state[official_key("avt", 2, "mlp.up_proj", "lora_B0")] = np.zeros((128, 4), np.float32)
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.up_proj\.lora_B0"):
        load_official_adapter(params, state, CONFIG, moka, "avt")
    # The VT file into the AVT reader (another prefix and names) is refused, not silently skipped.
    with pytest.raises(ValueError, match="no place in these params"):
        load_official_adapter(_adapted(official_config("avt", modalities=("text", "image", "audio"))),
                              {**synthetic_state_dict("avt"), **synthetic_state_dict("vt")}, CONFIG, moka, "avt")
    # Modules the params do not adapt (target_modules q/v only) while the file has all seven.
    qv = official_config("avt", target_modules=("q_proj", "v_proj"))
    with pytest.raises(ValueError, match=r"40 adapter keys .*down_proj"):
        load_official_adapter(_adapted(qv), synthetic_state_dict("avt"), CONFIG, qv, "avt")


def test_custom_prefix_and_non_adapter_keys_skipped():
    moka = official_config("avt")
    state = synthetic_state_dict("avt", seed=7)
    moved = {k.replace("base_model.model.model.", "model."): v for k, v in state.items()}
    moved["model.embed_tokens.weight"] = np.zeros((3,), np.float32)  # no "lora_": skipped
    a = _flat(load_official_adapter(_adapted(moka), moved, CONFIG, moka, "avt", prefix="model."))
    b = _flat(load_official_adapter(_adapted(moka), state, CONFIG, moka, "avt"))
    for path, value in b.items():
        np.testing.assert_array_equal(a[path], value)
    with pytest.raises(ValueError, match="no place"):
        load_official_adapter(_adapted(moka), moved, CONFIG, moka, "avt")
    with pytest.raises(ValueError, match="no adapter"):
        load_official_adapter(_base_params(), state, CONFIG, moka, "avt")
