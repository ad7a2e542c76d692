"""LLaVA-style multimodal LMs against transformers' LlavaForConditionalGeneration (fp32, perturbed tiny models):
logits with 0, 1 and 2 images, greedy generation, ragged image counts in one batch, modality ids, bf16 sharded
checkpoints, an 8-device mesh, and the input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_testutil import perturbed

from kvzip_jax.models import llava
from kvzip_jax.multimodal_lm import MultimodalLM

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
IMAGE_ID = 5
VISION = {
    "clip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8),
    "siglip": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8, vision_use_head=False),
}
TEXT = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
# (tower, strategy, text backbone): CLIP drops its class token ("default"); SigLIP has none and keeps all ("full").
VARIANTS = {
    "clip-llama": ("clip", "default", "llama"),
    "siglip-qwen2": ("siglip", "full", "qwen2"),
}


def _build(variant: str, path, **save_kwargs):
    tower, strategy, text = VARIANTS[variant]
    vision_cfg = (transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig)(
        **VISION[tower])
    text_cfg = (transformers.LlamaConfig if text == "llama" else transformers.Qwen2Config)(**TEXT)
    config = transformers.LlavaConfig(vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(),
                                      image_token_index=IMAGE_ID, vision_feature_layer=-2,
                                      vision_feature_select_strategy=strategy)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = perturbed(transformers.LlavaForConditionalGeneration(config))
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = _build(request.param, path)
    return request.param, model, MultimodalLM.from_pretrained(path)


def _pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _prompts(rng: np.random.Generator):
    """Three rows with 0, 1 and 2 image placeholders at different places (ids avoid the placeholder)."""
    def text(n):
        return [int(t) for t in rng.integers(6, TEXT["vocab_size"], n)]
    return [text(7), [*text(3), IMAGE_ID, *text(5)], [IMAGE_ID, *text(4), IMAGE_ID, *text(2)]]


def _hf_logits(model, expanded_ids, pixels):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([expanded_ids]),
                    pixel_values=None if pixels is None else torch.as_tensor(pixels))
    return out.logits[0].numpy()


def test_logits_match_transformers_with_0_1_2_images(variant):
    name, model, mm = variant
    rng = np.random.default_rng(1)
    prompts = _prompts(rng)
    images = [[], list(_pixels(1, 2)), list(_pixels(2, 3))]
    n_img = mm.modalities["image"].tokens_per_item
    assert n_img == 16  # 16 patches (CLIP: 17 tokens, its class token dropped by "default"; SigLIP: "full")
    # One ragged batch (rows with 0, 1, 2 images) against each row run alone by transformers.
    ours, ids = mm.logits(prompts, images=images)
    for b, (prompt, imgs) in enumerate(zip(prompts, images, strict=True)):
        expanded = llava.expand_placeholders(prompt, IMAGE_ID, n_img)
        ref = _hf_logits(model, expanded, np.stack(imgs) if imgs else None)
        assert np.std(ref) > 0.1
        err = np.abs(ours[b, : len(expanded)] - ref).max()
        assert err <= ATOL, f"{name} row {b}: max |diff| {err:.3g}"
        # Modality ids: image where the expanded placeholders are, text elsewhere, pad after the row.
        want = np.where(np.asarray(expanded) == IMAGE_ID, llava.IMAGE, llava.TEXT)
        np.testing.assert_array_equal(ids[b, : len(expanded)], want)
        assert (ids[b, len(expanded):] == llava.PAD).all()
        # The row alone gives the same logits as in the ragged batch.
        alone, _ = mm.logits([prompt], images=[imgs])
        np.testing.assert_allclose(alone[0], ours[b, : len(expanded)], atol=2e-5)


def test_greedy_generation_matches_transformers(variant):
    name, model, mm = variant
    rng = np.random.default_rng(4)
    prompt = [int(t) for t in rng.integers(6, 64, 3)] + [IMAGE_ID] + [int(t) for t in rng.integers(6, 64, 4)]
    pixels = _pixels(1, 5)
    expanded = llava.expand_placeholders(prompt, IMAGE_ID, mm.modalities["image"].tokens_per_item)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([expanded]), pixel_values=torch.as_tensor(pixels),
                             max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref_new = ref[0, len(expanded):].tolist()
    ours = mm.generate([prompt], images=[[pixels[0]]], max_new_tokens=8, stop_token_ids=[])
    assert ours[0] == ref_new, f"{name}: {ours[0]} != {ref_new}"


def test_placeholder_count_errors(variant):
    _, _, mm = variant
    prompt = [7, IMAGE_ID, 8]
    with pytest.raises(ValueError, match=r"prompt #1 has 1 image placeholder token\(s\) \(id 5\) but 2 image"):
        mm.logits([prompt], images=[list(_pixels(2, 0))])
    with pytest.raises(ValueError, match=r"prompt #1 has 1 image placeholder.* but 0 image"):
        mm.logits([prompt])
    with pytest.raises(ValueError, match=r"takes no audio inputs; it takes: image"):
        mm.logits([prompt], images=[list(_pixels(1, 0))], audio=[[np.zeros(16000, np.float32)]])
    with pytest.raises(ValueError, match=r"shape \(3, 28, 28\); this model takes \(3, 32, 32\)"):
        mm.logits([prompt], images=[[np.zeros((3, 28, 28), np.float32)]])
    # Too many images for the model's 128 positions once expanded (8 x 16 tokens + text).
    with pytest.raises(ValueError, match=r"position 13\d is beyond max_position_embeddings \(128\)"):
        mm.logits([[IMAGE_ID] * 8 + [7] * 4], images=[list(_pixels(8, 0))])


def test_bf16_sharded_checkpoint_and_mesh(tmp_path):
    from kvzip_jax.sharding import make_mesh

    model = _build("clip-llama", tmp_path / "bf16", max_shard_size="20KB")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1  # sharded, with an index
    prompt, imgs = [9, IMAGE_ID, 11, 12], [list(_pixels(1, 7))]
    fp32 = MultimodalLM.from_pretrained(tmp_path / "bf16")
    ref, _ = fp32.logits([prompt], images=imgs)
    expanded = llava.expand_placeholders(prompt, IMAGE_ID, 16)
    np.testing.assert_allclose(ref[0], _hf_logits(model, expanded, np.stack(imgs[0])), atol=ATOL)

    bf16 = MultimodalLM.from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    low, _ = bf16.logits([prompt], images=imgs)
    assert np.abs(low - ref).max() < 0.05 * np.abs(ref).max()

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
    sharded = MultimodalLM.from_pretrained(tmp_path / "bf16", mesh=make_mesh(data=2, model=4))
    on_mesh, _ = sharded.logits([prompt], images=imgs)
    np.testing.assert_allclose(on_mesh, ref, atol=2e-5)


def test_config_errors():
    vision_cfg = {"model_type": "clip_vision_model", **VISION["clip"]}
    text_cfg = {"model_type": "llama", **TEXT}
    with pytest.raises(ValueError, match=r"image_token_id 64 is outside the text vocabulary \(size 64\)"):
        llava.LlavaConfig.from_hf_dict({"model_type": "llava", "vision_config": vision_cfg, "text_config": text_cfg,
                                        "image_token_index": 64})
    with pytest.raises(ValueError, match=r"not a LLaVA config"):
        llava.LlavaConfig.from_hf_dict(text_cfg)
