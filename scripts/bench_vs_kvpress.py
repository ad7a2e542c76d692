"""Speed against the peer on the same checkpoint and machine, in one run: kvzip_jax vs kvpress's KVzipPress on
SmolLM2-135M-Instruct (fp32), per context length:

- compression: prefill + KVzip scoring + selection of one context, the first call (compiles) and warm (median);
  ours also on an unseen length (37 tokens longer: the first call after warming the other length);
- decode: ms per generated token from the compressed cache at ratio 0.3 (batch 1, greedy).

    python scripts/bench_vs_kvpress.py                               # 1K and 4K tokens
    python scripts/bench_vs_kvpress.py --contexts 1024 4096 7680     # 8K: 7,680 leaves KVzip room in 8,192

kvpress 0.5.5 pins transformers < 5.3, so it runs in its own virtualenv (--kvpress-venv; created with uv on first
use: the CPU torch 2.13.0 and kvpress 0.5.5) as a subprocess that prints JSON. Both read the same weights: the
SmolLM2 GGUF written once as an HF checkpoint (fp32) by kvzip-jax, and the same token ids ([chat prefix |
context]). torch runs with as many threads as the machine has cores, as XLA does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from bench_generate import median_time  # same folder: one timing rule for every benchmark

KVPRESS_VERSION = "0.5.5"
TORCH_VERSION = "2.13.0"
DECODE_STEPS = 16

KVPRESS_SIDE = r"""
import json, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from kvpress import KVzipPress

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
press = KVzipPress(compression_ratio=1.0 - args["ratio"])

def compress(ids):
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(input_ids=torch.tensor([ids]), past_key_values=cache)
    return cache

def decode_ms(cache, first):
    tok = torch.tensor([[first]])
    times = []
    with torch.no_grad():
        for _ in range(args["steps"]):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache)
            tok = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])

rows = []
for ids in args["contexts"]:
    t0 = time.perf_counter(); cache = compress(ids); first = time.perf_counter() - t0
    warm = []
    for _ in range(args["repeats"]):
        t0 = time.perf_counter(); cache = compress(ids); warm.append(time.perf_counter() - t0)
    kept = cache.get_seq_length()
    rows.append(dict(tokens=len(ids), first_s=first, warm_s=statistics.median(warm), kept_slots=kept,
                     decode_ms=decode_ms(cache, ids[-1])))
from importlib.metadata import version
print(json.dumps(dict(kvpress=version("kvpress"),
                      torch=torch.__version__, transformers=__import__("transformers").__version__, rows=rows)))
"""


def kvpress_python(venv: str) -> str:
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        uv = os.path.join(os.path.dirname(sys.executable), "uv")
        find_links = os.environ.get("PIP_FIND_LINKS") or subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True
        ).stdout.strip()
        extra = ["--find-links", find_links] if find_links else [
            "--index-url", "https://download.pytorch.org/whl/cpu", "--extra-index-url", "https://pypi.org/simple"]
        subprocess.run([uv, "pip", "install", "-q", "--python", python, *extra, f"torch=={TORCH_VERSION}",
                        f"kvpress=={KVPRESS_VERSION}"], check=True)
    return python


def ours_side(lm, prompt, contexts, ratio, repeats) -> list[dict]:
    import jax
    from bench_kvzip import decode_ms

    from kvzip_jax.kvzip.text import score_ids

    def compress(ids):
        ctx = score_ids(lm, prompt, [ids]).compress(ratio)
        jax.block_until_ready(ctx.cache.k_pages)
        return ctx

    rows = []
    for ids in contexts:
        t0 = time.perf_counter()
        ctx = compress(ids)
        first = time.perf_counter() - t0
        warm = median_time(lambda ids=ids: compress(ids), repeats)
        longer = ids + ids[:37]  # an unseen length, after the other one is warm
        t0 = time.perf_counter()
        compress(longer)
        unseen = time.perf_counter() - t0
        ms = decode_ms(lm.params, lm.config, ctx.decode_cache(DECODE_STEPS + 1), DECODE_STEPS, repeats)
        rows.append(dict(tokens=len(ids), first_s=first, warm_s=warm, unseen_first_s=unseen,
                         kept_bytes=ctx.report.compressed_kv_bytes, decode_ms=ms))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096], help="context lengths (tokens)")
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of KV pairs kept")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kvpress-venv", default="build/kvpress-venv")
    parser.add_argument("--hf-model", default="build/smollm2-hf", help="SmolLM2 as an HF checkpoint (written once)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import jax

    from kvzip_jax.kvzip.text import encode_context, prompt_for
    from kvzip_jax.lm import LanguageModel
    from kvzip_jax.real_demo import QA_SET_DIR, load_documents

    lm = LanguageModel.from_pretrained("smollm2")
    if not os.path.exists(os.path.join(args.hf_model, "config.json")):
        lm.save_pretrained(args.hf_model)
    prompt = prompt_for(lm)
    text_ids = [t for d in load_documents(folder=QA_SET_DIR) for t in encode_context(lm, d.text + "\n\n")]
    while len(text_ids) < max(args.contexts):
        text_ids = text_ids + text_ids
    contexts = [text_ids[:n] for n in args.contexts]

    ours = ours_side(lm, prompt, contexts, args.ratio, args.repeats)
    peer_args = dict(model=os.path.abspath(args.hf_model), ratio=args.ratio, repeats=args.repeats,
                     steps=DECODE_STEPS, threads=os.cpu_count() or 1,
                     contexts=[list(prompt.prefix_ids) + c for c in contexts])
    done = subprocess.run([kvpress_python(args.kvpress_venv), "-c", KVPRESS_SIDE, json.dumps(peer_args)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the kvpress side failed:\n{done.stderr[-3000:]}")
    peer = json.loads(done.stdout.strip().splitlines()[-1])

    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()} cores",
                jax=jax.__version__, python=platform.python_version(), kvpress=peer["kvpress"],
                torch=peer["torch"], peer_transformers=peer["transformers"], ratio=args.ratio, repeats=args.repeats)
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print("| tokens | ours first | ours warm | ours unseen length | kvpress first | kvpress warm | warm ratio "
          "(ours / kvpress) | ours decode ms/token | kvpress decode ms/token | decode ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for o, p in zip(ours, peer["rows"], strict=True):
        print(f"| {o['tokens']} | {o['first_s']:.1f} s | {o['warm_s']:.1f} s | {o['unseen_first_s']:.1f} s | "
              f"{p['first_s']:.1f} s | {p['warm_s']:.1f} s | {o['warm_s'] / p['warm_s']:.2f}x | "
              f"{o['decode_ms']:.1f} | {p['decode_ms']:.1f} | {o['decode_ms'] / p['decode_ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, ours=ours, kvpress=peer["rows"]), f, indent=1)


if __name__ == "__main__":
    main()
