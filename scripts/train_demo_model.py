"""Train the embedded demo model (a small Llama-format checkpoint) on the synthetic long-context tasks.

    python scripts/train_demo_model.py --out demo_out/train --install  # the shipped configuration and seed
    python scripts/train_demo_model.py --out demo_out/train --steps 2000 --cooldown-steps 0  # a constant-rate run

Re-running with the same --out resumes from the last Orbax checkpoint, exactly; a run can be extended with a
larger --steps as long as its learning-rate cool-down had not started. The HF checkpoint lands in <out>/model;
`--install` then copies it over the embedded default (kvzip_jax/assets/demo_model).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil

from kvzip_jax.train.trainer import TrainConfig, train

ROOT = os.path.join(os.path.dirname(__file__), "..")
ASSET_DIR = os.path.join(ROOT, "kvzip_jax", "assets", "demo_model")
DOCS_PLOT = os.path.join(ROOT, "docs", "demo_model_training.png")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out/train")
    parser.add_argument("--install", action="store_true", help="copy the result over the embedded default")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    model_dir = train(args.out, cfg)
    print(f"HF checkpoint: {model_dir}")
    if args.install:
        shutil.rmtree(ASSET_DIR, ignore_errors=True)
        shutil.copytree(model_dir, ASSET_DIR)
        shutil.copy(os.path.join(args.out, "loss.png"), DOCS_PLOT)
        print(f"installed as the embedded default: {os.path.normpath(ASSET_DIR)} (training curve: {DOCS_PLOT})")


if __name__ == "__main__":
    main()
