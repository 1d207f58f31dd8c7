"""Every Harmony feature, from a recipe and a data file, rendered token for token as openai-harmony renders the same
conversation built directly with its own API (``SystemContent``, ``DeveloperContent``, ``ToolNamespaceConfig``,
``Message``), for plain chat, reasoning efforts, dates, no date, knowledge cutoff, required channels, developer
instructions, function tools, tool namespaces and the built-in browser and python tools; and the errors a bad recipe
or record gets.

Each case writes a real recipe YAML and a real JSON-lines file, loads them through ``finetune.recipe.load_recipe``
and ``finetune.data.formats.load_examples`` and renders with ``finetune.data.prepare.render`` (what training does).
"""

from __future__ import annotations

import json

import pytest
import yaml
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
    ToolNamespaceConfig,
)

from finetune.data.formats import DataError, load_examples
from finetune.data.prepare import render
from finetune.recipe import RecipeError, load_recipe
from inference import harmony

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def rendered(tmp_path, harmony_section: dict, record: dict):
    """Our rendering of ``record`` under a recipe whose harmony section is ``harmony_section``: its one sequence."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": str(data)}, "harmony": harmony_section}), encoding="utf-8")
    recipe = load_recipe(path)
    (example,) = load_examples(data)
    (sequence,) = render(recipe, example)
    return sequence


def oracle(messages: list) -> list[int]:
    return harmony.encoding().render_conversation_for_training(
        Conversation.from_messages(messages), RenderConversationConfig(auto_drop_analysis=False))


def system(date: str | None = "2025-06-28", effort=ReasoningEffort.MEDIUM) -> SystemContent:
    content = SystemContent.new().with_reasoning_effort(effort)
    return content.with_conversation_start_date(date) if date else content


def sys_msg(content: SystemContent) -> Message:
    return Message.from_role_and_content(Role.SYSTEM, content)


def user(text: str) -> Message:
    return Message.from_role_and_content(Role.USER, text)


def assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def text(ids: list[int]) -> str:
    return harmony.encoding().decode(ids)


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def test_plain_chat_from_recipe_defaults(tmp_path):
    r = rendered(tmp_path, {}, CHAT)
    assert r.ids == oracle([sys_msg(system()), user("Hi"), assistant("Hello!", "final")])


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_reasoning_effort_from_recipe_and_from_record(tmp_path, effort):
    ours = rendered(tmp_path, {"reasoning_effort": effort}, CHAT)
    assert ours.ids == oracle([sys_msg(system(effort=ReasoningEffort(effort.capitalize()))), user("Hi"),
                               assistant("Hello!", "final")])
    # a record's own reasoning_effort wins over the recipe's
    record = {**CHAT, "reasoning_effort": effort}
    assert rendered(tmp_path, {"reasoning_effort": "high" if effort != "high" else "low"}, record).ids == ours.ids


def test_dates_and_knowledge_cutoff(tmp_path):
    r = rendered(tmp_path, {"conversation_start_date": "2024-02-29", "knowledge_cutoff": "2023-10"}, CHAT)
    assert r.ids == oracle([sys_msg(system("2024-02-29").with_knowledge_cutoff("2023-10")), user("Hi"),
                            assistant("Hello!", "final")])
    assert "Current date: 2024-02-29\n" in text(r.ids) and "Knowledge cutoff: 2023-10\n" in text(r.ids)


def test_no_date_line(tmp_path):
    """openai-harmony's golden renderings have no date line: conversation_start_date null gives exactly that."""
    r = rendered(tmp_path, {"conversation_start_date": None}, CHAT)
    assert r.ids == oracle([sys_msg(SystemContent.new()), user("Hi"), assistant("Hello!", "final")])
    assert "Current date" not in text(r.ids)
    no_cutoff = rendered(tmp_path, {"conversation_start_date": None, "knowledge_cutoff": None}, CHAT)
    content = SystemContent.new()
    content.knowledge_cutoff = None
    assert no_cutoff.ids == oracle([sys_msg(content), user("Hi"), assistant("Hello!", "final")])
    assert "Knowledge cutoff" not in text(no_cutoff.ids)


def test_required_channels(tmp_path):
    r = rendered(tmp_path, {"required_channels": ["analysis", "final"]}, CHAT)
    assert r.ids == oracle([sys_msg(system().with_required_channels(["analysis", "final"])), user("Hi"),
                            assistant("Hello!", "final")])
    assert "# Valid channels: analysis, final." in text(r.ids)
    none = rendered(tmp_path, {"required_channels": None}, CHAT)
    content = system()
    content.channel_config = None
    assert none.ids == oracle([sys_msg(content), user("Hi"), assistant("Hello!", "final")])
    assert "Valid channels" not in text(none.ids)


def test_identity_and_developer_instructions(tmp_path):
    record = {"messages": [{"role": "system", "content": "Answer in French."}, *CHAT["messages"]]}
    r = rendered(tmp_path, {"model_identity": "You are Tiny.", "developer_instructions": "Be brief."}, record)
    dev = DeveloperContent.new().with_instructions("Be brief.\n\nAnswer in French.")
    assert r.ids == oracle([sys_msg(system().with_model_identity("You are Tiny.")),
                            Message.from_role_and_content(Role.DEVELOPER, dev), user("Hi"),
                            assistant("Hello!", "final")])


def test_function_tools_and_namespaces(tmp_path):
    """Plain functions go to the functions namespace; a dotted name is a tool of its own namespace, described from
    the recipe. Calls go to the commentary channel with a JSON constraint; results come back there."""
    record = {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                                          "parameters": WEATHER}},
                        {"name": "crm.lookup", "description": "Find a customer.",
                         "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}],
              "messages": [{"role": "user", "content": "Paris weather, and customer 7?"},
                           {"role": "assistant", "tool_calls": [
                               {"id": "a", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                           {"role": "tool", "tool_call_id": "a", "content": "21 C"},
                           {"role": "assistant", "tool_calls": [{"name": "crm.lookup", "arguments": {"id": "7"}}]},
                           {"role": "tool", "name": "crm.lookup", "content": "Ada"},
                           {"role": "assistant", "content": "21 C; Ada."}]}
    r = rendered(tmp_path, {"tool_namespaces": {"crm": "Customer records."},
                            "loss_weights": {"tool_call": 1.0, "final": 1.0}}, record)
    dev = (DeveloperContent.new()
           .with_function_tools([ToolDescription.new("get_weather", "Weather.", parameters=WEATHER)])
           .with_tools(ToolNamespaceConfig(name="crm", description="Customer records.", tools=[
               ToolDescription.new("lookup", "Find a customer.",
                                   parameters={"type": "object", "properties": {"id": {"type": "string"}}})])))
    expected = [
        sys_msg(system()), Message.from_role_and_content(Role.DEVELOPER, dev), user("Paris weather, and customer 7?"),
        Message.from_role_and_content(Role.ASSISTANT, '{"city":"Paris"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), "21 C")
        .with_channel("commentary").with_recipient("assistant"),
        Message.from_role_and_content(Role.ASSISTANT, '{"id": "7"}').with_channel("commentary")
        .with_recipient("crm.lookup").with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "crm.lookup"), "Ada")
        .with_channel("commentary").with_recipient("assistant"),
        assistant("21 C; Ada.", "final")]
    assert r.ids == oracle(expected)
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text(r.ids)
    assert "// Customer records.\nnamespace crm {" in text(r.ids)
    kinds = [s.kind for s in r.spans if s.role == "assistant"]
    assert kinds == ["tool_call", "tool_call", "final"]


def test_builtin_tools_from_recipe_and_record(tmp_path):
    """browser declared by the recipe, python by the record: both in the system message as gpt-oss was trained;
    calls go to the analysis channel (content type code), results come back on it."""
    record = {"tools": [{"type": "python"}],
              "messages": [{"role": "user", "content": "What is 2**10? Then search it."},
                           {"role": "assistant", "thinking": "Compute it.",
                            "tool_calls": [{"name": "python", "arguments": "print(2**10)"}]},
                           {"role": "tool", "name": "python", "content": "1024"},
                           {"role": "assistant", "tool_calls": [{"name": "browser.search",
                                                                  "arguments": {"query": "1024"}}]},
                           {"role": "tool", "name": "browser.search", "content": "[0] 1024 - Wikipedia"},
                           {"role": "assistant", "content": "1024."}]}
    r = rendered(tmp_path, {"builtin_tools": ["browser"], "loss_weights": {"tool_call": 1.0, "final": 1.0,
                                                                           "analysis": 1.0}}, record)

    def call(recipient, args):
        return (Message.from_role_and_content(Role.ASSISTANT, args).with_channel("analysis")
                .with_recipient(recipient).with_content_type("code"))

    def result(author, out):
        return (Message.from_author_and_content(Author.new(Role.TOOL, author), out).with_channel("analysis")
                .with_recipient("assistant"))

    expected = [sys_msg(system().with_browser_tool().with_python_tool()), user("What is 2**10? Then search it."),
                assistant("Compute it.", "analysis"), call("python", "print(2**10)"), result("python", "1024"),
                call("browser.search", '{"query": "1024"}'), result("browser.search", "[0] 1024 - Wikipedia"),
                assistant("1024.", "final")]
    assert r.ids == oracle(expected)
    decoded = text(r.ids)
    assert "## browser\n" in decoded and "## python\n" in decoded
    assert "<|start|>assistant to=python<|channel|>analysis code<|message|>print(2**10)<|call|>" in decoded
    # built-in calls are tool calls for the loss weights; tool results are never trained
    assert [s.kind for s in r.spans if s.role == "assistant"] == ["analysis", "tool_call", "tool_call", "final"]
    assert all(w == 0 for s in r.spans if s.role == "tool" for w in r.weights[s.start:s.end])


def test_builtin_python_call_from_sharegpt(tmp_path):
    record = {"tools": '[{"type": "python"}]',
              "conversations": [{"from": "human", "value": "2**10?"},
                                {"from": "function_call", "value": '{"name": "python", "arguments": "print(2**10)"}'},
                                {"from": "observation", "value": "1024"},
                                {"from": "gpt", "value": "1024."}]}
    r = rendered(tmp_path, {}, record)
    expected = [sys_msg(system().with_python_tool()), user("2**10?"),
                Message.from_role_and_content(Role.ASSISTANT, "print(2**10)").with_channel("analysis")
                .with_recipient("python").with_content_type("code"),
                Message.from_author_and_content(Author.new(Role.TOOL, "python"), "1024").with_channel("analysis")
                .with_recipient("assistant"),
                assistant("1024.", "final")]
    assert r.ids == oracle(expected)


# ------------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("section, message", [
    ({"builtin_tools": ["shell"]}, "harmony.builtin_tools.0 (line 5): must be one of: browser, python (got 'shell')"),
    ({"builtin_tools": ["python", "python"]}, "harmony.builtin_tools (line 4): lists an entry twice"),
    ({"required_channels": []}, "harmony.required_channels (line 4): must list at least one channel"),
    ({"required_channels": ["thinking"]}, "harmony.required_channels.0 (line 5): must be one of: analysis, "
                                          "commentary, final (got 'thinking')"),
    ({"tool_namespaces": {"my ns": "x"}}, "harmony.tool_namespaces (line 4): 'my ns' is not a namespace name"),
    ({"tool_namespaces": {"python": "x"}}, "harmony.tool_namespaces (line 4): 'python' is not a namespace name"),
    ({"conversation_start_date": "June 28"}, "harmony.conversation_start_date (line 4): must be a date like "
                                             "2025-06-28 or null (got 'June 28')"),
    ({"trained_turns": "first"}, "harmony.trained_turns (line 4): must be one of: all, last (got 'first')"),
])
def test_recipe_errors_name_the_key_and_line(tmp_path, section, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": "x.jsonl"}, "harmony": section}), encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"name": "python", "arguments": "print(1)"}]}]},
     "calls the built-in tool 'python', which is not declared (add {\"type\": \"python\"} to the record's tools or "
     "to harmony.builtin_tools)"),
    ({"tools": [{"type": "python", "timeout": 5}], **CHAT}, "tool 1: the built-in python tool takes no settings"),
    ({"tools": [{"type": "shell"}], **CHAT}, "tool 1: unsupported tool type 'shell'"),
    ({"tools": [{"name": "a.b.c"}], **CHAT}, "tool 1: tool name 'a.b.c' must be a name or namespace.name"),
    ({"tools": [{"name": "browser.search"}], **CHAT}, "tool 1: namespace 'browser' is gpt-oss's built-in tool"),
])
def test_record_errors_name_the_file_and_line(tmp_path, record, message):
    data = tmp_path / "data.jsonl"
    data.write_text("\n" + json.dumps(record) + "\n", encoding="utf-8")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": str(data)}}), encoding="utf-8")
    with pytest.raises(DataError) as info:
        for example in load_examples(data):
            render(load_recipe(path), example)
    assert f"{data}:2: " in str(info.value) and message in str(info.value) and "\n" not in str(info.value)
