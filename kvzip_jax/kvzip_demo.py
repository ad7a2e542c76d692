"""The KVzip demo (`make demo`) on the embedded demo model, or on any model trained by
`scripts/train_demo_model.py`:

    python -m kvzip_jax.kvzip_demo                               # the embedded model (kvzip_jax/assets/demo_model)
    python -m kvzip_jax.kvzip_demo --model demo_out/train/model

Compresses three built-in held-out contexts (a passage, a multi-key needle haystack and variable tracking) once
each at ratio 0.3, without seeing the questions, then answers every question from the compressed caches, next to
the full cache and a query-agnostic SnapKV baseline at the same ratio. Prints the answers, the accuracy, the KV
memory before and after, and the times.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

DEMO_MODEL_DIR = os.path.join(os.path.dirname(__file__), "assets", "demo_model")  # the embedded default
DEMO_TASKS = ("passage", "needle", "vartrack")
DEMO_SEED = 2025  # the built-in contexts: held-out samples, never seen in training
CHUNK_SIZE = 160  # five reconstruction chunks of an 800-token context; positions stay within the trained 1024


def builtin_contexts(tokenizer, budget: int = 800):
    """The demo's contexts: one held-out sample per task in DEMO_TASKS, as (task, context text, QA pairs)."""
    from kvzip_jax.train.data import heldout_samples

    samples = [s for s in heldout_samples(tokenizer, 1, budget, seed=DEMO_SEED) if s[0] in DEMO_TASKS]
    return [(task, sample.context, sample.qa) for task, sample, _ in samples]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL_DIR,
                        help="an HF checkpoint directory trained on the synthetic tasks (default: the embedded one)")
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of context KV pairs kept")
    parser.add_argument("--baseline", default="snapkv", help="query-agnostic baseline shown next to KVzip")
    parser.add_argument("--context-tokens", type=int, default=800, help="length budget of each built-in context")
    args = parser.parse_args(argv)

    from kvzip_jax.kvzip.evaluate import normalize
    from kvzip_jax.kvzip.text import compress_text
    from kvzip_jax.lm import LanguageModel

    if not os.path.exists(os.path.join(args.model, "config.json")):
        raise SystemExit(f"no model at {args.model}: train one with `python scripts/train_demo_model.py --out "
                         "demo_out/train` and pass --model demo_out/train/model (or --install it as the default)")
    t0 = time.perf_counter()
    lm = LanguageModel.from_pretrained(args.model)
    c = lm.config
    print(f"model: {c.architecture}, {lm.num_params / 1e6:.2f}M params, {c.num_layers} layers, "
          f"{c.num_heads} query / {c.num_kv_heads} KV heads, loaded in {time.perf_counter() - t0:.1f}s")
    contexts = builtin_contexts(lm.tokenizer, args.context_tokens)
    texts = [text for _, text, _ in contexts]
    rounds = max(len(qa) for _, _, qa in contexts)
    n_tokens = [len(lm.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    print(f"{len(texts)} built-in contexts ({', '.join(task for task, _, _ in contexts)}), "
          f"{', '.join(map(str, n_tokens))} tokens; {sum(len(qa) for _, _, qa in contexts)} questions\n")

    runs = [("full cache", dict(ratio=1.0)), (f"KVzip {args.ratio:g}", dict(ratio=args.ratio)),
            (f"{args.baseline} {args.ratio:g}", dict(ratio=args.ratio, method=args.baseline))]
    results = {}
    for name, kwargs in runs:
        t0 = time.perf_counter()
        ctx = compress_text(lm, texts, chunk_size=CHUNK_SIZE, **kwargs)
        compress_s = time.perf_counter() - t0
        answers = [[None] * len(qa) for _, _, qa in contexts]
        t0 = time.perf_counter()
        for q in range(rounds):  # one question per context per call; the caches are rolled back after each
            asked = [qa[min(q, len(qa) - 1)].question for _, _, qa in contexts]
            for row, answer in enumerate(ctx.ask(asked, max_new_tokens=32)):
                if q < len(contexts[row][2]):
                    answers[row][q] = answer.strip()
        results[name] = (ctx.report, answers, compress_s, time.perf_counter() - t0)

    for row, (task, _, qa) in enumerate(contexts):
        print(f"[{task}]")
        for q, pair in enumerate(qa):
            shown = "  ".join(f"{name}: {results[name][1][row][q]!r}" for name, _ in runs)
            print(f"  Q: {pair.question}  (answer {pair.answer!r})\n     {shown}")
    print()
    header = f"{'':<16}{'accuracy':>10}{'KV memory':>14}{'kept':>8}{'prefill+score':>15}{'answers':>10}"
    print(header)
    for name, _ in runs:
        report, answers, compress_s, ask_s = results[name]
        hits = [normalize(a) == normalize(pair.answer)
                for row, (_, _, qa) in enumerate(contexts) for a, pair in zip(answers[row], qa, strict=True)]
        acc = np.mean(hits)
        print(f"{name:<16}{100 * acc:>9.0f}%{_mib(report.compressed_kv_bytes):>14}"
              f"{np.mean(report.kept_ratio):>8.2f}{compress_s:>14.1f}s{ask_s:>9.1f}s")
    full = results["full cache"][0]
    print(f"\ndense KV cache of these contexts: {_mib(full.dense_kv_bytes)}; KVzip keeps "
          f"{_mib(results[runs[1][0]][0].kept_kv_bytes)} of pairs (+ page rounding and page tables "
          f"in the paged cache above). Times include compilation on first use.")


if __name__ == "__main__":
    main()
