"""LLaVA's multimodal projector: vision features -> the language model's embedding space, behind a pure `project`.

linear_1 -> projector_hidden_act -> linear_2 (biases per multimodal_projector_bias), as transformers'
LlavaMultiModalProjector. Its input is `vision.image_features(...)`: [B, T, vision hidden * number of feature layers].
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.models.layers import Linear
from kvzip_jax.models.safetensors_index import TensorRule, find_prefix, load_tensors, open_index, transposed
from kvzip_jax.models.vision import ACTIVATIONS, SELECT_STRATEGIES, VisionConfig, check_activation
from kvzip_jax.sharding import DEFAULT_RULES, AxesTable

# transformers 5 writes `multi_modal_projector.` at the top level of a LLaVA checkpoint; some 4.x saves nest it.
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectorConfig:
    """The projector of a LLaVA config, with the vision-feature choices that fix its input width."""

    in_features: int  # vision hidden size * number of vision feature layers
    out_features: int  # the language model's hidden size
    hidden_act: str = "gelu"
    bias: bool = True
    feature_layer: int | tuple[int, ...] = -2
    feature_select_strategy: str = "default"

    def __post_init__(self):
        check_activation(self.hidden_act, "projector_hidden_act")
        if self.feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy {self.feature_select_strategy!r} is not supported; supported: "
                + ", ".join(SELECT_STRATEGIES)
            )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ProjectorConfig:
        path = os.fspath(path)
        config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json at {config_path}")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ProjectorConfig:
        """From a LLaVA config dict (transformers' LlavaConfig defaults for keys it omits)."""
        if "text_config" not in hf or "vision_config" not in hf:
            raise ValueError(
                f"a LLaVA config needs text_config and vision_config; got model_type {hf.get('model_type')!r}"
            )
        vision = VisionConfig.from_hf_dict(hf)
        layer = hf.get("vision_feature_layer", -2)
        layer = int(layer) if isinstance(layer, int) else tuple(int(k) for k in layer)
        n_layers = 1 if isinstance(layer, int) else len(layer)
        return cls(
            in_features=vision.hidden_size * n_layers,
            out_features=int((hf["text_config"] or {}).get("hidden_size", 4096)),  # LlavaConfig's default: Llama
            hidden_act=hf.get("projector_hidden_act") or "gelu",
            bias=bool(hf.get("multimodal_projector_bias", True)),
            feature_layer=layer,
            feature_select_strategy=hf.get("vision_feature_select_strategy") or "default",
        )


class Projector(nnx.Module):
    def __init__(self, config: ProjectorConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.act = c.hidden_act
        self.linear_1 = Linear(c.in_features, c.out_features, bias=c.bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(c.out_features, c.out_features, bias=c.bias, dtype=dtype, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.linear_2(ACTIVATIONS[self.act](self.linear_1(features.astype(self.linear_1.kernel[...].dtype))))


@functools.cache
def graphdef_for(config: ProjectorConfig, dtype_name: str = "float32") -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: Projector(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0))))


def abstract_params(config: ProjectorConfig, dtype=jnp.float32) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: Projector(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))))


def init_params(config: ProjectorConfig, seed: int = 0, dtype=jnp.float32) -> nnx.State:
    return nnx.state(Projector(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(params=seed)))


def project(params: nnx.State, features: jax.Array, *, config: ProjectorConfig) -> jax.Array:
    """features [..., in_features] -> [..., out_features] (the decoder's input embeddings). Traceable."""
    dtype = jnp.dtype(params["linear_1"]["kernel"][...].dtype).name
    return nnx.merge(graphdef_for(config, dtype), params)(features)


# Param path -> logical axes (kvzip_jax.sharding): the hidden width is sharded like a decoder MLP's.
PROJECTOR_LOGICAL_AXES: AxesTable = (
    (r"^linear_1/kernel$", ("embed", "mlp")),
    (r"^linear_1/bias$", ("mlp",)),
    (r"^linear_2/kernel$", ("mlp", "embed")),
    (r"^linear_2/bias$", ("embed",)),
)


def _rules(config: ProjectorConfig) -> list[TensorRule]:
    rules = []
    for name in ("linear_1", "linear_2"):
        rules.append(TensorRule(f"{name}/kernel", f"{name}.weight", transposed))
        if config.bias:
            rules.append(TensorRule(f"{name}/bias", f"{name}.bias"))
    return rules


def load_projector_params(
    path: str | os.PathLike,
    config: ProjectorConfig | None = None,
    *,
    prefix: str | None = None,
    dtype=None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
) -> tuple[ProjectorConfig, nnx.State]:
    """Read the projector from a LLaVA safetensors checkpoint (a directory, or a file in it).

    prefix None finds it among PROJECTOR_PREFIXES; dtype None keeps the checkpoint's dtype; mesh: each tensor goes
    straight onto its sharding (PROJECTOR_LOGICAL_AXES through `rules`).
    """
    directory, index = open_index(path)
    config = config or ProjectorConfig.from_pretrained(directory)
    prefix = find_prefix(index, prefix, PROJECTOR_PREFIXES, "linear_1.weight")
    abstract = abstract_params(config, dtype if dtype is not None else index.get(prefix + "linear_1.weight").dtype)
    params = load_tensors(index, _rules(config), abstract, prefix=prefix, owned=("linear_",), mesh=mesh,
                          axes=PROJECTOR_LOGICAL_AXES, mesh_rules=rules)
    return config, params
