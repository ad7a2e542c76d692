"""CLIP / SigLIP vision towers and the LLaVA projector against transformers (fp32, perturbed tiny models), plus
their input and checkpoint errors."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_testutil import check_close, perturbed
from safetensors.numpy import load_file, save_file

from kvzip_jax.config import UnsupportedModelError
from kvzip_jax.models import CheckpointError, projector, vision

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BATCH = 2
# CLIP: 3 layers, 4 heads, 16 patches + class token. SigLIP: 36 px / patch 8 leaves 4 pixels the conv drops.
CLIP_CFG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
SIGLIP_CFG = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=36, patch_size=8
)
TEXT_CFG = dict(
    vocab_size=64,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)
CLIP_LAYERS = (0, 1, -2)  # hidden_states compared besides last_hidden_state and the pooled output


def _pixels(config, seed: int = 0) -> np.ndarray:
    size = config["image_size"]
    return np.random.default_rng(seed).standard_normal((BATCH, 3, size, size)).astype(np.float32)


def _hf_vision(kind: str, tmp_path_factory, **overrides):
    cls_config, cls_model = {
        "clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
        "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel),
    }[kind]
    config = cls_config(**{**(CLIP_CFG if kind == "clip" else SIGLIP_CFG), **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = perturbed(cls_model(config))
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    return model, str(path)


def _hf_run(model, pixels: np.ndarray):
    with torch.no_grad():
        return model(torch.as_tensor(pixels), output_hidden_states=True)


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _encode(params, pixels, *, config, layers=None):
    """encode_pooled, and encode at `layers` (a tuple: concatenated), in one compile (compiles dominate here)."""
    out = vision.encode_pooled(params, pixels, config=config)
    return out, None if layers is None else vision.encode(params, pixels, config=config, output_layer=layers)


_image_features = jax.jit(vision.image_features, static_argnames=("config", "feature_layer", "select_strategy"))


def _check(name: str, ours, ref, diffs: dict):
    check_close(name, ours, ref, diffs, atol=ATOL)


def _check_layers(ours, layers: tuple[int, ...], ref, diffs: dict):
    for layer, part in zip(layers, np.split(np.asarray(ours), len(layers), axis=-1), strict=True):
        _check(f"hidden_states[{layer}]", part, ref.hidden_states[layer], diffs)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    model, path = _hf_vision("clip", tmp_path_factory)
    config, params = vision.load_vision_params(path)
    return model, path, config, params


def test_clip_matches_transformers(clip):
    model, _, config, params = clip
    assert config.model_type == vision.CLIP and config.hidden_act == "quick_gelu" and config.num_positions == 17
    pixels = _pixels(CLIP_CFG)
    ref = _hf_run(model, pixels)
    # Several layers in one call (concatenated, as LLaVA does for a list; the LLaVA test runs the single-int path).
    out, hidden = _encode(params, pixels, config=config, layers=CLIP_LAYERS)
    diffs: dict[str, float] = {}
    _check("last_hidden_state", out.last_hidden_state, ref.last_hidden_state, diffs)
    _check("pooled", out.pooled, ref.pooler_output, diffs)
    _check_layers(hidden, CLIP_LAYERS, ref, diffs)
    print("clip max |diff|:", diffs)


@pytest.mark.parametrize("use_head", [True, False], ids=["head", "no-head"])
def test_siglip_matches_transformers(use_head, tmp_path_factory):
    model, path = _hf_vision("siglip", tmp_path_factory, vision_use_head=use_head)
    config, params = vision.load_vision_params(path)
    assert config.model_type == vision.SIGLIP and config.use_head == use_head and config.num_positions == 16
    assert ("head" in params) == use_head
    pixels = _pixels(SIGLIP_CFG)
    ref = _hf_run(model, pixels)
    layers = (-2, -1)
    out, hidden = _encode(params, pixels, config=config, layers=layers)
    diffs: dict[str, float] = {}
    _check("last_hidden_state", out.last_hidden_state, ref.last_hidden_state, diffs)
    if use_head:
        _check("pooled", out.pooled, ref.pooler_output, diffs)
    else:
        assert out.pooled is None and ref.pooler_output is None
    # SigLIP's last_hidden_state is post-layernormed; hidden_states[-1] is not: both must match.
    _check_layers(hidden, layers, ref, diffs)
    print(f"siglip ({'head' if use_head else 'no head'}) max |diff|:", diffs)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**CLIP_CFG).to_dict(),
        text_config=transformers.LlamaConfig(**TEXT_CFG).to_dict(),
        image_token_index=5,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = perturbed(transformers.LlavaForConditionalGeneration(config))
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    return model, str(path)


def test_llava_tower_and_projector_match_transformers(llava):
    model, path = llava
    vcfg, vparams = vision.load_vision_params(path)  # prefix found: transformers 5 writes "vision_tower."
    pcfg, pparams = projector.load_projector_params(path)
    assert vcfg.model_type == vision.CLIP and vcfg.num_layers == 3
    assert (pcfg.in_features, pcfg.out_features, pcfg.hidden_act, pcfg.bias) == (32, 48, "gelu", True)
    assert (pcfg.feature_layer, pcfg.feature_select_strategy) == (-2, "default")
    pixels = _pixels(CLIP_CFG, seed=1)
    features = _image_features(
        vparams, pixels, config=vcfg, feature_layer=pcfg.feature_layer, select_strategy=pcfg.feature_select_strategy
    )
    assert features.shape == (BATCH, 16, 32)  # class token dropped
    with torch.no_grad():
        ref_in = model.model.vision_tower(torch.as_tensor(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
        ref_proj = model.model.multi_modal_projector(torch.as_tensor(np.array(features)))
        ref_all = torch.stack(list(model.model.get_image_features(torch.as_tensor(pixels)).pooler_output))
    diffs: dict[str, float] = {}
    _check("selected features", features, ref_in, diffs)
    _check("projector", projector.project(pparams, features, config=pcfg), ref_proj, diffs)
    _check("get_image_features", projector.project(pparams, features, config=pcfg), ref_all, diffs)
    print("llava max |diff|:", diffs)

    # The same tower under the hub layout (vision_tower.vision_model.) and an explicit prefix load the same params.
    _, explicit = vision.load_vision_params(path, vcfg, prefix="vision_tower.")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), explicit, vparams))


def test_hub_llava_layout_is_found(llava, tmp_path):
    _, path = llava
    tensors = load_file(f"{path}/model.safetensors")
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(pathlib.Path(path, "config.json").read_text())
    _, ours = vision.load_vision_params(tmp_path)
    _, reference = vision.load_vision_params(path)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), ours, reference))


def test_bf16_params(clip):
    _, path, config, params32 = clip
    _, params16 = vision.load_vision_params(path, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    pixels = _pixels(CLIP_CFG)
    ours16 = _encode(params16, pixels, config=config, layers=CLIP_LAYERS)
    ours32 = _encode(params32, pixels, config=config, layers=CLIP_LAYERS)  # compiled by the parity test
    for name, a, b in [
        ("last", ours16[0].last_hidden_state, ours32[0].last_hidden_state),
        ("pooled", ours16[0].pooled, ours32[0].pooled),
        ("layers", ours16[1], ours32[1]),
    ]:
        assert a.dtype == jnp.bfloat16, name
        err = np.abs(np.asarray(a, np.float32) - np.asarray(b)).max()
        assert err < 0.05 * np.abs(np.asarray(b)).max(), f"bf16 {name} strays {err:.3g} from fp32"


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("hf", "match"),
    [
        ({"model_type": "clip_vision_model", "hidden_act": "relu"}, r"hidden_act 'relu'.*quick_gelu"),
        ({"model_type": "vit", "hidden_size": 32}, r"model_type 'vit'.*clip_vision_model, siglip_vision_model"),
        ({"model_type": "llava", "vision_config": {"model_type": "dinov2"}}, r"model_type 'dinov2'"),
    ],
    ids=["hidden_act", "model_type", "llava-tower"],
)
def test_unsupported_config_is_rejected(hf, match):
    with pytest.raises(UnsupportedModelError, match=match):
        vision.VisionConfig.from_hf_dict(hf)


def test_projector_config_errors():
    base = {"vision_config": {"model_type": "clip_vision_model"}, "text_config": {"hidden_size": 48}}
    with pytest.raises(UnsupportedModelError, match=r"projector_hidden_act 'swish'"):
        projector.ProjectorConfig.from_hf_dict({**base, "projector_hidden_act": "swish"})
    with pytest.raises(ValueError, match=r"'crop'.*default, full"):
        projector.ProjectorConfig.from_hf_dict({**base, "vision_feature_select_strategy": "crop"})
    # A list of feature layers widens the projector input (LLaVA concatenates them).
    assert projector.ProjectorConfig.from_hf_dict({**base, "vision_feature_layer": [-2, -5]}).in_features == 2 * 768


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((BATCH, 1, 32, 32), r"1 channels.*expected 3"),
        ((BATCH, 32, 32, 3), r"32 channels.*expected 3.*NHWC"),
        ((BATCH, 3, 28, 32), r"28x32 pixels.*expects 32x32"),
        ((3, 32, 32), r"NCHW"),
    ],
    ids=["channels", "nhwc", "size", "rank"],
)
def test_bad_pixels_are_rejected(clip, shape, match):
    _, _, config, params = clip
    with pytest.raises(ValueError, match=match):
        vision.encode(params, np.zeros(shape, np.float32), config=config)


def test_bad_layer_and_strategy(clip):
    _, _, config, params = clip
    with pytest.raises(ValueError, match=r"output layer 4 is out of range for 3 layers"):
        vision.encode(params, _pixels(CLIP_CFG), config=config, output_layer=4)
    with pytest.raises(ValueError, match=r"'pooled'.*default, full"):
        vision.select_features(jnp.zeros((1, 17, 32)), "pooled")


def test_checkpoint_errors(clip, tmp_path):
    _, path, config, _ = clip
    tensors = load_file(f"{path}/model.safetensors")
    missing = "encoder.layers.2.mlp.fc2.weight"
    save_file({k: v for k, v in tensors.items() if k != missing}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"lacks tensor {missing}"):
        vision.load_vision_params(tmp_path, config)
    with pytest.raises(CheckpointError, match=r"lacks tensor model\.vision_tower\.embeddings"):
        vision.load_vision_params(path, config, prefix="model.vision_tower.")
    # A config with fewer layers than the file: the extra layer's tensors are reported, not silently dropped.
    fewer = vision.VisionConfig.from_hf_dict({**config.to_hf_dict(), "num_hidden_layers": 2})
    with pytest.raises(CheckpointError, match=r"does not use, e\.g\. encoder\.layers\.2\."):
        vision.load_vision_params(path, fewer)


def test_llava_tower_and_projector_on_a_mesh(llava):
    """Loaded straight onto a 2 x 4 mesh (heads and MLP over "model"), the features equal one device's."""
    from kvzip_jax.sharding import make_mesh

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
    _, path = llava
    mesh = make_mesh(data=2, model=4)
    vcfg, vparams = vision.load_vision_params(path)
    pcfg, pparams = projector.load_projector_params(path)
    _, vsharded = vision.load_vision_params(path, mesh=mesh)
    _, psharded = projector.load_projector_params(path, mesh=mesh)
    q_kernel = vsharded["layers"]["attn"]["q_proj"]["kernel"][...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    assert psharded["linear_1"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(None, "model")

    def run(vp, pp):
        feats = _image_features(vp, _pixels(CLIP_CFG, seed=2), config=vcfg, feature_layer=-2)
        return np.asarray(projector.project(pp, feats, config=pcfg))

    np.testing.assert_allclose(run(vsharded, psharded), run(vparams, pparams), atol=1e-5)


@pytest.mark.parametrize("heads_per_step", [2, 3])
def test_query_tiled_attention_matches_transformers(clip, monkeypatch, heads_per_step):
    """Long inputs (Whisper's 1,500 frames) attend a few heads at a time in query tiles: with a 5-query tile the
    17-token CLIP tower runs 4 tiles (each padded to 8 rows) and still equals transformers; 3 heads per step do not
    divide its heads, so it runs one at a time."""
    model, _, config, params = clip
    monkeypatch.setattr(vision, "HEADS_PER_STEP", heads_per_step)
    monkeypatch.setattr(vision, "QUERY_TILE", 5)
    monkeypatch.setattr(vision, "UNTILED_QUERIES", 4)
    pixels = _pixels(CLIP_CFG, seed=3)
    ours = vision.encode(params, pixels, config=config)  # not jitted: traced afresh with the small tile
    diffs: dict[str, float] = {}
    _check("tiled last_hidden_state", ours, _hf_run(model, pixels).last_hidden_state, diffs)
