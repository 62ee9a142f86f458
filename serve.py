"""An OpenAI-compatible HTTP server for a model you tuned with instruct.py, and a chat page at its root.

    python serve.py --device=cpu              (or: make serve; then open http://127.0.0.1:8000 in a browser)
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "<run name>", "messages": [{"role": "user", "content": "Hello"}]}'

Routes: GET /v1/models and /v1/models/{id}; POST /v1/chat/completions and POST /v1/completions, with "stream": true
sent as server-sent events ending in `data: [DONE]`; GET / the chat page (gptkit/chat_page.html). Replies are
sampled by generate.py's code through chat.py's reply(), so a greedy answer here is generate.py's. One model is in
memory and one thread generates, one request at a time in arrival order, each reply with its own KV cache; at most
--queue requests wait (more get a 429), a reply stops at --deadline_s, a client that goes away stops its reply at
the next token, and Ctrl-C stops every reply. What the server promises, request by request: docs/serving.md.
Nothing here checks who is asking, so it listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import asyncio
import json
import math
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import chat
import generate
from config import UserError
from gptkit import prompts
from gptkit.cli import parse_args, run_cli

# The model comes from the checkpoint and each request brings its seed: of the config fields serve.py reads only these.
CONFIG_FIELDS_USED = {"device", "dtype", "fast_kernels"}

OPTIONS = {
    "ckpt": "",  # a checkpoint file or run folder of instruct.py, dpo.py or rl.py; default: the most recent such run
    "run": "",  # a run name under checkpoints/
    "host": "127.0.0.1",  # the address to listen on; 0.0.0.0 opens the server (which has no login) to the network
    "port": 8000,  # the port to listen on
    "max_tokens": 512,  # the most new tokens one reply may take (more asked is lowered to it), the default too
    "queue": 16,  # requests that may wait behind the one being answered; more get a 429 with Retry-After
    "deadline_s": 300.0,  # a reply that has generated this long ends there (finish_reason "length")
    "cors": "",  # an origin (https://app.example) whose pages may call the API from a browser; none by default
}
MAX_BODY_BYTES = 1 << 20  # a longer request body is refused unread: a prompt that fits the context needs far less
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_STOP_STRINGS = 4  # as OpenAI's API
PAGE = Path(__file__).parent / "gptkit" / "chat_page.html"


class RequestError(Exception):
    """A request this server will not carry out: answered with its status and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.headers = message, param, code, status, headers


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------------------------
# A request, checked field by field: anything unknown, of the wrong type or out of range is a 400 naming the field


# Accepted only at these values (or null): anything else asks for what this server does not do.
ONLY_DEFAULT = {"n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False, 0),
                "top_logprobs": (0,), "logit_bias": ({},), "echo": (False,), "suffix": ("",), "best_of": (1,),
                "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",)}
IGNORED = {"user", "metadata", "store"}  # bookkeeping fields of OpenAI's API: nothing to do here
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt"}


@dataclass
class Ask:
    """What one request asks for, checked."""

    prompt_ids: list[int]
    sampling: generate.Sampling
    max_tokens: int  # what the reply may take: what was asked, lowered to the cap and to what the context leaves
    asked_tokens: int  # what the request asked for (the cap when it did not say)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    dropped_messages: int = 0  # the oldest messages left out so that the conversation fits the context


def number(body: dict, name: str, default, low: float, high: float | None = None, integer: bool = False):
    """body[name] as a number within [low, high], `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(f"{name}={value!r} is not {'an integer' if integer else 'a number'}", name, "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"{name}={value!r} is not a finite number", name, "invalid_value")
    if value < low or (high is not None and value > high):
        span = f"from {low:g} to {high:g}" if high is not None else f"{low:g} or more"
        raise RequestError(f"{name}={value!r} is out of range: it must be {span}", name, "invalid_value")
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{name}={value!r} is not true or false", name, "invalid_type")
    return bool(value)


def stop_strings(value: object) -> list[str]:
    if value is None:
        return []
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise RequestError(f"stop={value!r} must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(strings) > MAX_STOP_STRINGS:
        raise RequestError(f"stop has {len(strings)} strings; at most {MAX_STOP_STRINGS}", "stop", "invalid_value")
    return strings


def check_fields(body: object, allowed: set[str], model_name: str) -> dict:
    """The body as a dict whose fields are all known and whose model is the one served."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None, "invalid_json")
    unknown = sorted(set(body) - allowed - IGNORED - set(ONLY_DEFAULT))
    if unknown:
        raise RequestError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    for name, values in ONLY_DEFAULT.items():  # of the same type too: "n": true is not 1
        if body.get(name) is not None and not any(type(body[name]) is type(v) and body[name] == v for v in values):
            raise RequestError(f"{name}={body[name]!r} is not supported by this server; leave it out", name,
                               "unsupported_value")
    if body.get("model") is None:
        raise RequestError(f"the request has no 'model'; this server has {model_name!r}", "model",
                           "missing_required_parameter")
    if body["model"] != model_name:
        raise RequestError(f"The model {body['model']!r} does not exist here; this server has {model_name!r} "
                           "(GET /v1/models)", "model", "model_not_found", status=404)
    return body


def read_ask(body: dict, fit: Callable[[int], prompts.FittedPrompt], max_tokens_cap: int, default_tokens: int,
             template_stop: list[str]) -> Ask:
    """The sampling fields of a checked body; `fit` fits the prompt into the context for a reply of n tokens (the
    one rule of prompts.fit_conversation). max_tokens above the cap is lowered to it, as other servers do, and said
    in the reply's usage; without max_tokens a reply may take default_tokens (chat.py's: a third of the context,
    which leaves the rest to the conversation). A prompt that leaves no room for any reply is a 400
    context_length_exceeded."""
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = number(body, tokens_field, min(default_tokens, max_tokens_cap), 1, integer=True)
    defaults = generate.SAMPLING_DEFAULTS
    top_k = number(body, "top_k", defaults["top_k"], 1, integer=True)
    sampling = generate.Sampling(number(body, "temperature", defaults["temperature"], 0, 2), top_k,
                                 number(body, "top_p", defaults["top_p"], 0, 1))
    if sampling.top_p == 0:
        raise RequestError("top_p=0 keeps no token; use a value in (0, 1], or temperature=0 for greedy", "top_p",
                           "invalid_value")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise RequestError(f"stream_options={options!r} must be {{\"include_usage\": true|false}}", "stream_options",
                           "invalid_value")
    seed = number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    stop = stop_strings(body.get("stop"))
    try:
        fitted = fit(min(asked, max_tokens_cap))
    except UserError as err:
        raise RequestError(f"This model's maximum context length is exceeded: {err}",
                           "messages" if "messages" in body else "prompt", "context_length_exceeded") from None
    return Ask(fitted.ids, sampling.validate(), fitted.reply_tokens, asked, stop + template_stop, seed,
               flag(body, "stream"), flag(options or {}, "include_usage"), fitted.dropped)


# ----------------------------------------------------------------------------------------------------------------
# Generation: one worker thread, one request at a time


class Job:
    """One request's reply, made on the worker thread; what it produces goes to the request's asyncio queue as
    ("text", piece), then ("done", finish_reason, completion_tokens) or ("error", message). The reply stops at the
    next token once the client has gone (cancelled), the server is stopping, or the deadline has passed."""

    def __init__(self, server: Server, ask: Ask, loop: asyncio.AbstractEventLoop):
        self.server, self.chat_model, self.ask, self.loop = server, server.chat_model, ask, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()  # set when the client has gone: the reply stops at its next token
        self.finished = False

    def put(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (the server is stopping): nobody is left to tell
            self.cancelled.set()

    def run(self) -> None:
        try:
            if self.cancelled.is_set() or self.server.stopping.is_set():  # gone while it waited its turn
                self.put("done", "stop", 0)
                return
            self._generate()
        except Exception:  # a bug: logged once here; the client is told only that the server failed
            traceback.print_exc()
            self.put("error", "the server failed while generating; the detail is in its log")
        finally:
            self.finished = True

    def _generate(self) -> None:
        ask, chat_model = self.ask, self.chat_model
        pieces = generate.TextStream(chat_model.tokenizer, ask.stop)
        seed = ask.seed if ask.seed is not None else random.getrandbits(63)
        generator = torch.Generator(chat_model.device).manual_seed(seed)
        deadline = time.monotonic() + self.server.deadline_s
        late = False

        def on_token(token: int) -> None:
            nonlocal late
            if self.cancelled.is_set() or self.server.stopping.is_set():
                raise generate.StopReply
            piece = pieces.add(token)
            if piece:
                self.put("text", piece)
            if pieces.stopped:
                raise generate.StopReply
            if time.monotonic() > deadline:
                late = True
                raise generate.StopReply

        answer = chat.reply(chat_model, ask.prompt_ids, ask.sampling, ask.max_tokens, generator, on_token)
        rest = pieces.finish()
        if rest:
            self.put("text", rest)
        self.put("done", "length" if late else answer.finish_reason, len(answer.ids))


@dataclass
class Server:
    chat_model: chat.ChatModel
    max_tokens: int
    queue_limit: int = 16
    deadline_s: float = 300.0
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "generate"))
    created: int = field(default_factory=lambda: int(time.time()))
    stopping: threading.Event = field(default_factory=threading.Event)  # set by Ctrl-C: every reply ends now
    jobs: list[Job] = field(default_factory=list)  # taken and not yet finished, oldest first
    seconds_per_job: float = 1.0  # a running mean, for Retry-After

    @property
    def name(self) -> str:
        return self.chat_model.name

    def chat_ask(self, body: object) -> Ask:
        body = check_fields(body, CHAT_FIELDS, self.name)
        try:
            messages = prompts.check_messages(body.get("messages"))
        except UserError as err:
            raise RequestError(str(err), "messages", "invalid_value") from None
        model = self.chat_model
        return read_ask(body, lambda reply: prompts.fit_conversation(model.template, messages, model.tokenizer.encode,
                                                                     model.block_size, reply),
                        self.max_tokens, chat.reply_room(model, 0), prompts.stop_strings(model.template))

    def completion_ask(self, body: object) -> Ask:
        body = check_fields(body, COMPLETION_FIELDS, self.name)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request here)", "prompt", "invalid_type")
        tokenizer, block_size = self.chat_model.tokenizer, self.chat_model.block_size
        ids = tokenizer.encode(prompt) or [tokenizer.eot_token]  # an empty prompt starts from <|endoftext|>

        def fit(reply: int) -> prompts.FittedPrompt:  # the chat rule for a prompt that is one piece of text
            if len(ids) >= block_size:
                raise UserError(f"the prompt is {len(ids)} tokens, which leaves no room for a reply in this model's "
                                f"context of {block_size} tokens; shorten it")
            return prompts.FittedPrompt(ids, 0, min(reply, block_size - len(ids)), reply)

        return read_ask(body, fit, self.max_tokens, chat.reply_room(self.chat_model, 0), [])

    def take(self, job: Job) -> None:
        """Queue a job for the worker, or a 429 when --queue of them already wait."""
        self.jobs = [j for j in self.jobs if not j.finished]  # the one being answered, then those waiting
        if len(self.jobs) > self.queue_limit:
            retry = max(1, math.ceil(self.seconds_per_job * len(self.jobs)))
            raise RequestError(f"{len(self.jobs) - 1} requests are already waiting (--queue={self.queue_limit}); try "
                               f"again in {retry} s", None, "rate_limit_exceeded", 429, {"Retry-After": str(retry)})
        self.jobs.append(job)

        def run_and_time() -> None:
            started = time.monotonic()
            job.run()
            self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.monotonic() - started)

        asyncio.get_running_loop().run_in_executor(self.worker, run_and_time)


def chunk_text(kind: str, piece: str | None, finish_reason: str | None = None) -> dict:
    """The one choice of a streamed chunk: a chat delta or a completion's text."""
    if kind == "chat":
        delta = {} if piece is None else {"content": piece}
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}


async def stream_events(job: Job, kind: str, head: dict) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the finish, the usage when asked, then [DONE]. If the client
    goes away, Starlette cancels this generator and the finally clause stops the reply."""

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if kind == "chat":
            yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        while True:
            name, *rest = await job.queue.get()
            if name == "text":
                yield event({**head, "choices": [chunk_text(kind, rest[0])]})
            elif name == "error":
                yield event(error_body(rest[0], "server_error"))
                break
            else:
                finish_reason, completion_tokens = rest
                yield event({**head, "choices": [chunk_text(kind, None, finish_reason)]})
                if job.ask.include_usage:
                    yield event({**head, "choices": [], "usage": usage(job.ask, completion_tokens)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


async def watch_for_disconnect(request: Request, job: Job) -> None:
    """Cancel the job as soon as the client hangs up: once the body is read, the next ASGI message is the
    disconnect, so the reply stops at its next token rather than running on for nobody."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            return


async def whole_reply(job: Job, request: Request) -> tuple[str, str, int] | None:
    """The reply's text, finish reason and token count; None when the client left before it was done."""
    watcher = asyncio.ensure_future(watch_for_disconnect(request, job))
    text = []
    try:
        while True:
            name, *rest = await job.queue.get()
            if name == "text":
                text.append(rest[0])
            elif name == "error":
                raise ServerFailed(rest[0])
            elif job.cancelled.is_set():
                return None
            else:
                return "".join(text), rest[0], rest[1]
    finally:
        watcher.cancel()
        job.cancelled.set()


class ServerFailed(Exception):
    """A failure already logged, whose generic message the client gets as a 500."""


def usage(ask: Ask, completion_tokens: int) -> dict:
    """OpenAI's usage, and where this server changed the request (as llama.cpp's and vLLM's servers add fields):
    max_tokens, when it was lowered to the cap or to the context's room; dropped_messages, when old turns were left
    out to fit the context."""
    prompt_tokens = len(ask.prompt_ids)
    said = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
    if ask.max_tokens < ask.asked_tokens:
        said["max_tokens"] = ask.max_tokens
    if ask.dropped_messages:
        said["dropped_messages"] = ask.dropped_messages
    return said


async def read_body(request: Request) -> bytes:
    """The body, read up to MAX_BODY_BYTES and no further, whether its length was declared or sent in chunks."""
    too_large = RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", None, "request_too_large", 413)
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_large
    return bytes(raw)


def refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> object:
    """json.loads, strict: NaN and Infinity, nesting too deep for the parser (RecursionError) and integers too long
    to read (Python's 4,300-digit limit) are 400s, not failures of the server."""
    try:
        return json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise RequestError(f"the request body is not valid JSON ({str(err)[:200]})", None, "invalid_json") from None


async def complete(server: Server, request: Request, kind: str) -> Response:
    """POST /v1/chat/completions (kind "chat") and /v1/completions (kind "text")."""
    body = parse_json(await read_body(request))
    ask = server.chat_ask(body) if kind == "chat" else server.completion_ask(body)
    job = Job(server, ask, asyncio.get_running_loop())
    server.take(job)
    head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": server.name}
    if ask.stream:
        head["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"
        return StreamingResponse(stream_events(job, kind, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = await whole_reply(job, request)
    if done is None:
        return Response(status_code=204)  # nobody is there to read it
    text, finish_reason, completion_tokens = done
    choice = {"index": 0, "message": {"role": "assistant", "content": text}} if kind == "chat" else \
        {"index": 0, "text": text, "logprobs": None}
    return JSONResponse({**head, "choices": [{**choice, "finish_reason": finish_reason}],
                         "usage": usage(ask, completion_tokens)})


# ----------------------------------------------------------------------------------------------------------------
# The app


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8000" -> "::1", "localhost:8000" -> "localhost"."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


def guarded(server: Server, handler: Callable[[Request], Awaitable[Response]], loopback_only: bool,
            cors: str) -> Callable[[Request], Awaitable[Response]]:
    """A route's handler behind the checks every request passes, and with its failures answered in one place:
    - bound to loopback, a Host header naming another machine is refused: a web page whose name was rebound to
      127.0.0.1 (DNS rebinding) would otherwise read the replies;
    - a POST must say Content-Type: application/json, which a browser cannot send across origins without asking
      first (a preflight that fails unless --cors names the page's origin), so no page can start generations;
    - a RequestError is its 4xx; any other exception is logged once, with its traceback, and answered with a
      generic 500 that does not show the server's insides."""

    async def checked(request: Request) -> Response:
        try:
            host = request.headers.get("host")  # absent only from hand-made HTTP/1.0 requests, never a browser's
            if loopback_only and host is not None and host_name(host) not in LOOPBACK:
                raise RequestError(f"Host {request.headers.get('host')!r} is not this server's name (it listens on "
                                   "loopback only)", None, "invalid_host", 403)
            if request.method == "POST":
                content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
                if content_type != "application/json":
                    raise RequestError(f"Content-Type {content_type or 'none'!r}: send the body as application/json",
                                       None, "unsupported_media_type", 415)
            response = await handler(request)
        except RequestError as err:
            response = JSONResponse(error_body(err.message, "rate_limit_error" if err.status == 429 else
                                               "invalid_request_error", err.param, err.code), err.status,
                                    headers=err.headers)
        except ServerFailed as err:
            response = JSONResponse(error_body(str(err), "server_error"), 500)
        except Exception:
            traceback.print_exc()
            response = JSONResponse(error_body("the server failed; the detail is in its log", "server_error"), 500)
        if cors and request.headers.get("origin") == cors:
            response.headers["Access-Control-Allow-Origin"] = cors
            response.headers["Vary"] = "Origin"
        return response

    return checked


def build_app(server: Server, loopback_only: bool = True, cors: str = "") -> Starlette:
    def model_card() -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "you"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request) -> Response:  # client.models.retrieve(id)
        if request.path_params["model"] != server.name:
            raise RequestError(f"The model {request.path_params['model']!r} does not exist here; this server has "
                               f"{server.name!r}", "model", "model_not_found", 404)
        return JSONResponse(model_card())

    async def chat_completions(request: Request) -> Response:
        return await complete(server, request, "chat")

    async def completions(request: Request) -> Response:
        return await complete(server, request, "text")

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def preflight(request: Request) -> Response:  # a browser asking whether a page of another origin may call
        if not cors or request.headers.get("origin") != cors:
            raise RequestError("cross-origin calls are off (serve.py --cors=ORIGIN allows one origin)", None,
                               "cors_refused", 403)
        return Response(status_code=204, headers={"Access-Control-Allow-Methods": "GET, POST",
                                                  "Access-Control-Allow-Headers": "Content-Type, Authorization",
                                                  "Access-Control-Max-Age": "600"})

    async def http_error(request: Request, err: HTTPException) -> Response:
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {err.detail}", "invalid_request_error"),
                            err.status_code, headers=err.headers)

    def route(path: str, handler, methods: list[str]) -> Route:
        return Route(path, guarded(server, handler, loopback_only, cors), methods=methods)

    routes = [route("/", page, ["GET"]), route("/v1/models", models, ["GET"]),
              route("/v1/models/{model:path}", one_model, ["GET"]),
              route("/v1/chat/completions", chat_completions, ["POST"]),
              route("/v1/completions", completions, ["POST"])]
    routes += [route(path, preflight, ["OPTIONS"]) for path in ("/v1/models", "/v1/chat/completions",
                                                                 "/v1/completions")]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


class StoppingServer(uvicorn.Server):
    """uvicorn's server, whose Ctrl-C first ends every reply at its next token: uvicorn itself waits for open
    responses to finish, which a long reply would make a wait of many seconds."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.model_server = server

    def handle_exit(self, sig, frame) -> None:
        self.model_server.stopping.set()
        super().handle_exit(sig, frame)


def check_port_free(host: str, port: int) -> None:
    """A taken port as one line, before the model is loaded, rather than uvicorn's log and exit code 1."""
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another with --port=...")


def main(argv: list[str] | None = None) -> None:
    parsed = parse_args(sys.argv[1:] if argv is None else argv, extra=OPTIONS, reads=CONFIG_FIELDS_USED)
    options, train = parsed.options, parsed.config.train
    if not 0 < options["port"] < 65536:
        raise UserError(f"port={options['port']} is not a TCP port; use e.g. --port=8000")
    if options["max_tokens"] < 1:
        raise UserError(f"max_tokens={options['max_tokens']} must be 1 or more")
    if options["queue"] < 0:
        raise UserError(f"queue={options['queue']} must be 0 or more (requests waiting behind the one answered)")
    if not options["deadline_s"] > 0:
        raise UserError(f"deadline_s={options['deadline_s']} must be a positive number of seconds")
    if options["cors"] and not options["cors"].startswith(("http://", "https://")):
        raise UserError(f"cors={options['cors']!r} is not an origin; give one like --cors=https://app.example")
    host = options["host"].strip("[]")
    check_port_free(host, options["port"])
    loopback_only = host in LOOPBACK
    if not loopback_only:
        print(f"note: listening on {host}: whoever reaches this machine can use the model (no login)",
              file=sys.stderr)
    chat_model = chat.load_chat_model(options["ckpt"], options["run"], train.device, train.dtype,
                                      "dtype" in parsed.overridden, train.fast_kernels,
                                      say=lambda line: print(line, file=sys.stderr))
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {chat_model.name} at http://{shown}:{options['port']}/ (the chat page; the API under /v1); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    server = Server(chat_model, options["max_tokens"], options["queue"], options["deadline_s"])
    config = uvicorn.Config(build_app(server, loopback_only, options["cors"]), host=host, port=options["port"],
                            log_level="warning", timeout_graceful_shutdown=2)
    StoppingServer(config, server).run()
    server.worker.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    run_cli(main)
