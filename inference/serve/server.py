"""An OpenAI-compatible HTTP server over :class:`inference.engine.Engine`, on the standard library alone.

Routes (all of them behind ``Authorization: Bearer KEY`` when the server has an API key):

- ``GET  /health``               ``{"status": "ok", "active_generations", "running", "waiting", "tokens_per_second",
                                  "max_running", ...}``: chat requests in this server, sequences generating and
                                  waiting in the engine's batch, generated tokens/s over the last 10 s, and the
                                  engine's cumulative counters (tokens generated, time and count of prefill
                                  forwards and decode steps)
- ``GET  /v1/models``            the base model and each adapter, as OpenAI model objects
- ``GET  /v1/models/{id}``       one of them (404 when unknown)
- ``POST /v1/chat/completions``  a chat completion, whole or streamed as server-sent events
- ``GET  /openapi.json``         an OpenAPI 3 description of all of these (:mod:`inference.serve.openapi`)

Every error is OpenAI-shaped JSON, ``{"error": {"message", "type", "param", "code"}}``; a 405 names the allowed
method in ``Allow``. A request is validated in full (fields, model id, messages, prompt length) before any compute.

Limits, each a clear answer rather than a hang:

- ``max_concurrent`` requests generate at once (the engine's ``max_batch``); up to ``max_queue`` more wait for a
  slot, oldest first. Beyond that a request gets **429** ``server_overloaded`` at once; one still waiting after
  ``max_wait`` seconds leaves the queue with **503** ``server_overloaded`` ("waited N s for a free slot"). Both carry
  ``Retry-After`` (whole seconds: the median time to first token over the last 10 s, rounded up, 1 to 60).
- A stream's headers go out only once the engine has **admitted** the request (given it a slot): a request refused,
  timed out in the queue or failing before then is a plain JSON error, never a broken stream. After the headers a
  failure is reported in-band (an ``error`` event, then ``[DONE]``), as OpenAI does.
- ``max_tokens`` above ``max_tokens_cap`` is capped (clients send large defaults) and the reply says so in the
  ``X-Max-Tokens-Capped: CAP`` header (whole and streamed; a ``--verbose`` line too).
- A client that goes away frees its slot at once, also while it waits in the queue: its socket reads as
  end-of-file (asked after every token, and every 0.2 s while no token comes) or a write fails.
- Bodies over ``max_body_bytes`` get 413 unread. The server binds 127.0.0.1 unless told otherwise, and then only
  with an API key.

Shutting down (``serve``): the first Ctrl-C or SIGTERM closes the listening socket at once (new connections are
refused), answers any new request on an open keep-alive connection with 503 + ``Retry-After`` + ``Connection:
close``, and lets the requests running or waiting finish for up to ``drain_seconds``; a second signal ends the
drain at once. Then ``server_close`` cancels whatever is left and joins every handler thread, and the signal goes
on to the command (exit 130 for Ctrl-C, 143 for SIGTERM).

Each connection has a thread; all of them submit to the engine's scheduler, which generates every request in one
continuously batched loop. ``make_server`` builds it (``port=0``: a free port), ``serve`` runs it until a signal.
"""

from __future__ import annotations

import hmac
import json
import math
import select
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from inference.engine import (
    Completion,
    Delta,
    Engine,
    Overloaded,
    PromptTooLong,
    QueueTimeout,
    SamplingParams,
    TooLarge,
    UnknownModel,
)
from inference.errors import UserError
from inference.harmony import REASONING_EFFORTS
from inference.serve import openapi

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# How long a request may wait for a slot. Long enough for a queue of ordinary replies to drain on a busy server,
# and under the official openai client's default read timeout (600 s), so a client that waits gets our clear 503,
# not its own timeout and a retry of a request it no longer knows the fate of.
DEFAULT_MAX_WAIT_S = 300.0
# Kubernetes' default grace period between SIGTERM and SIGKILL: a drain longer than that would be killed anyway.
DEFAULT_DRAIN_S = 30.0
MAX_RETRY_AFTER_S = 60     # a longer hint would be a guess: the load a minute from now is not known
MAX_STOP_STRINGS = 4
# What writing to (or reading from) a connection the client has dropped raises: it ends that request, never the server.
DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class ApiError(Exception):
    """A request that fails as OpenAI's API would fail it: an HTTP status and an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_user_error(exc: UserError) -> ApiError:
    """The engine's errors with OpenAI's statuses and codes. The others (``MessageError`` for messages and tools,
    ``BadParameter``) are plain 400s whose message already says which field and where."""
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, TooLarge):
        return ApiError(400, str(exc), param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, Overloaded):
        return ApiError(429, str(exc), "rate_limit_error", code="server_overloaded")
    if isinstance(exc, QueueTimeout):
        return ApiError(503, str(exc), "server_error", code="server_overloaded")
    return ApiError(400, str(exc))


# ---------------------------------------------------------------------------------------------- request validation

@dataclass(frozen=True)
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body."""

    model: str
    messages: list[dict]
    tools: list[dict] | None
    reasoning_effort: str | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    capped_from: int | None = None     # the max_tokens asked for, when it was above the cap


def _typed(body: dict, name: str, types: tuple[type, ...], expected: str):
    """``body[name]`` if it has one of ``types`` (null counts as absent); bool never passes for a number, and a
    float with no fractional part passes for an integer (JSON Schema's rule, and what ``json.dumps(100.0)`` sends)."""
    value = body.get(name)
    if value is None:
        return None
    if int in types and float not in types and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ApiError(400, f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", param=name)
    return value


def _in_range(body: dict, name: str, ok, expected: str, types: tuple[type, ...] = (int, float)):
    value = _typed(body, name, types, expected)
    if value is not None and not ok(value):
        raise ApiError(400, f"'{name}' must be {expected}, got {value!r}", param=name)
    return value


def _tools(body: dict) -> list | None:
    """``tools`` for the engine (which validates them), or None when ``tool_choice`` is "none"."""
    choice = body.get("tool_choice")
    if choice == "required" or isinstance(choice, dict):
        # Harmony has no way to force a call; pretending to honour it would silently return plain text.
        raise ApiError(400, "tool_choice 'required' or a named function is not supported; use 'auto' or 'none'",
                       param="tool_choice", code="unsupported_value")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, f"'tool_choice' must be 'auto' or 'none', got {json.dumps(choice)[:80]}",
                       param="tool_choice")
    return None if choice == "none" else body.get("tools")


def _stop(body: dict) -> tuple[str, ...]:
    stop = _typed(body, "stop", (str, list), "a string or a list of up to 4 strings")
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    return tuple(stops)


def _max_tokens(body: dict, cap: int) -> tuple[int, int | None]:
    """``max_completion_tokens`` (the current name) or ``max_tokens`` (the old one), capped; the cap by default.
    Returns (tokens, what was asked when that was above the cap)."""
    values = [_in_range(body, name, lambda v: v >= 1, "an integer >= 1", (int,))
              for name in ("max_completion_tokens", "max_tokens")]
    asked = next((v for v in values if v is not None), None)
    if asked is None:
        return cap, None
    return min(asked, cap), asked if asked > cap else None


def parse_chat(body: dict, model_ids: list[str], max_tokens_cap: int) -> ChatRequest:
    """Check every field we read; unknown fields are ignored, as OpenAI-compatible servers commonly do."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", param="model")
    if model not in model_ids:
        raise ApiError(404, f"The model '{model}' does not exist; available: {', '.join(model_ids)}",
                       param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty list", param="messages")
    _in_range(body, "n", lambda v: v == 1, "1 (one choice per request)", (int,))
    if _typed(body, "logprobs", (bool,), "a boolean"):
        raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    effort = _typed(body, "reasoning_effort", (str,), "'low', 'medium' or 'high'")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ApiError(400, f"'reasoning_effort' must be 'low', 'medium' or 'high', got {effort!r}",
                       param="reasoning_effort")
    temperature = _in_range(body, "temperature", lambda v: 0 <= v <= 2, "a number between 0 and 2")
    top_p = _in_range(body, "top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
    # int64, as OpenAI documents it (and what torch's generator seeding accepts).
    seed = _in_range(body, "seed", lambda v: -2**63 <= v < 2**63, "a 64-bit integer", (int,))
    stream = bool(_typed(body, "stream", (bool,), "a boolean"))
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(_typed(options, "include_usage", (bool,), "a boolean"))
    max_tokens, capped_from = _max_tokens(body, max_tokens_cap)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else float(temperature),
                            top_p=1.0 if top_p is None else float(top_p), seed=seed, stop=_stop(body))
    return ChatRequest(model, messages, _tools(body), effort, params, stream, include_usage, capped_from)


# ---------------------------------------------------------------------------------------------- response shapes

def message_of(completion: Completion) -> dict:
    message = {"role": "assistant", "content": completion.content, "reasoning": completion.reasoning}
    if completion.tool_calls:
        message["tool_calls"] = [{"id": call["id"], "type": "function",
                                  "function": {"name": call["name"], "arguments": call["arguments"]}}
                                 for call in completion.tool_calls]
    return message


def usage_of(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def delta_of(event: Delta) -> dict:
    """One engine delta as a chunk's ``delta``; a tool call's id, type and name go only with its first piece."""
    if event.kind != "tool_call":
        return {event.kind: event.text}
    call: dict = {"index": event.index, "function": {"arguments": event.text}}
    if event.name is not None:
        call.update(id=event.call_id, type="function")
        call["function"]["name"] = event.name
    return {"tool_calls": [call]}


# ---------------------------------------------------------------------------------------------- HTTP

class ChatServer(ThreadingHTTPServer):
    """One thread per connection; all of them share one engine (which interleaves concurrent generations).

    ``server_close`` ends every open connection and waits for the handler threads: a thread still inside torch when
    the interpreter exits aborts the process ("terminate called without an active exception"), so none may outlive
    the server. A generation in progress stops at its next token, when it finds its client gone.
    ``stop_accepting`` and ``wait_idle`` are the two halves of a graceful drain (see the module docstring).
    """

    daemon_threads = False  # so that server_close joins the handler threads
    request_queue_size = 256  # the listen backlog: the standard library's 5 reset connections at 32+ clients

    def __init__(self, address: tuple[str, int], engine: Engine, api_key: str | None, max_body_bytes: int,
                 max_tokens_cap: int, verbose: bool, max_wait: float | None = DEFAULT_MAX_WAIT_S):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.engine, self.api_key, self.verbose = engine, api_key, verbose
        self.max_body_bytes, self.max_tokens_cap, self.max_wait = max_body_bytes, max_tokens_cap, max_wait
        self.created = int(time.time())
        self.active_generations = 0
        self.draining = False
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._schema: dict | None = None
        super().__init__(address, ChatHandler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can stall for seconds offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address):
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def stop_accepting(self) -> int:
        """The start of a drain: close the listening socket (a new connection is refused at once, not left in the
        backlog) and answer every new request on an open connection 503. Returns the chat requests in flight.
        ``serve_forever`` must have returned (``serve`` is past it; a test calls ``shutdown`` first)."""
        self.draining = True
        self.socket.close()
        return self.active_generations

    def wait_idle(self, seconds: float) -> int:
        """Wait until no chat request is in flight, for ``seconds`` at most; returns how many still are."""
        deadline = time.monotonic() + seconds
        while self.active_generations and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.active_generations

    def server_close(self):
        with self._lock:
            connections = list(self._connections)
        for connection in connections:  # wakes idle keep-alive readers; a generation sees its client gone
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by the client
                pass
        self.engine.close()   # every generation in flight ends now, so the handler threads can be joined
        super().server_close()

    def handle_error(self, request, client_address):
        # socketserver would print a traceback; a client resetting an idle keep-alive connection is normal.
        exc = sys.exc_info()[1]
        if not isinstance(exc, DISCONNECTED):
            print(f"server error with {client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)

    @contextmanager
    def generation(self):
        with self._lock:
            self.active_generations += 1
        try:
            yield
        finally:
            with self._lock:
                self.active_generations -= 1

    def retry_after(self) -> int:
        """Seconds a refused client should wait before retrying: how long requests lately waited for their first
        token (the median over the last 10 s, rounded up), 1 when nothing was measured, at most 60."""
        waited = self.engine.stats().get("ttft_p50_s") or 1
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(waited)))

    def schema(self) -> dict:
        if self._schema is None:   # the model ids and the key are fixed for the server's life
            self._schema = openapi.schema(self.engine.model_ids, authenticated=self.api_key is not None,
                                          max_tokens_cap=self.max_tokens_cap)
        return self._schema

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length or is chunked
    timeout = 300                  # an idle or stalled connection gives its thread back
    server: ChatServer

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    # routed, so a known path answers 405 (with Allow) rather than the standard library's 501
    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_POST
    do_HEAD = do_GET                           # a GET route's headers without its body (_send_json)

    # ------------------------------------------------------------------ dispatch

    def _handle(self):
        self._body_read = self._streaming = False
        try:
            if self.server.draining:   # an open keep-alive connection during a drain: no new work, go elsewhere
                self.close_connection = True
                raise ApiError(503, "the server is shutting down and takes no new requests; retry (another "
                               "instance, or this one once restarted)", "server_error", code="server_shutting_down")
            self._authorize()
            self._route()()
        except ApiError as err:
            self._send_error(err)
        except DISCONNECTED:
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a bug of ours: log one line, answer 500, keep serving
            self._log_failure(exc)
            if self._streaming:  # too late for a status line: drop the connection
                self.close_connection = True
            else:
                self._send_error(ApiError(500, "internal server error", "server_error"))

    def _log_failure(self, exc: Exception):
        print(f"server error on {self.command} {self.path}: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _authorize(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    def _route(self):
        path = urlsplit(self.path).path
        if path == "/health":
            allowed, handler = "GET", self._health
        elif path == "/v1/models":
            allowed, handler = "GET", self._models
        elif path.startswith("/v1/models/"):
            allowed, handler = "GET", lambda: self._model(unquote(path.removeprefix("/v1/models/")))
        elif path == "/v1/chat/completions":
            allowed, handler = "POST", self._chat
        elif path == "/openapi.json":
            allowed, handler = "GET", lambda: self._send_json(200, self.server.schema())
        else:
            raise ApiError(404, f"no route {path}", "not_found_error")
        method = "GET" if self.command == "HEAD" else self.command
        if method != allowed:
            raise ApiError(405, f"{path} accepts {allowed}, not {self.command}",
                           headers={"Allow": "GET, HEAD" if allowed == "GET" else allowed})
        return handler

    # ------------------------------------------------------------------ routes

    def _health(self):
        # running/waiting are the scheduler's (a request waits when every slot is busy); tokens/s over the last 10 s
        self._send_json(200, {"status": "ok", "active_generations": self.server.active_generations,
                              **self.server.engine.stats()})

    def _model_object(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.server.created, "owned_by": "local"}

    def _models(self):
        self._send_json(200, {"object": "list", "data": [self._model_object(m) for m in self.server.engine.model_ids]})

    def _model(self, model_id: str):
        if model_id not in self.server.engine.model_ids:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        self._send_json(200, self._model_object(model_id))

    def _chat(self):
        # Counted from the body on, so that a drain waits for a request that is still being read or encoded.
        with self.server.generation():
            self._generate(parse_chat(self._read_json(), self.server.engine.model_ids, self.server.max_tokens_cap))

    def _generate(self, request: ChatRequest):
        engine, server = self.server.engine, self.server
        headers = {}
        if request.capped_from is not None:   # told, not refused: clients send large defaults
            headers["X-Max-Tokens-Capped"] = str(server.max_tokens_cap)
            if server.verbose:
                self._log_line(f"max_tokens {request.capped_from} capped to {server.max_tokens_cap} "
                               "(--max-tokens-cap)")
        envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": request.model}
        try:
            prompt = engine.encode_chat(request.messages, request.tools, request.reasoning_effort)
            # The engine checks model, parameters and prompt length here, before any compute, and queues it.
            admitted = (lambda: self._start_stream(envelope, headers)) if request.stream else None
            events = engine.stream(prompt, request.params, model=request.model, cancelled=self._client_gone,
                                   max_wait=server.max_wait, admitted=admitted)
            try:
                if request.stream:
                    self._stream(request, events, envelope)
                else:
                    completion = self._last(events)
                    self._send_json(200, {**envelope, "object": "chat.completion",
                                          "choices": [{"index": 0, "message": message_of(completion),
                                                       "finish_reason": completion.finish_reason}],
                                          "usage": usage_of(completion)}, headers)
            finally:
                events.close()  # stops the generation when the client left or anything failed
        except UserError as exc:   # before a stream's headers (after them _stream reports in-band)
            raise from_user_error(exc) from None

    def _last(self, events: Iterator[Delta | Completion]) -> Completion:
        """Run a generation to its Completion; the engine gives up as soon as the client is gone."""
        for event in events:   # the engine asks _client_gone after every token, and while it waits for a slot
            if isinstance(event, Completion):
                if event.finish_reason == "cancelled":
                    raise ConnectionAbortedError("client closed the connection while waiting for its reply")
                return event
        raise RuntimeError("the engine's stream ended without a Completion")

    def _client_gone(self) -> bool:
        """True once the client has closed its end: the socket reads as end-of-file without blocking."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _start_stream(self, envelope: dict, headers: dict):
        """The stream's headers and its first chunk (the role), sent when the engine admits the request."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._streaming = True
        self._send_event({**envelope, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}]})

    def _stream(self, request: ChatRequest, events: Iterator[Delta | Completion], envelope: dict):
        """Server-sent events over chunked transfer: role (once admitted), deltas, finish reason, usage (if
        asked), [DONE]. Until the headers are out (``_start_stream``), every failure is a plain HTTP error."""
        envelope = {**envelope, "object": "chat.completion.chunk"}

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        try:
            for event in events:
                if isinstance(event, Completion):
                    if event.finish_reason == "cancelled":
                        raise ConnectionAbortedError("client closed the connection mid-stream")
                    self._send_event(chunk({}, event.finish_reason))
                    if request.include_usage:
                        self._send_event({**envelope, "choices": [], "usage": usage_of(event)})
                else:
                    self._send_event(chunk(delta_of(event)))
        except DISCONNECTED:
            raise
        # Headers are out, so a failure is reported in-band (as OpenAI does) and the stream still ends properly.
        except Exception as exc:  # noqa: BLE001 - as in _handle
            if not self._streaming:   # not admitted yet: a plain HTTP error (_generate, _handle)
                raise
            if isinstance(exc, UserError):
                error = from_user_error(exc)
            else:
                self._log_failure(exc)
                error = ApiError(500, "internal server error", "server_error")
            self._send_event(error.body())
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")  # the zero-length chunk ends the body; the connection stays usable ...
        if self.server.draining:   # ... except during a drain: its thread ends now rather than wait for a request
            self.close_connection = True

    # ------------------------------------------------------------------ I/O

    def _content_length(self) -> int:
        if "Content-Length" not in self.headers:
            raise ApiError(411, "a Content-Length header is required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise ApiError(400, "Content-Length must be an integer") from None
        if length < 0:
            raise ApiError(400, "Content-Length must not be negative")
        if length > self.server.max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}")
        return length

    def _read_json(self) -> dict:
        length = self._content_length()
        raw = self.rfile.read(length)
        self._body_read = True
        if len(raw) < length:
            raise ConnectionResetError("client closed the connection mid-body")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:   # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no text can hold: refused here, not a 500
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError(400, f"the request body holds a lone UTF-16 surrogate ({exc.object[exc.start:exc.end]!a}), "
                           "which is not text") from None
        return body

    def _discard_body(self):
        """Read an unread body, or close the connection: left in the socket it would parse as the next request."""
        if self._body_read or not ("Content-Length" in self.headers or "Transfer-Encoding" in self.headers):
            return
        try:
            self.rfile.read(self._content_length())
        except ApiError:  # no usable length, or too big to read just to throw away
            self.close_connection = True

    def _send_json(self, status: int, payload: dict, headers: dict | None = None):
        data = json.dumps(payload).encode()
        if self.server.draining:   # a reply finished during a drain: the client should not reuse the connection
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has the headers of the body it does not send
            self.wfile.write(data)

    def _send_error(self, err: ApiError):
        self._discard_body()
        headers = dict(err.headers)
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if err.status in (429, 503):   # overloaded, timed out in the queue, shutting down: when to come back
            headers.setdefault("Retry-After", str(self.server.retry_after()))
        self._send_json(err.status, err.body(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """The standard library's own errors (malformed request line, unknown method) as OpenAI-shaped JSON."""
        self.close_connection = True
        error = ApiError(code, message or HTTPStatus(code).phrase, "server_error" if code >= 500 else
                         "invalid_request_error")
        self._send_json(code, error.body())

    def _send_event(self, payload: dict):
        self._write_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _write_chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def log_message(self, format: str, *args):
        if self.server.verbose:
            self._log_line(format % args)

    def _log_line(self, text: str):
        sys.stderr.write(f"{self.address_string()} - {text}\n")


def check_host(host: str, api_key: str | None) -> None:
    """Only this machine may be served without a key."""
    if host not in LOCAL_HOSTS and not api_key:
        raise UserError(f"refusing to listen on {host} without --api-key (anyone who can reach it could use it)")


def check_port(host: str, port: int) -> None:
    """A UserError now when ``host:port`` cannot be bound (in use, not an address here), before a model loads for
    minutes only to fail at the end."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds (allow_reuse_address)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server using it? "
                            "choose another --port") from None


def check_limits(max_tokens_cap: int = 4096, max_body_bytes: int = 1_000_000, max_wait: float | None = None,
                 drain_seconds: float = DEFAULT_DRAIN_S, max_concurrent: int | None = None,
                 max_queue: int | None = None) -> None:
    """The server's limits, checked before a model loads: each bad one is one UserError naming its flag."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for flag, value in (("--max-concurrent", max_concurrent), ("--max-queue", max_queue)):
        if value is not None and value < 1:   # the engine would take 0 slots for "the default"
            raise UserError(f"{flag} must be an integer >= 1, got {value}")
    if not is_int(max_tokens_cap) or max_tokens_cap < 1:
        raise UserError(f"--max-tokens-cap must be an integer >= 1, got {max_tokens_cap!r}")
    if not is_int(max_body_bytes) or max_body_bytes < 1:
        raise UserError(f"--max-body-bytes must be an integer >= 1, got {max_body_bytes!r}")
    if max_wait is not None and not (isinstance(max_wait, (int, float)) and math.isfinite(max_wait) and max_wait > 0):
        raise UserError(f"--max-wait must be a positive number of seconds, got {max_wait!r}")
    if not (isinstance(drain_seconds, (int, float)) and math.isfinite(drain_seconds) and drain_seconds >= 0):
        raise UserError(f"--drain-seconds must be a number of seconds >= 0, got {drain_seconds!r}")


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                max_body_bytes: int = 1_000_000, max_tokens_cap: int = 4096, verbose: bool = False,
                max_wait: float | None = DEFAULT_MAX_WAIT_S) -> ChatServer:
    """A bound, not yet serving server (``port=0`` picks a free port: read ``server.server_address``).
    ``max_wait``: seconds a request may wait for a slot (None: for ever)."""
    check_host(host, api_key)
    check_limits(max_tokens_cap, max_body_bytes, max_wait)
    return ChatServer((host, port), engine, api_key, max_body_bytes, max_tokens_cap, verbose, max_wait)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          drain_seconds: float = DEFAULT_DRAIN_S, **options) -> None:
    """Serve until Ctrl-C or SIGTERM, then drain (see the module docstring) and shut down; the signal's
    KeyboardInterrupt (or ``inference.errors.Terminated``) goes on to the caller, which gives the exit status."""
    check_limits(drain_seconds=drain_seconds)
    server = make_server(engine, host, port, api_key, **options)
    print(f"serving {', '.join(engine.model_ids)} at {server.url}/v1 (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        _drain(server, drain_seconds)
        raise
    finally:
        server.server_close()


def _drain(server: ChatServer, seconds: float) -> None:
    """Refuse new work, then let what is in flight finish for ``seconds`` at most; a second signal ends it now."""
    in_flight = server.stop_accepting()
    if not in_flight or not seconds:
        print(f"shutting down ({in_flight} request{'s' * (in_flight != 1)} in flight cancelled)"
              if in_flight else "shutting down", flush=True)
        return
    try:   # before the message: a second signal the moment it is out must land in this handler
        print(f"shutting down: draining {in_flight} request{'s' * (in_flight != 1)} for up to {seconds:g} s, new "
              "connections refused (Ctrl-C or SIGTERM again: stop at once)", flush=True)
        left = server.wait_idle(seconds)
    except KeyboardInterrupt:   # the second Ctrl-C or SIGTERM
        left = server.active_generations
        print(f"stopping now: {left} request{'s' * (left != 1)} cancelled", flush=True)
        return
    if left:
        print(f"drain over after {seconds:g} s: {left} request{'s' * (left != 1)} cancelled", flush=True)
