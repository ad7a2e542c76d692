"""Fine-tuning a multimodal LLM with MokA (or a baseline): parameter groups by NNX filters, Optax, remat.

The model is one NNX module: the adapted decoder plus one projector per non-text modality (encoder features ->
the decoder's embeddings, spliced in at that modality's placeholder positions). Encoders are frozen and run
outside (their features are inputs). `nnx.split` with the `TRAINABLE` filter separates the adapters and
projectors from everything else: only they are differentiated and only they have optimizer state (the frozen
decoder has no gradient and no Adam moments, and its bytes never change). Inside the trainable group
`optax.multi_transform` gives adapters and projectors their own learning rates.

The step is one pure jitted function of (trainable, optimizer state, frozen, batch, step); dropout keys come from
(seed, step), so a resumed run takes exactly the steps an uninterrupted one takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kvzip_jax.config import ModelConfig
from kvzip_jax.models.decoder import Transformer
from kvzip_jax.models.llava import MODALITY_IDS
from kvzip_jax.models.projector import Projector, ProjectorConfig
from kvzip_jax.sharding import path_str
from moka_jax.config import MokAConfig
from moka_jax.context import MokAContext
from moka_jax.model import MokAParam, adapted_graphdef_of

# What trains: the adapters, and every Param under `projectors` (spec 2: projectors train in stage 2 too).
PROJECTOR_PARAMS = nnx.All(nnx.Param, nnx.PathContains("projectors"))
TRAINABLE = nnx.Any(MokAParam, PROJECTOR_PARAMS)


class Projectors(nnx.Module):
    """One projector per modality name, as attributes (paths `projectors/<modality>/linear_1/kernel`, ...)."""

    def __init__(self, configs: Mapping[str, ProjectorConfig], *, rngs: nnx.Rngs):
        for name, config in configs.items():
            setattr(self, name, Projector(config, rngs=rngs))


class AdaptedMultimodalLM(nnx.Module):
    """An adapted decoder with projectors. `decoder_params`: adapted params (`moka_jax.model.apply_moka`)."""

    def __init__(self, config: ModelConfig, moka: MokAConfig, decoder_params: nnx.State,
                 projectors: Mapping[str, ProjectorConfig], *, seed: int = 0):
        self.config = config
        self.moka = moka
        self.decoder: Transformer = nnx.merge(adapted_graphdef_of(decoder_params, config, moka), decoder_params)
        for name, pc in projectors.items():
            if pc.out_features != config.hidden_size:
                raise ValueError(f"the {name} projector outputs {pc.out_features} features; the decoder's hidden "
                                 f"size is {config.hidden_size}")
            if name not in MODALITY_IDS or name == moka.text_modality:
                raise ValueError(f"projector {name!r} is not a non-text modality of {sorted(MODALITY_IDS)}")
        self.projectors = Projectors(projectors, rngs=nnx.Rngs(params=seed))

    def embed(self, tokens: jax.Array, modality_ids: jax.Array, features: Mapping[str, jax.Array]) -> jax.Array:
        """The decoder's input embeddings [B, T, H]: token embeddings, with each modality's projected features
        spliced in at its placeholder positions (the prefill input of a generation)."""
        x = self.decoder.embed_tokens(tokens)
        for name, feats in features.items():
            projected = getattr(self.projectors, name)(feats).astype(x.dtype)  # [B, N, H]
            at = modality_ids == MODALITY_IDS[name]
            index = jnp.clip(jnp.cumsum(at, axis=1) - 1, 0, projected.shape[1] - 1)
            x = jnp.where(at[..., None], jnp.take_along_axis(projected, index[..., None], axis=1), x)
        return x

    def __call__(self, tokens: jax.Array, modality_ids: jax.Array, features: Mapping[str, jax.Array],
                 context: MokAContext | None, *, remat: bool = False) -> jax.Array:
        """tokens, modality_ids [B, T]; features[m] [B, N_m, d_m] (row b's N_m placeholders of modality m, in
        order). Returns logits [B, T, V]."""
        x = self.embed(tokens, modality_ids, features)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return self.decoder(x, positions, None, adapter_context=context, remat=remat).logits


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """HF Trainer's defaults as the official scripts use them (AdamW, warm-up ratio 0.03 then cosine, clip 1.0,
    no weight decay); `projector_lr_scale` scales the projectors' learning rate against the adapters'."""

    steps: int
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    projector_lr_scale: float = 1.0
    remat: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def schedule(cfg: TrainConfig, scale: float = 1.0) -> optax.Schedule:
    warmup = max(1, round(cfg.warmup_ratio * cfg.steps))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate * scale, warmup, max(cfg.steps, warmup + 1),
                                              end_value=0.0)


def group_labels(trainable: nnx.State) -> nnx.State:
    """'adapter' or 'projector' for every trainable leaf (by its path)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "projector" if path_str(p).startswith("projectors/") else "adapter", trainable)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    def adamw(scale):
        return optax.adamw(schedule(cfg, scale), b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)

    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.multi_transform({"adapter": adamw(1.0), "projector": adamw(cfg.projector_lr_scale)}, group_labels),
    )


def split_trainable(model: AdaptedMultimodalLM, trainable=TRAINABLE):
    """(graphdef, trainable state, frozen state); `trainable` is an NNX filter (stage 1: `PROJECTOR_PARAMS`)."""
    return nnx.split(model, trainable, ...)


def weighted_loss(logits: jax.Array, tokens: jax.Array, weights: jax.Array):
    """Next-token cross entropy: weights[t] weighs predicting tokens[t] from tokens[:t]. (loss, token accuracy)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, 1:]
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]) & (w > 0)
    return (nll * w).sum() / jnp.maximum(w.sum(), 1e-6), correct.sum() / jnp.maximum((w > 0).sum(), 1)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainConfig):
    """step(trainable, opt_state, frozen, batch, context, step) -> (trainable, opt_state, loss, accuracy).
    `batch`: tokens, modality_ids, loss_weights [B, T] and `features` {modality: [B, N, d]}."""

    def loss_fn(trainable, frozen, batch, context):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(batch["tokens"], batch["modality_ids"], batch["features"], context, remat=cfg.remat)
        return weighted_loss(logits, batch["tokens"], batch["loss_weights"])

    @jax.jit
    def step(trainable, opt_state, frozen, batch, context, step_index):
        key = jax.random.fold_in(jax.random.key(cfg.seed), step_index)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch,
                                                                        context.with_dropout(key))
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, acc

    return step
