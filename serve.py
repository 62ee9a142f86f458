"""An OpenAI-compatible HTTP server for a model you tuned with instruct.py, and a chat page at its root.

    python serve.py --device=cpu              (or: make serve; then open http://127.0.0.1:8000 in a browser)
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "<run name>", "messages": [{"role": "user", "content": "Hello"}]}'

Routes: GET /v1/models; POST /v1/chat/completions and POST /v1/completions, with "stream": true sent as
server-sent events ending in `data: [DONE]`; GET / the chat page (gptkit/chat_page.html). Replies are sampled by
generate.py's code through chat.py's reply(), so a greedy answer here is generate.py's. One model is in memory and
one thread generates, one request at a time in arrival order: each reply has its own KV cache and no two run at
once. A client that goes away stops its generation. Nothing here checks who is asking, so it listens on 127.0.0.1
unless --host says otherwise.
"""

from __future__ import annotations

import gptkit.packages  # noqa: F401  (first: a Python without torch gets one line on how to run, no traceback)

# isort: split
import asyncio
import json
import random
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
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
import data
import generate
from config import UserError
from gptkit import prompts
from gptkit.cli import parse_args, run_cli

# The model comes from the checkpoint and each request brings its seed: of the config fields serve.py reads only these.
CONFIG_FIELDS_USED = {"device", "dtype", "fast_kernels"}

OPTIONS = {
    "ckpt": "",  # a checkpoint file or run folder of instruct.py; default: the most recent instruct.py run
    "run": "",  # a run name under checkpoints/
    "host": "127.0.0.1",  # the address to listen on; 0.0.0.0 opens the server (which has no login) to the network
    "port": 8000,  # the port to listen on
    "max_tokens": 512,  # the most new tokens one request may ask for, and what it gets when it does not say
}
MAX_BODY_BYTES = 1 << 20  # a longer request body is refused unread: a prompt that fits the context needs far less
MAX_STOP_STRINGS = 4  # as OpenAI's API
PAGE = Path(__file__).parent / "gptkit" / "chat_page.html"


class RequestError(Exception):
    """A request this server will not carry out: answered with its status and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------------------------
# A request, checked field by field: anything unknown, of the wrong type or out of range is a 400 naming the field


# Accepted only at these values (or null): anything else asks for what this server does not do.
ONLY_DEFAULT = {"n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False, 0),
                "top_logprobs": (0,), "logit_bias": ({},), "echo": (False,), "suffix": ("",), "best_of": (1,),
                "response_format": ({"type": "text"},), "tools": ([],)}
IGNORED = {"user", "metadata", "store"}  # bookkeeping fields of OpenAI's API: nothing to do here
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt"}


@dataclass
class Ask:
    """What one request asks for, checked."""

    prompt_ids: list[int]
    sampling: generate.Sampling
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def number(body: dict, name: str, default, low: float, high: float | None = None, integer: bool = False):
    """body[name] as a number within [low, high], `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(f"{name}={value!r} is not {'an integer' if integer else 'a number'}", name, "invalid_type")
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
    for name, values in ONLY_DEFAULT.items():
        if body.get(name) is not None and body[name] not in values:
            raise RequestError(f"{name}={body[name]!r} is not supported by this server; leave it out", name,
                               "unsupported_value")
    if body.get("model") is None:
        raise RequestError(f"the request has no 'model'; this server has {model_name!r}", "model",
                           "missing_required_parameter")
    if body["model"] != model_name:
        raise RequestError(f"The model {body['model']!r} does not exist here; this server has {model_name!r} "
                           "(GET /v1/models)", "model", "model_not_found", status=404)
    return body


def read_ask(body: dict, prompt_ids: list[int], prompt_field: str, block_size: int, max_tokens_cap: int) -> Ask:
    """The sampling fields of a checked body, for a prompt of these ids."""
    if len(prompt_ids) > block_size:
        raise RequestError(f"This model's maximum context length is {block_size} tokens, but the prompt "
                           f"({prompt_field}) is {len(prompt_ids)} tokens; shorten it"
                           + (" or leave out the oldest messages" if prompt_field == "messages" else ""),
                           prompt_field, "context_length_exceeded")
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, tokens_field, max_tokens_cap, 1, max_tokens_cap, integer=True)
    top_k = number(body, "top_k", None, 1, integer=True)
    sampling = generate.Sampling(number(body, "temperature", 1.0, 0, 2), top_k, number(body, "top_p", 1.0, 0, 1))
    if sampling.top_p == 0:
        raise RequestError("top_p=0 keeps no token; use a value in (0, 1], or temperature=0 for greedy", "top_p",
                           "invalid_value")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise RequestError(f"stream_options={options!r} must be {{\"include_usage\": true|false}}", "stream_options",
                           "invalid_value")
    seed = number(body, "seed", None, -(2**63), 2**63 - 1, integer=True)
    return Ask(prompt_ids, sampling.validate(), max_tokens, stop_strings(body.get("stop")), seed,
               flag(body, "stream"), flag(options or {}, "include_usage"))


# ----------------------------------------------------------------------------------------------------------------
# Generation: one worker thread, one request at a time


class TextPieces:
    """A reply's tokens -> the text to send as it grows: never half a character, never a stop string. Text that may
    be the start of a stop string waits until the next tokens tell."""

    def __init__(self, tokenizer: data.Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # the reply so far, cut before a stop string once one appears
        self.sent = 0  # characters of text already sent
        self.stopped = False  # a stop string was written

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._update(final=False)

    def finish(self) -> str:
        """What is left to send once the reply has ended, a character cut off at its end included."""
        return self._send(len(self.text)) if self.stopped else self._update(final=True)

    def _update(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:  # a character split across tokens: wait for the rest
            return ""
        found = [text.find(s) for s in self.stop if s in text]
        if found:
            self.stopped, self.text = True, text[:min(found)]
            return self._send(len(self.text))
        self.text = text
        held = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                                   default=0)
        return self._send(len(text) - held)

    def _send(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece


class Job:
    """One request's reply, made on the worker thread; what it produces goes to the request's asyncio queue as
    ("text", piece), then ("done", finish_reason, completion_tokens) or ("error", message)."""

    def __init__(self, chat_model: chat.ChatModel, ask: Ask, loop: asyncio.AbstractEventLoop):
        self.chat_model, self.ask, self.loop = chat_model, ask, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()  # set when the client has gone: the reply stops at its next token

    def put(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def run(self) -> None:
        if self.cancelled.is_set():  # the client left while it waited its turn
            return
        ask, chat_model = self.ask, self.chat_model
        pieces = TextPieces(chat_model.tokenizer, ask.stop)
        seed = ask.seed if ask.seed is not None else random.getrandbits(63)
        generator = torch.Generator(chat_model.device).manual_seed(seed)

        def on_token(token: int) -> None:
            if self.cancelled.is_set():
                raise chat.StopReply
            piece = pieces.add(token)
            if piece:
                self.put("text", piece)
            if pieces.stopped:
                raise chat.StopReply

        try:
            answer = chat.reply(chat_model, ask.prompt_ids, ask.sampling, ask.max_tokens, generator, on_token)
            rest = pieces.finish()
            if rest:
                self.put("text", rest)
            self.put("done", answer.finish_reason, len(answer.ids))
        except Exception as err:  # a bug: said to the client and logged, and the server goes on
            traceback.print_exc()
            self.put("error", f"the server failed while generating: {type(err).__name__}: {err}")


@dataclass
class Server:
    chat_model: chat.ChatModel
    max_tokens: int
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "generate"))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def name(self) -> str:
        return self.chat_model.name

    def chat_ask(self, body: object) -> Ask:
        body = check_fields(body, CHAT_FIELDS, self.name)
        try:
            messages = prompts.check_messages(body.get("messages"))
        except UserError as err:
            raise RequestError(str(err), "messages", "invalid_value") from None
        return read_ask(body, self.chat_model.prompt_ids(messages), "messages", self.chat_model.block_size,
                        self.max_tokens)

    def completion_ask(self, body: object) -> Ask:
        body = check_fields(body, COMPLETION_FIELDS, self.name)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request here)", "prompt", "invalid_type")
        tokenizer = self.chat_model.tokenizer
        ids = tokenizer.encode(prompt) or [tokenizer.eot_token]  # an empty prompt starts from <|endoftext|>
        return read_ask(body, ids, "prompt", self.chat_model.block_size, self.max_tokens)


def chunk_text(kind: str, piece: str | None, finish_reason: str | None = None) -> dict:
    """The one choice of a streamed chunk: a chat delta or a completion's text."""
    if kind == "chat":
        delta = {} if piece is None else {"content": piece}
        return {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}


async def stream_events(server: Server, job: Job, kind: str, head: dict) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the finish, the usage when asked, then [DONE]. If the client
    goes away, Starlette cancels this generator and the finally clause stops the reply."""

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    loop = asyncio.get_running_loop()
    loop.run_in_executor(server.worker, job.run)
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


async def whole_reply(server: Server, job: Job, request: Request) -> tuple[str, str, int] | None:
    """The reply's text, finish reason and token count; None when the client left before it was done."""
    loop = asyncio.get_running_loop()
    loop.run_in_executor(server.worker, job.run)
    text = []
    try:
        while True:
            try:
                name, *rest = await asyncio.wait_for(job.queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if name == "text":
                text.append(rest[0])
            elif name == "error":
                raise RuntimeError(rest[0])
            else:
                return "".join(text), rest[0], rest[1]
    finally:
        job.cancelled.set()


def usage(ask: Ask, completion_tokens: int) -> dict:
    prompt_tokens = len(ask.prompt_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def complete(server: Server, request: Request, kind: str) -> Response:
    """POST /v1/chat/completions (kind "chat") and /v1/completions (kind "text")."""
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", None, "request_too_large", 413)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(f"the request body is over {MAX_BODY_BYTES} bytes", None, "request_too_large", 413)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON ({err})", None, "invalid_json") from None
    ask = server.chat_ask(body) if kind == "chat" else server.completion_ask(body)
    job = Job(server.chat_model, ask, asyncio.get_running_loop())
    head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": server.name}
    if ask.stream:
        head["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"
        return StreamingResponse(stream_events(server, job, kind, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = await whole_reply(server, job, request)
    if done is None:
        return Response(status_code=204)  # nobody is there to read it
    text, finish_reason, completion_tokens = done
    choice = {"index": 0, "message": {"role": "assistant", "content": text}} if kind == "chat" else \
        {"index": 0, "text": text, "logprobs": None}
    return JSONResponse({**head, "choices": [{**choice, "finish_reason": finish_reason}],
                         "usage": usage(ask, completion_tokens)})


# ----------------------------------------------------------------------------------------------------------------
# The app


def build_app(server: Server) -> Starlette:
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": server.name, "object": "model",
                                                         "created": server.created, "owned_by": "you"}]})

    async def chat_completions(request: Request) -> Response:
        return await complete(server, request, "chat")

    async def completions(request: Request) -> Response:
        return await complete(server, request, "text")

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def refused(request: Request, err: RequestError) -> Response:
        return JSONResponse(error_body(err.message, "invalid_request_error", err.param, err.code), err.status)

    async def http_error(request: Request, err: HTTPException) -> Response:
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {err.detail}", "invalid_request_error"),
                            err.status_code, headers=err.headers)

    async def failed(request: Request, err: Exception) -> Response:
        traceback.print_exception(err)
        return JSONResponse(error_body(f"the server failed: {type(err).__name__}: {err}", "server_error"), 500)

    routes = [Route("/", page), Route("/v1/models", models), Route("/v1/chat/completions", chat_completions,
                                                                    methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={RequestError: refused, HTTPException: http_error,
                                                        Exception: failed})


def check_port_free(host: str, port: int) -> None:
    """A taken port as one line, before the model is loaded, rather than uvicorn's log and exit code 1."""
    try:
        with socket.create_server((host, port)):
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
    check_port_free(options["host"], options["port"])
    if options["host"] not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {options['host']}: whoever reaches this machine can use the model (no login)",
              file=sys.stderr)
    chat_model = chat.load_chat_model(options["ckpt"], options["run"], train.device, train.dtype,
                                      "dtype" in parsed.overridden, train.fast_kernels,
                                      say=lambda line: print(line, file=sys.stderr))
    host = f"[{options['host']}]" if ":" in options["host"] else options["host"]
    print(f"serving {chat_model.name} at http://{host}:{options['port']}/ (the chat page; the API under /v1); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    uvicorn.run(build_app(Server(chat_model, options["max_tokens"])), host=options["host"], port=options["port"],
                log_level="warning")


if __name__ == "__main__":
    run_cli(main)
