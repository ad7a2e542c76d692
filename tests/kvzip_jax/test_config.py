"""ModelConfig from config.json: both rope forms, rope inv_freq against transformers, round trip, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvzip_jax.config import (
    FULL,
    SLIDING,
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedModelError,
)

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
)

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-beta": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    },
}


def _new_form(family_arch: str, rope: dict, **extra) -> dict:
    return {"architectures": [family_arch], **BASE, "rope_parameters": dict(rope), **extra}


def _old_form(family_arch: str, rope: dict, **extra) -> dict:
    rope = dict(rope)
    theta = rope.pop("rope_theta")
    out = {"architectures": [family_arch], **BASE, "rope_theta": theta, **extra}
    if rope["rope_type"] != "default":
        # The oldest files spell the key `type`.
        out["rope_scaling"] = {"type" if rope["rope_type"] == "linear" else "rope_type": rope.pop("rope_type"), **rope}
    return out


@pytest.mark.parametrize("kind", list(ROPES))
def test_new_and_old_rope_forms_agree(kind):
    new = ModelConfig.from_hf_dict(_new_form("LlamaForCausalLM", ROPES[kind]))
    old = ModelConfig.from_hf_dict(_old_form("LlamaForCausalLM", ROPES[kind]))
    assert new == old
    assert new.rope_for(FULL).rope_type == kind.split("-")[0]
    inv_new, s_new = new.rope_for(FULL).inv_freq_and_scaling(16)
    inv_old, s_old = old.rope_for(FULL).inv_freq_and_scaling(16)
    np.testing.assert_array_equal(inv_new, inv_old)
    assert s_new == s_old


def test_gemma3_old_and_new_forms_agree():
    new = ModelConfig.from_hf_dict(
        _new_form(
            "Gemma3ForCausalLM",
            {},
            rope_parameters={
                FULL: {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            },
            layer_types=[SLIDING, FULL],
            sliding_window=4,
            query_pre_attn_scalar=24,
        )
    )
    old_dict = {
        "architectures": ["Gemma3ForCausalLM"],
        **BASE,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "layer_types": [SLIDING, FULL],
        "sliding_window": 4,
        "query_pre_attn_scalar": 24,
    }
    old = ModelConfig.from_hf_dict(old_dict)
    assert new == old
    assert old.rope_for(SLIDING).theta == 10_000.0 and old.rope_for(SLIDING).rope_type == "default"
    assert old.rope_for(FULL).theta == 1_000_000.0 and old.rope_for(FULL).factor == 8.0
    for kind in (FULL, SLIDING):
        np.testing.assert_array_equal(new.rope_for(kind).inv_freq_and_scaling(16)[0],
                                      old.rope_for(kind).inv_freq_and_scaling(16)[0])
    # A different local base frequency must change the sliding rope (the key is really read).
    other = ModelConfig.from_hf_dict({**old_dict, "rope_local_base_freq": 5_000.0})
    assert other.rope_for(SLIDING).theta == 5_000.0


def test_gemma3_family_settings_from_config():
    c = ModelConfig.from_hf_dict(
        {"architectures": ["Gemma3ForCausalLM"], **BASE, "sliding_window": 4, "query_pre_attn_scalar": 24,
         "_sliding_window_pattern": 2, "hidden_activation": "gelu_pytorch_tanh"}
    )
    assert c.layer_types == (SLIDING, FULL)  # pattern 2: every 2nd layer is full
    assert c.qk_norm and c.gemma_norms and c.attn_scale == pytest.approx(24**-0.5)
    assert c.hidden_act == "gelu_pytorch_tanh"


@pytest.mark.parametrize("kind", list(ROPES))
def test_inv_freq_matches_transformers(kind):
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_kwargs = {k: v for k, v in BASE.items()}
    hf_cfg = LlamaConfig(**hf_kwargs, rope_parameters=dict(ROPES[kind]))
    ours = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    rope_type = hf_cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        dim = hf_cfg.head_dim
        theta = hf_cfg.rope_parameters["rope_theta"]
        ref = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        ref_scale = 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, None)
    inv, scale = ours.rope_for(FULL).inv_freq_and_scaling(16)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(float(ref_scale), rel=1e-6)
    if rope_type != "default":
        # The scaled frequencies really differ from plain rope (the case tests something).
        plain = 1.0 / (ours.rope_for(FULL).theta ** (np.arange(0, 16, 2) / 16))
        assert np.abs(inv - plain).max() > 1e-6 or scale != 1.0


@pytest.mark.parametrize(
    "family,hf",
    [
        ("llama", _new_form("LlamaForCausalLM", ROPES["llama3"], tie_word_embeddings=True, attention_bias=True,
                            eos_token_id=[1, 2], bos_token_id=0)),
        ("qwen2", _new_form("Qwen2ForCausalLM", ROPES["default"], eos_token_id=3)),
        ("qwen3", _new_form("Qwen3ForCausalLM", ROPES["yarn"])),
        ("gemma3", _new_form("Gemma3ForCausalLM", {}, layer_types=[SLIDING, FULL], sliding_window=4,
                             query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                             rope_parameters={FULL: ROPES["linear"], SLIDING: ROPES["default"]})),
    ],
)
def test_to_hf_dict_round_trip(family, hf):
    c = ModelConfig.from_hf_dict(hf)
    assert c.family == family
    d = c.to_hf_dict()
    assert d["architectures"] == [c.architecture]
    again = ModelConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert again == c
    assert again.to_hf_dict() == d


def test_to_hf_dict_is_read_by_transformers():
    """transformers reads our config.json to the same rope parameters (llama3) and the same shapes."""
    from transformers import AutoConfig

    c = ModelConfig.from_hf_dict(_new_form("LlamaForCausalLM", ROPES["llama3"]))
    hf = AutoConfig.for_model(**{k: v for k, v in c.to_hf_dict().items() if k != "architectures"})
    assert hf.rope_parameters["rope_type"] == "llama3"
    assert hf.rope_parameters["original_max_position_embeddings"] == 64
    assert ModelConfig.from_hf_dict({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}) == c


def test_qwen2_and_qwen3_flags():
    q2 = ModelConfig.from_hf_dict(_new_form("Qwen2ForCausalLM", ROPES["default"]))
    assert q2.qkv_bias and not q2.o_bias and not q2.qk_norm
    q3 = ModelConfig.from_hf_dict(_new_form("Qwen3ForCausalLM", ROPES["default"]))
    assert q3.qk_norm and not q3.qkv_bias


def test_unsupported_architecture_lists_supported():
    hf = _new_form("MistralForCausalLM", ROPES["default"])
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM") as err:
        ModelConfig.from_hf_dict(hf)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)


def test_unsupported_rope_type_lists_supported():
    hf = _new_form("LlamaForCausalLM", {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="longrope") as err:
        ModelConfig.from_hf_dict(hf)
    for kind in ("default", "linear", "llama3", "yarn"):
        assert kind in str(err.value)


def test_from_pretrained_reads_directory(tmp_path):
    hf = _new_form("LlamaForCausalLM", ROPES["llama3"])
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert ModelConfig.from_pretrained(tmp_path) == ModelConfig.from_hf_dict(hf)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ModelConfig.from_pretrained(tmp_path / "nowhere")
