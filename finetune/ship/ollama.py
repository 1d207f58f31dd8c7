"""The Ollama Modelfile of an export: the GGUF, a Harmony chat template, the stop tokens and sampling defaults.

The template (Go ``text/template``, Ollama's data model, no function but Ollama's ``json``) renders, for a
conversation Ollama hands it, the text ``inference.harmony.render_prompt`` renders for the same conversation with the
recipe's :class:`~inference.harmony.HarmonyOptions` (``tests/test_ollama.py`` executes it with Go's own
``text/template`` and compares string for string):

- **System message**: rendered by our renderer from the options and baked in, so the reasoning effort, the knowledge
  cutoff, the channels, the model identity and the built-in tools are the recipe's. **The date** is the recipe's
  ``conversation_start_date`` when it has one (the date the model was trained and is served with by our own
  renderer), and no line at all when it is None; Ollama's ``currentDate`` is not used, so Ollama prompts do not
  drift from ours with the calendar. The "Calls to these tools must go to the commentary channel" line appears when
  the request has tools, as ours does. Ollama's ``think`` request option does not change the effort.
- **Developer message**: the recipe's ``developer_instructions``, then every non-empty system or developer message
  (``.System`` is the same texts: ours and gpt-oss servers put them all here), joined by blank lines; then the
  function tools as openai-harmony writes them (``# Tools`` / ``## functions`` / ``namespace functions``).
- **History**: user messages; assistant reasoning (analysis), answers (final; commentary when the message also calls
  tools) and tool calls (``<|start|>assistant to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>``
  the arguments ``<|call|>``); tool results (``<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>``
  ... ``<|end|>``, NAME from ``tool_name``, else the call with the same ``tool_call_id``, else the calls in order).
  Reasoning is dropped from a turn that ended in a final answer once a later user message follows, as our renderer
  does; the last turn keeps its reasoning, tool-call chains included. Answers in history end in ``<|end|>``, a last
  assistant message too (no prefill, as ours); the prompt ends with ``<|start|>assistant``.

Tool parameters are exact for a ``type: object`` schema (or none: ``() => any``) whose properties are each:
``string`` (with a string ``enum``: a union of literals), ``number``, ``integer``, ``boolean``, a list of types
(``["string", "null"]``), no type (``any``), ``array`` with or without ``items`` of those types (nested arrays too),
``object`` without ``properties``; required or optional; with or without a (non-empty) description.

Not exact, because Ollama's data model loses it before the template runs: property order (Ollama hands properties
as a Go map, ranged in sorted key order: exact when a tool lists them sorted); ``default``, ``title``,
``examples``, ``nullable``, ``oneOf``, empty descriptions, a description of the parameters object; nested objects'
``properties``; tool-call arguments other than compact JSON with sorted keys and no ``<``, ``>``, ``&`` (Ollama
re-serializes them with Go's ``encoding/json``); consecutive messages of one role (Ollama merges them); tool names
Ollama rewrites for Harmony (``-``, ``.``, spaces). Beyond plain ``text/template`` (no string splitting): a tool
description of several lines (openai-harmony comments each line, the template only the first). Not covered: dotted
tool namespaces (``crm.lookup``) and calls to the built-in browser/python tools in history.
"""

from __future__ import annotations

import os
from dataclasses import replace

STOPS = ("<|return|>", "<|call|>")   # not <|end|>: it also closes reasoning, and stopping there cuts answers off

# The TypeScript type of a property, as openai-harmony's json_schema_to_typescript writes it. "ts" reads an Ollama
# ToolProperty (a struct); array items reach the template as plain JSON (Go maps), which "json-ts" reads by key.
# Nested objects render at openai-harmony's second indent level, the only one a property can reach here.
_TYPES = (
    '{{ define "ts" }}'
    '{{ if gt (len .Type) 1 }}{{ template "union" .Type }}'
    '{{ else if not .Type }}any'
    '{{ else }}{{ $t := index .Type 0 }}'
    '{{ if eq $t "string" }}{{ template "enum" .Enum }}'
    '{{ else if eq $t "array" }}{{ template "items" .Items }}'
    '{{ else if eq $t "object" }}{{ template "object" .Description }}'
    '{{ else }}{{ template "scalar" $t }}{{ end }}'
    '{{ end }}{{ end }}'

    '{{ define "json-ts" }}{{ $t := false }}'
    '{{ if eq (printf "%T" .) "map[string]interface {}" }}{{ $t = index . "type" }}{{ end }}'
    '{{ if eq (printf "%T" $t) "[]interface {}" }}{{ template "union" $t }}'
    '{{ else if not (eq (printf "%T" $t) "string") }}any'
    '{{ else if eq $t "string" }}{{ $e := index . "enum" }}'
    '{{ if eq (printf "%T" $e) "[]interface {}" }}{{ template "enum" $e }}{{ else }}string{{ end }}'
    '{{ else if eq $t "array" }}{{ template "items" (index . "items") }}'
    '{{ else if eq $t "object" }}{{ $d := index . "description" }}'
    '{{ template "object" (and (eq (printf "%T" $d) "string") $d) }}'
    '{{ else }}{{ template "scalar" $t }}{{ end }}{{ end }}'

    '{{ define "items" }}{{ if eq (printf "%T" .) "<nil>" }}Array<any>{{ else }}{{ template "json-ts" . }}[]{{ end }}'
    '{{ end }}'
    # a list of types: integer reads number, the others as written
    '{{ define "union" }}{{ $n := 0 }}{{ range . }}{{ if eq (printf "%T" .) "string" }}'
    '{{ if $n }} | {{ end }}{{ if eq . "integer" }}number{{ else }}{{ . }}{{ end }}{{ $n = 1 }}'
    '{{ end }}{{ end }}{{ if not $n }}any{{ end }}{{ end }}'
    # string literals of an enum (other values are skipped); none: a plain string
    '{{ define "enum" }}{{ $n := 0 }}{{ range . }}{{ if eq (printf "%T" .) "string" }}'
    '{{ if $n }} | {{ end }}"{{ . }}"{{ $n = 1 }}{{ end }}{{ end }}{{ if not $n }}string{{ end }}{{ end }}'
    '{{ define "object" }}{{ if . }}    // {{ . }}\n{{ end }}{\n    }{{ end }}'
    '{{ define "scalar" }}{{ if or (eq . "number") (eq . "integer") }}number'
    '{{ else if eq . "boolean" }}boolean{{ else }}any{{ end }}{{ end }}'
)

# The function tools in the developer message: one `type` per tool, its properties in the order Ollama ranges them.
_TOOLS = (
    '# Tools\n\n## functions\n\nnamespace functions {\n\n'
    '{{ range .Tools }}{{ $fn := .Function }}'
    '{{ if $fn.Description }}// {{ $fn.Description }}\n{{ end }}'
    'type {{ $fn.Name }} = '
    '{{ if $fn.Parameters.Type }}(_: {\n'
    '{{ range $name, $p := $fn.Parameters.Properties }}'
    '{{ if $p.Description }}// {{ $p.Description }}\n{{ end }}'
    '{{ $required := false }}{{ range $fn.Parameters.Required }}{{ if eq . $name }}{{ $required = true }}{{ end }}'
    '{{ end }}{{ $name }}{{ if not $required }}?{{ end }}: {{ template "ts" $p }},\n'
    '{{ end }}})'
    '{{ else }}(){{ end }} => any;\n\n'
    '{{ end }}} // namespace functions'
)

_INSTRUCTION = '(or (eq .Role "system") (eq .Role "developer"))'

# The conversation. Reasoning of an earlier turn is dropped when a user message follows it and the turn (the messages
# between two user messages) holds a final answer: an assistant message with text and no tool call.
_MESSAGES = (
    '{{ $lastUser := -1 }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}'
    '{{ end }}'
    '{{ $pending := false }}'   # the calls of the last assistant message, for tool results that name none
    '{{ range $i, $m := .Messages }}'
    '{{ if eq .Role "user" }}<|start|>user<|message|>{{ .Content }}<|end|>'
    '{{ else if eq .Role "assistant" }}'
    '{{ if .Thinking }}{{ $keep := true }}'
    '{{ if lt $i $lastUser }}{{ $prev := -1 }}{{ $next := -1 }}'
    '{{ range $j, $o := $.Messages }}{{ if eq $o.Role "user" }}'
    '{{ if lt $j $i }}{{ $prev = $j }}{{ else if lt $next 0 }}{{ $next = $j }}{{ end }}{{ end }}{{ end }}'
    '{{ range $j, $o := $.Messages }}'
    '{{ if and (gt $j $prev) (lt $j $next) (eq $o.Role "assistant") $o.Content (not $o.ToolCalls) }}'
    '{{ $keep = false }}{{ end }}{{ end }}'
    '{{ end }}'
    '{{ if $keep }}<|start|>assistant<|channel|>analysis<|message|>{{ .Thinking }}<|end|>{{ end }}'
    '{{ end }}'
    '{{ if .Content }}<|start|>assistant<|channel|>{{ if .ToolCalls }}commentary{{ else }}final{{ end }}'
    '<|message|>{{ .Content }}<|end|>{{ end }}'
    '{{ range .ToolCalls }}<|start|>assistant to=functions.{{ .Function.Name }}<|channel|>commentary '
    '<|constrain|>json<|message|>{{ if .Function.Arguments }}{{ json .Function.Arguments }}{{ else }}{}{{ end }}'
    '<|call|>{{ end }}'
    '{{ if .ToolCalls }}{{ $pending = .ToolCalls }}{{ end }}'
    '{{ else if eq .Role "tool" }}{{ $name := .ToolName }}'
    '{{ if and (not $name) .ToolCallID }}{{ $id := .ToolCallID }}{{ range $.Messages }}{{ range .ToolCalls }}'
    '{{ if eq .ID $id }}{{ $name = .Function.Name }}{{ end }}{{ end }}{{ end }}{{ end }}'
    '{{ if $pending }}{{ if not $name }}{{ $name = (index $pending 0).Function.Name }}{{ end }}'
    '{{ $pending = slice $pending 1 }}{{ end }}'
    '<|start|>functions.{{ $name }} to=assistant<|channel|>commentary<|message|>{{ .Content }}<|end|>'
    '{{ end }}{{ end }}'
    '<|start|>assistant'
)


def _go_string(text: str) -> str:
    """``text`` as a Go string literal (printable characters kept, the rest escaped)."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def _literal(text: str) -> str:
    """Template text printing ``text`` as is. Text the template or the Modelfile would read as syntax (``{{``,
    ``\"\"\"``) or that the Modelfile parser drops (unprintable characters) goes in as a Go string."""
    if "{{" in text or '"""' in text or not all(c.isprintable() or c in "\n\t" for c in text):
        return "{{ " + _go_string(text) + " }}"
    return text


def _system_blocks(options) -> tuple[str, str, str]:
    """Our renderer's system message as (prefix, what a request with function tools adds, suffix)."""
    from inference import harmony
    enc = harmony.encoding()
    bare = replace(options, developer_instructions=None)
    tool = {"name": "t", "description": "", "parameters": None}
    developer = ("<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
                 "type t = () => any;\n\n} // namespace functions<|end|>")
    plain = enc.decode(harmony.render_prompt([], None, bare)).removesuffix("<|start|>assistant")
    tools = enc.decode(harmony.render_prompt([], [tool], bare)).removesuffix(developer + "<|start|>assistant")
    if not (plain.endswith("<|end|>") and tools.endswith("<|end|>")):
        raise RuntimeError("unexpected Harmony system message (openai-harmony changed?)")
    head = len(os.path.commonprefix([plain, tools]))
    tail = len(os.path.commonprefix([plain[head:][::-1], tools[head:][::-1]]))
    return tools[:head], tools[head:len(tools) - tail], tools[len(tools) - tail:]


def template(options) -> str:
    """The Go template rendering a conversation as our renderer does with ``options`` (see the module docstring)."""
    prefix, with_tools, suffix = _system_blocks(options)
    system = _literal(prefix) + (f"{{{{ if .Tools }}}}{_literal(with_tools)}{{{{ end }}}}" if with_tools else "")
    system += _literal(suffix)
    baked = options.developer_instructions
    flag = "true" if baked else "false"
    developer = (
        f"{{{{ $instructions := {flag} }}}}{{{{ range .Messages }}}}{{{{ if and {_INSTRUCTION} .Content }}}}"
        "{{ $instructions = true }}{{ end }}{{ end }}"
        "{{ if or $instructions .Tools }}<|start|>developer<|message|>"
        "{{ if $instructions }}# Instructions\n\n" + (_literal(baked) if baked else "")
        + f"{{{{ $more := {flag} }}}}{{{{ range .Messages }}}}{{{{ if and {_INSTRUCTION} .Content }}}}"
        "{{ if $more }}\n\n{{ end }}{{ .Content }}{{ $more = true }}{{ end }}{{ end }}{{ end }}"
        "{{ if .Tools }}{{ if $instructions }}\n\n{{ end }}" + _TOOLS + "{{ end }}<|end|>{{ end }}")
    text = system + developer + _MESSAGES + _TYPES
    if '"""' in text:  # would end the Modelfile's TEMPLATE early; _literal guards the baked texts
        raise RuntimeError('the Ollama template must not contain """')
    return text


def modelfile(options) -> str:
    """An Ollama Modelfile for a Harmony model: the GGUF, a Harmony template and the stop tokens."""
    return (
        "# Ollama Modelfile for a gpt-oss fine-tune (Harmony format); made by `python -m finetune export`.\n"
        "FROM ./model.gguf\n"
        f'TEMPLATE """{template(options)}"""\n'
        + "".join(f'PARAMETER stop "{stop}"\n' for stop in STOPS)
        + "PARAMETER temperature 1.0\nPARAMETER top_p 1.0\n")
