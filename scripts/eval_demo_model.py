"""Accuracy against KV ratio for KVzip and the baselines on held-out synthetic samples (every question of a
context answered from one compression), for a model trained by scripts/train_demo_model.py.

    python scripts/eval_demo_model.py                                 # the shipped model; docs/kvzip_demo_eval.*
    python scripts/eval_demo_model.py --model demo_out/train/model    # a model you trained

Prints a markdown table (accuracy % per method and ratio) for the README.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

from kvzip_jax.kvzip.evaluate import METHODS, RATIOS, EvalContext, Evaluator, accuracy

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "kvzip_jax", "assets", "demo_model")  # the shipped one
PLOT_STYLE = {"kvzip-pair": ("C0", "-"), "kvzip-pair-uniform": ("C0", "--"), "kvzip-head": ("C0", ":"),
              "snapkv": ("C1", "-"), "pyramidkv": ("C2", "-"), "h2o": ("C3", "-"), "streaming_llm": ("C4", "-"),
              "random": ("C7", "-"), "snapkv-query": ("C1", ":"), "snapkv-reuse": ("C1", "--")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--per-task", type=int, default=12, help="held-out contexts per task")
    parser.add_argument("--context-tokens", type=int, default=800, help="context length budget (tokens)")
    parser.add_argument("--chunk-size", type=int, default=160, help="KVzip reconstruction chunk (several/context)")
    parser.add_argument("--calibration", type=int, default=4, help="contexts that calibrate the head-level scores")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="docs/kvzip_demo_eval")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from kvzip_jax.kvzip.text import prompt_for
    from kvzip_jax.lm import LanguageModel
    from kvzip_jax.train.data import HELDOUT_SEED, heldout_samples

    lm = LanguageModel.from_pretrained(args.model)
    prompt = prompt_for(lm)
    held = heldout_samples(lm.tokenizer, args.per_task, args.context_tokens)
    contexts = [EvalContext(task, tuple(ids), tuple(qa.question for qa in s.qa), tuple(qa.answer for qa in s.qa))
                for task, s, ids in held]
    # Head scores come from other samples than the ones evaluated (context-independent, as in the paper).
    calibration = [ids for _, _, ids in heldout_samples(lm.tokenizer, 1, args.context_tokens, seed=HELDOUT_SEED + 1)]
    calibration = calibration[: args.calibration]
    n_tokens = [len(c.context_ids) for c in contexts]
    print(f"{len(contexts)} contexts ({min(n_tokens)}-{max(n_tokens)} tokens, "
          f"{-(-max(n_tokens) // args.chunk_size)} chunks at most), "
          f"{sum(len(c.questions) for c in contexts)} questions")
    evaluator = Evaluator(lm, prompt, contexts, chunk_size=args.chunk_size, calibration=calibration, progress=tqdm)
    methods = args.methods.split(",")
    outcomes = []
    t0 = time.perf_counter()
    for method in tqdm(methods, desc="methods"):
        outcomes += evaluator.run(method)
    print(f"evaluated in {time.perf_counter() - t0:.0f}s")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "ratio", "task", "correct", "total", "accuracy", "kept_ratio"])
        for o in outcomes:
            writer.writerow([o.method, o.ratio, o.task, o.correct, o.total, f"{o.correct / o.total:.4f}",
                             f"{o.kept_ratio:.4f}"])
    tasks = sorted({o.task for o in outcomes})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4 * (len(tasks) + 1), 3.6), sharey=True)
    for ax, task in zip(axes, [None, *tasks], strict=True):
        for method in methods:
            color, style = PLOT_STYLE.get(method, ("k", "-"))
            ax.plot(RATIOS, [100 * accuracy(outcomes, method, r, task) for r in RATIOS], style, color=color,
                    marker="o", ms=3, label=method)
        ax.set_title(task or "all tasks")
        ax.set_xlabel("KV ratio kept")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy (%)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.csv and {args.out}.png\n")

    shown = (1.0, 0.9, 0.7, 0.5, 0.3, 0.2, 0.1)
    print("| method | " + " | ".join(f"{r:g}" for r in shown) + " |")
    print("|---|" + "---|" * len(shown))
    for method in methods:
        print(f"| {method} | " + " | ".join(f"{100 * accuracy(outcomes, method, r):.1f}" for r in shown) + " |")


if __name__ == "__main__":
    main()
