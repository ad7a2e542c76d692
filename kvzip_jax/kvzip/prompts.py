"""KVzip prompt assembly, following the official code (snu-mllab/KVzip `model/template.py` and
`model/wrapper.py::{set_chat_template, apply_template, self_task, prefill}`; spec shared/research/kvzip.md §1.3).

What gets built (all with ``add_special_tokens=False``, special tokens written literally in the strings):

- ``prefix`` = chat-template head (system prompt + opening of the user turn) + the task instruction. It is the
  "system prompt" of the spec: n_s = len(prefix_ids), always kept, never evicted (§1.6).
- ``postfix`` = closes the user turn and opens the assistant turn.
- prefill input = ``prefix ‖ context`` (:func:`context_ids`).
- repeat input of chunk 0 = ``encode("\\n\\nRepeat the previous context exactly.") ‖ postfix ‖ chunk``; of chunk
  i >= 1 = ``encode("\\n\\nRepeat the part of the previous context exactly, starting with ") ‖ last 8 raw ids of
  chunk i-1 ‖ postfix ‖ chunk`` (:func:`repeat_inputs`). Note the trailing space after "with" (pitfall P8); the
  anchor is raw token ids, never decoded and re-tokenized.
- question turn = ``encode("\\n\\n" + question.strip()) ‖ postfix`` (official ``apply_template``;
  :func:`encode_question`), or ``question_ids ‖ postfix`` for already-tokenized questions (:func:`question_ids`).

Templates (official code at HEAD 5d84729):

==========  =======================================================================================
llama3      prefix ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nYou are a helpful
            assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\\n\\n`` (sic: no period after
            "assistant"), postfix ``\\n\\n<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``
qwen2       prefix ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n``,
            postfix ``<|im_end|>\\n<|im_start|>assistant\\n``
qwen3       as qwen2, postfix + ``<think>\\n\\n</think>\\n\\n`` (thinking disabled)
gemma3      prefix ``<bos><start_of_turn>user\\nYou are a helpful assistant.\\n\\n``, postfix
            ``<end_of_turn>\\n<start_of_turn>model\\n``
fallback    prefix ``<|begin_of_text|>``, postfix ``\\n\\nAnswer: ``
==========  =======================================================================================

Task instruction appended to the prefix (official: ``task.startswith("gsm")``; ``task`` is the data-set name):
"Given the context, answer to the following reasoning question.\\n\\n" for gsm*, otherwise "Given the context,
answer to the following question or request without explanation.\\n\\n". ``task=None`` means the default (the
official default task is "qa").

Choices where we interpret or deviate (documented per function too):

- Family → template uses our ``ModelConfig.family`` names (llama → llama3, qwen2 → qwen2, qwen3 → qwen3,
  gemma3 → gemma3); the official code matches on model-id substrings. Unknown family → fallback template with a
  ``UserWarning`` (the official code prints a warning).
- Missing special tokens: the official code silently tokenizes e.g. ``<|begin_of_text|>`` as plain text when the
  tokenizer does not know it (common with the fallback template). We check that every special token of a built-in
  template encodes to exactly one id and, by default (``strict=True``), raise a ValueError naming the missing
  tokens; ``strict=False`` reproduces the official behaviour (the literal text is tokenized as ordinary characters)
  with a warning. A user-supplied :class:`PromptTemplate` is encoded as given, unchecked.
- A :class:`PromptTemplate` also gets the task instruction appended to its prefix, like the built-in templates.
- ``anchor=0`` means no anchor tokens; in the official code ``ids[-0:]`` would silently take the whole previous
  chunk. ``anchor`` larger than a chunk takes the whole previous chunk (same as the official slicing).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

FIRST_REPEAT = "\n\nRepeat the previous context exactly."
LATER_REPEAT = "\n\nRepeat the part of the previous context exactly, starting with "  # trailing space is official
INSTRUCTION_DEFAULT = "Given the context, answer to the following question or request without explanation.\n\n"
INSTRUCTION_GSM = "Given the context, answer to the following reasoning question.\n\n"
DEFAULT_CHUNK_SIZE = 2000
DEFAULT_ANCHOR = 8
# The smallest reconstruction chunk `fit_chunk_size` shrinks to. Each chunk is one forward over the whole cache,
# so scoring time grows as n_c / chunk; shrunk chunks are also whole multiples of it, so a few sizes are compiled.
MIN_CHUNK_SIZE = 128


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Chat-template strings around the context: ``prefix`` (before it) and ``postfix`` (after the user turn)."""

    prefix: str
    postfix: str


_QWEN_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
_QWEN_POSTFIX = "<|im_end|>\n<|im_start|>assistant\n"

TEMPLATES: dict[str, PromptTemplate] = {
    "llama3": PromptTemplate(
        prefix=(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "You are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        ),
        postfix="\n\n<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen2": PromptTemplate(prefix=_QWEN_PREFIX, postfix=_QWEN_POSTFIX),
    "qwen3": PromptTemplate(prefix=_QWEN_PREFIX, postfix=_QWEN_POSTFIX + "<think>\n\n</think>\n\n"),
    "gemma3": PromptTemplate(
        prefix="<bos><start_of_turn>user\nYou are a helpful assistant.\n\n",
        postfix="<end_of_turn>\n<start_of_turn>model\n",
    ),
    "fallback": PromptTemplate(prefix="<|begin_of_text|>", postfix="\n\nAnswer: "),
}
TEMPLATE_ALIASES = {"llama": "llama3", "qwen2.5": "qwen2", "qwen": "qwen2", "gemma": "gemma3", "gemma-3": "gemma3"}
FAMILY_TEMPLATE = {"llama": "llama3", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
# Special tokens each built-in template writes literally; each must be one id in the tokenizer.
TEMPLATE_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "qwen2": ("<|im_start|>", "<|im_end|>"),
    "qwen3": ("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    "gemma3": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
    "fallback": ("<|begin_of_text|>",),
}


@dataclasses.dataclass(frozen=True)
class KVzipPrompt:
    """Token ids of the fixed prompt pieces (all encoded with ``add_special_tokens=False``)."""

    prefix_ids: tuple[int, ...]  # chat-template prefix + task instruction: the always-kept "system prompt" (n_s)
    postfix_ids: tuple[int, ...]  # closes the user turn, opens the assistant turn
    first_repeat_ids: tuple[int, ...]  # encode(FIRST_REPEAT)
    later_repeat_ids: tuple[int, ...]  # encode(LATER_REPEAT), trailing space included

    @property
    def n_sys(self) -> int:
        """n_s: the number of always-kept prefix tokens before the context."""
        return len(self.prefix_ids)


@dataclasses.dataclass(frozen=True)
class RepeatChunk:
    """One reconstruction input: the chunk is ``context[start:start+length]``; ``ids`` is the full repeat input."""

    start: int
    length: int
    ids: tuple[int, ...]

    @property
    def chunk_offset(self) -> int:
        """Index in ``ids`` where the teacher-forced chunk copy begins (it runs to the end of ``ids``)."""
        return len(self.ids) - self.length


def _encode(tokenizer, text: str) -> tuple[int, ...]:
    """Encode without adding BOS/EOS. Accepts a transformers tokenizer or a raw `tokenizers.Tokenizer`."""
    out = tokenizer.encode(text, add_special_tokens=False)
    if hasattr(out, "ids"):  # tokenizers.Encoding
        out = out.ids
    return tuple(int(i) for i in out)


def instruction_for(task: str | None) -> str:
    """The official task instruction: the gsm one when ``task`` starts with "gsm", else the default one."""
    if task is not None and not isinstance(task, str):
        raise TypeError(f"task must be a str or None, got {type(task).__name__}")
    return INSTRUCTION_GSM if task is not None and task.startswith("gsm") else INSTRUCTION_DEFAULT


def resolve_template(family: str, template: str | PromptTemplate | None = None) -> tuple[str | None, PromptTemplate]:
    """(template name or None for a user template, template). ``template`` overrides ``family``."""
    if isinstance(template, PromptTemplate):
        return None, template
    if template is not None:
        name = TEMPLATE_ALIASES.get(template, template)
        if name not in TEMPLATES:
            raise ValueError(
                f"unknown template {template!r}; known: {', '.join(sorted(TEMPLATES))} "
                f"(aliases {', '.join(sorted(TEMPLATE_ALIASES))}) or a PromptTemplate"
            )
        return name, TEMPLATES[name]
    name = FAMILY_TEMPLATE.get(family)
    if name is None:
        warnings.warn(
            f"no KVzip template for model family {family!r} (known: {', '.join(sorted(FAMILY_TEMPLATE))}); "
            "using the fallback template '<|begin_of_text|>' / '\\n\\nAnswer: ' as the official code does",
            stacklevel=3,
        )
        name = "fallback"
    return name, TEMPLATES[name]


def missing_special_tokens(tokenizer, name: str) -> list[str]:
    """The special tokens of built-in template ``name`` that the tokenizer does not encode as a single id."""
    return [t for t in TEMPLATE_SPECIAL_TOKENS[name] if len(_encode(tokenizer, t)) != 1]


def build_prompt(
    tokenizer,
    family: str,
    task: str | None = None,
    template: str | PromptTemplate | None = None,
    *,
    strict: bool = True,
) -> KVzipPrompt:
    """Encode the KVzip prompt pieces for a model family (official ``set_chat_template`` + ``self_task`` strings).

    ``family``: a ``ModelConfig.family`` (llama, qwen2, qwen3, gemma3); anything else → the fallback template with
    a warning. ``template``: a built-in template name (llama3, qwen2/qwen2.5, qwen3, gemma3, fallback) or a
    :class:`PromptTemplate` with explicit strings (e.g. for the demo tokenizer); it overrides ``family``.
    ``task``: selects the instruction appended to the prefix (gsm* → reasoning instruction; None → default).
    ``strict``: for built-in templates, raise ValueError when a template special token is not a single token of
    this tokenizer (the official code would silently tokenize it as text); ``strict=False`` warns and does that.
    """
    name, tpl = resolve_template(family, template)
    if name is not None:
        missing = missing_special_tokens(tokenizer, name)
        if missing:
            msg = (
                f"the tokenizer has no single-token encoding for the {name!r} template's special tokens {missing}; "
                "they would be tokenized as plain text. Use the model's own tokenizer, or pass "
                "template=PromptTemplate(prefix=..., postfix=...) with this tokenizer's chat-template strings"
            )
            if strict:
                raise ValueError(msg)
            warnings.warn(msg + " (strict=False: encoding them literally, as the official code does)", stacklevel=2)
    prefix = tpl.prefix + instruction_for(task)
    return KVzipPrompt(
        prefix_ids=_encode(tokenizer, prefix),
        postfix_ids=_encode(tokenizer, tpl.postfix),
        first_repeat_ids=_encode(tokenizer, FIRST_REPEAT),
        later_repeat_ids=_encode(tokenizer, LATER_REPEAT),
    )


def chat_template_prompt(tokenizer, system: str | None = "You are a helpful assistant.") -> PromptTemplate:
    """A :class:`PromptTemplate` derived from the tokenizer's own Jinja chat template (not in the official code;
    kvpress-style sentinel split). The prefix is everything the template renders before the user message (BOS,
    optional system turn, user-turn opening); the postfix is everything after it up to the generation prompt."""
    sentinel = "\x00KVZIP_SENTINEL\x00"
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": sentinel}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(sentinel) != 1:
        raise ValueError("the tokenizer's chat template did not render the user message exactly once")
    prefix, postfix = text.split(sentinel)
    return PromptTemplate(prefix=prefix, postfix=postfix)


def _as_ids(ids, what: str) -> list[int]:
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of token ids, not {type(ids).__name__}; tokenize it first")
    if hasattr(ids, "ndim") and ids.ndim != 1:
        raise ValueError(f"{what} must be 1-D token ids, got shape {tuple(ids.shape)}")
    out = [int(i) for i in ids]
    bad = [i for i in out if i < 0]
    if bad:
        raise ValueError(f"{what} contains negative token ids {bad[:5]}; ids must be >= 0")
    return out


def context_ids(prompt: KVzipPrompt, context_ids: Sequence[int]) -> list[int]:
    """The prefill input ``prefix ‖ context``; the context starts at position n_s = len(prompt.prefix_ids).

    The context is tokenized separately by the caller (``add_special_tokens=False``), as in the official
    ``prefill``; the ids are concatenated, never re-tokenized. An empty context is a ValueError."""
    ctx = _as_ids(context_ids, "context_ids")
    if not ctx:
        raise ValueError("empty context: context_ids has 0 tokens; KVzip needs at least 1 context token")
    return list(prompt.prefix_ids) + ctx


def repeat_inputs(
    prompt: KVzipPrompt,
    context_ids: Sequence[int],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    anchor: int = DEFAULT_ANCHOR,
) -> list[RepeatChunk]:
    """The reconstruction inputs, one per chunk (official ``self_task``; chunking as ``chunk_fn``).

    Chunks are ``context[i*m:(i+1)*m]`` for i < ceil(n_c/m); each position is in exactly one chunk and the last
    chunk may be short. Chunk 0: ``first_repeat ‖ postfix ‖ chunk``; chunk i >= 1: ``later_repeat ‖ the last
    ``anchor`` raw ids of chunk i-1 ‖ postfix ‖ chunk`` (fewer if chunk i-1 is shorter; none when anchor == 0).
    Errors (ValueError): chunk_size < 1, anchor < 0, empty context."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(anchor, bool) or not isinstance(anchor, int):
        raise TypeError(f"anchor must be an int, got {anchor!r}")
    if anchor < 0:
        raise ValueError(f"anchor must be >= 0, got {anchor}")
    ctx = _as_ids(context_ids, "context_ids")
    if not ctx:
        raise ValueError("empty context: context_ids has 0 tokens; KVzip needs at least 1 context token")
    post = list(prompt.postfix_ids)
    out: list[RepeatChunk] = []
    for i in range(math.ceil(len(ctx) / chunk_size)):
        start = i * chunk_size
        chunk = ctx[start : start + chunk_size]
        if i == 0:  # pragma: no mutate (i counts from 0: `i <= 0` is the same test)
            head = list(prompt.first_repeat_ids)
        else:
            prev = ctx[start - chunk_size : start]
            head = list(prompt.later_repeat_ids) + (prev[-anchor:] if anchor else [])
        out.append(RepeatChunk(start=start, length=len(chunk), ids=tuple(head + post + chunk)))
    return out


def max_repeat_len(prompt: KVzipPrompt, chunk_size: int = DEFAULT_CHUNK_SIZE, anchor: int = DEFAULT_ANCHOR) -> int:
    """Upper bound of ``len(RepeatChunk.ids)`` (n_in): the scorer needs n_s + n_c + n_in <= max positions (P16)."""
    head = max(len(prompt.first_repeat_ids), len(prompt.later_repeat_ids) + anchor)
    return head + len(prompt.postfix_ids) + chunk_size


def repeat_width(prompt: KVzipPrompt, n_ctx: int, chunk_size: int, anchor: int = DEFAULT_ANCHOR) -> int:
    """Exactly ``max(len(c.ids) for c in repeat_inputs(prompt, context, chunk_size, anchor))`` for a context of
    ``n_ctx`` tokens: the positions the longest repeat input needs after the context."""
    first = len(prompt.first_repeat_ids) + len(prompt.postfix_ids) + min(chunk_size, n_ctx)
    if n_ctx <= chunk_size:
        return first
    # The widest later chunk is the second one (later chunks are full, except perhaps the last); its anchor
    # comes from the full first chunk.
    later = (len(prompt.later_repeat_ids) + min(anchor, chunk_size) + len(prompt.postfix_ids)
             + min(chunk_size, n_ctx - chunk_size))
    return max(first, later)


def _positions_needed(prompt: KVzipPrompt, n_ctx: int, chunk_size: int, anchor: int) -> int:
    return prompt.n_sys + n_ctx + repeat_width(prompt, n_ctx, chunk_size, anchor)


def fit_chunk_size(
    prompt: KVzipPrompt, n_ctx: int, max_positions: int, chunk_size: int = DEFAULT_CHUNK_SIZE,
    anchor: int = DEFAULT_ANCHOR,
) -> int:
    """The reconstruction chunk to use for a context of ``n_ctx`` tokens (the longest row of a batch) on a model
    with ``max_positions`` positions: ``chunk_size`` when [system | context | longest repeat input] fits, else
    the largest multiple of `MIN_CHUNK_SIZE` below it that fits (P16: the official code places the repeat input
    after the context, so a long context leaves less room for it). A ValueError names the context's token count,
    the model's limit and the longest context that would fit, when even a `MIN_CHUNK_SIZE` chunk does not."""
    if n_ctx < 1:
        raise ValueError(f"empty context: {n_ctx} tokens")
    if _positions_needed(prompt, n_ctx, chunk_size, anchor) <= max_positions:
        return chunk_size
    for candidate in range(chunk_size // MIN_CHUNK_SIZE * MIN_CHUNK_SIZE, 0, -MIN_CHUNK_SIZE):
        if _positions_needed(prompt, n_ctx, candidate, anchor) <= max_positions:
            return candidate
    minimal = min(chunk_size, MIN_CHUNK_SIZE)
    lo, hi = 0, max_positions  # the longest context that fits with the minimal chunk (needed grows with n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _positions_needed(prompt, mid, minimal, anchor) <= max_positions else (lo, mid - 1)
    needed = _positions_needed(prompt, n_ctx, minimal, anchor)
    raise ValueError(
        f"a context of {n_ctx} tokens does not fit this model's {max_positions} positions for KVzip scoring: "
        f"[{prompt.n_sys} prompt tokens | context | repeat input of a {minimal}-token chunk] needs {needed}; "
        f"contexts of up to {lo} tokens fit: split or shorten the context by at least {n_ctx - lo} tokens"
    )


def question_ids(prompt: KVzipPrompt, question_ids: Sequence[int]) -> list[int]:
    """The query turn appended after the (compressed) context: ``question ‖ postfix``.

    The official ``apply_template`` encodes ``"\\n\\n" + question.strip()`` then appends the postfix; with raw ids
    the caller owns that formatting (see :func:`encode_question` for the official string form)."""
    return _as_ids(question_ids, "question_ids") + list(prompt.postfix_ids)


def encode_question(tokenizer, prompt: KVzipPrompt, question: str) -> list[int]:
    """Official ``apply_template``: ``encode("\\n\\n" + question.strip()) ‖ postfix``."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    return list(_encode(tokenizer, f"\n\n{question.strip()}")) + list(prompt.postfix_ids)
