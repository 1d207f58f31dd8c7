"""Tests for finetune.data.formats: formats, normalization, HF directories, errors with locations, fingerprints."""

import json
import sys

import pytest
from conftest import run

from finetune.data.formats import DataError, Example, dataset_fingerprint, load_examples
from inference.errors import UserError

USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
CHAT = {"messages": [USER, ASSISTANT]}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def load_one(tmp_path, record, **kw):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [record]), **kw)
    assert len(examples) == 1
    return examples[0]


def error(tmp_path, records, name="bad.jsonl", **kw):
    path = write_jsonl(tmp_path / name, records)
    with pytest.raises(DataError) as info:
        load_examples(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return path, msg


# ------------------------------------------------------------------------------------------------ openai format

def test_import_is_light():
    assert issubclass(DataError, UserError)
    code = "import sys, finetune.data.formats; sys.exit('datasets' in sys.modules or 'pyarrow' in sys.modules)"
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_openai_basic_with_blank_lines_and_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(CHAT) + "\n\n" + json.dumps({**CHAT, "reasoning_effort": "high"}) + "\n")
    a, b = load_examples(path)
    assert isinstance(a, Example)
    assert a.messages == [USER, ASSISTANT]
    assert a.tools is None and a.reasoning_effort is None
    assert a.source == f"{path}:2" and b.source == f"{path}:4"
    assert b.reasoning_effort == "high"


@pytest.mark.parametrize("alias", ["thinking", "reasoning", "reasoning_content"])
def test_thinking_aliases(tmp_path, alias):
    ex = load_one(tmp_path, {"messages": [USER, {"role": "assistant", "content": "4", alias: "2+2=4"}]})
    assert ex.messages[1] == {"role": "assistant", "content": "4", "thinking": "2+2=4"}


def test_thinking_only_assistant_and_weight(tmp_path):
    ex = load_one(tmp_path, {"messages": [
        {"role": "system", "content": "be brief"}, {"role": "developer", "content": "dev"},
        USER, {"role": "assistant", "content": "", "thinking": "hmm", "weight": 0}, USER, {**ASSISTANT, "weight": 1}]})
    assert ex.messages[3] == {"role": "assistant", "content": "", "thinking": "hmm", "weight": 0.0}
    assert ex.messages[5]["weight"] == 1.0 and isinstance(ex.messages[5]["weight"], float)


def test_content_parts_are_joined(tmp_path):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    ex = load_one(tmp_path, {"messages": [{"role": "user", "content": parts}, ASSISTANT]})
    assert ex.messages[0] == {"role": "user", "content": "ab"}


def test_tool_calls_tools_and_name_resolution(tmp_path):
    record = {
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                                     "parameters": {"type": "object", "properties": {}}}},
                  {"name": "add", "parameters": {"type": "object"}}],
        "messages": [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
                {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "name": "add", "content": [{"type": "text", "text": "3"}]},
            {"role": "assistant", "content": "sunny, 3"},
        ]}
    ex = load_one(tmp_path, record)
    assert ex.tools == [
        {"name": "get_weather", "description": "weather", "parameters": {"type": "object", "properties": {}}},
        {"name": "add", "description": "", "parameters": {"type": "object"}}]
    assert ex.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "name": "get_weather", "arguments": '{"city": "Zürich"}'},
        {"id": "c2", "name": "add", "arguments": '{"a": 1, "b": 2}'}]}
    assert ex.messages[2] == {"role": "tool", "content": "sunny", "name": "get_weather"}
    assert ex.messages[3] == {"role": "tool", "content": "3", "name": "add"}


# ------------------------------------------------------------------------------------------------ sharegpt, auto

SHAREGPT = {"tools": json.dumps([{"name": "lookup", "description": "d", "parameters": {"type": "object"}}]),
            "conversations": [
                {"from": "system", "value": "sys"},
                {"from": "human", "value": "find x"},
                {"from": "function_call", "value": json.dumps({"name": "lookup", "arguments": {"q": "x"}})},
                {"from": "observation", "value": "x=1"},
                {"from": "gpt", "value": "x is 1"},
                {"from": "user", "value": "again"},
                {"from": "assistant", "value": "1"}]}


def test_sharegpt(tmp_path):
    ex = load_one(tmp_path, SHAREGPT, format="sharegpt")
    assert ex.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "find x"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": None, "name": "lookup", "arguments": '{"q": "x"}'}]},
        {"role": "tool", "content": "x=1", "name": "lookup"},
        {"role": "assistant", "content": "x is 1"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "1"}]
    assert ex.tools == [{"name": "lookup", "description": "d", "parameters": {"type": "object"}}]


def test_auto_detects_per_record(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [CHAT, SHAREGPT])
    a, b = load_examples(path)
    assert a.messages == [USER, ASSISTANT]
    assert b.messages[-1] == {"role": "assistant", "content": "1"}


def test_explicit_format_mismatch(tmp_path):
    path, msg = error(tmp_path, [CHAT], format="sharegpt")
    assert msg.startswith(f"{path}:1: ") and "'conversations'" in msg and "'messages'" in msg


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT] * 5 + ["not json"])
    assert len(load_examples(path, limit=3)) == 3
    with pytest.raises(DataError):
        load_examples(path, limit=0)


# ------------------------------------------------------------------------------------------------ HF directories

ROWS = [{"messages": [USER, ASSISTANT]},
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a", "thinking": "t",
                       "tool_calls": [{"id": "c", "type": "function",
                                       "function": {"name": "f", "arguments": '{"x": 1}'}}]},
                      {"role": "tool", "tool_call_id": "c", "content": "r"},
                      {"role": "assistant", "content": "done"}]}]


def check_rows(examples, where, row=True):
    assert [len(e.messages) for e in examples] == [2, 4]
    assert examples[0].messages == [USER, ASSISTANT]  # arrow's None-filled keys are gone
    assert examples[1].messages[1] == {"role": "assistant", "content": "a", "thinking": "t",
                                       "tool_calls": [{"id": "c", "name": "f", "arguments": '{"x": 1}'}]}
    assert examples[1].messages[2] == {"role": "tool", "content": "r", "name": "f"}
    if row:
        assert examples[1].source == f"{where}[row 1]"


def test_hf_save_to_disk(tmp_path):
    import datasets
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    check_rows(load_examples(tmp_path / "ds"), tmp_path / "ds")


def test_hf_dataset_dict(tmp_path):
    import datasets
    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    check_rows(load_examples(tmp_path / "dd"), tmp_path / "dd")
    datasets.DatasetDict({"validation": ds, "test": ds}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(DataError, match=r"nt: .*no 'train' split \(splits: validation, test\)"):
        load_examples(tmp_path / "nt")


def test_parquet_dir_and_file(tmp_path):
    import datasets
    (tmp_path / "pq").mkdir()
    ds = datasets.Dataset.from_list(ROWS)  # shards of one dataset share a schema
    ds.select([0]).to_parquet(str(tmp_path / "pq" / "a.parquet"))
    ds.select([1]).to_parquet(str(tmp_path / "pq" / "b.parquet"))
    check_rows(load_examples(tmp_path / "pq"), tmp_path / "pq")
    assert load_examples(tmp_path / "pq" / "b.parquet")[0].source == f"{tmp_path / 'pq' / 'b.parquet'}[row 0]"


def test_jsonl_dir(tmp_path):
    d = tmp_path / "js"
    d.mkdir()
    write_jsonl(d / "1.jsonl", ROWS[:1])
    write_jsonl(d / "2.json", [{"note": "x", "conversations": SHAREGPT["conversations"]}, ROWS[1]])
    (d / "README.md").write_text("ignored")
    a, sg, b = load_examples(d)
    check_rows([a, b], d, row=False)
    assert sg.messages[2]["tool_calls"][0]["name"] == "lookup"
    assert (a.source, sg.source, b.source) == (f"{d}/1.jsonl:1", f"{d}/2.json:1", f"{d}/2.json:2")
    write_jsonl(d / "3.jsonl", [CHAT, {"other": 1}])
    with pytest.raises(DataError, match=r"js/3\.jsonl:2: cannot tell the format"):
        load_examples(d)
    write_jsonl(d / "4.parquet", [])
    with pytest.raises(DataError, match="both .parquet and .jsonl"):
        load_examples(d)


def test_hf_row_errors_name_the_row(tmp_path):
    import datasets
    rows = [ROWS[0], {"messages": [{"role": "robot", "content": "x"}, ASSISTANT]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds\[row 1\]: message 1: unknown role 'robot'"):
        load_examples(tmp_path / "ds")


def test_empty_dir(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no .parquet"):
        load_examples(tmp_path / "e")


# ------------------------------------------------------------------------------------------------ errors

def test_not_found(tmp_path):
    with pytest.raises(DataError, match="dataset not found: .*nope.jsonl"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="dataset not found"):
        dataset_fingerprint(tmp_path / "nope.jsonl")


BAD = [  # (records, line of the bad one, fragment of the message)
    ([CHAT, "{not json"], 2, "not valid JSON"),
    (["[", json.dumps(CHAT), "]"], 1, "expected one JSON object per line"),
    ([CHAT, CHAT, "[1, 2]"], 3, "record must be a JSON object, got array"),
    (['{"messages": "hi"}'], 1, "'messages' must be a list, got string"),
    ([CHAT, {"messages": []}], 2, "empty conversation"),
    ([{"messages": [USER, ASSISTANT, {"role": "robot", "content": "x"}]}], 1,
     "message 3: unknown role 'robot' (expected system, developer, user, assistant, tool)"),
    ([{"messages": [{"role": "user", "content": 5}, ASSISTANT]}], 1,
     "message 1: content must be a string or a list of text parts, got number"),
    ([{"messages": [{"role": "user", "content": [{"type": "image_url"}]}, ASSISTANT]}], 1,
     "message 1: content part 1"),
    ([{"messages": [{"role": "user"}, ASSISTANT]}], 1, "message 1: user message has no content"),
    ([{"messages": [USER, {"role": "assistant", "content": None}]}], 1, "message 2: assistant message has no content"),
    ([CHAT, {"messages": [USER]}], 2, "no assistant message (nothing to train on or evaluate)"),
    ([{**CHAT, "reasoning_effort": "max"}], 1, "reasoning_effort must be one of low, medium, high, got 'max'"),
    ([{"messages": [USER, {**ASSISTANT, "extra": 1}]}], 1, "message 2: unknown key 'extra'"),
    ([{"messages": [USER, {**ASSISTANT, "weight": 0.5}]}], 1, "message 2: weight must be 0 or 1"),
    ([{"messages": [{**USER, "thinking": "x"}, ASSISTANT]}], 1, "only assistant messages can have 'thinking'"),
    ([{"messages": [USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{bad"}}]}]}], 1,
     "message 2: tool call 1 ('get_weather'): arguments are not valid JSON"),
    ([{"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f"}}]},
                    {"role": "tool", "tool_call_id": "zzz", "content": "r"}, ASSISTANT]}], 1,
     "message 3: tool message has no 'name' and its tool_call_id 'zzz' matches no earlier assistant tool call"),
    ([{"messages": [USER, {"role": "tool", "content": "r"}, ASSISTANT]}], 1, "neither 'name' nor 'tool_call_id'"),
    ([{"foo": 1, "bar": 2}], 1, "cannot tell the format: expected a 'messages' (openai) or 'conversations' (sharegpt) "
                                "key, found keys: 'foo', 'bar'"),
    ([{"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]}], 1,
     "turn 2: unknown 'from' 'robot'"),
    ([{"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "y"}]}], 1,
     "turn 2: 'observation' turn without a preceding function_call"),
    ([{"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{oops"}]}], 1,
     "turn 2: function_call value is not valid JSON"),
    ([{**CHAT, "tools": [{"type": "function", "function": {"description": "no name"}}]}], 1, "tool 1: needs a 'name'"),
]


@pytest.mark.parametrize("records,line,fragment", BAD, ids=[b[2][:40] for b in BAD])
def test_errors_name_file_and_line(tmp_path, records, line, fragment):
    path, msg = error(tmp_path, records)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert fragment in msg, msg


def test_empty_file(tmp_path):
    path, msg = error(tmp_path, ["", "   "])
    assert msg == f"{path}: no examples"
    (tmp_path / "zero.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="zero.jsonl: no examples"):
        load_examples(tmp_path / "zero.jsonl")


def test_bad_utf8_and_bad_format_argument(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8"):
        load_examples(path)
    with pytest.raises(DataError, match="unknown dataset format 'alpaca'"):
        load_examples(path, format="alpaca")


# ------------------------------------------------------------------------------------------------ fingerprint

def test_fingerprint_file_and_dir(tmp_path):
    import hashlib
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    fp = dataset_fingerprint(path)
    assert fp == hashlib.sha256(path.read_bytes()).hexdigest() == dataset_fingerprint(str(path))
    path.write_bytes(path.read_bytes().replace(b"hello", b"hellp"))
    assert dataset_fingerprint(path) != fp

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_bytes(b"abc")
    (d / "sub" / "b.jsonl").write_bytes(b"def")
    fp = dataset_fingerprint(d)
    assert dataset_fingerprint(d) == fp
    (d / "sub" / "b.jsonl").write_bytes(b"deg")
    assert dataset_fingerprint(d) != fp
    (d / "sub" / "b.jsonl").write_bytes(b"def")
    assert dataset_fingerprint(d) == fp
    (d / "sub" / "b.jsonl").rename(d / "sub" / "c.jsonl")
    assert dataset_fingerprint(d) != fp
