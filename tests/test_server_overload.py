"""The server under overload: every request gets an answer, at once when it cannot be served, and a client that goes
away gives its place back at once.

The model is test_server's scripted tiny gpt-oss: its ``thinker`` adapter reasons until max_tokens (thousands of
tokens: far longer than any of these tests), so a request holds its slot until its client leaves. Small servers
run in-process over an engine of one slot and one waiting place; the overload bar runs the real command.
"""

from __future__ import annotations

import http.client
import json
import re
import selectors
import time

import openai
import pytest
from conftest import stop
from test_server import (
    BASE_ID,
    GREEDY_REPLY,
    HI,
    HTTP_TIMEOUT_S,
    build_scripted,
    chat_body,
    health,
    raw,
    send_chat,
    serve_subprocess,
    start,
    wait_until,
)

from inference import cli
from inference.engine import Engine
from inference.serve.server import make_server

LONG = {"model": "thinker", "max_tokens": 4000, "temperature": 0}   # holds its slot until its client leaves
# How fast a refusal must come: it needs no compute, only parsing and the queue's lock (a loaded 2-core machine
# answers in milliseconds; the bar is "a second or two").
PROMPT_ANSWER_S = 2.0


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return build_scripted(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(scripted) -> Engine:
    """One slot and one waiting place: the second request waits, the third is refused."""
    model_dir, adapters = scripted
    return Engine.load(str(model_dir), adapters=adapters, name=BASE_ID, max_batch=1, max_queue=1)


@pytest.fixture
def served(engine):
    """A fresh server (no key) on the one-slot engine; closing it cancels whatever is left."""
    def make(**options):
        server = make_server(engine, **options)
        servers.append(server)
        return start(server)
    servers = []
    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def busy(port: int) -> object:
    """Occupy the one slot with a long stream; returns its socket once it generates."""
    sock = send_chat(port, chat_body(stream=True, **LONG), key=None)
    wait_until(lambda: health(port, key=None)["running"] == 1, "the long request running")
    return sock


def retry_after(headers) -> int:
    value = headers["Retry-After"]
    assert re.fullmatch(r"[1-9][0-9]*", value), value   # whole seconds, as RFC 9110 writes them
    return int(value)


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_that_waits_too_long_is_a_plain_503_with_retry_after(served, stream):
    port = served(max_wait=0.5)
    running = busy(port)
    started = time.monotonic()
    status, headers, body = raw(port, "POST", "/v1/chat/completions", chat_body(stream=stream), key=None)
    waited = time.monotonic() - started
    error = json.loads(body)["error"]   # JSON, not a stream cut short: a queued stream has sent nothing yet
    assert status == 503 and headers["Content-Type"] == "application/json", (status, headers)
    assert error["code"] == "server_overloaded" and error["type"] == "server_error"
    assert re.match(r"waited \d+\.\d s for a free slot \(the limit is 0\.5 s", error["message"]), error["message"]
    assert retry_after(headers) >= 1
    assert 0.5 <= waited < 0.5 + PROMPT_ANSWER_S
    assert health(port, key=None)["waiting"] == 0 and health(port, key=None)["running"] == 1
    running.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_waiting_client_that_leaves_gives_its_place_back_at_once(served, stream):
    port = served()
    running = busy(port)
    waiting = send_chat(port, chat_body(stream=stream, **LONG), key=None)
    wait_until(lambda: health(port, key=None)["waiting"] == 1, "the second request waiting")
    # The queue (one place) is full: a third request is refused at once, with when to come back.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=BASE_ID, messages=HI, stream=stream)
    assert time.monotonic() - started < PROMPT_ANSWER_S
    assert refused.value.code == "server_overloaded" and retry_after(refused.value.response.headers) >= 1
    waiting.close()   # still in the queue, never admitted: nothing was written to it
    left = time.monotonic()
    wait_until(lambda: health(port, key=None)["waiting"] == 0, "the waiting request leaving the queue")
    assert time.monotonic() - left < PROMPT_ANSWER_S    # polled every 0.2 s, gone at the scheduler's next step
    state = health(port, key=None)
    assert (state["running"], state["active_generations"]) == (1, 1)   # the running one untouched
    # Its place is free again: a new request waits there (and is not refused).
    again = send_chat(port, chat_body(stream=stream, **LONG), key=None)
    wait_until(lambda: health(port, key=None)["waiting"] == 1, "a new request taking the freed place")
    running.close()
    wait_until(lambda: health(port, key=None)["running"] == 1 and not health(port, key=None)["waiting"],
               "the waiting request getting the freed slot")
    again.close()
    wait_until(lambda: health(port, key=None)["active_generations"] == 0, "every request gone")


def test_the_overload_bar(scripted):
    """--max-concurrent 8 --max-queue 16 and 64 clients in flight together: 8 generate, 16 wait, 40 get 429 with
    Retry-After at once; every client has an answer or its place; when the long ones leave, every slot comes back
    and the server still answers.

    The first 8 are in their slots before the other 56 come all at once: were all 64 sent in one burst, the
    scheduler could admit some of the first while the burst is still arriving, which frees queue places, and the
    split between waiting and refused would depend on the machine's timing."""
    model_dir, adapters = scripted
    proc, port = serve_subprocess(model_dir, adapters, "--max-concurrent", "8", "--max-queue", "16")
    try:
        body = chat_body(stream=True, **LONG)
        sent, socks = {}, []
        selector = selectors.DefaultSelector()
        for i in range(64):
            sock = send_chat(port, body, key=None)
            sent[sock] = time.monotonic()
            socks.append(sock)
            selector.register(sock, selectors.EVENT_READ)
            if i == 7:
                wait_until(lambda: health(port, key=None)["running"] == 8, "the first 8 generating")
        answers: dict = {}   # socket -> (status, headers, body or None, seconds to the answer)
        responses = []       # each holds its socket open (a makefile) until closed itself
        deadline = time.monotonic() + HTTP_TIMEOUT_S
        while len(answers) < 48 and time.monotonic() < deadline:   # 40 refusals + 8 streams' headers
            for key, _ in selector.select(timeout=1.0):
                sock = key.fileobj
                selector.unregister(sock)
                resp = http.client.HTTPResponse(sock)
                responses.append(resp)
                resp.begin()
                data = resp.read() if resp.status != 200 else None   # a 200 streams on: leave it flowing
                answers[sock] = (resp.status, resp.headers, data, time.monotonic() - sent[sock])
        peak = health(port, key=None)
        quiet = [s for s in socks if s not in answers]
        refused = [a for a in answers.values() if a[0] == 429]
        streaming = [a for a in answers.values() if a[0] == 200]
        assert (len(refused), len(streaming), len(quiet)) == (40, 8, 16), sorted(a[0] for a in answers.values())
        assert (peak["running"], peak["waiting"], peak["active_generations"]) == (8, 16, 24), peak
        for status, headers, data, seconds in refused:
            assert json.loads(data)["error"]["code"] == "server_overloaded" and retry_after(headers) >= 1
            assert seconds < PROMPT_ANSWER_S, seconds
        assert all(a[1]["Content-Type"] == "text/event-stream" for a in streaming)
        for closable in [*responses, *socks]:   # the long ones leave: running and waiting alike give their place back
            closable.close()
        # A handler ends at once; the scheduler frees its place at its next step (some waiting ones were admitted
        # when the running ones left, before noticing their clients were gone too).
        wait_until(lambda: [health(port, key=None)[k] for k in ("active_generations", "running", "waiting")]
                   == [0, 0, 0], "every request gone, every slot and place free")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=BASE_ID, messages=HI, temperature=0)
        assert reply.choices[0].message.content == GREEDY_REPLY
        assert proc.poll() is None
    finally:
        _, err = stop(proc)
    assert "Traceback" not in err, err[-3000:]


def test_max_batch_still_names_max_concurrent():
    parse = cli.parser().parse_args
    assert parse(["serve", "--model", "m", "--max-concurrent", "5"]).max_batch == 5
    assert parse(["serve", "--model", "m", "--max-batch", "3"]).max_batch == 3   # documented before the new name


@pytest.mark.parametrize("flags, message", [
    (["--max-concurrent", "0"], "--max-concurrent must be an integer >= 1, got 0"),
    (["--max-queue", "0"], "--max-queue must be an integer >= 1, got 0"),
    (["--max-wait", "0"], "--max-wait must be a positive number of seconds, got 0.0"),
    (["--max-wait", "nan"], "--max-wait must be a positive number of seconds, got nan"),
    (["--drain-seconds", "-1"], "--drain-seconds must be a number of seconds >= 0, got -1.0"),
    (["--max-tokens-cap", "0"], "--max-tokens-cap must be an integer >= 1, got 0"),
])
def test_bad_serving_limits_are_one_error_line_before_the_model_loads(capsys, flags, message):
    # The model does not exist: reaching the load would be another error, so the limit was checked first.
    assert cli.main(["serve", "--model", "/nonexistent/model", "--port", "0", *flags]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
