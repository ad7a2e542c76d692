"""The text-level API (`kvzip_jax.kvzip.text`) on the demo checkpoint (a tiny random Llama with a real BPE
tokenizer and chat template): compress text, ask questions in text, baselines by name, bad input."""

from __future__ import annotations

import pytest

from kvzip_jax.kvzip.baselines import BASELINES
from kvzip_jax.kvzip.prompts import build_prompt, chat_template_prompt, encode_question

# Two questions of the same token length (13 with the demo tokenizer): one compiled question shape.
QUESTIONS = ["How does ElasticMM scale?", "What does MokA adapt?"]


@pytest.fixture(scope="module")
def lm(random_lm):
    return random_lm


@pytest.fixture(scope="module")
def demo_text():
    from kvzip_jax.demo import DEMO_TEXT

    return DEMO_TEXT


@pytest.fixture(scope="module")
def full(lm, demo_text):
    from kvzip_jax.kvzip import text

    return text.compress_text(lm, demo_text, ratio=1.0, chunk_size=48, headroom=48)


def test_prompt_for_auto_rule(lm):
    from kvzip_jax.cli import TEMPLATE_CHOICES
    from kvzip_jax.kvzip import text

    # The demo tokenizer lacks the llama3 special tokens: auto -> the tokenizer's own chat template (as the CLI).
    name, prompt = text.resolve_prompt(lm)
    assert name == "chat"
    assert text.prompt_for(lm) == prompt == build_prompt(lm.tokenizer, "llama", None,
                                                         template=chat_template_prompt(lm.tokenizer))
    assert text.prompt_for(lm, task="gsm8k") != prompt  # task picks the instruction
    assert text.TEMPLATE_CHOICES == TEMPLATE_CHOICES
    with pytest.raises(ValueError, match="llama3"):  # explicit family template whose tokens are missing
        text.prompt_for(lm, template="llama3")
    with pytest.raises(ValueError, match="unknown template"):
        text.prompt_for(lm, template="nope")


def test_compress_and_ask(lm, demo_text):
    from kvzip_jax.kvzip import text

    ctx = text.compress_text(lm, demo_text, ratio=0.3, chunk_size=48, headroom=48)
    assert isinstance(ctx, text.TextContext) and ctx.method == "kvzip" and ctx.template == "chat"
    assert ctx.compressed.ratio == 0.3 and ctx.report is ctx.compressed.report
    assert isinstance(ctx.report.kept_ratio, float) and 0 < ctx.report.kept_ratio <= 0.3
    assert ctx.report.kept_ratios == (ctx.report.kept_ratio,)
    assert ctx.report.compressed_kv_bytes < ctx.report.dense_kv_bytes
    answers = [ctx.ask(q, max_new_tokens=8)[0] for q in QUESTIONS]
    assert all(isinstance(a, str) for a in answers)
    assert ctx.ask(QUESTIONS[0], max_new_tokens=8) == [answers[0]]  # rolled back: asking again is identical
    # Several questions on the one context: one batched decode, the same answers as one at a time.
    assert ctx.ask(QUESTIONS, max_new_tokens=8) == answers
    assert ctx.ask(list(reversed(QUESTIONS)), max_new_tokens=8) == list(reversed(answers))
    with pytest.raises(ValueError, match=r"context row 1 does not exist; this context has rows 0\.\.0"):
        ctx.ask(QUESTIONS, rows=[0, 1])
    with pytest.raises(ValueError, match="no questions given"):
        ctx.ask([])
    # Sampling: reproducible for a seed; temperature 0 is greedy.
    from kvzip_jax.generate import SamplingConfig

    hot = SamplingConfig(temperature=1.5, top_k=50)
    sampled = ctx.ask(QUESTIONS, max_new_tokens=8, sampling=hot, seed=1)
    assert ctx.ask(QUESTIONS, max_new_tokens=8, sampling=hot, seed=1) == sampled
    assert any(ctx.ask(QUESTIONS, max_new_tokens=8, sampling=hot, seed=s) != sampled for s in (2, 3, 4))
    with pytest.raises(ValueError, match="headroom"):
        ctx.ask(QUESTIONS[0], max_new_tokens=64)


def test_ratio_one_equals_generate_on_the_uncompressed_prompt(lm, demo_text, full):
    from kvzip_jax.kvzip import text

    assert full.report.kept_ratio == 1.0 and full.report.kept_ratios == (1.0,)
    prompt = text.prompt_for(lm)
    ctx_ids = lm.tokenizer.encode(demo_text, add_special_tokens=False)
    assert full.context_ids == [list(ctx_ids)]
    assert len({len(encode_question(lm.tokenizer, prompt, q)) for q in QUESTIONS}) == 1
    for q in QUESTIONS:
        ids = list(prompt.prefix_ids) + list(ctx_ids) + encode_question(lm.tokenizer, prompt, q)
        ref_tokens = lm.generate([ids], max_new_tokens=8)[0]
        result = full.ask_result(q, max_new_tokens=8)
        assert result.tokens[0] == ref_tokens
        assert full.ask(q, max_new_tokens=8) == [lm.tokenizer.decode(ref_tokens, skip_special_tokens=True)]


def test_baseline_by_name(lm, demo_text, full):
    from kvzip_jax.kvzip import text

    ctx = text.compress_text(lm, demo_text, ratio=0.3, method="streaming_llm", headroom=48)
    assert ctx.method == "streaming_llm" and ctx.compressed.ratio == 0.3
    assert 0 < ctx.report.kept_ratio <= 0.3
    # At ratio 1.0 every method keeps the same cache, so it answers like KVzip at 1.0.
    one = text.compress_text(lm, demo_text, ratio=1.0, method="streaming_llm", headroom=48)
    assert one.ask(QUESTIONS[0], max_new_tokens=8) == full.ask(QUESTIONS[0], max_new_tokens=8)


def test_bad_input(lm, demo_text):
    from kvzip_jax.kvzip import text

    with pytest.raises(ValueError, match="unknown method 'nope'; methods: ") as e:
        text.compress_text(lm, demo_text, method="nope")
    for name in ("kvzip", *BASELINES):
        assert name in str(e.value)
    assert text.METHODS == ("kvzip", *BASELINES)
    with pytest.raises(ValueError, match="ratio"):
        text.compress_text(lm, demo_text, ratio=1.5)
    with pytest.raises(ValueError, match="empty context"):
        text.compress_text(lm, "   ")
    with pytest.raises(ValueError, match="chunk_size"):
        text.compress_text(lm, demo_text, chunk_size=0)
    with pytest.raises(ValueError, match="no contexts"):
        text.compress_text(lm, [])
    with pytest.raises(ValueError, match="kvzip takes no method options"):
        text.compress_text(lm, demo_text, seed=3)


def test_streaming_answers_equal_asked_ones(lm, demo_text):
    """`TextContext.stream` yields the answer's text piece by piece: the pieces join to `ask`'s answer, token for
    token the same (greedy and sampled with one seed); while a stream is open the context refuses other calls,
    and closing it early gives the context back intact."""
    from kvzip_jax.generate import SamplingConfig
    from kvzip_jax.kvzip import text

    ctx = text.compress_text(lm, demo_text, ratio=0.3, chunk_size=48, headroom=48)
    q = QUESTIONS[0]
    for sampling, seed in ((SamplingConfig(), 0), (SamplingConfig(temperature=1.2, top_p=0.9), 7)):
        asked = ctx.ask_result(q, max_new_tokens=12, sampling=sampling, seed=seed).tokens[0]
        pieces = list(ctx.stream(q, max_new_tokens=12, sampling=sampling, seed=seed))
        assert "".join(pieces) == text.decode(lm, asked)
        assert len(pieces) >= 2  # it really streamed
        streamed = list(ctx.compressed.stream(lm.params, text.encode_questions(lm, ctx.prompt, q)[0], raw=True,
                                              max_new_tokens=12, sampling=sampling, seed=seed,
                                              stop_token_ids=text.stop_ids(lm)))
        assert streamed == asked
    open_stream = ctx.stream(q, max_new_tokens=12)
    next(open_stream)
    with pytest.raises(RuntimeError, match="a stream from this compressed context is still open"):
        ctx.ask(q, max_new_tokens=4)
    open_stream.close()
    greedy = ctx.ask_result(q, max_new_tokens=12).tokens[0]
    assert ctx.ask(q, max_new_tokens=12) == [text.decode(lm, greedy)]


def test_language_model_streams_what_it_generates_and_refuses_empty_input(lm):
    prompt = "Tell me about caches."
    full = lm.generate([prompt], chat=True, max_new_tokens=10)[0]
    pieces = list(lm.stream(prompt, chat=True, max_new_tokens=10))
    assert "".join(pieces) == full and len(pieces) >= 2
    ids = lm.encode(prompt, chat=True)
    assert list(lm.stream(ids, max_new_tokens=10)) == lm.generate([ids], max_new_tokens=10)[0]
    with pytest.raises(ValueError, match="no prompts given"):
        lm.generate([])
    with pytest.raises(TypeError, match=r"generate takes a list of prompts: generate\(\[prompt\]\)"):
        lm.generate(prompt)
    with pytest.raises(ValueError, match="prompt #2 is empty"):
        lm.generate([[1, 2], []])
    with pytest.raises(ValueError, match="stream takes one prompt"):
        lm.stream([[1, 2]])


def test_a_stream_never_started_or_dropped_gives_the_context_back(lm, demo_text):
    """Closing or dropping a stream, started or not, gives the context back; while a stream is open, saving or
    any other call on the context is refused with a clear error (the stream's steps own the pool)."""
    from kvzip_jax.kvzip import text

    ctx = text.compress_text(lm, demo_text, ratio=0.3, chunk_size=48, headroom=48)
    q = QUESTIONS[0]
    greedy = ctx.ask(q, max_new_tokens=6)
    tokens = ctx.compressed.stream(lm.params, text.encode_questions(lm, ctx.prompt, q)[0], raw=True,
                                   max_new_tokens=6)
    tokens.close()  # never started
    assert ctx.ask(q, max_new_tokens=6) == greedy
    pieces = ctx.stream(q, max_new_tokens=6)
    next(pieces), next(pieces)
    with pytest.raises(RuntimeError, match="still open"):
        ctx.compressed.logits(lm.params, [[5, 6]])
    with pytest.raises(RuntimeError, match="still open"):
        _ = ctx.compressed.context_cache
    del pieces  # dropped mid-answer
    assert ctx.ask(q, max_new_tokens=6) == greedy
    ctx.stream(q, max_new_tokens=6)  # created and dropped at once
    assert ctx.ask(q, max_new_tokens=6) == greedy
