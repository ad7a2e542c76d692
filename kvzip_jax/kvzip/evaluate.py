"""Multi-query evaluation under KVzip's query-agnostic protocol (spec shared/research/kvzip.md §4.1).

For each method the contexts are prefilled and scored once; for each ratio the same scoring is compressed and
every question of every context is answered from that one compressed cache (rolled back between questions), as in
the official ``eval.py`` (all of them in one batched decode, every question a row on its context's shared pages).
Two query-aware SnapKV references (paper Fig. 2) are run the same way:
``snapkv-query`` rescored with each question in its observation window, and ``snapkv-reuse`` scored with the first
question and reused for the others. Exact-match accuracy on greedy answers.

Contexts are batch rows of the scoring; a context may have any number of questions. Every
compression is padded to the full cache's pool shape (`compact.pad_to`), so the sweep compiles few decode shapes:
accuracy is unaffected (padding pages are never referenced), memory is not what this measures. The KVzip levels
(pair, pair-uniform, head) select from one shared scoring; with ``decode_full_once`` ratio 1.0, which keeps every
pair and so is the full cache for any query-agnostic method, is decoded once and its answers reused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from kvzip_jax.kvzip import compressor
from kvzip_jax.kvzip.baselines import BASELINES
from kvzip_jax.kvzip.compact import shape_of
from kvzip_jax.kvzip.prompts import KVzipPrompt, encode_question
from kvzip_jax.kvzip.select import head_scores_from

RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
QUERY_AGNOSTIC = ("kvzip-pair", "kvzip-pair-uniform", "kvzip-head", "snapkv", "pyramidkv", "h2o", "streaming_llm",
                  "random")
QUERY_AWARE = ("snapkv-query", "snapkv-reuse")
METHODS = QUERY_AGNOSTIC + QUERY_AWARE


@dataclasses.dataclass(frozen=True)
class EvalContext:
    task: str
    context_ids: tuple[int, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Outcome:
    method: str
    ratio: float
    task: str
    correct: int
    total: int
    kept_ratio: float  # mean real kept fraction of the context pairs


def normalize(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


class Evaluator:
    """Holds the model, prompt and held-out contexts; `run(method)` returns one Outcome per (ratio, task)."""

    def __init__(self, lm, prompt: KVzipPrompt, contexts: Sequence[EvalContext], *, chunk_size: int,
                 calibration: Sequence[Sequence[int]] = (), max_new_tokens: int = 32, headroom: int = 64,
                 ratios: Sequence[float] = RATIOS, progress: Callable | None = None, decode_full_once: bool = False):
        if not contexts:
            raise ValueError("no evaluation contexts")
        self.lm, self.prompt, self.contexts = lm, prompt, list(contexts)
        self.chunk_size, self.max_new_tokens, self.headroom = chunk_size, max_new_tokens, headroom
        self.ratios = tuple(ratios)
        self.rounds = max(len(c.questions) for c in self.contexts)
        tok = lm.tokenizer
        # Question turns per round, one per context row (a row out of questions repeats its last; never asked).
        self.turns = [[encode_question(tok, prompt, c.questions[min(q, len(c.questions) - 1)]) for c in self.contexts]
                      for q in range(self.rounds)]
        self.stops = sorted(set(lm.config.eos_token_ids) | {tok.eos_token_id})
        self.head_scores = None
        if calibration:
            scored = compressor.score(lm.params, lm.config, prompt, list(calibration), chunk_size=chunk_size,
                                      progress=False)
            valid = np.arange(scored.scores.shape[-1])[None, :] < np.array(scored.n_ctx)[:, None]
            self.head_scores = head_scores_from(scored.scores, valid)
        self.progress = progress or (lambda it, **_: it)
        # Ratio 1.0 keeps every pair of the context's prefill, so for a query-agnostic method its answers are the
        # full cache's: with decode_full_once they are decoded for the first such method and reused after.
        self.decode_full_once = decode_full_once
        self._full_answers: dict[int, list[str]] | None = None
        self._kvzip_scored = None  # pair, pair-uniform and head levels select from the same KVzip scoring
        self.times: dict[str, float] = {}
        self.pad_to: tuple[int, int] | None = None
        # (method, ratio) -> {question round: one decoded answer per context row}
        self.predictions: dict[tuple[str, float], dict[int, list[str]]] = {}

    @property
    def context_ids(self) -> list[list[int]]:
        return [list(c.context_ids) for c in self.contexts]

    def _question_text(self, q: int) -> list[list[int]]:
        """The raw question ids of round q (for SnapKV's query-aware window): the turn minus the postfix."""
        n_post = len(self.prompt.postfix_ids)
        return [t[: len(t) - n_post] for t in self.turns[q]]

    def _score(self, method: str, question: list[list[int]] | None = None):
        if method.startswith("kvzip"):
            if self._kvzip_scored is None:
                self._kvzip_scored = compressor.score(self.lm.params, self.lm.config, self.prompt, self.context_ids,
                                                      chunk_size=self.chunk_size, progress=False)
            return self._kvzip_scored
        base = method.split("-")[0]
        kwargs = {} if question is None else {"question": question}
        return BASELINES[base](self.lm.params, self.lm.config, self.prompt, self.context_ids, **kwargs)

    def _answers(self, compressed, rounds: Sequence[int]) -> dict[int, list[str]]:
        """Every question of `rounds` in one batched decode: each is a row on its context's shared pages."""
        asked = [(q, row) for q in rounds for row, c in enumerate(self.contexts) if q < len(c.questions)]
        result = compressed.ask(self.lm.params, [self.turns[q][row] for q, row in asked],
                                rows=[row for _, row in asked], max_new_tokens=self.max_new_tokens,
                                stop_token_ids=self.stops, raw=True)
        out = {q: [""] * len(self.contexts) for q in rounds}
        for (q, row), tokens in zip(asked, result.tokens, strict=True):
            out[q][row] = self.lm.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return out

    def _outcomes(self, method: str, ratio: float, answers: dict[int, list[str]], kept: float) -> list[Outcome]:
        tally: dict[str, list[int]] = {}
        for q, preds in answers.items():
            for ctx, pred in zip(self.contexts, preds, strict=True):
                if q < len(ctx.questions):
                    hit = normalize(pred) == normalize(ctx.answers[q])
                    tally.setdefault(ctx.task, [0, 0])
                    tally[ctx.task][0] += int(hit)
                    tally[ctx.task][1] += 1
        return [Outcome(method, ratio, task, c, n, kept) for task, (c, n) in sorted(tally.items())]

    def _compress(self, scored, method: str, ratio: float):
        level = {"kvzip-pair": "pair", "kvzip-pair-uniform": "pair-uniform", "kvzip-head": "head"}.get(method, "pair")
        head_scores = self.head_scores if method == "kvzip-head" else None
        if self.pad_to is None:  # the full cache's shape: ratios and methods then share few compiled decodes
            self.pad_to = shape_of(scored.compress(1.0, headroom=self.headroom).cache)
        return scored.compress(ratio, level, head_scores=head_scores, headroom=self.headroom, pad_to=self.pad_to)

    def run(self, method: str) -> list[Outcome]:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
        if method == "kvzip-head" and self.head_scores is None:
            raise ValueError("kvzip-head needs calibration contexts (head scores are context-independent)")
        t0 = time.perf_counter()
        outcomes = []
        all_rounds = range(self.rounds)
        if method == "snapkv-query":  # rescored for every question: one scoring per round
            scorings = {q: self._score(method, self._question_text(q)) for q in all_rounds}
        else:
            first = self._question_text(0) if method == "snapkv-reuse" else None
            scored = self._score(method, first)
            scorings = {None: scored}
        for ratio in self.progress(self.ratios, desc=method, leave=False):
            if self.decode_full_once and ratio == 1.0 and method in QUERY_AGNOSTIC and self._full_answers:
                self.predictions[(method, ratio)] = self._full_answers
                outcomes += self._outcomes(method, ratio, self._full_answers, 1.0)
                continue
            answers, kept = {}, []
            for q, scored in scorings.items():
                compressed = self._compress(scored, method, ratio)
                kept.append(float(np.mean(compressed.report.kept_ratio)))
                answers.update(self._answers(compressed, all_rounds if q is None else [q]))
            self.predictions[(method, ratio)] = answers
            if ratio == 1.0 and method in QUERY_AGNOSTIC:
                self._full_answers = answers
            outcomes += self._outcomes(method, ratio, answers, float(np.mean(kept)))
        self.times[method] = time.perf_counter() - t0
        return outcomes


def accuracy(outcomes: Sequence[Outcome], method: str, ratio: float, task: str | None = None) -> float:
    rows = [o for o in outcomes if o.method == method and o.ratio == ratio and (task is None or o.task == task)]
    total = sum(o.total for o in rows)
    if total == 0:
        raise ValueError(f"no outcomes for method={method!r} ratio={ratio} task={task!r}")
    return sum(o.correct for o in rows) / total
