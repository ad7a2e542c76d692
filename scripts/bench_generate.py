"""Prefill and decode throughput of our jitted generation against transformers (PyTorch), plus compile time
against depth, on one machine in one run.

CPU (default): a ~100M-parameter Llama-shaped random model in fp32.
    python scripts/bench_generate.py
GPU (H200): a Llama-3.1-8B-shaped random bf16 model; decode ms/token against the floor
(parameter bytes / measured HBM copy bandwidth).
    python scripts/bench_generate.py --preset llama3-8b --dtype bfloat16

Decode time per token is measured as (generate N tokens - generate 1 token) / (N - 1), for both libraries, so
prefill and fixed overheads cancel. Every number is the median of --repeats runs. Results go to stdout as a table
and, with --json, to a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.config import FULL, ModelConfig, RopeConfig
from kvzip_jax.generate import SamplingConfig, _generation_loop, _prefill_chunk, decode_step, generate, prefill
from kvzip_jax.models import init_params

PRESETS = {
    # ~100M parameters with tied embeddings: Llama-shaped (GQA, SwiGLU, RoPE).
    "llama-100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                       num_kv_heads=4, head_dim=64, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
}


def make_config(preset: str, num_layers: int | None = None) -> ModelConfig:
    kw = dict(PRESETS[preset])
    if num_layers is not None:
        kw["num_layers"] = num_layers
    rope = RopeConfig(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    return ModelConfig(family="llama", max_position_embeddings=131072, rms_norm_eps=1e-5, rope=((FULL, rope),),
                       eos_token_ids=(), **kw)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(config, params, batch, prompt_len, new_tokens, repeats, chunk):
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt_len)).tolist()
    capacity = prompt_len + new_tokens
    dtype = params["embed"][...].dtype

    def run_prefill():
        cache = DenseKVCache.zeros(config, batch, capacity, dtype)
        logits, cache = prefill(params, config, prompts, cache, chunk_size=chunk)
        jax.block_until_ready(logits)

    def run_generate(n):
        res = generate(params, config, prompts, max_new_tokens=n, stop_token_ids=[], chunk_size=chunk,
                       capacity=capacity)
        jax.block_until_ready(res.cache.k)

    run_prefill(), run_generate(1), run_generate(new_tokens)  # compile
    t_prefill = median_time(run_prefill, repeats)
    t_one = median_time(lambda: run_generate(1), repeats)
    t_all = median_time(lambda: run_generate(new_tokens), repeats)
    return t_prefill, (t_all - t_one) / (new_tokens - 1)


def transformers_side(config, batch, prompt_len, new_tokens, repeats, dtype_name, device):
    import torch
    import transformers

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_hf_dict().items()
                                            if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config).to(torch_dtype).eval()
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, config.vocab_size, (batch, prompt_len)), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def run_prefill():
        model(ids, use_cache=True)
        sync()

    @torch.no_grad()
    def run_generate(n):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()

    run_prefill(), run_generate(2)
    t_prefill = median_time(run_prefill, repeats)
    t_one = median_time(lambda: run_generate(1), repeats)
    t_all = median_time(lambda: run_generate(new_tokens), repeats)
    return t_prefill, (t_all - t_one) / (new_tokens - 1)


def compile_seconds(config_2, config_16, batch, capacity, dtype):
    """Wall time to lower + compile the decode step and the generation loop at 2 and at 16 layers."""
    out = {}
    for name, config in (("2", config_2), ("16", config_16)):
        params = jax.eval_shape(lambda c=config: init_params(c, dtype=dtype))
        cache = jax.eval_shape(lambda c=config: DenseKVCache.zeros(c, batch, capacity, dtype))
        tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
        logits = jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32)
        t0 = time.perf_counter()
        decode_step.lower(params, tokens, cache, config=config).compile()
        _prefill_chunk.lower(params, jax.ShapeDtypeStruct((batch, 64), jnp.int32), cache, tokens,
                             config=config).compile()
        _generation_loop.lower(params, logits, cache, jax.random.key(0), jnp.zeros((1,), jnp.int32), jnp.int32(0),
                               config=config, sampling=SamplingConfig(),
                               max_new_tokens=16).compile()
        out[name] = time.perf_counter() - t0
    return out


def hbm_bandwidth(gib: float = 4.0, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written), median of repeats."""
    n = int(gib * 2**30 / 4)
    x = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    t = median_time(lambda: copy(x).block_until_ready(), repeats)
    return 2 * n * 4 / t


def report(result: dict, json_path: str | None) -> None:
    """Print the results as an aligned key / value table and, with a path, write them as JSON."""
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-100m", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-compile", action="store_true", help="skip the 2 vs 16 layer compile timing")
    parser.add_argument("--json", help="write all numbers to this file")
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    config = make_config(args.preset)
    params = init_params(config, seed=0, dtype=dtype)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    result = dict(
        date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()} cores",
        device=str(jax.devices()[0].device_kind), backend=backend, python=platform.python_version(),
        jax=jax.__version__, preset=args.preset, dtype=args.dtype, params_millions=round(n_params / 1e6, 1),
        batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
    )
    t_pre, t_tok = ours(config, params, args.batch, args.prompt_len, args.new_tokens, args.repeats, args.chunk)
    result.update(ours_prefill_tok_s=args.batch * args.prompt_len / t_pre, ours_decode_tok_s=args.batch / t_tok,
                  ours_decode_ms_per_step=1e3 * t_tok)
    if backend == "gpu":
        bw = hbm_bandwidth()
        result.update(copy_bandwidth_gb_s=bw / 1e9, decode_floor_ms=1e3 * param_bytes / bw,
                      decode_vs_floor=t_tok / (param_bytes / bw))
    if not args.no_hf:
        import torch

        result["torch"] = torch.__version__
        device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
        del params  # free device memory for the torch model
        h_pre, h_tok = transformers_side(config, args.batch, args.prompt_len, args.new_tokens, args.repeats,
                                         args.dtype, device)
        result.update(hf_prefill_tok_s=args.batch * args.prompt_len / h_pre, hf_decode_tok_s=args.batch / h_tok,
                      hf_decode_ms_per_step=1e3 * h_tok, prefill_speedup=h_pre / t_pre, decode_speedup=h_tok / t_tok)
    if not args.no_compile:
        c = compile_seconds(make_config(args.preset, 2), make_config(args.preset, 16), args.batch,
                            args.prompt_len + args.new_tokens, dtype)
        result.update(compile_2_layers_s=c["2"], compile_16_layers_s=c["16"], compile_ratio=c["16"] / c["2"])

    report(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
