"""MokA against its baselines on the synthetic audio-visual QA task: docs/moka_eval.csv and docs/moka_eval.png.

    python scripts/eval_moka.py                       # the full table: 5 methods x 3 seeds (under an hour, 2 cores)
    python scripts/eval_moka.py --methods lora moka --seeds 0 --steps 100   # a quick look

The stages and the model are `moka_jax.experiment`'s; this script runs them, then writes one CSV row per
(method, seed) and a figure of the mean accuracy per method (overall, per question family, and the
partial-modality diagnostic), and prints the markdown table for the README.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moka_jax import experiment

COLUMNS = ("accuracy", "accuracy_image", "accuracy_audio", "accuracy_both", "accuracy (image only)",
           "accuracy (audio only)")


def summary(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per method, in the order the methods ran."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        entry = {"method": method, "seeds": len(mine)}
        for c in COLUMNS:
            values = np.array([r[c] for r in mine])
            entry[c] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
        out.append(entry)
    return out


def markdown(table: list[dict]) -> str:
    head = "| method | seeds | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for e in table:
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in (e[c] for c in COLUMNS)]
        lines.append(f"| {e['method']} | {e['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(table)
    x = np.arange(len(COLUMNS))
    for i, e in enumerate(table):
        means = [100 * e[c][0] for c in COLUMNS]
        errs = [100 * e[c][1] for c in COLUMNS]
        ax.bar(x + i * width, means, width, yerr=errs, capsize=2, label=e["method"])
    ax.set_xticks(x + width * (len(table) - 1) / 2, [c.replace("accuracy", "acc.") for c in COLUMNS], fontsize=8)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("synthetic audio-visual QA: held-out accuracy, mean ± sd over seeds")
    ax.legend(fontsize=8, ncol=len(table))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="moka_eval_runs", help="where encoders, projectors and results go")
    parser.add_argument("--docs", default="docs", help="where moka_eval.csv and moka_eval.png are written")
    parser.add_argument("--methods", nargs="+", default=list(experiment.METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=experiment.ExperimentConfig.tune_steps)
    parser.add_argument("--test-samples", type=int, default=experiment.ExperimentConfig.test_samples)
    args = parser.parse_args()
    cfg = experiment.ExperimentConfig(methods=tuple(args.methods), seeds=tuple(args.seeds), tune_steps=args.steps,
                                      test_samples=args.test_samples)
    t0 = time.perf_counter()
    rows = experiment.run(cfg, args.work)
    os.makedirs(args.docs, exist_ok=True)
    with open(os.path.join(args.docs, "moka_eval.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = summary(rows)
    plot(table, os.path.join(args.docs, "moka_eval.png"))
    print(markdown(table))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
