"""Train the small demo model: Grain batches, Optax AdamW, Orbax checkpoints that resume exactly, a progress bar,
a JSONL loss log, and an HF-format Llama checkpoint (config.json + safetensors + tokenizer) at the end.

The learning rate is a linear warmup, then constant, then a linear cool-down to 0 over the last `cooldown_steps`
steps (docs/benchmarks.md measures what it adds). Until the cool-down starts it does not depend on the total
number of steps, so a run may be extended (`--steps` larger, same output directory) exactly as a longer straight
run would go, as long as its cool-down had not started; `train` refuses otherwise. Batches are a
pure function of (seed, step) (see `kvzip_jax.train.data`), parameters and optimizer state come back from Orbax,
so a resumed run reproduces a straight run bit for bit on the same machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvzip_jax.config import ModelConfig
from kvzip_jax.models.decoder import forward, init_params


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (saved next to them as train_config.json)."""

    seed: int = 0
    steps: int = 3000
    cooldown_steps: int = 400  # the learning rate falls linearly to 0 over the last cooldown_steps steps
    tokens_per_step: int = 4096  # batch size = tokens_per_step // the step's sequence length
    # The length curriculum. Look-up-and-copy (the induction circuit every task and KVzip's scoring rely on)
    # forms within a few hundred steps on short contexts and not at all in 500+ steps on long ones (attention
    # spread over many keys gives it almost no gradient at first; scripts/probe_copy_learning.py measures this),
    # so training starts short: `seq_len_stages` is "step:length,..." (each from its step on), and from
    # `long_after` on every `long_every`-th step is at the full context the model ships with.
    seq_len_stages: str = "0:90,200:138,400:256,1000:320,1500:384"
    long_seq_len: int = 1024
    long_after: int = 1500
    long_every: int = 4
    # Induction over random ids only, first (data.make_induction_example: 48 then 96 random ids at the default
    # lengths above, where scripts/probe_copy_learning.py saw the circuit form soonest).
    induction_warmup_steps: int = 400
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    vocab_size: int = 1024
    tokenizer_samples: int = 2000
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    checkpoint_every: int = 100

    def __post_init__(self):
        stages = self.length_stages()
        if not stages or stages[0][0] != 0 or any(a[0] >= b[0] for a, b in itertools.pairwise(stages)):
            raise ValueError(f"seq_len_stages {self.seq_len_stages!r}: need 'step:length,...' starting at step 0 "
                             "with increasing steps")
        if not 0 <= self.cooldown_steps <= self.steps - self.warmup_steps:
            raise ValueError(f"cooldown_steps {self.cooldown_steps} must be in [0, steps - warmup_steps = "
                             f"{self.steps - self.warmup_steps}]")
        from kvzip_jax.train.data import INDUCTION_ANCHOR, INDUCTION_COPY

        min_warmup_len = 2 * (INDUCTION_ANCHOR + INDUCTION_COPY) + 2
        if any(length < min_warmup_len for start, length in stages if start < self.induction_warmup_steps):
            raise ValueError(f"seq_len_stages {self.seq_len_stages!r}: the induction warm-up (its first "
                             f"{self.induction_warmup_steps} steps) needs sequences of >= {min_warmup_len} tokens")
        if any(length > self.long_seq_len for _, length in stages):
            raise ValueError(f"seq_len_stages {self.seq_len_stages!r}: a length exceeds long_seq_len "
                             f"{self.long_seq_len}")

    def length_stages(self) -> list[tuple[int, int]]:
        try:
            return [(int(a), int(b)) for a, b in (part.split(":") for part in self.seq_len_stages.split(","))]
        except ValueError:
            raise ValueError(f"seq_len_stages {self.seq_len_stages!r}: need 'step:length,...'") from None

    def seq_len_at(self, step: int) -> int:
        if step >= self.long_after and step % self.long_every == self.long_every - 1:
            return self.long_seq_len
        return [length for start, length in self.length_stages() if start <= step][-1]

    def batch_size_at(self, step: int) -> int:
        return max(1, self.tokens_per_step // self.seq_len_at(step))

    def model_hf_dict(self, tokenizer) -> dict:
        """The HF LlamaConfig dict of the model (grouped-query attention, tied embeddings)."""
        return dict(
            architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=len(tokenizer),
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=1e-5, hidden_act="silu",
            rope_theta=self.rope_theta, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup, constant, then (when cooldown_steps > 0) linear to 0 at step `steps`."""
    schedules = [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
                 optax.constant_schedule(cfg.learning_rate)]
    boundaries = [cfg.warmup_steps]
    if cfg.cooldown_steps:
        schedules.append(optax.linear_schedule(cfg.learning_rate, 0.0, cfg.cooldown_steps))
        boundaries.append(cfg.steps - cfg.cooldown_steps)
    return optax.join_schedules(schedules, boundaries)


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate(cfg)
    # No weight decay on norm scales (leaves named "scale", stacked over layers or not): decaying them pulls the
    # RMSNorm gains toward 0.
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "scale" not in jax.tree_util.keystr(path), params)

    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def weighted_loss(params, ids, weights, *, config: ModelConfig):
    """Weighted next-token cross entropy: weights[t] applies to predicting ids[t] from ids[:t]."""
    b, s = ids.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    logits, _ = forward(params, ids, positions, None, config=config)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = weights[:, 1:]
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == ids[:, 1:]) & (w >= 1.0)
    return (nll * w).sum() / jnp.maximum(w.sum(), 1.0), correct.sum() / jnp.maximum((w >= 1.0).sum(), 1)


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation):
    @jax.jit
    def step(params, opt_state, ids, weights):
        (loss, acc), grads = jax.value_and_grad(lambda p: weighted_loss(p, ids, weights, config=config),
                                                has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    return step


def train(out_dir: str, cfg: TrainConfig, *, log_every: int = 10) -> str:
    """Train (or resume) into `out_dir`; returns the path of the exported HF checkpoint (`out_dir`/model)."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from kvzip_jax.kvzip import prompts
    from kvzip_jax.models.hf_io import save_params
    from kvzip_jax.train import data
    from kvzip_jax.train.tokenizer import build_tokenizer, corpus

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    saved_cfg = os.path.join(out_dir, "train_config.json")
    saved_steps = None
    if os.path.exists(saved_cfg):
        previous = json.load(open(saved_cfg))
        saved_steps = previous.pop("steps")
        now = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "steps"}
        if previous != now:
            diff = {k: (previous.get(k), now[k]) for k in now if previous.get(k) != now[k]}
            raise ValueError(f"{out_dir} holds a run with a different configuration (saved, requested): {diff}")
    checkpoints = os.path.join(out_dir, "checkpoints")
    done = ocp.CheckpointManager(checkpoints).latest_step() if os.path.isdir(checkpoints) else None
    # Steps already taken must have had the learning rate the requested schedule gives them: true only before both
    # schedules' cool-downs (and never for a run already past the requested end).
    if saved_steps not in (None, cfg.steps) and done is not None \
            and done > min(saved_steps, cfg.steps) - cfg.cooldown_steps:
        raise ValueError(f"{out_dir} is at step {done} of a {saved_steps}-step schedule; a {cfg.steps}-step run "
                         f"would have had a different learning rate before that step (cool-down over the last "
                         f"{cfg.cooldown_steps} steps), so it cannot be resumed with --steps {cfg.steps}")
    with open(saved_cfg, "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    tokenizer = build_tokenizer(corpus(cfg.seed + 1, cfg.tokenizer_samples), cfg.vocab_size)
    prompt = prompts.build_prompt(tokenizer, "llama")
    config = ModelConfig.from_hf_dict(cfg.model_hf_dict(tokenizer))
    tx = optimizer(cfg)
    params = init_params(config, seed=cfg.seed)
    opt_state = tx.init(params)
    manager = ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state = manager.restore(start, args=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}))
        params, opt_state = state["params"], state["opt_state"]
        print(f"resumed from step {start}")
    dataset = data.batches(tokenizer, prompt, cfg.seed, cfg.batch_size_at, cfg.seq_len_at,
                            cfg.induction_warmup_steps)
    step_fn = make_train_step(config, tx)
    log = open(os.path.join(out_dir, "loss.jsonl"), "a")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", unit="step")
    t0 = time.perf_counter()
    for step in bar:
        batch = dataset[step]
        params, opt_state, loss, acc = step_fn(params, opt_state, jnp.asarray(batch["ids"]),
                                               jnp.asarray(batch["weights"]))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            loss, acc = float(loss), float(acc)
            bar.set_postfix(loss=f"{loss:.3f}", answer_token_acc=f"{acc:.3f}")
            log.write(json.dumps(dict(step=step + 1, loss=loss, answer_token_acc=acc,
                                      seq_len=cfg.seq_len_at(step), elapsed_s=time.perf_counter() - t0)) + "\n")
            log.flush()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            manager.save(step + 1, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}))
    manager.wait_until_finished()
    log.close()
    plot_log(os.path.join(out_dir, "loss.jsonl"), os.path.join(out_dir, "loss.png"))
    model_dir = os.path.join(out_dir, "model")
    save_params(model_dir, config, params)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def plot_log(log_path: str, png_path: str, *, accuracy_key: str = "answer_token_acc",
             loss_label: str = "weighted loss", accuracy_label: str = "answer / copy token accuracy") -> None:
    """Loss and teacher-forced token accuracy (`accuracy_key` of each row) against step, from a JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path)]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(steps, [r["loss"] for r in rows], lw=0.8)
    ax1.set(xlabel="step", ylabel=loss_label, yscale="log")
    ax2.plot(steps, [r[accuracy_key] for r in rows], lw=0.8)
    ax2.set(xlabel="step", ylabel=accuracy_label, ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def param_count(params: nnx.State) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
