"""`moka-jax` rejects bad input with one line and status 2, before any model is loaded."""

from __future__ import annotations

import json

import pytest

from moka_jax import cli


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--work", "W", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["train", "--work", "W", "--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["eval", "--work", "nowhere", "--method", "lora"], "no run at nowhere/lora-seed0: train it first"),
    (["export", "--work", "nowhere", "--out", "x"], "no run at nowhere/moka-seed0"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moka-jax: error: ") and message in err and err.count("\n") == 1


def test_an_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--work", "W", "--method", "dora"])
    assert e.value.code == 2
    assert "invalid choice: 'dora'" in capsys.readouterr().err


def test_the_training_plot_is_written(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": i, "loss": 3.0 / i, "token_accuracy": i / 10}) + "\n"
                           for i in range(1, 10)))
    cli.plot_metrics(str(log), str(tmp_path / "training.png"))
    assert (tmp_path / "training.png").stat().st_size > 1000


def test_methods_listed_for_the_parser_are_the_library_s():
    from moka_jax.config import METHODS

    assert set(cli.METHODS) == set(METHODS)
