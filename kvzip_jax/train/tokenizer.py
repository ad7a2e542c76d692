"""The demo model's tokenizer: byte-level BPE trained (with the `tokenizers` library) on the synthetic tasks, with
Llama-3's special tokens and a Llama-3-style chat template, so that transformers' AutoTokenizer loads it and the
KVzip "llama3" prompt template applies unchanged.

Digits are split one per token before BPE so that numbers are copied digit by digit (no arbitrary digit merges
that would make two equal numbers tokenize differently depending on their neighbours).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kvzip_jax.kvzip import prompts
from kvzip_jax.train.tasks import TASKS, make_sample

BOS, EOT, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, "<|start_header_id|>", "<|end_header_id|>", EOT]
# Llama 3's chat format, reduced to what the demo needs (no tools, no dates).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


PROMPT_REPEATS = 200  # the fixed prompt strings occur in every example: weight them so BPE merges them


def corpus(seed: int, n_samples: int) -> Iterator[str]:
    """Texts the BPE merges are learned from: task samples plus every fixed prompt string the model will see,
    repeated so that they become a few tokens each (shorter examples, cheaper training, a smaller n_sys)."""
    fixed = (prompts.TEMPLATES["llama3"].prefix, prompts.TEMPLATES["llama3"].postfix, prompts.FIRST_REPEAT,
             prompts.LATER_REPEAT, prompts.instruction_for(None), prompts.instruction_for("gsm8k"))
    for _ in range(PROMPT_REPEATS):
        yield from fixed
    for i in range(n_samples):
        sample = make_sample(seed, i, TASKS[i % len(TASKS)])
        yield sample.context
        for qa in sample.qa:
            yield f"\n\n{qa.question}"
            yield qa.answer


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A transformers `PreTrainedTokenizerFast` (BPE over bytes, digits split) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD, chat_template=CHAT_TEMPLATE,
    )
