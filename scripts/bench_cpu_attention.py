"""The fused CPU flash-attention kernel (`kvzip_kernels.cpu_attention`) against our jnp attention and torch's fused
CPU SDPA, at encoder shapes, on this machine's CPU:

    python scripts/bench_cpu_attention.py [--rounds 7] [--shapes whisper-base,vit-b16]

- ours: `fused_attention_cpu(q, k, v, scale=...)`, jitted (the FFI custom call; its thread pool uses every core
  the process may run on).
- jnp: `kvzip_jax.models.vision._attend_jnp(q, k, v, None, np.float32(scale))`, jitted: the path the encoders
  take without the fused kernel (XLA:CPU, [T, S] logits per head pair).
- torch: `torch.nn.functional.scaled_dot_product_attention` with `torch.set_num_threads(os.cpu_count())`.

Inputs are unit normals, q, k, v [B, N, T, D] float32, scale D^-1/2. Each implementation runs twice to warm up
(compile), then `--rounds` interleaved rounds (ours, jnp, torch, ours, ...), so a load spike from other processes
lands on all three alike; medians in ms. The max |difference| columns compare outputs (float32 each).
Prints a markdown table.

OMP_WAIT_POLICY defaults to PASSIVE here (set before torch loads its OpenMP runtime; an explicit setting wins):
with the default (active) policy torch's idle OpenMP worker keeps spinning on a core after each SDPA call, into
the next implementation's turn. On a 2-core machine that cost the fused kernel and the jnp path ~35% (fused 79 ms
against 58 ms, jnp 105 against 82 ms at the Whisper shape), while torch alone ran 84 ms under either policy.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP runtime) loads: see above

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {
    "whisper-base": (2, 8, 1500, 64),  # encoder self-attention, 1,500 frames
    "vit-b16": (8, 12, 197, 64),  # ViT-B/16 at 224 px: 196 patches + class token
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    args = parser.parse_args()

    import torch

    from kvzip_jax.models.vision import _attend_jnp
    from kvzip_kernels.cpu_attention import cpu_attention_available, fused_attention_cpu

    if not cpu_attention_available():
        raise SystemExit("the fused CPU attention is unavailable (see the warning above)")
    torch.set_num_threads(os.cpu_count() or 1)

    rows = []
    for name in args.shapes.split(","):
        b, n, t, d = SHAPES[name]
        scale = d**-0.5
        rng = np.random.default_rng(0)
        q_np, k_np, v_np = (rng.standard_normal((b, n, t, d)).astype(np.float32) for _ in range(3))
        q, k, v = (jnp.asarray(x) for x in (q_np, k_np, v_np))
        qt, kt, vt = (torch.from_numpy(x) for x in (q_np, k_np, v_np))

        ours_fn = jax.jit(lambda q, k, v, scale=scale: fused_attention_cpu(q, k, v, scale=scale))
        jnp_fn = jax.jit(lambda q, k, v, scale=scale: _attend_jnp(q, k, v, None, np.float32(scale)))

        def torch_fn(scale=scale, qt=qt, kt=kt, vt=vt):
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)

        impls = {
            "ours": lambda f=ours_fn, q=q, k=k, v=v: f(q, k, v).block_until_ready(),
            "jnp": lambda f=jnp_fn, q=q, k=k, v=v: f(q, k, v).block_until_ready(),
            "torch": torch_fn,
        }
        for fn in impls.values():
            fn()
            fn()
        times = {key: [] for key in impls}
        for _ in range(args.rounds):
            for key, fn in impls.items():
                times[key].append(timed(fn))
        out = {
            "ours": np.asarray(ours_fn(q, k, v)),
            "jnp": np.asarray(jnp_fn(q, k, v)),
            "torch": torch_fn().numpy(),
        }
        med = {key: 1e3 * float(np.median(ts)) for key, ts in times.items()}
        rows.append((name, (b, n, t, d), med, times, {
            "ours-jnp": float(np.abs(out["ours"] - out["jnp"]).max()),
            "ours-torch": float(np.abs(out["ours"] - out["torch"]).max()),
            "jnp-torch": float(np.abs(out["jnp"] - out["torch"]).max()),
        }))

    print(f"\n{os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {args.rounds} interleaved rounds, "
          "medians (min-max) in ms\n")
    print("| shape | [B, N, T, D] | ours (fused) | jnp `_attend_jnp` | torch SDPA | ours vs jnp | ours vs torch "
          "| max diff ours-jnp | ours-torch | jnp-torch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, med, times, diff in rows:
        cells = [f"{med[k]:.1f} ({1e3 * min(times[k]):.1f}-{1e3 * max(times[k]):.1f})"
                 for k in ("ours", "jnp", "torch")]
        print(f"| {name} | {list(shape)} | {' | '.join(cells)} | {med['jnp'] / med['ours']:.2f}x "
              f"| {med['torch'] / med['ours']:.2f}x | {diff['ours-jnp']:.1e} | {diff['ours-torch']:.1e} "
              f"| {diff['jnp-torch']:.1e} |")


if __name__ == "__main__":
    main()
