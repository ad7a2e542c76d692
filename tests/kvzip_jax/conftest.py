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
