"""`kvzip-jax compress` / `kvzip-jax ask` end to end through `main([...])` on the demo checkpoint (a tiny random
Llama with a real BPE tokenizer and chat template), and the one-line exit-2 errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from kvzip_jax.cli import main

QUESTION = "What does KVzip compress?"


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvzip_jax.demo import DEMO_TEXT, build_checkpoint

    root = tmp_path_factory.mktemp("kvzip_cli")
    build_checkpoint(str(root / "model"))
    (root / "context.txt").write_text(DEMO_TEXT)
    (root / "empty.txt").write_text("  \n")
    return root


@pytest.fixture(scope="module")
def compressed(workdir):
    """One compression (JSON report) shared by the tests below."""
    code, out, err = run([
        "compress", "--model", str(workdir / "model"), "--context", str(workdir / "context.txt"),
        "--ratio", "0.3", "--chunk-size", "48", "--headroom", "48", "--out", str(workdir / "ctx"),
        "--no-progress", "--json",
    ])
    assert code == 0, err
    return workdir / "ctx", json.loads(out)


def test_compress_report(compressed):
    path, report = compressed
    assert os.path.exists(path / "kvzip.json")
    assert report["template"] == "chat"  # the demo tokenizer lacks the llama3 special tokens: auto -> chat
    assert report["n_ctx"] > 48 and report["n_sys"] > 0  # several scoring chunks
    assert report["ratio"] == 0.3
    assert 0 < report["kept_ratio"] <= 0.3
    assert report["kept_kv_bytes"] < report["dense_kv_bytes"]
    assert report["compressed_kv_bytes"] > 0 and report["metadata_bytes"] > 0
    assert report["compression_factor"] == pytest.approx(report["dense_kv_bytes"] / report["compressed_kv_bytes"])
    assert {"prefill_s", "score_s", "compact_s", "save_s"} <= set(report["times"])


def test_ask_answers_are_reproducible(compressed, workdir):
    path, _ = compressed
    argv = ["ask", "--model", str(workdir / "model"), "--compressed", str(path), "--question", QUESTION,
            "--question", QUESTION, "--max-new-tokens", "8"]
    code, out, err = run([*argv, "--json"])
    assert code == 0, err
    report = json.loads(out)
    answers = report["answers"]
    assert len(answers) == 2
    assert all(isinstance(a["answer"], str) and 1 <= a["new_tokens"] <= 8 for a in answers)
    assert answers[0]["answer"] == answers[1]["answer"]  # rolled back between questions
    assert all(a["ms_per_token"] > 0 for a in answers)
    # A second process-level invocation on the same saved context answers identically; plain output too.
    code, text, err = run([*argv[:-4], "--max-new-tokens", "8"])
    assert code == 0, err
    assert text.strip() == answers[0]["answer"].strip()


def _bad(argv: list[str], *needles: str) -> None:
    code, out, err = run(argv)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2"])
def test_bad_ratio(workdir, ratio):
    _bad(["compress", "--model", str(workdir / "model"), "--context", str(workdir / "context.txt"),
          "--ratio", ratio, "--out", str(workdir / "unused")], f"--ratio {float(ratio)}", "(0, 1]")


def test_bad_compress_inputs(workdir, compressed):
    model, ctx = str(workdir / "model"), str(workdir / "context.txt")
    _bad(["compress", "--model", model, "--context", str(workdir / "empty.txt"), "--out", str(workdir / "u")],
         "empty context", "empty.txt")
    _bad(["compress", "--model", model, "--context", str(workdir / "nope.txt"), "--out", str(workdir / "u")],
         "context file not found", "nope.txt")
    _bad(["compress", "--model", str(workdir / "no_model"), "--context", ctx, "--out", str(workdir / "u")],
         "model not found", "no_model")
    _bad(["compress", "--model", str(workdir), "--context", ctx, "--out", str(workdir / "u")],
         "is not a model checkpoint")
    _bad(["compress", "--model", model, "--context", ctx, "--chunk-size", "0", "--out", str(workdir / "u")],
         "--chunk-size 0")
    (workdir / "empty_ids.json").write_text("[]")
    _bad(["compress", "--model", model, "--context-ids", str(workdir / "empty_ids.json"), "--out",
          str(workdir / "u")], "empty context", "empty_ids.json")
    _bad(["compress", "--model", model, "--context", ctx, "--out", str(compressed[0])], "--overwrite",
         str(compressed[0]))


def test_bad_ask_inputs(workdir, compressed):
    model, path = str(workdir / "model"), str(compressed[0])
    _bad(["ask", "--model", model, "--compressed", str(workdir / "missing_ctx"), "--question", QUESTION],
         "missing_ctx")
    long_question = " ".join(["compresses the key value cache"] * 20)
    _bad(["ask", "--model", model, "--compressed", path, "--question", QUESTION, "--question", long_question,
          "--max-new-tokens", "8"], "--question #2", "headroom is 48")
    _bad(["ask", "--model", model, "--compressed", path, "--question", QUESTION, "--max-new-tokens", "0"],
         "--max-new-tokens 0")


def test_usage_errors_exit_2(workdir):
    code, _, err = run(["compress", "--model", str(workdir / "model")])
    assert code == 2 and "required" in err
    assert run(["--help"])[0] == 0


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the weights are loaded: the inputs below must be refused before that."""
    from kvzip_jax.lm import LanguageModel

    def refuse(*_args, **_kwargs):
        raise AssertionError("the weights were loaded before the input was checked")

    monkeypatch.setattr(LanguageModel, "from_pretrained", refuse)


def test_inputs_are_checked_before_the_weights_are_loaded(workdir, compressed, no_weights):
    model, path = str(workdir / "model"), str(compressed[0])
    (workdir / "long.txt").write_text((workdir / "context.txt").read_text() * 60)
    _bad(["compress", "--model", model, "--context", str(workdir / "long.txt"), "--out", str(workdir / "u")],
         "does not fit this model's 2048 positions", "contexts of up to")
    _bad(["compress", "--model", model, "--context", str(workdir / "context.txt"), "--headroom", "2000",
          "--out", str(workdir / "u")], "--headroom 2000", "leave")
    long_question = " ".join(["compresses the key value cache"] * 20)
    _bad(["ask", "--model", model, "--compressed", path, "--question", long_question], "--question #1",
         "headroom is 48")


def test_a_long_context_gets_smaller_chunks(workdir):
    """A context too long for the default 2000-token chunk on the 2048-position demo model is scored in
    128-token multiples, and the report says so."""
    text = (workdir / "context.txt").read_text()
    (workdir / "longer.txt").write_text(text * 12)
    code, out, err = run(["compress", "--model", str(workdir / "model"), "--context", str(workdir / "longer.txt"),
                          "--out", str(workdir / "longer_ctx"), "--no-progress", "--json"])
    assert code == 0, err
    report = json.loads(out)
    # One 2000-token chunk would repeat the whole context after it: more positions than the model has.
    assert report["n_sys"] + 2 * report["n_ctx"] > 2048
    assert report["chunk_size"] % 128 == 0 and report["chunk_size"] < report["n_ctx"]


def test_the_default_model_is_smollm2_and_a_too_long_context_is_refused_before_its_weights(workdir, no_weights):
    from kvzip_jax.smollm2 import SmolLM2NotInstalled, smollm2_gguf

    try:
        smollm2_gguf()
    except SmolLM2NotInstalled as e:
        pytest.skip(str(e))
    (workdir / "very_long.txt").write_text((workdir / "context.txt").read_text() * 90)  # ~10K tokens
    _bad(["compress", "--context", str(workdir / "very_long.txt"), "--out", str(workdir / "u")],
         "does not fit this model's 8192 positions")
