"""MokAConfig: everything static about a MokA adapter (or one of its baselines) on a decoder.

One adapted-linear design covers MokA and the baselines it is compared with, at the same rank:

| method         | A matrices                    | B matrices               | cross-attention |
|----------------|-------------------------------|--------------------------|-----------------|
| `moka`         | one per modality, routed      | one, shared              | yes             |
| `moka_no_ca`   | one per modality, routed      | one, shared              | no              |
| `ca_only`      | one, shared                   | one, shared              | yes             |
| `lora`         | one, shared                   | one, shared              | no              |
| `unimodal_lora`| one per modality, routed      | one per modality, routed | no              |
| `multi_lora`   | one per modality, every token | one per modality         | no              |

"Routed": each token goes through its own modality's matrix only. `multi_lora` is the paper's "Multiple LoRA"
(N full LoRA pairs with no modality design: every token passes all of them and the outputs add up);
`unimodal_lora` is Phi-4-mini's mixture of LoRAs (a full pair per modality, routed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

METHODS = ("moka", "moka_no_ca", "ca_only", "lora", "unimodal_lora", "multi_lora")
# Per method: how the A and B matrices are used ("shared": one; "routed": one per modality, a token uses its
# own; "parallel": one per modality, every token uses all) and whether non-text tokens attend to the question.
_LAYOUT = {
    "moka": ("routed", "shared", True),
    "moka_no_ca": ("routed", "shared", False),
    "ca_only": ("shared", "shared", True),
    "lora": ("shared", "shared", False),
    "unimodal_lora": ("routed", "routed", False),
    "multi_lora": ("parallel", "parallel", False),
}

# The seven projections of every decoder layer (both official code paths hard-code these names).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class MokAConfig:
    """A MokA adapter's hyperparameters (defaults: the official scripts; spec section 5.6).

    modalities: the ordered modality names; `text_modality` is the one generated tokens and question keys belong to.
    query_modalities: the modalities whose tokens attend to the question (default: every non-text one).
    cross_attn_weight: lambda, one number or one per query modality (the AVT code uses 1.0, the VT code 0.05).
    attn_scale: "sqrt_rank" (paper v2 and the final code) or "sqrt_num_keys" (the AVT code before 2025-12-28).
    scale_before_attention: False = paper / VT code (attention on A x, alpha/r applied after B); True = AVT code
        (alpha/r applied right after A, so the softmax is (alpha/r)^2 sharper).
    target_modules: module names (a module is adapted when its path ends with one) or one regular expression
        (full match on the '/'-joined module path, e.g. "layers/attn/(q|v)_proj").
    a_init: "torch_kaiming" (PEFT's kaiming_uniform(a=sqrt(5)): bound 1/sqrt(in)) or "he_uniform" (Flax's).
    """

    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    method: Literal["moka", "moka_no_ca", "ca_only", "lora", "unimodal_lora", "multi_lora"] = "moka"
    modalities: tuple[str, ...] = ("text", "image", "audio")
    text_modality: str = "text"
    query_modalities: tuple[str, ...] | None = None
    cross_attn_weight: float | tuple[tuple[str, float], ...] = 1.0
    attn_scale: Literal["sqrt_rank", "sqrt_num_keys"] = "sqrt_rank"
    scale_before_attention: bool = False
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    a_init: Literal["torch_kaiming", "he_uniform"] = "torch_kaiming"
    use_rslora: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        modalities = tuple(self.modalities)
        object.__setattr__(self, "modalities", modalities)
        if len(set(modalities)) != len(modalities) or not modalities:
            raise ValueError(f"modalities must be distinct names, got {modalities}")
        if self.text_modality not in modalities:
            raise ValueError(f"text_modality {self.text_modality!r} is not among the modalities {modalities}")
        if self.query_modalities is not None:
            queries = tuple(self.query_modalities)
            object.__setattr__(self, "query_modalities", queries)
            bad = [m for m in queries if m not in modalities or m == self.text_modality]
            if bad:
                raise ValueError(f"query modalities {bad} must be non-text modalities among {modalities}")
        if isinstance(self.cross_attn_weight, Mapping):
            object.__setattr__(self, "cross_attn_weight", tuple(sorted(self.cross_attn_weight.items())))
        if not isinstance(self.cross_attn_weight, (int, float)):
            object.__setattr__(self, "cross_attn_weight", tuple((str(k), float(v)) for k, v in self.cross_attn_weight))
            unknown = [k for k, _ in self.cross_attn_weight if k not in self.queries]
            if unknown:
                raise ValueError(f"cross_attn_weight names {unknown}, which are not query modalities {self.queries}")
        if self.attn_scale not in ("sqrt_rank", "sqrt_num_keys"):
            raise ValueError(f"attn_scale must be 'sqrt_rank' or 'sqrt_num_keys', got {self.attn_scale!r}")
        if self.a_init not in ("torch_kaiming", "he_uniform"):
            raise ValueError(f"a_init must be 'torch_kaiming' or 'he_uniform', got {self.a_init!r}")
        if isinstance(self.target_modules, (list, tuple)):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ValueError("target_modules is empty")

    # ------------------------------------------------------------------ derived
    @property
    def a_mode(self) -> str:
        return _LAYOUT[self.method][0]

    @property
    def b_mode(self) -> str:
        return _LAYOUT[self.method][1]

    @property
    def cross_attention(self) -> bool:
        return _LAYOUT[self.method][2]

    @property
    def num_a(self) -> int:
        return 1 if self.a_mode == "shared" else len(self.modalities)

    @property
    def num_b(self) -> int:
        return 1 if self.b_mode == "shared" else len(self.modalities)

    @property
    def text_index(self) -> int:
        return self.modalities.index(self.text_modality)

    @property
    def queries(self) -> tuple[str, ...]:
        if self.query_modalities is not None:
            return self.query_modalities
        return tuple(m for m in self.modalities if m != self.text_modality)

    @property
    def scaling(self) -> float:
        """The LoRA scale s: alpha / r (alpha / sqrt(r) with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def weight_for(self, modality: str) -> float:
        """lambda of one modality's tokens (0 for text and for modalities that do not query)."""
        if not self.cross_attention or modality not in self.queries:
            return 0.0
        if isinstance(self.cross_attn_weight, (int, float)):
            return float(self.cross_attn_weight)
        return dict(self.cross_attn_weight).get(modality, 0.0)

    def replace(self, **changes) -> MokAConfig:
        return dataclasses.replace(self, **changes)


def linear_param_count(config: MokAConfig, d_in: int, d_out: int) -> int:
    """Adapter parameters on one k -> d linear (spec 1.11): LoRA r(k+d), MokA M r k + r d, multiple LoRA M r(k+d)."""
    return config.rank * (config.num_a * d_in + config.num_b * d_out)


def model_param_count(config: MokAConfig, shapes: Sequence[tuple[int, int]], num_layers: int) -> int:
    """Adapter parameters over `num_layers` layers whose adapted linears have the (in, out) `shapes`."""
    return num_layers * sum(linear_param_count(config, d_in, d_out) for d_in, d_out in shapes)
