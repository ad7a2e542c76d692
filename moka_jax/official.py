"""Import adapters trained by the official PyTorch MokA code (GeWu-Lab/MokA, spec section 5.6) into adapted params.

The two official code paths store one LLaMA decoder linear's adapter as torch `nn.Linear` weights, A as (r, in) and B
as (out, r), under these names (the prefix is the PEFT wrapper's module path down to the decoder's `layers`):

- AVT (`AudioVisualText`, `adapter_model.bin` written by its own PEFT fork; A0 / A1 / A2 = text / video / audio,
  `<image>` tokens use the video A):
  `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A0.weight` ... `lora_A2.weight`, `lora_B0.weight`.
- VT (`VisualText`, the whole `PeftMixedModel` state dict in `model.safetensors`, adapters named "image" and "text"):
  `base_model.model.model.language_model.layers.{i}.self_attn.q_proj.lora_A.text.weight`, `lora_A.image.weight`,
  `lora_B.text.weight`; `lora_B.image.weight` exists but the forward never reads it, so it is ignored.

Modules: `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj` (ours: `attn/...`, `mlp/...`). Non-adapter keys
(base weights, projectors, encoders) are skipped; every key with `lora_` in its name must be one the params expect.
The official hyperparameters of each layout, for use with the imported weights, come from `official_config`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.config import ModelConfig
from kvzip_jax.sharding import path_str
from moka_jax.config import MokAConfig

Layout = Literal["avt", "vt"]

# Per layout: the default key prefix, our modality name -> its A tensor name, B's name, ignored dead tensors.
LAYOUTS = {
    "avt": dict(prefix="base_model.model.model.",
                a={"text": "lora_A0", "image": "lora_A1", "audio": "lora_A2"}, b="lora_B0", dead=()),
    "vt": dict(prefix="base_model.model.model.language_model.",
               a={"text": "lora_A.text", "image": "lora_A.image"}, b="lora_B.text", dead=("lora_B.image",)),
}

# Official module path inside a decoder layer -> ours.
MODULES = {
    "self_attn.q_proj": "attn/q_proj", "self_attn.k_proj": "attn/k_proj", "self_attn.v_proj": "attn/v_proj",
    "self_attn.o_proj": "attn/o_proj", "mlp.gate_proj": "mlp/gate_proj", "mlp.up_proj": "mlp/up_proj",
    "mlp.down_proj": "mlp/down_proj",
}
_OURS_TO_OFFICIAL = {v: k for k, v in MODULES.items()}
_PARAM = re.compile(r"layers/((?:attn|mlp)/\w+)/lora_(a|b)")


def _check_layout(layout: str) -> dict:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout]


def official_config(layout: Layout, **overrides) -> MokAConfig:
    """The hyperparameters the official scripts train with (r 4, alpha 16, dropout 0.05, all seven projections).

    "avt": text / video (our "image") / audio, lambda (blc_weight) 1.0, alpha/r applied right after A
    (scale_before_attention=True), scores / sqrt(r) (the code since 2025-12-28; pass attn_scale="sqrt_num_keys" for
    the earlier sqrt(number of question tokens)). "vt": text / image, lambda (attn_weight) 0.05, alpha/r after B."""
    _check_layout(layout)
    common = dict(rank=4, alpha=16.0, dropout=0.05, method="moka", text_modality="text", attn_scale="sqrt_rank")
    if layout == "avt":
        config = MokAConfig(**common, modalities=("text", "image", "audio"), cross_attn_weight=1.0,
                            scale_before_attention=True)
    else:
        config = MokAConfig(**common, modalities=("text", "image"), cross_attn_weight=0.05,
                            scale_before_attention=False)
    return config.replace(**overrides) if overrides else config


def official_key(layout: Layout, layer: int, module: str, tensor: str, prefix: str | None = None) -> str:
    """The official state-dict key of one adapter tensor, e.g. official_key("avt", 0, "self_attn.q_proj", "lora_A0")
    -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A0.weight'."""
    spec = _check_layout(layout)
    return f"{spec['prefix'] if prefix is None else prefix}layers.{layer}.{module}.{tensor}.weight"


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 included) without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def load_official_adapter(
    params,
    state_dict: Mapping[str, object],
    config: ModelConfig,
    moka: MokAConfig,
    layout: Layout,
    *,
    prefix: str | None = None,
):
    """Adapted params (from `moka_jax.model.apply_moka` with `moka`) -> the same params with every adapter weight
    taken from an official PyTorch state dict (numpy arrays or torch tensors; non-adapter keys are skipped).

    A (r, in) goes to `lora_a[layer, slot]` as (in, r), the slot of its modality in `moka.modalities`; B (out, r) to
    `lora_b[layer, 0]` as (r, out). `prefix` overrides the layout's key prefix (see `LAYOUTS`). Raises ValueError for
    a layout whose modalities differ from `moka.modalities`, an adapter method other than per-modality A with one
    shared B, a missing adapter tensor, a tensor of another shape, and adapter keys the params have no place for."""
    spec = _check_layout(layout)
    prefix = spec["prefix"] if prefix is None else prefix
    official = tuple(spec["a"])
    if set(moka.modalities) != set(official) or moka.text_modality != "text":
        raise ValueError(
            f"the official {layout.upper()} checkpoint has modalities {official} (text modality 'text'); the MokA "
            f"config has {moka.modalities} (text modality {moka.text_modality!r}): use official_config({layout!r})")
    if moka.a_mode != "routed" or moka.b_mode != "shared":
        raise ValueError(f"the official checkpoint holds one A per modality and one shared B; method {moka.method!r} "
                         "has another layout (use 'moka' or 'moka_no_ca')")

    # What the params expect: official key -> (our path, layer, slot, official torch shape).
    expected: dict[str, tuple[str, int, int, tuple[int, ...]]] = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = path_str(key_path)
        if not path.endswith(("/lora_a", "/lora_b")):
            continue
        match = _PARAM.fullmatch(path)
        if match is None or match.group(1) not in _OURS_TO_OFFICIAL:
            raise ValueError(f"adapter {path} has no counterpart in the official layout (modules {tuple(MODULES)})")
        module, which = _OURS_TO_OFFICIAL[match.group(1)], match.group(2)
        want_lead = (config.num_layers, moka.num_a if which == "a" else moka.num_b)
        if leaf.ndim != 4 or tuple(leaf.shape[:2]) != want_lead:
            raise ValueError(f"adapter {path} has shape {tuple(leaf.shape)}; expected [{config.num_layers} layers, "
                             f"{want_lead[1]}, ., .] for this model and MokA config")
        d0, d1 = leaf.shape[2:]
        for layer in range(config.num_layers):
            if which == "a":
                for slot, name in enumerate(moka.modalities):
                    key = official_key(layout, layer, module, spec["a"][name], prefix)
                    expected[key] = (path, layer, slot, (d1, d0))  # (r, in)
            else:
                expected[official_key(layout, layer, module, spec["b"], prefix)] = (path, layer, 0, (d1, d0))
    if not expected:
        raise ValueError("the params hold no adapter (lora_a / lora_b): apply moka_jax.model.apply_moka first")

    dead = tuple(f".{name}.weight" for name in spec["dead"])
    adapter_keys = [k for k in state_dict if "lora_" in k and not k.endswith(dead)]
    unexpected = sorted(k for k in adapter_keys if k not in expected)
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} adapter keys of the state dict have no place in these params, e.g. {unexpected[0]!r} "
            f"(expected keys look like {next(iter(expected))!r}; check the layout, prefix, layer count and "
            f"target_modules): {unexpected[:5]}")
    missing = [k for k in expected if k not in state_dict]
    if missing:
        path, _, _, shape = expected[missing[0]]
        raise ValueError(f"the state dict lacks {len(missing)} adapter tensors, e.g. {missing[0]!r} (expected shape "
                         f"{shape}, for {path}): {missing[:5]}")

    filled: dict[str, np.ndarray] = {}
    for key, (path, layer, slot, shape) in expected.items():
        value = _as_numpy(state_dict[key])
        if value.shape != shape:
            raise ValueError(f"{key!r} has shape {value.shape}, expected {shape} (torch layout for {path}): a "
                             "checkpoint of another model, rank or MokA config?")
        if path not in filled:
            n = moka.num_a if path.endswith("/lora_a") else moka.num_b
            filled[path] = np.zeros((config.num_layers, n, shape[1], shape[0]), np.float32)
        filled[path][layer, slot] = value.T

    def put(key_path, leaf):
        new = filled.get(path_str(key_path))
        if new is None:
            return leaf
        out = jnp.asarray(new, leaf.dtype)
        sharding = getattr(leaf, "sharding", None)
        return jax.device_put(out, sharding) if sharding is not None else out

    return jax.tree_util.tree_map_with_path(put, params)
