"""Encoder throughput, ours against transformers (PyTorch), on one machine in one run, plus compile time against
depth.

CPU (default): a ViT-B/16-shaped CLIP vision tower (224 px, 12 layers, fp32) in images/s, and a Whisper-base-
shaped encoder (80 mels, 30 s windows, 6 layers) in clips/s, random weights (throughput does not depend on them).
    python scripts/bench_encoders.py
GPU: the ViT-L/14-336 tower in bf16 at batch 32 against its FLOP floor (FLOPs / the device's peak bf16 rate).
    python scripts/bench_encoders.py --preset vit-l14-336 --dtype bfloat16 --batch 32 --no-torch --no-whisper

Ours and torch alternate, one timed call each per round, for --repeats rounds after one warm-up call each (this
VM's speed drifts by tens of percent over minutes, so back-to-back blocks of calls compare different machines);
the throughputs are medians over rounds and the ratio the median of the per-round ratios. torch runs with as many
threads as the machine has cores, as XLA does. Compile time: the jitted encode's lower + compile for 2 and for 12
layers (layers are scanned, so depth should barely change it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

# Before torch loads its OpenMP runtime (an explicit setting wins): with the default (active) wait policy torch's
# idle OpenMP worker keeps spinning on a core after each call, into our turn of the interleaved rounds; on the
# 2-core CPU that slowed the other implementation's attention by ~35% while torch alone ran the same under either
# policy (scripts/bench_cpu_attention.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np

from kvzip_jax.models import audio, vision

VISION_PRESETS = {
    "vit-b16": dict(model_type=vision.CLIP, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                    image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "vit-l14-336": dict(model_type=vision.CLIP, hidden_size=1024, intermediate_size=4096, num_layers=24,
                        num_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}
WHISPER_BASE = audio.WhisperEncoderConfig(hidden_size=512, intermediate_size=2048, num_layers=6, num_heads=8,
                                          num_mel_bins=80, max_source_positions=1500)
# Peak dense bf16 FLOP/s used for the GPU floor (vendor datasheet numbers, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def vision_flops(c: vision.VisionConfig, batch: int) -> float:
    """Multiply-adds x 2 of the tower's matmuls (patch embedding, attention projections, scores, MLP)."""
    t, h = c.num_positions, c.hidden_size
    per_layer = 2 * t * (4 * h * h + 2 * h * c.intermediate_size) + 2 * 2 * t * t * h
    patch = 2 * c.num_patches * (c.num_channels * c.patch_size**2) * h
    return batch * (c.num_layers * per_layer + patch)


def interleaved(ours, theirs, repeats: int) -> dict:
    """Alternate one timed call of each per round; medians of the times and of the per-round ratios."""
    ours_s, theirs_s = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ours_s), (theirs, theirs_s)):
            if fn is not None:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    out = {"ours_s": statistics.median(ours_s)}
    if theirs is not None:
        out["theirs_s"] = statistics.median(theirs_s)
        out["ratio"] = statistics.median(t / o for o, t in zip(ours_s, theirs_s, strict=True))  # ours/theirs speed
    return out


def bench_vision(args) -> dict:
    config = vision.VisionConfig(**VISION_PRESETS[args.preset])
    dtype = jnp.dtype(args.dtype)
    params = vision.init_params(config, dtype=dtype)
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, config.image_size, config.image_size))
    pixels = jnp.asarray(pixels, jnp.float32)
    encode = jax.jit(vision.encode, static_argnames=("config", "output_layer"))

    def ours():
        jax.block_until_ready(encode(params, pixels, config=config))

    ours()
    theirs = None if args.no_torch else torch_vision_call(config, np.asarray(pixels))
    timed = interleaved(ours, theirs, args.repeats)
    row = dict(model=args.preset, batch=args.batch, dtype=args.dtype, ours_items_per_s=args.batch / timed["ours_s"])
    if theirs is not None:
        row["torch_items_per_s"] = args.batch / timed["theirs_s"]
        row["ratio"] = timed["ratio"]
    row["compile_s"] = {n: compile_seconds(dataclasses.replace(config, num_layers=n), dtype, pixels)
                        for n in (2, 12)}
    device = jax.devices()[0]
    if device.platform == "gpu":
        peak = next((v for k, v in PEAK_BF16.items() if k in device.device_kind), None)
        if peak:
            row["floor_s"] = vision_flops(config, args.batch) / peak
            row["ours_over_floor"] = timed["ours_s"] / row["floor_s"]
    return row


def compile_seconds(config: vision.VisionConfig, dtype, pixels) -> float:
    params = jax.eval_shape(lambda: vision.init_params(config, dtype=dtype))
    fn = jax.jit(vision.encode, static_argnames=("config", "output_layer"))
    jax.clear_caches()  # the throughput run compiled the 12-layer tower already: time a real compile
    t0 = time.perf_counter()
    fn.lower(params, pixels, config=config).compile()
    return time.perf_counter() - t0


def torch_vision_call(config: vision.VisionConfig, pixels: np.ndarray):
    """transformers' CLIP tower on the same input: a warmed-up callable."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.CLIPVisionConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "model_type"})
    model = transformers.CLIPVisionModel(hf).eval()
    x = torch.as_tensor(pixels)

    def run():
        with torch.no_grad():
            model(pixel_values=x)

    run()
    return run


def torch_whisper_call(feats: np.ndarray):
    """transformers' Whisper-base encoder on the same input: a warmed-up callable."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.WhisperConfig(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                                    num_mel_bins=80, max_source_positions=1500, decoder_layers=1,
                                    decoder_attention_heads=8, decoder_ffn_dim=2048)
    model = transformers.WhisperModel(hf).get_encoder().eval()
    x = torch.as_tensor(feats)

    def run():
        with torch.no_grad():
            model(x)

    run()
    return run


def bench_whisper(args) -> dict:
    config = WHISPER_BASE
    params = audio.init_params(config)
    feats = np.random.default_rng(0).standard_normal((args.clips, config.num_mel_bins, config.num_frames))
    feats = jnp.asarray(feats, jnp.float32)
    encode = jax.jit(audio.encode_whisper, static_argnames=("config",))

    def ours():
        jax.block_until_ready(encode(params, feats, config=config))

    ours()
    theirs = None if args.no_torch else torch_whisper_call(np.asarray(feats))
    timed = interleaved(ours, theirs, args.repeats)
    row = dict(model="whisper-base-encoder", batch=args.clips, dtype="float32",
               ours_items_per_s=args.clips / timed["ours_s"])
    if theirs is not None:
        row["torch_items_per_s"] = args.clips / timed["theirs_s"]
        row["ratio"] = timed["ratio"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-b16", choices=sorted(VISION_PRESETS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--clips", type=int, default=2, help="30 s clips per Whisper call")
    parser.add_argument("--no-whisper", action="store_true")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baseline (GPU floor runs)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {os.cpu_count()} cores",
                device=jax.devices()[0].device_kind, jax=jax.__version__, repeats=args.repeats)
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    rows = []
    for bench in [bench_vision] + ([] if args.no_whisper else [bench_whisper]):
        rows.append(bench(args))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
