"""Tests for inference.conversations: request messages and tools, strict keys, JSON-lines datasets for eval."""

import json

import pytest

from inference.conversations import (
    Example,
    MessageError,
    load_jsonl_examples,
    normalize_messages,
    normalize_tools,
    read_jsonl,
    to_example,
)
from inference.errors import UserError

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def bad(messages, **kw) -> str:
    with pytest.raises(MessageError) as info:
        normalize_messages(messages, **kw)
    assert isinstance(info.value, UserError)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ good requests

def test_string_and_text_part_content():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    out = normalize_messages([{"role": "system", "content": "sys"}, {"role": "user", "content": parts}])
    assert out == [{"role": "system", "content": "sys"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize("alias", ["thinking", "reasoning", "reasoning_content"])
def test_reasoning_aliases_become_thinking(alias):
    out = normalize_messages([USER, {"role": "assistant", "content": "4", alias: "2+2=4"}, USER])
    assert out[1] == {"role": "assistant", "content": "4", "thinking": "2+2=4"}


def test_nested_tool_calls_and_tool_name_from_call_id():
    out = normalize_messages([
        USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Zürich"}}},
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "3"},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]},
    ])
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "name": "weather", "arguments": '{"city": "Zürich"}'},
        {"id": "c2", "name": "add", "arguments": '{"a": 1}'}]}
    assert out[2:] == [{"role": "tool", "content": "3", "name": "add"},
                       {"role": "tool", "content": "sunny", "name": "weather"}]


def test_a_request_needs_no_assistant_message_but_a_training_record_does():
    assert normalize_messages([USER]) == [USER]
    record = {"messages": [USER]}
    assert to_example(record, "r", require_assistant=False).messages == [USER]
    with pytest.raises(MessageError, match=r"^r: no assistant message \(nothing to train on or evaluate\)$"):
        to_example(record, "r")


def test_strict_keys():
    extra = {**ASSISTANT, "refusal": None, "annotations": []}
    assert "message 2: unknown key 'refusal'" in bad([USER, extra])
    assert normalize_messages([USER, extra], strict_keys=False) == [USER, ASSISTANT]
    # lenient keys still validate the keys we know
    assert "message 2: unknown role 'robot'" in bad([USER, {**extra, "role": "robot"}], strict_keys=False)


def test_tools_nested_and_flat():
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}},
             {"name": "g"}]
    assert normalize_tools(tools, "request") == [
        {"name": "f", "description": "d", "parameters": {"type": "object"}},
        {"name": "g", "description": "", "parameters": None}]
    assert normalize_tools(None, "request") is None and normalize_tools([], "request") is None


# ------------------------------------------------------------------------------------------------ bad requests

CALL = {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f"}}]}
BAD = [  # (messages, fragment of the message)
    ([USER, {"role": "robot", "content": "x"}], "request: message 2: unknown role 'robot' (expected system,"),
    ([], "request: empty conversation"),
    ({"role": "user", "content": "hi"}, "request: 'messages' must be a list, got object"),
    ([USER, "hello"], "request: message 2: must be an object, got string"),
    ([{"role": "user", "content": ""}], "request: message 1: user message has empty content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "request: message 1: content part 1"),
    ([USER, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]}],
     "request: message 2: tool call 1 ('f'): arguments are not valid JSON"),
    ([USER, CALL, {"role": "tool", "tool_call_id": "zzz", "content": "r"}],
     "request: message 3: tool message has no 'name' and its tool_call_id 'zzz' matches no earlier"),
    ([{**USER, "reasoning": "x"}], "request: message 1: only assistant messages can have 'reasoning'"),
    ([USER, {**ASSISTANT, "thinking": "a", "reasoning": "b"}], "request: message 2: has both 'thinking' and"),
]


@pytest.mark.parametrize("messages,fragment", BAD, ids=[b[1][9:45] for b in BAD])
def test_bad_messages_name_the_message(messages, fragment):
    assert fragment in bad(messages)


def test_where_prefix():
    assert bad([USER, {"role": "robot"}], where="body").startswith("body: message 2: unknown role")


def test_bad_tools():
    with pytest.raises(MessageError, match=r"^request: tool 2: duplicate tool name 'f'$"):
        normalize_tools([{"name": "f"}, {"type": "function", "function": {"name": "f"}}], "request")
    with pytest.raises(MessageError, match=r"^request: 'tools' must be a list, got object$"):
        normalize_tools({"name": "f"}, "request")


# ------------------------------------------------------------------------------------------------ JSON-lines datasets

def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_jsonl_file_and_dir(tmp_path):
    chat = json.dumps({"messages": [USER, ASSISTANT]})
    sharegpt = json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]})
    path = write_jsonl(tmp_path / "a.jsonl", [chat, "", sharegpt])
    a, b = load_jsonl_examples(path)
    assert isinstance(a, Example) and a.messages == b.messages == [USER, ASSISTANT]
    assert (a.source, b.source) == (f"{path}:1", f"{path}:3")
    assert [s for s, _ in read_jsonl(path)] == [f"{path}:1", f"{path}:3"]
    write_jsonl(tmp_path / "b.json", [chat])
    assert [e.source for e in load_jsonl_examples(tmp_path, limit=2)] == [f"{path}:1", f"{path}:3"]
    assert len(load_jsonl_examples(tmp_path)) == 3


@pytest.mark.parametrize("line,fragment", [
    ("{oops", "not valid JSON"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "message 1: unknown role 'robot'"),
])
def test_load_jsonl_errors_name_file_and_line(tmp_path, line, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"messages": [USER, ASSISTANT]}), line])
    with pytest.raises(MessageError) as info:
        load_jsonl_examples(path)
    assert str(info.value).startswith(f"{path}:2: ") and fragment in str(info.value)


def test_parquet_and_saved_datasets_say_how_to_export(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(MessageError, match=r"d\.parquet: is parquet data; `python -m inference eval` reads "
                                           r"JSON-lines.*Dataset\.to_json"):
        load_jsonl_examples(tmp_path / "d.parquet")
    with pytest.raises(MessageError, match="is parquet data"):
        load_jsonl_examples(tmp_path)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    with pytest.raises(MessageError, match="saved: is a saved HF dataset; .*Dataset\\.to_json"):
        load_jsonl_examples(saved)


def test_load_jsonl_argument_errors(tmp_path):
    with pytest.raises(MessageError, match="dataset not found"):
        load_jsonl_examples(tmp_path / "nope.jsonl")
    with pytest.raises(MessageError, match="holds no .jsonl or .json files"):
        load_jsonl_examples(tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"messages": [USER, ASSISTANT]})])
    with pytest.raises(MessageError, match="unknown dataset format 'alpaca'"):
        load_jsonl_examples(path, format="alpaca")
    with pytest.raises(MessageError, match="dataset limit must be a positive integer"):
        load_jsonl_examples(path, limit=0)
