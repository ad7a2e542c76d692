"""MokA adapters, served: what an engine needs to prefill requests through a MokA-adapted decoder.

MokA's adapter output for an image or audio token depends on the question tokens that follow it (the adapter's
cross-attention), so such a token's KV is only right once the question is in the same forward. The engine
therefore:

- prefills a request with images or sounds in ONE step through the adapted forward (`moka_jax.model.forward`,
  per-token modality ids and the question-key mask built from the request), and never shares its KV through the
  prefix cache (two requests with the same picture but different questions have different KV);
- decodes every request on the text path folded into the base weights (`moka_jax.model.merge_text_path`):
  generated tokens are text and never keys, so this is exact, and decode does no adapter work at all;
- serves text-only requests on the folded weights end to end (a text token's adapter term is the text path).

Tokens a restarted request generated before its instance failed are prefilled again as text (the plain path),
after the one adapted step that covers its prompt.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from kvzip_jax.config import ModelConfig
from moka_jax.config import MokAConfig
from moka_jax.model import merge_text_path


@dataclasses.dataclass(frozen=True, eq=False)
class MokAServing:
    """The adapted decoder's params (`moka_jax.model.apply_moka` + training) and its adapter config.

    `max_keys`: the most question tokens a request may mark (the key slots of every adapted prefill step are
    padded to it, so one executable serves every request)."""

    params: nnx.State
    moka: MokAConfig
    max_keys: int = 64

    def __post_init__(self):
        if self.max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {self.max_keys}")

    def text_params(self, config: ModelConfig) -> nnx.State:
        """The plain decoder's params with the text path folded in: every decode step and text-only prefill."""
        return merge_text_path(self.params, config, self.moka)
