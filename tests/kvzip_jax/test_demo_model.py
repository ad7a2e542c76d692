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
