"""``python -m inference`` run for real in subprocesses: eval writes its report, chat shows reasoning apart, serve
answers the official openai client, and every bad input is one ``error:`` line with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import EPS32, REPO, run, run_cli, stop, wait_for


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """Six held-out conversations of the tiny task, one of them with a tool call."""
    path = tmp_path_factory.mktemp("evaldata") / "eval.jsonl"
    rows = (REPO / "data/tiny/eval.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    tool = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                             "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                         {"role": "tool", "name": "get_weather", "content": "sunny"},
                         {"role": "assistant", "content": "It is sunny."}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                        "parameters": {"type": "object"}}}]}
    path.write_text("\n".join(rows + [json.dumps(tool)]) + "\n", encoding="utf-8")
    return path


def test_eval_writes_a_report_matching_the_library_call(tmp_path, eval_file, tiny_model_dir):
    out = tmp_path / "reports" / "base.json"
    proc = run_cli("inference", "eval", "--model", str(tiny_model_dir), "--data", str(eval_file), "--out", str(out),
                   "--max-new-tokens", "8", "--reasoning-effort", "low", "--batch-size", "3", "--kv-memory", "0.25")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())   # 7 answers through 3 slots: some wait for a finished one's slot
    # six conversations scored for loss; seven generations: the tool conversation has two runs of assistant messages
    # (the call, then the answer after the tool result), and every one is generated
    assert report["examples"] == 6 and report["generated"] == 7 and report["model"] == tiny_model_dir.name
    assert report["trained_turns"] == "all"
    assert report["loss"] > 0 and report["loss_tokens"] > 0 and report["adapter"] is None
    assert f"report: {out}" in proc.stdout and "exact match" in proc.stdout

    from inference.engine import Engine
    from inference.evaluate import evaluate_file
    same = evaluate_file(Engine.load(tiny_model_dir), eval_file, max_new_tokens=8, reasoning_effort="low")
    # the same code on the same machine: at most the fp32 sum over the loss tokens may run in another order
    assert same["loss"] == pytest.approx(report["loss"], rel=report["loss_tokens"] * EPS32)
    assert [s["final"] for s in same["samples"]] == [s["final"] for s in report["samples"]]


def test_chat_shows_reasoning_apart_and_keeps_going_after_commands(tiny_model_dir):
    script = "Name the color of banana.\n/effort high\n/effort extreme\n/reset\nAnd of a carrot?\n/quit\n"
    proc = run([sys.executable, "-m", "inference", "chat", "--model", str(tiny_model_dir), "--temperature", "0",
                "--max-tokens", "24"], input=script, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(reasoning effort high)" in proc.stderr and "effort must be one of" in proc.stderr
    assert "(conversation cleared)" in proc.stderr
    # The untrained tiny model writes no Harmony channels, so what chat prints is checked against the engine's own
    # reply to the same prompt (the trained adapter's "thinking:"/"assistant:" lines: test_end_to_end.py).
    from inference.engine import Engine
    reply = Engine.load(tiny_model_dir).chat([{"role": "user", "content": "Name the color of banana."}],
                                             temperature=0, max_tokens=24)
    if reply.reasoning:
        assert f"thinking: {reply.reasoning}" in proc.stdout
    if reply.content:
        assert f"assistant: {reply.content}" in proc.stdout
    if reply.finish_reason == "length":
        assert proc.stdout.count("(cut off: max tokens reached)") == 2    # both questions were answered
    if not reply.content and not reply.reasoning and not reply.tool_calls:
        # nothing Harmony to show: the raw text is printed with a note, not an empty line
        from inference import harmony
        note = "has no Harmony channel" if reply.parsed else "is not valid Harmony"
        assert f"(the reply {note}; its raw text:)\n{harmony.encoding().decode(reply.token_ids)}" in proc.stdout


def test_serve_answers_the_openai_client(tmp_path, tiny_model_dir):
    openai = pytest.importorskip("openai")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "inference", "serve", "--model", str(tiny_model_dir),
                               "--port", str(port), "--name", "base"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        def models():   # None until the server answers (it imports torch and loads the model first)
            try:
                return client.models.list()
            except openai.APIConnectionError:
                return None

        listed = wait_for(models, server, "inference serve")   # polls up to conftest.SERVER_START_S
        assert [m.id for m in listed.data] == ["base"]
        reply = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0, max_tokens=8)
        assert reply.usage.completion_tokens <= 8 and reply.choices[0].finish_reason in ("stop", "length")
    finally:
        _, err = stop(server)
    assert "Traceback" not in err


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "/nonexistent/model", "--data", "{good}"], "model not found: /nonexistent/model"),
    (["chat", "--model", "{tiny}", "--adapter", "/nonexistent/adapter"], "adapter directory not found"),
    (["eval", "--model", "{tiny}", "--data", "/nonexistent/data.jsonl"], "dataset not found"),
    (["eval", "--model", "{tiny}", "--data", "{bad}"], "bad.jsonl:2: not valid JSON"),
    (["eval", "--model", "{tiny}", "--data", "{bad}", "--loss-weights", "final=x"], "is not a number"),
    (["eval", "--data", "{good}"], "eval needs --model (or --run RUN_DIR"),
    (["eval", "--run", "{tmp}"], "no recipe.yaml there"),
    (["serve", "--model", "{tiny}", "--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without --api-key"),
    (["serve", "--model", "{tiny}", "--adapter", "noequals"], "expected NAME=DIR"),
    (["serve", "--model", "{tiny}", "--merge"], "--merge needs exactly one --adapter"),
])
def test_bad_input_is_one_error_line(tmp_path, tiny_model_dir, args, message):
    bad = tmp_path / "bad.jsonl"
    good = REPO / "data/tiny/eval.jsonl"
    bad.write_text(good.read_text(encoding="utf-8").splitlines()[0] + "\n{not json\n", encoding="utf-8")
    args = [a.format(tiny=tiny_model_dir, bad=bad, good=good, tmp=tmp_path) for a in args]
    proc = run_cli("inference", *args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_layout_model_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    proc = run_cli("inference", "eval", "--model", str(tmp_path / "m"), "--data", str(REPO / "data/tiny/eval.jsonl"),
                   cwd=tmp_path)
    assert proc.returncode == 2 and "model_type is 'llama', expected 'gpt_oss'" in proc.stderr
