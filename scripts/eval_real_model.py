"""KVzip and the baselines on a real model: SmolLM2-135M-Instruct over the shipped English QA set
(kvzip_jax/assets/qa_set: 20 documents of 280-450 words, 100 questions, SQuAD-style plus one needle per document).

    python scripts/eval_real_model.py                      # all methods and ratios; docs/kvzip_real_eval.{csv,png}
    python scripts/eval_real_model.py --docs 4 --ratios 1.0,0.3 --methods kvzip-pair,snapkv --out /tmp/quick

Query-agnostic protocol (kvzip.evaluate): every document is prefilled and scored once per method, compressed at
each ratio, and all of its questions are answered from that one compressed cache, greedily. Two scores per answer:
*accuracy* (the reference answer appears in the answer, case-insensitive) and *agreement* (the same answer as the
full cache, up to case, spacing and a final full stop). KVzip-head's head scores come from the demo's three other
documents (kvzip_jax/assets/documents), so they are independent of the evaluated ones, as in the paper.
Prints a markdown table for the README.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import numpy as np

METHODS = ("kvzip-pair", "kvzip-head", "snapkv", "pyramidkv", "h2o", "streaming_llm", "random")
RATIOS = (1.0, 0.5, 0.3, 0.2, 0.1)
FULL = ("kvzip-pair", 1.0)  # ratio 1.0 keeps every pair: the full cache, from the very prefill KVzip scored
PLOT_STYLE = {"kvzip-pair": ("C0", "-"), "kvzip-head": ("C0", ":"), "snapkv": ("C1", "-"),
              "pyramidkv": ("C2", "-"), "h2o": ("C3", "-"), "streaming_llm": ("C4", "-"), "random": ("C7", "-")}
NEEDLE = -1  # the last question of every document asks about its needle sentence


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=None, help="only the first N documents of the QA set")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ratios", type=_floats, default=RATIOS, help="comma-separated; must include 1.0")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", default="docs/kvzip_real_eval", help="CSV and PNG path prefix")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "kvzip-pair" not in methods or 1.0 not in args.ratios:
        parser.error("agreement is measured against kvzip-pair at ratio 1.0 (the full cache): keep both")
    if any(not 0.0 < r <= 1.0 for r in args.ratios):
        parser.error(f"ratios must be in (0, 1], got {args.ratios}")

    from tqdm import tqdm

    from kvzip_jax.kvzip.evaluate import EvalContext, Evaluator, normalize
    from kvzip_jax.kvzip.text import encode_context, prompt_for
    from kvzip_jax.lm import LanguageModel
    from kvzip_jax.real_demo import DOCUMENTS_DIR, QA_SET_DIR, load_documents
    from kvzip_jax.smollm2 import smollm2_gguf

    t_start = time.perf_counter()
    lm = LanguageModel.from_pretrained(smollm2_gguf())
    prompt = prompt_for(lm)
    docs = load_documents(args.docs, folder=QA_SET_DIR)
    contexts = [EvalContext(d.name, tuple(encode_context(lm, d.text)), tuple(q.question for q in d.questions),
                            tuple(q.answer for q in d.questions)) for d in docs]
    calibration = [encode_context(lm, d.text) for d in load_documents(folder=DOCUMENTS_DIR)]
    lengths = [len(c.context_ids) for c in contexts]
    n_questions = sum(len(c.questions) for c in contexts)
    print(f"SmolLM2-135M-Instruct Q4_1; {len(contexts)} documents ({min(lengths)}-{max(lengths)} tokens), "
          f"{n_questions} questions, ratios {', '.join(f'{r:g}' for r in args.ratios)}")
    evaluator = Evaluator(lm, prompt, contexts, chunk_size=2000, calibration=calibration,
                          max_new_tokens=args.max_new_tokens, headroom=64, ratios=args.ratios, progress=tqdm,
                          decode_full_once=True)
    kept = {}
    for method in tqdm(methods, desc="methods"):
        for o in evaluator.run(method):
            kept[o.method, o.ratio] = o.kept_ratio  # the same for every task (one compression per ratio)
    eval_s = time.perf_counter() - t_start

    def answers(key):
        preds = evaluator.predictions[key]
        return [(preds[q][row].strip(), c.answers[q], q == len(c.questions) - 1)
                for row, c in enumerate(contexts) for q in range(len(c.questions))]

    full = [a for a, _, _ in answers(FULL)]
    rows = []
    for method in methods:
        for ratio in args.ratios:
            got = answers((method, ratio))
            rows.append({
                "method": method, "ratio": ratio, "kept_ratio": kept[method, ratio],
                "accuracy": float(np.mean([normalize(ref) in normalize(a) for a, ref, _ in got])),
                "agreement": float(np.mean([normalize(a) == normalize(f) for (a, _, _), f in zip(got, full,
                                                                                                  strict=True)])),
                "needle_accuracy": float(np.mean([normalize(ref) in normalize(a) for a, ref, n in got if n])),
                "questions": len(got), "seconds": evaluator.times[method],
            })

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    for ax, metric, label in zip(axes, ("accuracy", "agreement", "needle_accuracy"),
                                 ("accuracy: reference in answer (%)", "same answer as the full cache (%)",
                                  "needle questions: accuracy (%)"), strict=True):
        for method in methods:
            color, style = PLOT_STYLE[method]
            ax.plot(args.ratios, [100 * r[metric] for r in rows if r["method"] == method], style, color=color,
                    marker="o", ms=3, label=method)
        ax.set_ylabel(label)
        ax.set_xlabel("KV ratio kept")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"SmolLM2-135M-Instruct, {len(contexts)} English documents, {n_questions} questions "
                 "(query-agnostic: one compression per document serves all its questions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.csv and {args.out}.png; {eval_s:.0f}s in all\n")

    for metric in ("accuracy", "agreement"):
        print(f"{metric} (%)\n| method | " + " | ".join(f"{r:g}" for r in args.ratios) + " |")
        print("|---|" + "---|" * len(args.ratios))
        for method in methods:
            print(f"| {method} | " + " | ".join(f"{100 * r[metric]:.0f}" for r in rows if r["method"] == method)
                  + " |")
        print()
    return {(r["method"], r["ratio"]): r for r in rows}


if __name__ == "__main__":
    main()
