"""`serving-jax`: the OpenAI-compatible server on the JAX engine.

    serving-jax serve [--model smollm2|moka-demo|DIR|FILE.gguf] [--devices 2] [--tp 1] [--policy coupled] [...]

Each instance takes --tp devices (1: one device each); on a CPU-only host the CLI exposes --devices host devices.
With --ray ADDRESS the instances run in actors on a Ray cluster's nodes (each on --tp devices of one node; --devices
counts them all) and this process keeps the scheduler and the HTTP front end.
The server binds to 127.0.0.1 unless --host says otherwise. Bad options print one line to stderr and exit with
status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

POLICIES = ("coupled", "static_pd", "static_epd", "elasticmm")
DTYPES = ("float32", "bfloat16")
PAGES_AUTO_REQUESTS = 4
MOKA_DEMO = "moka-demo"  # the default pool holds this many requests of max_model_len tokens


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serving-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible API)")
    s.add_argument("--model", default="smollm2", help="an HF checkpoint directory (a LLaVA one serves images too), "
                   "a .gguf file, 'smollm2' (the default model that `make setup` installs) or 'moka-demo' (the "
                   "shipped MokA audio-visual demo: a picture, a sound and a question per request)")
    s.add_argument("--name", default=None, help="the model name clients send (default: derived from --model)")
    s.add_argument("--devices", type=int, default=2, help="devices to serve on (instances = devices / --tp)")
    s.add_argument("--tp", type=int, default=1, help="devices per instance (tensor parallel: the weights sharded "
                   "over them)")
    s.add_argument("--policy", choices=POLICIES, default="coupled")
    s.add_argument("--n-prefill", type=int, default=1, help="static_pd: prefill instances")
    s.add_argument("--split", default="1,1,1,1,1", help="static_epd: text P,D and multimodal E,P,D instances")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-model-len", type=int, default=2048, help="prompt + generated tokens per request")
    s.add_argument("--page-size", type=int, default=16)
    s.add_argument("--pages", type=int, default=None, help="KV pages per instance (default: room for "
                   f"{PAGES_AUTO_REQUESTS} requests of --max-model-len tokens)")
    s.add_argument("--decode-rows", type=int, default=8, help="continuous-batching slots per instance")
    s.add_argument("--decode-steps", type=int, default=4, help="decode steps per dispatch")
    s.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per request per prefill step")
    s.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond which the server "
                   "answers 429")
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--no-warmup", action="store_true", help="compile on first use instead of at start-up")
    s.add_argument("--contexts-dir", default=None, help="where uploaded KVzip contexts are kept (Orbax) and reloaded "
                   "from at start-up (default: <kvzip-jax cache>/contexts/<model name>)")
    s.add_argument("--cost-profile", default=None, metavar="NAME|FILE.json", help="the cost model the policy "
                   "plans with: a packaged profile (e.g. demo_cpu2_static_pd) or a file that "
                   "scripts/calibrate_profile.py fitted to this engine (default: the simulator's A800 profile)")
    s.add_argument("--ray", default=None, metavar="ADDRESS", help="place the instances on the Ray cluster at "
                   "ADDRESS (host:port of its head, 'auto', or ray://host:port); needs pip install '.[ray]'")
    s.add_argument("--ray-resource", choices=("auto", "GPU", "TPU", "CPU"), default="auto", help="what an "
                   "instance's devices are on the Ray nodes (auto: GPUs, else TPUs; CPU: host devices, one per core)")
    s.add_argument("--ray-timeout", type=float, default=300.0, help="seconds to reach the Ray cluster and start "
                   "every instance actor")
    return parser


def _policy_options(args) -> tuple:
    if args.policy == "static_pd":
        return (("n_prefill", args.n_prefill),)
    if args.policy == "static_epd":
        try:
            split = tuple(int(x) for x in args.split.split(","))
        except ValueError as e:
            raise ValueError(f"--split {args.split!r} must be 5 comma-separated integers") from e
        return (("split", split),)
    return ()


def _check(args) -> None:
    for name in ("devices", "tp", "max_model_len", "page_size", "decode_rows", "decode_steps", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.devices % args.tp:
        raise ValueError(f"--devices {args.devices} does not divide into instances of --tp {args.tp} devices")
    if args.model == MOKA_DEMO and args.dtype != "float32":
        raise ValueError(f"--dtype {args.dtype}: the MokA demo is served in float32, as it was trained")
    if args.ray_timeout <= 0:
        raise ValueError(f"--ray-timeout must be > 0, got {args.ray_timeout}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0-65535)")
    _policy_options(args)  # a malformed --split is refused before anything loads
    if args.cost_profile is not None:
        from serving.costmodel import load_profile

        load_profile(args.cost_profile)  # an unknown name or a bad file, before anything loads


def _expose_host_devices(n: int) -> None:
    """A CPU-only host shows one device unless XLA is told otherwise, before jax starts."""
    flag = "--xla_force_host_platform_device_count"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={n}".strip()


def _fleet(args):
    """The Ray cluster the instances run on (--ray), else None: this host's devices."""
    if args.ray is None:
        return None
    from serving.engine.ray_fleet import RayFleet

    return RayFleet(args.ray, resource=args.ray_resource, timeout_s=args.ray_timeout)


def _serve(args) -> None:
    fleet = _fleet(args)
    if fleet is None:
        _expose_host_devices(args.devices)
    else:
        fleet.connect()  # a cluster that cannot be reached is reported before any weights load
    # The instances' worker threads and the HTTP loop hand the GIL to each other at every step; Python's default
    # 5 ms switch interval would add up to that much to each hand-off (a token's latency).
    sys.setswitchinterval(0.0005)
    import uvicorn

    from kvzip_jax.lm import LanguageModel, cache_dir, enable_compilation_cache, load_config
    from serving.api import create_app
    from serving.context_store import ContextStore
    from serving.engine import Engine, EngineConfig

    if args.model == MOKA_DEMO:
        from moka_jax.demo import load_demo

        demo = load_demo()
        config = demo.model.config
    else:
        llava_config = _llava_config(args.model)
        config = llava_config.text if llava_config is not None else load_config(args.model)  # before any weights
    width = -(-args.max_model_len // args.page_size)
    pages = args.pages or config.num_layers * config.num_kv_heads * width * PAGES_AUTO_REQUESTS + 1
    engine_config = EngineConfig(
        policy=args.policy, policy_options=_policy_options(args), num_instances=args.devices // args.tp,
        page_size=args.page_size, pages_per_instance=pages, decode_rows=args.decode_rows,
        decode_steps=args.decode_steps, prefill_chunk=args.prefill_chunk, max_model_len=args.max_model_len,
        max_waiting=args.max_waiting, warmup=not args.no_warmup, devices_per_instance=args.tp,
        cost_profile=args.cost_profile,
    )
    enable_compilation_cache()
    dtype = None if args.dtype == "float32" else args.dtype
    if args.model == MOKA_DEMO:
        _serve_moka_demo(args, demo, engine_config, fleet)
        return
    modalities = None
    if llava_config is not None:  # a LLaVA checkpoint: the text model serves with its image encoder
        from kvzip_jax.multimodal_lm import MultimodalLM

        mm = MultimodalLM.from_pretrained(args.model, dtype=dtype)
        model, modalities = LanguageModel(mm.config, mm.params, mm.tokenizer), mm.modalities
    else:
        model = LanguageModel.from_pretrained(args.model, dtype=dtype)
    name = args.name or os.path.basename(os.path.normpath(os.fspath(args.model))).removesuffix(".gguf")
    _say_loading(args, name)
    engine = Engine(model.config, model.params, model.tokenizer, engine_config, model_name=name,
                    modalities=modalities, fleet=fleet)
    try:
        contexts = None
        if model.tokenizer is not None:
            directory = args.contexts_dir or os.path.join(cache_dir(), "contexts", name)
            contexts = ContextStore(engine, model, directory)
            print(f"serving-jax: {len(contexts.infos)} KVzip context(s) reloaded from {directory}", file=sys.stderr)
        print(f"serving-jax: {name} at http://{args.host}:{args.port}/v1", file=sys.stderr)
        uvicorn.run(create_app(engine, contexts=contexts), host=args.host, port=args.port, log_level="info")
    finally:
        engine.shutdown()


def _serve_moka_demo(args, demo, engine_config, fleet) -> None:
    """The MokA demo: prefill through its adapters, chat prompts in the layout it was trained on (no KVzip
    contexts: its questions are about a picture and a sound)."""
    import uvicorn

    from serving.api import create_app
    from serving.moka_demo import MODEL_NAME, demo_chat_prompt, demo_engine

    name = args.name or MODEL_NAME
    _say_loading(args, name)
    engine = demo_engine(engine_config, demo=demo, model_name=name, fleet=fleet)
    try:
        print(f"serving-jax: {name} at http://{args.host}:{args.port}/v1", file=sys.stderr)
        app = create_app(engine, chat_prompt=demo_chat_prompt(demo, engine))
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.shutdown()


def _say_loading(args, name: str) -> None:
    where = f", Ray cluster {args.ray}" if args.ray else ""
    print(f"serving-jax: loading {name} onto {args.devices // args.tp} instance(s) of {args.tp} device(s) "
          f"({args.policy}{where}) and compiling ...", file=sys.stderr)


def _llava_config(path: str):
    """The LlavaConfig of a multimodal checkpoint directory (config.json with a vision_config), else None."""
    from kvzip_jax.models.llava import LlavaConfig

    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        hf = json.load(f)
    return LlavaConfig.from_hf_dict(hf) if "vision_config" in hf else None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        _serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"serving-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
