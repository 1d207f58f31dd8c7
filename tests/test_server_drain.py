"""Graceful shutdown of ``python -m inference serve``, for real: a signal stops new work at once, lets the requests
in flight finish (up to ``--drain-seconds``), and a second signal ends the wait at once; exit 143 / 130 as ever.

The model is test_server's scripted tiny gpt-oss: the ``thinker`` adapter reasons until max_tokens, so a stream's
length is exactly what it asks for (a short one ends within the drain, a long one outlives any deadline here).
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import pytest
from conftest import stop
from test_server import HTTP_TIMEOUT_S, build_scripted, chat_body, send_chat, serve_subprocess

from inference import cli
from inference.serve import server


class Stream:
    """A streamed chat request read to its end in a thread: the whole body, and when it ended."""

    def __init__(self, port: int, max_tokens: int):
        self.sock = send_chat(port, chat_body(model="thinker", max_tokens=max_tokens, temperature=0, stream=True),
                              key=None)
        self.response = http.client.HTTPResponse(self.sock)
        self.response.begin()   # the headers: the engine has admitted the request, it is generating
        assert self.response.status == 200
        self.body, self.ended = b"", None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            while True:
                data = self.response.read1(65536)   # de-chunked; b"" at the end or when the connection is cut
                if not data:
                    break
                self.body += data
        except (OSError, http.client.HTTPException):   # cut mid-chunk
            pass
        self.ended = time.monotonic()

    def result(self) -> tuple[bool, str | None]:
        """(ended with [DONE], the finish_reason it gave)."""
        self.thread.join(HTTP_TIMEOUT_S)
        assert not self.thread.is_alive()
        events = [e.removeprefix("data: ") for e in self.body.decode().split("\n\n") if e]
        finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events if e != "[DONE]"
                    if json.loads(e)["choices"]]
        return events[-1:] == ["[DONE]"], next((f for f in finishes if f), None)

    def close(self):
        self.response.close()
        self.sock.close()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return build_scripted(tmp_path_factory)


def test_the_defaults_have_one_value():
    # The command line repeats the server's defaults only so that --help needs no torch import.
    assert (cli.DEFAULT_MAX_WAIT_S, cli.DEFAULT_DRAIN_S) == (server.DEFAULT_MAX_WAIT_S, server.DEFAULT_DRAIN_S)


def test_sigterm_drains_what_is_in_flight_refuses_new_work_and_exits_143(scripted):
    """A short stream finishes whole during the drain; a long one is cut only at the deadline; a new connection is
    refused at once, a new request on an open keep-alive connection gets 503 + Retry-After + Connection: close."""
    proc, port = serve_subprocess(*scripted, "--drain-seconds", "3")
    streams = []
    try:
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)   # an open keep-alive
        idle.request("GET", "/health")
        assert idle.getresponse().read() and idle.sock is not None
        streams += [Stream(port, max_tokens=20), Stream(port, max_tokens=4000)]
        short, long = streams
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        line = proc.stdout.readline()
        assert line.startswith("shutting down: draining 2 requests for up to 3 s, new connections refused"), line
        assert "again: stop at once" in line
        with pytest.raises(ConnectionRefusedError):   # the listening socket is closed: refused, not queued
            socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
        idle.request("GET", "/health")
        refused = idle.getresponse()
        error = json.loads(refused.read())["error"]
        assert refused.status == 503 and error["code"] == "server_shutting_down"
        assert int(refused.getheader("Retry-After")) >= 1 and refused.getheader("Connection") == "close"
        assert short.result() == (True, "length")                 # whole: [DONE] after its 20 tokens
        assert long.result() == (False, None)                     # cut, without [DONE] ...
        assert long.ended - signalled >= 3                        # ... and only at the deadline
        assert proc.wait(HTTP_TIMEOUT_S) == 143
        out, err = proc.communicate()
        assert "drain over after 3 s: 1 request cancelled" in out
        assert "terminated (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
    finally:
        stop(proc)
        for stream in streams:
            stream.close()


def test_a_second_ctrl_c_stops_the_drain_at_once_and_exits_130(scripted):
    proc, port = serve_subprocess(*scripted, "--drain-seconds", "60")
    streams = []
    try:
        streams.append(Stream(port, max_tokens=4000))
        long = streams[0]
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline()
        assert line.startswith("shutting down: draining 1 request for up to 60 s"), line
        proc.send_signal(signal.SIGINT)
        second = time.monotonic()
        assert proc.wait(HTTP_TIMEOUT_S) == 130
        assert time.monotonic() - second < 30       # not the 60 s drain: at once (process exit included)
        assert long.result() == (False, None)       # cut
        out, err = proc.communicate()
        assert "stopping now: 1 request cancelled" in out
        assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    finally:
        stop(proc)
        for stream in streams:
            stream.close()
