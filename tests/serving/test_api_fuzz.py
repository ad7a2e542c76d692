"""Fuzzing the running server from its own OpenAPI schema (schemathesis): whatever a client sends that the schema
allows or nearly allows, the answer is never a server error (5xx), and the server keeps serving."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

import kvzip_jax
from kvzip_jax.lm import LanguageModel
from serving.api import create_app
from serving.context_store import ContextStore
from serving.engine import Engine, EngineConfig
from serving.server import ServerThread

MODEL = "demo"
# A short context window bounds every generated request's work (max_tokens defaults to what is left of it).
CONFIG = EngineConfig(num_instances=1, page_size=16, pages_per_instance=4096, prefill_chunk=64, max_model_len=96,
                      warmup=False, check_invariants=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lm = LanguageModel.from_pretrained(os.path.join(os.path.dirname(kvzip_jax.__file__), "assets", "demo_model"))
    with Engine(lm.config, lm.params, lm.tokenizer, CONFIG, model_name=MODEL) as engine:
        store = ContextStore(engine, lm, tmp_path_factory.mktemp("contexts"))
        with ServerThread(create_app(engine, contexts=store, max_body_bytes=64 * 1024)) as running:
            yield running, engine


def test_no_request_gets_a_server_error(server):
    running, _ = server
    api = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8  # completions, chat, contexts (4), models, health, metrics
    statuses: dict[str, list[int]] = {}
    count = [0]
    for operation in operations:
        # One hypothesis run per operation (schemathesis' own pytest plugin does the same through a lazy fixture,
        # which this pytest does not support yet).
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def no_server_error(case):
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL  # past the model check (test_api covers unknown models), into the engine
                count[0] += 1
                if count[0] % 2 == 0:  # every other body: the options test_api refuses one by one, made valid
                    for key in ("n", "logprobs", "echo", "suffix", "context_id", "max_tokens",
                                "max_completion_tokens"):
                        case.body.pop(key, None)
                    case.body["max_tokens"] = 4
            response = case.call(timeout=60)
            statuses.setdefault(f"{case.method} {case.path}", []).append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path} {case.body!r:.400} -> {response.status_code}: {response.text[:300]}")
            if response.status_code >= 400:
                body = response.json()
                assert "error" in body and body["error"]["message"], body  # an OpenAI-style error object

        no_server_error()
    # the fuzzing reached the engine: some generated requests were valid and answered
    for path in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert 200 in statuses[path], (path, sorted(set(statuses[path])))


def test_the_server_still_answers_after_the_fuzzing(server):
    running, engine = server
    r = httpx.post(f"{running.url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "The special magic number", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    with engine.lock:
        assert engine.requests == {} and engine.stats.errors == 0
        engine.check_invariants()
