"""Model surgery and the pure forward of a decoder with MokA adapters.

`apply_moka` replaces the decoder's target linears by `MokALinear`s: the base `kernel` / `bias` keep their paths
(so loaders, sharding rules and Orbax files still match) and each gains `lora_a` [L, n_a, in, r] and `lora_b`
[L, n_b, r, out] stacked over the scanned layers, typed `MokAParam` so one NNX filter selects exactly the adapter.
The adapted params are a plain `nnx.State`; `forward` takes them with the per-token `MokAContext` explicitly.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvzip_jax.config import ModelConfig
from kvzip_jax.models.decoder import Transformer, abstract_params, graphdef_for
from kvzip_jax.models.layers import Linear
from kvzip_jax.sharding import PARAM_LOGICAL_AXES, AxesTable, path_str
from moka_jax.adapter import adapter_delta, text_path_weight
from moka_jax.config import MokAConfig
from moka_jax.context import MokAContext

# Adapters are a few MB even on a 7B model: replicated, the base kernels keep their own shardings.
MOKA_LOGICAL_AXES: AxesTable = (
    (r"/lora_(a|b)$", ("layers", None, None, None)),
    *PARAM_LOGICAL_AXES,
)


class MokAParam(nnx.LoRAParam):
    """A MokA (or baseline) adapter weight. A subclass of LoRAParam, itself a Param: filter by `MokAParam` to train
    only the adapter (filtering by `nnx.Param` selects the frozen base too)."""


class MokALinear(Linear):
    """A decoder linear with an adapter term; `kernel` and `bias` are the base layer's own variables."""

    def __init__(self, base: Linear, config: MokAConfig, lora_a: jax.Array, lora_b: jax.Array, salt: int):
        self.kernel = base.kernel
        self.bias = base.bias
        self.moka = config
        self.salt = salt
        self.lora_a = MokAParam(lora_a)
        self.lora_b = MokAParam(lora_b)

    def __call__(self, x: jax.Array, adapter_context: MokAContext | None = None) -> jax.Array:
        y = super().__call__(x)
        delta = adapter_delta(x, self.lora_a[...], self.lora_b[...], adapter_context, self.moka, self.salt)
        return y + delta.astype(y.dtype)


def _linear_paths(model: nnx.Module) -> list[tuple]:
    return [tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, Linear)]


def _matches(config: MokAConfig, path: str) -> bool:
    if isinstance(config.target_modules, str):
        return re.fullmatch(config.target_modules, path) is not None
    return path.rsplit("/", 1)[-1] in config.target_modules


def target_paths(model: nnx.Module, config: MokAConfig) -> list[str]:
    """The '/'-joined paths of the linears `config.target_modules` selects; an error lists them all when none does."""
    paths = ["/".join(map(str, p)) for p in _linear_paths(model)]
    chosen = [p for p in paths if _matches(config, p)]
    if not chosen:
        raise ValueError(f"target_modules {config.target_modules!r} match no linear module; the modules are {paths}")
    return chosen


def _init_a(key: jax.Array, shape: tuple[int, ...], d_in: int, how: str) -> jax.Array:
    # PEFT: kaiming_uniform_(a=sqrt(5)) on a (r, in) weight: bound = 1/sqrt(in). Flax's he_uniform: sqrt(6/in).
    bound = 1.0 / math.sqrt(d_in) if how == "torch_kaiming" else math.sqrt(6.0 / d_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _adapt(model: Transformer, config: MokAConfig, key: jax.Array, param_dtype) -> Transformer:
    for path in target_paths(model, config):
        parts = path.split("/")
        parent = functools.reduce(getattr, parts[:-1], model)
        base = getattr(parent, parts[-1])
        lead, (d_in, d_out) = base.kernel.shape[:-2], base.kernel.shape[-2:]
        if config.rank > min(d_in, d_out):
            raise ValueError(f"rank {config.rank} is larger than {path} ({d_in} -> {d_out})")
        salt = zlib.crc32(path.encode())
        lora_a = _init_a(jax.random.fold_in(key, salt), (*lead, config.num_a, d_in, config.rank), d_in, config.a_init)
        lora_b = jnp.zeros((*lead, config.num_b, config.rank, d_out), param_dtype)
        setattr(parent, parts[-1], MokALinear(base, config, lora_a.astype(param_dtype), lora_b, salt))
    return model


def _dtype_name(params: nnx.State) -> str:
    return str(jnp.dtype(params["embed"][...].dtype))


@functools.cache
def adapted_graphdef(config: ModelConfig, moka: MokAConfig, dtype_name: str = "float32",
                     param_dtype_name: str = "float32") -> nnx.GraphDef:
    """The static structure of the adapted decoder (no memory is allocated)."""

    def build():
        model = Transformer(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0))
        return _adapt(model, moka, jax.random.key(0), jnp.dtype(param_dtype_name))

    return nnx.graphdef(nnx.eval_shape(build))


def apply_moka(params: nnx.State, config: ModelConfig, moka: MokAConfig, *, seed: int = 0,
               param_dtype=jnp.float32) -> nnx.State:
    """Base decoder params -> adapted params: every target linear gains its adapter (A initialised as PEFT does,
    B zero, so the adapted model equals the base model until it is trained). Adapters are float32 by default
    whatever the base dtype."""
    return _apply_moka(params, jax.random.key(seed), config=config, moka=moka,
                       param_dtype_name=jnp.dtype(param_dtype).name)


@functools.partial(jax.jit, static_argnames=("config", "moka", "param_dtype_name"))
def _apply_moka(params, key, *, config: ModelConfig, moka: MokAConfig, param_dtype_name: str):
    # One compiled call per (config, adapter config): eager initialisers would compile once per weight shape.
    model = nnx.merge(graphdef_for(config, _dtype_name(params)), params)
    _adapt(model, moka, key, jnp.dtype(param_dtype_name))
    return nnx.state(model)


def adapted_graphdef_of(params: nnx.State, config: ModelConfig, moka: MokAConfig) -> nnx.GraphDef:
    """The graphdef that matches adapted `params` (their base and adapter dtypes)."""
    lora_dtype = next(str(leaf.dtype) for path, leaf in _flat(params).items() if path.endswith("/lora_a"))
    return adapted_graphdef(config, moka, _dtype_name(params), lora_dtype)


def _flat(state) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {path_str(p): x for p, x in leaves}


def forward(
    params: nnx.State,
    inputs: jax.Array,
    positions: jax.Array,
    cache,
    *,
    config: ModelConfig,
    moka: MokAConfig,
    context: MokAContext | None = None,
    n_valid: jax.Array | None = None,
    logits_at: Literal["all", "last", "none"] = "all",
    remat: bool = False,
):
    """The adapted decoder's pure forward: (params, tokens | embeds, positions, cache, context) -> (logits, cache).

    `context` None treats every token as text (the decode path: A_text and B only). With cache=None the tokens
    attend only to themselves (training). Traceable; jit it."""
    model = nnx.merge(adapted_graphdef_of(params, config, moka), params)
    out = model(inputs, positions, cache, n_valid=n_valid, logits_at=logits_at, adapter_context=context, remat=remat)
    return out.logits, out.cache


def split_adapter(params: nnx.State, config: ModelConfig, moka: MokAConfig) -> tuple[nnx.State, nnx.State]:
    """(adapter weights, everything else): the two groups training and checkpoints treat differently."""
    model = nnx.merge(adapted_graphdef_of(params, config, moka), params)
    return nnx.state(model, MokAParam), nnx.state(model, nnx.Not(MokAParam))


def join_adapter(base: nnx.State, adapter: nnx.State, config: ModelConfig, moka: MokAConfig) -> nnx.State:
    """The inverse of `split_adapter`."""
    lora_dtype = next(str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(adapter))
    graphdef = adapted_graphdef(config, moka, _dtype_name(base), lora_dtype)
    return nnx.state(nnx.merge(graphdef, base, adapter))


def _fold_text_path(params: nnx.State, config: ModelConfig, moka: MokAConfig, sign: float, into: nnx.State):
    flat = _flat(params)
    folded = {}
    for path, a in flat.items():
        if path.endswith("/lora_a"):
            owner = path[: -len("/lora_a")]
            folded[owner + "/kernel"] = text_path_weight(a, flat[owner + "/lora_b"], moka)

    def fold(key_path, leaf):
        name = path_str(key_path)
        if name not in folded:
            return leaf
        return (leaf.astype(jnp.float32) + sign * folded[name]).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fold, into)


def merge_text_path(params: nnx.State, config: ModelConfig, moka: MokAConfig) -> nnx.State:
    """Plain decoder params with the text path folded in: kernel + s * A_text B on every adapted linear.

    Exact for every text token with dropout off, so the decode steps of a generation (generated tokens are text)
    run on `kvzip_jax.models.forward` with these params and no adapter work at all. Non-text tokens still need the
    adapted forward (their term depends on the modality and on the question)."""
    _, base = split_adapter(params, config, moka)
    base = _as_plain(base, config)
    return _fold_text_path(params, config, moka, 1.0, base)


def unmerge_text_path(merged: nnx.State, params: nnx.State, config: ModelConfig, moka: MokAConfig) -> nnx.State:
    """The base params back from `merge_text_path`'s output and the adapter it folded in (up to rounding)."""
    return _fold_text_path(params, config, moka, -1.0, merged)


def _as_plain(state: nnx.State, config: ModelConfig) -> nnx.State:
    """The adapter-free part of adapted params as the plain decoder's State (same paths, the plain structure)."""
    flat = _flat(state)
    target = abstract_params(config, jnp.dtype(_dtype_name(state)))
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[path_str(p)], target)


def adapter_param_count(params: nnx.State) -> int:
    """Number of adapter weights in adapted params."""
    return sum(int(np.prod(x.shape)) for path, x in _flat(params).items() if path.endswith(("/lora_a", "/lora_b")))


def adapter_param_count_for(config: ModelConfig, moka: MokAConfig) -> int:
    """Adapter weights `apply_moka` would add to a model of `config`, from shapes alone (no memory is used):
    how a 7B configuration is checked against the paper's counts without its weights."""

    def build():
        model = Transformer(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
        return nnx.state(_adapt(model, moka, jax.random.key(0), jnp.float32), MokAParam)

    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(jax.eval_shape(build)))
