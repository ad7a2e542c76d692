"""MokA's training cost against LoRA at the same rank and shapes: step time, forward time, memory, parameters.

The paper measured MokA's forward at +6.9-21% over LoRA (its cross-attention loops over samples in Python); here
the whole adapter is batched (`moka_jax.adapter`), and the target is <= +5% over LoRA for a full training step.
A Llama-shaped decoder with random weights is adapted on all seven projections of every layer (rank 4, alpha 16,
dropout 0.05, adapters float32) by each method in turn; tokens are laid out like the AVT prompts (system text |
image | audio | question = cross-attention keys | answer = loss | padding), no projectors (the image and audio
positions take token embeddings: the adapter's cost does not depend on where the embeddings come from).

Measured per method, in one run:
- step: the jitted `moka_jax.train.make_train_step` (forward + backward + clip + AdamW over the trainable group
  only, remat as TrainConfig's default), state fed back from step to step;
- forward: the training forward (dropout on) and the loss, no gradient;
- memory: the compiled step's `memory_analysis()` (temp and argument bytes; absent on backends without it);
- trainable parameters.
Times are medians of --repeats calls after a warm-up, with the methods interleaved (A B C A B C ...) so machine
noise hits all of them alike; ratios are to LoRA measured in the same run.

    python scripts/bench_moka.py                                 # CPU: 7 layers, d=512, batch 4 x 256 tokens
    python scripts/bench_moka.py --dtype bfloat16 --repeats 10
    python scripts/bench_moka.py --gpu-shape --json out.json     # GPU/TPU only: LLaMA-2-7B, bf16, 1 x 1024
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
from flax import nnx

from kvzip_jax.config import ModelConfig
from kvzip_jax.models import init_params
from kvzip_jax.models.llava import AUDIO, IMAGE, PAD, TEXT
from kvzip_jax.sharding import path_str
from moka_jax.config import MokAConfig
from moka_jax.context import make_context
from moka_jax.model import apply_moka
from moka_jax.train import AdaptedMultimodalLM, TrainConfig, make_train_step, optimizer, split_trainable, weighted_loss

METHODS = ("lora", "moka_no_ca", "moka", "multi_lora")
BASELINE = "lora"
CPU_SHAPE = dict(layers=7, hidden=512, intermediate=1408, heads=8, kv_heads=8, vocab=2048, batch=4, seq=256,
                 image_tokens=64, audio_tokens=64, dtype="float32")
GPU_SHAPE = dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, batch=1, seq=1024,
                 image_tokens=576, audio_tokens=256, dtype="bfloat16")
SYSTEM_TOKENS = 10


def model_config(args) -> ModelConfig:
    return ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(4096, args.seq)))


def avt_layout(batch: int, seq: int, image: int, audio: int, seed: int = 0):
    """(modality_ids, key_mask, answer_mask) [B, T] like the AVT prompts: 10 system text tokens, `image` image and
    `audio` audio tokens, a question of ~30 text tokens (the keys), an answer (the loss), then padding. Rows differ
    in question and answer lengths, so every row has some padding."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, seq), PAD, np.int8)
    keys = np.zeros((batch, seq), bool)
    answers = np.zeros((batch, seq), bool)
    prefix = SYSTEM_TOKENS + image + audio
    for b in range(batch):
        n_q = int(rng.integers(26, 35))
        room = seq - prefix - n_q - 1
        if room < 2:
            raise SystemExit(f"--seq {seq} is too short for {prefix} system/image/audio tokens and a ~30-token "
                             f"question; raise --seq or lower --image-tokens / --audio-tokens")
        n_ans = int(rng.integers(max(1, room // 3), room))
        ids[b, :SYSTEM_TOKENS] = TEXT
        ids[b, SYSTEM_TOKENS : SYSTEM_TOKENS + image] = IMAGE
        ids[b, SYSTEM_TOKENS + image : prefix] = AUDIO
        ids[b, prefix : prefix + n_q + n_ans] = TEXT
        keys[b, prefix : prefix + n_q] = True
        answers[b, prefix + n_q : prefix + n_q + n_ans] = True
    return ids, keys, answers


def memory_of(compiled) -> dict:
    try:
        mem = compiled.memory_analysis()
    except Exception:  # some backends raise instead of returning None
        mem = None
    if mem is None:
        return {}
    fields = dict(temp_bytes="temp_size_in_bytes", argument_bytes="argument_size_in_bytes",
                  output_bytes="output_size_in_bytes", alias_bytes="alias_size_in_bytes")
    return {k: int(getattr(mem, v)) for k, v in fields.items() if getattr(mem, v, None) is not None}


def share_base(frozen, base_params):
    """`frozen` with its decoder weights replaced by the very arrays of `base_params` (same values: apply_moka leaves
    them as they are), so the methods do not each hold a copy of the base model."""
    base = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(base_params)}

    def pick(path, x):
        name = path_str(path).removeprefix("decoder/")
        same = base.get(name)
        return same if same is not None and same.shape == x.shape and same.dtype == x.dtype else x

    return jax.tree_util.tree_map_with_path(pick, frozen)


class MethodBench:
    """One method's compiled step and forward, with its live training state."""

    def __init__(self, method: str, config: ModelConfig, base_params, batch, ids, keys, args):
        self.method = method
        moka = MokAConfig(method=method, rank=args.rank, alpha=16.0, dropout=0.05)
        decoder = apply_moka(base_params, config, moka, param_dtype=jnp.float32)
        graphdef, trainable, frozen = split_trainable(AdaptedMultimodalLM(config, moka, decoder, {}))
        frozen = share_base(frozen, base_params)  # one copy of the base weights for every method (7B on one GPU)
        del decoder
        cfg = TrainConfig(steps=10_000, remat=args.remat)
        tx = optimizer(cfg)
        self.context = make_context(moka, ids, keys)
        self.batch, self.frozen = batch, frozen
        self.trainable, self.opt_state = trainable, tx.init(trainable)
        self.params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainable))
        self.step_index = 0

        t0 = time.perf_counter()
        step = make_train_step(graphdef, tx, cfg)
        self.step = step.lower(trainable, self.opt_state, frozen, batch, self.context, jnp.int32(0)).compile()
        self.memory = memory_of(self.step)

        def forward_loss(trainable, frozen, batch, context, step_index):
            key = jax.random.fold_in(jax.random.key(cfg.seed), step_index)
            model = nnx.merge(graphdef, trainable, frozen)
            logits = model(batch["tokens"], batch["modality_ids"], batch["features"], context.with_dropout(key))
            return weighted_loss(logits, batch["tokens"], batch["loss_weights"])[0]

        self.forward = jax.jit(forward_loss).lower(trainable, frozen, batch, self.context, jnp.int32(0)).compile()
        self.compile_s = time.perf_counter() - t0
        self.step_times: list[float] = []
        self.forward_times: list[float] = []

    def run_step(self) -> float:
        t0 = time.perf_counter()
        self.trainable, self.opt_state, loss, _ = self.step(self.trainable, self.opt_state, self.frozen, self.batch,
                                                            self.context, jnp.int32(self.step_index))
        jax.block_until_ready((self.trainable, self.opt_state, loss))
        self.step_index += 1
        return time.perf_counter() - t0

    def run_forward(self) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(self.forward(self.trainable, self.frozen, self.batch, self.context,
                                           jnp.int32(self.step_index)))
        return time.perf_counter() - t0


def markdown(rows: list[dict]) -> str:
    lines = ["| method | step ms (median) | step / LoRA | forward ms | forward / LoRA | temp MB | args MB "
             "| trainable params |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        temp = f"{r['temp_bytes'] / 2**20:.1f}" if "temp_bytes" in r else "n/a"
        arg = f"{r['argument_bytes'] / 2**20:.1f}" if "argument_bytes" in r else "n/a"
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {r['step_ratio']:.3f} | {r['forward_ms']:.1f} "
                     f"| {r['forward_ratio']:.3f} | {temp} | {arg} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-shape", action="store_true",
                        help="LLaMA-2-7B shape (32 layers, 4096/11008, 32 heads, bf16, batch 1 x 1024); GPU/TPU only")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--image-tokens", type=int)
    parser.add_argument("--audio-tokens", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="base weights and activations (adapters are float32 either way)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (after one warm-up)")
    parser.add_argument("--no-remat", dest="remat", action="store_false", help="train step without remat")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    preset = GPU_SHAPE if args.gpu_shape else CPU_SHAPE
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    backend = jax.default_backend()
    if args.gpu_shape and backend not in ("gpu", "tpu"):
        sys.exit(f"--gpu-shape is the LLaMA-2-7B shape (~13 GB of bf16 weights, 32 layers x 1024 tokens): too big "
                 f"for the {backend} backend; run it on a GPU or TPU, or give a smaller shape without --gpu-shape")
    if BASELINE not in args.methods:
        args.methods = [BASELINE, *args.methods]

    config = model_config(args)
    dtype = jnp.dtype(args.dtype)
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()} cores",
                device=jax.devices()[0].device_kind, backend=backend, jax=jax.__version__, repeats=args.repeats,
                shape=dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                           kv_heads=args.kv_heads, vocab=args.vocab, batch=args.batch, seq=args.seq,
                           image_tokens=args.image_tokens, audio_tokens=args.audio_tokens, dtype=args.dtype),
                rank=args.rank, alpha=16.0, dropout=0.05, remat=args.remat)
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)

    ids, keys, answers = avt_layout(args.batch, args.seq, args.image_tokens, args.audio_tokens)
    rng = np.random.default_rng(0)
    batch = dict(tokens=jnp.asarray(rng.integers(0, args.vocab, ids.shape), jnp.int32),
                 modality_ids=jnp.asarray(ids), loss_weights=jnp.asarray(answers, jnp.float32), features={})
    base = init_params(config, dtype=dtype)

    try:
        from tqdm import tqdm
    except ImportError:  # progress is optional
        def tqdm(it, **_):
            return it
    quiet = args.no_progress
    benches = []
    for method in tqdm(args.methods, desc="compile", disable=quiet):
        benches.append(MethodBench(method, config, base, batch, ids, keys, args))
    for b in benches:  # warm-up (first calls allocate and fill caches)
        b.run_step()
        b.run_forward()
    for _ in tqdm(range(args.repeats), desc="repeats", disable=quiet):
        for b in benches:  # interleaved: A B C A B C ...
            b.step_times.append(b.run_step())
        for b in benches:
            b.forward_times.append(b.run_forward())

    ref = next(b for b in benches if b.method == BASELINE)
    ref_step, ref_fwd = statistics.median(ref.step_times), statistics.median(ref.forward_times)
    rows = []
    for b in benches:
        step_s, fwd_s = statistics.median(b.step_times), statistics.median(b.forward_times)
        rows.append(dict(method=b.method, step_ms=1e3 * step_s, step_ratio=step_s / ref_step,
                         forward_ms=1e3 * fwd_s, forward_ratio=fwd_s / ref_fwd, trainable_params=b.params,
                         compile_s=b.compile_s, step_ms_all=[1e3 * t for t in b.step_times],
                         forward_ms_all=[1e3 * t for t in b.forward_times], **b.memory))
    print()
    print(markdown(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
