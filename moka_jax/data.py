"""Training examples and a Grain pipeline for the synthetic audio-visual QA task (`moka_jax.avqa`).

One example is laid out like the official AVT prompts, in the demo model's chat format:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n
    This is an image:[IMAGE x n_image]\\nThis is a sound:[AUDIO x n_audio]\\nPlease answer this question: {question}
    <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>

The instruction + question span ("Please answer this question: ...", the AVT code's question_start..question_end)
is the key set of MokA's cross-attention (`key_mask`); the answer and its closing eos carry the loss. Placeholder
positions hold the pad id and their modality (IMAGE / AUDIO): the model swaps their embeddings for encoder
features. Stage-1 caption examples ("Describe the image." / "Describe the sound.") bring one modality only.

Each text segment is tokenized on its own, so the key and answer boundaries are exact token boundaries (the
generation prompt is the same token sequence cut before the answer: `include_answer=False`).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Literal

import grain
import numpy as np

import kvzip_jax
from kvzip_jax.models.llava import AUDIO, IMAGE, PAD, TEXT
from moka_jax import avqa

DEMO_TOKENIZER_PATH = pathlib.Path(kvzip_jax.__file__).parent / "assets" / "demo_model" / "tokenizer.json"
SYSTEM_PROMPT = "Look, listen and answer."  # short: the demo tokenizer spends ~1 token per 3 characters
QA_INSTRUCTION = "Please answer this question: "
CAPTION_INSTRUCTIONS = {"image": "Describe the image.", "audio": "Describe the sound."}
EXAMPLE_KINDS = ("qa", "image_caption", "audio_caption")
# Disjoint sample-index ranges per split; each starts on a multiple of avqa.BALANCE_PERIOD so both stay balanced.
SPLIT_SIZE = avqa.BALANCE_PERIOD * 1000
SPLIT_STARTS = {"train": 0, "test": SPLIT_SIZE}


def load_demo_tokenizer(path: str | pathlib.Path = DEMO_TOKENIZER_PATH):
    """The shipped demo model's tokenizer, via `tokenizers` (no transformers needed)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without added specials; works for `tokenizers.Tokenizer` and transformers tokenizers."""
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(out, "ids", out))


def _special_id(tokenizer, token: str) -> int:
    ids = _ids(tokenizer, token)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer does not have {token!r} as one special token (it encodes to {ids})")
    return ids[0]


def _segments(kind: str, question: str, answer: str | None, n_image_tokens: int,
              n_audio_tokens: int) -> list[tuple[str, str | int]]:
    """The example as (role, text) segments; roles: text, key, answer, eos, and image / audio (a token count)."""
    out: list[tuple[str, str | int]] = [
        ("text", f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM_PROMPT}<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\n"),
    ]
    if kind in ("qa", "image_caption"):
        out += [("text", "This is an image:"), ("image", n_image_tokens), ("text", "\n")]
    if kind in ("qa", "audio_caption"):
        out += [("text", "This is a sound:"), ("audio", n_audio_tokens), ("text", "\n")]
    out += [("key", QA_INSTRUCTION + question if kind == "qa" else CAPTION_INSTRUCTIONS[kind.split("_")[0]]),
            ("text", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")]
    if answer is not None:
        out += [("answer", answer), ("eos", "<|eot_id|>")]
    return out


def _target(sample: avqa.AVQASample, kind: str) -> tuple[str, str]:
    """(instruction-side text, answer) of the example: the question for qa, empty for captions."""
    if kind == "qa":
        return sample.question, sample.answer
    if kind == "image_caption":
        return "", avqa.image_caption(sample)
    if kind == "audio_caption":
        return "", avqa.audio_caption(sample)
    raise ValueError(f"kind must be one of {EXAMPLE_KINDS}, got {kind!r}")


def encode_example(
    tokenizer,
    sample: avqa.AVQASample,
    *,
    seq_len: int,
    n_image_tokens: int,
    n_audio_tokens: int,
    kind: str = "qa",
    include_answer: bool = True,
) -> dict[str, np.ndarray]:
    """One example as fixed-length numpy arrays (right-padded to seq_len; too long is an error, never a cut).

    tokens int32 [T], modality_ids int8 [T], key_mask bool [T], loss_weights float32 [T], image float32 [H, W, 3]
    in [0, 1], audio float32 [n], length int32 (real tokens), prompt_length int32 (tokens before the answer, where
    generation starts), family int8 (index in avqa.FAMILIES; -1 for captions), sample_index int64.
    `include_answer=False` gives the generation prompt (no answer, no loss).
    """
    question, answer = _target(sample, kind)
    arrays = _token_arrays(tokenizer, kind, question, answer if include_answer else None, seq_len=seq_len,
                           n_image_tokens=n_image_tokens, n_audio_tokens=n_audio_tokens,
                           what=f"{kind} example of sample {sample.index}")
    return {
        **arrays,
        "image": sample.image.astype(np.float32) / 255.0,
        "audio": sample.audio.astype(np.float32),
        "family": np.int8(avqa.FAMILIES.index(sample.family) if kind == "qa" else -1),
        "sample_index": np.int64(sample.index),
    }


def encode_question(tokenizer, image: np.ndarray, audio: np.ndarray, question: str, *, seq_len: int,
                    n_image_tokens: int, n_audio_tokens: int) -> dict[str, np.ndarray]:
    """A generation prompt for any picture (float [H, W, 3] in [0, 1]), sound (float [n]) and question, laid out
    exactly as the task's own prompts (`encode_example(..., include_answer=False)`); family and sample_index -1."""
    if not question.strip():
        raise ValueError("the question is empty")
    arrays = _token_arrays(tokenizer, "qa", question, None, seq_len=seq_len, n_image_tokens=n_image_tokens,
                           n_audio_tokens=n_audio_tokens, what=f"question {question!r}")
    return {**arrays, "image": np.asarray(image, np.float32), "audio": np.asarray(audio, np.float32),
            "family": np.int8(-1), "sample_index": np.int64(-1)}


def _token_arrays(tokenizer, kind: str, question: str, answer: str | None, *, seq_len: int, n_image_tokens: int,
                  n_audio_tokens: int, what: str) -> dict[str, np.ndarray]:
    """The token-side arrays of one example: tokens, modality_ids, key_mask, loss_weights, length, prompt_length."""
    if n_image_tokens < 1 or n_audio_tokens < 1:
        raise ValueError(f"n_image_tokens={n_image_tokens} and n_audio_tokens={n_audio_tokens} must be >= 1")
    pad_id = _special_id(tokenizer, "<|pad|>")
    tokens: list[int] = []
    modality: list[int] = []
    keys: list[bool] = []
    weights: list[float] = []
    prompt_length = None
    for role, value in _segments(kind, question, answer, n_image_tokens, n_audio_tokens):
        if role in ("image", "audio"):
            ids = [pad_id] * int(value)
            tag = IMAGE if role == "image" else AUDIO
        else:
            ids = _ids(tokenizer, str(value))
            tag = TEXT
        if role == "answer":
            prompt_length = len(tokens)
        tokens += ids
        modality += [tag] * len(ids)
        keys += [role == "key"] * len(ids)
        weights += [1.0 if role in ("answer", "eos") else 0.0] * len(ids)
    length = len(tokens)
    if length > seq_len:
        raise ValueError(f"{what} needs {length} tokens, more than seq_len={seq_len}")
    pad = seq_len - length
    return {
        "tokens": np.asarray(tokens + [pad_id] * pad, np.int32),
        "modality_ids": np.asarray(modality + [PAD] * pad, np.int8),
        "key_mask": np.asarray(keys + [False] * pad, bool),
        "loss_weights": np.asarray(weights + [0.0] * pad, np.float32),
        "length": np.int32(length),
        "prompt_length": np.int32(length if prompt_length is None else prompt_length),
    }


def max_example_length(tokenizer, *, n_image_tokens: int, n_audio_tokens: int, kind: str = "qa") -> int:
    """The longest example of this kind the task can produce, in tokens (an exact bound: the smallest valid
    seq_len). `kind` is one of EXAMPLE_KINDS or "caption" (either caption)."""
    if kind == "caption":
        return max(max_example_length(tokenizer, n_image_tokens=n_image_tokens, n_audio_tokens=n_audio_tokens,
                                      kind=k) for k in ("image_caption", "audio_caption"))
    if kind == "qa":
        # Per template: its longest phrasing with its longest answer (segments are tokenized independently).
        pairs = [(max((q for _, q in t.phrasings()), key=lambda q: len(_ids(tokenizer, QA_INSTRUCTION + q))),
                  max(t.answers, key=lambda a: len(_ids(tokenizer, a)))) for t in avqa.TEMPLATES]
    elif kind == "image_caption":
        pairs = [("", max(avqa.possible_image_captions(), key=lambda c: len(_ids(tokenizer, c))))]
    elif kind == "audio_caption":
        pairs = [("", max(avqa.possible_audio_captions(), key=lambda c: len(_ids(tokenizer, c))))]
    else:
        raise ValueError(f"kind must be one of {EXAMPLE_KINDS} or 'caption', got {kind!r}")
    return max(
        sum(int(v) if role in ("image", "audio") else len(_ids(tokenizer, str(v)))
            for role, v in _segments(kind, q, a, n_image_tokens, n_audio_tokens))
        for q, a in pairs
    )


def _encode_index(index: int, *, tokenizer, data_seed: int, kind: str, seq_len: int, n_image_tokens: int,
                  n_audio_tokens: int, image_size: int, sample_rate: int, seconds: float) -> dict[str, np.ndarray]:
    sample = avqa.make_sample(data_seed, int(index), image_size=image_size, sample_rate=sample_rate, seconds=seconds)
    if kind == "caption":  # stage 1 alternates the two modalities by index
        kind = "image_caption" if index % 2 == 0 else "audio_caption"
    return encode_example(tokenizer, sample, seq_len=seq_len, n_image_tokens=n_image_tokens,
                          n_audio_tokens=n_audio_tokens, kind=kind)


def make_dataset(
    tokenizer=None,
    *,
    seed: int,
    num_samples: int,
    split: Literal["train", "test"] = "train",
    batch_size: int,
    seq_len: int,
    n_image_tokens: int,
    n_audio_tokens: int,
    kind: Literal["qa", "caption"] = "qa",
    shuffle: bool = True,
    data_seed: int = 0,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    image_size: int = 32,
    sample_rate: int = 16_000,
    seconds: float = 1.0,
    read_options: Any = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """A Grain pipeline of dict batches (the arrays of `encode_example`, stacked on a leading batch axis).

    `data_seed` fixes which samples exist (the synthetic world); `seed` only fixes their order (a global shuffle,
    reshuffled per epoch; `num_epochs=None` repeats forever). Split `train` is sample indices [0, num_samples),
    `test` the same count from SPLIT_SIZE on: disjoint, each answer-balanced. `kind="caption"` alternates image
    and audio captions. `iter(dataset)` is a checkpointable iterator: `get_state()` / `set_state(state)`.

    Many processes (`process_count` > 1): each reads only its rows of every global batch, process p the p-th of
    `process_count` equal slices, so the global batches are those of one process whatever the count. The iterator
    state counts batches, so a checkpoint resumes on another process count.
    """
    if split not in SPLIT_STARTS:
        raise ValueError(f"split must be one of {tuple(SPLIT_STARTS)}, got {split!r}")
    if kind not in ("qa", "caption"):
        raise ValueError(f"kind must be 'qa' or 'caption', got {kind!r}")
    if not 1 <= num_samples <= SPLIT_SIZE:
        raise ValueError(f"num_samples={num_samples} must be in [1, {SPLIT_SIZE}] (the size of a split)")
    if batch_size < 1 or (drop_remainder and num_samples < batch_size):
        raise ValueError(f"batch_size={batch_size} with num_samples={num_samples} gives no full batch")
    if not 0 <= process_index < process_count or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must split evenly over process_count={process_count} "
                         f"(process_index={process_index} must be in [0, {process_count}))")
    if process_count > 1 and num_epochs is not None and (num_samples * num_epochs) % batch_size:
        # a last, partial global batch would give the processes different batch counts, and a collective would hang
        raise ValueError(f"{num_epochs} epoch(s) of {num_samples} samples do not fill whole batches of {batch_size} "
                         f"over {process_count} processes; use num_epochs=None or a multiple of the batch size")
    tokenizer = load_demo_tokenizer() if tokenizer is None else tokenizer
    longest = max_example_length(tokenizer, n_image_tokens=n_image_tokens, n_audio_tokens=n_audio_tokens, kind=kind)
    if seq_len < longest:  # fail here, not at some later batch
        raise ValueError(f"seq_len={seq_len} is shorter than the longest {kind} example ({longest} tokens with "
                         f"{n_image_tokens} image and {n_audio_tokens} audio tokens)")

    start = SPLIT_STARTS[split]
    ds = grain.MapDataset.range(start, start + num_samples)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(functools.partial(
        _encode_index, tokenizer=tokenizer, data_seed=data_seed, kind=kind, seq_len=seq_len,
        n_image_tokens=n_image_tokens, n_audio_tokens=n_audio_tokens, image_size=image_size,
        sample_rate=sample_rate, seconds=seconds,
    ))
    ds = ds.batch(batch_size // process_count, drop_remainder=drop_remainder)
    if process_count > 1:  # consecutive slices of the shuffled stream make one global batch; this process's slice
        ds = ds[process_index::process_count]
    # A few batches ahead on two threads: the work is small numpy, and the machine's cores are shared.
    options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
    return ds.to_iter_dataset(options)
