"""Audio encoders: Whisper's encoder (speech) and the Audio Spectrogram Transformer (AST, general audio), driven by
WhisperEncoderConfig / ASTConfig, behind pure `encode_whisper` / `encode_ast`.

MokA (research/moka.md §2) encodes speech with Whisper and general audio with BEATs. transformers has no BEATs, so
there would be no reference to test a port against and no checkpoint layout to load; AST (an AudioSet-trained
spectrogram ViT that transformers ships as ASTModel) is our general-audio encoder instead.

Whisper input: log-mel features `[B, num_mel_bins, 2 * max_source_positions]` (3000 frames for the released models),
as `kvzip_jax.preprocess.WhisperFeatureExtractor` makes them. AST input: `[B, max_length, num_mel_bins]`, the Kaldi
fbank features of transformers' ASTFeatureExtractor (not ported here). Both reuse the vision towers' pre-norm blocks,
stacked on a leading axis and applied with `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.config import UnsupportedModelError
from kvzip_jax.models.layers import _normal
from kvzip_jax.models.safetensors_index import TensorRule, find_prefix, load_tensors, open_index, transposed
from kvzip_jax.models.vision import ACTIVATIONS, VISION_LOGICAL_AXES, EncoderLayer, LayerNorm, check_activation
from kvzip_jax.sharding import DEFAULT_RULES, AxesTable

WHISPER = "whisper"
AST = "audio-spectrogram-transformer"


def _check_model_type(hf: dict[str, Any], supported: str) -> None:
    model_type = hf.get("model_type", supported)  # a bare dict of the tower's keys is taken as that tower's
    if model_type != supported:
        raise UnsupportedModelError(f"audio model_type {model_type!r} is not supported here; supported: {supported}")


def _read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json at {config_path}")
    with open(config_path) as f:
        return json.load(f)


def _check_sizes(config, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
    if config.hidden_size % config.num_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not a multiple of the {config.num_heads} attention heads"
        )


# transformers' WhisperConfig defaults (whisper-tiny's encoder).
_WHISPER_DEFAULTS: dict[str, Any] = dict(
    d_model=384,
    encoder_layers=4,
    encoder_attention_heads=6,
    encoder_ffn_dim=1536,
    num_mel_bins=80,
    max_source_positions=1500,
    activation_function="gelu",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WhisperEncoderConfig:
    """Static description of Whisper's audio encoder; frozen and hashable (a static jit argument). Field names are
    VisionConfig's, which the shared blocks read: d_model -> hidden_size, encoder_ffn_dim -> intermediate_size."""

    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 4
    num_heads: int = 6
    num_mel_bins: int = 80
    max_source_positions: int = 1500
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5  # torch's nn.LayerNorm default: WhisperConfig has no key for it

    def __post_init__(self):
        check_activation(self.hidden_act, "activation_function")
        _check_sizes(
            self,
            ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_mel_bins", "max_source_positions"),
        )

    @property
    def num_frames(self) -> int:
        """Input frames: conv2 halves them to max_source_positions (3000 -> 1500 for the released models)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> WhisperEncoderConfig:
        """From a WhisperConfig's config.json (or its directory)."""
        return cls.from_hf_dict(_read_config(path))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> WhisperEncoderConfig:
        """From a WhisperConfig dict (transformers' defaults for keys it omits; the decoder's keys are ignored)."""
        _check_model_type(hf, WHISPER)
        d = {**_WHISPER_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        return cls(
            hidden_size=int(d["d_model"]),
            intermediate_size=int(d["encoder_ffn_dim"]),
            num_layers=int(d["encoder_layers"]),
            num_heads=int(d["encoder_attention_heads"]),
            num_mel_bins=int(d["num_mel_bins"]),
            max_source_positions=int(d["max_source_positions"]),
            hidden_act=str(d["activation_function"]),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": WHISPER,
            "d_model": self.hidden_size,
            "encoder_ffn_dim": self.intermediate_size,
            "encoder_layers": self.num_layers,
            "encoder_attention_heads": self.num_heads,
            "num_mel_bins": self.num_mel_bins,
            "max_source_positions": self.max_source_positions,
            "activation_function": self.hidden_act,
        }


# transformers' ASTConfig defaults (MIT/ast-finetuned-audioset-10-10-0.4593).
_AST_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    patch_size=16,
    frequency_stride=10,
    time_stride=10,
    max_length=1024,
    num_mel_bins=128,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    qkv_bias=True,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ASTConfig:
    """Static description of an Audio Spectrogram Transformer; frozen and hashable (a static jit argument)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024
    num_mel_bins: int = 128
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        check_activation(self.hidden_act)
        _check_sizes(
            self,
            (
                "hidden_size",
                "intermediate_size",
                "num_layers",
                "num_heads",
                "patch_size",
                "frequency_stride",
                "time_stride",
                "max_length",
                "num_mel_bins",
            ),
        )
        for name in ("max_length", "num_mel_bins"):
            if getattr(self, name) < self.patch_size:
                raise ValueError(f"{name} {getattr(self, name)} is smaller than patch_size {self.patch_size}")

    @property
    def frequency_patches(self) -> int:
        # The conv has no padding: frequency bins / frames past the last whole patch are dropped.
        return (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1

    @property
    def time_patches(self) -> int:
        return (self.max_length - self.patch_size) // self.time_stride + 1

    @property
    def num_positions(self) -> int:
        """Tokens out of the encoder: the cls and distillation tokens, then the patches (frequency-major)."""
        return 2 + self.frequency_patches * self.time_patches

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ASTConfig:
        """From an ASTConfig's config.json (or its directory)."""
        return cls.from_hf_dict(_read_config(path))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ASTConfig:
        """From an ASTConfig dict (transformers' defaults for keys it omits)."""
        _check_model_type(hf, AST)
        d = {**_AST_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
        if d["qkv_bias"] is not True:
            raise UnsupportedModelError(f"qkv_bias {d['qkv_bias']!r} is not supported; supported: True")
        if isinstance(d["patch_size"], bool) or not isinstance(d["patch_size"], int):
            # transformers' own embedding arithmetic needs an int too.
            raise UnsupportedModelError(f"patch_size {d['patch_size']!r} is not supported; supported: an int")
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            patch_size=d["patch_size"],
            frequency_stride=int(d["frequency_stride"]),
            time_stride=int(d["time_stride"]),
            max_length=int(d["max_length"]),
            num_mel_bins=int(d["num_mel_bins"]),
            hidden_act=str(d["hidden_act"]),
            layer_norm_eps=float(d["layer_norm_eps"]),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": AST,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "patch_size": self.patch_size,
            "frequency_stride": self.frequency_stride,
            "time_stride": self.time_stride,
            "max_length": self.max_length,
            "num_mel_bins": self.num_mel_bins,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "qkv_bias": True,
        }


AudioConfig = WhisperEncoderConfig | ASTConfig


# ------------------------------------------------------------------------------------------------------ modules
class Conv(nnx.Module):
    """Channels-last convolution with bias: kernel [*window, in, out] (torch's [out, in, *window], moved)."""

    def __init__(self, d_in: int, d_out: int, window: tuple[int, ...], *, strides, padding, dtype, rngs: nnx.Rngs):
        self.strides = tuple(strides)
        self.padding = padding
        self.kernel = nnx.Param(_normal(rngs, (*window, d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, *spatial, in] -> [B, *spatial_out, out]."""
        spatial = "DHW"[-len(self.strides) :]
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...],
            self.strides,
            self.padding,
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        )
        return y + self.bias[...]


def _stacked_layers(config: AudioConfig, *, dtype, rngs: nnx.Rngs, k_bias: bool = True) -> EncoderLayer:
    """config.num_layers vision EncoderLayers, params stacked on a leading axis (one layer traced, vmapped)."""
    make = functools.partial(EncoderLayer, config, dtype=dtype, k_bias=k_bias)

    def one_layer(key):
        return nnx.state(make(rngs=nnx.Rngs(params=key)))

    layer_graph = nnx.graphdef(nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0))))
    return nnx.merge(layer_graph, jax.vmap(one_layer)(jax.random.split(rngs.params(), config.num_layers)))


def _run_layers(layers: EncoderLayer, x: jax.Array) -> jax.Array:
    layer_graph, layer_state = nnx.split(layers)

    def body(h, state):
        return nnx.merge(layer_graph, state)(h), None

    return jax.lax.scan(body, x, layer_state)[0]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table [length, channels] (sin half, then cos half); only the init uses it, since the
    checkpoint stores the table."""
    increment = math.log(max_timescale) / max(channels // 2 - 1, 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    table = np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1)
    return np.pad(table, ((0, 0), (0, channels - table.shape[1]))).astype(np.float32)


class WhisperEncoder(nnx.Module):
    """Parameters of Whisper's encoder. Param paths: `conv1`, `conv2` (Conv: kernel [3, in, out]), `pos_embed`
    ([max_source_positions, H], transformers' embed_positions), `layers/...` (stacked; k_proj has no bias),
    `post_norm` (transformers' layer_norm)."""

    def __init__(self, config: WhisperEncoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        h = c.hidden_size
        self.conv1 = Conv(c.num_mel_bins, h, (3,), strides=(1,), padding=((1, 1),), dtype=dtype, rngs=rngs)
        self.conv2 = Conv(h, h, (3,), strides=(2,), padding=((1, 1),), dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.asarray(sinusoids(c.max_source_positions, h), dtype))
        self.layers = _stacked_layers(c, dtype=dtype, rngs=rngs, k_bias=False)
        self.post_norm = LayerNorm(h, eps=c.layer_norm_eps, dtype=dtype)

    def __call__(self, features: jax.Array) -> jax.Array:
        """[B, num_mel_bins, num_frames] -> last_hidden_state [B, max_source_positions, H]."""
        check_whisper_features(features, self.config)
        gelu = ACTIVATIONS["gelu"]  # the convs use exact GELU whatever activation_function says
        x = jnp.swapaxes(features, 1, 2).astype(self.pos_embed[...].dtype)
        x = gelu(self.conv2(gelu(self.conv1(x))))
        return self.post_norm(_run_layers(self.layers, x + self.pos_embed[...]))


class ASTEncoder(nnx.Module):
    """Parameters of an Audio Spectrogram Transformer. Param paths: `patch_embed` (Conv: kernel [p, p, 1, H] over
    (frequency, time)), `cls_token`, `distill_token`, `pos_embed` ([num_positions, H]), `layers/...` (stacked),
    `post_norm` (transformers' layernorm)."""

    def __init__(self, config: ASTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        h = c.hidden_size
        self.patch_embed = Conv(
            1,
            h,
            (c.patch_size, c.patch_size),
            strides=(c.frequency_stride, c.time_stride),
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )
        self.cls_token = nnx.Param(_normal(rngs, (h,), dtype))
        self.distill_token = nnx.Param(_normal(rngs, (h,), dtype))
        self.pos_embed = nnx.Param(_normal(rngs, (c.num_positions, h), dtype))
        self.layers = _stacked_layers(c, dtype=dtype, rngs=rngs)
        self.post_norm = LayerNorm(h, eps=c.layer_norm_eps, dtype=dtype)

    def __call__(self, spectrogram: jax.Array) -> ASTOutput:
        """[B, max_length, num_mel_bins] -> (last_hidden_state [B, num_positions, H], pooled [B, H])."""
        c = self.config
        check_ast_spectrogram(spectrogram, c)
        b, h = spectrogram.shape[0], c.hidden_size
        # transformers convolves a [mel, time] image; the flattened patches run frequency-major.
        x = jnp.swapaxes(spectrogram, 1, 2)[..., None].astype(self.pos_embed[...].dtype)
        x = self.patch_embed(x).reshape(b, -1, h)
        tokens = [jnp.broadcast_to(t[...], (b, 1, h)) for t in (self.cls_token, self.distill_token)]
        x = jnp.concatenate([*tokens, x], axis=1) + self.pos_embed[...]
        last = self.post_norm(_run_layers(self.layers, x))
        return ASTOutput(last, (last[:, 0] + last[:, 1]) / 2)  # ASTModel's pooler_output


def check_whisper_features(features, config: WhisperEncoderConfig) -> None:
    """Static checks of the log-mel batch (shapes only, so it works on tracers)."""
    shape = tuple(features.shape)
    mel, frames = config.num_mel_bins, config.num_frames
    if len(shape) != 3:
        raise ValueError(f"Whisper input features must be [batch, {mel}, {frames}]; got shape {shape}")
    if shape[1] != mel:
        hint = " (this looks like [batch, frames, mel]; transpose it)" if shape[2] == mel else ""
        raise ValueError(f"Whisper input features have {shape[1]} mel bins (shape {shape}); expected {mel}{hint}")
    if shape[2] != frames:
        # transformers refuses other lengths too: the position table is fixed.
        raise ValueError(
            f"Whisper input features have {shape[2]} frames; the encoder expects exactly {frames} "
            f"(2 * max_source_positions {config.max_source_positions}); pad or trim as WhisperFeatureExtractor does"
        )


def check_ast_spectrogram(spectrogram, config: ASTConfig) -> None:
    """Static checks of the spectrogram batch (shapes only, so it works on tracers)."""
    shape = tuple(spectrogram.shape)
    expected = (config.max_length, config.num_mel_bins)
    if len(shape) != 3:
        raise ValueError(f"AST input must be [batch, {expected[0]}, {expected[1]}] (time, mel); got shape {shape}")
    if shape[1:] != expected:
        hint = " (this looks like [batch, mel, time]; transpose it)" if shape[1:] == expected[::-1] else ""
        raise ValueError(
            f"AST input is {shape[1]} frames x {shape[2]} mel bins; the model expects "
            f"{expected[0]} x {expected[1]} (max_length x num_mel_bins){hint}"
        )


# ------------------------------------------------------------------------------------------- pure boundary
class ASTOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, num_positions, H], post-layernormed (as transformers)
    pooled: jax.Array  # [B, H]: mean of the cls and distillation tokens (ASTModel's pooler_output)


_MODULES: dict[type, type[nnx.Module]] = {WhisperEncoderConfig: WhisperEncoder, ASTConfig: ASTEncoder}


def _module(config: AudioConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
    if type(config) not in _MODULES:
        raise TypeError(f"expected a WhisperEncoderConfig or ASTConfig, got {type(config).__name__}")
    return _MODULES[type(config)](config, dtype=dtype, rngs=rngs)


@functools.cache
def graphdef_for(config: AudioConfig, dtype_name: str = "float32") -> nnx.GraphDef:
    """The (static) structure of the encoder for `config`; no memory is allocated."""
    return nnx.graphdef(nnx.eval_shape(lambda: _module(config, jnp.dtype(dtype_name), nnx.Rngs(0))))


def abstract_params(config: AudioConfig, dtype=jnp.float32) -> nnx.State:
    """Params as ShapeDtypeStructs: the target that the loaders fill."""
    return nnx.state(nnx.eval_shape(lambda: _module(config, jnp.dtype(dtype), nnx.Rngs(0))))


def init_params(config: AudioConfig, seed: int = 0, dtype=jnp.float32) -> nnx.State:
    """Random params (normal, std 0.02; norms at scale 1, bias 0; Whisper's sinusoidal positions), one jitted call
    per (config, dtype)."""
    return _init_params(config, jnp.dtype(dtype).name, jax.random.key(seed))


@functools.partial(jax.jit, static_argnames=("config", "dtype_name"))
def _init_params(config: AudioConfig, dtype_name: str, key: jax.Array) -> nnx.State:
    return nnx.state(_module(config, jnp.dtype(dtype_name), nnx.Rngs(params=key)))


def _model(params: nnx.State, config: AudioConfig, kind: type) -> nnx.Module:
    if not isinstance(config, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(config).__name__}")
    return nnx.merge(graphdef_for(config, str(jnp.dtype(params["pos_embed"][...].dtype))), params)


def encode_whisper(params: nnx.State, features: jax.Array, *, config: WhisperEncoderConfig) -> jax.Array:
    """Log-mel features [B, num_mel_bins, 2 * max_source_positions] -> [B, max_source_positions, H]: transformers'
    WhisperEncoder last_hidden_state. Traceable; jit it with config static."""
    return _model(params, config, WhisperEncoderConfig)(features)


def encode_ast(params: nnx.State, spectrogram: jax.Array, *, config: ASTConfig) -> ASTOutput:
    """Spectrogram [B, max_length, num_mel_bins] -> ASTModel's (last_hidden_state, pooler_output). Traceable; jit
    it with config static."""
    return _model(params, config, ASTConfig)(spectrogram)


# ------------------------------------------------------------------------------------------------ loading
def _linear(ours: str, hf: str, bias: bool = True) -> list[TensorRule]:
    rules = [TensorRule(f"{ours}/kernel", f"{hf}.weight", transposed)]
    return rules + ([TensorRule(f"{ours}/bias", f"{hf}.bias")] if bias else [])


def _norm(ours: str, hf: str) -> list[TensorRule]:
    return [TensorRule(f"{ours}/scale", f"{hf}.weight"), TensorRule(f"{ours}/bias", f"{hf}.bias")]


def _conv(ours: str, hf: str) -> list[TensorRule]:
    # torch [out, in, *window] -> [*window, in, out]
    return [
        TensorRule(f"{ours}/kernel", f"{hf}.weight", lambda a: a.transpose(*range(2, a.ndim), 1, 0)),
        TensorRule(f"{ours}/bias", f"{hf}.bias"),
    ]


def _layer_rules(names: dict[str, str], *, k_bias: bool = True) -> list[TensorRule]:
    """The stacked EncoderLayer from the HF names ('{i}' marks the layer) of its eight parts."""
    rules = _norm("layers/attn_norm", names["attn_norm"]) + _norm("layers/mlp_norm", names["mlp_norm"])
    for ours in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += _linear(f"layers/attn/{ours}", names[ours], bias=k_bias or ours != "k_proj")
    return rules + _linear("layers/mlp/fc1", names["fc1"]) + _linear("layers/mlp/fc2", names["fc2"])


# Where the encoder sits: WhisperForConditionalGeneration (`model.encoder.`), WhisperModel and
# WhisperForAudioClassification (`encoder.`), a standalone WhisperEncoder (no prefix).
WHISPER_PREFIXES = ("", "encoder.", "model.encoder.")
_WHISPER_PROBE = "conv1.weight"
_WHISPER_PARTS = ("conv1.", "conv2.", "embed_positions.", "layers.", "layer_norm.")


def _whisper_rules() -> list[TensorRule]:
    layer = "layers.{i}"
    attn = f"{layer}.self_attn"
    names = dict(
        attn_norm=f"{layer}.self_attn_layer_norm",
        mlp_norm=f"{layer}.final_layer_norm",
        q_proj=f"{attn}.q_proj",
        k_proj=f"{attn}.k_proj",
        v_proj=f"{attn}.v_proj",
        out_proj=f"{attn}.out_proj",
        fc1=f"{layer}.fc1",
        fc2=f"{layer}.fc2",
    )
    return (
        _conv("conv1", "conv1")
        + _conv("conv2", "conv2")
        + [TensorRule("pos_embed", "embed_positions.weight")]
        + _layer_rules(names, k_bias=False)
        + _norm("post_norm", "layer_norm")
    )


# ASTForAudioClassification (`audio_spectrogram_transformer.`), ASTModel (no prefix).
AST_PREFIXES = ("", "audio_spectrogram_transformer.")
_AST_PROBE = "embeddings.patch_embeddings.projection.weight"
_AST_PARTS = ("embeddings.", "encoder.", "layers.", "layernorm.")


def _ast_rules(legacy: bool) -> list[TensorRule]:
    """legacy: the ViT names of hub checkpoints, which transformers 5 also writes by default
    (save_original_format); otherwise transformers 5's module names."""
    if legacy:
        layer = "encoder.layer.{i}"
        attn = f"{layer}.attention.attention"
        q, k, v, o = f"{attn}.query", f"{attn}.key", f"{attn}.value", f"{layer}.attention.output.dense"
        fc1, fc2 = f"{layer}.intermediate.dense", f"{layer}.output.dense"
    else:
        layer = "layers.{i}"
        q, k, v, o = (f"{layer}.attention.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        fc1, fc2 = f"{layer}.mlp.fc1", f"{layer}.mlp.fc2"
    names = dict(
        attn_norm=f"{layer}.layernorm_before",
        mlp_norm=f"{layer}.layernorm_after",
        q_proj=q,
        k_proj=k,
        v_proj=v,
        out_proj=o,
        fc1=fc1,
        fc2=fc2,
    )
    return [
        *_conv("patch_embed", "embeddings.patch_embeddings.projection"),
        TensorRule("cls_token", "embeddings.cls_token", lambda a: a.reshape(a.shape[-1])),
        TensorRule("distill_token", "embeddings.distillation_token", lambda a: a.reshape(a.shape[-1])),
        TensorRule("pos_embed", "embeddings.position_embeddings", lambda a: a.reshape(-1, a.shape[-1])),
        *_layer_rules(names),
        *_norm("post_norm", "layernorm"),
    ]


# Param path -> logical axes (kvzip_jax.sharding): the stacked layers as the vision towers', plus the stems.
AUDIO_LOGICAL_AXES: AxesTable = (
    (r"^conv[12]/kernel$", (None, None, "embed")),
    (r"^patch_embed/kernel$", (None, None, None, "embed")),
    (r"^(conv[12]/bias|patch_embed/bias|cls_token|distill_token)$", ("embed",)),
    (r"^pos_embed$", (None, "embed")),
    *(rule for rule in VISION_LOGICAL_AXES if rule[0].startswith("^layers/")),
    (r"^post_norm/(scale|bias)$", ("norm",)),
)


def _load(index, config: AudioConfig, rules, prefix: str, probe: str, owned, dtype, mesh, mesh_rules) -> nnx.State:
    abstract = abstract_params(config, dtype if dtype is not None else index.get(prefix + probe).dtype)
    return load_tensors(index, rules, abstract, prefix=prefix, num_layers=config.num_layers, owned=owned,
                        mesh=mesh, axes=AUDIO_LOGICAL_AXES, mesh_rules=mesh_rules)


def load_whisper_encoder_params(
    path: str | os.PathLike,
    config: WhisperEncoderConfig | None = None,
    *,
    prefix: str | None = None,
    dtype=None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
) -> tuple[WhisperEncoderConfig, nnx.State]:
    """Read Whisper's encoder from an HF safetensors checkpoint (a directory, or a file in it).

    prefix: where the encoder's tensors sit; None finds it among WHISPER_PREFIXES. config None reads config.json.
    dtype: None keeps the checkpoint's dtype; otherwise every tensor is cast. Decoder tensors are left alone.
    mesh: each tensor goes straight onto its sharding (AUDIO_LOGICAL_AXES through `rules`).
    """
    directory, index = open_index(path)
    config = config or WhisperEncoderConfig.from_pretrained(directory)
    prefix = find_prefix(index, prefix, WHISPER_PREFIXES, _WHISPER_PROBE)
    return config, _load(index, config, _whisper_rules(), prefix, _WHISPER_PROBE, _WHISPER_PARTS, dtype, mesh, rules)


def load_ast_params(
    path: str | os.PathLike,
    config: ASTConfig | None = None,
    *,
    prefix: str | None = None,
    dtype=None,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
) -> tuple[ASTConfig, nnx.State]:
    """Read an Audio Spectrogram Transformer from an HF safetensors checkpoint (a directory, or a file in it), in
    either naming (hub / transformers 4 `encoder.layer.N...`, or transformers 5 `layers.N...`).

    prefix: where the encoder's tensors sit; None finds it among AST_PREFIXES. config None reads config.json.
    dtype: None keeps the checkpoint's dtype; otherwise every tensor is cast. The classifier head is left alone.
    mesh: each tensor goes straight onto its sharding (AUDIO_LOGICAL_AXES through `rules`).
    """
    directory, index = open_index(path)
    config = config or ASTConfig.from_pretrained(directory)
    prefix = find_prefix(index, prefix, AST_PREFIXES, _AST_PROBE)
    legacy = any(name.startswith(prefix + "encoder.layer.") for name in index.weight_map)
    return config, _load(index, config, _ast_rules(legacy), prefix, _AST_PROBE, _AST_PARTS, dtype, mesh, rules)
