"""ModelConfig: everything static about a decoder-only text LLM, read from a Hugging Face config.json.

Both config forms in the wild are accepted:
- transformers >= 5: `rope_parameters` (one dict, or one dict per layer type for Gemma3);
- older files: top-level `rope_theta` + `rope_scaling` (and Gemma3's `rope_local_base_freq`).

The dataclass is frozen and hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
FAMILY_TO_ARCHITECTURE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
FAMILY_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
MODEL_TYPE_TO_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}

FULL = "full_attention"
SLIDING = "sliding_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# transformers' defaults when a Gemma3 config.json predates `rope_parameters`.
GEMMA3_DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding of one layer type, in the transformers 5 `rope_parameters` vocabulary."""

    rope_type: str = "default"
    theta: float = 10_000.0
    factor: float | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def inv_freq_and_scaling(self, head_dim: int) -> tuple[np.ndarray, float]:
        """Inverse frequencies [head_dim // 2] (float32, computed like transformers) and the cos/sin scale."""
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        base = np.float32(self.theta)
        inv_freq = (np.float32(1.0) / (base**exponents)).astype(np.float32)
        if self.rope_type == "default":
            return inv_freq, 1.0
        if self.rope_type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32), 1.0
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv_freq, self), 1.0
        if self.rope_type == "yarn":
            return _yarn_inv_freq(head_dim, self)
        raise UnsupportedModelError(
            f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        for name, value in (
            ("factor", self.factor),
            ("low_freq_factor", self.low_freq_factor),
            ("high_freq_factor", self.high_freq_factor),
            ("original_max_position_embeddings", self.original_max_position_embeddings),
            ("beta_fast", self.beta_fast),
            ("beta_slow", self.beta_slow),
            ("attention_factor", self.attention_factor),
            ("mscale", self.mscale),
            ("mscale_all_dim", self.mscale_all_dim),
        ):
            if value is not None:
                out[name] = value
        if self.rope_type == "yarn" and not self.truncate:
            out["truncate"] = False
        return out


def _llama3_inv_freq(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    factor = np.float32(rope.factor)
    low, high = rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(head_dim: int, rope: RopeConfig) -> tuple[np.ndarray, float]:
    dim, base, factor = head_dim, rope.theta, rope.factor

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    orig = rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference avoids a zero-width ramp the same way
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Static description of a supported decoder. `layer_types[i]` selects `rope[layer_type]` and the mask."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: tuple[tuple[str, RopeConfig], ...] = ((FULL, RopeConfig()),)
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    query_pre_attn_scalar: int | float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILY_TO_ARCHITECTURE:
            raise UnsupportedModelError(
                f"family {self.family!r} is not supported; supported: {', '.join(FAMILY_TO_ARCHITECTURE)}"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}"
            )
        for kind in self.layer_types:
            if kind not in (FULL, SLIDING):
                raise UnsupportedModelError(f"layer type {kind!r} is not supported; supported: {FULL}, {SLIDING}")
            if kind not in dict(self.rope):
                raise ValueError(f"no rope parameters for layer type {kind!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a positive sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.hidden_act not in ("silu", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(
                f"hidden activation {self.hidden_act!r} is not supported; supported: silu, gelu_pytorch_tanh"
            )

    # Derived, family-specific behaviour lives here so the modules read one place.
    @property
    def gemma_norms(self) -> bool:
        """Gemma: RMSNorm scales by (1 + w), sandwich norms around attention and MLP, sqrt(hidden) embedding scale."""
        return self.family == "gemma3"

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim) ** -0.5

    @property
    def sliding_layers(self) -> np.ndarray:
        return np.array([t == SLIDING for t in self.layer_types])

    def rope_for(self, layer_type: str) -> RopeConfig:
        return dict(self.rope)[layer_type]

    @property
    def architecture(self) -> str:
        return FAMILY_TO_ARCHITECTURE[self.family]

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 4 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    # ---------------------------------------------------------------- HF I/O
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no config.json at {config_path}")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        hf = dict(hf)
        if "text_config" in hf and "vocab_size" not in hf:
            raise UnsupportedModelError(
                f"{hf.get('architectures')} is a multimodal checkpoint; supported text architectures: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        archs = hf.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None and not archs:
            family = MODEL_TYPE_TO_FAMILY.get(hf.get("model_type", ""))
        if family is None:
            raise UnsupportedModelError(
                f"architecture {archs or hf.get('model_type')!r} is not supported; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        num_layers = int(hf["num_hidden_layers"])
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        defaults = _FAMILY_DEFAULTS[family]

        layer_types = tuple(hf.get("layer_types") or ())
        sliding_window = hf.get("sliding_window")
        if family == "gemma3" and not layer_types:
            pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
            layer_types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))
        if family in ("qwen2", "qwen3") and not layer_types:
            use_sw = hf.get("use_sliding_window", False)
            max_window_layers = hf.get("max_window_layers", num_layers)
            layer_types = tuple(
                SLIDING if use_sw and sliding_window and i >= max_window_layers else FULL for i in range(num_layers)
            )
        if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            layer_types = tuple(FULL for _ in layer_types) if layer_types else layer_types
        if SLIDING not in layer_types:
            sliding_window = None
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedModelError("use_bidirectional_attention=True (an embedding model) is not supported")

        rope = _parse_rope(hf, family, set(layer_types) or {FULL})
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        qkv_bias = True if family == "qwen2" else bool(hf.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", defaults["max_position_embeddings"])),
            rms_norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
            rope=tuple(sorted(rope.items())),
            layer_types=layer_types,
            sliding_window=sliding_window,
            # Kept as written (an int in real configs): transformers rejects a float here when reading it back.
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if family == "gemma3" else None,
            attn_logit_softcap=_attn_softcap(hf, family),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
            qkv_bias=qkv_bias,
            o_bias=False if family == "qwen2" else bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family in ("qwen3", "gemma3"),
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or defaults["hidden_act"],
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers 5 config.json that describes this model."""
        if self.family == "gemma3":
            rope_parameters: dict[str, Any] = {k: r.to_hf() for k, r in self.rope}
        else:
            rope_parameters = self.rope_for(FULL).to_hf()
        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else (
            self.eos_token_ids[0] if self.eos_token_ids else None
        )
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": FAMILY_MODEL_TYPE[self.family],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "layer_types": list(self.layer_types),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "gemma3":
            out.update(
                hidden_activation=self.hidden_act,
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                sliding_window=self.sliding_window,
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                attention_bias=self.qkv_bias,
            )
        else:
            out["hidden_act"] = self.hidden_act
        if self.family in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        if self.family in ("llama", "qwen3"):
            out["attention_bias"] = self.qkv_bias
        if self.family == "llama":
            out["mlp_bias"] = self.mlp_bias
        return out


_FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu"),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu"),
    "qwen3": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu"),
    "gemma3": dict(
        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"
    ),
}


def _attn_softcap(hf: dict[str, Any], family: str) -> float | None:
    cap = hf.get("attn_logit_softcapping")
    if cap is not None and family == "gemma3":
        # transformers' Gemma3 attention stores this value but never applies it (nor does Gemma3 itself, which
        # sets it to None); our parity reference wins, so it is dropped, loudly.
        warnings.warn(
            f"attn_logit_softcapping={cap} is ignored for gemma3, as transformers ignores it", stacklevel=3
        )
        return None
    return cap


def _rope_from_dict(d: dict[str, Any], max_pos: int, fallback_theta: float | None) -> RopeConfig:
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = d.get("rope_theta", fallback_theta)
    if theta is None:
        raise ValueError("config.json has no rope_theta")
    orig = d.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn") and orig is None:
        orig = max_pos  # transformers' rule when the key is absent
    if rope_type in ("linear", "llama3") and d.get("factor") is None:
        raise ValueError(f"rope_type {rope_type!r} needs a 'factor'")
    factor = d.get("factor")
    if rope_type == "yarn" and factor is None:
        factor = max_pos / orig
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=None if factor is None else float(factor),
        low_freq_factor=d.get("low_freq_factor"),
        high_freq_factor=d.get("high_freq_factor"),
        original_max_position_embeddings=None if orig is None else int(orig),
        beta_fast=d.get("beta_fast"),
        beta_slow=d.get("beta_slow"),
        attention_factor=d.get("attention_factor"),
        mscale=d.get("mscale"),
        mscale_all_dim=d.get("mscale_all_dim"),
        truncate=bool(d.get("truncate", True)),
    )


def _parse_rope(hf: dict[str, Any], family: str, layer_types: set[str]) -> dict[str, RopeConfig]:
    max_pos = int(hf.get("max_position_embeddings", _FAMILY_DEFAULTS[family]["max_position_embeddings"]))
    params = hf.get("rope_parameters")
    if family == "gemma3":
        if params and set(params) & {FULL, SLIDING}:
            per_type = {k: dict(v) for k, v in params.items() if v is not None}
        else:  # old form: rope_theta (global), rope_local_base_freq (local), rope_scaling (global only)
            full = dict(hf.get("rope_scaling") or {})
            full.setdefault("rope_theta", hf.get("rope_theta", GEMMA3_DEFAULT_THETA[FULL]))
            local = {"rope_theta": hf.get("rope_local_base_freq", GEMMA3_DEFAULT_THETA[SLIDING])}
            per_type = {FULL: full, SLIDING: local}
        for kind in (FULL, SLIDING):
            per_type.setdefault(kind, {})
            per_type[kind].setdefault("rope_theta", hf.get("rope_theta", GEMMA3_DEFAULT_THETA[kind]))
        return {k: _rope_from_dict(per_type[k], max_pos, None) for k in (FULL, SLIDING)}
    if params and set(params) & {FULL, SLIDING}:
        raise UnsupportedModelError(f"per-layer-type rope_parameters are only supported for gemma3, not {family}")
    d = dict(params or hf.get("rope_scaling") or {})
    rope = _rope_from_dict(d, max_pos, hf.get("rope_theta", 10_000.0))
    return {k: rope for k in layer_types | {FULL}}
