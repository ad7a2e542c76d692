"""BLIP-2's Q-Former (learned query tokens that cross-attend to encoder features), then a projection into the
language model's width, behind pure `encode` and `project`: MokA's encoder -> Q-Former -> MLP -> LLM connector.

`image_embeds` [B, S, encoder_hidden_size] are the frozen encoder's features (BLIP-2: its vision tower's
last_hidden_state; MokA: CLIP patch features, or audio features). The queries are layer-normed, then every layer
runs BERT-style post-norm blocks: self-attention over the queries, cross-attention to the features on layers with
`layer % cross_attention_frequency == 0`, a feed-forward (transformers' `intermediate_query` / `output_query`).
Query tokens only: BLIP-2's optional text input (use_qformer_text_input) never reaches the connector.

Projection: "linear" is BLIP-2's `language_projection`; "mlp" is MokA's Linear-GELU-Linear (projector.Projector),
new weights initialised randomly (MokA trains it in its alignment stage).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.config import UnsupportedModelError
from kvzip_jax.models.layers import Linear, _normal
from kvzip_jax.models.projector import Projector, ProjectorConfig
from kvzip_jax.models.safetensors_index import TensorRule, find_prefix, load_tensors, open_index, transposed
from kvzip_jax.models.vision import MLP, Attention, LayerNorm, check_activation
from kvzip_jax.sharding import DEFAULT_RULES, AxesTable, shard_params

QFORMER = "blip_2_qformer"
BLIP2 = "blip-2"
PROJECTIONS = ("linear", "mlp")

# transformers' Blip2QFormerConfig / Blip2Config defaults (real config.json files omit some keys).
_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    cross_attention_frequency=2,
    encoder_hidden_size=1408,
)
_NUM_QUERY_TOKENS = 32
_VISION_HIDDEN = 1408  # Blip2VisionConfig's hidden_size: Blip2Config sets encoder_hidden_size from it
# The language models' default widths: a saved config.json omits values equal to its class's defaults.
_TEXT_HIDDEN = {"opt": 768, "llama": 4096, "t5": 512}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QFormerConfig:
    """Static description of a Q-Former and its projection; frozen and hashable (a static jit argument)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # width of the features the queries cross-attend to
    num_query_tokens: int = _NUM_QUERY_TOKENS
    projection: str | None = None  # None, "linear" (BLIP-2's language_projection) or "mlp" (MokA's)
    llm_hidden_size: int | None = None  # the projection's output width
    projection_act: str = "gelu"  # the "mlp" projection's activation
    text_ffn: bool = False  # use_qformer_text_input: the file has a text feed-forward the queries never use

    def __post_init__(self):
        check_activation(self.hidden_act)
        check_activation(self.projection_act, "projection_act")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}"
            )
        for name in ("num_layers", "cross_attention_frequency", "num_query_tokens", "encoder_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.projection is not None and self.projection not in PROJECTIONS:
            raise ValueError(
                f"projection {self.projection!r} is not supported; supported: None, {', '.join(PROJECTIONS)}"
            )
        if self.projection is not None and not self.llm_hidden_size:
            raise ValueError(f"projection {self.projection!r} needs llm_hidden_size (the language model's width)")

    @property
    def cross_layer_ids(self) -> tuple[int, ...]:
        """Layers with cross-attention, as transformers: layer_idx % cross_attention_frequency == 0."""
        return tuple(range(0, self.num_layers, self.cross_attention_frequency))

    @property
    def self_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i % self.cross_attention_frequency)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> QFormerConfig:
        """From a config.json (or its directory): a Blip2QFormerModel's or a BLIP-2 one's; overrides as from_hf_dict."""
        path = os.fspath(path)
        config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json at {config_path}")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f), **overrides)

    @classmethod
    def from_hf_dict(
        cls,
        hf: dict[str, Any],
        *,
        projection: str | None = None,
        llm_hidden_size: int | None = None,
        num_query_tokens: int | None = None,
    ) -> QFormerConfig:
        """From a Blip2QFormerConfig dict, or a Blip2Config dict (its qformer_config, num_query_tokens, the vision
        tower's width as encoder_hidden_size, and a "linear" projection into text_config's width). The keyword
        arguments override (MokA: projection="mlp", llm_hidden_size=<the LLM's hidden size>; num_query_tokens,
        which a Blip2QFormerConfig lacks: 32 by default, as MokA); to drop a BLIP-2 projection,
        dataclasses.replace(config, projection=None)."""
        outer = {}
        if "qformer_config" in hf:
            if hf.get("model_type", BLIP2) != BLIP2:
                raise UnsupportedModelError(
                    f"model_type {hf.get('model_type')!r} is not supported for the Q-Former; supported: {BLIP2}"
                )
            outer, vision, text = hf, hf.get("vision_config") or {}, hf.get("text_config") or {}
            hf = {
                **(hf["qformer_config"] or {}),
                "encoder_hidden_size": vision.get("hidden_size", _VISION_HIDDEN),  # as Blip2Config does
            }
            projection = projection or "linear"
            llm_hidden_size = llm_hidden_size or _text_hidden(text)
        if hf.get("model_type", QFORMER) != QFORMER:
            raise UnsupportedModelError(
                f"Q-Former model_type {hf.get('model_type')!r} is not supported; supported: {QFORMER}"
            )
        position = hf.get("position_embedding_type") or "absolute"  # transformers 4.x; relative ones add weights
        if position != "absolute":
            raise UnsupportedModelError(f"position_embedding_type {position!r} is not supported; supported: absolute")
        d = {**_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            hidden_act=str(d["hidden_act"]),
            layer_norm_eps=float(d["layer_norm_eps"]),
            cross_attention_frequency=int(d["cross_attention_frequency"]),
            encoder_hidden_size=int(d["encoder_hidden_size"]),
            num_query_tokens=int(num_query_tokens or outer.get("num_query_tokens") or _NUM_QUERY_TOKENS),
            projection=projection,
            llm_hidden_size=int(llm_hidden_size) if llm_hidden_size else None,
            text_ffn=bool(d.get("use_qformer_text_input", False)),
        )


def _text_hidden(text: dict[str, Any]) -> int:
    """The width of a BLIP-2 config's language model (T5 spells it d_model; OPT is Blip2Config's default)."""
    width = text.get("hidden_size", text.get("d_model"))
    model_type = text.get("model_type", "opt")
    if width is None and model_type not in _TEXT_HIDDEN:
        raise ValueError(f"text_config of model_type {model_type!r} gives no hidden_size; pass llm_hidden_size")
    return int(width if width is not None else _TEXT_HIDDEN[model_type])


# ------------------------------------------------------------------------------------------------------ modules
class QFormerLayer(nnx.Module):
    """BERT-style post-norm block: x = norm(x + attn(x)); on cross layers x = norm(x + cross(x, features));
    x = norm(x + mlp(x))."""

    def __init__(self, config: QFormerConfig, *, cross: bool, dtype, rngs: nnx.Rngs):
        norm = functools.partial(LayerNorm, config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.attn_norm = norm()
        self.cross = Attention(config, kv_dim=config.encoder_hidden_size, dtype=dtype, rngs=rngs) if cross else None
        self.cross_norm = norm() if cross else None
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.mlp_norm = norm()

    def __call__(self, x: jax.Array, features: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        x = self.attn_norm(x + self.attn(x))
        if self.cross is not None:
            x = self.cross_norm(x + self.cross(x, features, mask))
        return self.mlp_norm(x + self.mlp(x))


def _stacked_layers(config: QFormerConfig, n: int, *, cross: bool, dtype, rngs: nnx.Rngs) -> QFormerLayer | None:
    """n layers stacked on a leading axis (one layer traced, vmapped over per-layer keys, as the decoder does)."""
    if not n:
        return None

    def one_layer(key):
        return nnx.state(QFormerLayer(config, cross=cross, dtype=dtype, rngs=nnx.Rngs(params=key)))

    graph = nnx.graphdef(nnx.eval_shape(lambda: QFormerLayer(config, cross=cross, dtype=dtype, rngs=nnx.Rngs(0))))
    return nnx.merge(graph, jax.vmap(one_layer)(jax.random.split(rngs.params(), n)))


class QFormer(nnx.Module):
    """Parameters of the Q-Former and its projection. Param paths: `queries` [num_query_tokens, hidden],
    `query_norm`, `cross_layers/...` (the layers with cross-attention, stacked), `self_layers/...` (the others,
    stacked; absent with cross_attention_frequency 1), `projection/...` (a Linear, or a projector.Projector)."""

    def __init__(self, config: QFormerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.queries = nnx.Param(_normal(rngs, (c.num_query_tokens, c.hidden_size), dtype))
        self.query_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        # Layers differ (cross-attention on some only), so the two kinds are stacked apart and scanned in groups.
        self.cross_layers = _stacked_layers(c, len(c.cross_layer_ids), cross=True, dtype=dtype, rngs=rngs)
        self.self_layers = _stacked_layers(c, len(c.self_layer_ids), cross=False, dtype=dtype, rngs=rngs)
        if c.projection == "linear":
            self.projection = Linear(c.hidden_size, c.llm_hidden_size, bias=True, dtype=dtype, rngs=rngs)
        elif c.projection == "mlp":
            self.projection = Projector(_mlp_config(c), dtype=dtype, rngs=rngs)
        else:
            self.projection = None

    def __call__(self, features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """features [B, S, encoder_hidden_size] -> the queries' last hidden state [B, num_query_tokens, hidden]."""
        c = self.config
        queries = self.queries[...]
        features = features.astype(queries.dtype)  # transformers keeps the Q-Former in float32 and casts to it
        x = self.query_norm(jnp.broadcast_to(queries, (features.shape[0], *queries.shape)))
        cross_graph, cross_state = nnx.split(self.cross_layers)
        if self.self_layers is not None:
            self_graph, self_state = nnx.split(self.self_layers)

        def cross_layer(h, state):
            return nnx.merge(cross_graph, state)(h, features, mask)

        def self_run(h, states):  # a stack of self-attention-only layers
            return jax.lax.scan(lambda h, s: (nnx.merge(self_graph, s)(h), None), h, states)[0]

        # Group g is layer g*f (cross-attention) then f-1 layers without: a scan over whole groups. When f does not
        # divide the depth, the last, partial group (its cross layer, then the rest) runs after the scan.
        f = c.cross_attention_frequency
        groups, tail = divmod(c.num_layers, f)
        if groups:
            grouped = None
            if f > 1:
                grouped = jax.tree.map(lambda a: a[: groups * (f - 1)].reshape(groups, f - 1, *a.shape[1:]), self_state)

            def group(h, states):
                cross_s, self_s = states
                h = cross_layer(h, cross_s)
                return (h if self_s is None else self_run(h, self_s)), None

            x, _ = jax.lax.scan(group, x, (jax.tree.map(lambda a: a[:groups], cross_state), grouped))
        if tail:
            x = cross_layer(x, jax.tree.map(lambda a: a[groups], cross_state))
            if tail > 1:
                x = self_run(x, jax.tree.map(lambda a: a[groups * (f - 1) :], self_state))
        return x


def _mlp_config(config: QFormerConfig) -> ProjectorConfig:
    return ProjectorConfig(
        in_features=config.hidden_size, out_features=config.llm_hidden_size, hidden_act=config.projection_act
    )


def check_features(image_embeds, config: QFormerConfig, attention_mask=None) -> None:
    """Static checks of the encoder features (and their mask); shapes only, so it works on tracers."""
    shape = tuple(image_embeds.shape)
    if len(shape) != 3:
        raise ValueError(f"image_embeds must be [batch, tokens, {config.encoder_hidden_size}]; got shape {shape}")
    if shape[-1] != config.encoder_hidden_size:
        raise ValueError(
            f"image_embeds has width {shape[-1]} (shape {shape}) but the Q-Former cross-attends to features of "
            f"encoder_hidden_size {config.encoder_hidden_size}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != shape[:2]:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected {shape[:2]} (batch, image_embeds tokens)"
        )


# ------------------------------------------------------------------------------------------- pure boundary
@functools.cache
def graphdef_for(config: QFormerConfig, dtype_name: str = "float32") -> nnx.GraphDef:
    """The (static) structure of the Q-Former for `config`; no memory is allocated."""
    return nnx.graphdef(nnx.eval_shape(lambda: QFormer(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0))))


def abstract_params(config: QFormerConfig, dtype=jnp.float32) -> nnx.State:
    """Params as ShapeDtypeStructs: the target that `load_qformer_params` fills."""
    return nnx.state(nnx.eval_shape(lambda: QFormer(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))))


def init_params(config: QFormerConfig, seed: int = 0, dtype=jnp.float32) -> nnx.State:
    """Random params (normal, std 0.02; norms at scale 1, bias 0), one jitted call per (config, dtype)."""
    return _init_params(config, jnp.dtype(dtype).name, jax.random.key(seed))


@functools.partial(jax.jit, static_argnames=("config", "dtype_name"))
def _init_params(config: QFormerConfig, dtype_name: str, key: jax.Array) -> nnx.State:
    return nnx.state(QFormer(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(params=key)))


class _Queries(nnx.Module):
    def __init__(self, config: QFormerConfig, *, dtype, rngs: nnx.Rngs):
        self.queries = nnx.Param(_normal(rngs, (config.num_query_tokens, config.hidden_size), dtype))


def _fresh_parts(config: QFormerConfig, parts, dtype, seed: int) -> dict[str, Any]:
    """Random `queries` and "mlp" `projection` params alone (without tracing the whole Q-Former), for a loader."""
    rngs = nnx.Rngs(params=seed)
    fresh = {"queries": lambda: nnx.state(_Queries(config, dtype=dtype, rngs=rngs))["queries"]}
    fresh["projection"] = lambda: nnx.state(Projector(_mlp_config(config), dtype=dtype, rngs=rngs))
    return {k: fresh[k]() for k in parts}


def _select(state: nnx.State, keys) -> nnx.State:
    return nnx.State({k: state.raw_mapping[k] for k in keys})


def _model(params: nnx.State, config: QFormerConfig) -> QFormer:
    return nnx.merge(graphdef_for(config, jnp.dtype(params["queries"][...].dtype).name), params)


def encode(
    params: nnx.State, image_embeds: jax.Array, *, config: QFormerConfig, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Encoder features [B, S, encoder_hidden_size] -> the queries' last hidden state [B, num_query_tokens, hidden]
    (transformers' Blip2QFormerModel last_hidden_state for the learned queries). attention_mask [B, S]: nonzero
    where a feature token may be attended (padded audio segments, say). Traceable; jit it with config static."""
    check_features(image_embeds, config, attention_mask)
    mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    return _model(params, config)(jnp.asarray(image_embeds), mask)


def project(
    params: nnx.State, image_embeds: jax.Array, *, config: QFormerConfig, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Encoder features -> [B, num_query_tokens, llm_hidden_size]: the tokens spliced into the language model's
    input embeddings (BLIP-2's get_image_features). Traceable."""
    if config.projection is None:
        raise ValueError("this QFormerConfig has no projection; set projection='linear' or 'mlp' and llm_hidden_size")
    check_features(image_embeds, config, attention_mask)
    model = _model(params, config)
    mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    return model.projection(model(jnp.asarray(image_embeds), mask))


# ------------------------------------------------------------------------------------------------ loading
# Blip2Model / Blip2ForConditionalGeneration write `qformer.` beside `query_tokens` and `language_projection.`;
# a standalone Blip2QFormerModel writes no prefix (and has neither).
QFORMER_PREFIXES = ("qformer.", "")
_PROBE = "layernorm.weight"
_TEXT_FFN = tuple(
    f"{m}.{p}" for m in ("intermediate.dense", "output.dense", "output.LayerNorm") for p in ("weight", "bias")
)


# Param path -> logical axes (kvzip_jax.sharding): both layer stacks lead with "layers", as the vision towers'.
QFORMER_LOGICAL_AXES: AxesTable = (
    (r"^queries$", (None, "embed")),
    (r"_layers/(attn|cross)/(q|k|v)_proj/kernel$", ("layers", "embed", "heads")),
    (r"_layers/(attn|cross)/(q|k|v)_proj/bias$", ("layers", "heads")),
    (r"_layers/(attn|cross)/out_proj/kernel$", ("layers", "heads", "embed")),
    (r"_layers/mlp/fc1/kernel$", ("layers", "embed", "mlp")),
    (r"_layers/mlp/fc1/bias$", ("layers", "mlp")),
    (r"_layers/mlp/fc2/kernel$", ("layers", "mlp", "embed")),
    (r"_layers/((attn|cross)/out_proj|mlp/fc2)/bias$", ("layers", "embed")),
    (r"_layers/.*norm/(scale|bias)$", ("layers", "norm")),
    (r"^projection/kernel$", ("embed", None)),  # BLIP-2's linear: small, replicated
    (r"^projection/bias$", (None,)),
    (r"^projection/linear_1/kernel$", ("embed", "mlp")),  # MokA's MLP: sharded like the LLaVA projector
    (r"^projection/linear_1/bias$", ("mlp",)),
    (r"^projection/linear_2/kernel$", ("mlp", "embed")),
    (r"^projection/linear_2/bias$", ("embed",)),
    (r"norm/(scale|bias)$", ("norm",)),
)


def _linear(ours: str, hf: str) -> list[TensorRule]:
    return [TensorRule(f"{ours}/kernel", f"{hf}.weight", transposed), TensorRule(f"{ours}/bias", f"{hf}.bias")]


def _norm(ours: str, hf: str) -> list[TensorRule]:
    return [TensorRule(f"{ours}/scale", f"{hf}.weight"), TensorRule(f"{ours}/bias", f"{hf}.bias")]


def _layer_rules(cross: bool) -> list[TensorRule]:
    """One layer's tensors, named after `encoder.layer.<i>.`."""

    def attention(ours: str, hf: str) -> list[TensorRule]:
        rules = []
        for name, hf_name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            rules += _linear(f"{ours}/{name}", f"{hf}.attention.{hf_name}")
        rules += _linear(f"{ours}/out_proj", f"{hf}.output.dense")
        return rules + _norm(f"{ours}_norm", f"{hf}.output.LayerNorm")

    rules = attention("attn", "attention") + (attention("cross", "crossattention") if cross else [])
    rules += _linear("mlp/fc1", "intermediate_query.dense") + _linear("mlp/fc2", "output_query.dense")
    return rules + _norm("mlp_norm", "output_query.LayerNorm")


def load_qformer_params(
    path: str | os.PathLike,
    config: QFormerConfig | None = None,
    *,
    prefix: str | None = None,
    dtype=None,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
) -> tuple[QFormerConfig, nnx.State]:
    """Read a Q-Former from an HF safetensors checkpoint (a directory, or a file in it): a BLIP-2 model's (with its
    query_tokens and, for projection "linear", language_projection) or a standalone Blip2QFormerModel's.

    prefix: where the Q-Former's tensors sit; None finds it among QFORMER_PREFIXES. query_tokens and
    language_projection are read beside it (prefix "qformer." -> top level). config None reads config.json.
    Parts the file lacks are initialised randomly from `seed`: the queries of a standalone Q-Former, the "mlp"
    projection. dtype: None keeps the checkpoint's dtype; otherwise every tensor is cast. mesh: the params are
    placed on their shardings (QFORMER_LOGICAL_AXES through `rules`) once read.
    """
    directory, index = open_index(path)
    config = config or QFormerConfig.from_pretrained(directory)
    prefix = find_prefix(index, prefix, QFORMER_PREFIXES, _PROBE)
    outer, inner = (prefix[: -len("qformer.")], "qformer.") if prefix.endswith("qformer.") else (prefix, "")
    dtype = jnp.dtype(dtype if dtype is not None else index.get(prefix + _PROBE).dtype)
    abstract = abstract_params(config, dtype)

    # The stacks hold every f-th layer and the rest, not a contiguous `{i}` range: read layer by layer, then stack.
    parts: dict[str, nnx.State] = {}
    consumed: list[str] = []  # read here, so not unused in the final call
    for key, ids, cross in (
        ("cross_layers", config.cross_layer_ids, True),
        ("self_layers", config.self_layer_ids, False),
    ):
        if not ids:
            continue
        layer_rules = _layer_rules(cross)
        one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), abstract[key])
        layers = [load_tensors(index, layer_rules, one, prefix=f"{prefix}encoder.layer.{i}.") for i in ids]
        parts[key] = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *layers)  # on the host: no compile per shape
        consumed += [f"{inner}encoder.layer.{i}.{r.hf}" for i in ids for r in layer_rules]
    if config.text_ffn:
        consumed += [f"{inner}encoder.layer.{i}.{n}" for i in range(config.num_layers) for n in _TEXT_FFN]

    top_rules = _norm("query_norm", f"{inner}layernorm")
    owned = [f"{inner}layernorm.", f"{inner}encoder.", "query_tokens"]
    top = ["query_norm"]
    if outer + "query_tokens" in index.weight_map:
        top_rules.append(TensorRule("queries", "query_tokens", lambda a: a[0] if a.ndim == 3 else a))  # [1, Q, H]
        top.append("queries")
    if config.projection == "linear":
        top_rules += _linear("projection", "language_projection")
        owned.append("language_projection.")
        top.append("projection")
    parts.update(load_tensors(index, top_rules, _select(abstract, top), prefix=outer, owned=owned, ignored=consumed))

    parts.update(_fresh_parts(config, [k for k in abstract if k not in parts], dtype, seed))
    params = nnx.State({})
    for k in abstract:
        params[k] = parts[k]
    if mesh is not None:  # the stacks are assembled layer by layer, so placed afterwards
        params = shard_params(params, mesh, rules, QFORMER_LOGICAL_AXES)
    return config, params
