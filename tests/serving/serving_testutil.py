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
