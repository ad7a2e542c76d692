"""Tiny shared fixtures for the serving tests (a plain module: tests/conftest.py belongs to the core package)."""

from serving.costmodel import default_cost_model
from serving.simulator import SimConfig, simulate
from serving.workloads import WorkloadSpec, generate

COST = default_cost_model()


def tiny_spec(**kw):
    base = dict(arrival="poisson", rate=6.0, duration=12.0, dataset="sharegpt4o", seed=7)
    base.update(kw)
    return WorkloadSpec(**base)


def checked_run(policy, spec=None, num_instances=None, **cfg):
    """Run with every spec-6.1 invariant checked after every event; small caches so eviction happens."""
    reqs = generate(spec or tiny_spec(), COST)
    conf = dict(check_invariants=True, prefix_cache_blocks=400, emb_cache_tokens=4000)
    conf.update(cfg)
    return simulate(policy, reqs, COST, num_instances, SimConfig(**conf)), reqs


def png_data_uri(image) -> str:
    """A picture (uint8 [H, W, 3]) as a chat request's `image_url`: a PNG data URI."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(sound, rate: int = 16_000) -> str:
    """A float waveform in [-1, 1] as a chat request's `input_audio` data: base64 of a 16-bit mono WAV."""
    import base64
    import io
    import wave

    import numpy as np

    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(sound, -1, 1) * 32767).astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def tiny_text_model():
    """(config, params) of the tiny random Llama the engine tests serve (no EOS: every answer runs to max_tokens)."""
    from kvzip_jax.config import ModelConfig
    from kvzip_jax.models.decoder import init_params

    cfg = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=None))
    return cfg, init_params(cfg, seed=1)


def random_prompts(lengths, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(server, port: int, timeout: float) -> None:
    """Until the server process on 127.0.0.1:port answers /health (it must not exit meanwhile)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"the server exited:\n{server.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"the server did not come up in {timeout:g} s"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)


def stop_server(server, timeout: float = 30) -> None:
    """Ctrl-C, as a user stops it; killed if it does not exit in time. Asserts a clean exit."""
    import signal
    import subprocess

    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)
    assert server.returncode in (0, -signal.SIGINT), server.stdout.read()[-3000:]
