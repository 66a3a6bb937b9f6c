"""`sali serve`: an OpenAI-compatible HTTP server over one model and its heads.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions``. The model name picks the head: ``<model>`` is the plain model,
``<model>+<head>`` the model with that head, ``<model>+<A>+<B>`` heads A and B in combination
when the command line offered that combination (``--head A+B``; heads and combinations come from
the command line only, never from a request). Chat prompts are formatted as `sali chat` formats them; ``/v1/completions``
continues its prompt as it is. Extra body fields: ``alpha`` (head strength), ``top_k``,
``min_p``, ``repeat_penalty``.

Requests take turns on the one llama.cpp context (a FIFO of generation jobs on one worker
thread); a streaming client that disconnects stops its generation at the next token. Every
error is an OpenAI-style JSON body ``{"error": {"message", "type", "param", "code"}}`` with a
4xx status.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import secrets
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from sali.api import CHAT_SAMPLING, Sali
from sali.errors import SaliError
from sali.runtime import Completion

MAX_BODY = 1 << 20  # bytes; a request body larger than this is refused with 413
MAX_STOPS = 16
# OpenAI reports a full context as "length" too
FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "length": "length", "context": "length"}


# ---- request bodies ------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "5" is not a number and 1 is not a bool; unknown fields are ignored as OpenAI's are
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=0, lt=2**32)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: int = Field(1, ge=1, le=1)
    alpha: Optional[float] = Field(None, ge=-100.0, le=100.0)


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[_Part]]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: Union[str, list[str]]


# ---- errors --------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts, param = [], None
    for error in errors[:5]:
        location = [str(p) for p in error.get("loc", ()) if p != "body"]
        if error.get("type") == "json_invalid":
            return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})", None
        where = ".".join(location) or "body"
        param = param or where
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


# ---- the app -------------------------------------------------------------------------------------
class Guard:
    """ASGI middleware: Bearer API key on every route but /health, and a body-size limit."""

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope.get("path") != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        try:
            too_big = length is not None and int(length) > self.max_body
        except ValueError:
            return await error_response(400, "Content-Length is not a number")(scope, receive, send)
        if too_big:
            response = error_response(413, f"the body is {int(length)} bytes; the limit is {self.max_body}")
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, f"the body is over the limit of {self.max_body} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(engine: Sali, api_key: str | None = None, max_body: int = MAX_BODY) -> FastAPI:
    """The ASGI app serving `engine` (see the module docstring)."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sali-generate")
    running: set[threading.Event] = set()
    finished: collections.Counter = collections.Counter()  # finish reason -> generations (worker thread only)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for event in list(running):  # stop what is generating, then let the worker finish
            event.set()
        worker.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="sali", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _describe_validation(exc.errors())
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(SaliError)
    async def _sali(request: Request, exc: SaliError):
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def models() -> dict[str, Any]:
        ids = {engine.name: None} | {f"{engine.name}+{name}": name for name in engine.choices}
        return ids

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "heads": list(engine.choices),
                "generations": sum(finished.values()), "cancelled": finished["cancelled"]}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "sali"}
                                           for name in models()]}

    def settings(body: _Body, prompt_tokens: int) -> dict[str, Any]:
        """Sampling settings for a request: the chat defaults, then the request's fields."""
        limit = engine.n_ctx
        if prompt_tokens >= limit:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens but the context holds {limit}: "
                                f"{prompt_tokens - limit + 1} too many", "messages", "context_length_exceeded")
        wanted = body.max_completion_tokens or body.max_tokens
        if wanted is not None and wanted > limit:
            raise ApiError(400, f"max_tokens {wanted} is more than the context holds ({limit} tokens)", "max_tokens")
        chosen = dict(CHAT_SAMPLING, max_tokens=wanted or limit - prompt_tokens,
                      seed=body.seed if body.seed is not None else secrets.randbelow(2**31))
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
            if getattr(body, name) is not None:
                chosen[name] = getattr(body, name)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"at most {MAX_STOPS} stop strings", "stop")
        chosen["stop"] = tuple(stops)
        return chosen

    def pick(body: _Body) -> str | None:
        ids = models()
        if body.model not in ids:
            raise ApiError(404, f"model {body.model!r} is not served here (served: {', '.join(ids)})", "model",
                           "model_not_found")
        return ids[body.model]

    async def respond(request: Request, body: _Body, head: str | None, prompt: str, run: Callable[..., Any], kind: str):
        prompt_tokens = engine.count_tokens(prompt)
        options = settings(body, prompt_tokens)
        alpha = body.alpha if head is not None else None
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        cancel = threading.Event()
        def call(stream: bool):
            out = run(head=head, alpha=alpha, stream=stream, cancel=cancel, **options)
            if not stream:
                finished[out.finish_reason] += 1
            return out

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(events(call, cancel, ident, body.model, kind, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        running.add(cancel)
        try:
            job = asyncio.get_running_loop().run_in_executor(worker, lambda: call(False))
            while not (await asyncio.wait({job}, timeout=0.5))[0]:
                if await request.is_disconnected():
                    cancel.set()  # nobody is waiting for this reply any more
            done: Completion = job.result()
        finally:
            cancel.set()
            running.discard(cancel)
        return _final(ident, body.model, kind, done)

    async def events(call, cancel: threading.Event, ident: str, model: str, kind: str, include_usage: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: the server is shutting down
                cancel.set()

        def work() -> None:
            try:
                stream = call(True)
                with stream:
                    for piece in stream:
                        post(("piece", piece))
                finished[stream.completion.finish_reason] += 1
                post(("done", stream.completion))
            except BaseException as exc:  # noqa: BLE001 - sent to the client as an error event
                post(("error", exc))

        running.add(cancel)
        loop.run_in_executor(worker, work)
        try:
            if kind == "chat":
                yield _sse(_chunk(ident, model, kind, {"role": "assistant", "content": ""}, None))
            # every token's event is the same but for its text: format the rest once
            head, tail = _sse(_chunk(ident, model, kind, {"content": "\x00"} if kind == "chat" else "\x00", None)).split('"\\u0000"')
            while True:
                what, value = await queue.get()
                if what == "piece":
                    yield head + json.dumps(value, ensure_ascii=False) + tail
                elif what == "done":
                    yield _sse(_chunk(ident, model, kind, {} if kind == "chat" else "", FINISH[value.finish_reason]))
                    if include_usage:
                        yield _sse({"id": ident, "object": _object(kind, True), "created": int(time.time()),
                                    "model": model, "choices": [], "usage": value.usage})
                    yield "data: [DONE]\n\n"
                    return
                else:
                    status = 400 if isinstance(value, SaliError) else 500
                    yield _sse({"error": {"message": str(value), "type": "server_error" if status == 500 else
                                          "invalid_request_error", "param": None, "code": None}})
                    return
        finally:
            cancel.set()  # a client gone mid-stream stops its generation at the next token
            running.discard(cancel)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        head = pick(body)
        messages = [m.plain() for m in body.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", "messages")
        return await respond(request, body, head, engine.prompt(messages, head), lambda **kw: engine.chat(messages, **kw), "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        head = pick(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError(400, "prompt must be one non-empty string", "prompt")
        text = prompts[0]
        return await respond(request, body, head, text, lambda **kw: engine.generate(text, raw=True, **kw), "text")

    return app


def _object(kind: str, chunk: bool) -> str:
    if kind == "chat":
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _chunk(ident: str, model: str, kind: str, delta: Any, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    if kind == "chat":
        choice["delta"] = delta
    else:
        choice.update(text=delta, logprobs=None)
    return {"id": ident, "object": _object(kind, True), "created": int(time.time()), "model": model, "choices": [choice]}


def _final(ident: str, model: str, kind: str, done: Completion) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH[done.finish_reason]}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": done.text}
    else:
        choice.update(text=done.text, logprobs=None)
    return {"id": ident, "object": _object(kind, False), "created": int(time.time()), "model": model,
            "choices": [choice], "usage": done.usage}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def serve(engine: Sali, host: str, port: int, api_key: str | None, announce: Callable[[str], None]) -> None:
    """Run the server until Ctrl-C or SIGTERM (uvicorn's graceful shutdown), then free the model."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown (the process then dies of
            # it); a stop asked for by Ctrl-C or SIGTERM is a normal end here: exit status 0
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=3, lifespan="on")
    server = Server(config)
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        engine.close()
        raise SaliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    names = [engine.name] + [f"{engine.name}+{h}" for h in engine.choices]
    announce(f"serving {', '.join(names)} at http://{host}:{port}/v1 (Ctrl-C stops)")
    try:
        server.run(sockets=[listener])
    finally:
        engine.close()
    announce("stopped")
