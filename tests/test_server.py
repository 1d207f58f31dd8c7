"""The OpenAI-compatible server end to end: the real Engine, served for real on a free port, driven by the official
``openai`` client (and by raw HTTP where a client would never go: oversized bodies, broken JSON, dropped sockets).

A random tiny gpt-oss never writes Harmony, so every reply would be empty and a stream would carry no deltas. The
model here is therefore the tiny gpt-oss with *scripted* weights: attention and expert outputs are zero, so the logits
at a position depend on its own token only, and :data:`SCRIPT` says which token follows which (a bigram machine built
from one-hot embeddings and ``lm_head`` entries). Greedy decoding writes exactly
``<|channel|>final<|message|> red green blue cyan<|return|>``; sampling wanders, so seeds matter. Two PEFT adapters
(made with peft) add a constant "mode" direction to the residual stream through the experts' ``down_proj`` LoRA:
``thinker`` then reasons forever, ``caller`` calls ``get_weather`` with ``{"city": "Paris"}``. Everything the HTTP
layer maps (content, reasoning, tool calls, finish reasons, usage) is thus exact and known in advance.

One stub engine at the end tests what the real one cannot be made to do: fail unexpectedly.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
from conftest import REPO, wait_for

from inference.engine import Completion, Engine
from inference.errors import UserError
from inference.serve.server import make_server

KEY = "test-key"
BASE_ID = "scripted-tiny"
HI = [{"role": "user", "content": "hi"}]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
GREEDY_REPLY = " red green blue cyan"
GREEDY_TOKENS = 8  # <|channel|> final <|message|> red green blue cyan <|return|>

# (token, next token, logit bonus): a token's successors compete by bonus (softmax at temperature 1, argmax at 0).
SCRIPT = [
    ("assistant", "<|channel|>", 0),
    ("<|channel|>", "final", 1), ("<|channel|>", "analysis", 0), ("<|channel|>", "comment", 0),
    ("final", "<|message|>", 0), ("analysis", "<|message|>", 0),
    ("comment", "ary", 0), ("ary", " to", 0), (" to", "=", 0), ("=", "functions", 0), ("functions", ".get", 0),
    (".get", "_weather", 0), ("_weather", " ", 0), (" ", "<|constrain|>", 0), ("<|constrain|>", "json", 0),
    ("json", "<|message|>", 0),
    ("<|message|>", " red", 1), ("<|message|>", '{"', 0),
    (" red", " green", 1), (" red", " blue", 0),
    (" green", " blue", 1), (" green", " red", 0),
    (" blue", " cyan", 1), (" blue", " green", 0),
    (" cyan", "<|return|>", 1), (" cyan", "<|end|>", 0), (" cyan", " red", 0),
    ('{"', "city", 0), ("city", '":', 0), ('":', ' "', 0), (' "', "Paris", 0), ("Paris", '"}', 0),
    ('"}', "<|call|>", 0),
    ("<|end|>", "<|start|>", 0), ("<|start|>", "assistant", 0),
]
# Tokens each adapter's mode pushes up, wherever they are a scripted successor: analysis over final and <|end|> over
# <|return|> (reason forever); the tool-call header over final and JSON over words.
MODES = {"thinker": ("analysis", "<|end|>"), "caller": ("comment", '{"')}
SCRIPTED_LOGIT = 40.0  # far above the ~12 nats of 201k unscripted tokens at logit 0
MODE_LOGIT = 4.0
# Socket timeouts and waits, meant never to be reached by a working server: a reply of a few tokens takes well under a
# second on an idle machine, and a 2-core machine running the whole suite and more may be many times slower.
HTTP_TIMEOUT_S = 300


def _token(text: str) -> int:
    from inference import harmony
    ids = harmony.encoding().encode(text, allowed_special="all")
    assert len(ids) == 1, (text, ids)
    return ids[0]


def build_scripted_model(target) -> dict[str, int]:
    """Write the scripted tiny gpt-oss to ``target``; returns each mode's residual dimension."""
    from inference.model.checkpoint import save_checkpoint
    from inference.model.tiny import tiny_config_dict, tiny_state_dict
    config = tiny_config_dict()
    H = config["hidden_size"]
    state = tiny_state_dict(config)
    slot = {t: i for i, t in enumerate(sorted({t for a, b, _ in SCRIPT for t in (a, b)}))}
    mode_dim = {m: H - 1 - i for i, m in enumerate(MODES)}
    embed, head = state["model.embed_tokens.weight"], state["lm_head.weight"]  # (V, H) both
    head[:, [*slot.values(), *mode_dim.values()]] = 0
    for text, i in slot.items():
        embed[_token(text)] = torch.nn.functional.one_hot(torch.tensor(i), H).float()
    unit = H ** 0.5  # the final RMSNorm turns a one-hot row into sqrt(H) * one-hot
    for prev, nxt, bonus in SCRIPT:
        head[_token(nxt), slot[prev]] = (SCRIPTED_LOGIT + bonus) / unit
    for mode, pushed in MODES.items():
        for text in pushed:
            head[_token(text), mode_dim[mode]] = MODE_LOGIT / unit
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "self_attn.o_proj.weight"].zero_()
        state[p + "mlp.experts.down_proj"].zero_()
        # Every expert sees the same input to down_proj, whatever the token: swiglu(gate=1, up=0) in all I entries.
        state[p + "mlp.experts.gate_up_proj"].zero_()
        state[p + "mlp.experts.gate_up_proj_bias"][:, ::2] = 1.0
    save_checkpoint(state, config, target)
    return mode_dim


def save_mode_adapters(model_dir, mode_dim: dict[str, int], out_dir) -> dict[str, str]:
    """One PEFT adapter per mode: its experts' down_proj LoRA adds 0.5 * e_mode to the residual in each layer."""
    import peft

    from inference.model.checkpoint import load_model
    model = load_model(model_dir)
    H, I, E = model.config.hidden_size, model.config.intermediate_size, model.config.num_local_experts
    r, alpha = 4, 8
    torch.manual_seed(0)   # PEFT's lora_A init (left in place where lora_B stays zero) draws from the global generator
    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    down_input = torch.sigmoid(torch.tensor(1.702)).item()  # swiglu(gate=1, up=0), see build_scripted_model
    # The outer experts wrapper holds down_proj (its lora_B is (H, E*r); gate_up's, nested inside, is (2I, E*r)).
    down = {n: p for n, p in peft_model.named_parameters() if ".mlp.experts.lora_" in n}
    assert down and all(p.shape == (H, E * r) for n, p in down.items() if ".lora_B." in n)
    paths = {}
    for mode, dim in mode_dim.items():
        with torch.no_grad():
            for name, p in down.items():
                if ".lora_A." in name:  # (E*r, I): each rank reads 1 from the constant input
                    p.fill_(1.0 / (I * down_input))
                else:                   # (H, E*r): all ranks write into the mode's dimension
                    p.zero_()
                    p[dim] = 0.5 / alpha
        paths[mode] = str(out_dir / mode)
        peft_model.save_pretrained(paths[mode], safe_serialization=True)
    return paths


def build_scripted(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The scripted model and its mode adapters: (model directory, {adapter name: directory}). Built once per
    session: the server test modules all use it (read-only), and each build costs seconds."""
    work = tmp_path_factory.getbasetemp() / "scripted-model"
    done = work / "built"
    if not done.is_file():
        mode_dim = build_scripted_model(work / "model")
        save_mode_adapters(work / "model", mode_dim, work)
        done.touch()
    return work / "model", {mode: str(work / mode) for mode in MODES}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    model_dir, adapters = build_scripted(tmp_path_factory)
    return Engine.load(str(model_dir), adapters=adapters, name=BASE_ID)


def start(server) -> int:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


@pytest.fixture(scope="module")
def port(engine):
    server = make_server(engine, api_key=KEY)
    yield start(server)
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(port) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)


def raw(port: int, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
        conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, bytes]:
    """One request over plain http.client: (status, headers, body)."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def chat_body(**fields) -> bytes:
    return json.dumps({"model": BASE_ID, "messages": HI, "max_tokens": 4} | fields).encode()


def health(port: int, key: str | None = KEY) -> dict:
    status, _, body = raw(port, "GET", "/health", key=key)
    assert status == 200
    return json.loads(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_subprocess(model_dir: Path, adapters: dict[str, str], *flags: str) -> tuple[subprocess.Popen, int]:
    """``python -m inference serve`` on the scripted model, for real, once it answers: (process, port). No key.
    Ctrl-C reaches it as it would from a terminal: a child started in the background would inherit SIGINT ignored."""
    port = free_port()
    argv = [sys.executable, "-m", "inference", "serve", "--model", str(model_dir), "--name", BASE_ID,
            *[f"--adapter={name}={path}" for name, path in adapters.items()], "--port", str(port), *flags]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("serving ")   # printed once bound and loaded; blocks until then
    wait_for(lambda: health(port, key=None), proc, "inference serve")
    return proc, port


def send_chat(port: int, body: bytes, key: str | None = KEY) -> socket.socket:
    """A chat request written on a raw socket, its answer left to read (or the socket to close, to leave)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
    auth = b"" if key is None else b"Authorization: Bearer %s\r\n" % key.encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%sContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (auth, len(body), body))
    return sock


# ---------------------------------------------------------------------------------------------- models and chat

def test_models_lists_the_base_and_each_adapter(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE_ID, "thinker", "caller"]
    assert all(m.object == "model" and m.owned_by and isinstance(m.created, int) for m in models)
    assert client.models.retrieve("caller").id == "caller"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_greedy_chat_reply_and_usage(client, engine):
    reply = client.chat.completions.create(model=BASE_ID, messages=HI, temperature=0)
    choice = reply.choices[0]
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == BASE_ID
    assert choice.message.role == "assistant" and choice.message.content == GREEDY_REPLY
    assert choice.message.reasoning is None and not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    prompt_tokens = len(engine.encode_chat(HI))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, GREEDY_TOKENS)
    assert reply.usage.total_tokens == prompt_tokens + GREEDY_TOKENS


def test_stream_matches_the_whole_reply_and_ends_properly(client):
    whole = client.chat.completions.create(model=BASE_ID, messages=HI, temperature=0)
    chunks = list(client.chat.completions.create(model=BASE_ID, messages=HI, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, last_choice, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content for c in middle) == whole.choices[0].message.content
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert last_choice.choices[0].finish_reason == "stop" and not last_choice.choices[0].delta.content
    assert usage.choices == [] and usage.usage == whole.usage


def test_stream_wire_format_and_keep_alive(port):
    """Chunked SSE ending in [DONE] and the zero-length chunk, then the same connection serves the next request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    status, headers, body = raw(port, "POST", "/v1/chat/completions", chat_body(stream=True), conn=conn)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"  # max_tokens 4
    sock = conn.sock
    status, headers, _ = raw(port, "GET", "/health", conn=conn)
    assert status == 200 and conn.sock is sock and "Content-Length" in headers


def test_reasoning_whole_and_streamed(client):
    whole = client.chat.completions.create(model="thinker", messages=HI, temperature=0, max_tokens=12)
    message = whole.choices[0].message
    assert message.reasoning.startswith(GREEDY_REPLY) and message.content is None
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    stream = client.chat.completions.create(model="thinker", messages=HI, temperature=0, max_tokens=12, stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == message.reasoning
    assert not any(d.content for d in deltas)


def test_tool_call_whole_and_streamed(client):
    whole = client.chat.completions.create(model="caller", messages=HI, tools=WEATHER, temperature=0, max_tokens=30)
    (call,) = whole.choices[0].message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    stream = client.chat.completions.create(model="caller", messages=HI, tools=WEATHER, temperature=0, max_tokens=30,
                                            stream=True)
    chunks = list(stream)
    pieces = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    head, *rest = pieces
    assert (head.index, head.type, head.function.name) == (0, "function", "get_weather") and head.id.startswith("call_")
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in rest)
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_adapter_is_chosen_by_model_id(client):
    base = client.chat.completions.create(model=BASE_ID, messages=HI, temperature=0, max_tokens=8)
    thinker = client.chat.completions.create(model="thinker", messages=HI, temperature=0, max_tokens=8)
    assert base.choices[0].message.content == GREEDY_REPLY and thinker.choices[0].message.content is None
    assert thinker.model == "thinker"


def test_seed_reproduces_sampling(client):
    def sample(seed: int) -> tuple:
        reply = client.chat.completions.create(model=BASE_ID, messages=HI, temperature=1, seed=seed, max_tokens=12)
        message = reply.choices[0].message
        return message.content, message.reasoning, [c.function for c in message.tool_calls or []]
    first = sample(1)
    assert first[0] and sample(1) == first
    # Every step draws among 2 or 3 scripted tokens, so these fixed seeds (fixed draws) give different replies.
    assert sample(2) != first


def test_stop_string_cuts_the_content(client):
    reply = client.chat.completions.create(model=BASE_ID, messages=HI, temperature=0, stop=[" blue", "zzz"])
    assert reply.choices[0].message.content == " red green" and reply.choices[0].finish_reason == "stop"


def test_tool_choice_none_leaves_the_tools_out(client, engine):
    def prompt_tokens(**choice) -> int:
        reply = client.chat.completions.create(model="caller", messages=HI, tools=WEATHER, max_tokens=1, **choice)
        return reply.usage.prompt_tokens
    assert prompt_tokens(tool_choice="auto") == prompt_tokens() == len(engine.encode_chat(HI, WEATHER))
    assert prompt_tokens(tool_choice="none") == len(engine.encode_chat(HI))


def test_tool_results_and_earlier_reasoning_are_accepted(client, engine):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    def conversation(**reasoning):
        return [*HI, {"role": "assistant", "content": None, "tool_calls": [call], **reasoning},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "blue"}'}]
    usage = {}
    for label, extra in [("none", {}), ("reasoning_content", {"reasoning_content": "I should look it up."}),
                         ("reasoning", {"reasoning": "I should look it up."})]:
        messages = conversation(**extra)
        reply = client.chat.completions.create(model=BASE_ID, messages=messages, tools=WEATHER, temperature=0,
                                               max_tokens=2)
        usage[label] = reply.usage.prompt_tokens
        assert usage[label] == len(engine.encode_chat(messages, WEATHER))
    # The reasoning of the turn still in progress is rendered, under either name.
    assert usage["reasoning_content"] == usage["reasoning"] > usage["none"]


# ---------------------------------------------------------------------------------------------- refusals

def test_a_wrong_key_is_an_authentication_error(port):
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=BASE_ID, messages=HI)


@pytest.mark.parametrize("key", [None, "wrong-key", ""])
@pytest.mark.parametrize("method, path", [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/models/caller"),
                                          ("POST", "/v1/chat/completions"), ("GET", "/openapi.json"),
                                          ("GET", "/nowhere")])
def test_every_route_needs_the_key(port, key, method, path):
    status, headers, body = raw(port, method, path, chat_body() if method == "POST" else None, key=key)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert headers["WWW-Authenticate"] == "Bearer"


def test_oversized_body_is_refused_unread(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Length", str(50_000_000))
    conn.endheaders()  # and never send the 50 MB: the answer must not wait for them
    resp = conn.getresponse()
    assert resp.status == 413 and "error" in json.loads(resp.read())
    assert resp.getheader("Connection") == "close"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"[" * 100_000])
def test_bodies_that_are_not_a_json_object(port, body):
    status, headers, data = raw(port, "POST", "/v1/chat/completions", body)
    error = json.loads(data)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and "JSON" in error["message"]
    assert int(headers["Content-Length"]) == len(data)


def test_post_without_content_length_is_411(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and json.loads(resp.read())["error"]["message"]


@pytest.mark.parametrize("fields, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"model": 7}, "model"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": True}, "max_completion_tokens"),
    ({"seed": 1.5}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
    ({"tools": [{"type": "retrieval"}]}, None),
])
def test_invalid_requests_are_400_naming_the_param(port, fields, param):
    status, _, body = raw(port, "POST", "/v1/chat/completions", chat_body(**fields))
    error = json.loads(body)["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and error["param"] == param
    if param is None:  # the engine's message says where
        assert "message 1" in error["message"] or "tool 1" in error["message"]


def test_integral_floats_pass_for_integers(port):
    """2.0 is an integer for JSON Schema (and what json.dumps(2.0) sends); 2.5 is not."""
    status, _, body = raw(port, "POST", "/v1/chat/completions", chat_body(max_tokens=2.0, seed=7.0, n=1.0))
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
    assert raw(port, "POST", "/v1/chat/completions", chat_body(max_tokens=2.5))[0] == 400


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-5", messages=HI)
    assert exc.value.code == "model_not_found"


def test_prompt_beyond_the_context_window(client, port, engine):
    long = [{"role": "user", "content": "colour " * engine.context_length}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=BASE_ID, messages=long, stream=True)
    assert exc.value.code == "context_length_exceeded"
    assert health(port)["active_generations"] == 0


def test_unknown_route_and_wrong_method(port):
    assert raw(port, "GET", "/v1/completions")[0] == 404
    status, headers, _ = raw(port, "GET", "/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST"
    for method in ("DELETE", "OPTIONS", "TRACE"):   # the standard library would answer 501 (a server error)
        status, headers, _ = raw(port, method, "/v1/models")
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    status, _, body = raw(port, "POST", "/health", b'{"a": 1}', conn=conn)
    assert status == 405 and json.loads(body)["error"]["message"]
    # The refused request's body was consumed, so the connection still parses the next request.
    assert raw(port, "GET", "/health", conn=conn)[0] == 200


def test_max_tokens_are_capped_and_default_to_the_cap_and_verbose_logs(engine, capfd):
    """Capped, not refused (clients send large defaults), and the client is told: X-Max-Tokens-Capped on whole and
    streamed replies when it asked for more than the cap; not when it asked for less or nothing."""
    server = make_server(engine, max_tokens_cap=3, verbose=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{start(server)}/v1", api_key="unused", max_retries=0)
    create = client.chat.completions.with_raw_response.create
    try:
        for asked, capped in (({}, None), ({"max_tokens": 100}, "3"), ({"max_completion_tokens": 100}, "3"),
                              ({"max_tokens": 2}, None)):
            raw_reply = create(model="thinker", messages=HI, temperature=0, **asked)
            reply = raw_reply.parse()
            assert reply.usage.completion_tokens == min(3, asked.get("max_tokens", 3))
            assert reply.choices[0].finish_reason == "length"
            assert raw_reply.headers.get("X-Max-Tokens-Capped") == capped, asked
            streamed = create(model="thinker", messages=HI, temperature=0, stream=True, **asked)
            assert streamed.headers.get("X-Max-Tokens-Capped") == capped, asked
            chunks = list(streamed.parse())
            assert chunks[-1].choices[0].finish_reason == "length"
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert err.count('"POST /v1/chat/completions HTTP/1.1" 200') == 8
    assert err.count("max_tokens 100 capped to 3 (--max-tokens-cap)") == 4


def test_refuses_a_public_address_without_a_key(engine):
    with pytest.raises(UserError, match="refusing to listen on 0.0.0.0 without --api-key"):
        make_server(engine, host="0.0.0.0")
    make_server(engine, host="0.0.0.0", api_key=KEY).server_close()


# ---------------------------------------------------------------------------------------------- failures

def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + HTTP_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {HTTP_TIMEOUT_S} s"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_stops_its_generation(port, client, engine, monkeypatch, capfd, stream):
    # The thinker reasons until max_tokens: minutes on CPU, unless the server stops it. Whether it stopped early is
    # read from the engine's own stream (how it ended), not from a clock: that holds on a machine of any speed.
    ends = []
    real_stream = engine.stream

    def recorded_stream(*args, **kwargs):
        events = real_stream(*args, **kwargs)   # validates at the call, as the server relies on

        def run():
            finish = None
            try:
                for event in events:
                    if isinstance(event, Completion):
                        finish = event.finish_reason
                    yield event
            finally:
                events.close()
                ends.append(finish)   # None: closed before its end; "cancelled": the engine saw the client go
        return run()

    monkeypatch.setattr(engine, "stream", recorded_stream)
    sock = send_chat(port, chat_body(model="thinker", max_tokens=3000, stream=stream, temperature=0))
    if stream:  # leave once reasoning is flowing
        received = b""
        while b'"reasoning"' not in received:
            data = sock.recv(4096)
            assert data, received
            received += data
    wait_until(lambda: health(port)["active_generations"], "the generation starting")
    assert health(port)["active_generations"] == 1
    sock.close()
    wait_until(lambda: not health(port)["active_generations"], "the generation ending")
    assert health(port)["active_generations"] == 0
    assert ends in ([None], ["cancelled"]), ends    # stopped, not run to its 3000 tokens ("length")
    assert client.chat.completions.create(model=BASE_ID, messages=HI, temperature=0).choices[0].message.content
    assert capfd.readouterr().err == ""  # no traceback, no noise: a client leaving is normal


class BrokenEngine:
    """A stub whose generation fails like a bug would: the HTTP layer must answer 500 and keep serving."""

    base_id, adapter_ids, model_ids, context_length = "stub", [], ["stub"], 100

    def encode_chat(self, messages, tools=None, reasoning_effort=None):
        return [1, 2, 3]

    def stream(self, prompt_ids, params, model=None, cancelled=None, max_wait=None, admitted=None):
        raise RuntimeError("kaboom")

    def stats(self):
        return {"running": 0, "waiting": 0}

    def close(self):
        pass


def test_unexpected_error_is_a_500_and_the_server_goes_on(capfd):
    server = make_server(BrokenEngine())
    port = start(server)
    try:
        body = json.dumps({"model": "stub", "messages": HI}).encode()
        status, _, data = raw(port, "POST", "/v1/chat/completions", body, key=None)
        assert status == 500 and json.loads(data)["error"]["type"] == "server_error"
        assert raw(port, "GET", "/health", key=None)[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    err = capfd.readouterr().err
    assert "RuntimeError: kaboom" in err and "Traceback" not in err and err.count("\n") == 1


def test_a_lone_surrogate_is_a_400_and_head_answers_like_get(port):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800 hi"}]}' % BASE_ID.encode()
    status, _, reply = raw(port, "POST", "/v1/chat/completions", body)
    assert status == 400 and "lone UTF-16 surrogate" in json.loads(reply)["error"]["message"]
    status, headers, reply = raw(port, "HEAD", "/health")
    assert status == 200 and reply == b"" and int(headers["Content-Length"]) > 0
    assert raw(port, "HEAD", "/v1/chat/completions")[0] == 405


def test_the_listen_backlog_holds_many_simultaneous_connections(engine):
    """64 clients connecting while no connection has been accepted yet (a busy accept loop): the kernel queues them
    all. With the standard library's backlog of 5 the rest wait for SYN retries or are reset."""
    import socket
    server = make_server(engine)          # listening, not yet accepting
    socks = []
    try:
        for _ in range(64):
            socks.append(socket.create_connection(server.server_address[:2], timeout=2.0))
    finally:
        for s in socks:
            s.close()
        server.server_close()
    assert len(socks) == 64


def test_a_busy_port_is_refused_before_anything_loads(engine):
    from inference.serve.server import check_port
    server = make_server(engine)
    try:
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1:.*another --port"):
            check_port("127.0.0.1", server.server_address[1])
    finally:
        server.server_close()
