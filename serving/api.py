"""The OpenAI-compatible HTTP front end (FastAPI): /v1/chat/completions, /v1/completions (both with SSE
streaming), /v1/models, /health and Prometheus /metrics.

The front end never touches device arrays: it tokenizes, submits to the engine and turns the engine's outputs
(delivered from worker threads onto the event loop) into OpenAI response objects. Every refusal is an OpenAI-style
error object with a 4xx status; a client that disconnects cancels its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers

from serving.api_media import ChatPrompt, image_inputs, placeholder_text
from serving.api_schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContextCreateRequest,
    RequestError,
)
from serving.context_store import ContextStore
from serving.engine import Engine, EngineError, QueueFull, RequestOutput

MAX_BODY_BYTES = 8 * 1024 * 1024
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def error_response(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    kind = {404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class EngineCollector:
    """Engine state read at scrape time: queues, pages, instances per role, request and token counters."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        snap = self.engine.snapshot()
        waiting = GaugeMetricFamily("serving_queue_requests", "requests waiting, per queue", labels=["queue"])
        for name, n in snap["waiting"].items():
            waiting.add_metric([name], n)
        yield waiting
        pages = GaugeMetricFamily("serving_kv_pages_used", "KV pages in use per instance", labels=["instance"])
        total = GaugeMetricFamily("serving_kv_pages_total", "KV pages per instance", labels=["instance"])
        running = GaugeMetricFamily("serving_running_requests", "requests decoding per instance",
                                    labels=["instance"])
        roles = GaugeMetricFamily("serving_instances", "instances per group and stage", labels=["group", "stage"])
        counts: dict = {}
        for i in snap["instances"]:
            iid = str(i["iid"])
            pages.add_metric([iid], i["pages_used"])
            total.add_metric([iid], i["pages_total"])
            running.add_metric([iid], i["running"])
            counts[(i["group"], i["stage"])] = counts.get((i["group"], i["stage"]), 0) + 1
        for (g, s), n in counts.items():
            roles.add_metric([g, s], n)
        yield from (pages, total, running, roles)
        s = snap["stats"]
        done = CounterMetricFamily("serving_requests", "finished requests by outcome", labels=["outcome"])
        for outcome, n in (("finished", s.finished), ("cancelled", s.cancelled), ("error", s.errors)):
            done.add_metric([outcome], n)
        yield done
        yield CounterMetricFamily("serving_prompt_tokens", "prompt tokens prefilled", value=s.prompt_tokens)
        yield CounterMetricFamily("serving_generated_tokens", "tokens generated", value=s.generated_tokens)
        yield CounterMetricFamily("serving_role_switches", "instance role switches", value=snap["switches"])
        yield CounterMetricFamily("serving_policy_errors", "scheduler ticks that raised (logged; serving went on)",
                                  value=s.policy_errors)
        yield GaugeMetricFamily("serving_contexts", "KVzip contexts served", value=snap["contexts"])
        yield GaugeMetricFamily("serving_context_kv_bytes_saved", "KV bytes the served contexts do not hold "
                                "(full cache minus compressed)", value=snap["context_kv_bytes_saved"])
        yield CounterMetricFamily("serving_context_requests", "requests that started from a served context",
                                  value=s.context_requests)
        yield CounterMetricFamily("serving_context_tokens_saved", "context tokens those requests did not prefill",
                                  value=s.context_tokens_saved)
        yield CounterMetricFamily("serving_media_encoded", "images and sounds run through their encoders",
                                  value=s.media_encoded)
        cache = snap["embedding_cache"]
        lookups = CounterMetricFamily("serving_embedding_cache_lookups",
                                      "embedding cache lookups (images, sounds) by result", labels=["result"])
        lookups.add_metric(["hit"], cache["hits"])
        lookups.add_metric(["miss"], cache["misses"])
        yield lookups
        yield GaugeMetricFamily("serving_embedding_cache_tokens", "encoder tokens the embedding cache holds",
                                value=cache["tokens"])
        prefix = CounterMetricFamily("serving_prefix_cache_tokens", "prompt tokens of requests that looked in a "
                                     "prefix cache, and those found there (not prefilled again)", labels=["kind"])
        prefix.add_metric(["queried"], s.prefix_query_tokens)
        prefix.add_metric(["hit"], s.prefix_hit_tokens)
        yield prefix
        yield GaugeMetricFamily("serving_prefix_cache_pages", "KV pages the prefix caches keep",
                                value=snap["prefix_cache_pages"])
        yield CounterMetricFamily("serving_kv_migrations", "requests whose KV moved between instances",
                                  value=s.migrations)
        yield CounterMetricFamily("serving_kv_migrated_bytes", "KV bytes moved between instances",
                                  value=s.migrated_pages * snap["kv_bytes_per_page"])


class _BodyLimit:
    """413 for a request body over `max_body_bytes`, whether it declares a Content-Length or comes chunked: the
    body is read (up to the limit) before the app runs, then handed to it unchanged; `receive` is the server's own
    afterwards, so the app still sees the client disconnect."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    def _too_large(self, size: str) -> JSONResponse:
        return error_response(413, f"the request body has {size} bytes; the limit is {self.max_body_bytes}")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(length)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending its body
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._too_large(f"more than {self.max_body_bytes}")(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class _Outputs:
    """Engine outputs of one request, handed from worker threads to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._get: asyncio.Future | None = None
        self.next_check = time.monotonic() + DISCONNECT_POLL_S  # when to look for a client disconnect next

    def sink(self, out: RequestOutput) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def get(self, timeout: float) -> RequestOutput | None:
        """The next output, or None after `timeout` seconds (the pending read is kept, so nothing is lost)."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({self._get}, timeout=timeout)
        if not done:
            return None
        out, self._get = self._get.result(), None
        return out

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()


def create_app(engine: Engine, *, model_name: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               contexts: ContextStore | None = None,
               chat_prompt: Callable[[list[ChatMessage]], ChatPrompt] | None = None) -> FastAPI:
    """The app over a running engine; `contexts` (optional) serves KVzip contexts under /v1/contexts.
    `chat_prompt` builds a model's own chat prompts (it runs in the thread pool; a `RequestError` is a 4xx);
    default: the tokenizer's chat template, with the image placeholder where each image part sits."""
    model_name = model_name or engine.model_name
    app = FastAPI(title="kvzip-jax serving", version="0.1.0")
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    ttft = Histogram("serving_ttft_seconds", "time to first token", registry=registry, buckets=LATENCY_BUCKETS)
    tpot = Histogram("serving_tpot_seconds", "time per output token after the first", registry=registry,
                     buckets=LATENCY_BUCKETS)
    created = int(time.time())
    app.state.engine, app.state.registry = engine, registry
    image_text = None  # what an image part becomes in the chat template's text: the placeholder token
    if "image" in engine.modalities and engine.tokenizer is not None:
        image_text = placeholder_text(engine.tokenizer, engine.modalities["image"].token_id)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON")
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
        return error_response(exc.status, str(exc), exc.param, headers)

    # A plain ASGI middleware, not @app.middleware("http"): Starlette's BaseHTTPMiddleware wraps `receive` so that
    # `request.is_disconnected()` never sees the client go, and a non-streaming request would outlive its client.
    app.add_middleware(_BodyLimit, max_body_bytes=max_body_bytes)

    def check_model(name: str) -> None:
        if name != model_name:
            raise RequestError(f"model {name!r} not found; this server serves {model_name!r}", 404, "model")

    def submit(prompt: ChatPrompt, sampling, outputs: _Outputs, context_id: str | None) -> int:
        try:
            return engine.submit(prompt.ids, sampling, outputs.sink, context_id=context_id, media=prompt.media,
                                 modality_ids=prompt.modality_ids, key_mask=prompt.key_mask)
        except KeyError as e:
            raise RequestError(e.args[0], 404, "context_id") from e
        except QueueFull as e:
            raise RequestError(f"the server is busy ({e}); retry later", 429) from e
        except EngineError as e:
            raise RequestError(str(e), 503) from e
        except ValueError as e:
            raise RequestError(str(e)) from e

    async def next_output(request: Request, outputs: _Outputs, rid: int) -> RequestOutput | None:
        """The next output; None (after cancelling the request) once the client has gone."""
        while True:
            # checked every DISCONNECT_POLL_S even while outputs keep coming (a long answer would otherwise run
            # to its end for a client that is gone)
            if time.monotonic() >= outputs.next_check:
                outputs.next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    outputs.close()
                    engine.cancel(rid)
                    return None
            out = await outputs.get(max(0.0, outputs.next_check - time.monotonic()))
            if out is not None:
                return out

    def observe(t0: float, t_first: float | None, n_tokens: int) -> None:
        if t_first is not None:
            ttft.observe(t_first - t0)
            if n_tokens > 1:
                tpot.observe((time.perf_counter() - t_first) / (n_tokens - 1))

    async def run(request: Request, prompt: ChatPrompt, sampling, stream: bool, include_usage: bool,
                  make_chunk, make_final, context_id: str | None = None):
        outputs = _Outputs(asyncio.get_running_loop())
        t0 = time.perf_counter()
        rid = submit(prompt, sampling, outputs, context_id)
        if not stream:
            text, ids, t_first = [], [], None
            while True:
                out = await next_output(request, outputs, rid)
                if out is None:
                    return Response(status_code=499)
                t_first = t_first or (time.perf_counter() if out.token_ids else None)
                text.append(out.text)
                ids.extend(out.token_ids)
                if out.finish_reason is not None:
                    break
            if out.finish_reason == "error":
                return error_response(500, f"generation failed: {out.error}")
            observe(t0, t_first, len(ids))
            return JSONResponse(make_final("".join(text), out, ids))

        async def events():
            finished, t_first, n = False, None, 0
            try:
                yield _sse(make_chunk(None, None, first=True))
                while True:
                    out = await outputs.queue.get()
                    n += len(out.token_ids)
                    t_first = t_first or (time.perf_counter() if out.token_ids else None)
                    if out.finish_reason == "error":
                        finished = True
                        yield _sse({"error": {"message": f"generation failed: {out.error}", "type": "server_error"}})
                        break
                    if out.text or out.finish_reason is not None:
                        yield _sse(make_chunk(out.text, out.finish_reason))
                    if out.finish_reason is not None:
                        finished = True
                        observe(t0, t_first, n)
                        if include_usage:
                            yield _sse(make_chunk(None, None, usage=_usage(out)))
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away mid-stream
                    engine.cancel(rid)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        # decoding and preprocessing images and sounds run in the thread pool: the event loop keeps serving
        if body.context_id is not None:
            prompt = ChatPrompt(context_question(body.context_id, _question(body.messages), "messages"))
        elif chat_prompt is not None:
            prompt = await run_in_threadpool(chat_prompt, body.messages)
        else:
            ids, urls = _chat_prompt(engine, body.messages, image_text)
            images = await run_in_threadpool(image_inputs, engine.modalities["image"], urls) if urls else ()
            prompt = ChatPrompt(ids, tuple(images))
        sampling = body.sampling(context_start(body.context_id) + len(prompt.ids), engine.max_model_len,
                                 body.max_completion_tokens)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish, first=False, usage=None):
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            body_ = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                     "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                body_["usage"] = usage
            return body_

        def final(text, out, ids):
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": out.finish_reason, "logprobs": None}],
                    "usage": _usage(out)}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return await run(request, prompt, sampling, body.stream, include, chunk, final, body.context_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        if body.echo or body.suffix:
            raise RequestError("echo and suffix are not supported by this server", param="echo")
        if body.context_id is not None:
            if not isinstance(body.prompt, str):
                raise RequestError("a request on a context takes its question as a text prompt", param="prompt")
            prompt_ids = context_question(body.context_id, _check_text(body.prompt, "prompt"), "prompt")
        else:
            prompt_ids = _completion_prompt(engine, body.prompt)
        sampling = body.sampling(context_start(body.context_id) + len(prompt_ids), engine.max_model_len)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish, first=False, usage=None):
            body_ = {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                     "choices": [] if usage else [{"index": 0, "text": text or "", "finish_reason": finish,
                                                    "logprobs": None}]}
            if usage:
                body_["usage"] = usage
            return body_

        def final(text, out, ids):
            choice = {"index": 0, "text": text, "finish_reason": out.finish_reason, "logprobs": None}
            if engine.tokenizer is None:
                choice["token_ids"] = ids  # no tokenizer: the generated ids are the answer
            return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [choice], "usage": _usage(out)}

        include = bool(body.stream_options and body.stream_options.include_usage)
        return await run(request, ChatPrompt(prompt_ids), sampling, body.stream, include, chunk, final,
                         body.context_id)

    def context_store() -> ContextStore:
        if contexts is None:
            raise RequestError("this server does not serve contexts (start it with a tokenizer model)", 404,
                               "context_id")
        return contexts

    def context_question(context_id: str, question: str, param: str) -> list[int]:
        """The question's token ids after the context's prompt; an unknown context is a 404, before any encoding."""
        store = context_store()
        context_start(context_id)
        if not question.strip():
            raise RequestError("the question is empty", param=param)
        try:
            return store.question_ids(question)
        except ValueError as e:
            raise RequestError(str(e), param=param) from e

    def context_start(context_id: str | None) -> int:
        """Positions the context takes before the request's own tokens (0 without one)."""
        if context_id is None:
            return 0
        served = engine.contexts.get(context_id)
        if served is None:
            raise RequestError(f"context {context_id!r} does not exist (or was deleted)", 404, "context_id")
        return served.kv.next_position

    def context_info(cid: str):
        info = context_store().infos.get(cid)
        if info is None:
            raise RequestError(f"context {cid!r} does not exist (or was deleted)", 404, "context_id")
        return info

    @app.post("/v1/contexts")
    async def create_context(body: ContextCreateRequest):
        check_model(body.model)
        store = context_store()
        if body.text is not None:
            _check_text(body.text, "text")
        try:
            info = await asyncio.to_thread(store.create, text=body.text, token_ids=body.token_ids,
                                           ratio=body.ratio, level=body.level)
        except ValueError as e:
            raise RequestError(str(e), param="text") from e
        return info.as_dict(model_name)

    @app.get("/v1/contexts")
    async def list_contexts():
        return {"object": "list", "data": [i.as_dict(model_name) for i in context_store().infos.values()]}

    @app.get("/v1/contexts/{cid}")
    async def get_context(cid: str):
        return context_info(cid).as_dict(model_name)

    @app.delete("/v1/contexts/{cid}")
    async def delete_context(cid: str):
        context_info(cid)
        context_store().delete(cid)
        return {"id": cid, "object": "context", "deleted": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kvzip-jax", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        snap = engine.snapshot()
        return {"status": "ok", "model": model_name, "instances": len(snap["instances"]),
                "live_requests": snap["live_requests"],
                # where each instance runs (its devices; on a Ray cluster also its node) and its role now
                "placement": [{k: i[k] for k in ("iid", "location", "group", "stage", "state")}
                              for i in snap["instances"]]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _check_text(text: str, param: str) -> str:
    """Text the tokenizer can take: valid Unicode (JSON can carry lone surrogates, which no tokenizer encodes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param}: not valid Unicode text ({e.reason} at character {e.start})", param=param) from e
    return text


def _question(messages: list[ChatMessage]) -> str:
    """The question of a request on a context: its one user message (the context is the rest of the prompt)."""
    if len(messages) != 1 or messages[0].role != "user":
        raise RequestError("a request on a context takes exactly one user message: the question", param="messages")
    content = messages[0].content
    if isinstance(content, list):
        if any(p.type != "text" for p in content):
            raise RequestError("a question on a context is text only", param="messages")
        content = "".join(p.text or "" for p in content)
    if not content or not content.strip():
        raise RequestError("the question is empty", param="messages")
    return _check_text(content, "messages")


def _chat_prompt(engine: Engine, messages: list[ChatMessage], image_text: str | None) -> tuple[list[int], list]:
    """The chat template's token ids, with the image placeholder where each image part sits; and each image's
    (url, where in the request), in order."""
    if engine.tokenizer is None:
        raise RequestError("this model has no tokenizer (no chat template): use /v1/completions with a prompt of "
                           "token ids", param="messages")
    plain, urls = [], []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type == "image_url":
                    url = part.image_url.url if part.image_url else ""
                    if not url.startswith("data:"):
                        raise RequestError(f"messages[{i}].content[{j}]: image URLs must be data: URIs (base64); "
                                           "this server does not fetch the network", param="messages")
                    if image_text is None:
                        raise RequestError(f"messages[{i}]: this model has no vision encoder; send text only",
                                           param="messages")
                    urls.append((url, f"messages[{i}].content[{j}]"))
                    texts.append(image_text)
                    continue
                if part.type == "input_audio":
                    raise RequestError(f"messages[{i}].content[{j}]: this model takes no sound", param="messages")
                if image_text is not None and image_text in (part.text or ""):
                    raise RequestError(f"messages[{i}]: the text holds the image placeholder {image_text!r}; send "
                                       "images as image_url parts", param="messages")
                texts.append(part.text or "")
            content = "".join(texts)
        else:
            content = m.content or ""
            if image_text is not None and image_text in content:
                raise RequestError(f"messages[{i}]: the text holds the image placeholder {image_text!r}; send "
                                   "images as image_url parts", param="messages")
        plain.append({"role": "system" if m.role == "developer" else m.role,
                      "content": _check_text(content, f"messages[{i}]")})
    try:
        ids = engine.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # a template that rejects the roles or their order
        raise RequestError(f"the model's chat template refused these messages: {e}", param="messages") from e
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(t) for t in ids], urls


def _completion_prompt(engine: Engine, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise RequestError(f"{len(prompt)} prompts in one request; this server takes one", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise RequestError("this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
        return [int(t) for t in engine.tokenizer(_check_text(prompt, "prompt"))["input_ids"]]
    if not prompt:
        raise RequestError("the prompt is empty", param="prompt")
    return [int(t) for t in prompt]
