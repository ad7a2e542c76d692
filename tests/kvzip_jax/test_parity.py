"""Logits parity with transformers (fp32, eager attention) on tiny perturbed configs, one case per known trap."""

from __future__ import annotations

import numpy as np
import pytest

ATOL = 1e-4
SEQ = 12
BATCH = 2

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}

# id -> (family, hf config overrides, position offset)
CASES = {
    "llama-untied-default": ("llama", dict(tie_word_embeddings=False), 0),
    "llama-tied-bias-llama3-beyond-original": (
        "llama",
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=LLAMA3_ROPE,
            max_position_embeddings=8192,
        ),
        3000,
    ),
    "llama-linear-rope": ("llama", dict(rope_parameters=LINEAR_ROPE, max_position_embeddings=8192), 500),
    "llama-yarn-rope": ("llama", dict(rope_parameters=YARN_ROPE, max_position_embeddings=8192), 1000),
    "qwen2-qkv-bias": ("qwen2", dict(), 0),
    "qwen3-qk-norm": ("qwen3", dict(), 0),
    "gemma3-sliding-final-softcap": (
        "gemma3",
        dict(
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
            final_logit_softcapping=3.0,
        ),
        0,
    ),
    "gemma3-full-linear-rope-no-softcap": (
        "gemma3",
        dict(
            sliding_window=4,
            layer_types=["full_attention", "sliding_attention"],
            query_pre_attn_scalar=40,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        ),
        7,
    ),
}


def _inputs(offset: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128, size=(BATCH, SEQ))
    positions = np.broadcast_to(np.arange(SEQ) + offset, (BATCH, SEQ)).copy()
    return tokens, positions


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, loaded_factory, hf_logits_fn, ours_logits_fn):
    family, overrides, offset = CASES[case]
    model, _, config, params = loaded_factory(family, **overrides)
    tokens, positions = _inputs(offset)
    ref = hf_logits_fn(model, tokens, positions)
    ours = ours_logits_fn(params, config, tokens, positions)
    assert ours.shape == ref.shape == (BATCH, SEQ, 128)
    # The perturbation must make logits vary (a bug has to be able to show): positions and rows differ a lot.
    assert np.std(ref, axis=1).mean() > 0.1, "reference logits barely vary across positions"
    assert np.abs(ref[0] - ref[1]).max() > 0.1
    diff = np.abs(ours - ref).max()
    assert diff <= ATOL, f"{case}: max |logit diff| {diff:.3g} > {ATOL}"


def test_config_flags_reflect_traps(loaded_factory):
    """The cases above really exercise the traps they are named after (guards against a silently ignored key)."""
    _, _, c, params = loaded_factory("llama", **CASES["llama-tied-bias-llama3-beyond-original"][1])
    assert c.tie_word_embeddings and c.qkv_bias and c.o_bias and c.mlp_bias
    assert "lm_head" not in params or params["lm_head"] is None
    assert c.rope_for("full_attention").rope_type == "llama3"
    _, _, c, params = loaded_factory("llama", **CASES["llama-untied-default"][1])
    assert not c.tie_word_embeddings and params["lm_head"][...].shape == (64, 128)
    _, _, c, _ = loaded_factory("gemma3", **CASES["gemma3-sliding-final-softcap"][1])
    assert c.layer_types == ("sliding_attention", "full_attention") and c.sliding_window == 4 < SEQ
    assert c.query_pre_attn_scalar == 24 != c.head_dim
    assert c.final_logit_softcap == 3.0 and c.qk_norm
    _, _, c, _ = loaded_factory("qwen2")
    assert c.qkv_bias and not c.o_bias
    _, _, c, _ = loaded_factory("qwen3")
    assert c.qk_norm and not c.qkv_bias


def test_position_offset_matters_for_llama3(loaded_factory, hf_logits_fn):
    """The llama3 case is only a trap test if positions beyond the original context change the logits."""
    family, overrides, offset = CASES["llama-tied-bias-llama3-beyond-original"]
    model, *_ = loaded_factory(family, **overrides)
    tokens, positions = _inputs(offset)
    # Same weights (same seed), plain rope: llama3 scaling must change the logits at these positions.
    plain, *_ = loaded_factory(family, **{**overrides, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    diff = np.abs(hf_logits_fn(model, tokens, positions) - hf_logits_fn(plain, tokens, positions)).max()
    assert diff > 1e-3, f"llama3 scaling changes logits by only {diff:.2g}; the trap case would not catch a bug"


def test_gemma3_attn_logit_softcapping_matches_transformers(loaded_factory, hf_logits_fn, ours_logits_fn):
    """A Gemma3 config.json with attn_logit_softcapping set must give transformers' logits.

    transformers 5.23's Gemma3Attention stores config.attn_logit_softcapping but never passes it to the attention
    function, so for Gemma3ForCausalLM the attention soft cap is a no-op; ours applies cap * tanh(x / cap). Parity
    is the contract (or else the value must be rejected with a clear error, not silently give other logits).
    """
    overrides = dict(
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    )
    model, _, config, params = loaded_factory("gemma3", **overrides)
    tokens, positions = _inputs(0)
    ref = hf_logits_fn(model, tokens, positions)
    ours = ours_logits_fn(params, config, tokens, positions)
    assert config.attn_logit_softcap is None  # dropped with a warning, as transformers drops it
    diff = np.abs(ours - ref).max()
    assert diff <= ATOL, f"Gemma3 with attn_logit_softcapping=2.0: max |logit diff| {diff:.3g} > {ATOL}"


def test_gemma3_all_sliding_layers_match_transformers(loaded_factory, hf_logits_fn, ours_logits_fn):
    """Gemma3 whose layers are all sliding: transformers' default layer_types for fewer than 6 layers
    (sliding_window_pattern 6), as in tiny test checkpoints. Window 4 < sequence 12."""
    model, _, config, params = loaded_factory("gemma3", sliding_window=4, query_pre_attn_scalar=24)
    assert config.layer_types == ("sliding_attention", "sliding_attention")
    tokens, positions = _inputs(0)
    ref = hf_logits_fn(model, tokens, positions)
    ours = ours_logits_fn(params, config, tokens, positions)
    diff = np.abs(ours - ref).max()
    assert diff <= ATOL, f"all-sliding Gemma3: max |logit diff| {diff:.3g} > {ATOL}"
