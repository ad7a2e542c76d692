"""The generic multimodal assembly (MokA's audio-visual-text setting): a text decoder with an image modality (CLIP
tower + projector) and an audio modality (Whisper encoder + projector). No transformers class combines these, so
the reference is the assembly written out by hand: each encoder run directly, its embeddings placed over the
expanded placeholders, one forward."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.config import FULL, ModelConfig, RopeConfig
from kvzip_jax.models import audio, decoder, llava, projector, vision
from kvzip_jax.multimodal_lm import MultimodalLM, audio_modality, image_modality

IMAGE_ID, AUDIO_ID = 3, 4
TEXT = ModelConfig(family="llama", vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5,
                   rope=((FULL, RopeConfig(theta=10000.0)),), eos_token_ids=(2,), tie_word_embeddings=True)
VISION = vision.VisionConfig(model_type=vision.CLIP, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                             image_size=16, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
WHISPER = audio.WhisperEncoderConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_mel_bins=8,
                                     max_source_positions=6)
IMAGE_PROJ = projector.ProjectorConfig(in_features=16, out_features=32)
AUDIO_PROJ = projector.ProjectorConfig(in_features=16, out_features=32)


@pytest.fixture(scope="module")
def model():
    params = {
        "text": decoder.init_params(TEXT, seed=0),
        "vision": vision.init_params(VISION, seed=1),
        "image_proj": projector.init_params(IMAGE_PROJ, seed=2),
        "whisper": audio.init_params(WHISPER, seed=3),
        "audio_proj": projector.init_params(AUDIO_PROJ, seed=4),
    }
    modalities = {
        "image": image_modality(VISION, params["vision"], IMAGE_PROJ, params["image_proj"], token_id=IMAGE_ID),
        "audio": audio_modality(WHISPER, params["whisper"], AUDIO_PROJ, params["audio_proj"], token_id=AUDIO_ID),
    }
    return MultimodalLM(TEXT, params["text"], modalities), params


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    mels = rng.standard_normal((1, 8, 12)).astype(np.float32)
    return pixels, mels


def test_image_and_audio_splice_like_the_assembly_written_out(model):
    mm, params = model
    pixels, mels = _inputs(0)
    prompt = [7, IMAGE_ID, 8, 9, AUDIO_ID, 10, IMAGE_ID, 11]
    logits, ids = mm.logits([prompt], images=[list(pixels)], audio=[list(mels)])

    # By hand: 4 tokens per image (2 x 2 patches, class token dropped), 6 per clip (12 frames halved).
    image = np.asarray(llava.image_embeddings({"vision": params["vision"], "projector": params["image_proj"]},
                                              pixels, config=llava.ImageEncoderConfig(VISION, IMAGE_PROJ)))
    clip = np.asarray(projector.project(params["audio_proj"],
                                        audio.encode_whisper(params["whisper"], mels, config=WHISPER),
                                        config=AUDIO_PROJ))
    assert image.shape == (2, 4, 32) and clip.shape == (1, 6, 32)
    pieces, expect_ids = [], []
    text_embeds = np.asarray(decoder.embed(params["text"], jnp.asarray([prompt]), config=TEXT))[0]
    images = iter(image)
    for t, e in zip(prompt, text_embeds, strict=True):
        if t == IMAGE_ID:
            pieces.append(next(images)), expect_ids.extend([llava.IMAGE] * 4)
        elif t == AUDIO_ID:
            pieces.append(clip[0]), expect_ids.extend([llava.AUDIO] * 6)
        else:
            pieces.append(e[None]), expect_ids.append(llava.TEXT)
    embeds = np.concatenate(pieces)[None]
    ref, _ = decoder.forward(params["text"], jnp.asarray(embeds), jnp.arange(embeds.shape[1])[None], None,
                             config=TEXT)
    np.testing.assert_array_equal(ids[0], expect_ids)
    np.testing.assert_allclose(logits, np.asarray(ref), atol=1e-5)
    assert np.abs(np.asarray(ref)).max() > 0.1  # not trivially small

    # Swapping the two images changes the answer: each image lands on its own placeholder.
    swapped, _ = mm.logits([prompt], images=[list(pixels[::-1])], audio=[list(mels)])
    assert np.abs(swapped - logits).max() > 1e-3

    # Generation prefills the same spliced prompt: its first token is the argmax of the last logits.
    tokens = mm.generate([prompt], images=[list(pixels)], audio=[list(mels)], max_new_tokens=3, stop_token_ids=[])
    assert tokens[0][0] == int(np.asarray(ref)[0, -1].argmax()) and len(tokens[0]) == 3


def test_assembly_input_errors(model):
    mm, _ = model
    pixels, mels = _inputs(1)
    with pytest.raises(ValueError, match=r"prompt #1 has 0 audio placeholder token\(s\) \(id 4\) but 1 audio"):
        mm.logits([[7, IMAGE_ID]], images=[[pixels[0]]], audio=[[mels[0]]])
    with pytest.raises(ValueError, match=r"features have shape \(8, 10\); this model takes \(8, 12\)"):
        mm.logits([[AUDIO_ID]], audio=[[mels[0][:, :10]]])
    with pytest.raises(ValueError, match=r"no feature extractor: pass log-mel features \[8, 12\]"):
        mm.logits([[AUDIO_ID]], audio=[[np.zeros(16000, np.float32)]])
    with pytest.raises(ValueError, match=r"token id 48 is out of range: the vocabulary size is 48"):
        mm.logits([[7, 48]])
    with pytest.raises(ValueError, match=r"1 rows of image items for 2 prompts"):
        mm.logits([[IMAGE_ID], [IMAGE_ID]], images=[[pixels[0]]])
    with pytest.raises(ValueError, match=r"audio projector takes 24 features but Whisper outputs 16"):
        audio_modality(WHISPER, None, projector.ProjectorConfig(in_features=24, out_features=32), None,
                       token_id=AUDIO_ID)
