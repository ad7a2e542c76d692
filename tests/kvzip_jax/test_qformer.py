"""The BLIP-2 Q-Former and its projection against transformers (fp32, perturbed tiny models): a standalone
Blip2QFormerModel at several cross-attention frequencies, a whole Blip2ForConditionalGeneration checkpoint (query
tokens + Q-Former + language_projection), MokA's MLP projection, and input, config and checkpoint errors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_testutil import check_close, perturbed

from kvzip_jax.config import UnsupportedModelError
from kvzip_jax.models import CheckpointError, qformer
from kvzip_jax.sharding import make_mesh, path_str

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BATCH = 2
TOKENS = 5  # encoder feature tokens (the tiny vision tower's class token + 4 patches)
QFORMER_CFG = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=2,
    cross_attention_frequency=2,
    encoder_hidden_size=24,
)
VISION_CFG = dict(
    hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
)
TEXT_CFG = dict(
    vocab_size=64,
    hidden_size=40,
    ffn_dim=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=64,
)
NUM_QUERIES = 4

_encode = jax.jit(qformer.encode, static_argnames=("config",))


@functools.partial(jax.jit, static_argnames=("config",))
def _encode_project(params, image_embeds, *, config):
    """encode and project in one compile (compiles dominate here)."""
    return qformer.encode(params, image_embeds, config=config), qformer.project(params, image_embeds, config=config)


def _features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, TOKENS, 24)).astype(np.float32)


def _check(name: str, ours, ref, diffs: dict):
    check_close(name, ours, ref, diffs, atol=ATOL)


def _standalone(tmp_path_factory, **overrides):
    config = transformers.Blip2QFormerConfig(**{**QFORMER_CFG, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = perturbed(transformers.Blip2QFormerModel(config))
    path = tmp_path_factory.mktemp("qformer")
    model.save_pretrained(path)
    return model, str(path)


def _hf_qformer(model, queries, features, mask=None):
    """transformers' last_hidden_state for our learned queries (a standalone Blip2QFormerModel has none)."""
    query_embeds = torch.as_tensor(np.broadcast_to(np.asarray(queries), (BATCH, *queries.shape)).copy())
    kwargs = {} if mask is None else {"encoder_attention_mask": torch.as_tensor(mask)}
    with torch.no_grad():
        return model(query_embeds=query_embeds, encoder_hidden_states=torch.as_tensor(features), **kwargs)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    model, path = _standalone(tmp_path_factory)
    config, params = qformer.load_qformer_params(
        path, qformer.QFormerConfig.from_pretrained(path, num_query_tokens=NUM_QUERIES)
    )
    return model, path, config, params


def test_standalone_qformer_matches_transformers(standalone):
    model, _, config, params = standalone
    assert (config.cross_layer_ids, config.self_layer_ids, config.encoder_hidden_size) == ((0, 2), (1, 3), 24)
    assert config.projection is None and params["queries"][...].shape == (NUM_QUERIES, 32)
    features = _features()
    mask = np.ones((BATCH, TOKENS), np.int64)
    mask[0, 3:] = 0  # padded features must not be attended
    queries = params["queries"][...]
    ref, ref_masked = (_hf_qformer(model, queries, features, m).last_hidden_state for m in (None, mask))
    assert np.abs(ref_masked[0].numpy() - ref[0].numpy()).max() > 0.01  # the mask matters for the padded image only
    np.testing.assert_array_equal(ref_masked[1].numpy(), ref[1].numpy())
    diffs: dict[str, float] = {}
    # All ones (one compile for both; the frequency tests run attention_mask=None).
    _check("no mask", _encode(params, features, config=config, attention_mask=np.ones_like(mask)), ref, diffs)
    _check("masked", _encode(params, features, config=config, attention_mask=mask), ref_masked, diffs)
    print("standalone Q-Former max |diff|:", diffs)


@pytest.mark.parametrize(
    ("frequency", "layers", "cross_ids"),
    [(1, 4, (0, 1, 2, 3)), (3, 5, (0, 3))],
    ids=["f1", "f3-partial-group"],
)
def test_cross_attention_frequency(frequency, layers, cross_ids, tmp_path_factory):
    # f=1: every layer cross-attends, no self-only stack. f=3, 5 layers: one scanned group (0 | 1, 2), then the
    # partial last group (3 | 4) after the scan.
    model, path = _standalone(tmp_path_factory, cross_attention_frequency=frequency, num_hidden_layers=layers)
    config, params = qformer.load_qformer_params(path, seed=1)
    assert config.cross_layer_ids == cross_ids and config.num_query_tokens == 32  # Blip2Config's default
    assert ("self_layers" in params) == (frequency > 1)
    features = _features(seed=frequency + layers)
    diffs: dict[str, float] = {}
    _check(
        "last_hidden_state",
        _encode(params, features, config=config),
        _hf_qformer(model, params["queries"][...], features).last_hidden_state,
        diffs,
    )
    print(f"Q-Former f={frequency} L={layers} max |diff|:", diffs)


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    config = transformers.Blip2Config(
        vision_config=transformers.Blip2VisionConfig(**VISION_CFG).to_dict(),
        qformer_config=transformers.Blip2QFormerConfig(**QFORMER_CFG).to_dict(),
        text_config=transformers.OPTConfig(**TEXT_CFG).to_dict(),
        num_query_tokens=NUM_QUERIES,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = perturbed(transformers.Blip2ForConditionalGeneration(config))
    path = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(path)
    config, params = qformer.load_qformer_params(path)  # prefix "qformer.", query_tokens, language_projection
    return model, str(path), config, params


def test_blip2_queries_qformer_projection_match_transformers(blip2):
    model, _, config, params = blip2
    assert (config.encoder_hidden_size, config.num_query_tokens, config.projection, config.llm_hidden_size) == (
        24,
        NUM_QUERIES,
        "linear",
        40,
    )
    pixels = np.random.default_rng(3).standard_normal((BATCH, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model.get_image_features(torch.as_tensor(pixels))
    image_embeds = ref.last_hidden_state.numpy()
    assert image_embeds.shape == (BATCH, TOKENS, 24)
    np.testing.assert_array_equal(np.asarray(params["queries"][...]), model.query_tokens[0].detach().numpy())
    encoded, projected = _encode_project(params, image_embeds, config=config)
    diffs: dict[str, float] = {}
    _check("qformer", encoded, ref.qformer_outputs.last_hidden_state, diffs)
    _check("get_image_features", projected, ref.pooler_output, diffs)
    print("BLIP-2 max |diff|:", diffs)


def _equal(a, b) -> bool:
    return jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def test_mlp_projection(blip2):
    """MokA's choice: the same queries and Q-Former, a new Linear-GELU-Linear into the LLM width (random init)."""
    _, path, _, params = blip2
    config = qformer.QFormerConfig.from_pretrained(path, projection="mlp")
    _, mlp = qformer.load_qformer_params(path, config, seed=7)  # language_projection is left alone, not an error
    assert config.llm_hidden_size == 40 and set(mlp["projection"]) == {"linear_1", "linear_2"}
    assert all(_equal(params[k], mlp[k]) for k in params if k != "projection")
    assert _equal(mlp, qformer.load_qformer_params(path, config, seed=7)[1])  # the seed fixes the new weights
    out = jax.eval_shape(functools.partial(qformer.project, config=config), mlp, _features())
    assert out.shape == (BATCH, NUM_QUERIES, 40)


def test_param_layout():
    config = qformer.QFormerConfig(
        hidden_size=8,
        intermediate_size=8,
        num_layers=3,
        num_heads=2,
        encoder_hidden_size=6,
        num_query_tokens=2,
        projection="mlp",
        llm_hidden_size=10,
    )
    params = qformer.abstract_params(config)  # init_params builds the same module (its random init takes seconds)
    shapes = {path_str(k): a.shape for k, a in jax.tree_util.tree_leaves_with_path(params)}
    # 3 layers every 2nd: cross-attention on 0 and 2 (k/v read the encoder width), layer 1 without.
    assert shapes["cross_layers/cross/k_proj/kernel"] == (2, 6, 8)
    assert shapes["self_layers/attn/q_proj/kernel"] == (1, 8, 8)
    assert not any(k.startswith("self_layers/cross") for k in shapes)
    assert shapes["queries"] == (2, 8) and shapes["projection/linear_2/kernel"] == (10, 10)
    out = jax.eval_shape(functools.partial(qformer.project, config=config), params, np.zeros((1, 5, 6), np.float32))
    assert out.shape == (1, 2, 10)


def test_blip2_on_a_mesh(blip2):
    """Loaded onto a 2 x 4 mesh (heads and MLP over "model"), the projected queries equal one device's."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
    _, path, config, params = blip2
    mesh = make_mesh(data=2, model=4)
    _, sharded = qformer.load_qformer_params(path, mesh=mesh)
    spec = jax.sharding.PartitionSpec
    assert sharded["cross_layers"]["cross"]["q_proj"]["kernel"][...].sharding.spec == spec(None, None, "model")
    assert sharded["self_layers"]["mlp"]["fc1"]["kernel"][...].sharding.spec == spec(None, None, "model")
    features = _features(seed=4)
    ours, reference = (_encode_project(p, features, config=config)[1] for p in (sharded, params))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5)
    mlp_config = qformer.QFormerConfig.from_pretrained(path, projection="mlp")
    _, mlp = qformer.load_qformer_params(path, mlp_config, seed=7, mesh=mesh)
    assert mlp["projection"]["linear_1"]["kernel"][...].sharding.spec == spec(None, "model")


# ------------------------------------------------------------------------------------------------ errors
def test_bad_features_are_rejected(standalone):
    _, _, config, params = standalone
    with pytest.raises(ValueError, match=r"width 32 .*encoder_hidden_size 24"):
        qformer.encode(params, np.zeros((BATCH, TOKENS, 32), np.float32), config=config)
    with pytest.raises(ValueError, match=r"must be \[batch, tokens, 24\]; got shape \(5, 24\)"):
        qformer.encode(params, np.zeros((TOKENS, 24), np.float32), config=config)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected \(2, 5\)"):
        qformer.encode(params, _features(), config=config, attention_mask=np.ones((BATCH, 4)))
    with pytest.raises(ValueError, match=r"no projection"):
        qformer.project(params, _features(), config=config)


@pytest.mark.parametrize(
    ("hf", "error", "match"),
    [
        ({"hidden_act": "relu"}, UnsupportedModelError, r"hidden_act 'relu'"),
        ({"cross_attention_frequency": 0}, ValueError, r"cross_attention_frequency must be at least 1; got 0"),
        ({"hidden_size": 33}, ValueError, r"hidden_size 33 is not a multiple of num_attention_heads 2"),
        ({"model_type": "instructblip_qformer"}, UnsupportedModelError, r"'instructblip_qformer'.*blip_2_qformer"),
        ({"position_embedding_type": "relative_key"}, UnsupportedModelError, r"'relative_key'"),
        ({"projection": "mlp"}, ValueError, r"projection 'mlp' needs llm_hidden_size"),
        ({"projection": "resampler", "llm_hidden_size": 8}, ValueError, r"projection 'resampler' is not supported"),
    ],
    ids=["act", "frequency", "heads", "model_type", "position", "mlp-width", "projection"],
)
def test_bad_config_is_rejected(hf, error, match):
    hf = {**QFORMER_CFG, **hf}
    kwargs = {k: hf.pop(k) for k in ("projection", "llm_hidden_size") if k in hf}
    with pytest.raises(error, match=match):
        qformer.QFormerConfig.from_hf_dict(hf, **kwargs)


def test_blip2_config_dict():
    hf = {"model_type": "blip-2", "qformer_config": {}, "vision_config": {}, "text_config": {"model_type": "llama"}}
    config = qformer.QFormerConfig.from_hf_dict(hf)  # every value at transformers' default (omitted when saved)
    assert (config.encoder_hidden_size, config.num_query_tokens, config.llm_hidden_size) == (1408, 32, 4096)
    assert (config.num_layers, config.cross_attention_frequency, config.layer_norm_eps) == (12, 2, 1e-12)
    # Blip2Config sets the Q-Former's encoder_hidden_size from the vision tower, whatever qformer_config says.
    widths = {"qformer_config": {"encoder_hidden_size": 1408}, "vision_config": {"hidden_size": 24}}
    assert qformer.QFormerConfig.from_hf_dict({**hf, **widths}).encoder_hidden_size == 24
    with pytest.raises(UnsupportedModelError, match=r"'instructblip'.*blip-2"):
        qformer.QFormerConfig.from_hf_dict({**hf, "model_type": "instructblip"})


def test_checkpoint_errors(standalone):
    _, path, config, _ = standalone
    # Cross-attention on every layer: layer 1 of the file has none.
    with pytest.raises(CheckpointError, match=r"lacks tensor encoder\.layer\.1\.crossattention\.attention\.query"):
        qformer.load_qformer_params(path, dataclasses.replace(config, cross_attention_frequency=1))
    # Cross-attention every 4th layer: layer 2's is left over; so is layer 3 for a 3-layer config.
    with pytest.raises(CheckpointError, match=r"does not use, e\.g\. encoder\.layer\.2\.crossattention"):
        qformer.load_qformer_params(path, dataclasses.replace(config, cross_attention_frequency=4))
    with pytest.raises(CheckpointError, match=r"does not use, e\.g\. encoder\.layer\.3\."):
        qformer.load_qformer_params(path, dataclasses.replace(config, num_layers=3))
    # A standalone Q-Former has no language_projection to load.
    linear = dataclasses.replace(config, projection="linear", llm_hidden_size=40)
    with pytest.raises(CheckpointError, match=r"lacks tensor language_projection\.weight"):
        qformer.load_qformer_params(path, linear)
    with pytest.raises(CheckpointError, match=r"lacks tensor qformer\.layernorm\.weight"):
        qformer.load_qformer_params(path, config, prefix="qformer.")
