"""Our top-level `kernels` package must not confuse transformers, which probes an unrelated hub package `kernels`.

transformers' `is_kernels_available()` calls `_is_package_available("kernels", return_version=True)`: it finds our
`kernels` by import spec, then looks up a version under the distribution names that ship `kernels` (ours:
`kvzip-jax`), and reports the hub integration available only for versions in [KERNELS_MIN_VERSION,
KERNELS_MAX_VERSION). So transformers sees "kernels, version <our version>" and must decide it is not usable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os
    import kernels  # ours, imported first as a user of this library would
    import kvzip_jax
    import transformers, torch
    from transformers.utils import import_utils
    from transformers.integrations import hub_kernels  # imports the hub `kernels` only if it thinks it exists

    spec = importlib.util.find_spec("kernels")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    print(json.dumps({
        "kernels_origin": spec.origin,
        "is_kernels_available": import_utils.is_kernels_available(),
        "probe": list(import_utils._is_package_available("kernels", return_version=True)),
        "min": import_utils.KERNELS_MIN_VERSION,
        "max": import_utils.KERNELS_MAX_VERSION,
        "logits_shape": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "generated_len": int(generated.shape[1]),
    }))
    """
)


@pytest.fixture(scope="module")
def probe():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"transformers failed next to our `kernels`:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_our_kernels_package_is_the_one_found(probe):
    assert os.path.realpath(probe["kernels_origin"]) == os.path.realpath(os.path.join(REPO, "kernels", "__init__.py"))


def test_transformers_does_not_take_ours_for_the_hub_kernels(probe):
    assert probe["is_kernels_available"] is False


def test_transformers_runs_a_model_forward_and_generate(probe):
    assert probe["logits_shape"] == [1, 4, 64]
    assert probe["logits_finite"]
    assert probe["generated_len"] == 6


def test_version_attributed_to_kernels_stays_outside_hub_range(probe):
    """Guard: transformers attributes our distribution's version to `kernels`. If kvzip-jax's version ever lands
    in [KERNELS_MIN_VERSION, KERNELS_MAX_VERSION), transformers would import hub symbols (get_kernel,
    LayerRepository, ...) from our package and fail."""
    from packaging import version

    found, reported = probe["probe"]
    assert found is True  # transformers does see a `kernels` module (ours)
    if reported != "N/A":
        v = version.parse(reported)
        assert not (version.parse(probe["min"]) <= v < version.parse(probe["max"])), (
            f"transformers reads `kernels` version {reported}, inside the hub range [{probe['min']}, {probe['max']})"
        )
    import kernels

    for name in ("get_kernel", "LayerRepository", "kernelize"):
        assert not hasattr(kernels, name)


def test_in_process_transformers_with_kernels_imported():
    """The pytest process itself (jax, our kernels, then transformers) can build and run a model."""
    import kernels  # noqa: F401, I001  (I001: ours first, before torch/transformers, is the order under test)
    import torch
    import transformers

    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
