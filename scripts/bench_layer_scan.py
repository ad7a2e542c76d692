"""What the scanned layer stack costs batch-1 decode on XLA:CPU, and what the alternative costs in compile time.

The decoder keeps its layers stacked on a leading axis and applies them with `lax.scan` (compile time flat in
depth). Inside the scan every matmul reads its layer's weights through a dynamic slice of the stacked array, and
XLA:CPU materialises that slice (a `dynamic-slice` fusion) before the dot: the weights cross memory three times
(read, write, read) instead of once. This script measures, for the ~100M-parameter model of
`bench_generate.py`, in one run:

1. the library's decode step (scanned) and, from a profiler trace, the thread time of its weight-slice copies
   against its dots;
2. the same decode step with every layer's weights in a buffer of its own and the layers unrolled in Python (no
   slice, no copy: what `scan_layers=False` does in MaxText);
3. the compile time of both at 2 and 16 layers;
4. transformers' generate and its bare single-token forward per token.

    python scripts/bench_layer_scan.py [--repeats 30] [--json FILE]

The unrolled variant lives only here, as a measurement: it makes compile time grow with depth. On a GPU
(`bash scripts/gpu_checks.sh layerscan`) the same comparison tells whether XLA reads the slices in place there
(per-layer / scanned near 1); the op grouping of the trace is XLA:CPU's and may come out empty on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import gzip
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import make_config, report, transformers_side

from kvzip_jax.cache import DenseKVCache
from kvzip_jax.generate import decode_step
from kvzip_jax.models import init_params
from kvzip_jax.models.decoder import graphdef_for
from kvzip_jax.models.kv_attention import dense_write_attend
from kvzip_jax.models.layers import rope_tables


def split_layers(params):
    """The stacked layer state as one state per layer, each in a buffer of its own (copied once, here)."""
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: jnp.array(a[i]), stacked) for i in range(n)]


def unrolled_decode_step(config):
    """The decode step of `decoder.Transformer` on a dense cache, with the layer loop unrolled over per-layer
    weight buffers. Same math, same cache, same attention helper; only the layer loop differs."""
    graph = graphdef_for(config)

    @jax.jit
    def step(params, layers, tokens, cache):
        model = nnx.merge(graph, params)
        layer_graph = nnx.graphdef(model.layers)
        x = model.embed_tokens(tokens[:, None])
        positions = cache.length[:, None]
        cos, sin = rope_tables(config, config.layer_types[0], positions)
        ck, cv = cache.k, cache.v
        n_valid = jnp.ones_like(cache.length)
        for i, state in enumerate(layers):
            box = {}

            def kv_attend(q, k, v, i=i, box=box, ck=ck, cv=cv):
                out, box["k"], box["v"], _ = dense_write_attend(
                    q, k, v, ck, cv, i, positions, jnp.iinfo(jnp.int32).max, config, n_valid
                )
                return out

            x = nnx.merge(layer_graph, state)(x, cos, sin, kv_attend)
            ck, cv = box["k"], box["v"]
        logits = model.logits(x[:, -1])
        return logits, DenseKVCache(k=ck, v=cv, length=cache.length + 1)

    return step


def cache_at(config, start: int, capacity: int) -> DenseKVCache:
    cache = DenseKVCache.zeros(config, 1, capacity)
    return dataclasses.replace(cache, length=jnp.full_like(cache.length, start))


def per_token_ms(step, cache: DenseKVCache, repeats: int) -> float:
    """Median wall time of one decode step, the cache advancing (no host work between steps)."""
    tokens = jnp.zeros((1,), jnp.int32)
    times = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        logits, cache = step(tokens, cache)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[3:])


HLO_OP_NAME = re.compile(r"^[a-z][a-z0-9_-]*(\.\d+)?$")  # "dot.45", "dynamic-slice_bitcast_fusion.1", "copy"
LOOP_OPS = ("while", "conditional", "call")  # spans that contain other ops: not counted on their own


def thread_ms_by_kind(run, steps: int) -> dict[str, float]:
    """Per-step thread time of the XLA:CPU ops of `run`, from a profiler trace, grouped by op kind: the layer
    weight-slice copies (`dynamic-slice` fusions; one per layer slices the K cache instead, under 1% of their
    bytes), the dots, and the other HLO ops. Runtime events and loop spans are left out. Ops overlap on the two
    cores, so the groups can sum to more than the wall time."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(run())
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        if not files:
            return {}
        with gzip.open(files[0]) as f:
            events = json.load(f)["traceEvents"]
    total = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or not HLO_OP_NAME.match(name) or name.split(".")[0] in LOOP_OPS:
            continue
        kind = ("weight-slice copies" if name.startswith("dynamic-slice") else
                "dots" if name.startswith("dot") else "other HLO ops")
        total[kind] += e["dur"] / 1e3 / steps
    return dict(total)


def compile_s(config, layered: bool) -> float:
    params = jax.eval_shape(lambda: init_params(config))
    cache = jax.eval_shape(lambda: DenseKVCache.zeros(config, 1, 576))
    tokens = jax.ShapeDtypeStruct((1,), jnp.int32)
    t0 = time.perf_counter()
    if layered:
        layers = jax.eval_shape(lambda: split_layers(init_params(config)))
        unrolled_decode_step(config).lower(params, layers, tokens, cache).compile()
    else:
        decode_step.lower(params, tokens, cache, config=config).compile()
    return time.perf_counter() - t0


def torch_forward_ms(config, prompt_len: int, repeats: int) -> float:
    """transformers' bare single-token forward with its cache (no generate loop around it)."""
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_hf_dict().items()
                                            if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_len)))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(repeats + 3):
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[3:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    parser.add_argument("--json", help="write all numbers to this file")
    args = parser.parse_args(argv)
    capacity = args.prompt_len + args.repeats + 8

    config = make_config("llama-100m")
    if any(kind != config.layer_types[0] for kind in config.layer_types):
        raise SystemExit("the unrolled variant here handles one layer type only")
    params = init_params(config)
    layers = split_layers(params)
    unrolled = unrolled_decode_step(config)

    def scanned_step(tokens, cache):
        return decode_step(params, tokens, cache, config=config)

    def layered_step(tokens, cache):
        return unrolled(params, layers, tokens, cache)

    # Same logits from both (same math), over a few steps with different tokens, before timing anything.
    cache_a, cache_b, max_diff = DenseKVCache.zeros(config, 1, 64), DenseKVCache.zeros(config, 1, 64), 0.0
    for token in (17, 4242, 9, 31000):
        tokens = jnp.full((1,), token, jnp.int32)
        a, cache_a = scanned_step(tokens, cache_a)
        b, cache_b = layered_step(tokens, cache_b)
        max_diff = max(max_diff, float(jnp.abs(a - b).max()))
    if max_diff > 1e-4:
        raise SystemExit(f"the unrolled step disagrees with the library's: max |logit diff| {max_diff}")

    result = dict(
        date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()} cores",
        python=platform.python_version(), jax=jax.__version__, params_mb=round(
            sum(x.nbytes for x in jax.tree.leaves(params)) / 1e6, 1), max_logit_diff=max_diff,
    )
    # Interleaved rounds, so load on the machine hits both variants alike.
    scanned, layered = [], []
    for _ in range(3):
        scanned.append(per_token_ms(scanned_step, cache_at(config, args.prompt_len, capacity), args.repeats))
        layered.append(per_token_ms(layered_step, cache_at(config, args.prompt_len, capacity), args.repeats))
    result.update(scanned_decode_ms=statistics.median(scanned), layered_decode_ms=statistics.median(layered))
    result["layered_speedup"] = result["scanned_decode_ms"] / result["layered_decode_ms"]

    for name, step in (("scanned", scanned_step), ("layered", layered_step)):
        state = {"cache": cache_at(config, args.prompt_len, capacity)}

        def run(step=step, state=state):
            logits, state["cache"] = step(jnp.zeros((1,), jnp.int32), state["cache"])
            return logits

        for kind, ms in sorted(thread_ms_by_kind(run, 10).items()):
            result[f"{name}_thread_ms[{kind}]"] = ms

    for depth in (2, 16):
        c = make_config("llama-100m", depth)
        result[f"scanned_compile_s[{depth}]"] = compile_s(c, layered=False)
        result[f"layered_compile_s[{depth}]"] = compile_s(c, layered=True)
    result["scanned_compile_ratio"] = result["scanned_compile_s[16]"] / result["scanned_compile_s[2]"]
    result["layered_compile_ratio"] = result["layered_compile_s[16]"] / result["layered_compile_s[2]"]

    if not args.no_hf:
        import torch

        result["torch"] = torch.__version__
        del params, layers
        _, hf_token_s = transformers_side(config, 1, args.prompt_len, 64, 5, "float32", "cpu")
        result["hf_generate_ms"] = 1e3 * hf_token_s
        result["hf_forward_ms"] = torch_forward_ms(config, args.prompt_len, args.repeats)
        result["scanned_vs_hf_generate"] = result["hf_generate_ms"] / result["scanned_decode_ms"]
        result["layered_vs_hf_generate"] = result["hf_generate_ms"] / result["layered_decode_ms"]

    report(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
