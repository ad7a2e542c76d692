"""The shipped demo model (kvzip_jax/assets/demo_model): the checkpoint the issue asks for, loadable by
transformers with the same greedy answers as ours, and a model that really reads its context."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kvzip_jax.kvzip_demo import DEMO_MODEL_DIR, builtin_contexts

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

MAX_CHECKPOINT_BYTES = 25 * 2**20


@pytest.fixture(scope="module")
def lm():
    from kvzip_jax.lm import LanguageModel

    return LanguageModel.from_pretrained(DEMO_MODEL_DIR)


@pytest.fixture(scope="module")
def contexts(lm):
    return builtin_contexts(lm.tokenizer)


def test_checkpoint_is_a_small_gqa_llama_with_a_1k_context():
    assert os.path.exists(os.path.join(DEMO_MODEL_DIR, "config.json")), f"the demo model must ship in {DEMO_MODEL_DIR}"
    files = os.listdir(DEMO_MODEL_DIR)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    size = sum(os.path.getsize(os.path.join(DEMO_MODEL_DIR, f)) for f in files)
    assert size <= MAX_CHECKPOINT_BYTES, f"{size} bytes shipped, limit {MAX_CHECKPOINT_BYTES}"
    with open(os.path.join(DEMO_MODEL_DIR, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["max_position_embeddings"] >= 1024


def test_transformers_gives_the_same_greedy_answers(lm, contexts):
    """Full-cache greedy answers of transformers' LlamaForCausalLM equal ours, token for token."""
    from kvzip_jax.kvzip.text import compress_text, encode_context, encode_questions, prompt_for

    prompt = prompt_for(lm)
    hf = transformers.LlamaForCausalLM.from_pretrained(DEMO_MODEL_DIR, torch_dtype=torch.float32).eval()
    eot = lm.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    texts = [text for _, text, _ in contexts]
    compressed = compress_text(lm, texts, ratio=1.0)
    for q in range(2):
        questions = [qa[q].question for _, _, qa in contexts]
        ours = compressed.ask_result(questions, max_new_tokens=32)
        for row, (text, question) in enumerate(zip(texts, questions, strict=True)):
            ids = [*prompt.prefix_ids, *encode_context(lm, text), *encode_questions(lm, prompt, question)[0]]
            with torch.no_grad():
                out = hf.generate(torch.as_tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eot,
                                  pad_token_id=lm.tokenizer.pad_token_id)
            theirs = out[0, len(ids):].tolist()
            assert list(ours.tokens[row]) == theirs, (question, ours.tokens[row], theirs)


def test_the_model_answers_from_its_context(lm, contexts):
    """A trained model, not a random one: most built-in questions are answered right from the full cache."""
    from kvzip_jax.kvzip.evaluate import normalize
    from kvzip_jax.kvzip.text import compress_text

    compressed = compress_text(lm, [text for _, text, _ in contexts], ratio=1.0)
    hits = []
    for q in range(max(len(qa) for _, _, qa in contexts)):
        rows = [i for i, (_, _, qa) in enumerate(contexts) if q < len(qa)]
        answers = compressed.ask([contexts[i][2][q].question if i in rows else contexts[i][2][0].question
                                  for i in range(len(contexts))], max_new_tokens=32)
        hits += [normalize(answers[i]) == normalize(contexts[i][2][q].answer) for i in rows]
    assert np.mean(hits) >= 0.75, f"{sum(hits)}/{len(hits)} right"


def _accuracy(lm, prompt, held, scored, ratio: float, pad_to) -> float:
    """Exact-match accuracy over every question of the held-out contexts, all answered from one compression of
    `scored` at `ratio` (rolled back between questions), as `evaluate.Evaluator` does."""
    from kvzip_jax.kvzip.evaluate import normalize
    from kvzip_jax.kvzip.prompts import encode_question

    tok = lm.tokenizer
    stops = sorted(set(lm.config.eos_token_ids) | {tok.eos_token_id})
    compressed = scored.compress(ratio, headroom=64, pad_to=pad_to)
    hits = []
    for q in range(max(len(s.qa) for _, s, _ in held)):
        # Rows out of questions repeat their last one, uncounted.
        turns = [encode_question(tok, prompt, s.qa[min(q, len(s.qa) - 1)].question) for _, s, _ in held]
        result = compressed.ask(lm.params, turns, max_new_tokens=32, stop_token_ids=stops, raw=True)
        for row, (_, sample, _) in enumerate(held):
            if q < len(sample.qa):
                answer = tok.decode(list(result.tokens[row]), skip_special_tokens=True)
                hits.append(normalize(answer) == normalize(sample.qa[q].answer))
    return 100.0 * float(np.mean(hits))


def test_kvzip_selection_keeps_the_accuracy_that_inverted_and_random_selection_lose(lm):
    """Accuracy floor at ratio 0.3 on held-out contexts (2 per task, 22 questions): KVzip's ranking must be what
    keeps the answers. The same scoring selected with the negated scores (the pairs KVzip ranks least important)
    or with seeded random scores must lose most of them. Selection goes through `select.keep_mask` directly, not
    the compressor's own selector, so a bug there cannot move both sides of a comparison.

    Measured (2 CPU cores, ~35 s): full cache 86.4, KVzip 0.3 90.9, inverted 0.3 0.0, random 0.3 9.1 (%);
    README's 132-question table: 93.9 / 94.7 / - / 10.6."""
    import dataclasses

    from kvzip_jax.kvzip import compressor
    from kvzip_jax.kvzip.compact import shape_of
    from kvzip_jax.kvzip.select import keep_mask
    from kvzip_jax.kvzip.text import prompt_for
    from kvzip_jax.train.data import heldout_samples

    prompt = prompt_for(lm)
    held = heldout_samples(lm.tokenizer, 2, 800)  # the eval script's held-out seed, context budget and chunk size
    scored = compressor.score(lm.params, lm.config, prompt, [ids for _, _, ids in held], chunk_size=160,
                              progress=False)
    random_scores = np.random.default_rng(0).random(scored.scores.shape).astype(np.float32)

    def inverted(scores, ratio, level, valid, layers, head_scores):
        return keep_mask(-scores, ratio, level, valid=valid, layers=layers)

    def random(scores, ratio, level, valid, layers, head_scores):
        return keep_mask(random_scores, ratio, level, valid=valid, layers=layers)

    pad_to = shape_of(scored.compress(1.0, headroom=64).cache)  # one pool shape: the decode compiles once
    full = _accuracy(lm, prompt, held, scored, 1.0, pad_to)
    kvzip = _accuracy(lm, prompt, held, scored, 0.3, pad_to)
    worst = _accuracy(lm, prompt, held, dataclasses.replace(scored, selector=inverted), 0.3, pad_to)
    rand = _accuracy(lm, prompt, held, dataclasses.replace(scored, selector=random), 0.3, pad_to)
    assert full >= 75.0, f"full cache {full:.1f}%"
    # Margins: 2 of 22 questions (9.1 points) below the full cache; 40 points above the ~80-90-point gaps measured.
    assert kvzip >= full - 9.1, f"KVzip 0.3 {kvzip:.1f}% vs full cache {full:.1f}%"
    assert kvzip >= worst + 40.0, f"KVzip 0.3 {kvzip:.1f}% vs inverted selection {worst:.1f}%"
    assert kvzip >= rand + 40.0, f"KVzip 0.3 {kvzip:.1f}% vs random selection {rand:.1f}%"
