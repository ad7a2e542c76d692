"""Multimodal LMs for notebooks and scripts: a text decoder plus one encoder per modality, whose outputs replace the
modality's placeholder tokens in the prompt (LLaVA for images; any encoder set, e.g. MokA's image + audio).

    mm = MultimodalLM.from_pretrained("path/to/llava")            # transformers' LlavaForConditionalGeneration layout
    mm.generate(["USER: <image>\\nWhat is shown? ASSISTANT:"], images=[[Image.open("cat.png")]])

Each prompt holds one placeholder token per item (`<image>` once per image); the model expands it to the encoder's
token count. Every forward also reports per-token `modality_ids` (text / image / audio / pad), what MokA reads.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import ModelConfig
from kvzip_jax.generate import (
    DEFAULT_CHUNK,
    DEFAULT_SAMPLING,
    SamplingConfig,
    check_positions,
    check_token_ids,
    continue_generation,
    pad_prompts,
    prefill_embeddings,
)
from kvzip_jax.models import audio, llava, projector, vision
from kvzip_jax.models.decoder import embed, forward
from kvzip_jax.preprocess import ImageProcessor, WhisperFeatureExtractor

MODALITY_ORDER = ("image", "audio")  # the non-text modalities a model may take


@dataclasses.dataclass(frozen=True)
class Modality:
    """One non-text input kind: its placeholder token, how many embeddings one item becomes, and the encoder.

    `encode_fn(params, batch)` maps a stacked batch of preprocessed items [N, ...] to [N, tokens_per_item, text
    hidden] (jitted; params apart so that a server can place a copy on each of its devices); `prepare(item)` turns
    one user item (an image, a waveform, a preprocessed array) into the encoder's input."""

    name: str
    token_id: int
    tokens_per_item: int
    input_shape: tuple[int, ...]  # one preprocessed item, e.g. (3, 336, 336) pixels or (80, 3000) log-mel
    encode_fn: Callable[[Any, np.ndarray], jax.Array]
    params: Any
    prepare: Callable[[Any], np.ndarray]

    def __post_init__(self):
        if self.name not in MODALITY_ORDER:
            raise ValueError(f"modality {self.name!r} is not supported; supported: {', '.join(MODALITY_ORDER)}")

    def encode(self, batch) -> jax.Array:
        return self.encode_fn(self.params, batch)

    def embed_items(self, items: Sequence[Any]) -> jax.Array:
        """[N, tokens_per_item, H] for N items, encoded in one call padded to a power-of-two batch."""
        batch = np.stack([np.asarray(self.prepare(item), np.float32) for item in items])
        n = len(items)
        bucket = 1 << (n - 1).bit_length()  # a power of two: a new item count rarely compiles a new encoder shape
        padded = np.concatenate([batch, np.zeros((bucket - n, *batch.shape[1:]), batch.dtype)]) if bucket > n else batch
        return self.encode(padded)[:n]


@dataclasses.dataclass
class MultimodalInputs:
    """A prepared batch: the spliced input embeddings [B, T, H], the expanded token ids [B, T] (placeholders
    where encoder embeddings sit), each row's length and per-token modality ids [B, T]."""

    embeddings: jax.Array
    tokens: np.ndarray
    lengths: np.ndarray
    modality_ids: np.ndarray


@dataclasses.dataclass
class MultimodalLM:
    config: ModelConfig
    params: nnx.State
    modalities: Mapping[str, Modality]
    tokenizer: Any = None

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None, tokenizer: Any = True
    ) -> MultimodalLM:
        """A LLaVA checkpoint directory (transformers' `LlavaForConditionalGeneration.save_pretrained` layout: CLIP
        or SigLIP tower, MLP projector, Llama / Qwen2 / ... text model). Images given as pictures (PIL, uint8
        arrays, file paths) are preprocessed with the directory's preprocessor_config.json; float arrays [C, H, W]
        are taken as already preprocessed pixels."""
        from kvzip_jax.lm import pretrained_tokenizer  # lm imports nothing multimodal; keep it that way

        config, params = llava.load_llava(path, dtype=dtype, mesh=mesh)
        processor_file = os.path.join(os.fspath(path), "preprocessor_config.json")
        processor = ImageProcessor.from_pretrained(processor_file) if os.path.exists(processor_file) else None
        image = image_modality(config.vision, params["vision"], config.projector, params["projector"],
                               token_id=config.image_token_id, processor=processor)
        if tokenizer is True:
            tokenizer = pretrained_tokenizer(path)
        return cls(config.text, params["text"], {"image": image}, None if tokenizer is False else tokenizer)

    # ------------------------------------------------------------------------------------------- inputs
    def encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer; pass token ids instead of text")
        return list(self.tokenizer(text)["input_ids"])

    def prepare(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        images: Sequence[Sequence[Any]] | None = None,
        audio: Sequence[Sequence[Any]] | None = None,
    ) -> MultimodalInputs:
        """Tokenize (text prompts), check one placeholder per item, expand the placeholders, encode every item
        of every modality in one call per modality, and splice the embeddings in. `images[b]` (`audio[b]`) lists
        row b's items of that modality, e.g. images=[[img1, img2], [], [img3]]."""
        items = {"image": images, "audio": audio}
        if isinstance(prompts, str):
            raise TypeError("prompts is a list: [prompt]")
        if not len(prompts):
            raise ValueError("no prompts given")
        rows = [self.encode_text(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        given = {name: per_row for name, per_row in items.items() if per_row is not None}
        unknown = sorted(set(given) - set(self.modalities))
        if unknown:
            raise ValueError(f"this model takes no {unknown[0]} inputs; it takes: {', '.join(self.modalities)}")
        for name, modality in self.modalities.items():
            per_row = given.get(name) or [[] for _ in rows]
            if len(per_row) != len(rows):
                raise ValueError(f"{len(per_row)} rows of {name} items for {len(rows)} prompts")
            llava.check_placeholders(rows, modality.token_id, [len(r) for r in per_row], name)
            rows = [llava.expand_placeholders(r, modality.token_id, modality.tokens_per_item) for r in rows]
        empty = [b for b, r in enumerate(rows) if not r]
        if empty:
            raise ValueError(f"prompt #{empty[0] + 1} is empty (0 tokens)")
        check_positions(max(len(r) for r in rows) - 1, self.config)
        tokens, lengths = pad_prompts(rows)
        check_token_ids(tokens, self.config)  # an embedding lookup would clamp an out-of-range id silently
        embeddings = _embed_tokens(self.params, jnp.asarray(tokens), config=self.config)
        for name, modality in self.modalities.items():
            flat = [item for row in given.get(name) or [] for item in row]
            if flat:
                embeddings = _splice(embeddings, jnp.asarray(tokens), modality.embed_items(flat),
                                     token_id=modality.token_id)
        ids = llava.modality_ids(tokens, lengths, {m.name: m.token_id for m in self.modalities.values()})
        return MultimodalInputs(embeddings, tokens, lengths, ids)

    # ------------------------------------------------------------------------------------------- outputs
    def logits(self, prompts, *, images=None, audio=None) -> tuple[np.ndarray, np.ndarray]:
        """Logits [B, T, V] of every (expanded) prompt position, and the modality ids [B, T]. Past a row's length
        both are padding (ids PAD)."""
        inputs = self.prepare(prompts, images=images, audio=audio)
        positions = jnp.broadcast_to(jnp.arange(inputs.tokens.shape[1], dtype=jnp.int32), inputs.tokens.shape)
        return np.asarray(_all_logits(self.params, inputs.embeddings, positions, config=self.config)), \
            inputs.modality_ids

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        stop_token_ids: Sequence[int] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        seed: int = 0,
        images: Sequence[Sequence[Any]] | None = None,
        audio: Sequence[Sequence[Any]] | None = None,
    ) -> list[str] | list[list[int]]:
        """Prefill the spliced prompts into a dense cache, then the text decoder's generation loop. Text in,
        text out (with a tokenizer); token ids in, new token ids out."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        inputs = self.prepare(prompts, images=images, audio=audio)
        longest = int(inputs.lengths.max())
        check_positions(longest + max_new_tokens - 1, self.config)
        cache = DenseKVCache.zeros(self.config, len(inputs.lengths), longest + max_new_tokens,
                                   inputs.embeddings.dtype)
        logits, cache = prefill_embeddings(self.params, self.config, inputs.embeddings, inputs.lengths, cache,
                                           chunk_size=chunk_size)
        result = continue_generation(self.params, self.config, logits, cache, max_new_tokens=max_new_tokens,
                                     sampling=sampling, stop_token_ids=self._stops(stop_token_ids), seed=seed)
        if not isinstance(prompts[0], str):
            return result.tokens
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]

    def _stops(self, stop_token_ids: Sequence[int] | None) -> Sequence[int]:
        if stop_token_ids is not None:
            return stop_token_ids
        stops = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        return sorted(stops)


# --------------------------------------------------------------------------------------------- modality builders
def image_modality(
    vision_config: vision.VisionConfig, vision_params: nnx.State, projector_config: projector.ProjectorConfig,
    projector_params: nnx.State, *, token_id: int, processor: ImageProcessor | None = None,
) -> Modality:
    """Images through a CLIP / SigLIP tower (LLaVA's feature layer and selection) and a projector. Pictures are
    preprocessed by `processor`; float [C, H, W] arrays are taken as preprocessed pixels."""
    config = llava.ImageEncoderConfig(vision_config, projector_config)
    return Modality(
        name="image", token_id=token_id, tokens_per_item=config.tokens_per_image,
        input_shape=(vision_config.num_channels, vision_config.image_size, vision_config.image_size),
        encode_fn=functools.partial(_image_embeddings, config=config),
        params={"vision": vision_params, "projector": projector_params},
        prepare=functools.partial(_image_pixels, processor, vision_config),
    )


def audio_modality(
    whisper_config: audio.WhisperEncoderConfig, whisper_params: nnx.State,
    projector_config: projector.ProjectorConfig, projector_params: nnx.State, *, token_id: int,
    feature_extractor: WhisperFeatureExtractor | None = None,
) -> Modality:
    """Speech through Whisper's encoder and a projector (MokA's audio branch; one 30 s window per item, longer
    audio is an error of the feature extractor). Waveforms (1-D float arrays at the extractor's sampling rate) go
    through `feature_extractor`; 2-D [mel, frames] arrays are taken as log-mel features."""
    if projector_config.in_features != whisper_config.hidden_size:
        raise ValueError(f"the audio projector takes {projector_config.in_features} features but Whisper outputs "
                         f"{whisper_config.hidden_size}")
    return Modality(
        name="audio", token_id=token_id, tokens_per_item=whisper_config.max_source_positions,
        input_shape=(whisper_config.num_mel_bins, whisper_config.num_frames),
        encode_fn=functools.partial(_audio_embeddings, whisper=whisper_config, proj=projector_config),
        params={"encoder": whisper_params, "projector": projector_params},
        prepare=functools.partial(_audio_features, feature_extractor, whisper_config),
    )


# ----------------------------------------------------------------------------------------------- jitted pieces
@functools.partial(jax.jit, static_argnames=("config",))
def _embed_tokens(params, tokens, *, config):
    return embed(params, tokens, config=config)


@functools.partial(jax.jit, static_argnames=("token_id",))
def _splice(embeddings, tokens, features, *, token_id):
    return llava.splice(embeddings, tokens, features, token_id)


@functools.partial(jax.jit, static_argnames=("config",))
def _all_logits(params, embeddings, positions, *, config):
    logits, _ = forward(params, embeddings, positions, None, config=config, logits_at="all")
    return logits


@functools.partial(jax.jit, static_argnames=("config",))
def _image_embeddings(params, pixel_values, *, config):
    return llava.image_embeddings(params, pixel_values, config=config)


@functools.partial(jax.jit, static_argnames=("whisper", "proj"))
def _audio_embeddings(params, features, *, whisper, proj):
    return projector.project(params["projector"], audio.encode_whisper(params["encoder"], features, config=whisper),
                             config=proj)


def _image_pixels(processor: ImageProcessor | None, config: vision.VisionConfig, item) -> np.ndarray:
    """One image -> its [C, H, W] float32 pixels: a float array is taken as preprocessed, anything else goes
    through the image processor."""
    expected = (config.num_channels, config.image_size, config.image_size)
    if isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.floating):
        pixels = item
    elif processor is None:
        raise ValueError(f"no image processor (the checkpoint has no preprocessor_config.json): pass preprocessed "
                         f"float32 pixels {expected}")
    else:
        pixels = processor.preprocess_one(item)
    if pixels.shape != expected:
        raise ValueError(f"an image's pixels have shape {tuple(pixels.shape)}; this model takes {expected} (C, H, W)")
    return pixels


def _audio_features(extractor: WhisperFeatureExtractor | None, config: audio.WhisperEncoderConfig, item):
    """One clip -> its [mel, frames] log-mel features: 2-D arrays are taken as features, 1-D ones are waveforms."""
    item = np.asarray(item)
    if item.ndim == 1:
        if extractor is None:
            raise ValueError(f"no feature extractor: pass log-mel features [{config.num_mel_bins}, "
                             f"{config.num_frames}] instead of a waveform")
        item = extractor(item, sampling_rate=extractor.sampling_rate)[0]
    expected = (config.num_mel_bins, config.num_frames)
    if item.shape != expected:
        raise ValueError(f"a clip's features have shape {item.shape}; this model takes {expected} (mel, frames)")
    return item
