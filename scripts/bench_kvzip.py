"""KVzip cost and savings: compression time over prefill time, peak extra memory of the scoring step over the KV
size, KV bytes before and after, and decode time per token on the full dense cache against the compressed one.

CPU (default): a small random Llama-shaped model, an 8K-token context.
    python scripts/bench_kvzip.py
The real default model (30 layers), at the longest context its 8,192 positions score in 128-token multiples:
    python scripts/bench_kvzip.py --preset smollm2 --context 7680
GPU (H200): a Llama-3.1-8B-shaped random bf16 model at 32K-128K tokens.
    python scripts/bench_kvzip.py --preset llama3-8b --dtype bfloat16 --context 32768 131072

Peak extra memory is XLA's own account of one scoring step (`compiled.memory_analysis().temp_size_in_bytes`,
the temporaries beyond arguments and outputs), which works on every backend; on GPU the allocator's peak is
reported too. Times are medians of --repeats runs after a compile run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from bench_generate import median_time  # same folder: one timing rule for every benchmark

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import FULL, ModelConfig, RopeConfig
from kvzip_jax.generate import SamplingConfig, _prefill_chunk, continue_generation
from kvzip_jax.kvzip.compressor import score
from kvzip_jax.kvzip.prompts import KVzipPrompt
from kvzip_jax.kvzip.scoring import _score_chunk
from kvzip_jax.models import init_params
from kvzip_jax.models.kv_attention import ScoreChunk

PRESETS = {
    "llama-small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                        num_kv_heads=4, head_dim=64, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
}
PROMPT = KVzipPrompt(prefix_ids=tuple(range(1, 41)), postfix_ids=(41, 42, 43, 44, 45),
                     first_repeat_ids=(46, 47, 48, 49, 50, 51), later_repeat_ids=tuple(range(52, 64)))


def make_config(preset: str) -> ModelConfig:
    rope = RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    return ModelConfig(family="llama", max_position_embeddings=262144, rms_norm_eps=1e-5, rope=((FULL, rope),),
                       **PRESETS[preset])


def scoring_step_temp_bytes(params, config, cache: DenseKVCache, width: int, chunk: int) -> int:
    tokens = jax.ShapeDtypeStruct((cache.batch_size, width), jnp.int32)
    n_valid = jax.ShapeDtypeStruct((cache.batch_size,), jnp.int32)
    spec = ScoreChunk(chunk_start=jnp.zeros((cache.batch_size,), jnp.int32),
                      chunk_len=jnp.zeros((cache.batch_size,), jnp.int32), n_sys=PROMPT.n_sys, chunk_size=chunk)
    compiled = _score_chunk.lower(params, tokens, cache, n_valid, spec, config=config).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def prefill_step_temp_bytes(params, config, n_cached: int, width: int, dtype) -> int:
    """The baseline: XLA's temporaries of one ordinary prefill step of the same `width` tokens after n_cached
    cached ones (what any long-context prefill already needs at this chunk size)."""
    cache = jax.eval_shape(lambda: DenseKVCache.zeros(config, 1, n_cached + width, dtype))
    tokens = jax.ShapeDtypeStruct((1, width), jnp.int32)
    n_valid = jax.ShapeDtypeStruct((1,), jnp.int32)
    return int(_prefill_chunk.lower(params, tokens, cache, n_valid, config=config).compile().memory_analysis()
               .temp_size_in_bytes)


def repeat_width(chunk: int) -> int:
    """Tokens of the longest repeat input for this chunk size (what one scoring step runs)."""
    return max(len(PROMPT.first_repeat_ids), len(PROMPT.later_repeat_ids) + 8) + len(PROMPT.postfix_ids) + chunk


def abstract_temp_bytes(config, dtype, n_ctx: int, chunk: int) -> dict:
    """Compile (never run) one scoring step for a context of n_ctx tokens and read XLA's temporaries: the
    memory claim for shapes too large for this machine, from the compiler's own buffer assignment."""
    params = jax.eval_shape(lambda: init_params(config, dtype=dtype))
    cache = jax.eval_shape(lambda: DenseKVCache.zeros(config, 1, PROMPT.n_sys + n_ctx, dtype))
    temp = scoring_step_temp_bytes(params, config, cache, repeat_width(chunk), chunk)
    prefill_temp = prefill_step_temp_bytes(params, config, PROMPT.n_sys + n_ctx, repeat_width(chunk), dtype)
    kv = 2 * config.num_layers * config.num_kv_heads * (PROMPT.n_sys + n_ctx) * config.head_dim * dtype.itemsize
    return dict(context=n_ctx, scoring_temp_bytes=temp, prefill_step_temp_bytes=prefill_temp, kv_bytes=kv,
                extra_memory_over_kv=temp / kv, scoring_over_prefill_temp=temp / prefill_temp)


def decode_ms(params, config, cache, steps: int, repeats: int) -> float:
    """ms per decode step on `cache` (dense or paged), from a jitted loop of `steps` greedy tokens."""
    logits = jnp.zeros((cache.batch_size, config.vocab_size), jnp.float32)

    def run(n):
        c = jax.tree.map(jnp.copy, cache)
        res = continue_generation(params, config, logits, c, max_new_tokens=n, sampling=SamplingConfig(),
                                  stop_token_ids=[])
        jax.block_until_ready(res.cache)

    run(1), run(steps)
    return 1e3 * (median_time(lambda: run(steps), repeats) - median_time(lambda: run(1), repeats)) / (steps - 1)


def bench_one(params, config, n_ctx, args):
    rng = np.random.default_rng(0)
    context = rng.integers(100, config.vocab_size, n_ctx).tolist()
    scored = score(params, config, PROMPT, [context], chunk_size=args.chunk, progress=True)  # compile + run
    scored = score(params, config, PROMPT, [context], chunk_size=args.chunk, progress=False)
    kv_bytes = scored.cache.k[:, :, :, : PROMPT.n_sys + n_ctx].nbytes * 2
    chunk = scored.chunk_size  # shrunk from --chunk when the context leaves too few positions
    temp = scoring_step_temp_bytes(params, config, scored.cache, repeat_width(chunk), chunk)
    prefill_temp = prefill_step_temp_bytes(params, config, PROMPT.n_sys + n_ctx, repeat_width(chunk),
                                           scored.cache.k.dtype)
    row = dict(context=n_ctx, chunk=chunk, prefill_s=scored.times["prefill_s"], score_s=scored.times["score_s"],
               score_over_prefill=scored.times["score_s"] / scored.times["prefill_s"],
               scoring_temp_bytes=temp, prefill_step_temp_bytes=prefill_temp, kv_bytes=kv_bytes,
               extra_memory_over_kv=temp / kv_bytes, scoring_over_prefill_temp=temp / prefill_temp)
    full = scored.compress(1.0, headroom=args.decode_steps + 1)
    ctx = scored.compress(args.ratio, headroom=args.decode_steps + 1)
    row.update(ratio=args.ratio, kept_ratio=ctx.report.kept_ratio, dense_kv_bytes=ctx.report.dense_kv_bytes,
               compressed_kv_bytes=ctx.report.compressed_kv_bytes, kept_kv_bytes=ctx.report.kept_kv_bytes,
               compact_s=ctx.report.times["compact_s"],
               memory_saving=ctx.report.dense_kv_bytes / ctx.report.compressed_kv_bytes)
    if not args.no_decode:
        # A right-sized dense cache: the scored context plus slots for the decoded tokens.
        pad = ((0, 0), (0, 0), (0, 0), (0, args.decode_steps), (0, 0))
        dense = DenseKVCache(k=jnp.pad(scored.cache.k, pad), v=jnp.pad(scored.cache.v, pad),
                             length=scored.cache.length)
        row["decode_ms_dense"] = decode_ms(params, config, dense, args.decode_steps, args.repeats)
        slots = args.decode_steps + 1
        row["decode_ms_paged_full"] = decode_ms(params, config, full.decode_cache(slots), args.decode_steps,
                                                args.repeats)
        row["decode_ms_paged_ratio"] = decode_ms(params, config, ctx.decode_cache(slots), args.decode_steps,
                                                 args.repeats)
        row["decode_speedup_vs_dense"] = row["decode_ms_dense"] / row["decode_ms_paged_ratio"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-small", choices=[*sorted(PRESETS), "smollm2"],
                        help="a random model of this shape, or smollm2: the installed SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--context", type=int, nargs="+", default=[8192])
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--abstract", action="store_true",
                        help="only compile the scoring step at these shapes and report XLA's temporaries")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.abstract:
        if args.preset == "smollm2":
            parser.error("--abstract compiles random-model shapes; pick a --preset other than smollm2")
        config = make_config(args.preset)
        for n in args.context:
            row = abstract_temp_bytes(config, jnp.dtype(args.dtype), n, args.chunk)
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return
    if args.preset == "smollm2":  # the real default model: 30 layers, 9 / 3 heads, 8,192 positions
        from kvzip_jax.lm import LanguageModel

        lm = LanguageModel.from_pretrained("smollm2", dtype=jnp.dtype(args.dtype), tokenizer=False)
        config, params = lm.config, lm.params
    else:
        config = make_config(args.preset)
        params = init_params(config, dtype=jnp.dtype(args.dtype))
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()} cores",
                device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version(),
                preset=args.preset, dtype=args.dtype, chunk=args.chunk,
                params_millions=round(sum(x.size for x in jax.tree.leaves(params)) / 1e6, 1))
    rows = [bench_one(params, config, n, args) for n in args.context]
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        meta["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    for k, v in meta.items():
        print(f"{k:<24} {v}")
    for row in rows:
        print("-" * 40)
        for k, v in row.items():
            print(f"{k:<24} {v:.4g}" if isinstance(v, float) else f"{k:<24} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
