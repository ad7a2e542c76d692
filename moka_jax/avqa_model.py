"""The small audio-visual model of the MokA evidence experiment: its encoders and how they become LLM tokens.

- Image: a CLIP-style ViT (32 x 32 pixels, 8 x 8 patches, 2 layers, width 64); its 16 patch features (the class
  token dropped, LLaVA's "default" selection) are the 16 image tokens.
- Audio: a Whisper-style encoder on a 1 s, 40-bin log-mel (100 frames -> 50 positions, 2 layers, width 64); its
  50 positions are mean-pooled in windows of 5 into 10 audio tokens (the role the Q-Former's 32 queries play in
  the paper's framework: fewer, denser tokens per clip).
- The language model: the shipped demo LLM (`kvzip_jax/assets/demo_model`), frozen.

Both encoders are pre-trained here (attribute classification from the task's own labels) and frozen afterwards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvzip_jax.models import audio, vision
from kvzip_jax.preprocess.audio import WhisperFeatureExtractor
from moka_jax import avqa

VISION = vision.VisionConfig(model_type=vision.CLIP, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
AUDIO = audio.WhisperEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_mel_bins=40,
                                   max_source_positions=50)
LOG_MEL = WhisperFeatureExtractor(feature_size=40, chunk_length=1)
AUDIO_POOL = 5
N_IMAGE_TOKENS = VISION.num_patches
N_AUDIO_TOKENS = AUDIO.max_source_positions // AUDIO_POOL
# CLIP's normalisation constants (the images are natural-looking RGB in [0, 1]).
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def pixels(images) -> np.ndarray:
    """float [B, H, W, 3] in [0, 1] -> normalised NCHW, as CLIP's processor gives them."""
    return ((np.asarray(images, np.float32) - IMAGE_MEAN) / IMAGE_STD).transpose(0, 3, 1, 2)


def log_mel(waveforms) -> np.ndarray:
    """float [B, n] at 16 kHz (1 s) -> [B, 40, 100]."""
    return LOG_MEL(np.asarray(waveforms, np.float32), sampling_rate=LOG_MEL.sampling_rate)


def image_tokens(params: nnx.State, pixel_values: jax.Array) -> jax.Array:
    """[B, 3, 32, 32] -> [B, 16, 64]: the patch features."""
    return vision.encode(params, pixel_values, config=VISION)[:, 1:]


def audio_tokens(params: nnx.State, mels: jax.Array) -> jax.Array:
    """[B, 40, 100] -> [B, 10, 64]: encoder positions mean-pooled in windows of AUDIO_POOL."""
    h = audio.encode_whisper(params, mels, config=AUDIO)
    b, t, d = h.shape
    return h.reshape(b, t // AUDIO_POOL, AUDIO_POOL, d).mean(axis=2)


@jax.jit
def encode_features(encoders: dict, pixel_values: jax.Array, mels: jax.Array) -> dict[str, jax.Array]:
    """The frozen encoders on a batch: {"image": [B, 16, 64], "audio": [B, 10, 64]}."""
    return {"image": image_tokens(encoders["image"], pixel_values), "audio": audio_tokens(encoders["audio"], mels)}


# ---------------------------------------------------------------------------------------------- pre-training
@dataclasses.dataclass(frozen=True)
class EncoderTraining:
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    samples: int = 4096
    seed: int = 0


def _labelled_set(cfg: EncoderTraining, data_seed: int):
    samples = [avqa.make_sample(data_seed, i) for i in range(cfg.samples)]
    images = pixels(np.stack([s.image for s in samples]).astype(np.float32) / 255.0)
    mels = log_mel(np.stack([s.audio for s in samples]))
    image_y = {k: np.array([avqa.image_labels(s)[k] for s in samples]) for k in avqa.IMAGE_LABEL_CLASSES}
    audio_y = {k: np.array([avqa.audio_labels(s)[k] for s in samples]) for k in avqa.AUDIO_LABEL_CLASSES}
    return images, mels, image_y, audio_y


def _heads(key, width: int, classes: dict[str, int]) -> dict[str, jax.Array]:
    keys = jax.random.split(key, len(classes))
    return {k: 0.02 * jax.random.normal(kk, (width, n)) for kk, (k, n) in zip(keys, classes.items(), strict=True)}


def _classification_loss(pooled: jax.Array, heads: dict, labels: dict) -> tuple[jax.Array, jax.Array]:
    losses, correct = [], []
    for name, w in heads.items():
        logits = pooled @ w
        losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, labels[name]).mean())
        correct.append((jnp.argmax(logits, -1) == labels[name]).mean())
    return sum(losses) / len(losses), sum(correct) / len(correct)


def pretrain_encoders(cfg: EncoderTraining = EncoderTraining(), *, data_seed: int = 0, progress=None):
    """Train both encoders to classify the task's attributes (image: colours, kinds, count; audio: beeps, pitch,
    timbre) from their pooled features. Returns ({"image": params, "audio": params}, {"image": acc, "audio": acc})
    with the final training accuracy of each."""
    images, mels, image_y, audio_y = _labelled_set(cfg, data_seed)
    key = jax.random.key(cfg.seed)
    params = {
        "image": vision.init_params(VISION, seed=cfg.seed), "audio": audio.init_params(AUDIO, seed=cfg.seed + 1),
        "image_heads": _heads(jax.random.fold_in(key, 0), VISION.hidden_size, avqa.IMAGE_LABEL_CLASSES),
        "audio_heads": _heads(jax.random.fold_in(key, 1), AUDIO.hidden_size, avqa.AUDIO_LABEL_CLASSES),
    }
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.steps // 20, cfg.steps), 0.9,
                     0.999, weight_decay=1e-4)
    opt_state = tx.init(params)

    def loss_fn(p, px, mel, iy, ay):
        img = vision.encode(p["image"], px, config=VISION)[:, 0]  # the class token
        aud = audio_tokens(p["audio"], mel).mean(axis=1)
        li, ai = _classification_loss(img, p["image_heads"], iy)
        la, aa = _classification_loss(aud, p["audio_heads"], ay)
        return li + la, (ai, aa)

    @jax.jit
    def step(p, o, px, mel, iy, ay):
        (loss, accs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, px, mel, iy, ay)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss, accs

    rng = np.random.default_rng(cfg.seed)
    accs = (0.0, 0.0)
    for i in range(cfg.steps):
        idx = rng.choice(cfg.samples, cfg.batch_size, replace=False)
        params, opt_state, loss, accs = step(params, opt_state, images[idx], mels[idx],
                                             {k: v[idx] for k, v in image_y.items()},
                                             {k: v[idx] for k, v in audio_y.items()})
        if progress is not None:
            progress(i + 1, float(loss))
    return {"image": params["image"], "audio": params["audio"]}, {"image": float(accs[0]), "audio": float(accs[1])}
