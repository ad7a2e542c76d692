"""Every Python block of the README runs as written, so the README cannot drift from the code.

Each ```python block runs in a fresh namespace inside a scratch folder. The one concession to test time: the
session's already loaded SmolLM2 answers `LanguageModel.from_pretrained("smollm2")` (loading it again would give the
same model; with `mesh=` its params are placed by `shard_params`, as the loader does); every other call loads for
real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks() -> list[tuple[int, str]]:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("line, code", python_blocks(), ids=lambda x: f"line{x}" if isinstance(x, int) else "")
def test_readme_block_runs(line, code, smollm2_lm, tmp_path, monkeypatch):
    from kvzip_jax.lm import LanguageModel
    from kvzip_jax.sharding import shard_params

    _, loaded = smollm2_lm
    real = LanguageModel.from_pretrained.__func__

    def from_pretrained(cls, path, **kwargs):
        if path != "smollm2" or set(kwargs) - {"mesh"}:
            return real(cls, path, **kwargs)
        if kwargs.get("mesh") is None:
            return loaded
        # Loading onto a mesh places each tensor with `shard_params`' rules: the same arrays, sharded.
        return dataclasses.replace(loaded, params=shard_params(loaded.params, kwargs["mesh"]))

    monkeypatch.setattr(LanguageModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().strip(), "the block printed nothing"
