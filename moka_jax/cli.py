"""`moka-jax`: fine-tune the shipped demo LLM on the synthetic audio-visual QA task with MokA or a baseline.

    moka-jax train  --work DIR [--method moka] [--seed 0] [--steps 250] [...]   stages 0-2, resumable
    moka-jax eval   --work DIR [--method moka] [--seed 0] [--samples 240] [--json]
    moka-jax export --work DIR [--method moka] [--seed 0] --out OUT_DIR
    moka-jax demo   [--samples 12] [--model DIR]     the shipped trained demo model on held-out questions

Many processes, one job (multi-controller JAX, data parallel over every process's devices): run `train` once per
process with `--coordinator HOST:PORT --num-processes N --process-id I` (or `--cluster-auto` where JAX detects the
job: SLURM, Open MPI, Kubernetes, TPU pods), the same `--work` directory on a shared file system. `--cpu-devices K`
gives a CPU process K devices. The global batch, hence the training, is the same for any process count.

`DIR/base` holds the encoders and aligned projectors (stages 0-1, trained once and shared by every run);
`DIR/<method>-seed<k>` one instruction-tuning run: Orbax checkpoints (an interrupted `train` resumes where it
stopped), `metrics.jsonl`, `training.png` and the exported adapter (`adapter/`: safetensors + JSON).
Bad input prints one line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

METHODS = ("lora", "multi_lora", "unimodal_lora", "moka_no_ca", "ca_only", "moka")  # == moka_jax.config.METHODS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moka-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "eval", "export"):
        p = sub.add_parser(name)
        p.add_argument("--work", required=True, help="the experiment directory")
        p.add_argument("--method", default="moka", choices=METHODS)
        p.add_argument("--seed", type=int, default=0)
        if name == "train":
            p.add_argument("--steps", type=int, default=250, help="instruction-tuning steps")
            p.add_argument("--encoder-steps", type=int, default=400)
            p.add_argument("--encoder-samples", type=int, default=4096, help="stage 0's labelled pictures and sounds")
            p.add_argument("--align-steps", type=int, default=300)
            p.add_argument("--batch-size", type=int, default=16)
            p.add_argument("--lr", type=float, default=2e-3)
            p.add_argument("--checkpoint-every", type=int, default=100)
            p.add_argument("--coordinator", help="HOST:PORT of process 0 (many processes; with the next two)")
            p.add_argument("--num-processes", type=int)
            p.add_argument("--process-id", type=int)
            p.add_argument("--cluster-auto", action="store_true", help="let JAX find the job in the environment")
            p.add_argument("--cpu-devices", type=int, help="CPU devices of this process")
            p.add_argument("--cluster-timeout", type=int, default=120,
                           help="seconds every process waits for the others to join")
        if name == "eval":
            p.add_argument("--samples", type=int, default=240, help="held-out questions")
            p.add_argument("--json", action="store_true")
        if name == "export":
            p.add_argument("--out", required=True)
    p = sub.add_parser("demo", help="the shipped MokA demo model answering held-out questions")
    p.add_argument("--samples", type=int, default=12, help="held-out questions to ask")
    p.add_argument("--model", default=None, help="a demo directory (default: the shipped one)")
    return parser


def _cluster(args):
    from moka_jax.cluster import ClusterConfig

    return ClusterConfig(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                         auto=args.cluster_auto, cpu_devices=args.cpu_devices, timeout_s=args.cluster_timeout)


def _check(args) -> None:
    for name in ("steps", "encoder_steps", "encoder_samples", "align_steps", "batch_size", "checkpoint_every",
                 "samples"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "lr", 1.0) <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.command == "train":
        _cluster(args)  # its errors name the setting and the value
    if args.command == "demo" and args.model is not None and not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model} is not a directory")
    if args.command in ("eval", "export") and not os.path.isdir(_run_dir(args)):
        raise ValueError(f"no run at {_run_dir(args)}: train it first (moka-jax train --work {args.work} "
                         f"--method {args.method} --seed {args.seed})")


def _run_dir(args) -> str:
    return os.path.join(args.work, f"{args.method}-seed{args.seed}")


def _config(args):
    from moka_jax import avqa_model, experiment

    return experiment.ExperimentConfig(
        encoder=avqa_model.EncoderTraining(steps=getattr(args, "encoder_steps", 400),
                                           samples=getattr(args, "encoder_samples", 4096)),
        align_steps=getattr(args, "align_steps", 300), tune_steps=getattr(args, "steps", 250),
        batch_size=getattr(args, "batch_size", 16), learning_rate=getattr(args, "lr", 2e-3),
        test_samples=getattr(args, "samples", 240))


def _train(args) -> None:
    import jax
    from tqdm import tqdm

    from moka_jax import cluster

    cluster.initialize(_cluster(args))  # before any JAX computation
    from moka_jax import checkpoint, experiment
    from moka_jax.train import split_trainable

    primary = cluster.is_primary()
    cfg = _config(args)
    run_dir = _run_dir(args)
    os.makedirs(run_dir, exist_ok=True)
    mesh = cluster.data_mesh()
    if cfg.batch_size % mesh.size:  # before stages 0-1 start (a resumed job may have another device count)
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over the job's {mesh.size} devices "
                         f"({jax.process_count()} process(es)): use a multiple of {mesh.size}")
    if primary and jax.process_count() > 1:
        print(f"{jax.process_count()} processes, {mesh.size} devices in all; global batch {cfg.batch_size}")
    llm = experiment.load_llm()
    encoders, projectors = experiment.prepare(cfg, os.path.join(args.work, "base"), llm, mesh=mesh,
                                              progress=print if primary else lambda _: None)
    moka = cfg.moka(args.method)
    model = experiment.build_model(llm, moka, seed=args.seed, projectors=projectors)
    checkpoints = os.path.join(run_dir, "checkpoints")
    done = checkpoint.latest_step(checkpoints) or 0
    bar = tqdm(total=cfg.tune_steps, initial=done, desc=f"{args.method} seed {args.seed}", unit="step",
               disable=not primary)
    t0 = time.perf_counter()
    # every process logs its metrics (the same numbers: the loss is global); process 0 writes the shared log
    with open(os.path.join(run_dir, "metrics.jsonl") if primary else os.devnull, "a") as metrics:
        def log(row):
            row["elapsed_s"] = round(time.perf_counter() - t0, 3)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", token_acc=f"{row['token_accuracy']:.3f}")

        experiment.train_stage(model, moka, encoders, kind="qa", steps=cfg.tune_steps, cfg=cfg, seed=args.seed,
                               log=log, checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every,
                               mesh=mesh)
    bar.close()
    _, trainable, _ = split_trainable(model)
    if primary:
        plot_metrics(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "training.png"))
        checkpoint.save_adapter(os.path.join(run_dir, "adapter"), trainable, moka, base_model="kvzip_jax demo_model",
                                seed=args.seed, steps=cfg.tune_steps)
        print(f"adapter: {os.path.join(run_dir, 'adapter')}")
    cluster.barrier("moka: adapter saved")
    cluster.shutdown()


def _load_trained(args):
    from flax import nnx

    from moka_jax import checkpoint, experiment
    from moka_jax.train import split_trainable

    cfg = _config(args)
    adapter_dir = os.path.join(_run_dir(args), "adapter")
    moka = checkpoint.load_adapter_config(adapter_dir)
    llm = experiment.load_llm()
    encoders = checkpoint.load_state(os.path.join(args.work, "base", "encoders.safetensors"),
                                     experiment.encoder_target())
    model = experiment.build_model(llm, moka, seed=args.seed)
    _, target, _ = split_trainable(model)
    nnx.update(model, checkpoint.load_adapter(adapter_dir, target, moka))
    return cfg, moka, model, encoders


def _eval(args) -> None:
    from moka_jax import experiment

    cfg, moka, model, encoders = _load_trained(args)
    prompts, samples = experiment.test_prompts(cfg)
    result = {"method": args.method, "seed": args.seed, "samples": len(samples)}
    for name, active in experiment.ACTIVE.items():
        scores = experiment.evaluate(model, moka, encoders, prompts, samples, active=active)
        result.update(scores if name == "all" else {f"accuracy ({name})": scores["accuracy"]})
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


def _export(args) -> None:
    """The latest training checkpoint's adapter + projectors as safetensors + JSON (also mid-run)."""
    from moka_jax import checkpoint, experiment
    from moka_jax.train import TrainConfig, optimizer, split_trainable

    cfg = _config(args)
    moka = cfg.moka(args.method)
    model = experiment.build_model(experiment.load_llm(), moka, seed=args.seed)
    _, trainable, _ = split_trainable(model)
    opt_state = optimizer(TrainConfig(steps=cfg.tune_steps)).init(trainable)
    step, trainable, _, _ = checkpoint.restore_training(os.path.join(_run_dir(args), "checkpoints"), trainable,
                                                        opt_state)
    checkpoint.save_adapter(args.out, trainable, moka, base_model="kvzip_jax demo_model", seed=args.seed, steps=step)
    print(f"adapter of step {step}: {args.out}")


def _demo(args) -> None:
    """Held-out questions of every family, each answered by the shipped model from its picture and sound."""
    from moka_jax import demo

    model = demo.load_demo(args.model or demo.DEMO_DIR)
    samples = demo.held_out_samples(args.samples)
    answers = model.answer([s.image for s in samples], [s.audio for s in samples], [s.question for s in samples])
    trained = model.manifest.get("training", {})
    print(f"MokA demo ({trained.get('method', '?')}, {trained.get('steps', '?')} steps); held-out questions:")
    for s, a in zip(samples, answers, strict=True):
        print(f"  [{s.family:5}] {s.question:48} reference {s.answer!r:12} answer {a!r:12} "
              f"{'ok' if a == s.answer else 'WRONG'}")
    right = sum(a == s.answer for s, a in zip(samples, answers, strict=True))
    print(f"{right}/{len(samples)} right; on the whole held-out split: {model.manifest.get('held_out', {})}")


def plot_metrics(log_path: str, png_path: str) -> None:
    """Training loss and answer-token accuracy against step, from the JSONL metrics log."""
    from kvzip_jax.train.trainer import plot_log

    plot_log(log_path, png_path, accuracy_key="token_accuracy", loss_label="answer loss",
             accuracy_label="answer token accuracy (teacher-forced)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from moka_jax.cluster import ClusterError

    try:
        _check(args)
        {"train": _train, "eval": _eval, "export": _export, "demo": _demo}[args.command](args)
    except (ValueError, FileNotFoundError, ClusterError) as e:
        print(f"moka-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
