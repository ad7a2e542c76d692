"""LLaVA-style multimodal LMs: a vision tower and a projector whose outputs replace the image placeholder tokens of
the prompt in the text decoder's input embeddings, as transformers' `LlavaForConditionalGeneration` does.

The pieces stay pure: `LlavaConfig` names the three parts, `load_llava` reads them from one checkpoint directory,
`image_embeddings` runs tower + projector, and `splice` / `modality_ids` work on any modality (MokA's audio-visual
setting uses them with an audio encoder too). `kvzip_jax.multimodal_lm.MultimodalLM` is the user-facing wrapper.

Placeholders: a prompt holds one `image_token_id` per image; `expand_placeholders` repeats it `tokens_per_image`
times (what transformers' LlavaProcessor does on the text), and `splice` fills the expanded run with that image's
features, images taken in order, row after row (transformers' `masked_scatter` order).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.config import ModelConfig
from kvzip_jax.models import projector, vision
from kvzip_jax.models.hf_io import params_from_tensors
from kvzip_jax.models.safetensors_index import open_index
from kvzip_jax.sharding import DEFAULT_RULES

# Per-token modality ids (MokA routes tokens by them); PAD marks right padding past a row's length.
TEXT, IMAGE, AUDIO, PAD = 0, 1, 2, 3
MODALITY_IDS = {"text": TEXT, "image": IMAGE, "audio": AUDIO}
# transformers' LlavaConfig default placeholder id (checkpoints name it image_token_id, older ones image_token_index).
DEFAULT_IMAGE_TOKEN_ID = 32000
# Top-level names of the non-text parts of a LLaVA checkpoint (transformers 5 layout and the nested 4.x one).
_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The text decoder, vision tower and projector of a LLaVA checkpoint, and its image placeholder token."""

    text: ModelConfig
    vision: vision.VisionConfig
    projector: projector.ProjectorConfig
    image_token_id: int

    def __post_init__(self):
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the text vocabulary "
                             f"(size {self.text.vocab_size})")
        if self.projector.out_features != self.text.hidden_size:
            raise ValueError(f"the projector outputs {self.projector.out_features} features but the text model's "
                             f"hidden size is {self.text.hidden_size}")

    @property
    def tokens_per_image(self) -> int:
        return ImageEncoderConfig(self.vision, self.projector).tokens_per_image

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> LlavaConfig:
        if "text_config" not in hf or "vision_config" not in hf:
            raise ValueError(f"not a LLaVA config: no text_config / vision_config (model_type "
                             f"{hf.get('model_type')!r})")
        token = hf.get("image_token_id", hf.get("image_token_index", DEFAULT_IMAGE_TOKEN_ID))
        return cls(
            text=ModelConfig.from_hf_dict(hf["text_config"]),
            vision=vision.VisionConfig.from_hf_dict(dict(hf)),
            projector=projector.ProjectorConfig.from_hf_dict(dict(hf)),
            image_token_id=int(token),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> LlavaConfig:
        file = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {os.fspath(path)}")
        with open(file) as f:
            return cls.from_hf_dict(json.load(f))


def load_llava(
    path: str | os.PathLike, config: LlavaConfig | None = None, *, dtype=None, mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
) -> tuple[LlavaConfig, dict[str, nnx.State]]:
    """Read a LLaVA checkpoint directory (safetensors, one file or sharded): {"text", "vision", "projector"}
    params, each tensor placed on its mesh sharding when `mesh` is given. dtype None keeps the checkpoint's."""
    config = config or LlavaConfig.from_pretrained(path)
    _, index = open_index(path)
    text_index = index.subset(lambda name: not name.startswith(_NON_TEXT_PREFIXES))
    text = params_from_tensors(text_index, config.text, dtype=dtype, mesh=mesh, rules=rules)
    _, tower = vision.load_vision_params(path, config.vision, dtype=dtype, mesh=mesh, rules=rules)
    _, proj = projector.load_projector_params(path, config.projector, dtype=dtype, mesh=mesh, rules=rules)
    return config, {"text": text, "vision": tower, "projector": proj}


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
    """A vision tower and its projector: what `image_embeddings` needs (a LlavaConfig works too)."""

    vision: vision.VisionConfig
    projector: projector.ProjectorConfig

    @property
    def tokens_per_image(self) -> int:
        """Embeddings one image contributes: the tower's tokens, less the class token the "default" strategy drops."""
        return self.vision.num_positions - int(self.projector.feature_select_strategy == "default")


def image_embeddings(
    params: Mapping[str, nnx.State], pixel_values: jax.Array, *, config: ImageEncoderConfig | LlavaConfig
) -> jax.Array:
    """pixel_values NCHW [N, C, H, W] -> [N, tokens_per_image, text hidden]: tower, feature selection, projector
    (transformers' `get_image_features`). Traceable; jit it with config static."""
    p = config.projector
    features = vision.image_features(params["vision"], pixel_values, config=config.vision,
                                     feature_layer=p.feature_layer, select_strategy=p.feature_select_strategy)
    return projector.project(params["projector"], features, config=p)


def expand_placeholders(ids: Sequence[int], token_id: int, count: int) -> list[int]:
    """Each `token_id` in `ids` repeated `count` times: the prompt as the model sees it."""
    out: list[int] = []
    for t in ids:
        out.extend([t] * count if t == token_id else [t])
    return out


def splice(embeddings: jax.Array, tokens: jax.Array, features: jax.Array, token_id: int) -> jax.Array:
    """embeddings [B, T, H] with the positions where tokens == token_id replaced, in row-major order, by the rows
    of features [N, n, H] flattened to [N * n, H]. The caller checks the counts agree (`check_placeholders`);
    positions past the features (none, when they agree) keep the last feature. Traceable."""
    flat = features.reshape(-1, features.shape[-1]).astype(embeddings.dtype)
    mask = tokens == token_id
    order = jnp.cumsum(mask.reshape(-1)) - 1
    picked = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(embeddings.shape)
    return jnp.where(mask[..., None], picked, embeddings)


def check_placeholders(rows: Sequence[Sequence[int]], token_id: int, items_per_row: Sequence[int], name: str) -> None:
    """Every row holds exactly one placeholder per item it brings (before expansion)."""
    for b, (row, n) in enumerate(zip(rows, items_per_row, strict=True)):
        found = sum(1 for t in row if t == token_id)
        if found != n:
            raise ValueError(f"prompt #{b + 1} has {found} {name} placeholder token(s) (id {token_id}) but {n} "
                             f"{name}(s) were given for it")


def modality_ids(tokens: np.ndarray, lengths: Sequence[int], placeholders: Mapping[str, int]) -> np.ndarray:
    """int8 [B, T]: TEXT, or the modality whose placeholder a position holds (`placeholders`: modality name ->
    token id), PAD past each row's length."""
    tokens = np.asarray(tokens)
    out = np.full(tokens.shape, TEXT, np.int8)
    for name, token_id in placeholders.items():
        out[tokens == token_id] = MODALITY_IDS[name]
    out[np.arange(tokens.shape[1])[None, :] >= np.asarray(lengths)[:, None]] = PAD
    return out
