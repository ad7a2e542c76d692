"""Does a training run's latest Orbax checkpoint look things up in its context? Teacher-forced answer accuracy per
task on held-out samples: the token accuracy over whole answers, the first token of the looked-up value (answers
restate the question first, then give the value), and whole answers, all with the correct previous tokens fed in.
Cheaper than scripts/eval_demo_model.py (no generation, no compression) and it works mid-run, before any HF
export.

    python scripts/probe_retrieval.py demo_out/train --per-task 16 --budget 250
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the --out directory of scripts/train_demo_model.py")
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--budget", type=int, default=250, help="context tokens per sample at most")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from kvzip_jax.config import ModelConfig
    from kvzip_jax.kvzip import prompts
    from kvzip_jax.models import forward
    from kvzip_jax.models.decoder import init_params
    from kvzip_jax.train import data
    from kvzip_jax.train.tasks import TASKS
    from kvzip_jax.train.tokenizer import build_tokenizer, corpus
    from kvzip_jax.train.trainer import TrainConfig, optimizer

    run = os.path.abspath(args.run_dir)
    with open(os.path.join(run, "train_config.json")) as f:
        cfg = TrainConfig(**json.load(f))
    tok = build_tokenizer(corpus(cfg.seed + 1, cfg.tokenizer_samples), cfg.vocab_size)
    config = ModelConfig.from_hf_dict(cfg.model_hf_dict(tok))
    params = init_params(config, seed=cfg.seed)
    manager = ocp.CheckpointManager(os.path.join(run, "checkpoints"))
    step = manager.latest_step()
    if step is None:
        raise SystemExit(f"no checkpoint under {args.run_dir}/checkpoints")
    state = manager.restore(step, args=ocp.args.StandardRestore(
        {"params": params, "opt_state": optimizer(cfg).init(params)}))
    params = state["params"]
    prompt = prompts.build_prompt(tok, "llama")
    logits_of = jax.jit(lambda ids: forward(params, ids, jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape),
                                            None, config=config)[0])
    print(f"step {step}")
    for task in TASKS:
        rng = np.random.default_rng(0)
        rows, spans = [], []
        for i in range(args.per_task):
            sample, ctx = data.fit_sample(tok, data.HELDOUT_SEED, i, task, args.budget, rng)
            ids, answer_spans = list(prompt.prefix_ids) + ctx, []
            for qa, (question, answer) in zip(sample.qa, data.qa_turns(tok, prompt, sample), strict=True):
                ids += question
                answer_spans.append((len(ids), len(answer), value_offset(tok, sample.separator + qa.answer, qa.value)))
                ids += answer
            rows.append(ids)
            spans.append(answer_spans)
        batch = np.full((len(rows), max(map(len, rows))), tok.pad_token_id, np.int32)
        for r, ids in enumerate(rows):
            batch[r, : len(ids)] = ids
        pred = np.asarray(jnp.argmax(logits_of(jnp.asarray(batch)), -1))
        tokens, first, whole = [], [], []
        for r, answer_spans in enumerate(spans):
            for start, n, value_at in answer_spans:
                ok = [pred[r, t - 1] == batch[r, t] for t in range(start, start + n)]
                tokens += ok
                first.append(ok[value_at])
                whole.append(all(ok))
        print(f"{task:9s} answer tokens {np.mean(tokens):.2f}  first value token {np.mean(first):.2f}  "
              f"whole answers {np.mean(whole):.2f}", flush=True)


def value_offset(tok, answer_text: str, value: str) -> int:
    """Index, among the tokens of `answer_text` (the answer as encoded for the model, with the context's separator
    in front), of the first token of the looked-up value (the answer ends with it)."""
    start = answer_text.rindex(value)
    offsets = tok(answer_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return next(i for i, (a, b) in enumerate(offsets) if b > start and answer_text[a:b].strip())


if __name__ == "__main__":
    main()
