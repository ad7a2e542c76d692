"""LanguageModel: tokenizer and chat template through AutoTokenizer, text generation equal to transformers,
the input-embeddings path, and bf16."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from kvzip_jax.cache import DenseKVCache  # noqa: E402
from kvzip_jax.demo import build_tokenizer  # noqa: E402
from kvzip_jax.lm import LanguageModel  # noqa: E402
from kvzip_jax.models import embed, forward  # noqa: E402


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    tokenizer = build_tokenizer(vocab_size=300)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, attn_implementation="eager",
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("chat_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def test_chat_template_and_text_generation_match_transformers(chat_checkpoint):
    model, tokenizer, path = chat_checkpoint
    lm = LanguageModel.from_pretrained(path)
    assert lm.tokenizer is not None
    question = "What does KVzip compress?"
    ids = lm.encode(question, chat=True)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids).endswith("<|assistant|>")

    texts = lm.generate([question, "Explain MokA."], chat=True, max_new_tokens=12)
    for prompt, text in zip([question, "Explain MokA."], texts, strict=True):
        p = lm.encode(prompt, chat=True)
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(ref[0, len(p):], skip_special_tokens=True)


def test_embeddings_path_equals_token_path(chat_checkpoint):
    _, _, path = chat_checkpoint
    lm = LanguageModel.from_pretrained(path, tokenizer=False)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, lm.config.vocab_size, (2, 9)))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    cache = DenseKVCache.zeros(lm.config, 2, 9)
    by_tokens, _ = forward(lm.params, tokens, positions, cache, config=lm.config)
    embeds = embed(lm.params, tokens, config=lm.config)
    assert embeds.shape == (2, 9, lm.config.hidden_size)
    by_embeds, _ = forward(lm.params, embeds, positions, cache, config=lm.config)
    np.testing.assert_array_equal(np.asarray(by_tokens), np.asarray(by_embeds))


def test_bf16_close_to_fp32(chat_checkpoint):
    _, _, path = chat_checkpoint
    f32 = LanguageModel.from_pretrained(path, tokenizer=False)
    bf16 = LanguageModel.from_pretrained(path, dtype=jnp.bfloat16, tokenizer=False)
    assert bf16.params["embed"][...].dtype == jnp.bfloat16
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, f32.config.vocab_size, (1, 16)))
    positions = jnp.arange(16)[None]
    ref, _ = forward(f32.params, tokens, positions, DenseKVCache.zeros(f32.config, 1, 16), config=f32.config)
    out, cache = forward(bf16.params, tokens, positions, DenseKVCache.zeros(bf16.config, 1, 16, jnp.bfloat16),
                         config=bf16.config)
    assert cache.k.dtype == jnp.bfloat16
    ref, out = np.asarray(ref), np.asarray(out, np.float32)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, rel
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_enable_compilation_cache_writes_executables_a_later_process_can_reuse():
    """The default folder (under the session's KVZIP_JAX_CACHE): JAX sets its persistent cache up once per
    process, so a test may not switch folders after the CLI tests enabled this one."""
    import jax
    import jax.numpy as jnp

    from kvzip_jax.lm import cache_dir, enable_compilation_cache

    saved = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        folder = enable_compilation_cache(min_compile_seconds=0.0)
        assert folder == os.path.join(cache_dir(), "xla")
        before = set(os.listdir(folder))
        jax.jit(lambda x: jnp.cos(x) * 3.0 + x.sum() - 0.125)(jnp.arange(41.0)).block_until_ready()
        assert any(name.endswith("-cache") for name in set(os.listdir(folder)) - before)
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", saved)
