"""`make parity-demo`: build a small Llama-format checkpoint with a real tokenizer and chat template, load it without
torch, generate for a batch of chat prompts, and show parity with transformers (logits and greedy tokens).

The weights are random (no pretrained model can be downloaded here), so the text is gibberish; what the demo shows
is that our loader, decoder, cache and generation loop reproduce transformers exactly, and how fast. `make demo` is
the KVzip demo on the shipped trained model (`kvzip_jax.kvzip_demo`).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

DEMO_TEXT = (
    "KVzip compresses the key value cache of a long context once, without knowing the questions. "
    "The model scores each pair by how much it needs it to reconstruct the context, keeps about thirty percent, "
    "and then answers any number of questions from that cache. Memory shrinks three to four times and decoding "
    "attention runs about twice as fast. MokA adapts multimodal models with per modality low rank matrices. "
    "ElasticMM serves multimodal models with elastic stages that the scheduler reassigns as the load shifts. "
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the demo text, wrapped so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([DEMO_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_checkpoint(path: str, seed: int = 0) -> None:
    import torch
    import transformers

    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=256),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # perturb every weight so norms and heads are not at their neutral init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out/tiny-llama", help="where the demo checkpoint is written")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from kvzip_jax.lm import LanguageModel

    if not os.path.exists(os.path.join(args.out, "config.json")):
        print(f"building a demo checkpoint in {args.out} (random Llama-3-style weights, BPE tokenizer)")
        build_checkpoint(args.out)
    t0 = time.perf_counter()
    lm = LanguageModel.from_pretrained(args.out)
    print(f"loaded {lm.config.architecture} with {lm.num_params / 1e6:.1f}M params in {time.perf_counter() - t0:.2f}s "
          f"(safetensors -> jax, no torch)")

    questions = ["What does KVzip compress?", "Explain MokA in one line.", "How does ElasticMM scale?"]
    ids = [lm.encode(q, chat=True) for q in questions]
    t0 = time.perf_counter()
    ours = lm.generate(ids, max_new_tokens=args.max_new_tokens)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = lm.generate(ids, max_new_tokens=args.max_new_tokens)
    second = time.perf_counter() - t0

    import torch
    import transformers

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    refs = []
    with torch.no_grad():
        for p in ids:
            out = ref_model.generate(
                torch.tensor([p]), max_new_tokens=args.max_new_tokens, do_sample=False,
                eos_token_id=lm.tokenizer.eos_token_id, pad_token_id=lm.tokenizer.pad_token_id,
            )
            refs.append(out[0, len(p):].tolist())
    ref_time = time.perf_counter() - t0

    from kvzip_jax.cache import DenseKVCache
    from kvzip_jax.models import forward

    longest = max(ids, key=len)
    cache = DenseKVCache.zeros(lm.config, 1, len(longest))
    ours_logits, _ = forward(lm.params, np.array([longest]), np.arange(len(longest))[None], cache, config=lm.config)
    with torch.no_grad():
        ref_logits = ref_model(torch.tensor([longest])).logits.numpy()
    max_diff = float(np.abs(np.asarray(ours_logits) - ref_logits).max())

    print()
    for q, o, r in zip(questions, ours, refs, strict=True):
        same = o == r
        print(f"Q: {q}\n   tokens: {len(o)} generated, identical to transformers: {same}")
        print(f"   text:   {lm.tokenizer.decode(o, skip_special_tokens=True)!r}")
    print()
    print(f"max |logit difference| vs transformers (fp32): {max_diff:.2e}")
    print(f"generate, batch of {len(ids)}: ours {first:.2f}s with compile, {second:.2f}s compiled; "
          f"transformers {ref_time:.2f}s (one prompt at a time)")
    if not all(o == r for o, r in zip(ours, refs, strict=True)) or max_diff > 1e-4:
        raise SystemExit("parity with transformers FAILED")
    print("parity with transformers: OK")


if __name__ == "__main__":
    main()
