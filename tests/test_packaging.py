"""The names we ship must never shadow or overwrite another distribution, and transformers must keep working next to us.

transformers (>= 5.25) requires the Hugging Face hub package `kernels` and imports it while loading any model. Our
kernels once lived in a top-level package of that same name: from the repo root ours shadowed theirs, and a wheel
install wrote our `kernels/__init__.py` over theirs. These tests check behaviour, not version lookups:

- every top-level package we ship imports, then transformers builds, runs and generates with a tiny model, in a fresh
  process started from the repo root and from another directory;
- a non-editable wheel of the project installed into a scratch virtualenv that already holds the hub `kernels` (and
  sees transformers) leaves every file of `kernels` byte-identical and transformers working;
- no top-level name in our wheel is a top-level name of any other installed distribution.

The packages we ship are read from pyproject.toml, so these tests judge whatever layout the tree has.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_KERNELS = "kernels"  # the hub distribution (and import name) that transformers requires

TRANSFORMERS_SMOKE = textwrap.dedent(
    """
    import importlib, importlib.util, json, sys
    ours = sys.argv[1].split(",")
    origins = {name: importlib.import_module(name).__file__ for name in ours}  # ours first, as a user would
    import torch, transformers
    import transformers.integrations.hub_kernels  # imports the hub `kernels` whenever it is installed

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    spec = importlib.util.find_spec("kernels")
    print(json.dumps({
        "origins": origins,
        "kernels_origin": spec.origin if spec else None,
        "logits_shape": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "generated_len": int(generated.shape[1]),
    }))
    """
)


def our_top_level_packages() -> list[str]:
    """The top-level import names pyproject.toml ships (setuptools' own package discovery over its patterns)."""
    import setuptools

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = setuptools.find_packages(REPO, include=include)
    return sorted({p.split(".")[0] for p in packages})


def hub_kernels_files() -> dict[str, str]:
    """sha256 of every file the installed hub `kernels` distribution owns (from its RECORD), keyed by RECORD path."""
    dist = importlib.metadata.distribution(HUB_KERNELS)
    hashes = {}
    for path in dist.files or []:
        if path.suffix == ".pyc" or path.parts[0].startswith(".."):  # bytecode caches and the console script
            continue
        with open(path.locate(), "rb") as f:
            hashes[str(path)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def run_smoke(python: str, cwd: str, packages: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run(
        [python, "-c", TRANSFORMERS_SMOKE, ",".join(packages)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        f"transformers failed after importing our packages {packages} (cwd {cwd}):\n{result.stderr[-4000:]}"
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_transformers_ran(report: dict):
    assert report["logits_shape"] == [1, 4, 64]
    assert report["logits_finite"]
    assert report["generated_len"] == 6


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_hub_kernels_package_is_installed():
    """The guards below mean something only where transformers' hub `kernels` is present, as the set-up installs."""
    assert hub_kernels_files(), f"the hub distribution `{HUB_KERNELS}` is not installed; the set-up should install it"


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_transformers_runs_after_importing_all_our_packages(where, tmp_path):
    packages = our_top_level_packages()
    assert "kvzip_jax" in packages
    cwd = REPO if where == "repo_root" else str(tmp_path)
    # From elsewhere our packages come from the project's installation (editable in the dev set-up).
    report = run_smoke(sys.executable, cwd, packages, clean_env())
    assert_transformers_ran(report)
    for name, origin in report["origins"].items():
        assert os.path.realpath(origin).startswith(os.path.realpath(REPO)), f"{name} was imported from {origin}"
    hub_origin = os.path.realpath(importlib.metadata.distribution(HUB_KERNELS).locate_file("kernels/__init__.py"))
    assert os.path.realpath(report["kernels_origin"]) == hub_origin, (
        f"`import kernels` found {report['kernels_origin']}, not the hub package at {hub_origin}"
    )


def test_no_top_level_name_we_ship_belongs_to_another_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    ours = {"kvzip-jax", "kvzip_jax"}
    clashes = {name: owners[name] for name in our_top_level_packages() if set(owners.get(name, [])) - ours}
    assert not clashes, f"top-level names we ship that other installed distributions also ship: {clashes}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: setuptools comes from the locked environment, so the test needs no network.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), REPO],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (path,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    return path


def wheel_top_level_names(wheel_path: str) -> set[str]:
    with zipfile.ZipFile(wheel_path) as z:
        return {n.split("/")[0] for n in z.namelist() if "/" in n and ".dist-info/" not in n and ".data/" not in n}


def test_wheel_ships_exactly_our_packages(wheel):
    assert wheel_top_level_names(wheel) == set(our_top_level_packages())


def test_wheel_install_leaves_hub_kernels_untouched_and_transformers_working(wheel, tmp_path):
    """Install the wheel, non-editable, into a scratch virtualenv whose own site-packages already holds a copy of the
    hub `kernels` (its files and dist-info, so pip sees it installed there) and which sees this environment's
    transformers and torch after its own packages. Then every hub file must be unchanged and transformers must run."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    scratch_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()

    # The hub `kernels`, as installed here, copied into the scratch site-packages.
    dist = importlib.metadata.distribution(HUB_KERNELS)
    for path in dist.files or []:
        if path.parts[0].startswith(".."):
            continue
        dest = os.path.join(scratch_site, str(path))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(path.locate(), dest)
    before = {p: hashlib.sha256(open(os.path.join(scratch_site, p), "rb").read()).hexdigest()
              for p in hub_kernels_files()}
    # Everything else (transformers, torch, jax, ...) from this environment, searched after the scratch packages.
    with open(os.path.join(scratch_site, "zz_parent_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    # This environment's pip installs into the scratch interpreter's site-packages (pip >= 22.3 `--python`).
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        capture_output=True, text=True, timeout=300, env=clean_env(),
    )
    assert install.returncode == 0, install.stderr[-4000:]

    after = {p: hashlib.sha256(open(os.path.join(scratch_site, p), "rb").read()).hexdigest() for p in before}
    changed = sorted(p for p in before if before[p] != after[p])
    assert not changed, f"installing our wheel overwrote files of the hub `kernels`: {changed}"

    packages = sorted(wheel_top_level_names(wheel))
    report = run_smoke(python, str(tmp_path), packages, clean_env())
    assert_transformers_ran(report)
    for name, origin in report["origins"].items():
        assert os.path.realpath(origin).startswith(os.path.realpath(scratch_site)), f"{name} came from {origin}"
    assert os.path.realpath(report["kernels_origin"]) == os.path.realpath(
        os.path.join(scratch_site, "kernels", "__init__.py")
    )
