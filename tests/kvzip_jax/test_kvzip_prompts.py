"""KVzip prompt assembly (kvzip_jax/kvzip/prompts.py) against the official strings (spec §1.3, P7, P8)."""

from __future__ import annotations

import math

import pytest

from kvzip_jax.kvzip import prompts as P

# The official strings, copied verbatim from snu-mllab/KVzip model/template.py and model/wrapper.py (HEAD 5d84729).
OFFICIAL = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
        "\n\n<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "qwen2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen3": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    "gemma3": ("<bos><start_of_turn>user\nYou are a helpful assistant.\n\n", "<end_of_turn>\n<start_of_turn>model\n"),
    "fallback": ("<|begin_of_text|>", "\n\nAnswer: "),
}
QA = "Given the context, answer to the following question or request without explanation.\n\n"
GSM = "Given the context, answer to the following reasoning question.\n\n"
ALL_SPECIALS = sorted({t for ts in P.TEMPLATE_SPECIAL_TOKENS.values() for t in ts})


@pytest.fixture(scope="module")
def plain_tok():
    from kvzip_jax.demo import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def tok():
    from kvzip_jax.demo import build_tokenizer

    t = build_tokenizer()
    assert t.add_tokens(ALL_SPECIALS, special_tokens=True) == len(ALL_SPECIALS)
    return t


def enc(t, s):
    return list(t.encode(s, add_special_tokens=False))


def sid(t, s):
    ids = enc(t, s)
    assert len(ids) == 1
    return ids[0]


@pytest.mark.parametrize(
    "family,name", [("llama", "llama3"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gemma3", "gemma3")]
)
def test_family_templates_match_official_strings(tok, family, name):
    prefix, postfix = OFFICIAL[name]
    p = P.build_prompt(tok, family)
    assert list(p.prefix_ids) == enc(tok, prefix + QA)
    assert list(p.postfix_ids) == enc(tok, postfix)
    assert tok.decode(list(p.prefix_ids)) == prefix + QA  # byte-level: decodes back to the exact string
    assert tok.decode(list(p.postfix_ids)) == postfix
    assert p.n_sys == len(p.prefix_ids)
    for special in P.TEMPLATE_SPECIAL_TOKENS[name]:  # each special token is literally one id in the prompt
        assert sid(tok, special) in p.prefix_ids + p.postfix_ids
    assert P.build_prompt(tok, "whatever", template=name) == p  # template name overrides the family


def test_qwen3_postfix_exact_ids(tok):
    p = P.build_prompt(tok, "qwen3")
    expect = [
        sid(tok, "<|im_end|>"),
        *enc(tok, "\n"),
        sid(tok, "<|im_start|>"),
        *enc(tok, "assistant\n"),
        sid(tok, "<think>"),
        *enc(tok, "\n\n"),
        sid(tok, "</think>"),
        *enc(tok, "\n\n"),
    ]
    assert list(p.postfix_ids) == expect
    assert P.build_prompt(tok, "qwen2").postfix_ids == tuple(expect[: -(len(enc(tok, "\n\n")) * 2 + 2)])


def test_llama_prefix_exact_ids(tok):
    p = P.build_prompt(tok, "llama")
    bot, sh, eh, eot = (
        sid(tok, s) for s in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    )
    expect = [
        bot,
        sh,
        *enc(tok, "system"),
        eh,
        *enc(tok, "\n\nYou are a helpful assistant"),
        eot,
        sh,
        *enc(tok, "user"),
        eh,
        *enc(tok, "\n\n" + QA),
    ]
    assert list(p.prefix_ids) == expect


def test_task_instruction(tok):
    qa = P.build_prompt(tok, "qwen2")
    assert qa == P.build_prompt(tok, "qwen2", task="squad") == P.build_prompt(tok, "qwen2", task="qa")
    gsm = P.build_prompt(tok, "qwen2", task="gsm8k")
    assert tok.decode(list(gsm.prefix_ids)) == OFFICIAL["qwen2"][0] + GSM
    assert gsm.postfix_ids == qa.postfix_ids
    assert P.build_prompt(tok, "qwen2", task="my_gsm").prefix_ids == qa.prefix_ids  # startswith, as official


def test_repeat_strings(tok):
    p = P.build_prompt(tok, "llama")
    assert list(p.first_repeat_ids) == enc(tok, "\n\nRepeat the previous context exactly.")
    assert list(p.later_repeat_ids) == enc(tok, "\n\nRepeat the part of the previous context exactly, starting with ")
    assert tok.decode(list(p.later_repeat_ids)).endswith("starting with ")  # the official trailing space


def test_fallback_and_missing_specials(tok, plain_tok):
    with pytest.warns(UserWarning, match="fallback"):
        p = P.build_prompt(tok, "mistral")
    assert tok.decode(list(p.prefix_ids)) == "<|begin_of_text|>" + QA
    assert tok.decode(list(p.postfix_ids)) == "\n\nAnswer: "
    # The demo tokenizer lacks <|begin_of_text|>: strict (default) refuses, naming the token ...
    with pytest.raises(ValueError, match=r"<\|begin_of_text\|>"):
        P.build_prompt(plain_tok, "llama")
    # ... strict=False reproduces the official behaviour: the literal text becomes ordinary tokens.
    with pytest.warns(UserWarning, match="literally"):
        p2 = P.build_prompt(plain_tok, "llama", strict=False)
    assert len(p2.prefix_ids) > len(enc(plain_tok, QA)) + 10
    with pytest.raises(ValueError, match="unknown template 'nope'"):
        P.build_prompt(tok, "llama", template="nope")


def test_explicit_template_for_demo_tokenizer(plain_tok):
    tpl = P.PromptTemplate(
        prefix="<|bos|><|system|>You are a helpful assistant.<|end|><|user|>", postfix="<|end|><|assistant|>"
    )
    p = P.build_prompt(plain_tok, "llama", template=tpl)
    assert list(p.prefix_ids) == enc(plain_tok, tpl.prefix + QA)
    assert list(p.postfix_ids) == [sid(plain_tok, "<|end|>"), sid(plain_tok, "<|assistant|>")]
    derived = P.chat_template_prompt(plain_tok)
    assert derived == tpl  # the demo chat template rendered around a sentinel gives the same strings


def test_context_and_question_ids(tok):
    p = P.build_prompt(tok, "qwen3")
    ctx = enc(tok, "KVzip compresses the key value cache")
    full = P.context_ids(p, ctx)
    assert full == list(p.prefix_ids) + ctx and full[p.n_sys :] == ctx
    q = enc(tok, "\n\nQ: what?")
    assert P.question_ids(p, q) == q + list(p.postfix_ids)
    assert P.encode_question(tok, p, "  Q: what?  ") == q + list(p.postfix_ids)  # official apply_template


@pytest.mark.parametrize("n_c,m", [(1, 2000), (7, 3), (9, 3), (10, 3), (2000, 2000), (2001, 2000), (4500, 2000)])
def test_chunk_coverage(tok, n_c, m):
    p = P.build_prompt(tok, "qwen2")
    ctx = [(7 * i) % 300 for i in range(n_c)]
    chunks = P.repeat_inputs(p, ctx, chunk_size=m)
    assert len(chunks) == math.ceil(n_c / m)
    seen = [0] * n_c
    for c in chunks:
        for j in range(c.start, c.start + c.length):
            seen[j] += 1
        assert list(c.ids[c.chunk_offset :]) == ctx[c.start : c.start + c.length]
        assert len(c.ids) <= P.max_repeat_len(p, m)
    assert seen == [1] * n_c
    assert all(c.length == m for c in chunks[:-1]) and 1 <= chunks[-1].length <= m
    assert chunks[-1].length == n_c - m * (len(chunks) - 1)


def test_repeat_input_layout(tok):
    p = P.build_prompt(tok, "llama")
    ctx = list(range(100, 125))  # 25 tokens, chunks of 10: [0,10), [10,20), [20,25)
    c0, c1, c2 = P.repeat_inputs(p, ctx, chunk_size=10)
    post = list(p.postfix_ids)
    assert list(c0.ids) == list(p.first_repeat_ids) + post + ctx[0:10]
    assert list(c1.ids) == list(p.later_repeat_ids) + ctx[2:10] + post + ctx[10:20]
    assert list(c2.ids) == list(p.later_repeat_ids) + ctx[12:20] + post + ctx[20:25]
    assert (c2.start, c2.length) == (20, 5)
    # anchor longer than a chunk takes the whole previous chunk (official slicing); anchor=0 takes none
    d = P.repeat_inputs(p, ctx, chunk_size=4, anchor=8)
    assert list(d[1].ids) == list(p.later_repeat_ids) + ctx[0:4] + post + ctx[4:8]
    e = P.repeat_inputs(p, ctx, chunk_size=10, anchor=0)
    assert list(e[1].ids) == list(p.later_repeat_ids) + post + ctx[10:20]


def test_anchor_is_raw_ids_not_retokenized(tok):
    """P8: the anchor ids are copied raw; decoding and re-encoding them would give different ids."""
    p = P.build_prompt(tok, "qwen2")
    raw = [sid(tok, ch) for ch in "the"]  # three single-character tokens ...
    assert enc(tok, tok.decode(raw)) != raw  # ... that BPE would merge when re-tokenized
    ctx = enc(tok, "KVzip compresses") + raw * 3  # the previous chunk ends with the unmerged characters
    chunks = P.repeat_inputs(p, ctx, chunk_size=len(ctx) - 1, anchor=8)
    anchor = list(chunks[1].ids[len(p.later_repeat_ids) : len(p.later_repeat_ids) + 8])
    assert anchor == ctx[-9:-1]
    assert enc(tok, tok.decode(anchor)) != anchor


def test_bad_inputs(tok):
    p = P.build_prompt(tok, "qwen2")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        P.repeat_inputs(p, [1, 2, 3], chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got -5"):
        P.repeat_inputs(p, [1, 2, 3], chunk_size=-5)
    with pytest.raises(ValueError, match="empty context"):
        P.repeat_inputs(p, [])
    with pytest.raises(ValueError, match="empty context"):
        P.context_ids(p, [])
    with pytest.raises(ValueError, match="anchor must be >= 0, got -1"):
        P.repeat_inputs(p, [1, 2, 3], anchor=-1)
    with pytest.raises(TypeError, match=r"chunk_size must be an int, got 2\.5"):
        P.repeat_inputs(p, [1, 2, 3], chunk_size=2.5)
    with pytest.raises(TypeError, match="tokenize it first"):
        P.context_ids(p, "raw text")
    with pytest.raises(ValueError, match="negative"):
        P.question_ids(p, [3, -1])


# ------------------------------------------------------------------------------ found by mutation testing
def test_repeat_chunks_are_immutable_and_the_length_bound_is_tight(tok):
    import dataclasses

    p = P.build_prompt(tok, "qwen2")
    m = 10
    chunks = P.repeat_inputs(p, list(range(100, 100 + 3 * m)), chunk_size=m)  # only full chunks
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'start'"):
        chunks[0].start = 5
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'prefix_ids'"):
        p.prefix_ids = ()  # the always-kept system prefix: shared by every compressed context built from it
    # max_repeat_len is the scorer's position budget: an upper bound that full chunks reach exactly.
    assert max(len(c.ids) for c in chunks) == P.max_repeat_len(p, m)


def test_fallback_warning_points_at_the_caller(tok):
    with pytest.warns(UserWarning, match="fallback") as record:
        P.build_prompt(tok, "mistral")
    assert record[0].filename == __file__  # stacklevel: the user's call, not the library's internals


class _FakeChatTokenizer:
    """A tokenizer whose chat template renders the user message `copies` times."""

    def __init__(self, copies: int):
        self.copies = copies

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<s>" + messages[-1]["content"] * self.copies + "</s>"


@pytest.mark.parametrize("copies", [0, 2])
def test_chat_template_must_render_the_user_message_exactly_once(copies):
    with pytest.raises(ValueError, match="did not render the user message exactly once"):
        P.chat_template_prompt(_FakeChatTokenizer(copies))
    assert P.chat_template_prompt(_FakeChatTokenizer(1)) == P.PromptTemplate(prefix="<s>", postfix="</s>")


def test_numpy_token_ids_must_be_one_dimensional(tok):
    import numpy as np

    p = P.build_prompt(tok, "qwen3")
    ctx = np.arange(100, 110)
    assert P.context_ids(p, ctx) == list(p.prefix_ids) + list(range(100, 110))
    with pytest.raises(ValueError, match=r"must be 1-D token ids, got shape \(1, 10\)"):
        P.context_ids(p, ctx[None])
