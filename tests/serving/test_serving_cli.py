"""`serving-jax serve` as users start it: a real server process on 127.0.0.1, asked through the openai client, then
stopped; and its bad options, each refused with one line that names the value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from serving_testutil import free_port, png_data_uri, stop_server, wait_until_healthy, wav_base64

from moka_jax.demo import held_out_samples
from serving.cli import main

openai = pytest.importorskip("openai")


@pytest.mark.parametrize("argv, message", [
    (["--devices", "0"], "--devices must be >= 1, got 0"),
    (["--port", "70000"], "--port 70000 is not a TCP port"),
    (["--devices", "3", "--tp", "2"], "--devices 3 does not divide into instances of --tp 2 devices"),
    (["--policy", "static_epd", "--split", "1,x"], "--split '1,x' must be 5 comma-separated integers"),
    (["--model", "moka-demo", "--dtype", "bfloat16"], "the MokA demo is served in float32"),
    (["--model", "no/such/dir"], "no/such/dir"),
    (["--cost-profile", "nope"], "unknown cost profile 'nope'"),
    (["--ray-timeout", "0"], "--ray-timeout must be > 0, got 0.0"),
])
def test_bad_options_exit_2_with_one_line_naming_the_value(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the CLI sets it; put it back after
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("serving-jax: error:") and message in err[-1]


def test_an_unknown_policy_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--policy", "round_robin"])
    assert e.value.code == 2 and "invalid choice: 'round_robin'" in capsys.readouterr().err


def test_serve_the_moka_demo_and_ask_it_about_a_picture_and_a_sound():
    # a held-out sample the demo answers right ("how many shapes and beeps are there in total?" -> "two"); that the
    # engine's answers are the demo's own is checked in-process (test_engine_moka.py)
    sample = held_out_samples(1, start=5)[0]
    expected = sample.answer
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    server = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", "--model", "moka-demo", "--devices",
                               "1", "--no-warmup", "--max-model-len", "128", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(server, port, timeout=180)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["moka-avqa-demo"]
        content = [{"type": "image_url", "image_url": {"url": png_data_uri(sample.image)}},
                   {"type": "input_audio", "input_audio": {"data": wav_base64(sample.audio), "format": "wav"}},
                   {"type": "text", "text": sample.question}]
        stream = client.chat.completions.create(model="moka-avqa-demo", max_tokens=6, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": content}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == expected
    finally:
        stop_server(server)
