"""The MokA evidence experiment on the synthetic audio-visual QA task (issue: "Evidence, honestly sized").

Stages, as in the paper's framework (spec section 2), at a size two CPU cores run in under an hour:
0. pre-train the small image and audio encoders (`avqa_model.pretrain_encoders`), then freeze them;
1. projector alignment: the LLM frozen (adapters present but zero, so it is the base model), only the projectors
   train, on image and audio captions;
2. instruction tuning per method and seed: fresh adapters (LoRA, multiple LoRA, uni-modal LoRA, MokA without
   cross-attention, MokA; equal rank) + the stage-1 projectors train on the QA examples;
3. evaluation: greedy generation on the held-out split, exact match per question family, and the paper's
   partial-modality diagnostic (only the image's, or only the sound's, tokens take the adapter path).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from kvzip_jax.kvzip_demo import DEMO_MODEL_DIR
from kvzip_jax.models import audio, vision
from kvzip_jax.models.hf_io import load_params
from kvzip_jax.models.projector import ProjectorConfig
from moka_jax import avqa, avqa_model, checkpoint, cluster, data
from moka_jax import generate as moka_generate
from moka_jax.config import MokAConfig
from moka_jax.context import make_context
from moka_jax.model import apply_moka, merge_text_path
from moka_jax.train import (
    PROJECTOR_PARAMS,
    TRAINABLE,
    AdaptedMultimodalLM,
    TrainConfig,
    make_train_step,
    optimizer,
    split_trainable,
)

METHODS = ("lora", "multi_lora", "unimodal_lora", "moka_no_ca", "moka")
MAX_KEYS = 48  # the longest question span of the task is 40 tokens with the demo tokenizer
ACTIVE = {"all": None, "image only": ("image",), "audio only": ("audio",)}  # the partial-modality diagnostic


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    encoder: avqa_model.EncoderTraining = dataclasses.field(default_factory=avqa_model.EncoderTraining)
    align_steps: int = 300
    tune_steps: int = 250
    batch_size: int = 16
    learning_rate: float = 2e-3
    train_samples: int = 16_000
    test_samples: int = 240
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    cross_attn_weight: float = 1.0
    data_seed: int = 0

    def moka(self, method: str) -> MokAConfig:
        return MokAConfig(method=method, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          cross_attn_weight=self.cross_attn_weight)


def projector_configs(hidden_size: int) -> dict[str, ProjectorConfig]:
    return {"image": ProjectorConfig(in_features=avqa_model.VISION.hidden_size, out_features=hidden_size),
            "audio": ProjectorConfig(in_features=avqa_model.AUDIO.hidden_size, out_features=hidden_size)}


def load_llm(path: str = DEMO_MODEL_DIR):
    return load_params(path)


def build_model(llm, moka: MokAConfig, *, seed: int, projectors: nnx.State | None = None) -> AdaptedMultimodalLM:
    config, params = llm
    model = AdaptedMultimodalLM(config, moka, apply_moka(params, config, moka, seed=seed),
                                projector_configs(config.hidden_size), seed=seed)
    if projectors is not None:
        nnx.update(model.projectors, projectors)
    return model


def model_inputs(batch: dict, encoders: dict, mesh: Mesh | None = None) -> dict:
    """A pipeline batch (numpy) -> the train step's batch: token arrays and the frozen encoders' features. With
    `mesh`, `batch` holds this process's rows, and the arrays are global ones split over the mesh's "data" axis."""
    put = jnp.asarray if mesh is None else (lambda x: cluster.global_batch(x, mesh))
    feats = avqa_model.encode_features(encoders, put(avqa_model.pixels(batch["image"])),
                                       put(avqa_model.log_mel(batch["audio"])))
    return {"tokens": put(batch["tokens"]), "modality_ids": put(batch["modality_ids"]),
            "loss_weights": put(batch["loss_weights"]), "features": feats}


def train_stage(model: AdaptedMultimodalLM, moka: MokAConfig, encoders: dict, *, kind: str, steps: int,
                cfg: ExperimentConfig, seed: int, trainable=TRAINABLE, log: Callable[[dict], None] | None = None,
                checkpoint_dir: str | None = None, checkpoint_every: int = 100, mesh: Mesh | None = None):
    """Train `model`'s `trainable` group for `steps` on `kind` ("qa" | "caption") batches; the model is updated
    in place. Returns the losses of the steps taken. With `checkpoint_dir`, the trainable state, the optimizer
    state and the data iterator are saved every `checkpoint_every` steps, and a run finds its latest checkpoint
    there and resumes from it (taking exactly the steps an uninterrupted run takes).

    `mesh` (`cluster.data_mesh()`): data parallel over its devices, in one process or many; each process reads its
    rows of every batch, the state is replicated, and a checkpoint resumes on any process count. Without it, the
    stage runs on the default device."""
    if mesh is not None and cfg.batch_size % mesh.size:
        raise ValueError(f"batch_size={cfg.batch_size} does not split over the mesh's {mesh.size} devices")
    tokenizer = data.load_demo_tokenizer()
    seq_len = data.max_example_length(tokenizer, n_image_tokens=avqa_model.N_IMAGE_TOKENS,
                                      n_audio_tokens=avqa_model.N_AUDIO_TOKENS, kind=kind)
    seq_len = -(-seq_len // 8) * 8
    dataset = data.make_dataset(tokenizer, seed=seed, num_samples=cfg.train_samples, batch_size=cfg.batch_size,
                                seq_len=seq_len, n_image_tokens=avqa_model.N_IMAGE_TOKENS,
                                n_audio_tokens=avqa_model.N_AUDIO_TOKENS, kind=kind, num_epochs=None,
                                data_seed=cfg.data_seed, **_process_slice(mesh))
    # No remat: at this size activations are small, and recomputing them would cost a quarter of the step.
    train_cfg = TrainConfig(steps=steps, learning_rate=cfg.learning_rate, seed=seed, remat=False)
    tx = optimizer(train_cfg)
    graphdef, params, frozen = split_trainable(model, trainable)
    opt_state = tx.init(params)
    if mesh is not None:  # the optimizer's step counts too: a restored checkpoint keeps its arrays' shardings
        params, frozen, encoders, opt_state = (cluster.replicate(x, mesh) for x in (params, frozen, encoders,
                                                                                    opt_state))
    step_fn = make_train_step(graphdef, tx, train_cfg)
    losses = []
    iterator = iter(dataset)
    start = 0
    if checkpoint_dir is not None and checkpoint.latest_step(checkpoint_dir) is not None:
        start, params, opt_state, data_state = checkpoint.restore_training(checkpoint_dir, params, opt_state)
        iterator.set_state(data_state)
    for i in range(start, steps):
        batch = next(iterator)
        ctx = make_context(moka, batch["modality_ids"], batch["key_mask"], max_keys=MAX_KEYS)
        if mesh is not None:
            ctx = cluster.global_batch(ctx, mesh)
        params, opt_state, loss, acc = step_fn(params, opt_state, frozen, model_inputs(batch, encoders, mesh), ctx,
                                               np.int32(i))
        loss, acc = cluster.host_copy((loss, acc))
        losses.append(float(loss))
        if log is not None:
            log({"step": i + 1, "loss": losses[-1], "token_accuracy": float(acc)})
        if checkpoint_dir is not None and ((i + 1) % checkpoint_every == 0 or i + 1 == steps):
            checkpoint.save_training(checkpoint_dir, i + 1, params, opt_state, iterator.get_state())
    nnx.update(model, params)
    return losses


def _process_slice(mesh: Mesh | None) -> dict:
    return {} if mesh is None else {"process_index": jax.process_index(), "process_count": jax.process_count()}


def encoder_target() -> dict:
    return {"image": vision.abstract_params(avqa_model.VISION), "audio": audio.abstract_params(avqa_model.AUDIO)}


def prepare(cfg: ExperimentConfig, base_dir: str, llm, *, progress: Callable[[str], None] = print,
            mesh: Mesh | None = None):
    """Stages 0 and 1, shared by every method and seed: the frozen encoders and the aligned projectors, loaded
    from `base_dir` when an earlier run saved them there (with the same configuration), else trained and saved.
    With `mesh` the alignment is data parallel (`train_stage`); over many processes every process pre-trains the
    same encoders (deterministic, no collectives), and process 0 alone writes the files."""
    os.makedirs(base_dir, exist_ok=True)
    saved_cfg = os.path.join(base_dir, "stages.json")
    stages = {"encoder": dataclasses.asdict(cfg.encoder), "align_steps": cfg.align_steps,
              "learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size, "data_seed": cfg.data_seed}
    encoders_file, projectors_file = (os.path.join(base_dir, f) for f in ("encoders.safetensors",
                                                                          "projectors.safetensors"))
    if os.path.exists(saved_cfg) and json.load(open(saved_cfg)) != stages:
        raise ValueError(f"{base_dir} holds encoders and projectors trained with other settings: "
                         f"{json.load(open(saved_cfg))} (requested {stages}); use another directory")
    aligned = build_model(llm, cfg.moka("lora"), seed=0)
    if os.path.exists(encoders_file) and os.path.exists(projectors_file):
        encoders = checkpoint.load_state(encoders_file, encoder_target())
        return encoders, checkpoint.load_state(projectors_file, nnx.state(aligned.projectors))
    t0 = time.perf_counter()
    encoders, enc_acc = avqa_model.pretrain_encoders(cfg.encoder, data_seed=cfg.data_seed)
    progress(f"encoders: train accuracy image {enc_acc['image']:.3f} audio {enc_acc['audio']:.3f} "
             f"({time.perf_counter() - t0:.0f} s)")
    losses = train_stage(aligned, cfg.moka("lora"), encoders, kind="caption", steps=cfg.align_steps, cfg=cfg,
                         seed=0, trainable=PROJECTOR_PARAMS, mesh=mesh)
    progress(f"alignment: caption loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f} "
             f"({time.perf_counter() - t0:.0f} s)")
    projectors = nnx.state(aligned.projectors)
    if cluster.is_primary():
        checkpoint.save_state(encoders_file, encoders)
        checkpoint.save_state(projectors_file, projectors)
        with open(saved_cfg, "w") as f:
            json.dump(stages, f, indent=2)
    cluster.barrier("moka: stages 0 and 1 saved")
    return encoders, projectors


def test_prompts(cfg: ExperimentConfig) -> tuple[dict, list[avqa.AVQASample]]:
    """The held-out generation prompts (no answers), stacked, and their samples."""
    tokenizer = data.load_demo_tokenizer()
    seq_len = data.max_example_length(tokenizer, n_image_tokens=avqa_model.N_IMAGE_TOKENS,
                                      n_audio_tokens=avqa_model.N_AUDIO_TOKENS)
    start = data.SPLIT_STARTS["test"]
    samples = [avqa.make_sample(cfg.data_seed, start + i) for i in range(cfg.test_samples)]
    rows = [data.encode_example(tokenizer, s, seq_len=seq_len, n_image_tokens=avqa_model.N_IMAGE_TOKENS,
                                n_audio_tokens=avqa_model.N_AUDIO_TOKENS, include_answer=False) for s in samples]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, samples


def generate_answers(model: AdaptedMultimodalLM, moka: MokAConfig, encoders: dict, prompts: dict, *,
                     batch_size: int = 60, active: Sequence[str] | None = None, max_new_tokens: int = 6) -> list[str]:
    """Greedy answers to stacked generation prompts (`data.encode_example(..., include_answer=False)` or
    `data.encode_question` rows). `active`: the non-text modalities whose tokens take the adapter path (None: all;
    text always does)."""
    tokenizer = data.load_demo_tokenizer()
    eot = data._special_id(tokenizer, "<|eot_id|>")
    decoder = nnx.state(model.decoder)
    merged = merge_text_path(decoder, model.config, moka)  # the decode weights, once for every batch
    active_modalities = None if active is None else (moka.text_modality, *active)
    answers = []
    for begin in range(0, len(prompts["tokens"]), batch_size):
        part = {k: v[begin : begin + batch_size] for k, v in prompts.items()}
        inputs = model_inputs(part, encoders)
        x = model.embed(inputs["tokens"], inputs["modality_ids"], inputs["features"])
        ctx = make_context(moka, part["modality_ids"], part["key_mask"], max_keys=MAX_KEYS,
                           active_modalities=active_modalities)
        out = moka_generate.generate(decoder, model.config, moka, x, part["length"], ctx,
                                     max_new_tokens=max_new_tokens, stop_token_ids=(eot,), merged=merged)
        answers += [tokenizer.decode([t for t in row if t != eot]).strip() for row in out.tokens]
    return answers


def evaluate(model: AdaptedMultimodalLM, moka: MokAConfig, encoders: dict, prompts: dict,
             samples: Sequence[avqa.AVQASample], *, batch_size: int = 60,
             active: Sequence[str] | None = None) -> dict[str, float]:
    """Exact-match accuracy of greedy answers, overall and per family (`active` as in `generate_answers`)."""
    answers = generate_answers(model, moka, encoders, prompts, batch_size=batch_size, active=active)
    right = np.array([a == s.answer for a, s in zip(answers, samples, strict=True)])
    families = np.array([s.family for s in samples])
    scores = {"accuracy": float(right.mean())}
    scores.update({f"accuracy_{f}": float(right[families == f].mean()) for f in avqa.FAMILIES})
    return scores


def run(cfg: ExperimentConfig, out_dir: str, *, progress: Callable[[str], None] = print) -> list[dict]:
    """All stages; writes `out_dir`/results.jsonl (one row per method and seed) and returns the rows."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    llm = load_llm()
    encoders, projectors = prepare(cfg, os.path.join(out_dir, "base"), llm, progress=progress)
    prompts, samples = test_prompts(cfg)
    rows = []
    with open(os.path.join(out_dir, "results.jsonl"), "w") as out:
        for method in cfg.methods:
            for seed in cfg.seeds:
                start = time.perf_counter()
                moka = cfg.moka(method)
                model = build_model(llm, moka, seed=seed, projectors=projectors)
                losses = train_stage(model, moka, encoders, kind="qa", steps=cfg.tune_steps, cfg=cfg, seed=seed)
                row = {"method": method, "seed": seed, "final_loss": float(np.mean(losses[-20:])),
                       "train_s": time.perf_counter() - start}
                for name, active in ACTIVE.items():
                    scores = evaluate(model, moka, encoders, prompts, samples, active=active)
                    if name == "all":
                        row.update(scores)
                    else:
                        row[f"accuracy ({name})"] = scores["accuracy"]
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                progress(f"{method} seed {seed}: accuracy {row['accuracy']:.3f} "
                         f"({time.perf_counter() - t0:.0f} s)")
    return rows
