"""The tree stays lint-clean: `ruff check` (rules in pyproject.toml) over the whole repository."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    # ruff is part of the `test` extra (pip install -e '.[test]'); a missing ruff fails here with its import error.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
