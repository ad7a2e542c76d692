"""Text in, text out: KVzip (or a baseline) on top of a `kvzip_jax.lm.LanguageModel` (config, params, tokenizer).

    from kvzip_jax.lm import LanguageModel
    from kvzip_jax.kvzip.text import compress_text

    lm = LanguageModel.from_pretrained("smollm2")                          # or a checkpoint path / .gguf file
    ctx = compress_text(lm, open("report.txt").read(), ratio=0.3)       # score once, keep 30% of the KV pairs
    ctx.ask("Who wrote the report?")                                     # -> ["..."]; ask as often as you like
    ctx.ask(["Who wrote it?", "When?", "Why?"])                          # several questions, one batched decode
    ctx.report.kept_ratio, ctx.report.compressed_kv_bytes                # what the compression bought

Several contexts of different lengths are rows of one batch: `compress_text(lm, [a, b])`, then one question per
row: `ctx.ask([qa, qb])`. `method` picks KVzip or a baseline of `kvzip_jax.kvzip.baselines.BASELINES`, all under
the same query-agnostic protocol and the same compressed cache.

Encoding follows the official code: the context is tokenized alone (``add_special_tokens=False``) and put after the
prompt prefix; a question is the official query turn ``encode("\\n\\n" + question.strip()) ‖ postfix``
(`prompts.encode_question`), asked raw. Generation stops at the config's EOS ids and the tokenizer's EOS.
The `kvzip-jax` CLI uses the helpers below (prompt resolution, context scoring, question encoding, stop ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from kvzip_jax.generate import DEFAULT_SAMPLING, GenerationResult, SamplingConfig, stream_text
from kvzip_jax.kvzip import compressor
from kvzip_jax.kvzip.baselines import BASELINES
from kvzip_jax.kvzip.compact import DEFAULT_PAGE_SIZE
from kvzip_jax.kvzip.compressor import DEFAULT_HEADROOM, CompressedContext, MemoryReport, ScoredContext
from kvzip_jax.kvzip.prompts import (
    DEFAULT_CHUNK_SIZE,
    FAMILY_TEMPLATE,
    KVzipPrompt,
    build_prompt,
    chat_template_prompt,
    encode_question,
    missing_special_tokens,
)
from kvzip_jax.kvzip.select import check_ratio

TEMPLATE_CHOICES = ("auto", "llama3", "qwen2", "qwen3", "gemma3", "chat")
METHODS = ("kvzip", *BASELINES)


def _tokenizer(lm):
    if lm.tokenizer is None:
        raise ValueError("this model has no tokenizer; the text API needs one (use kvzip.compressor with token ids)")
    return lm.tokenizer


def resolve_prompt(lm, template: str = "auto", task: str | None = None) -> tuple[str, KVzipPrompt]:
    """(template name used, prompt). ``auto``: the model family's template when the tokenizer has all its special
    tokens, else ``chat`` = the tokenizer's own chat template (`prompts.chat_template_prompt`)."""
    if template not in TEMPLATE_CHOICES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")
    tok, family = _tokenizer(lm), lm.config.family
    name = template
    if template == "auto":
        name = FAMILY_TEMPLATE.get(family)
        if name is None or missing_special_tokens(tok, name):
            name = "chat"
    if name == "chat":
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"the tokenizer of model family {family!r} has no chat template; pass a template: "
                             f"{'|'.join(t for t in TEMPLATE_CHOICES if t not in ('auto', 'chat'))}")
        return "chat", build_prompt(tok, family, task, template=chat_template_prompt(tok))
    return name, build_prompt(tok, family, task, template=name)


def prompt_for(lm, template: str = "auto", task: str | None = None) -> KVzipPrompt:
    """The KVzip prompt for this model (see `resolve_prompt` for the ``auto`` rule, the one the CLI uses)."""
    return resolve_prompt(lm, template, task)[1]


def encode_context(lm, text: str) -> list[int]:
    """Context token ids (``add_special_tokens=False``, as the official ``prefill``); ValueError if empty."""
    if not isinstance(text, str):
        raise TypeError(f"a context must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty context: the text has no non-whitespace characters")
    ids = [int(i) for i in _tokenizer(lm).encode(text, add_special_tokens=False)]
    if not ids:
        raise ValueError("empty context: the text encodes to 0 tokens")
    return ids


def stop_ids(lm) -> list[int]:
    """Stop tokens: the config's EOS ids plus the tokenizer's EOS."""
    stops = set(lm.config.eos_token_ids)
    eos = None if lm.tokenizer is None else lm.tokenizer.eos_token_id
    if eos is not None:
        stops.add(int(eos))
    return sorted(stops)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    return method


def score_ids(
    lm, prompt: KVzipPrompt, contexts: Sequence[Sequence[int]], *, method: str = "kvzip",
    chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = False, **method_kwargs,
) -> ScoredContext:
    """Prefill and score token-id contexts with KVzip (`chunk_size` = reconstruction chunk) or a baseline
    (`method_kwargs` go to the baseline function, e.g. ``window``, ``seed``, ``question``)."""
    check_method(method)
    if method == "kvzip":
        if method_kwargs:
            raise ValueError(f"kvzip takes no method options, got {sorted(method_kwargs)}")
        return compressor.score(lm.params, lm.config, prompt, contexts, chunk_size=chunk_size, progress=progress)
    return BASELINES[method](lm.params, lm.config, prompt, contexts, **method_kwargs)


def _as_list(x: str | Sequence[str], what: str) -> list[str]:
    items = [x] if isinstance(x, str) else list(x)
    if not items:
        raise ValueError(f"no {what} given")
    bad = [type(i).__name__ for i in items if not isinstance(i, str)]
    if bad:
        raise TypeError(f"{what} must be strings, got {bad[0]}")
    return items


def encode_questions(lm, prompt: KVzipPrompt, questions: str | Sequence[str]) -> list[list[int]]:
    """Official query turns ``encode("\\n\\n" + q.strip()) ‖ postfix``; ValueError for an empty question."""
    qs = _as_list(questions, "questions")
    empty = [i for i, q in enumerate(qs) if not q.strip()]
    if empty:
        raise ValueError(f"question #{empty[0] + 1} is empty")
    return [encode_question(_tokenizer(lm), prompt, q) for q in qs]


def ask_ids(lm, compressed: CompressedContext, turns: Sequence[Sequence[int]], *, rows: Sequence[int] | None = None,
            max_new_tokens: int = 64, sampling: SamplingConfig = DEFAULT_SAMPLING, seed: int = 0
            ) -> GenerationResult:
    """Answers to already-encoded query turns in one batched decode (`CompressedContext.ask`: one per context
    row by default, or `rows` naming each turn's context row), stopping at `stop_ids(lm)`."""
    return compressed.ask(lm.params, turns, rows=rows, max_new_tokens=max_new_tokens, sampling=sampling,
                          stop_token_ids=stop_ids(lm), seed=seed, raw=True)


def decode(lm, tokens: Sequence[int]) -> str:
    return _tokenizer(lm).decode(list(tokens), skip_special_tokens=True)


@dataclasses.dataclass
class TextContext:
    """Compressed context(s) of a `LanguageModel`, asked in text. ``compressed`` is the `CompressedContext`."""

    lm: Any
    prompt: KVzipPrompt
    compressed: CompressedContext
    method: str
    template: str
    context_ids: list[list[int]]

    @property
    def report(self) -> MemoryReport:
        return self.compressed.report

    @property
    def batch_size(self) -> int:
        return len(self.context_ids)

    def ask_result(self, questions: str | Sequence[str], max_new_tokens: int = 64, *,
                   rows: Sequence[int] | None = None, sampling: SamplingConfig = DEFAULT_SAMPLING,
                   seed: int = 0) -> GenerationResult:
        """Like `ask`, returning the token-level `GenerationResult` (tokens, finished)."""
        turns = encode_questions(self.lm, self.prompt, questions)
        return ask_ids(self.lm, self.compressed, turns, rows=rows, max_new_tokens=max_new_tokens,
                       sampling=sampling, seed=seed)

    def ask(self, questions: str | Sequence[str], max_new_tokens: int = 64, *, rows: Sequence[int] | None = None,
            sampling: SamplingConfig = DEFAULT_SAMPLING, seed: int = 0) -> list[str]:
        """Answers, all in one batched decode: one question per context row, or any number of questions on a
        single context (`ctx.ask(["q1", "q2", "q3"])`), or `rows[i]` = the context row question i asks. Greedy
        unless `sampling` says otherwise (temperature, top-k, top-p; `seed`). The context is never modified:
        questions are independent and can be asked in any order, any number of times."""
        result = self.ask_result(questions, max_new_tokens, rows=rows, sampling=sampling, seed=seed)
        return [decode(self.lm, t) for t in result.tokens]

    def stream(self, question: str, max_new_tokens: int = 64, *, row: int = 0,
               sampling: SamplingConfig = DEFAULT_SAMPLING, seed: int = 0) -> Iterator[str]:
        """One question on context row `row`; yields its answer's text as it is generated (the pieces join to
        what `ask` returns): ``for piece in ctx.stream("Who wrote it?"): print(piece, end="", flush=True)``."""
        turn = encode_questions(self.lm, self.prompt, question)[0]
        tokens = self.compressed.stream(self.lm.params, turn, row=row, max_new_tokens=max_new_tokens,
                                        sampling=sampling, stop_token_ids=stop_ids(self.lm), seed=seed, raw=True)
        return stream_text(_tokenizer(self.lm), tokens)


def compress_text(
    lm,
    contexts: str | Sequence[str],
    *,
    ratio: float = 0.3,
    level: str = "pair",
    method: str = "kvzip",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    headroom: int = DEFAULT_HEADROOM,
    page_size: int = DEFAULT_PAGE_SIZE,
    head_scores=None,
    template: str = "auto",
    task: str | None = None,
    progress: bool = False,
    **method_kwargs,
) -> TextContext:
    """Prefill, score and compress one context (a str) or a batch of contexts (a list of str, any lengths).

    ``ratio``: fraction of context KV pairs kept, in (0, 1]; ``level``: pair | pair-uniform | head (KVzip; the
    baselines use their own budget rule); ``method``: "kvzip" or a name in `baselines.BASELINES`;
    ``method_kwargs`` go to the baseline (a text ``question``, one per row, makes SnapKV/PyramidKV query-aware);
    ``chunk_size``: KVzip reconstruction chunk (shrunk automatically for long contexts); ``headroom``: the most
    tokens one question and its answer may append (their pages are allocated when asked)."""
    check_method(method)
    check_ratio(ratio)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1 (slots for question and answer tokens), got {headroom}")
    name, prompt = resolve_prompt(lm, template, task)
    ids = [encode_context(lm, c) for c in _as_list(contexts, "contexts")]
    question = method_kwargs.get("question")
    if isinstance(question, str) or (isinstance(question, (list, tuple)) and question
                                     and all(isinstance(q, str) for q in question)):
        # Query-aware SnapKV: the question text as the official turn, minus the postfix that snapkv appends.
        turns = encode_questions(lm, prompt, question)
        if len(turns) != len(ids):
            raise ValueError(f"{len(turns)} questions for {len(ids)} contexts (one per context row)")
        method_kwargs["question"] = [t[: len(t) - len(prompt.postfix_ids)] for t in turns]
    scored = score_ids(lm, prompt, ids, method=method, chunk_size=chunk_size, progress=progress, **method_kwargs)
    compressed = scored.compress(ratio, level, head_scores=head_scores, headroom=headroom, page_size=page_size)
    return TextContext(lm, prompt, compressed, method, name, ids)
