"""Chat conversations: reading them from JSON-lines and validating them into one normalized representation.

Training data, held-out eval data and HTTP requests all speak OpenAI chat messages, so their validation has one home,
here (``finetune`` builds on it; the runtime may not import ``finetune``). This module owns the JSON-lines reader
with exact ``file:line`` locations, per-record format detection (OpenAI ``messages`` or ShareGPT ``conversations``),
ShareGPT conversion, and normalization of messages and tools to validated OpenAI chat messages with flat
``tool_calls``, assistant ``thinking`` and resolved tool names. It does not render or tokenize (see
``inference.harmony``), and it never imports HF ``datasets``: parquet and ``save_to_disk`` data are read by
``finetune.data.formats`` only.

Public API:

- ``normalize_messages(messages, where="request", strict_keys=True) -> list[dict]``: validate a list of OpenAI chat
  messages; ``strict_keys=False`` ignores unknown message keys (clients send extras such as ``refusal``).
- ``normalize_tools(tools, where) -> list[dict] | None``: validate OpenAI tool (function) definitions.
- ``normalize_record_tools(tools, where) -> (tools, builtin_tools)``: a record's tools, built-in browser/python
  declarations (``{"type": "python"}``) included.
- ``read_jsonl(path) -> Iterator[(source, record)]``: records of one JSON-lines file, ``source`` is ``file:line``.
- ``to_example(record, source, format="auto", require_assistant=True) -> Example``: one record, normalized.
- ``read_examples(path, records, format="auto", limit=None) -> list[Example]``: validate the arguments, then
  normalize what ``records(path)`` yields; the loop that every dataset loader shares.
- ``load_jsonl_examples(path, format="auto", limit=None) -> list[Example]``: a .jsonl/.json file or a directory
  of them.

Any bad input raises :class:`MessageError` with a one-line message that says where: ``data/x.jsonl:17: message 2:
...`` for a record, ``request: message 2: ...`` for a request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.errors import UserError
from inference.harmony import BUILTIN_TOOLS, REASONING_EFFORTS

FORMATS = ("auto", "openai", "sharegpt")
ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "thinking", "reasoning", "reasoning_content", "tool_calls", "name",
                "tool_call_id", "weight")
THINKING_KEYS = ("thinking", "reasoning", "reasoning_content")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_call": "assistant"}
SHAREGPT_KEYS = ("from", "value", "weight")
SAVED_DATASET_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")  # what marks a save_to_disk directory

Records = Generator[tuple[str, Any], None, None]  # (source, record) pairs, source like "data/x.jsonl:17"


class MessageError(UserError):
    """A conversation, message, tool or dataset record is malformed; the message says where."""


@dataclass(frozen=True)
class Example:
    """One conversation, normalized.

    ``messages`` hold only ``role`` and ``content`` (str), plus ``thinking``, ``tool_calls`` (``[{"id", "name",
    "arguments"}]``, arguments a JSON string) and ``weight`` (0.0 or 1.0) on assistant messages and ``name`` on tool
    messages. ``tools`` are ``[{"name", "description", "parameters"}]`` (a dotted name is a tool in a namespace of
    its own); ``builtin_tools`` the built-in tools (browser, python) the record declares.
    """

    messages: list[dict]
    tools: list[dict] | None
    reasoning_effort: str | None
    source: str
    builtin_tools: tuple[str, ...] = ()   # gpt-oss's built-in tools the record declares: browser, python


# ----------------------------------------------------------------------------------------------- datasets

def read_examples(path: str | Path, records: Callable[[Path], Records], format: str = "auto",
                  limit: int | None = None) -> list[Example]:
    """Normalize the records that ``records(path)`` yields into examples, stopping after ``limit``.

    ``format`` is ``auto`` (decided per record), ``openai`` or ``sharegpt``.
    """
    if format not in FORMATS:
        raise MessageError(f"unknown dataset format {format!r} (expected {', '.join(FORMATS)})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MessageError(f"dataset limit must be a positive integer, got {limit!r}")
    path = Path(path)
    if not path.exists():
        raise MessageError(f"dataset not found: {path}")
    examples: list[Example] = []
    found = records(path)
    try:
        for source, record in found:
            examples.append(to_example(record, source, format))
            if limit is not None and len(examples) >= limit:
                break
    finally:
        found.close()  # with a limit, the file being read is closed now rather than at garbage collection
    if not examples:
        raise MessageError(f"{path}: no examples")
    return examples


def load_jsonl_examples(path: str | Path, format: str = "auto", limit: int | None = None) -> list[Example]:
    """Read a .jsonl/.json file, or a directory of them (in name order), into normalized examples."""
    return read_examples(path, _jsonl_dataset, format, limit)


def read_jsonl(path: str | Path, problems: list[str] | None = None) -> Records:
    """(``file:line``, record) for each non-blank line of a JSON-lines file. A line that is not valid UTF-8 or JSON
    raises :class:`MessageError`, or, given ``problems``, is added to it and skipped (``validate`` lists them all)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            source = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = f"{source}: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            else:
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    yield source, json.loads(line)
                    continue
                except json.JSONDecodeError as exc:
                    hint = "; expected one JSON object per line" if line.strip() in ("[", "{") else ""
                    problem = f"{source}: not valid JSON ({exc.msg} at column {exc.colno}){hint}"
                except RecursionError:
                    problem = f"{source}: JSON nested too deeply to read"
            if problems is None:
                raise MessageError(problem)
            problems.append(problem)


def _why(exc: Exception) -> str:
    """What json.loads objected to: its message, or that the text nests deeper than Python's parser goes."""
    return exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply to read"


def _jsonl_dataset(path: Path) -> Records:
    for file in _jsonl_files(path):
        yield from read_jsonl(file)


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix == ".parquet":
            raise _not_jsonl(path, "parquet data")
        return [path]
    if any((path / name).exists() for name in SAVED_DATASET_FILES):
        raise _not_jsonl(path, "a saved HF dataset")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".parquet", ".jsonl", ".json"))
    if any(p.suffix == ".parquet" for p in files):
        raise _not_jsonl(path, "parquet data")
    if not files:
        raise MessageError(f"{path}: holds no .jsonl or .json files")
    return files


def _not_jsonl(path: Path, what: str) -> MessageError:
    # Reading these needs HF datasets and pyarrow, which the runtime does not depend on; training reads them.
    return MessageError(f"{path}: is {what}; `python -m inference eval` reads JSON-lines (a .jsonl/.json file or a "
                        "directory of them): export it with `datasets.Dataset.to_json('data.jsonl')`")


# ----------------------------------------------------------------------------------------------- records

def to_example(record: Any, source: str, format: str = "auto", require_assistant: bool = True) -> Example:
    """One dataset record (OpenAI ``messages`` or ShareGPT ``conversations``) as a normalized :class:`Example`.

    ``require_assistant`` rejects a conversation with no assistant message (nothing to train on or to compare to).
    """
    if not isinstance(record, dict):
        raise MessageError(f"{source}: record must be a JSON object, got {_kind(record)}")
    if _record_format(record, source, format) == "openai":
        messages = normalize_messages(record["messages"], source)
    else:
        messages = _normalize(_sharegpt_items(record, source))
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise MessageError(f"{source}: no assistant message (nothing to train on or evaluate)")
    effort = record.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise MessageError(f"{source}: reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
    tools, builtins = normalize_record_tools(record.get("tools"), source)
    return Example(messages, tools, effort, source, builtins)


def _record_format(record: dict, source: str, format: str) -> str:
    found = ", ".join(repr(k) for k in record) or "none"
    if format == "auto":
        if "messages" not in record and "conversations" not in record:
            raise MessageError(f"{source}: cannot tell the format: expected a 'messages' (openai) or 'conversations' "
                               f"(sharegpt) key, found keys: {found}")
        format = "openai" if "messages" in record else "sharegpt"
    key = "messages" if format == "openai" else "conversations"
    if key not in record:
        raise MessageError(f"{source}: {format} record needs a {key!r} key, found keys: {found}")
    return format


def _check_turns(turns: Any, key: str, where: str) -> None:
    if not isinstance(turns, list):
        raise MessageError(f"{where}: {key!r} must be a list, got {_kind(turns)}")
    if not turns:
        raise MessageError(f"{where}: empty conversation")


def _sharegpt_items(record: dict, source: str) -> list[tuple[str, dict]]:
    """ShareGPT turns as (location, OpenAI-style message) pairs; function_call turns become assistant tool calls."""
    turns = record["conversations"]
    _check_turns(turns, "conversations", source)
    items: list[tuple[str, dict]] = []
    if isinstance(record.get("system"), str) and record["system"]:
        items.append((f"{source}: 'system'", {"role": "system", "content": record["system"]}))
    pending: list[str] = []  # names of function calls still waiting for their observation
    for i, turn in enumerate(turns, 1):
        where = f"{source}: turn {i}"
        if not isinstance(turn, dict):
            raise MessageError(f"{where}: must be an object, got {_kind(turn)}")
        unknown = [k for k in turn if k not in SHAREGPT_KEYS]
        if unknown:
            raise MessageError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(SHAREGPT_KEYS)})")
        sender, value = turn.get("from"), turn.get("value")
        if sender not in SHAREGPT_ROLES:
            raise MessageError(f"{where}: unknown 'from' {sender!r} (expected {', '.join(SHAREGPT_ROLES)})")
        msg: dict[str, Any] = {"role": SHAREGPT_ROLES[sender], "content": value}
        if sender == "function_call":
            call = _function_call(value, where)
            msg = {"role": "assistant", "tool_calls": [{"name": call.get("name"), "arguments": call.get("arguments")}]}
            pending.append(call.get("name"))
        elif msg["role"] == "tool":
            if not pending:
                raise MessageError(f"{where}: {sender!r} turn without a preceding function_call")
            msg["name"] = pending.pop(0)
        else:
            pending.clear()
        if "weight" in turn:
            msg["weight"] = turn["weight"]
        items.append((where, msg))
    return items


def _function_call(value: Any, where: str) -> dict:
    call = value
    if isinstance(value, str):
        try:
            call = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise MessageError(f"{where}: function_call value is not valid JSON ({_why(exc)})") from None
    if not isinstance(call, dict):
        raise MessageError(f"{where}: function_call value must be an object {{name, arguments}}, got {_kind(call)}")
    return call


# ----------------------------------------------------------------------------------------------- messages

def normalize_messages(messages: Any, where: str = "request", strict_keys: bool = True) -> list[dict]:
    """Validate OpenAI chat ``messages`` (located as ``{where}: message {i}``, 1-based) into normalized messages.

    ``strict_keys=False`` ignores message keys we do not know instead of rejecting them: an HTTP client sends
    extras such as ``refusal``, ``audio`` or ``annotations`` that carry nothing we render. A request need not hold
    an assistant message.
    """
    _check_turns(messages, "messages", where)
    return _normalize([(f"{where}: message {i}", m) for i, m in enumerate(messages, 1)], strict_keys)


def _normalize(items: list[tuple[str, Any]], strict_keys: bool = True) -> list[dict]:
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for tool messages without a name
    out = []
    for where, m in items:
        if not isinstance(m, dict):
            raise MessageError(f"{where}: must be an object, got {_kind(m)}")
        unknown = [k for k in m if k not in MESSAGE_KEYS]
        if unknown and strict_keys:
            raise MessageError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(MESSAGE_KEYS)})")
        role = m.get("role")
        if role not in ROLES:
            raise MessageError(f"{where}: unknown role {role!r} (expected {', '.join(ROLES)})")
        content = _content(m.get("content"), where)
        if role == "assistant":
            msg = _assistant(m, content, where)
            call_names.update((c["id"], c["name"]) for c in msg.get("tool_calls", ()) if c["id"] is not None)
        else:
            msg = _non_assistant(m, role, content, where, call_names)
        weight = m.get("weight")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
                raise MessageError(f"{where}: weight must be 0 or 1, got {weight!r}")
            if role == "assistant":
                msg["weight"] = float(weight)
        out.append(msg)
    return out


def _assistant(m: dict, content: str | None, where: str) -> dict:
    thinking = _thinking(m, where)
    calls = _tool_calls(m.get("tool_calls"), where)
    if not content and not calls and not thinking:
        raise MessageError(f"{where}: assistant message has no content, thinking or tool_calls")
    msg: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if thinking:
        msg["thinking"] = thinking
    if calls:
        msg["tool_calls"] = calls
    return msg


def _non_assistant(m: dict, role: str, content: str | None, where: str, call_names: dict[str, str]) -> dict:
    for key in (*THINKING_KEYS, "tool_calls"):
        if m.get(key) is not None:
            raise MessageError(f"{where}: only assistant messages can have {key!r}")
    if content is None:
        raise MessageError(f"{where}: {role} message has no content")
    if content == "" and role != "tool":
        raise MessageError(f"{where}: {role} message has empty content")
    msg = {"role": role, "content": content}
    if role == "tool":
        msg["name"] = _tool_name(m, where, call_names)
    return msg


def _content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MessageError(f"{where}: content must be a string or a list of text parts, got {_kind(content)}")
    texts = []
    for j, part in enumerate(content, 1):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            what = f"type {part.get('type')!r}" if isinstance(part, dict) else _kind(part)
            raise MessageError(f"{where}: content part {j} must be {{\"type\": \"text\", \"text\": str}}, got {what}")
        texts.append(part["text"])
    return "".join(texts)


def _thinking(m: dict, where: str) -> str | None:
    present = [k for k in THINKING_KEYS if m.get(k) is not None]
    if len(present) > 1:
        raise MessageError(f"{where}: has both {present[0]!r} and {present[1]!r}; give the reasoning once")
    if not present:
        return None
    text = m[present[0]]
    if not isinstance(text, str):
        raise MessageError(f"{where}: {present[0]!r} must be a string, got {_kind(text)}")
    return text or None


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise MessageError(f"{where}: tool_calls must be a list, got {_kind(calls)}")
    out = []
    for j, call in enumerate(calls, 1):
        at = f"{where}: tool call {j}"
        if not isinstance(call, dict):
            raise MessageError(f"{at}: must be an object, got {_kind(call)}")
        fn = call
        if "function" in call:  # OpenAI's nested form; our flat form has name/arguments on the call itself
            if call.get("type", "function") != "function":
                raise MessageError(f"{at}: unsupported type {call.get('type')!r} (only 'function')")
            fn = call["function"]
            if not isinstance(fn, dict):
                raise MessageError(f"{at}: 'function' must be an object, got {_kind(fn)}")
        name, call_id = fn.get("name"), call.get("id")
        if not isinstance(name, str) or not name:
            raise MessageError(f"{at}: needs a function 'name' string, got {name!r}")
        if call_id is not None and not isinstance(call_id, str):
            raise MessageError(f"{at} ({name!r}): id must be a string, got {_kind(call_id)}")
        out.append({"id": call_id, "name": name, "arguments": _arguments(fn.get("arguments"), f"{at} ({name!r})",
                                                                           code=name == "python")})
    return out


def _arguments(args: Any, at: str, code: bool = False) -> str:
    """Tool-call arguments as a JSON string (what Harmony renders), checked to parse; ``code``: the built-in python
    tool's input, which is Python source, kept as written."""
    if args is None:
        return "{}"
    if isinstance(args, dict):
        return json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        raise MessageError(f"{at}: arguments must be a JSON string or an object, got {_kind(args)}")
    if code:
        return args
    try:
        json.loads(args)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MessageError(f"{at}: arguments are not valid JSON ({_why(exc)})") from None
    return args


def _tool_name(m: dict, where: str, call_names: dict[str, str]) -> str:
    name, call_id = m.get("name"), m.get("tool_call_id")
    if name is not None:
        if not isinstance(name, str) or not name:
            raise MessageError(f"{where}: tool message 'name' must be a non-empty string, got {name!r}")
        return name
    if call_id is None:
        raise MessageError(f"{where}: tool message has neither 'name' nor 'tool_call_id'")
    if call_id not in call_names:
        raise MessageError(f"{where}: tool message has no 'name' and its tool_call_id {call_id!r} matches no earlier "
                           "assistant tool call")
    return call_names[call_id]


# ----------------------------------------------------------------------------------------------- tools

def normalize_tools(tools: Any, where: str) -> list[dict] | None:
    """Validate OpenAI tool (function) definitions (nested ``{"type": "function", "function": {...}}`` or flat) into
    ``[{"name", "description", "parameters"}]``; None when there are none. A dotted name (``crm.lookup``) is tool
    ``lookup`` of namespace ``crm``. Built-in tools are refused here (a request cannot run them)."""
    return _normalize_tools(tools, where, allow_builtin=False)[0]


def normalize_record_tools(tools: Any, where: str) -> tuple[list[dict] | None, tuple[str, ...]]:
    """A dataset record's tools: its function tools (as :func:`normalize_tools`) and the built-in tools it declares
    (``{"type": "browser"}``, ``{"type": "python"}``), in the order gpt-oss's system message lists them."""
    return _normalize_tools(tools, where, allow_builtin=True)


def _normalize_tools(tools: Any, where: str, allow_builtin: bool) -> tuple[list[dict] | None, tuple[str, ...]]:
    if isinstance(tools, str):  # some HF datasets store the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise MessageError(f"{where}: 'tools' is a string but not valid JSON ({_why(exc)})") from None
    if tools is None:
        return None, ()
    if not isinstance(tools, list):
        raise MessageError(f"{where}: 'tools' must be a list, got {_kind(tools)}")
    out: list[dict] = []
    builtins: set[str] = set()
    for j, tool in enumerate(tools, 1):
        at = f"{where}: tool {j}"
        if not isinstance(tool, dict):
            raise MessageError(f"{at}: must be an object, got {_kind(tool)}")
        kind = tool.get("type", "function")
        if kind in BUILTIN_TOOLS and allow_builtin:
            unknown = [k for k in tool if k != "type"]
            if unknown:
                raise MessageError(f"{at}: the built-in {kind} tool takes no settings, got {unknown[0]!r}")
            builtins.add(kind)
            continue
        if kind != "function":
            allowed = "'function', 'browser' or 'python'" if allow_builtin else "only 'function'"
            raise MessageError(f"{at}: unsupported tool type {kind!r} ({allowed})")
        spec = tool.get("function", tool)
        if not isinstance(spec, dict):
            raise MessageError(f"{at}: 'function' must be an object, got {_kind(spec)}")
        name, desc, params = spec.get("name"), spec.get("description", ""), spec.get("parameters")
        if not isinstance(name, str) or not name:
            raise MessageError(f"{at}: needs a 'name' string, got {name!r}")
        _check_tool_name(name, at)
        if any(t["name"] == name for t in out):
            raise MessageError(f"{at}: duplicate tool name {name!r}")
        if not isinstance(desc, str):
            raise MessageError(f"{at} ({name!r}): 'description' must be a string, got {_kind(desc)}")
        if params is not None and not isinstance(params, dict):
            raise MessageError(f"{at} ({name!r}): 'parameters' must be a JSON schema object, got {_kind(params)}")
        out.append({"name": name, "description": desc, "parameters": params})
    return out or None, tuple(t for t in BUILTIN_TOOLS if t in builtins)


def _check_tool_name(name: str, at: str) -> None:
    """A function name, or ``namespace.name`` for a tool in a namespace of its own (one dot, both parts set)."""
    parts = name.split(".")
    if len(parts) > 2 or not all(parts):
        raise MessageError(f"{at}: tool name {name!r} must be a name or namespace.name (one dot)")
    if len(parts) == 2 and parts[0] in BUILTIN_TOOLS:
        raise MessageError(f"{at}: namespace {parts[0]!r} is gpt-oss's built-in tool; declare it as "
                           f"{{\"type\": \"{parts[0]}\"}} instead of defining functions in it")


def _kind(x: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if x is None else names.get(type(x), type(x).__name__)
