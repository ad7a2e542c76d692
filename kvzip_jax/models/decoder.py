"""One decoder for llama / qwen2 / qwen3 / gemma3, driven by ModelConfig, behind a pure forward.

Decoder layers are stacked on a leading axis and applied with `lax.scan`, so compile time does not grow with
depth. Per-layer differences (Gemma3's sliding vs full layers) are scanned flags that select a precomputed mask
and RoPE table, not separate code paths.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvzip_jax.cache import DenseKVCache, PagedKVCache
from kvzip_jax.config import FULL, SLIDING, ModelConfig
from kvzip_jax.models.kv_attention import ScoreChunk, dense_score_attend, dense_write_attend, paged_write_attend
from kvzip_jax.models.layers import MLP, Attention, RMSNorm, _normal, causal_self_attend, rope_tables


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        c = config
        norm = functools.partial(RMSNorm, c.hidden_size, eps=c.rms_norm_eps, gemma=c.gemma_norms, dtype=dtype)
        self.config = c
        self.attn_in_norm = norm()
        self.attn = Attention(c, dtype=dtype, rngs=rngs)
        self.mlp_in_norm = norm()
        self.mlp = MLP(c, dtype=dtype, rngs=rngs)
        # Gemma's sandwich norms on the attention and MLP outputs.
        self.attn_out_norm = norm() if c.gemma_norms else None
        self.mlp_out_norm = norm() if c.gemma_norms else None

    def __call__(self, x, cos, sin, kv_attend, adapter_context=None):
        """x [B, T, H]. `kv_attend(q, k, v)` writes the new K/V into this layer's cache and attends over it.
        `adapter_context` reaches every linear of the layer (adapters read it, base linears ignore it)."""
        q, k, v = self.attn.project_qkv(self.attn_in_norm(x), cos, sin, adapter_context)
        h = self.attn.output(kv_attend(q, k, v), adapter_context)
        if self.attn_out_norm is not None:
            h = self.attn_out_norm(h)
        x = x + h
        h = self.mlp(self.mlp_in_norm(x), adapter_context)
        if self.mlp_out_norm is not None:
            h = self.mlp_out_norm(h)
        return x + h


class Transformer(nnx.Module):
    """Parameters of a decoder-only LM. Param paths (`embed/embedding`, `layers/attn/q_proj/kernel`, ...) are
    stable: Optax labels, Orbax files, sharding rules and the HF key map all key on them."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = nnx.Param(_normal(rngs, (c.vocab_size, c.hidden_size), dtype))
        # One layer is traced and vmapped over per-layer keys, so building (and compiling) does not grow with depth.
        def one_layer(key):
            return nnx.state(DecoderLayer(c, dtype=dtype, rngs=nnx.Rngs(params=key)))

        layer_graph = nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(c, dtype=dtype, rngs=nnx.Rngs(0))))
        stacked = jax.vmap(one_layer)(jax.random.split(rngs.params(), c.num_layers))
        self.layers = nnx.merge(layer_graph, stacked)
        self.final_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, gemma=c.gemma_norms, dtype=dtype)
        self.lm_head = None if c.tie_word_embeddings else nnx.Param(_normal(rngs, (c.hidden_size, c.vocab_size), dtype))

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0)
        if self.config.gemma_norms:
            # transformers casts the sqrt(hidden) normaliser to the weight dtype first (it matters in bf16).
            x = x * jnp.asarray(np.sqrt(self.config.hidden_size), x.dtype)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        c = self.config
        hidden = self.final_norm(hidden)
        if self.lm_head is None:  # tied: contract with the [V, H] embedding as stored (no transposed copy)
            logits = jnp.einsum("...h,vh->...v", hidden, self.embed[...], preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...h,hv->...v", hidden, self.lm_head[...], preferred_element_type=jnp.float32)
        if c.final_logit_softcap is not None:
            logits = jnp.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return logits

    def __call__(
        self,
        inputs: jax.Array,
        positions: jax.Array,
        cache: DenseKVCache | PagedKVCache | None,
        n_valid: jax.Array | None = None,
        logits_at: Literal["all", "last", "none"] = "all",
        score: ScoreChunk | None = None,
        observe: str | None = None,
        adapter_context=None,
        remat: bool = False,
    ) -> DecoderOutput:
        """inputs: token ids [B, T] or embeddings [B, T, H]; positions [B, T] (RoPE positions).

        No cache (None): the T tokens attend causally to themselves only and no cache is returned (training).
        Dense cache: the T new tokens take slots cache.length[b] + t. Paged cache: they are appended to every head
        sequence of row b. `n_valid[b]` (default T) of them count; the rest are right padding that is never kept.
        logits are [B, T, V] for "all", [B, V] at each row's last valid token for "last", None for "none".
        `score` (dense cache only) also returns KVzip scores [L, B, Hkv, chunk_size] of that context chunk and
        leaves the cache as it was (the tokens attend as if appended, nothing is written);
        `observe` ("mean" | "max", dense only) the attention each cache slot received: [L, B, Hkv, S_cap].

        `adapter_context` (None: no adapter input) is per-token data for adapted linears (MokA: modality ids and
        the question-key mask): any pytree with `at_layer(layer) -> what that layer's linears receive`.
        `remat` (no-cache training forward only) recomputes each layer's activations in the backward pass.
        """
        c = self.config
        x = self.embed_tokens(inputs) if inputs.ndim == 2 else inputs.astype(self.embed[...].dtype)
        b, t = x.shape[:2]
        n_valid = jnp.full((b,), t, jnp.int32) if n_valid is None else n_valid.astype(jnp.int32)
        # One RoPE table per layer type present, in the order (full, sliding); a scanned flag picks one.
        kinds = [kind for kind in (FULL, SLIDING) if kind in c.layer_types]
        tables = [rope_tables(c, kind, positions) for kind in kinds]
        cos, sin = tuple(tb[0] for tb in tables), tuple(tb[1] for tb in tables)
        layer_graph, layer_state = nnx.split(self.layers)
        layer_kind = jnp.asarray(c.sliding_layers.astype(np.int32))
        layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)

        def layer_context(layer):
            return None if adapter_context is None else adapter_context.at_layer(layer)

        def pick(options, kind):
            return options[0] if len(options) == 1 else jnp.where(kind == 1, options[1], options[0])

        no_window = jnp.int32(np.iinfo(np.int32).max)
        windows = tuple(jnp.int32(c.sliding_window) if kind == SLIDING else no_window for kind in kinds)
        if cache is None:
            if score is not None or observe is not None:
                raise ValueError("scoring and observing need a dense cache")

            def body(h, xs):
                state, layer, kind = xs

                def kv_attend(q, k, v):
                    return causal_self_attend(
                        q, k, v, pick(windows, kind), scale=c.attn_scale, softcap=c.attn_logit_softcap
                    )

                layer_module = nnx.merge(layer_graph, state)
                return layer_module(h, pick(cos, kind), pick(sin, kind), kv_attend, layer_context(layer)), None

            if remat:
                body = jax.checkpoint(body)
            x, _ = jax.lax.scan(body, x, (layer_state, layer_ids, layer_kind))
            new_cache, scores = None, None
        elif isinstance(cache, DenseKVCache) and score is not None:
            if observe is not None:
                raise ValueError("a forward either scores (KVzip) or observes (SnapKV / H2O), not both")

            # Read-only: the repeat input attends over the cache in place and is never written, so the cache is a
            # closed-over constant of the scan (not a carry XLA may copy) and comes back unchanged.
            def body(h, xs):
                state, layer, kind = xs
                box = {}

                def kv_attend(q, k, v):
                    out, box["scores"] = dense_score_attend(
                        q, k, v, cache.k, cache.v, layer, cache.length, pick(windows, kind), c, n_valid, score
                    )
                    return out

                h = nnx.merge(layer_graph, state)(h, pick(cos, kind), pick(sin, kind), kv_attend, layer_context(layer))
                return h, box["scores"]

            x, scores = jax.lax.scan(body, x, (layer_state, layer_ids, layer_kind))
            new_cache = cache
        elif isinstance(cache, DenseKVCache):
            slots = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

            def body(carry, xs):
                h, ck, cv = carry
                state, layer, kind = xs
                box = {}

                def kv_attend(q, k, v):
                    out, box["k"], box["v"], box["scores"] = dense_write_attend(
                        q, k, v, ck, cv, layer, slots, pick(windows, kind), c, n_valid, observe
                    )
                    return out

                h = nnx.merge(layer_graph, state)(h, pick(cos, kind), pick(sin, kind), kv_attend, layer_context(layer))
                return (h, box["k"], box["v"]), box["scores"]

            (x, new_k, new_v), scores = jax.lax.scan(
                body, (x, cache.k, cache.v), (layer_state, layer_ids, layer_kind)
            )
            new_cache = DenseKVCache(k=new_k, v=new_v, length=cache.length + n_valid)
        else:
            if score is not None or observe is not None:
                raise ValueError("scoring runs on the dense cache, not on a compressed one")

            def body(carry, xs):
                h, pages = carry
                state, layer, kind, table, num_pages, lengths = xs
                box = {}

                def kv_attend(q, k, v):
                    out, box["pages"], box["lengths"] = paged_write_attend(
                        q, k, v, pages, table, num_pages, lengths, positions, n_valid, pick(windows, kind), c
                    )
                    return out

                h = nnx.merge(layer_graph, state)(h, pick(cos, kind), pick(sin, kind), kv_attend, layer_context(layer))
                return (h, box["pages"]), box["lengths"]

            pages = (cache.k_pages, cache.v_pages, cache.pos_pages)
            xs = (layer_state, layer_ids, layer_kind, cache.page_table, cache.num_pages, cache.lengths)
            (x, (k_pages, v_pages, pos_pages)), lengths = jax.lax.scan(body, (x, pages), xs)
            new_cache = dataclasses.replace(
                cache, k_pages=k_pages, v_pages=v_pages, pos_pages=pos_pages, lengths=lengths,
                next_position=cache.next_position + n_valid,
            )
            scores = None
        if logits_at == "all":
            logits = self.logits(x)
        elif logits_at == "last":
            last = jnp.take_along_axis(x, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
            logits = self.logits(last)
        else:
            logits = None
        return DecoderOutput(logits, x, new_cache, scores)


class DecoderOutput(NamedTuple):
    logits: jax.Array | None
    hidden: jax.Array
    cache: DenseKVCache | PagedKVCache
    scores: jax.Array | None


@functools.cache
def graphdef_for(config: ModelConfig, dtype_name: str = "float32") -> nnx.GraphDef:
    """The (static) structure of the model for `config`; no memory is allocated."""
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(0)))
    return nnx.graphdef(abstract)


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> nnx.State:
    """Params as ShapeDtypeStructs: the target that loaders fill."""
    abstract = nnx.eval_shape(lambda: Transformer(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    return nnx.state(abstract)


def init_params(config: ModelConfig, seed: int = 0, dtype=jnp.float32) -> nnx.State:
    """Random params (normal, std 0.02; norm scales at their neutral value), built in one jitted call that is
    compiled once per (config, dtype)."""
    return _init_params(config, jnp.dtype(dtype).name, jax.random.key(seed))


@functools.partial(jax.jit, static_argnames=("config", "dtype_name"))
def _init_params(config: ModelConfig, dtype_name: str, key: jax.Array) -> nnx.State:
    return nnx.state(Transformer(config, dtype=jnp.dtype(dtype_name), rngs=nnx.Rngs(params=key)))


def forward(
    params: nnx.State,
    inputs: jax.Array,
    positions: jax.Array,
    cache: DenseKVCache | PagedKVCache | None,
    *,
    config: ModelConfig,
    n_valid: jax.Array | None = None,
    logits_at: Literal["all", "last", "none"] = "all",
):
    """The pure boundary: (params, tokens | embeds, positions, cache) -> (logits, cache). Traceable; jit it.

    Works on the dense working cache and on the compressed head-wise paged cache alike; with cache=None the
    tokens attend only to themselves (the differentiable training forward) and the returned cache is None."""
    model = nnx.merge(graphdef_for(config, _params_dtype(params)), params)
    out = model(inputs, positions, cache, n_valid=n_valid, logits_at=logits_at)
    return out.logits, out.cache


def forward_hidden(params, inputs, positions, cache, *, config: ModelConfig, n_valid=None):
    """Like `forward` but returns the final hidden states [B, T, H] (before the final norm) instead of logits."""
    model = nnx.merge(graphdef_for(config, _params_dtype(params)), params)
    out = model(inputs, positions, cache, n_valid=n_valid, logits_at="none")
    return out.hidden, out.cache


def forward_scores(params, inputs, positions, cache: DenseKVCache, score: ScoreChunk, *, config: ModelConfig,
                   n_valid=None):
    """A KVzip scoring forward: the repeat input runs over the whole dense cache (as if appended after each row's
    `length` slots) and every layer scores the chunk's pairs. The cache is only read. Returns scores
    [L, B, Hkv, chunk_size]."""
    model = nnx.merge(graphdef_for(config, _params_dtype(params)), params)
    return model(inputs, positions, cache, n_valid=n_valid, logits_at="none", score=score).scores


def forward_observe(params, inputs, positions, cache: DenseKVCache, *, config: ModelConfig, reduce: str,
                    n_valid=None):
    """A forward that also returns the attention every cache slot received from the new tokens, reduced over
    query rows and group heads: (observed [L, B, Hkv, S_cap], cache)."""
    model = nnx.merge(graphdef_for(config, _params_dtype(params)), params)
    out = model(inputs, positions, cache, n_valid=n_valid, logits_at="none", observe=reduce)
    return out.scores, out.cache


def embed(params: nnx.State, tokens: jax.Array, *, config: ModelConfig) -> jax.Array:
    """Token embeddings as the decoder scales them: the input for splicing in multimodal embeddings."""
    model = nnx.merge(graphdef_for(config, _params_dtype(params)), params)
    return model.embed_tokens(tokens)


def _params_dtype(params: nnx.State) -> str:
    return str(jnp.dtype(params["embed"][...].dtype))
