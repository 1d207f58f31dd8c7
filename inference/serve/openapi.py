"""The server's OpenAPI 3.1 description, served at ``GET /openapi.json``.

This module owns the schema and nothing else: every route of :mod:`inference.serve.server` with its parameters, the chat
request body exactly as :func:`inference.serve.server.parse_chat` and the engine's message checks accept it (what is
rejected there is outside the schema here), the reply shapes, and the OpenAI error object with each status the
server answers. It imports nothing of the server, so the schema is a plain function of the served model ids;
``tests/test_server_openapi.py`` fuzzes a live server against it (schemathesis) and checks that no request gets a
5xx.
"""

from __future__ import annotations

from inference.harmony import REASONING_EFFORTS

INT64 = {"type": "integer", "minimum": -2**63, "maximum": 2**63 - 1}


def _nullable(schema: dict) -> dict:
    """``schema`` or JSON null (the server reads null as "not given")."""
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _retry(description: str) -> dict:
    return {**_error(description), "headers": {"Retry-After": {
        "description": "whole seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}}}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# Answers any route may give: a bad key (when the server has one) and a drain in progress.
COMMON = {
    "401": _error("missing or wrong API key (only when the server has one)"),
    "405": _error("the path exists but not with this method (the Allow header names the one it takes)"),
    "503": _retry("the server is shutting down (a drain), or the request waited --max-wait seconds for a slot"),
}

TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
# A tool call as a request may carry it (an earlier assistant turn). Its arguments may also be a string holding a
# JSON object; a schema cannot say "a string that parses", so the schema names the object form only.
TOOL_CALL_IN = {
    "type": "object", "required": ["type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "minLength": 1},
                                    "arguments": {"type": ["object", "null"]}}},
    },
}
TOOL_CALL = {
    "type": "object", "required": ["function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "minLength": 1},
                                    "arguments": {"anyOf": [{"type": "string"}, {"type": "object"},
                                                            {"type": "null"}],
                                                  "description": "a JSON object, or a string holding one"}}},
    },
}
CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]}
NON_EMPTY_CONTENT = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "items": {
    **TEXT_PART, "properties": {**TEXT_PART["properties"], "text": {"type": "string", "minLength": 1}}}}]}

# One object per role, so that a message inside the schema is one the server accepts (the engine's checks:
# inference.conversations.normalize_messages). Other keys are ignored, as OpenAI-compatible servers do.
MESSAGES = {
    "system": {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"enum": ["system", "developer", "user"]}, "content": NON_EMPTY_CONTENT,
                              "name": {"type": "string"}}},
    "assistant": {"type": "object", "required": ["role"],
                  "properties": {"role": {"const": "assistant"}, "content": _nullable(CONTENT),
                                 "reasoning": {"type": "string"},
                                 "tool_calls": {"type": "array", "items": TOOL_CALL_IN}},
                  # something to render: text, reasoning or a tool call
                  "anyOf": [{"required": ["content"], "properties": {"content": NON_EMPTY_CONTENT}},
                            {"required": ["reasoning"], "properties": {"reasoning": {"minLength": 1}}},
                            {"required": ["tool_calls"], "properties": {"tool_calls": {"minItems": 1}}}],
                  "description": "an earlier turn (its reasoning as 'reasoning' or 'reasoning_content')"},
    "tool": {"type": "object", "required": ["role", "content", "name"],
             "properties": {"role": {"const": "tool"}, "content": CONTENT, "name": {"type": "string", "minLength": 1},
                            "tool_call_id": {"type": "string"}},
             "description": "a tool's result; 'name' may be left out when tool_call_id names an earlier call"},
}
TOOL = {
    "type": "object", "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                                    "description": {"type": "string"},
                                    "parameters": {"type": "object", "description": "a JSON schema"}}},
    },
}


def chat_request(model_ids: list[str], max_tokens_cap: int) -> dict:
    """The ``POST /v1/chat/completions`` body: what :func:`inference.serve.server.parse_chat` reads."""
    tokens = {"type": "integer", "minimum": 1,
              "description": f"generated tokens at most; above {max_tokens_cap} (--max-tokens-cap) it is capped and "
                             "the reply carries X-Max-Tokens-Capped"}
    return {
        "type": "object", "required": ["model", "messages"],
        "properties": {
            "model": {"enum": list(model_ids), "description": "the base model or an adapter (GET /v1/models)"},
            "messages": {"type": "array", "minItems": 1, "items": {"oneOf": list(MESSAGES.values())}},
            "tools": _nullable({"type": "array", "items": TOOL}),
            "tool_choice": _nullable({"enum": ["auto", "none"]}),
            "reasoning_effort": _nullable({"enum": list(REASONING_EFFORTS)}),
            "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
            "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
            "max_tokens": _nullable(tokens),
            "max_completion_tokens": _nullable(tokens),
            "seed": _nullable(INT64),
            "stop": _nullable({"anyOf": [{"type": "string", "minLength": 1},
                                         {"type": "array", "maxItems": 4,
                                          "items": {"type": "string", "minLength": 1}}]}),
            "stream": _nullable({"type": "boolean"}),
            "stream_options": _nullable({"type": "object",
                                         "properties": {"include_usage": _nullable({"type": "boolean"})}}),
            "n": _nullable({"const": 1}),
            "logprobs": _nullable({"const": False}),
        },
    }


COMPONENTS = {
    # One server-sent event of a stream (the schema of a text/event-stream is that of each event, as OpenAPI 3.2's
    # itemSchema and schemathesis read it).
    "StreamEvent": {"type": "object", "required": ["data"], "properties": {
        "event": {"const": "message"},
        "data": {"type": "string", "description": "a chat.completion.chunk as JSON (the first carries the role, the "
                                                  "last choice the finish_reason, then the usage if asked), an "
                                                  "Error as JSON after a failure, and '[DONE]' last"}}},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
    "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"],
              "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                             "owned_by": {"type": "string"}}},
    "ModelList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
    "Health": {"type": "object", "required": ["status", "active_generations", "running", "waiting",
                                              "tokens_per_second", "max_running", "generated_tokens",
                                              "prefill_seconds", "prefills", "prefill_tokens", "decode_seconds",
                                              "decode_steps"],
               "properties": {"status": {"const": "ok"}, "active_generations": {"type": "integer", "minimum": 0},
                              "running": {"type": "integer", "minimum": 0},
                              "waiting": {"type": "integer", "minimum": 0},
                              "tokens_per_second": {"type": "number", "minimum": 0},
                              "max_running": {"type": "integer", "minimum": 1},
                              # cumulative since the server started: a monitor takes differences
                              "generated_tokens": {"type": "integer", "minimum": 0},
                              "prefill_seconds": {"type": "number", "minimum": 0},
                              "prefills": {"type": "integer", "minimum": 0},
                              "prefill_tokens": {"type": "integer", "minimum": 0},
                              "decode_seconds": {"type": "number", "minimum": 0},
                              "decode_steps": {"type": "integer", "minimum": 0}}},
    "ChatCompletion": {
        "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object", "required": ["index", "message", "finish_reason"],
                "properties": {"index": {"const": 0},
                               "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
                               "message": {"type": "object", "required": ["role", "content", "reasoning"],
                                           "properties": {"role": {"const": "assistant"},
                                                          "content": {"type": ["string", "null"]},
                                                          "reasoning": {"type": ["string", "null"]},
                                                          "tool_calls": {"type": "array", "items": TOOL_CALL}}}}}},
            "usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                      "properties": {k: {"type": "integer", "minimum": 0}
                                     for k in ("prompt_tokens", "completion_tokens", "total_tokens")}},
        },
    },
}


def schema(model_ids: list[str], authenticated: bool = False, max_tokens_cap: int = 4096) -> dict:
    """The OpenAPI document for a server of ``model_ids``; ``authenticated``: it requires a bearer key."""
    capped = {"X-Max-Tokens-Capped": {"description": "present when max_tokens was above the cap: the cap applied",
                                      "schema": {"type": "integer", "minimum": 1}}}
    chat_responses = {
        "200": {"description": "the reply, whole (JSON) or streamed (server-sent events ending 'data: [DONE]'; "
                               "the headers go out once the request has a slot)", "headers": capped,
                "content": {"application/json": {"schema": _ref("ChatCompletion")},
                            "text/event-stream": {"schema": _ref("StreamEvent")}}},
        "400": _error("a field out of range, a malformed message or tool, a prompt longer than the context window, "
                      "or a body that is not a JSON object"),
        "404": _error("no such model (code model_not_found)"),
        "411": _error("no Content-Length"),
        "413": _error("the body is larger than --max-body-bytes"),
        "429": _retry("every slot is busy and the waiting queue is full (code server_overloaded)"),
        **COMMON,
    }
    paths = {
        "/health": {"get": {"operationId": "health", "summary": "load and liveness",
                            "responses": {"200": _json(_ref("Health"), "the server is up"), **COMMON}}},
        "/v1/models": {"get": {"operationId": "listModels", "summary": "the base model and each adapter",
                               "responses": {"200": _json(_ref("ModelList"), "the models"), **COMMON}}},
        "/v1/models/{model}": {"get": {
            "operationId": "retrieveModel", "summary": "one model",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("Model"), "the model"), "404": _error("no such model"), **COMMON}}},
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion", "summary": "a chat completion, whole or streamed",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": chat_request(model_ids, max_tokens_cap)}}},
            "responses": chat_responses}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "this document",
                                  "responses": {"200": _json({"type": "object"}, "the OpenAPI document"),
                                                **COMMON}}},
    }
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "gpt-oss workbench server", "version": "1",
                 "description": "OpenAI-compatible chat completions over gpt-oss and its LoRA adapters. Every error "
                                "is {\"error\": {message, type, param, code}}."},
        "paths": paths,
        "components": {"schemas": COMPONENTS},
    }
    if authenticated:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
