"""The shipped audio-visual demo model: ask it about a picture and a sound.

`moka_jax/assets/avqa_demo/` holds what `scripts/build_moka_demo.py` trained on the synthetic AV-QA task
(`moka_jax.avqa`): the two small encoders (stage 0, frozen), and the MokA adapter of every linear of the shipped
demo LLM together with the image and audio projectors (stages 1-2); the LLM itself is `kvzip_jax`'s demo model,
loaded from its own package data and never modified. `manifest.json` records how it was trained and what it
scored on the held-out split.

    from moka_jax.demo import load_demo
    demo = load_demo()
    demo.answer(images, sounds, ["how many beeps are there?", ...])   # [32, 32, 3] pictures, 1 s sounds at 16 kHz

For a server: `demo.modalities()` (the encoders with their projectors, as `kvzip_jax.multimodal_lm.Modality`s) and
`demo.prompt(question)` (the expanded prompt with its modality ids and question keys) are what the serving engine
takes (`serving.moka_demo`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from kvzip_jax.models import projector
from kvzip_jax.multimodal_lm import Modality
from moka_jax import avqa, avqa_model, checkpoint, data, experiment
from moka_jax.config import MokAConfig
from moka_jax.train import AdaptedMultimodalLM, split_trainable

DEMO_DIR = pathlib.Path(__file__).parent / "assets" / "avqa_demo"
ENCODERS_FILE = "encoders.safetensors"
ADAPTER_DIR = "adapter"  # adapter_model.safetensors (MokA adapters + projectors) + adapter_config.json
MANIFEST_FILE = "manifest.json"
IMAGE_SHAPE = (avqa_model.VISION.image_size, avqa_model.VISION.image_size, 3)
AUDIO_SAMPLES = int(avqa_model.LOG_MEL.sampling_rate * avqa_model.LOG_MEL.chunk_length)


@dataclasses.dataclass
class AVQADemo:
    model: AdaptedMultimodalLM
    moka: MokAConfig
    encoders: dict
    manifest: dict

    def answer(self, images: Sequence[np.ndarray], sounds: Sequence[np.ndarray], questions: Sequence[str], *,
               active: Sequence[str] | None = None, max_new_tokens: int = 6) -> list[str]:
        """Greedy answers, one per (picture, sound, question): pictures float [32, 32, 3] in [0, 1] (or uint8),
        sounds float [16000] (1 s at 16 kHz). `active`: only these modalities' tokens take the adapter path."""
        if not len(questions):
            raise ValueError("no questions given")
        if not len(images) == len(sounds) == len(questions):
            raise ValueError(f"{len(images)} pictures, {len(sounds)} sounds and {len(questions)} questions: "
                             "give one picture and one sound per question")
        tokenizer = data.load_demo_tokenizer()
        limit = self.model.config.max_position_embeddings - max_new_tokens
        rows = [data.encode_question(tokenizer, _picture(i, image), _sound(i, sound), question, seq_len=limit,
                                     n_image_tokens=avqa_model.N_IMAGE_TOKENS,
                                     n_audio_tokens=avqa_model.N_AUDIO_TOKENS)
                for i, (image, sound, question) in enumerate(zip(images, sounds, questions, strict=True))]
        width = -(-max(int(r["length"]) for r in rows) // 8) * 8  # one compiled shape per multiple of 8
        prompts = {k: np.stack([r[k][:width] if k in _TOKEN_ARRAYS else r[k] for r in rows])
                   for k in rows[0]}
        return experiment.generate_answers(self.model, self.moka, self.encoders, prompts, active=active,
                                           max_new_tokens=max_new_tokens)


    def prompt(self, question: str, *, max_new_tokens: int = 6) -> dict[str, np.ndarray]:
        """The generation prompt `answer` builds for `question`, unpadded: tokens [T] (the pad id where the picture's
        and the sound's tokens go), modality_ids [T] and key_mask [T] (the instruction + question tokens)."""
        tokenizer = data.load_demo_tokenizer()
        row = data.encode_question(tokenizer, np.zeros(IMAGE_SHAPE, np.float32), np.zeros(AUDIO_SAMPLES, np.float32),
                                   question, seq_len=self.model.config.max_position_embeddings - max_new_tokens,
                                   n_image_tokens=avqa_model.N_IMAGE_TOKENS, n_audio_tokens=avqa_model.N_AUDIO_TOKENS)
        n = int(row["length"])
        return {k: row[k][:n] for k in ("tokens", "modality_ids", "key_mask")}

    def modalities(self) -> dict[str, Modality]:
        """The picture and the sound as a server takes them: each through its frozen encoder and its trained
        projector, to [tokens, hidden] embeddings. `prepare` checks and preprocesses one item as `answer` does."""
        hidden = self.model.config.hidden_size
        configs = experiment.projector_configs(hidden)
        pad = data._special_id(data.load_demo_tokenizer(), "<|pad|>")  # the prompts' placeholder token
        image = Modality(
            name="image", token_id=pad, tokens_per_item=avqa_model.N_IMAGE_TOKENS,
            input_shape=(IMAGE_SHAPE[2], *IMAGE_SHAPE[:2]),
            encode_fn=functools.partial(_image_embeddings, config=configs["image"]),
            params={"encoder": self.encoders["image"], "projector": nnx.state(self.model.projectors.image)},
            prepare=_picture_pixels,
        )
        sound = Modality(
            name="audio", token_id=pad, tokens_per_item=avqa_model.N_AUDIO_TOKENS,
            input_shape=(avqa_model.LOG_MEL.feature_size, avqa_model.AUDIO.num_frames),
            encode_fn=functools.partial(_audio_embeddings, config=configs["audio"]),
            params={"encoder": self.encoders["audio"], "projector": nnx.state(self.model.projectors.audio)},
            prepare=_sound_features,
        )
        return {"image": image, "audio": sound}


@functools.partial(jax.jit, static_argnames=("config",))
def _image_embeddings(params, pixel_values, *, config):
    return projector.project(params["projector"], avqa_model.image_tokens(params["encoder"], pixel_values),
                             config=config)


@functools.partial(jax.jit, static_argnames=("config",))
def _audio_embeddings(params, mels, *, config):
    return projector.project(params["projector"], avqa_model.audio_tokens(params["encoder"], mels), config=config)


def _picture_pixels(image) -> np.ndarray:
    """One picture (uint8 or floats in [0, 1], [32, 32, 3], or a PIL image of any size, resized to 32 x 32 with
    a bicubic filter as CLIP's processor does) -> normalised [3, 32, 32] pixels."""
    if hasattr(image, "convert"):  # a PIL image
        from PIL import Image

        image = image.convert("RGB")
        if image.size != IMAGE_SHAPE[:2]:
            image = image.resize(IMAGE_SHAPE[:2], Image.Resampling.BICUBIC)
        image = np.asarray(image)
    return avqa_model.pixels(_picture(0, image)[None])[0]


def _sound_features(sound) -> np.ndarray:
    """One sound at 16 kHz, at most 1 s (a shorter one is padded with silence, as Whisper's extractor pads) -> its
    [40, 100] log-mel."""
    sound = np.asarray(sound, np.float32)
    if sound.ndim == 1 and len(sound) < AUDIO_SAMPLES:
        sound = np.pad(sound, (0, AUDIO_SAMPLES - len(sound)))
    return avqa_model.log_mel(_sound(0, sound)[None])[0]


_TOKEN_ARRAYS = ("tokens", "modality_ids", "key_mask", "loss_weights")


def _picture(i: int, image) -> np.ndarray:
    image = np.asarray(image)
    if image.shape != IMAGE_SHAPE:
        raise ValueError(f"picture #{i + 1} has shape {image.shape}; the demo's encoder takes {IMAGE_SHAPE} "
                         "(H, W, RGB)")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating) or image.min() < 0.0 or image.max() > 1.0:
        raise ValueError(f"picture #{i + 1}: give uint8 or floats in [0, 1], got {image.dtype} in "
                         f"[{image.min()}, {image.max()}]")
    return image.astype(np.float32)


def _sound(i: int, sound) -> np.ndarray:
    sound = np.asarray(sound, np.float32)
    if sound.shape != (AUDIO_SAMPLES,):
        raise ValueError(f"sound #{i + 1} has shape {sound.shape}; the demo's encoder takes ({AUDIO_SAMPLES},): "
                         f"{avqa_model.LOG_MEL.chunk_length} s at {avqa_model.LOG_MEL.sampling_rate} Hz, mono")
    return sound


def save_demo(directory: str | os.PathLike, model: AdaptedMultimodalLM, moka: MokAConfig, encoders: dict,
              manifest: dict) -> None:
    """Write the demo's files: encoders, adapter + projectors (with their config), manifest."""
    os.makedirs(directory, exist_ok=True)
    checkpoint.save_state(os.path.join(directory, ENCODERS_FILE), encoders)
    _, trainable, _ = split_trainable(model)
    checkpoint.save_adapter(os.path.join(directory, ADAPTER_DIR), trainable, moka, base_model="kvzip_jax demo_model")
    with open(os.path.join(directory, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def load_demo(directory: str | os.PathLike = DEMO_DIR) -> AVQADemo:
    """The demo model from `directory` (default: the shipped one), ready to answer."""
    missing = [f for f in (ENCODERS_FILE, ADAPTER_DIR, MANIFEST_FILE) if not os.path.exists(os.path.join(directory, f))]
    if missing:
        raise FileNotFoundError(f"{directory} is not a MokA demo directory: missing {', '.join(missing)} "
                                "(scripts/build_moka_demo.py writes one)")
    adapter_dir = os.path.join(directory, ADAPTER_DIR)
    moka = checkpoint.load_adapter_config(adapter_dir)
    model = experiment.build_model(experiment.load_llm(), moka, seed=0)
    _, target, _ = split_trainable(model)
    nnx.update(model, checkpoint.load_adapter(adapter_dir, target, moka))
    encoders = checkpoint.load_state(os.path.join(directory, ENCODERS_FILE), experiment.encoder_target())
    with open(os.path.join(directory, MANIFEST_FILE)) as f:
        manifest = json.load(f)
    return AVQADemo(model, moka, encoders, manifest)


def held_out_samples(count: int, *, data_seed: int = 0, start: int = 0) -> list[avqa.AVQASample]:
    """Samples `start`.. of the task's test split (never seen in training)."""
    first = data.SPLIT_STARTS["test"] + start
    return [avqa.make_sample(data_seed, first + i) for i in range(count)]
