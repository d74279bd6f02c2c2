"""``offload serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over continuous batching.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus
text). The engine runs on one thread (:class:`~offload.batcher.ContinuousBatcher`); each HTTP
request waits on an asyncio queue that the engine thread feeds. Every bad request is a 4xx with an
OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psutil
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .batcher import ContinuousBatcher, QueueFull, Request
from .engine import RequestOutput
from .errors import InvalidRequestError, OffloadError
from .llm import LLM
from .sampling import SamplingParams
from .tiers.kv_store import kv_bytes_per_token

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # OpenAI's limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks that its client is still there


@dataclass(frozen=True)
class ServeConfig:
    """The server's own settings (the model's are the LLM's). ``kv_memory`` (bytes) sizes the rows
    in flight: as many rows of ``max_context`` tokens as it holds, at most ``max_rows``."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_rows: int = 8
    max_queue: int = 64
    kv_memory: int | None = None
    model_name: str | None = None  # the id clients send as "model" (default: the model file's name)

    def __post_init__(self) -> None:
        if self.max_rows <= 0 or self.max_queue < 0:
            raise InvalidRequestError(f"max_rows must be positive and max_queue >= 0, got {self.max_rows}, "
                                      f"{self.max_queue}")
        if not 0 < self.port < 65536:
            raise InvalidRequestError(f"port must be in 1..65535, got {self.port}")


class BadRequest(Exception):
    """A request the server answers with ``status`` and an OpenAI-style error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def rows_for_budget(llm: LLM, config: ServeConfig) -> int:
    """Rows in flight: ``max_rows``, fewer if ``kv_memory`` holds fewer full-context rows."""
    per_row = kv_bytes_per_token(llm.args, llm.dtype.itemsize, llm.backend.settings()["kv_dtype"]) * \
        llm.engine.max_context
    if config.kv_memory is None:
        return config.max_rows
    rows = min(config.max_rows, config.kv_memory // per_row)
    if rows < 1:
        raise InvalidRequestError(f"kv_memory {config.kv_memory / 2**20:.0f} MiB holds no row of {llm.engine.max_context} "
                                  f"tokens ({per_row / 2**20:.0f} MiB): raise it or lower max_context")
    return rows


class OffloadServer:
    """The HTTP face of one :class:`LLM`: build it, then ``run()`` (or mount ``app`` elsewhere)."""

    def __init__(self, llm: LLM, config: ServeConfig | None = None):
        if not llm.backend.rows_movable:
            raise InvalidRequestError(f"kv_policy {llm.kv_policy} cannot move a row's index between cache rows (its "
                                      "index cannot be saved): serve with another policy")
        self.llm, self.config = llm, config or ServeConfig()
        self.model_name = self.config.model_name or llm.path.name
        self.rows = rows_for_budget(llm, self.config)
        self.batcher = ContinuousBatcher(llm.engine, self.rows, self.config.max_queue)
        self.created = int(time.time())
        self.app = self._build_app()

    def describe(self) -> str:
        return (f"serving '{self.model_name}' on http://{self.config.host}:{self.config.port}/v1: "
                f"{self.rows} rows of {self.llm.engine.max_context} tokens in flight, {self.config.max_queue} queued")

    def run(self) -> None:
        uvicorn.run(self.app, host=self.config.host, port=self.config.port, log_level="warning")

    # ------------------------------------------------------------------ the app
    def _build_app(self):
        @asynccontextmanager
        async def lifespan(app):
            self.batcher.start()
            try:
                yield
            finally:
                self.batcher.stop()

        app = FastAPI(title="offload", lifespan=lifespan)

        @app.exception_handler(BadRequest)
        async def bad_request(_, e: BadRequest):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)

        @app.exception_handler(HTTPException)
        async def http_error(_, e: HTTPException):  # unknown paths, wrong methods
            kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
            return JSONResponse(BadRequest(str(e.detail), status=e.status_code, kind=kind).body(),
                                status_code=e.status_code)

        @app.exception_handler(Exception)
        async def server_error(_, e: Exception):  # a bug of ours: a JSON 500, never a traceback to the client
            return JSONResponse(BadRequest(f"internal error: {type(e).__name__}: {e}", status=500,
                                           kind="server_error").body(), status_code=500)

        @app.exception_handler(RequestValidationError)
        async def validation_error(_, e: RequestValidationError):
            return JSONResponse(BadRequest(f"invalid request: {e.errors()[:1]}").body(), status_code=400)

        @app.get("/health")
        async def health():
            alive = self.batcher.alive
            return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "offload"}]}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse(self.metrics_text(), media_type="text/plain; version=0.0.4")

        @app.post("/v1/chat/completions")
        async def chat(http: HTTPRequest):
            body = await _json_body(http)
            messages = _messages(body.get("messages"))
            params = self._params(body, default_max_tokens=None, max_tokens_keys=("max_completion_tokens",
                                                                                   "max_tokens"))
            ids, _ = self._encode(messages, chat=True)
            return await self._respond(http, body, ids, None, params, chat=True)

        @app.post("/v1/completions")
        async def completions(http: HTTPRequest):
            body = await _json_body(http)
            prompt = _prompt(body.get("prompt"))
            params = self._params(body, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
                                  max_tokens_keys=("max_tokens",))
            ids, text = self._encode(prompt, chat=False)
            return await self._respond(http, body, ids, text, params, chat=False)

        return app

    # ------------------------------------------------------------------ requests
    def _encode(self, prompt, chat: bool) -> tuple[list[int], str | None]:
        """Token ids of a prompt or conversation; what the tokenizer or chat template refuses (a lone
        surrogate, roles a template does not allow, no template) is the client's 400."""
        try:
            return self.llm.encode_prompt(prompt, chat=chat)
        except (OffloadError, ValueError, TypeError, UnicodeError) as e:
            raise BadRequest(f"cannot encode the {'messages' if chat else 'prompt'}: {e}",
                             param="messages" if chat else "prompt") from None

    def _params(self, body: dict, default_max_tokens: int | None, max_tokens_keys: tuple[str, ...]) -> SamplingParams:
        for key in ("temperature", "top_p", "n", "stop", "seed", "top_k", "max_tokens", "max_completion_tokens"):
            if key in body and body[key] is None:  # JSON null: the default, as OpenAI reads it
                del body[key]
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required: the id from GET /v1/models", param="model")
        if model != self.model_name:
            raise BadRequest(f"the model '{model}' does not exist here: this server serves '{self.model_name}'",
                             param="model", code="model_not_found")
        n = body.get("n", 1)
        if n != 1:
            raise BadRequest(f"n must be 1 (one choice per request), got {n!r}", param="n")
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest(f"stream must be true or false, got {body.get('stream')!r}", param="stream")
        if body.get("stream_options") is None:  # absent or null: no options
            body["stream_options"] = {}
        options = body["stream_options"]
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise BadRequest(f"stream_options must be an object like {{\"include_usage\": true}}, got {options!r}",
                             param="stream_options")
        max_tokens = next((body[k] for k in max_tokens_keys if body.get(k) is not None), default_max_tokens)
        if max_tokens is None:  # chat: up to the context, as OpenAI's default
            max_tokens = self.llm.engine.max_context
        stop = body.get("stop")
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", param="stop")
        temperature = body.get("temperature", 1.0)  # OpenAI's default: send 0 for greedy
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and not 0 <= temperature <= 2:
            raise BadRequest(f"temperature must be in [0, 2], got {temperature!r}", param="temperature")
        for penalty in ("presence_penalty", "frequency_penalty"):
            if body.get(penalty) not in (None, 0, 0.0):
                raise BadRequest(f"{penalty} is not supported: leave it at 0", param=penalty)
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=body.get("top_p", 1.0),
                                  top_k=body.get("top_k", 0), seed=body.get("seed"), stop=stop,
                                  ignore_eos=body.get("ignore_eos", False))
        except InvalidRequestError as e:
            raise BadRequest(str(e).replace("max_new_tokens", "max_tokens")) from None

    async def _respond(self, http: HTTPRequest, body: dict, ids: list[int], text: str | None,
                       params: SamplingParams, chat: bool):
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def emit(delta: str, out: RequestOutput) -> None:  # on the engine thread
            loop.call_soon_threadsafe(updates.put_nowait, (delta, out.finish_reason, len(out.token_ids)))

        request = Request(ids, params, emit, prompt=text)
        try:
            self.batcher.submit(request)
        except QueueFull as e:
            raise BadRequest(str(e), code="rate_limit_exceeded", status=429, kind="rate_limit_error") from None
        except InvalidRequestError as e:
            raise BadRequest(str(e), param="messages" if chat else "prompt", code="context_length_exceeded"
                             if "at most" in str(e) else None) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        frame = _Frame(rid, self.model_name, int(time.time()), chat)
        if body.get("stream", False):
            usage = body["stream_options"].get("include_usage", False)
            return StreamingResponse(self._events(request, updates, frame, len(ids), usage),
                                     media_type="text/event-stream")
        pieces, reason, generated = [], None, 0
        while reason is None:
            try:
                delta, reason, generated = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancelled = True
                    return JSONResponse({}, status_code=499)
                continue
            pieces.append(delta)
        if reason == "error":
            raise BadRequest(f"generation failed: {request.error}", status=500, kind="server_error")
        return frame.whole("".join(pieces), reason, len(ids), generated)

    async def _events(self, request: Request, updates: asyncio.Queue, frame: "_Frame", prompt_tokens: int,
                      usage: bool):
        try:
            if frame.chat:
                yield _sse(frame.chunk({"role": "assistant", "content": ""}, None))
            while True:
                delta, reason, generated = await updates.get()
                if reason == "error":
                    yield _sse(BadRequest(f"generation failed: {request.error}", kind="server_error").body())
                    break
                if delta:
                    yield _sse(frame.chunk({"content": delta} if frame.chat else delta, None))
                if reason is not None:
                    yield _sse(frame.chunk({} if frame.chat else "", reason))
                    if usage:
                        yield _sse(frame.usage(prompt_tokens, generated))
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the row at the next step
            request.cancelled = True

    # ------------------------------------------------------------------ metrics
    def metrics_text(self) -> str:
        s, b = self.batcher.stats, self.batcher
        now = time.perf_counter()
        lines = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP offload_{name} {help_}", f"# TYPE offload_{name} {kind}"])
            lines.extend(f"offload_{name}{labels} {value:g}" for labels, value in samples)

        metric("requests_total", "counter", "Requests by outcome.",
               [('{outcome="finished"}', s.requests_finished), ('{outcome="cancelled"}', s.requests_cancelled),
                ('{outcome="failed"}', s.requests_failed), ('{outcome="rejected"}', s.requests_rejected)])
        metric("requests_admitted_total", "counter", "Requests that got a row.", [("", s.requests_admitted)])
        metric("queue_depth", "gauge", "Requests waiting for a row.", [("", b.queued)])
        metric("rows_in_flight", "gauge", "Requests decoding now.", [("", b.in_flight)])
        metric("rows_max", "gauge", "Rows the KV cache holds.", [("", b.max_rows)])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)])
        metric("generated_tokens_total", "counter", "Tokens generated.", [("", s.generated_tokens)])
        metric("generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.",
               [("", s.tokens_per_second(now))])
        metric("decode_steps_total", "counter", "Batched decode steps.", [("", s.decode_steps)])
        metric("rows_decoded_total", "counter", "Rows summed over decode steps (/ steps = mean batch width).",
               [("", s.rows_decoded)])
        metric("prompts_beside_decode_total", "counter", "Prompts prefilled in the same model call as a decode step.",
               [("", s.prompts_beside_decode)])
        metric("prefill_seconds_total", "counter", "Time in prefill.", [("", s.prefill_seconds)])
        metric("decode_seconds_total", "counter", "Time in decode steps.", [("", s.decode_seconds)])
        metric("index_build_seconds_total", "counter", "Time building KV indexes of prompts.",
               [("", s.index_build_seconds)])
        kv = self.llm.backend
        metric("kv_bytes", "gauge", "KV cache bytes held per tier.",
               [('{tier="device"}', kv.kv_nbytes(self.llm.device.type)),
                ('{tier="host"}', kv.kv_nbytes("cpu") if self.llm.device.type != "cpu" else 0)])
        metric("process_resident_bytes", "gauge", "Resident memory of the server process.",
               [("", psutil.Process().memory_info().rss)])
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Frame:
    """What every response object of one request shares, and how each kind is built."""

    id: str
    model: str
    created: int
    chat: bool

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, reason: str, prompt_tokens: int, generated: int) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                   "logprobs": None} if self.chat else
                  {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": _usage(prompt_tokens, generated)}

    def chunk(self, delta, reason: str | None) -> dict:
        choice = ({"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None} if self.chat else
                  {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None})
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage(self, prompt_tokens: int, generated: int) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": _usage(prompt_tokens, generated)}


def _usage(prompt_tokens: int, generated: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _json_body(http: HTTPRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():  # NaN and infinities are not JSON numbers an API should take
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequest(f"{key} must be a finite number, got {value}", param=key)
    return body


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required: a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] must be an object with a role in {ROLES}", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content parts must be text parts ({{type: text, text}})",
                                 param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise BadRequest("'prompt' is required: a non-empty string (or one list of token ids)", param="prompt")


def serve(llm: LLM, config: ServeConfig) -> None:
    """Build the server for ``llm`` and run it until interrupted."""
    server = OffloadServer(llm, config)
    print(server.describe(), flush=True)
    server.run()
