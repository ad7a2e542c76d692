"""A tiny random-weight Llama checkpoint with a real BPE tokenizer and chat template, written with transformers'
`save_pretrained`: the fixture of the text-level KVzip API and CLI tests (no trained weights needed there)."""

from __future__ import annotations

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


