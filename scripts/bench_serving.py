"""The serving engine under load: throughput, TTFT and TPOT P50 / P90 for coupled, static PD splits and ElasticMM,
each next to the simulator's prediction for the same requests.

    python scripts/bench_serving.py                        # 8 CPU devices, the shipped demo model, ~20 min
    python scripts/bench_serving.py --devices 8 --rate 10 --duration 30 --loads text,mm --out docs/serving_bench.csv

Loads, each steady (Poisson) and bursty (Gamma inter-arrivals, CV 3), open loop (serving.replay):
- text: `cpu_text` sizes, served by the shipped demo model;
- mm: `cpu_mm` (half the requests carry one or two images), served by the demo model with an image encoder: a
  CLIP-style tower (64 x 64 pixels, 8 x 8 patches -> 64 image tokens, 4 layers of width 128, random weights: the
  benchmark measures serving, not answers) and an MLP projector. Policies: coupled, a static PD split, a static
  EPD split (text P, D; multimodal E, P, D) and ElasticMM.
The simulator runs each policy on the calibrated CPU profile of its layout (`demo_cpu2_coupled` for coupled,
`demo_cpu2_static_pd` otherwise; see scripts/calibrate_profile.py) scaled to the instance count. For the mm load
its encode coefficients are refitted from a short calibration replay of another mm workload (seed + 1000) on a
coupled engine, and preprocessing costs nothing (the replay hands the engine preprocessed pixels; a server
preprocesses in its thread pool, outside the engine). On a GPU host the same script runs one instance per GPU (no
profile is calibrated there yet, so the predictions use the CPU profile and say little).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.setswitchinterval(0.0005)  # as serving-jax serve (see scripts/calibrate_profile.py)

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "kvzip_jax", "assets", "demo_model")
FIELDS = ("workload", "policy", "source", "requests", "errors", "throughput_rps", "output_tps", "ttft_p50",
          "ttft_p90", "tpot_p50", "tpot_p90")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loads", default="text,mm", help="comma-separated: text, mm")
    p.add_argument("--out", default="docs/serving_bench.csv")
    args = p.parse_args(argv)
    loads = args.loads.split(",")
    if not loads or set(loads) - {"text", "mm"}:
        print(f"bench_serving: --loads {args.loads!r}: choose from text, mm", file=sys.stderr)
        return 2
    if args.devices < 5 or args.rate <= 0 or args.duration <= 0:
        print("bench_serving: --devices >= 5 (ElasticMM needs 5 roles), --rate and --duration > 0", file=sys.stderr)
        return 2

    import jax
    from tqdm import tqdm

    from kvzip_jax.lm import LanguageModel
    from serving.calibrate import fit_profile
    from serving.costmodel import CostModel, load_profile
    from serving.engine import Engine, EngineConfig
    from serving.policies import make_policy
    from serving.replay import engine_images, replay, simulated_summary
    from serving.simulator import SimConfig, simulate
    from serving.workloads import WorkloadSpec, generate

    if len(jax.devices()) < args.devices:
        print(f"bench_serving: {args.devices} devices asked, {len(jax.devices())} exist", file=sys.stderr)
        return 2
    lm = LanguageModel.from_pretrained(args.model)
    shape = dict(num_instances=args.devices, page_size=16, pages_per_instance=16384, decode_rows=8, decode_steps=4,
                 prefill_rows=4, prefill_chunk=512, max_model_len=640, warmup=True)
    n = args.devices
    text_policies = [("coupled", (), "demo_cpu2_coupled"),
                     (f"static_pd[{n // 4}P]", (("n_prefill", n // 4),), "demo_cpu2_static_pd"),
                     (f"static_pd[{n // 2}P]", (("n_prefill", n // 2),), "demo_cpu2_static_pd"),
                     ("elasticmm_no_cache", (), "demo_cpu2_static_pd")]
    split = _epd_split(n)
    mm_policies = [("coupled", (), "demo_cpu2_coupled"),
                   (f"static_pd[{n // 2}P]", (("n_prefill", n // 2),), "demo_cpu2_static_pd"),
                   (f"static_epd[{','.join(map(str, split))}]", (("split", split),), "demo_cpu2_static_pd"),
                   ("elasticmm_no_cache", (), "demo_cpu2_static_pd")]
    image = _image_modality(lm.config.hidden_size) if "mm" in loads else None
    jobs = []
    for load in loads:
        dataset = "cpu_text" if load == "text" else "cpu_mm"
        for wname, arrival in (("steady", dict(arrival="poisson")), ("bursty", dict(arrival="gamma", cv=3.0))):
            spec = WorkloadSpec(**arrival, rate=args.rate, duration=args.duration, dataset=dataset, seed=args.seed)
            jobs += [(f"{load}-{wname}", spec, pol) for pol in (text_policies if load == "text" else mm_policies)]
    encode = None
    if image is not None:  # the encode stage's coefficients, from a calibration replay of another mm workload
        spec = WorkloadSpec(arrival="poisson", rate=args.rate, duration=min(args.duration, 15.0), dataset="cpu_mm",
                            seed=args.seed + 1000)
        config = EngineConfig(policy="coupled", **{**shape, "num_instances": 2})
        with Engine(lm.config, lm.params, lm.tokenizer, config, model_name="demo",
                    modalities={"image": image}) as engine:
            replay(engine, engine_images(generate(spec, CostModel(load_profile("demo_cpu2_coupled"))),
                                         image.tokens_per_item), seed=args.seed + 1000)
            steps = sum(1 for kind, _, _ in engine.timings if kind == "encode")
            if steps < 4:
                print(f"bench_serving: only {steps} encode steps in the calibration replay; raise --duration or "
                      "--rate", file=sys.stderr)
                return 2
            encode = fit_profile(engine, list(engine.timings), name="encode")["encode"]
        tqdm.write(f"encode calibrated: {encode}")
    rows = []
    for wname, spec, (label, options, profile_name) in tqdm(jobs, desc="bench_serving"):
        prof = copy.deepcopy(load_profile(profile_name))
        prof["num_instances"] = n
        mm = spec.dataset == "cpu_mm"
        if mm:
            prof["encode"].update(encode)
            prof["preprocess"].update(p0_ms=0.0, p1_ms_per_pixel=0.0)
        cost = CostModel(prof)
        tokens_per_image = image.tokens_per_item if mm else 0
        policy = label.split("[")[0]
        config = EngineConfig(policy=policy, policy_options=options, **shape)
        sim = simulate(make_policy(policy, **dict(options)), _workload(spec, cost, tokens_per_image), cost, n,
                       SimConfig(check_invariants=False, decode_steps=config.decode_steps))
        with Engine(lm.config, lm.params, lm.tokenizer, config, model_name="demo",
                    modalities={"image": image} if mm else None) as engine:
            real = replay(engine, _workload(spec, cost, tokens_per_image), seed=args.seed)
            switches = engine.switch_count
        for source, summary in (("engine", real), ("simulator", simulated_summary(sim.requests))):
            row = {"workload": wname, "policy": label, "source": source, **summary.as_dict()}
            rows.append({k: row[k] for k in FIELDS})
        tqdm.write(f"{wname:10s} {label:22s} engine: {real.throughput_rps:5.2f} req/s, TTFT P50/P90 "
                   f"{real.ttft_p50 * 1e3:6.1f}/{real.ttft_p90 * 1e3:6.1f} ms, TPOT P50/P90 "
                   f"{real.tpot_p50 * 1e3:5.1f}/{real.tpot_p90 * 1e3:5.1f} ms, {switches} switches | sim TTFT "
                   f"P50 {rows[-1]['ttft_p50'] * 1e3:6.1f} ms, TPOT P50 {rows[-1]['tpot_p50'] * 1e3:5.1f} ms")
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"results written to {args.out}")
    return 0


def _workload(spec, cost, tokens_per_image: int):
    """The requests of `spec` (fresh objects: the simulator mutates its own), images at the encoder's size."""
    from serving.replay import engine_images
    from serving.workloads import generate

    requests = generate(spec, cost)
    return engine_images(requests, tokens_per_image) if tokens_per_image else requests


def _epd_split(n: int) -> tuple[int, ...]:
    """A static EPD split of n instances (text P, D; multimodal E, P, D) for half multimodal traffic: one encode
    instance, the rest shared between the groups' prefill and decode roughly as their load."""
    text_p, mm_e = 1, 1
    mm_p = max(1, (n - 2) // 3)
    text_d = max(1, (n - text_p - mm_e - mm_p) // 2)
    return text_p, text_d, mm_e, mm_p, n - text_p - text_d - mm_e - mm_p


def _image_modality(hidden: int):
    """A CLIP-style image encoder and projector with random weights, for the demo model's hidden size."""
    from kvzip_jax.models import projector, vision
    from kvzip_jax.multimodal_lm import image_modality

    tower = vision.VisionConfig(model_type=vision.CLIP, hidden_size=128, intermediate_size=256, num_layers=4,
                                num_heads=4, image_size=64, patch_size=8, hidden_act="quick_gelu",
                                layer_norm_eps=1e-5)
    proj = projector.ProjectorConfig(in_features=128, out_features=hidden)
    # the placeholder: the pad id, which the replay's random prompts never hold
    return image_modality(tower, vision.init_params(tower, seed=1), proj, projector.init_params(proj, seed=2),
                          token_id=0)


if __name__ == "__main__":
    sys.exit(main())
