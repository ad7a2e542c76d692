"""CLIP and SigLIP vision towers (the image encoders of LLaVA-style models), driven by VisionConfig, behind a
pure `encode`.

Pixel input is NCHW float32 `[B, C, H, W]`, as transformers takes it: already resized, rescaled and normalised by
the model's image processor. Encoder layers are stacked on a leading axis and applied with `lax.scan`, like the
decoder's. `encode(..., output_layer=k)` counts like transformers' `hidden_states` tuple: 0 is the embeddings
output (after CLIP's pre-layernorm), k the output of layer k, negative values from the end; only the layers up to
the requested one are run (LLaVA's usual -2 skips the last layer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.config import UnsupportedModelError
from kvzip_jax.models.layers import Linear, _normal
from kvzip_jax.models.safetensors_index import TensorRule, find_prefix, load_tensors, open_index, transposed
from kvzip_jax.sharding import DEFAULT_RULES, AxesTable
from kvzip_kernels.cpu_attention import MAX_HEAD_DIM, cpu_attention_available, fused_attention_cpu

CLIP = "clip_vision_model"
SIGLIP = "siglip_vision_model"
SUPPORTED_MODEL_TYPES = (CLIP, SIGLIP)
# Whole-model configs whose `vision_config` holds the tower, and the tower type when that sub-dict omits it
# (transformers' LlavaConfig defaults to CLIP).
_WRAPPER_DEFAULT_TYPE = {"llava": CLIP, "clip": CLIP, "siglip": SIGLIP}


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
}

# transformers' CLIPVisionConfig / SiglipVisionConfig defaults (real config.json files omit some keys).
_DEFAULTS: dict[str, dict[str, Any]] = {
    CLIP: dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        vision_use_head=False,
    ),
    SIGLIP: dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=True,
    ),
}


def check_activation(name: str, what: str = "hidden_act") -> None:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{what} {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Static description of a CLIP or SigLIP vision tower; frozen and hashable (a static jit argument)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    use_head: bool = False  # SigLIP's attention-pooling head (vision_use_head)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"vision model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        check_activation(self.hidden_act)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.use_head and self.model_type != SIGLIP:
            raise ValueError("vision_use_head is a SigLIP option; CLIP has no attention-pooling head")

    @property
    def class_token(self) -> bool:
        """CLIP prepends a class token and has a pre-layernorm; SigLIP has neither."""
        return self.model_type == CLIP

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        # The conv has stride = kernel and no padding: pixels past the last whole patch are dropped (SigLIP 384/14).
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_positions(self) -> int:
        """Tokens out of the tower: patches, plus the class token for CLIP."""
        return self.num_patches + int(self.class_token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> VisionConfig:
        """From a config.json (or its directory): a standalone vision model's, or a LLaVA / CLIP / SigLIP one's."""
        path = os.fspath(path)
        config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json at {config_path}")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, default_model_type: str | None = None) -> VisionConfig:
        """From a CLIPVisionConfig / SiglipVisionConfig dict, or a whole-model dict that holds one as vision_config."""
        if "vision_config" in hf:
            outer = hf.get("model_type", "")
            return cls.from_hf_dict(hf["vision_config"] or {}, default_model_type=_WRAPPER_DEFAULT_TYPE.get(outer))
        model_type = hf.get("model_type") or default_model_type
        if model_type not in _DEFAULTS:
            raise UnsupportedModelError(
                f"vision model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        d = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
        return cls(
            model_type=model_type,
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_channels=int(d["num_channels"]),
            image_size=int(d["image_size"]),
            patch_size=int(d["patch_size"]),
            hidden_act=str(d["hidden_act"]),
            layer_norm_eps=float(d["layer_norm_eps"]),
            use_head=model_type == SIGLIP and bool(d["vision_use_head"]),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        out = {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
        }
        if self.model_type == SIGLIP:
            out["vision_use_head"] = self.use_head
        return out


# ------------------------------------------------------------------------------------------------------ modules
class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class EncoderLinear(Linear):
    """The encoders' linear: one dot on CPU at any width (`Linear` contracts more than 1,024 inputs in blocks there).

    The blocks exist for the decoders' logits, which feed argmax and must stay within 1e-4 of transformers over many
    layers (docs/benchmarks.md, "SmolLM2 logit parity"). In the encoders they cost more than they give: Whisper-base
    on this project's 2-core CPU ran 1.66 s per 2 clips blocked against 1.59 s as one dot (its 2,048-input fc2),
    and the whole encoder's output moved by 4.9e-6 between the two."""

    cpu_blocked = False


class Attention(nnx.Module):
    """Bidirectional multi-head attention with biased q/k/v/out projections (also SigLIP's pooling attention).
    k_bias=False drops the key bias, as Whisper's encoder does (the audio towers reuse these blocks). kv_dim: the
    width of `context` when it differs from hidden_size (the Q-Former's cross-attention over encoder features)."""

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs, k_bias: bool = True, kv_dim: int | None = None):
        h = config.hidden_size
        kv = kv_dim or h
        self.num_heads = config.num_heads
        self.q_proj = EncoderLinear(h, h, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = EncoderLinear(kv, h, bias=k_bias, dtype=dtype, rngs=rngs)
        self.v_proj = EncoderLinear(kv, h, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = EncoderLinear(h, h, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, H] attends over context [B, S, kv_dim] (default: itself); mask [B, S] bool, True where a context
        token may be attended (default: all). Logits and softmax in float32."""
        context = x if context is None else context
        b, t, h = x.shape
        n = self.num_heads
        # Heads-first [B, N, T, D] before the two dots: plain batched matmuls. Contracting in the [B, T, N, D]
        # layout directly ran ~6x slower on XLA:CPU (ViT-B/16 attention, batch 8: 117 vs 20 ms per layer).
        q = self.q_proj(x).reshape(b, t, n, h // n).transpose(0, 2, 1, 3)
        k = self.k_proj(context).reshape(b, context.shape[1], n, h // n).transpose(0, 2, 1, 3)
        v = self.v_proj(context).reshape(b, context.shape[1], n, h // n).transpose(0, 2, 1, 3)
        out = _attend(q, k, v, mask, np.float32((h // n) ** -0.5)).transpose(0, 2, 1, 3)
        return self.out_proj(out.reshape(b, t, h))


# Above UNTILED_QUERIES queries (Whisper's 1,500 frames; ViT-B/16's 197 tokens run in one piece) the attention
# runs HEADS_PER_STEP (batch row, head) pairs at a time, in equal query tiles of at most QUERY_TILE: each step's
# [heads, tile, keys] exponentials then stay a few MB instead of [B, N, tile, keys] for every head at once. On
# XLA:CPU (Whisper-base shapes, batch 2, one layer): one softmax over all heads' [1500, 1500] took 290 ms, all heads
# in query tiles of 192 158 ms, one head at a time in tiles of 750 95-108 ms, of 1,500 (untiled) 90-97 ms, two heads
# at a time untiled 92-94 ms against one head's 101-113 ms in the same runs (torch's fused SDPA: 82-86 ms). The query
# tile bounds the step's memory for longer inputs: [2, 1536, S] float32 is 12 KB per key.
QUERY_TILE = 1536
UNTILED_QUERIES = 256
HEADS_PER_STEP = 2


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: np.float32) -> jax.Array:
    """Softmax attention, heads first: q [B, N, T, D], k, v [B, N, S, D], mask [B, S] -> [B, N, T, D].

    On CPU, unmasked float32 attention runs the fused C++ kernel (`kvzip_kernels.cpu_attention`, no [T, S] array:
    Whisper-base's 1,500-frame attention 62.9 ms per layer against 103.7 ms for the jnp path below and 83.9 ms for
    torch's fused SDPA on the 2-core CPU, docs/benchmarks.md); elsewhere, or where it is unavailable, the jnp
    path."""
    if mask is None and _fused_cpu_attention_fits(q, k, v):
        return _fused_attend(q, k, v, scale)
    return _attend_jnp(q, k, v, mask, scale)


def _fused_cpu_attention_fits(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    return (jax.default_backend() == "cpu" and q.dtype == k.dtype == v.dtype == jnp.float32 and k.shape[2] > 0
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= MAX_HEAD_DIM and cpu_attention_available())


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fused_attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: np.float32) -> jax.Array:
    return fused_attention_cpu(q, k, v, scale=float(scale))


@_fused_attend.defjvp
def _fused_attend_jvp(scale, primals, tangents):
    # The kernel is forward-only: derivatives (an encoder fine-tuned or linearised on CPU) come from the jnp path's
    # JVP, which jax also transposes for gradients.
    _, tangent = jax.jvp(lambda q, k, v: _attend_jnp(q, k, v, None, scale), primals, tangents)
    return _fused_attend(*primals, scale), tangent


def _attend_jnp(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: np.float32) -> jax.Array:
    """The jnp attention (any backend, dtype and mask). Logits and softmax in float32. The scale multiplies the
    queries ([T, D]), not the logits ([T, S]): one pass less over the largest array (6% of Whisper's attention)."""
    q = q * scale.astype(q.dtype)

    def logits_of(queries, keys, key_mask):
        logits = jnp.einsum("...td,...sd->...ts", queries, keys, preferred_element_type=jnp.float32)
        return logits if key_mask is None else jnp.where(key_mask[..., None, :], logits, jnp.finfo(jnp.float32).min)

    b, n, t, d = q.shape
    if t <= UNTILED_QUERIES:
        probs = jax.nn.softmax(logits_of(q, k, None if mask is None else mask[:, None]), axis=-1).astype(v.dtype)
        return jnp.einsum("bnts,bnsd->bntd", probs, v)

    tiles = -(-t // QUERY_TILE)
    per_tile = -(-t // tiles)
    size = -(-per_tile // 8) * 8  # equal tiles, rounded up to 8 rows
    s = k.shape[2]
    g = HEADS_PER_STEP if (b * n) % HEADS_PER_STEP == 0 else 1

    def heads(args):
        queries, keys, values, key_mask = args  # [g, tiles, size, D], [g, S, D], [g, S, D], [g, S] or None

        def tile(rows):  # [g, size, D]; normalised after the value product: one pass less over the exponentials
            logits = logits_of(rows, keys, key_mask)
            e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
            out = jnp.einsum("gts,gsd->gtd", e.astype(values.dtype), values, preferred_element_type=jnp.float32)
            return (out / e.sum(axis=-1)[..., None]).astype(values.dtype)

        return jax.lax.map(tile, queries.swapaxes(0, 1)).swapaxes(0, 1)

    padded = jnp.pad(q, ((0, 0), (0, 0), (0, tiles * size - t), (0, 0))).reshape(b * n // g, g, tiles, size, d)
    head_mask = None if mask is None else jnp.broadcast_to(mask[:, None], (b, n, s)).reshape(b * n // g, g, s)
    out = jax.lax.map(heads, (padded, k.reshape(b * n // g, g, s, d), v.reshape(b * n // g, g, s, d), head_mask))
    return out.reshape(b, n, tiles * size, d)[:, :, :t]


class MLP(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.act = config.hidden_act
        self.fc1 = EncoderLinear(config.hidden_size, config.intermediate_size, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = EncoderLinear(config.intermediate_size, config.hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs, k_bias: bool = True):
        norm = functools.partial(LayerNorm, config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.attn_norm = norm()
        self.attn = Attention(config, dtype=dtype, rngs=rngs, k_bias=k_bias)
        self.mlp_norm = norm()
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class PoolingHead(nnx.Module):
    """SigLIP's MultiheadAttentionPoolingHead: one learned probe attends over the tokens, then a residual MLP."""

    def __init__(self, config: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.probe = nnx.Param(_normal(rngs, (config.hidden_size,), dtype))
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, H] -> [B, H]."""
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1]))
        h = self.attn(probe, x)
        h = h + self.mlp(self.norm(h))
        return h[:, 0]


class VisionTransformer(nnx.Module):
    """Parameters of a CLIP / SigLIP vision tower. Param paths: `patch_embed/kernel` ([C*p*p, H], the conv as a
    matmul over (channel, row, column)-flattened patches), `class_embed` (CLIP), `pos_embed`, `pre_norm` (CLIP),
    `layers/...` (stacked), `post_norm`, `head/...` (SigLIP with vision_use_head)."""

    def __init__(self, config: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        patch_dim = c.num_channels * c.patch_size * c.patch_size
        self.patch_embed = EncoderLinear(patch_dim, c.hidden_size, bias=not c.class_token, dtype=dtype, rngs=rngs)
        self.class_embed = nnx.Param(_normal(rngs, (c.hidden_size,), dtype)) if c.class_token else None
        self.pos_embed = nnx.Param(_normal(rngs, (c.num_positions, c.hidden_size), dtype))
        norm = functools.partial(LayerNorm, c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.pre_norm = norm() if c.class_token else None

        # As in the decoder: one layer traced, vmapped over per-layer keys.
        def one_layer(key):
            return nnx.state(EncoderLayer(c, dtype=dtype, rngs=nnx.Rngs(params=key)))

        layer_graph = nnx.graphdef(nnx.eval_shape(lambda: EncoderLayer(c, dtype=dtype, rngs=nnx.Rngs(0))))
        self.layers = nnx.merge(layer_graph, jax.vmap(one_layer)(jax.random.split(rngs.params(), c.num_layers)))
        self.post_norm = norm()
        self.head = PoolingHead(c, dtype=dtype, rngs=rngs) if c.use_head else None

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """[B, C, H, W] -> hidden_states[0]: [B, num_positions, hidden]."""
        c = self.config
        check_pixels(pixel_values, c)
        dtype = self.pos_embed[...].dtype
        b, p, g = pixel_values.shape[0], c.patch_size, c.grid
        x = pixel_values[:, :, : g * p, : g * p].astype(dtype)
        x = x.reshape(b, c.num_channels, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
        x = self.patch_embed(x)
        if self.class_embed is not None:
            x = jnp.concatenate([jnp.broadcast_to(self.class_embed[...], (b, 1, c.hidden_size)), x], axis=1)
        x = x + self.pos_embed[...]
        return self.pre_norm(x) if self.pre_norm is not None else x

    def hidden_states(self, pixel_values: jax.Array, indices: Sequence[int]) -> list[jax.Array]:
        """transformers' `hidden_states[i]` for each i in `indices` (0..num_layers), running no layer past the last."""
        x = self.embed(pixel_values)
        n = max(indices)
        if n == 0:
            return [x for _ in indices]
        layer_graph, layer_state = nnx.split(self.layers)
        layer_state = jax.tree.map(lambda a: a[:n], layer_state)
        collect = any(0 < i < n for i in indices)

        def body(h, state):
            h = nnx.merge(layer_graph, state)(h)
            return h, (h if collect else None)

        last, per_layer = jax.lax.scan(body, x, layer_state)
        return [x if i == 0 else last if i == n else per_layer[i - 1] for i in indices]

    def pool(self, last_hidden_state: jax.Array) -> jax.Array | None:
        """transformers' pooler_output from last_hidden_state: CLIP's post-normed class token; SigLIP's head."""
        if self.config.class_token:
            return self.post_norm(last_hidden_state[:, 0])
        return self.head(last_hidden_state) if self.head is not None else None


def check_pixels(pixel_values, config: VisionConfig) -> None:
    """Static checks of the NCHW pixel batch (shapes only, so it works on tracers)."""
    shape = tuple(pixel_values.shape)
    if len(shape) != 4:
        raise ValueError(f"pixel_values must be NCHW [batch, {config.num_channels}, H, W]; got shape {shape}")
    if shape[1] != config.num_channels:
        hint = " (this looks like NHWC; transpose to NCHW)" if shape[-1] == config.num_channels else ""
        raise ValueError(
            f"pixel_values has {shape[1]} channels (shape {shape}); expected {config.num_channels} in NCHW layout{hint}"
        )
    if shape[2:] != (config.image_size, config.image_size):
        raise ValueError(
            f"pixel_values is {shape[2]}x{shape[3]} pixels; the model expects {config.image_size}x{config.image_size}"
        )


# ------------------------------------------------------------------------------------------- pure boundary
class VisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, H]: CLIP's last layer output; SigLIP's, post-layernormed (as transformers)
    pooled: jax.Array | None  # [B, H]: CLIP's post-normed class token, SigLIP's head output (None without one)


@functools.cache
def graphdef_for(config: VisionConfig, dtype_name: str = "float32") -> nnx.GraphDef:
    """The (static) structure of the tower for `config`; no memory is allocated."""
    return nnx.graphdef(
        nnx.eval_shape(lambda: VisionTransformer(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0)))
    )


def abstract_params(config: VisionConfig, dtype=jnp.float32) -> nnx.State:
    """Params as ShapeDtypeStructs: the target that `load_vision_params` fills."""
    return nnx.state(nnx.eval_shape(lambda: VisionTransformer(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))))


def init_params(config: VisionConfig, seed: int = 0, dtype=jnp.float32) -> nnx.State:
    """Random params (normal, std 0.02; norms at scale 1, bias 0), one jitted call per (config, dtype)."""
    return _init_params(config, jnp.dtype(dtype).name, jax.random.key(seed))


@functools.partial(jax.jit, static_argnames=("config", "dtype_name"))
def _init_params(config: VisionConfig, dtype_name: str, key: jax.Array) -> nnx.State:
    return nnx.state(VisionTransformer(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(params=key)))


def _model(params: nnx.State, config: VisionConfig) -> VisionTransformer:
    return nnx.merge(graphdef_for(config, str(jnp.dtype(params["pos_embed"][...].dtype))), params)


def _layer_index(layer: int, config: VisionConfig) -> int:
    n = config.num_layers + 1  # entries of transformers' hidden_states tuple
    if not -n <= layer < n:
        raise ValueError(f"output layer {layer} is out of range for {config.num_layers} layers (valid: {-n}..{n - 1})")
    return layer % n


def encode(
    params: nnx.State, pixel_values: jax.Array, *, config: VisionConfig, output_layer: int | Sequence[int] | None = None
) -> jax.Array:
    """pixel_values NCHW [B, C, H, W] -> features [B, T, H]. Traceable; jit it with config (and output_layer) static.

    output_layer None: transformers' last_hidden_state (SigLIP's is post-layernormed, CLIP's is not).
    An int k: transformers' hidden_states[k] (no post-layernorm; 0 = embeddings, -1 = last layer, LLaVA's
    vision_feature_layer). A sequence of ints: those hidden states concatenated on the feature axis, as LLaVA
    does for a list-valued vision_feature_layer ([B, T, H * len]).
    """
    model = _model(params, config)
    if output_layer is None:
        last = model.hidden_states(pixel_values, [config.num_layers])[0]
        return last if config.class_token else model.post_norm(last)
    layers = [output_layer] if isinstance(output_layer, int) else list(output_layer)
    if not layers:
        raise ValueError("output_layer is an empty sequence")
    states = model.hidden_states(pixel_values, [_layer_index(k, config) for k in layers])
    return states[0] if isinstance(output_layer, int) else jnp.concatenate(states, axis=-1)


def encode_pooled(params: nnx.State, pixel_values: jax.Array, *, config: VisionConfig) -> VisionOutput:
    """transformers' (last_hidden_state, pooler_output) of CLIPVisionModel / SiglipVisionModel."""
    model = _model(params, config)
    last = model.hidden_states(pixel_values, [config.num_layers])[0]
    if not config.class_token:
        last = model.post_norm(last)
    return VisionOutput(last, model.pool(last))


SELECT_STRATEGIES = ("default", "full")


def select_features(features: jax.Array, strategy: str) -> jax.Array:
    """LLaVA's vision_feature_select_strategy on [B, T, F] features: "default" drops token 0 (CLIP's class token),
    "full" keeps all. Like transformers, "default" drops token 0 whatever the tower, so SigLIP-towered LLaVA
    configs must say "full" to keep their first patch."""
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(
            f"vision_feature_select_strategy {strategy!r} is not supported; supported: {', '.join(SELECT_STRATEGIES)}"
        )
    return features[:, 1:] if strategy == "default" else features


def image_features(
    params: nnx.State,
    pixel_values: jax.Array,
    *,
    config: VisionConfig,
    feature_layer: int | Sequence[int] = -2,
    select_strategy: str = "default",
) -> jax.Array:
    """LLaVA's selected vision features (the projector's input): encode at feature_layer, then select."""
    return select_features(encode(params, pixel_values, config=config, output_layer=feature_layer), select_strategy)


# ------------------------------------------------------------------------------------------------ loading
# Where the tower sits in the files we know: standalone CLIPVisionModel / SiglipVisionModel (transformers 5 writes
# no prefix, 4.x `vision_model.`), CLIPModel / SiglipModel (`vision_model.`), LLaVA (transformers 5:
# `vision_tower.`; hub checkpoints: `vision_tower.vision_model.`; some 4.x saves: `model.vision_tower...`).
VISION_PREFIXES = (
    "",
    "vision_model.",
    "vision_tower.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "model.vision_tower.vision_model.",
)
_PROBE = "embeddings.patch_embedding.weight"
# Top-level names of the tower under its prefix (anything else in the file belongs to another model part).
_TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")
_IGNORED = ("embeddings.position_ids",)


# Param path -> logical axes (kvzip_jax.sharding): stacked layers lead with "layers"; the SigLIP head is unstacked.
VISION_LOGICAL_AXES: AxesTable = (
    (r"^patch_embed/kernel$", (None, "embed")),
    (r"^(patch_embed/bias|class_embed)$", ("embed",)),
    (r"^pos_embed$", (None, "embed")),
    (r"^layers/attn/(q|k|v)_proj/kernel$", ("layers", "embed", "heads")),
    (r"^layers/attn/(q|k|v)_proj/bias$", ("layers", "heads")),
    (r"^layers/attn/out_proj/kernel$", ("layers", "heads", "embed")),
    (r"^layers/mlp/fc1/kernel$", ("layers", "embed", "mlp")),
    (r"^layers/mlp/fc1/bias$", ("layers", "mlp")),
    (r"^layers/mlp/fc2/kernel$", ("layers", "mlp", "embed")),
    (r"^layers/(attn/out_proj|mlp/fc2)/bias$", ("layers", "embed")),
    (r"^layers/.*norm/(scale|bias)$", ("layers", "norm")),
    (r"^head/probe$", ("embed",)),
    (r"^head/attn/(q|k|v)_proj/kernel$", ("embed", "heads")),
    (r"^head/attn/(q|k|v)_proj/bias$", ("heads",)),
    (r"^head/attn/out_proj/kernel$", ("heads", "embed")),
    (r"^head/mlp/fc1/kernel$", ("embed", "mlp")),
    (r"^head/mlp/fc1/bias$", ("mlp",)),
    (r"^head/mlp/fc2/kernel$", ("mlp", "embed")),
    (r"^head/(attn/out_proj|mlp/fc2)/bias$", ("embed",)),
    (r"norm/(scale|bias)$", ("norm",)),
)


def _vision_rules(config: VisionConfig) -> list[TensorRule]:
    c = config
    h = c.hidden_size

    def conv(a: np.ndarray) -> np.ndarray:  # torch conv [H, C, p, p] -> [C*p*p, H]
        return a.reshape(a.shape[0], -1).T

    def linear(ours: str, hf: str, bias: bool = True) -> list[TensorRule]:
        rules = [TensorRule(f"{ours}/kernel", f"{hf}.weight", transposed)]
        return rules + ([TensorRule(f"{ours}/bias", f"{hf}.bias")] if bias else [])

    def norm(ours: str, hf: str) -> list[TensorRule]:
        return [TensorRule(f"{ours}/scale", f"{hf}.weight"), TensorRule(f"{ours}/bias", f"{hf}.bias")]

    def mlp(ours: str, hf: str) -> list[TensorRule]:
        return linear(f"{ours}/fc1", f"{hf}.fc1") + linear(f"{ours}/fc2", f"{hf}.fc2")

    rules = [TensorRule("patch_embed/kernel", "embeddings.patch_embedding.weight", conv)]
    if not c.class_token:
        rules.append(TensorRule("patch_embed/bias", "embeddings.patch_embedding.bias"))
    else:
        rules.append(TensorRule("class_embed", "embeddings.class_embedding"))
        rules += norm("pre_norm", "pre_layrnorm")
    rules.append(TensorRule("pos_embed", "embeddings.position_embedding.weight"))
    layer = "encoder.layers.{i}"
    rules += norm("layers/attn_norm", f"{layer}.layer_norm1") + norm("layers/mlp_norm", f"{layer}.layer_norm2")
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += linear(f"layers/attn/{name}", f"{layer}.self_attn.{name}")
    rules += mlp("layers/mlp", f"{layer}.mlp")
    rules += norm("post_norm", "post_layernorm")
    if c.use_head:
        rules.append(TensorRule("head/probe", "head.probe", lambda a: a.reshape(h)))
        # torch.nn.MultiheadAttention packs q, k, v into one [3H, H] in_proj.
        for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(n * h, (n + 1) * h)
            rules.append(
                TensorRule(f"head/attn/{name}/kernel", "head.attention.in_proj_weight", lambda a, r=rows: a[r].T)
            )
            rules.append(TensorRule(f"head/attn/{name}/bias", "head.attention.in_proj_bias", lambda a, r=rows: a[r]))
        rules += linear("head/attn/out_proj", "head.attention.out_proj")
        rules += norm("head/norm", "head.layernorm") + mlp("head/mlp", "head.mlp")
    return rules


def load_vision_params(
    path: str | os.PathLike,
    config: VisionConfig | None = None,
    *,
    prefix: str | None = None,
    dtype=None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
) -> tuple[VisionConfig, nnx.State]:
    """Read a CLIP / SigLIP vision tower from an HF safetensors checkpoint (a directory, or a file in it).

    prefix: where the tower's tensors sit (e.g. "vision_tower." in a transformers 5 LLaVA checkpoint); None
    finds it among VISION_PREFIXES. config None reads config.json (a LLaVA one's vision_config works too).
    dtype: None keeps the checkpoint's dtype; otherwise every tensor is cast. mesh: each tensor goes straight onto
    its sharding (VISION_LOGICAL_AXES through `rules`).
    """
    directory, index = open_index(path)
    config = config or VisionConfig.from_pretrained(directory)
    prefix = find_prefix(index, prefix, VISION_PREFIXES, _PROBE)
    abstract = abstract_params(config, dtype if dtype is not None else index.get(prefix + _PROBE).dtype)
    params = load_tensors(
        index,
        _vision_rules(config),
        abstract,
        prefix=prefix,
        num_layers=config.num_layers,
        owned=_TOWER_PARTS,
        ignored=_IGNORED,
        mesh=mesh,
        axes=VISION_LOGICAL_AXES,
        mesh_rules=rules,
    )
    return config, params
