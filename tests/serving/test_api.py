"""The OpenAI-compatible HTTP front end (serving/api.py) on a real uvicorn server, driven by the official `openai`
client and by raw httpx requests: greedy parity with `LanguageModel.generate`, SSE streaming, seeded sampling,
/v1/models, /health, /metrics, client disconnects, OpenAI-style 4xx errors, admission control and 64 concurrent
streaming clients.

The demo model (shipped with the package, tokenizer and chat template included) is served by one two-instance
engine built once for the module, so the jitted steps compile once per device.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import jax
import openai
import pytest

import kvzip_jax
from kvzip_jax.lm import LanguageModel
from serving import api
from serving.api import create_app
from serving.engine import Engine, EngineConfig
from serving.server import ServerThread

MODEL = "demo"
MAX_MODEL_LEN = 512
SHAPE = dict(page_size=16, pages_per_instance=4096, prefill_chunk=64, max_model_len=MAX_MODEL_LEN, warmup=False,
             check_invariants=True)
QUESTIONS = ("What is the capital of France?", "Tell me a story.", "hi")
MAX_TOKENS = 12
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def lm():
    return LanguageModel.from_pretrained(os.path.join(os.path.dirname(kvzip_jax.__file__), "assets", "demo_model"))


@pytest.fixture(scope="module")
def engine(lm):
    eng = Engine(lm.config, lm.params, lm.tokenizer, EngineConfig(num_instances=2, **SHAPE), model_name=MODEL)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def reference(lm):
    """question -> (greedy answer text, prompt tokens, generated tokens), from LanguageModel.generate."""
    ref = {}
    for q in QUESTIONS:
        ids = lm.encode(q, chat=True)
        tokens = lm.generate([ids], max_new_tokens=MAX_TOKENS)[0]
        text = lm.generate([q], chat=True, max_new_tokens=MAX_TOKENS)[0]
        assert text == lm.tokenizer.decode(tokens, skip_special_tokens=True)
        ref[q] = (text, len(ids), len(tokens))
    return ref


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    """Poll until nothing is live and no page is used anywhere (then check the engine's invariants)."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.lock:
            used = [inst.pool.used - inst.cached_pages for inst in engine.insts]
            live = dict(engine.requests)
            if not live and not any(used):
                assert all((i.reserved, i.arriving) == (0, 0) for i in engine.insts)
                engine.check_invariants()
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout}s: live requests {sorted(live)}, pages {used}")
        time.sleep(0.05)


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    """An OpenAI-style error object with this status whose message names every one of `words`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    for w in words:
        assert w in error["message"], (w, error["message"])
    return error


def chat_body(question: str = "hi", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 4,
            "temperature": 0, **kw}


def assert_serving(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---- chat ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("question", QUESTIONS)
def test_chat_matches_generate(client, reference, engine, question):
    text, prompt_tokens, generated = reference[question]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == generated
    assert r.usage.total_tokens == prompt_tokens + generated
    assert choice.finish_reason == ("length" if generated == MAX_TOKENS else "stop")
    wait_idle(engine)


def test_chat_finish_reason_length(client, reference):
    question = max(QUESTIONS, key=lambda q: reference[q][2])
    assert reference[question][2] > 2, "every reference answer stops early: pick a longer question"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2


def test_chat_streaming_joins_to_the_answer(client, reference):
    for question in QUESTIONS[:2]:
        text, prompt_tokens, generated = reference[question]
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        with_choices = [c for c in chunks if c.choices]
        assert with_choices[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
        assert with_choices[-1].choices[0].finish_reason == ("length" if generated == MAX_TOKENS else "stop")
        assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
        assert chunks[-1].usage is not None and not chunks[-1].choices
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, generated)
        assert all(c.usage is None for c in chunks[:-1])


def test_chat_streaming_without_usage(http, reference):
    question = QUESTIONS[0]
    events = []
    with http.stream("POST", "/v1/chat/completions",
                     json=chat_body(question, max_tokens=MAX_TOKENS, stream=True)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reference[question][0]


# ---- completions -----------------------------------------------------------------------------------------------
def test_completions_text_and_token_ids(client, lm, engine):
    prompt = "Hello there"
    ref_text = lm.generate([prompt], max_new_tokens=MAX_TOKENS)[0]
    ids = lm.encode(prompt)
    ref_ids = lm.generate([ids], max_new_tokens=MAX_TOKENS)[0]
    assert lm.tokenizer.decode(ref_ids, skip_special_tokens=True) == ref_text

    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == ref_text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref_ids))

    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == ref_text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref_ids))

    r = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == ref_text  # a list of one string is one prompt

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(ref_ids)
    wait_idle(engine)


# ---- sampling, models, health, metrics ---------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(client):
    def ask(seed):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                           max_tokens=MAX_TOKENS, temperature=0.8, seed=seed,
                                           extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    first = ask(7)
    assert ask(7) == first
    assert any(ask(s) != first for s in (8, 9, 10))  # the seed is honoured, not ignored


def test_models_health_metrics(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = http.get("/v1/models").json()
    assert raw["data"][0]["max_model_len"] == MAX_MODEL_LEN

    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["instances"] == 2

    for stream in (False, True):
        r = http.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert r.status_code == 200
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    values = {}
    for line in metrics.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["serving_ttft_seconds_count"] >= 2
    assert values["serving_generated_tokens_total"] > 0
    assert values["serving_prompt_tokens_total"] > 0
    assert values['serving_requests_total{outcome="finished"}'] >= 2
    assert values['serving_kv_pages_total{instance="0"}'] == 4095
    assert values["serving_policy_errors_total"] == 0
    # the same chat prompt twice: the second finds the first's full blocks in the prefix cache
    assert 0 < values['serving_prefix_cache_tokens_total{kind="hit"}'] < values[
        'serving_prefix_cache_tokens_total{kind="queried"}']
    assert values["serving_prefix_cache_pages"] > 0


# ---- cancellation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_and_frees_pages(server, engine, lm, stream, monkeypatch):
    # a non-streaming request notices its client has gone at its next poll: poll often, so the ~500 tokens asked
    # for cannot all be generated first even on a fast host
    monkeypatch.setattr(api, "DISCONNECT_POLL_S", 0.05)
    wait_idle(engine)
    cancelled = engine.stats.cancelled
    prompt_len = len(lm.encode("hi", chat=True))
    body = chat_body("hi", max_tokens=MAX_MODEL_LEN - prompt_len, ignore_eos=True, stream=stream)
    if stream:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                seen = 0
                while seen < 2:
                    if next(lines).startswith("data: "):
                        seen += 1
    else:
        with httpx.Client(base_url=server.url, timeout=0.1) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/chat/completions", json=body)
    wait_idle(engine)
    assert engine.stats.cancelled > cancelled


# ---- bad input -------------------------------------------------------------------------------------------------
def post(http: httpx.Client, path: str, body) -> httpx.Response:
    return http.post(path, json=body)


BAD_REQUESTS = {
    "missing_messages": ("/v1/chat/completions", {"model": MODEL, "max_tokens": 4}, 400, ("messages",)),
    "empty_messages": ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, ("messages",)),
    "unknown_model": ("/v1/chat/completions", chat_body(model="gpt-4o"), 404, ("gpt-4o", MODEL)),
    "max_tokens_beyond_context": ("/v1/chat/completions", chat_body(max_tokens=600), 400,
                                  ("max_tokens", str(MAX_MODEL_LEN))),
    "n_2": ("/v1/chat/completions", chat_body(n=2), 400, ("n = 2",)),
    "temperature_5": ("/v1/chat/completions", chat_body(temperature=5), 400, ("temperature",)),
    "image_http_url": ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}]), 400, ("data:", "network")),
    "image_data_uri": ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]), 400,
        ("vision encoder",)),
    "two_string_prompts": ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 4}, 400,
                           ("2 prompts",)),
    "token_outside_vocabulary": ("/v1/completions", {"model": MODEL, "prompt": [1, 5, 1024], "max_tokens": 4}, 400,
                                 ("1024", "vocabulary")),
    "negative_token": ("/v1/completions", {"model": MODEL, "prompt": [1, -3], "max_tokens": 4}, 400,
                       ("-3", "vocabulary")),
    "empty_token_prompt": ("/v1/completions", {"model": MODEL, "prompt": [], "max_tokens": 4}, 400, ("empty",)),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_openai_errors(http, engine, case):
    path, body, status, words = BAD_REQUESTS[case]
    error = assert_error(post(http, path, body), status, *words)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    wait_idle(engine)
    assert_serving(http)


def test_invalid_json_body(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "demo", "messages": [',
                  headers={"content-type": "application/json"})
    assert_error(r, 400, "JSON")
    assert_serving(http)


def test_body_over_the_limit(engine, http):
    with ServerThread(create_app(engine, max_body_bytes=1000)) as small, \
            httpx.Client(base_url=small.url, timeout=TIMEOUT) as c:
        assert c.post("/v1/chat/completions", json=chat_body()).status_code == 200
        big = chat_body("x" * 2000)
        assert_error(c.post("/v1/chat/completions", json=big), 413, "1000")
        chunked = (json.dumps(big).encode()[i:i + 300] for i in range(0, 2400, 300))  # no Content-Length
        assert_error(c.post("/v1/chat/completions", content=chunked, headers={"content-type": "application/json"}),
                     413, "1000")
        small_chunked = (json.dumps(chat_body()).encode(),)
        r = c.post("/v1/chat/completions", content=iter(small_chunked), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert c.post("/v1/chat/completions", json=chat_body()).status_code == 200
    assert_serving(http)


def test_openai_client_raises(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2)
    assert e.value.status_code == 400 and "n = 2" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert e.value.status_code == 404 and "nope" in e.value.message


# ---- admission control -------------------------------------------------------------------------------------------
def test_queue_full_is_429(lm):
    eng = Engine(lm.config, lm.params, lm.tokenizer, EngineConfig(num_instances=1, max_waiting=0, **SHAPE),
                 devices=[jax.devices()[7]], model_name=MODEL)
    try:
        with ServerThread(create_app(eng)) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            for stream in (False, True):
                r = c.post("/v1/chat/completions", json=chat_body(stream=stream))
                error = assert_error(r, 429, "busy")
                assert error["type"] == "rate_limit_error"
                assert int(r.headers["Retry-After"]) >= 1
            assert c.get("/health").json()["live_requests"] == 0
    finally:
        eng.shutdown()
    assert eng.stats.submitted == 0


# ---- load --------------------------------------------------------------------------------------------------------
LOAD_CLIENTS = 64
LOAD_QUESTIONS = ("hi", "Tell me a story.", "What is the capital of France?", "Name a color.")


def test_many_concurrent_streaming_clients(server, engine):
    async def one(client: openai.AsyncOpenAI, question: str):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0, stream=True)
        text, reasons = [], []
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                if choice.finish_reason is not None:
                    reasons.append(choice.finish_reason)
        return question, "".join(text), reasons

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=TIMEOUT) as client:
            jobs = [one(client, LOAD_QUESTIONS[i % len(LOAD_QUESTIONS)]) for i in range(LOAD_CLIENTS)]
            return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), timeout=120)

    finished = engine.stats.finished
    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    answers: dict[str, set[str]] = {}
    for question, text, reasons in results:
        assert len(reasons) == 1 and reasons[0] in ("stop", "length"), reasons
        answers.setdefault(question, set()).add(text)
    assert all(len(a) == 1 for a in answers.values()), answers
    assert engine.stats.finished - finished == LOAD_CLIENTS
    wait_idle(engine)


def test_text_that_is_not_valid_unicode_is_a_400(server):
    # JSON can carry a lone surrogate ("\ud800"), which no tokenizer encodes; found by the schema fuzzing
    url = server.url
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "a\ud800b", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "\udfffx"}]})):
        r = httpx.post(f"{url}{path}", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "not valid Unicode" in r.json()["error"]["message"]
