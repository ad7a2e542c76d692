"""Train the shipped MokA demo model (`moka_jax/assets/avqa_demo`, loaded by `moka_jax.demo.load_demo`).

    python scripts/build_moka_demo.py                       # stages 0-2 (resumable in --work), then writes --out
    python scripts/build_moka_demo.py --steps 50 --out my-demo --work my-demo-work   # a quick try

Stages 0-1 (encoders, projector alignment) as in the evidence experiment (`moka_jax.experiment`), then MokA
instruction tuning for --steps, evaluation on the 240 held-out questions (all modalities and the partial-modality
diagnostic), and the files: encoders, adapter + projectors, manifest.json with the settings and the scores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="instruction-tuning steps")
    parser.add_argument("--method", default="moka")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="moka_eval_runs", help="stage files (shared with scripts/eval_moka.py) and "
                        "checkpoints (resumable)")
    parser.add_argument("--out", default="moka_jax/assets/avqa_demo")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    import jax
    import numpy as np
    from tqdm import tqdm

    from moka_jax import demo, experiment

    cfg = experiment.ExperimentConfig(tune_steps=args.steps, methods=(args.method,), seeds=(args.seed,))
    moka = cfg.moka(args.method)
    t0 = time.perf_counter()
    llm = experiment.load_llm()
    encoders, projectors = experiment.prepare(cfg, os.path.join(args.work, "base"), llm, progress=print)
    model = experiment.build_model(llm, moka, seed=args.seed, projectors=projectors)
    bar = tqdm(total=args.steps, desc=f"{args.method} seed {args.seed}", unit="step")
    losses = experiment.train_stage(
        model, moka, encoders, kind="qa", steps=args.steps, cfg=cfg, seed=args.seed,
        log=lambda row: (bar.update(1), bar.set_postfix(loss=f"{row['loss']:.3f}")),
        checkpoint_dir=os.path.join(args.work, f"demo-{args.method}-seed{args.seed}-{args.steps}steps"),
        checkpoint_every=100)
    bar.close()
    train_s = time.perf_counter() - t0
    prompts, samples = experiment.test_prompts(cfg)
    held_out = {"samples": len(samples)}
    for name, active in experiment.ACTIVE.items():
        scores = experiment.evaluate(model, moka, encoders, prompts, samples, active=active)
        held_out.update({k: round(v, 4) for k, v in scores.items()} if name == "all"
                        else {f"accuracy ({name})": round(scores["accuracy"], 4)})
    manifest = {
        "what": "the shipped demo LLM (frozen) + CLIP-style and Whisper-style encoders (pre-trained, frozen) + "
                "projectors and a MokA adapter, trained on the synthetic audio-visual QA task (moka_jax.avqa)",
        "command": "python scripts/build_moka_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "training": {"method": args.method, "seed": args.seed, "steps": args.steps, "batch_size": cfg.batch_size,
                     "learning_rate": cfg.learning_rate, "rank": cfg.rank, "alpha": cfg.alpha,
                     "dropout": cfg.dropout, "encoder_steps": cfg.encoder.steps, "align_steps": cfg.align_steps,
                     "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
                     "seconds": round(train_s)},
        "held_out": held_out,
    }
    demo.save_demo(args.out, model, moka, encoders, manifest)
    print(json.dumps(manifest, indent=2))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s in all)")
    return manifest


if __name__ == "__main__":
    main()
