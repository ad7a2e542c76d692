"""Training examples in exactly KVzip's prompt format, and the Grain pipeline that batches them.

Two kinds of task example, both starting with the "llama3" KVzip prefix (system turn + task instruction) and a
context (the warm-up before them is `make_induction_example`, over random ids and without the prefix):

- ``qa``: ``prefix ‖ context ‖ (question ‖ postfix ‖ separator + answer ‖ <|eot_id|>)+``: the questions of the
  sample, each in the official ``apply_template`` form; answers restate the fact (see `tasks.QA`). Later
  questions follow earlier answers (more supervised answers per context); the first one is exactly what inference
  sees after a rollback.
- ``repeat``: ``prefix ‖ context ‖ repeat input of one chunk`` built by `kvzip.prompts.repeat_inputs`: the first
  chunk's "Repeat the previous context exactly." form or a later chunk's "starting with" + 8 anchor ids form, then
  the teacher-forced copy. This teaches the reconstruction that KVzip's scores come from.

Loss weights: 1 on answers (and their <|eot_id|>) and on the chunk copies, `CONTEXT_WEIGHT` on context tokens (the
filler grammar is learnable, the facts are noise), 0 on prompts and padding. Every example is a pure function of
(seed, step, row), so a resumed run sees exactly the batches a straight run would.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvzip_jax.kvzip import prompts
from kvzip_jax.train.tasks import TASKS, Sample, make_sample
from kvzip_jax.train.tokenizer import SPECIAL_TOKENS

CONTEXT_WEIGHT = 0.1
REPEAT_FRACTION = 0.4
CHUNK_SIZES = (64, 128, 192, 256)
QA_TURN_TOKENS = 44  # a question turn plus its restated answer, at most, for these tasks
TOKENS_PER_FILLER = 13  # a filler sentence is ~11-14 tokens; only used to pick a first guess


@dataclasses.dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # int32 [seq_len]: the example, right-padded
    weights: np.ndarray  # float32 [seq_len]: loss weight of predicting ids[t] from ids[:t]


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def fit_sample(tokenizer, seed: int, index: int, task: str, budget: int, rng: np.random.Generator):
    """The sample of (seed, index, task) with the most filler whose context fits in `budget` tokens.

    Returns (sample, context ids). Facts are never cut: if even zero filler does not fit, it is a ValueError."""
    n_filler = max(0, int(rng.integers(budget // (3 * TOKENS_PER_FILLER), budget // TOKENS_PER_FILLER + 1)))
    while True:
        sample = make_sample(seed, index, task, n_filler)
        ids = encode_text(tokenizer, sample.context)
        if len(ids) <= budget:
            return sample, ids
        if n_filler == 0:
            raise ValueError(f"a {task!r} sample needs {len(ids)} context tokens, more than the budget {budget}")
        n_filler = int(n_filler * budget / len(ids) * 0.95)


def qa_turns(tokenizer, prompt: prompts.KVzipPrompt, sample: Sample) -> list[tuple[list[int], list[int]]]:
    """(question turn ids, answer ids ending in <|eot_id|>) for each question of the sample.

    An answer is encoded as it appears in the context, after the context's separator: byte-level BPE gives " Zoe"
    and "Zoe" unrelated tokens ("Z", "oe"), so an answer starting a line would have to re-spell each name instead
    of copying it."""
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    return [
        (prompts.encode_question(tokenizer, prompt, qa.question),
         [*encode_text(tokenizer, sample.separator + qa.answer), eot])
        for qa in sample.qa
    ]


def _pad(ids: list[int], weights: list[float], seq_len: int, pad_id: int) -> Encoded:
    if len(ids) > seq_len:
        raise ValueError(f"example of {len(ids)} tokens exceeds seq_len {seq_len}")
    n = seq_len - len(ids)
    return Encoded(np.asarray(ids + [pad_id] * n, np.int32), np.asarray(weights + [0.0] * n, np.float32))


def make_example(tokenizer, prompt: prompts.KVzipPrompt, seed: int, index: int, seq_len: int) -> Encoded:
    """Training example `index` of stream `seed`, `seq_len` tokens long."""
    rng = np.random.default_rng([seed, index, 1])
    task = TASKS[int(rng.integers(len(TASKS)))]
    prefix = list(prompt.prefix_ids)
    if rng.random() < REPEAT_FRACTION:
        chunk = int(rng.choice(CHUNK_SIZES))
        head = max(len(prompt.first_repeat_ids), len(prompt.later_repeat_ids) + prompts.DEFAULT_ANCHOR)
        budget = seq_len - len(prefix) - head - len(prompt.postfix_ids) - min(chunk, seq_len // 4)
        _, ctx = fit_sample(tokenizer, seed, index, task, budget, rng)
        pieces = prompts.repeat_inputs(prompt, ctx, chunk_size=min(chunk, seq_len // 4))
        piece = pieces[int(rng.integers(len(pieces)))]
        ids = prefix + ctx + list(piece.ids)
        weights = [0.0] * len(prefix) + [CONTEXT_WEIGHT] * len(ctx)
        weights += [0.0] * piece.chunk_offset + [1.0] * piece.length
        return _pad(ids, weights, seq_len, tokenizer.pad_token_id)
    # Leave room for at least two question turns (question + restated answer: <= 44 tokens for these tasks); the
    # loop below adds as many as fit, so short curriculum sequences get short contexts and fewer questions.
    sample, ctx = fit_sample(tokenizer, seed, index, task, seq_len - len(prefix) - 2 * QA_TURN_TOKENS, rng)
    ids, weights = prefix + ctx, [0.0] * len(prefix) + [CONTEXT_WEIGHT] * len(ctx)
    for question, answer in qa_turns(tokenizer, prompt, sample):
        if len(ids) + len(question) + len(answer) > seq_len:
            break
        ids += question + answer
        weights += [0.0] * len(question) + [1.0] * len(answer)
    return _pad(ids, weights, seq_len, tokenizer.pad_token_id)


INDUCTION_ANCHOR, INDUCTION_COPY = 8, 32  # the warm-up's anchor and copied span (as scripts/probe_copy_learning.py)


def make_induction_example(tokenizer, seed: int, index: int, seq_len: int) -> Encoded:
    """The warm-up: ``<bos> ‖ random ids ‖ <|eot_id|> ‖ 8 ids from a random place in them ‖ the 32 that followed``.

    Only a look-up-and-copy (induction) circuit predicts the last 32 ids, and the ids are uniformly random (not
    words, whose syllable tokens repeat), so nothing else lowers the loss. scripts/probe_copy_learning.py trains on
    these alone; on 48-96 random ids the circuit formed within 300-400 steps in most of its runs, and near step 350
    in the demo model's run, while in KVzip's prompt format (system prefix, repeat prompts) it formed far more
    slowly. Every task (the answers' value follows
    the same words as in the context) and KVzip's reconstruction then build on it. The ids need not decode to
    text: the model learns ids."""
    n_ctx = seq_len - 2 - INDUCTION_ANCHOR - INDUCTION_COPY
    if n_ctx < INDUCTION_ANCHOR + INDUCTION_COPY:
        need = INDUCTION_ANCHOR + INDUCTION_COPY
        raise ValueError(f"seq_len {seq_len} leaves {n_ctx} random ids for an induction example; need >= {need} "
                         f"(seq_len >= {2 * need + 2})")
    rng = np.random.default_rng([seed, index, 3])
    first_regular = len(SPECIAL_TOKENS)  # the BPE trainer gives the special tokens the first ids
    ctx = rng.integers(first_regular, len(tokenizer), n_ctx).tolist()
    start = int(rng.integers(0, n_ctx - INDUCTION_ANCHOR - INDUCTION_COPY + 1))
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    ids = [tokenizer.bos_token_id, *ctx, eot, *ctx[start : start + INDUCTION_ANCHOR + INDUCTION_COPY]]
    weights = [0.0] * (len(ids) - INDUCTION_COPY) + [1.0] * INDUCTION_COPY
    return _pad(ids, weights, seq_len, tokenizer.pad_token_id)


def batches(tokenizer, prompt: prompts.KVzipPrompt, seed: int, batch_size_at, seq_len_at, warmup_steps: int = 0):
    """A Grain MapDataset whose item `step` is the batch of that step: dict(ids [B, S], weights [B, S]).

    `seq_len_at(step)` and `batch_size_at(step)` give each step's shape (the length curriculum). Example indices
    are (step, row) pairs, so shapes may change between steps without reusing an example; random access by step
    is what makes resuming exact. The first `warmup_steps` steps are induction examples over random ids only."""
    import grain

    def build(step: int) -> dict[str, np.ndarray]:
        seq_len, batch_size = seq_len_at(step), batch_size_at(step)
        if step < warmup_steps:
            rows = [make_induction_example(tokenizer, seed, (step << 8) + r, seq_len) for r in range(batch_size)]
        else:
            rows = [make_example(tokenizer, prompt, seed, (step << 8) + r, seq_len) for r in range(batch_size)]
        return {"ids": np.stack([r.ids for r in rows]), "weights": np.stack([r.weights for r in rows])}

    return grain.MapDataset.range(1 << 30).map(build)


HELDOUT_SEED = 1_000_003  # never used for training (training streams use the run's seed, 0 by default)


def heldout_samples(tokenizer, n_per_task: int, budget: int, seed: int = HELDOUT_SEED):
    """Held-out evaluation samples: (task, sample, context ids), `n_per_task` of each task, deterministic by seed.

    Contexts are as long as `budget` allows: the filler starts at a full budget's worth and shrinks until it fits."""
    out = []
    for t, task in enumerate(TASKS):
        for i in range(n_per_task):
            rng = np.random.default_rng([seed, t, i])
            index = int(rng.integers(1 << 30))
            n_filler = budget // TOKENS_PER_FILLER
            while True:
                sample = make_sample(seed, index, task, n_filler)
                ids = encode_text(tokenizer, sample.context)
                if len(ids) <= budget:
                    break
                n_filler = int(n_filler * budget / len(ids) * 0.97)
            out.append((task, sample, ids))
    return out
