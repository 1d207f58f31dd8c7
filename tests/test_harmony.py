"""Tests for inference.harmony (rendering, loss weights, prompts, parsing, offline vocabulary) and
inference.model.tokenizer.

Oracles: openai-harmony itself (conversations built here directly with its classes, rendered with its own
``render_conversation_for_training`` / ``render_conversation_for_completion``), plus literal golden strings written out
from the Harmony spec (https://cookbook.openai.com/articles/openai-harmony) so a change in either side is caught.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import run
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    RenderOptions,
    Role,
    SystemContent,
    ToolDescription,
)

from inference import harmony
from inference.errors import UserError
from inference.harmony import HarmonyOptions, VocabError, parse_completion, render_for_training, render_prompt

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------- goldens

SYSTEM_TEXT = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
               "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
               "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")
SYSTEM_TEXT_TOOLS = SYSTEM_TEXT.replace(
    "every message.<|end|>",
    "every message.\nCalls to these tools must go to the commentary channel: 'functions'.<|end|>")

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                  "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather.",
                                           "parameters": WEATHER_SCHEMA}}]
TOOLS_DEV_TEXT = ("<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
                  "// Get the current weather.\ntype get_weather = (_: {\n// City name\ncity: string,\n}) => any;\n\n"
                  "} // namespace functions<|end|>")
ARGS = '{"city":"Paris"}'
RESULT = '{"temp_c": 21}'


# ----------------------------------------------------------------------------------------------------- helpers

def render_one(*args, **kwargs):
    """The one training sequence of a conversation that renders to a single sequence."""
    sequences = render_for_training(*args, **kwargs)
    assert len(sequences) == 1, f"expected one training sequence, got {len(sequences)}"
    return sequences[0]


def enc():
    return harmony.encoding()


def oracle_system(effort=ReasoningEffort.MEDIUM, date="2025-06-28", identity=None):
    content = SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(date)
    if identity:
        content = content.with_model_identity(identity)
    return Message.from_role_and_content(Role.SYSTEM, content)


def o_user(text):
    return Message.from_role_and_content(Role.USER, text)


def o_assistant(text, channel):
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def o_call(name, args):
    return (Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
            .with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))


def o_tool_result(name, text):
    return (Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
            .with_channel("commentary").with_recipient("assistant"))


def o_tools_developer(instructions=None):
    dev = DeveloperContent.new()
    if instructions:
        dev = dev.with_instructions(instructions)
    dev = dev.with_function_tools([ToolDescription.new("get_weather", "Get the current weather.",
                                                       parameters=WEATHER_SCHEMA)])
    return Message.from_role_and_content(Role.DEVELOPER, dev)


def oracle_training(messages, auto_drop_analysis=False):
    """openai-harmony's own training rendering. ``auto_drop_analysis=False``: the conversation given is rendered as is
    (the tests build it without the analysis the Harmony spec says to drop)."""
    return enc().render_conversation_for_training(Conversation.from_messages(messages),
                                                  RenderConversationConfig(auto_drop_analysis=auto_drop_analysis))


def decode(ids):
    return enc().decode(list(ids))


def trained_runs(rendered):
    """Decoded text of each maximal run of trained tokens (weight > 0), as trained: the targets."""
    runs, cur = [], []
    for tok, w in zip(rendered.targets, rendered.weights):
        if w > 0:
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [decode(r) for r in runs]


def run_weights(rendered):
    """The distinct weights of each maximal run of tokens with weight > 0."""
    runs, cur = [], []
    for w in rendered.weights:
        if w > 0:
            cur.append(w)
        elif cur:
            runs.append(sorted(set(cur)))
            cur = []
    if cur:
        runs.append(sorted(set(cur)))
    return runs


def check_invariants(rendered):
    assert len(rendered.ids) == len(rendered.weights) == len(rendered.targets)
    # a target differs from its input only where history stores an answer with <|end|> and <|return|> is trained
    for tok, target, w in zip(rendered.ids, rendered.targets, rendered.weights):
        if tok != target:
            assert (decode([tok]), decode([target])) == ("<|end|>", "<|return|>") and w > 0
    # spans tile the rendering exactly, and only assistant tokens carry weight
    pos = 0
    for span in rendered.spans:
        assert span.start == pos and span.end > span.start
        if span.role != "assistant":
            assert all(w == 0 for w in rendered.weights[span.start:span.end]), span
        pos = span.end
    assert pos == len(rendered.ids)


# ----------------------------------------------------------------------------------------------------- golden cases

def test_plain_chat():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    r = render_one(msgs, None, HarmonyOptions(), None)   # default weights: final only
    check_invariants(r)
    oracle = [oracle_system(), o_user("Hi"), o_assistant("Hello there", "final")]
    assert r.ids == oracle_training(oracle)
    # harmony's default config gives the same here (nothing to drop)
    assert r.ids == enc().render_conversation_for_training(Conversation.from_messages(oracle))
    assert decode(r.ids) == (SYSTEM_TEXT + "<|start|>user<|message|>Hi<|end|>"
                             "<|start|>assistant<|channel|>final<|message|>Hello there<|return|>")
    assert trained_runs(r) == ["<|channel|>final<|message|>Hello there<|return|>"]
    assert run_weights(r) == [[1.0]]
    assert r.ids[-1] == enc().encode("<|return|>", allowed_special="all")[0]
    assert [(s.role, s.channel) for s in r.spans] == [("system", None), ("user", None), ("assistant", "final")]


def test_system_and_developer_become_developer_instructions():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    all_weights = {"final": 1.0, "analysis": 1.0, "commentary": 1.0, "tool_call": 1.0}
    r = render_one(msgs, None, HarmonyOptions(), all_weights)
    check_invariants(r)
    dev = Message.from_role_and_content(
        Role.DEVELOPER, DeveloperContent.new().with_instructions("Be brief.\n\nAnswer in English."))
    assert r.ids == oracle_training([oracle_system(), dev, o_user("Hi"), o_assistant("Hello", "final")])
    assert decode(r.ids) == (SYSTEM_TEXT + "<|start|>developer<|message|># Instructions\n\n"
                             "Be brief.\n\nAnswer in English.<|end|><|start|>user<|message|>Hi<|end|>"
                             "<|start|>assistant<|channel|>final<|message|>Hello<|return|>")
    assert trained_runs(r) == ["<|channel|>final<|message|>Hello<|return|>"]
    assert [s.role for s in r.spans] == ["system", "developer", "user", "assistant"]


def test_thinking_single_turn_is_kept_and_analysis_weight_changes_trained_spans():
    msgs = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "thinking": "Add 2 and 2.", "content": "4"}]
    with_analysis = render_one(msgs, None, HarmonyOptions(), {"final": 1.0, "analysis": 1.0})
    without = render_one(msgs, None, HarmonyOptions(), {"final": 1.0, "analysis": 0.0})
    check_invariants(with_analysis)
    check_invariants(without)
    # The turn being trained keeps its chain of thought (openai-harmony's own auto_drop_analysis would remove it here,
    # since it drops every analysis before the *first* final message: the spec says only earlier turns' reasoning goes).
    oracle = oracle_training([oracle_system(), o_user("What is 2+2?"), o_assistant("Add 2 and 2.", "analysis"),
                              o_assistant("4", "final")])
    assert with_analysis.ids == oracle, "the last turn's analysis must be rendered for training"
    assert without.ids == oracle
    golden = (SYSTEM_TEXT + "<|start|>user<|message|>What is 2+2?<|end|>"
              "<|start|>assistant<|channel|>analysis<|message|>Add 2 and 2.<|end|>"
              "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert decode(with_analysis.ids) == golden
    assert trained_runs(with_analysis) == [
        "<|channel|>analysis<|message|>Add 2 and 2.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"]
    # analysis untrained: the final message's own <|start|>assistant header is still trained (the model emits it)
    assert trained_runs(without) == ["<|start|>assistant<|channel|>final<|message|>4<|return|>"]


def test_tool_call_tool_result_final():
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": ARGS}]},
            {"role": "tool", "name": "get_weather", "content": RESULT},
            {"role": "assistant", "content": "It is 21 °C in Paris."}]
    r = render_one(msgs, TOOLS, HarmonyOptions(), {"final": 1.0, "tool_call": 0.5})
    check_invariants(r)
    oracle = [oracle_system(), o_tools_developer(), o_user("Weather in Paris?"), o_call("get_weather", ARGS),
              o_tool_result("get_weather", RESULT), o_assistant("It is 21 °C in Paris.", "final")]
    assert r.ids == oracle_training(oracle)
    text = decode(r.ids)
    assert text == (SYSTEM_TEXT_TOOLS + TOOLS_DEV_TEXT + "<|start|>user<|message|>Weather in Paris?<|end|>"
                    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
                    + ARGS + "<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
                    + RESULT + "<|end|><|start|>assistant<|channel|>final<|message|>It is 21 °C in Paris.<|return|>")
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert trained_runs(r) == [
        " to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>" + ARGS + "<|call|>",
        "<|channel|>final<|message|>It is 21 °C in Paris.<|return|>"]
    assert run_weights(r) == [[0.5], [1.0]]
    assert [s.role for s in r.spans] == ["system", "developer", "user", "assistant", "tool", "assistant"]
    assert [s.kind for s in r.spans if s.role == "assistant"] == ["tool_call", "final"]

    # The tool result is never trained, whatever the weights; tools in the bare (non-OpenAI-wrapped) form are the same.
    everything = {"final": 1.0, "analysis": 1.0, "commentary": 1.0, "tool_call": 1.0}
    r_all = render_one(msgs, [TOOLS[0]["function"]], HarmonyOptions(), everything)
    assert r_all.ids == r.ids
    tool_span = next(s for s in r_all.spans if s.role == "tool")
    assert decode(r_all.ids[tool_span.start:tool_span.end]) == (
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>" + RESULT + "<|end|>")
    assert all(w == 0 for w in r_all.weights[tool_span.start:tool_span.end])


def test_tool_calling_turn_keeps_its_reasoning():
    """The Harmony spec: reasoning of a turn with tool calls stays until the turn ends in a final answer."""
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "thinking": "I need the weather tool.", "content": "Let me check.",
             "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": ARGS}]},
            {"role": "tool", "name": "get_weather", "content": RESULT},
            {"role": "assistant", "thinking": "It is 21.", "content": "21 °C."}]
    w = {"final": 1.0, "analysis": 0.25, "commentary": 0.75, "tool_call": 0.5}
    r = render_one(msgs, TOOLS, HarmonyOptions(), w)
    check_invariants(r)
    oracle = [oracle_system(), o_tools_developer(), o_user("Weather in Paris?"),
              o_assistant("I need the weather tool.", "analysis"), o_assistant("Let me check.", "commentary"),
              o_call("get_weather", ARGS), o_tool_result("get_weather", RESULT), o_assistant("It is 21.", "analysis"),
              o_assistant("21 °C.", "final")]
    assert r.ids == oracle_training(oracle), "a tool-calling last turn must keep its analysis messages"
    assert trained_runs(r) == [
        "<|channel|>analysis<|message|>I need the weather tool.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>" + ARGS
        + "<|call|>",
        "<|channel|>analysis<|message|>It is 21.<|end|><|start|>assistant<|channel|>final<|message|>21 °C.<|return|>"]
    # per-message weights: each span carries its kind's weight
    by_kind = {}
    for s in r.spans:
        if s.role == "assistant":
            by_kind.setdefault(s.kind, set()).update(x for x in r.weights[s.start:s.end] if x > 0)
    assert by_kind == {"analysis": {0.25}, "commentary": {0.75}, "tool_call": {0.5}, "final": {1.0}}


RETURN, END = "<|return|>", "<|end|>"


def test_multi_turn_with_reasoning_trains_each_turn_as_generated():
    """Every assistant turn is trained as the model generated it: turn 1 in the context it saw (with its reasoning,
    ending in <|return|>), turn 2 after turn 1's history form (reasoning dropped), which is never trained."""
    msgs = [{"role": "user", "content": "A?"},
            {"role": "assistant", "thinking": "First thought.", "content": "First answer."},
            {"role": "user", "content": "B?"},
            {"role": "assistant", "thinking": "Second thought.", "content": "Second answer."}]
    w = {"final": 1.0, "analysis": 1.0}
    first, second = render_for_training(msgs, None, HarmonyOptions(), w)
    for r in (first, second):
        check_invariants(r)
    assert first.ids == oracle_training([oracle_system(), o_user("A?"), o_assistant("First thought.", "analysis"),
                                         o_assistant("First answer.", "final")])
    assert trained_runs(first) == [
        "<|channel|>analysis<|message|>First thought.<|end|><|start|>assistant<|channel|>final<|message|>"
        "First answer.<|return|>"]
    kept = [oracle_system(), o_user("A?"), o_assistant("First answer.", "final"), o_user("B?"),
            o_assistant("Second thought.", "analysis"), o_assistant("Second answer.", "final")]
    assert second.ids == oracle_training(kept)
    # for two turns, openai-harmony's own auto_drop_analysis agrees on the full conversation
    full = [oracle_system(), o_user("A?"), o_assistant("First thought.", "analysis"),
            o_assistant("First answer.", "final"), o_user("B?"), o_assistant("Second thought.", "analysis"),
            o_assistant("Second answer.", "final")]
    assert second.ids == oracle_training(full, auto_drop_analysis=True)
    text = decode(second.ids)
    assert "First thought." not in text and "Second thought." in text
    assert text == (SYSTEM_TEXT + "<|start|>user<|message|>A?<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>First answer.<|end|>"
                    "<|start|>user<|message|>B?<|end|>"
                    "<|start|>assistant<|channel|>analysis<|message|>Second thought.<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>Second answer.<|return|>")
    # the history form of turn 1 (no reasoning, <|end|>) is context only
    assert trained_runs(second) == [
        "<|channel|>analysis<|message|>Second thought.<|end|><|start|>assistant<|channel|>final<|message|>"
        "Second answer.<|return|>"]
    assert [(s.role, s.channel) for s in second.spans if s.role == "assistant"] == [
        ("assistant", "final"), ("assistant", "analysis"), ("assistant", "final")]
    # trained_turns=last: openai-harmony's render_conversation_for_training, only the last turn trained
    (last,) = render_for_training(msgs, None, HarmonyOptions(), w, turns="last")
    assert (last.ids, last.weights, last.targets) == (second.ids, second.weights, second.targets)


def test_multi_turn_chat_trains_earlier_answers_with_return_in_one_sequence():
    """ShareGPT-style chat (no reasoning): history equals what was generated, so every turn trains in one sequence;
    an earlier answer is read as <|end|> (history) and trained as <|return|> (what the model emits)."""
    msgs = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "and +1?"}, {"role": "assistant", "content": "6"}]
    (r,) = render_for_training(msgs, None, HarmonyOptions(), None)
    check_invariants(r)
    assert r.ids == oracle_training([oracle_system(), o_user("2+3?"), o_assistant("5", "final"), o_user("and +1?"),
                                     o_assistant("6", "final")])
    assert trained_runs(r) == ["<|channel|>final<|message|>5<|return|>", "<|channel|>final<|message|>6<|return|>"]
    (f1, f2) = [s for s in r.spans if s.channel == "final"]
    assert decode(r.ids[f1.end - 1:f1.end]) == END and decode(r.targets[f1.end - 1:f1.end]) == RETURN
    assert decode(r.ids[f2.end - 1:f2.end]) == RETURN == decode(r.targets[f2.end - 1:f2.end])
    assert [i for i, (a, b) in enumerate(zip(r.ids, r.targets)) if a != b] == [f1.end - 1]
    # no answer is ever trained to end in <|end|>
    assert all(decode([r.targets[s.end - 1]]) == RETURN and r.weights[s.end - 1] > 0 for s in (f1, f2))
    (last,) = render_for_training(msgs, None, HarmonyOptions(), None, turns="last")
    assert last.ids == r.ids
    assert trained_runs(last) == ["<|channel|>final<|message|>6<|return|>"]


def test_three_turns_drop_every_earlier_turns_analysis():
    """openai-harmony 0.0.8's auto_drop_analysis only drops analysis before the *first* final (it would keep T2);
    the spec drops the reasoning of every turn that already ended in a final answer."""
    msgs = []
    for i in (1, 2, 3):
        msgs += [{"role": "user", "content": f"Q{i}?"},
                 {"role": "assistant", "thinking": f"T{i}.", "content": f"F{i}."}]
    sequences = render_for_training(msgs, None, HarmonyOptions(), {"final": 1.0, "analysis": 1.0})
    assert len(sequences) == 3
    for i, r in enumerate(sequences, 1):
        check_invariants(r)
        oracle = [oracle_system()]
        for j in range(1, i):
            oracle += [o_user(f"Q{j}?"), o_assistant(f"F{j}.", "final")]
        oracle += [o_user(f"Q{i}?"), o_assistant(f"T{i}.", "analysis"), o_assistant(f"F{i}.", "final")]
        assert r.ids == oracle_training(oracle)
        assert trained_runs(r) == [f"<|channel|>analysis<|message|>T{i}.<|end|><|start|>assistant<|channel|>final"
                                   f"<|message|>F{i}.<|return|>"]
    text = decode(sequences[-1].ids)
    assert "T1." not in text and "T2." not in text and "T3." in text


def test_analysis_between_finals_groups_turns_by_history_form():
    """Turn 1 (no reasoning) and turn 2 (reasoning) train together: turn 1's history is what was generated. Turn 3
    comes after turn 2's history form (reasoning dropped), in a sequence of its own."""
    msgs = [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "F1."},
            {"role": "user", "content": "Q2?"}, {"role": "assistant", "thinking": "T2.", "content": "F2."},
            {"role": "user", "content": "Q3?"}, {"role": "assistant", "content": "F3."}]
    w = {"final": 1.0, "analysis": 1.0}
    a, b = render_for_training(msgs, None, HarmonyOptions(), w)
    for r in (a, b):
        check_invariants(r)
    assert a.ids == oracle_training([oracle_system(), o_user("Q1?"), o_assistant("F1.", "final"), o_user("Q2?"),
                                     o_assistant("T2.", "analysis"), o_assistant("F2.", "final")])
    assert trained_runs(a) == [
        "<|channel|>final<|message|>F1.<|return|>",
        "<|channel|>analysis<|message|>T2.<|end|><|start|>assistant<|channel|>final<|message|>F2.<|return|>"]
    assert b.ids == oracle_training([oracle_system(), o_user("Q1?"), o_assistant("F1.", "final"), o_user("Q2?"),
                                     o_assistant("F2.", "final"), o_user("Q3?"), o_assistant("F3.", "final")])
    assert trained_runs(b) == ["<|channel|>final<|message|>F3.<|return|>"]
    (last,) = render_for_training(msgs, None, HarmonyOptions(), w, turns="last")
    assert last.ids == b.ids and trained_runs(last) == trained_runs(b)


def test_multi_turn_tool_calling_terminators():
    """A tool-calling turn: reasoning and the preamble end in <|end|> (the turn goes on), the call in <|call|>, the
    answer in <|return|>; the next turn sees that turn's history form (reasoning dropped, calls and results kept)."""
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "thinking": "I need the weather tool.", "content": "Let me check.",
             "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": ARGS}]},
            {"role": "tool", "name": "get_weather", "content": RESULT},
            {"role": "assistant", "thinking": "It is 21.", "content": "21 °C."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."}]
    everything = {"final": 1.0, "analysis": 1.0, "commentary": 1.0, "tool_call": 1.0}
    a, b = render_for_training(msgs, TOOLS, HarmonyOptions(), everything)
    for r in (a, b):
        check_invariants(r)
    turn1 = [o_user("Weather in Paris?"), o_assistant("I need the weather tool.", "analysis"),
             o_assistant("Let me check.", "commentary"), o_call("get_weather", ARGS),
             o_tool_result("get_weather", RESULT), o_assistant("It is 21.", "analysis"), o_assistant("21 °C.", "final")]
    assert a.ids == oracle_training([oracle_system(), o_tools_developer(), *turn1])
    assert trained_runs(a) == [
        "<|channel|>analysis<|message|>I need the weather tool.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>" + ARGS
        + "<|call|>",
        "<|channel|>analysis<|message|>It is 21.<|end|><|start|>assistant<|channel|>final<|message|>21 °C.<|return|>"]
    history = [o_user("Weather in Paris?"), o_assistant("Let me check.", "commentary"), o_call("get_weather", ARGS),
               o_tool_result("get_weather", RESULT), o_assistant("21 °C.", "final")]
    assert b.ids == oracle_training([oracle_system(), o_tools_developer(), *history, o_user("Thanks!"),
                                     o_assistant("You are welcome.", "final")])
    assert trained_runs(b) == ["<|channel|>final<|message|>You are welcome.<|return|>"]
    # what each sequence trains after its prompt parses back into its turn, and generation would stop there
    for r, messages in ((a, msgs[:1]), (b, msgs[:5])):
        prompt = render_prompt(messages, TOOLS)
        assert r.ids[:len(prompt)] == prompt
        trained = [t for t, w in zip(r.targets, r.weights) if w > 0]
        assert trained[-1] in harmony.stop_token_ids()


def test_trained_turns_is_checked():
    with pytest.raises(UserError) as info:
        render_for_training([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                            turns="first")
    assert "first" in str(info.value) and "\n" not in str(info.value)


def test_per_channel_weights_are_exact():
    msgs = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "thinking": "Add 2 and 2, carefully.", "content": "The answer is 4."}]
    r = render_one(msgs, None, HarmonyOptions(), {"final": 1.0, "analysis": 0.5})
    check_invariants(r)
    analysis_msg = o_assistant("Add 2 and 2, carefully.", "analysis")
    final_msg = o_assistant("The answer is 4.", "final")
    (a_span,) = [s for s in r.spans if s.channel == "analysis"]
    (f_span,) = [s for s in r.spans if s.channel == "final"]
    a_piece = enc().render(analysis_msg)
    f_piece = enc().render(final_msg)
    assert r.ids[a_span.start:a_span.end] == a_piece
    assert r.ids[f_span.start:f_span.end - 1] == f_piece[:-1]     # last token is <|return|> instead of <|end|>
    header = len(enc().encode("<|start|>assistant", allowed_special="all"))
    assert r.weights[a_span.start:a_span.start + header] == [0.0] * header     # the prompt supplies it
    assert r.weights[a_span.start + header:a_span.end] == [0.5] * (len(a_piece) - header)
    assert r.weights[f_span.start:f_span.end] == [1.0] * len(f_piece)
    assert r.trained_tokens_by_kind() == {"final": len(f_piece), "analysis": len(a_piece) - header,
                                          "commentary": 0, "tool_call": 0}
    # keys that are not given weigh 0; the default is final only
    r_default = render_one(msgs, None, HarmonyOptions(), None)
    assert r_default.ids == r.ids
    assert r_default.trained_tokens_by_kind() == {"final": len(f_piece), "analysis": 0, "commentary": 0,
                                                  "tool_call": 0}


def test_message_weight_multiplies_and_zero_untrains():
    msgs = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "First answer.", "weight": 0},
            {"role": "user", "content": "B?"}, {"role": "assistant", "content": "Second answer.", "weight": 2.0}]
    r = render_one(msgs, None, HarmonyOptions(), {"final": 0.5})
    check_invariants(r)
    assert "First answer." in decode(r.ids)
    assert trained_runs(r) == ["<|channel|>final<|message|>Second answer.<|return|>"]
    assert run_weights(r) == [[1.0]]       # 0.5 (final) * 2.0 (message)


def test_trained_tokens_by_kind_counts():
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "thinking": "Use the tool.",
             "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": ARGS}]},
            {"role": "tool", "name": "get_weather", "content": RESULT},
            {"role": "assistant", "thinking": "Warm.", "content": "21 °C."}]
    opts = RenderOptions(conversation_has_function_tools=True)
    n = {name: len(enc().render(m, opts)) for name, m in [
        ("a1", o_assistant("Use the tool.", "analysis")), ("call", o_call("get_weather", ARGS)),
        ("a2", o_assistant("Warm.", "analysis")), ("final", o_assistant("21 °C.", "final"))]}
    header = len(enc().encode("<|start|>assistant", allowed_special="all"))
    everything = {"final": 1.0, "analysis": 1.0, "commentary": 1.0, "tool_call": 1.0}
    r = render_one(msgs, TOOLS, HarmonyOptions(), everything)
    # the first assistant message after a user or tool message does not train its <|start|>assistant
    assert r.trained_tokens_by_kind() == {"final": n["final"], "analysis": n["a1"] - header + n["a2"] - header,
                                          "commentary": 0, "tool_call": n["call"]}
    assert sum(r.trained_tokens_by_kind().values()) == sum(1 for w in r.weights if w > 0)
    r2 = render_one(msgs, TOOLS, HarmonyOptions(), {"final": 1.0, "tool_call": 1.0})
    assert r2.ids == r.ids
    assert r2.trained_tokens_by_kind() == {"final": n["final"], "analysis": 0, "commentary": 0,
                                           "tool_call": n["call"]}


def test_options_appear_in_system_message():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    opts = HarmonyOptions(reasoning_effort="high", conversation_start_date="2024-01-02", model_identity="You are Tiny.")
    r = render_one(msgs, None, opts, None)
    oracle = [oracle_system(ReasoningEffort.HIGH, "2024-01-02", "You are Tiny."), o_user("Hi"),
              o_assistant("Hello", "final")]
    assert r.ids == oracle_training(oracle)
    assert decode(r.ids).startswith(
        "<|start|>system<|message|>You are Tiny.\nKnowledge cutoff: 2024-06\nCurrent date: 2024-01-02\n\n"
        "Reasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be included for every "
        "message.<|end|>")
    low = decode(render_one(msgs, None, HarmonyOptions(reasoning_effort="low"), None).ids)
    assert "Reasoning: low\n" in low
    with pytest.raises(UserError) as info:
        render_one(msgs, None, HarmonyOptions(reasoning_effort="max"), None)
    assert "max" in str(info.value) and "\n" not in str(info.value)


def test_rendering_does_not_depend_on_today():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    a = render_one(msgs, None, HarmonyOptions(), None)
    b = render_one(msgs, None, HarmonyOptions(), None)
    assert a.ids == b.ids and a.weights == b.weights
    text = decode(a.ids)
    assert "Current date: 2025-06-28\n" in text
    today = datetime.date.today().isoformat()
    if today != "2025-06-28":
        assert today not in text
    assert HarmonyOptions().conversation_start_date == "2025-06-28"
    prompt_text = decode(render_prompt(msgs[:1]))
    assert "Current date: 2025-06-28\n" in prompt_text


def test_unknown_role_is_a_user_error():
    with pytest.raises(UserError) as info:
        render_one([{"role": "robot", "content": "beep"}])
    assert "robot" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------- prompts & parsing

def test_render_prompt_ends_with_assistant_header_and_matches_training_prefix():
    header = enc().encode("<|start|>assistant", allowed_special="all")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    prompt = render_prompt(msgs[:1])
    assert prompt[-len(header):] == header
    assert prompt == enc().render_conversation_for_completion(
        Conversation.from_messages([oracle_system(), o_user("Hi")]), Role.ASSISTANT)
    assert decode(prompt) == SYSTEM_TEXT + "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    # the prompt is exactly the untrained prefix of the training rendering
    r = render_one(msgs, None, HarmonyOptions(), None)
    assert r.ids[:len(prompt)] == prompt
    assert all(w == 0 for w in r.weights[:len(prompt)]) and r.weights[len(prompt)] > 0


def test_render_prompt_multi_turn_and_tools():
    msgs = [{"role": "user", "content": "A?"},
            {"role": "assistant", "thinking": "First thought.", "content": "First answer."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "thinking": "Second thought.", "content": "Sunny."}]
    prompt = render_prompt(msgs[:3], TOOLS)
    oracle = [oracle_system(), o_tools_developer(), o_user("A?"), o_assistant("First answer.", "final"),
              o_user("Weather in Paris?")]
    assert prompt == enc().render_conversation_for_completion(
        Conversation.from_messages(oracle), Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False))
    assert "First thought." not in decode(prompt)
    r = render_for_training(msgs, TOOLS, HarmonyOptions(), {"final": 1.0, "analysis": 1.0})[-1]
    assert r.ids[:len(prompt)] == prompt
    assert r.weights[len(prompt) - 1] == 0 and r.weights[len(prompt)] > 0
    # what the model is trained to produce after the prompt parses back into the last turn
    reply = parse_completion(r.ids[len(prompt):])
    assert (reply.analysis, reply.final, reply.tool_calls) == ("Second thought.", "Sunny.", [])


def test_parse_completion_text():
    text = "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>y<|return|>"
    reply = parse_completion(enc().encode(text, allowed_special="all"))
    assert reply.analysis == "x"
    assert reply.final == "y"
    assert reply.tool_calls == [] and reply.commentary == ""


def test_parse_completion_tool_call_and_preamble():
    text = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
            "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
            + ARGS + "<|call|>")
    reply = parse_completion(enc().encode(text, allowed_special="all"))
    assert reply.analysis == "Need the weather."
    assert reply.final is None
    assert reply.commentary == "Checking."
    assert reply.tool_calls == [{"name": "get_weather", "arguments": ARGS}]
    # recipient in the channel part of the header (the other form the spec allows)
    text2 = ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>" + ARGS + "<|call|>")
    assert parse_completion(enc().encode(text2, allowed_special="all")).tool_calls == [
        {"name": "get_weather", "arguments": ARGS}]


def test_parse_namespaced_and_builtin_calls():
    """A call to a namespaced tool comes back under the dotted name it was declared with; a built-in tool call
    (python, browser) is not a function call for the client, and its text is not shown as commentary either."""
    text = " to=crm.lookup<|channel|>commentary <|constrain|>json<|message|>{\"id\": \"7\"}<|call|>"  # after the prompt
    reply = parse_completion(enc().encode(text, allowed_special="all"))
    assert reply.tool_calls == [{"name": "crm.lookup", "arguments": '{"id": "7"}'}] and reply.complete
    stream = harmony.ReplyStream()
    pieces = [p for t in enc().encode(text, allowed_special="all") for p in stream.feed(t)]
    assert stream.calls == ["crm.lookup"] and "".join(t for k, t, _ in pieces if k == "tool_call") == '{"id": "7"}'
    py = "<|channel|>analysis to=python code<|message|>print(1)<|call|>"
    reply = parse_completion(enc().encode(py, allowed_special="all"))
    assert reply.tool_calls == [] and reply.commentary == "" and reply.complete
    assert harmony.function_name("functions.get_weather") == "get_weather"
    assert harmony.function_name("browser.search") is None and harmony.function_name("assistant") is None


@pytest.mark.parametrize("text", [
    "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>partial ans",
    "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fin",
    "<|channel|>analysis<|message|>x<|end|><|message|><|message|><|channel|><|end|>",
    "<|channel|>analysis<|message|>x<|end|><|return|><|return|><|start|><|start|>",
])
def test_parse_completion_truncated_or_malformed_does_not_raise(text):
    reply = parse_completion(enc().encode(text, allowed_special="all"))
    assert reply.analysis == "x"        # the complete message before the cut is kept
    assert reply.tool_calls == []


def test_parse_completion_empty():
    reply = parse_completion([])
    assert (reply.analysis, reply.final, reply.tool_calls, reply.commentary) == ("", None, [], "")


def test_stop_tokens():
    ids = set(harmony.stop_token_ids())
    assert ids == set(enc().encode("<|return|><|call|>", allowed_special="all"))


# ----------------------------------------------------------------------------------------------------- offline vocab

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"   # tiktoken's published hash


def test_ensure_vocab_points_at_checked_file():
    assert harmony.VOCAB_SHA256 == O200K_SHA256
    directory = harmony.ensure_vocab()
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(directory)
    path = Path(directory) / "o200k_base.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == O200K_SHA256


def test_corrupt_preset_vocab_is_a_one_line_error(tmp_path, monkeypatch):
    bad = tmp_path / "vocab"
    bad.mkdir()
    (bad / "o200k_base.tiktoken").write_bytes(b"not a vocabulary\n")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(bad))
    with pytest.raises(VocabError) as info:
        harmony.ensure_vocab()
    msg = str(info.value)
    assert "sha256" in msg and str(bad) in msg
    assert "\n" not in msg
    assert isinstance(info.value, UserError)


def test_preset_dir_without_vocab_falls_back_to_cache(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(empty))
    directory = harmony.ensure_vocab()
    assert Path(directory) != empty
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(directory)
    assert hashlib.sha256((Path(directory) / "o200k_base.tiktoken").read_bytes()).hexdigest() == O200K_SHA256


def test_corrupt_cached_vocab_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_OSS_WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    cached = tmp_path / "cache" / "vocab" / "o200k_base.tiktoken"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    directory = harmony.ensure_vocab()
    assert Path(directory) == cached.parent
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == O200K_SHA256


def test_encoding_with_corrupt_vocab_fails_cleanly_in_fresh_process(tmp_path):
    bad = tmp_path / "vocab"
    bad.mkdir()
    (bad / "o200k_base.tiktoken").write_bytes(b"garbage")
    code = ("import sys\nfrom inference import harmony\ntry:\n    harmony.encoding()\n"
            "except harmony.VocabError as e:\n    print('VOCABERROR', e)\n    sys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), TIKTOKEN_ENCODINGS_BASE=str(bad))
    proc = run([sys.executable, "-c", code], cwd=str(REPO), env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("VOCABERROR") and "sha256" in lines[0]


# ----------------------------------------------------------------------------------------------------- tokenizer

# Published o200k_harmony ids of the Harmony special tokens (gpt-oss model card / tokenizer).
KNOWN_SPECIALS = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
                  "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
                  "<|call|>": 200012}


@pytest.fixture(scope="module")
def tokenizers_tok(tiny_model_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tok(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def corpus(tiny_model_dir) -> list[str]:
    texts = [
        "Hello, world! This is a simple English sentence.",
        "I'm sure they'll say we've done what you'd've expected; DON'T SHOUT, it's FINE. He'S",
        "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tindented\twith\ttabs",
        "x = [1, 2, 3]; y = {'a': 1.5e-10, \"b\": None}  # comment\n",
        "Numbers: 0 7 42 123 1234 12345 1234567890 3.14159 -2.5e+10 1,000,000 0x1F 1_000",
        "multiple     spaces      here   and trailing   \n\n\n   leading",
        "line one\r\nline two\r\n\r\nline four\rcarriage\n",
        "日本語のテキストと中文文本，한국어 텍스트。",
        "Emoji: 😀👍🏽👨‍👩‍👧‍👦🇫🇷 ❤️ and café naïve résumé Ångström façade São Paulo Zürich",
        "Ελληνικά, русский текст, العربية, עברית, हिन्दी, ไทย",
        "URLs: https://example.com/path/to/page?query=1&other=two#frag and http://a.b/c.d, mailto:x@y.z",
        "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
        "   ", "", "\n", "a", "'s", "  'll",
        "<|start|>user<|message|>literal special tokens<|end|>",
    ]
    readme = REPO / "README.md"
    if readme.is_file():
        texts.append(readme.read_text(encoding="utf-8"))
    texts.append((tiny_model_dir / "README.md").read_text(encoding="utf-8"))
    texts.append((REPO / "inference" / "harmony.py").read_text(encoding="utf-8"))
    msgs = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "thinking": "Call the tool.",
             "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": ARGS}]},
            {"role": "tool", "name": "get_weather", "content": RESULT},
            {"role": "assistant", "thinking": "Warm.", "content": "It is 21 °C."}]
    texts.append(decode(render_one(msgs, TOOLS).ids))
    return texts


def test_tokenizer_json_encodes_like_harmony(tiny_model_dir, tokenizers_tok, hf_tok):
    bad = []
    for text in corpus(tiny_model_dir):
        want = enc().encode(text, allowed_special="all")
        got = tokenizers_tok.encode(text, add_special_tokens=False).ids
        got_hf = hf_tok.encode(text, add_special_tokens=False)
        if got != want or got_hf != want:
            bad.append(text[:80])
        # decoding is the inverse, special tokens written out
        assert tokenizers_tok.decode(want, skip_special_tokens=False) == enc().decode(want)
    assert not bad, f"tokenizer.json disagrees with openai-harmony on: {bad}"


def test_tokenizer_special_tokens_and_size(tiny_model_dir, tokenizers_tok, hf_tok):
    assert len(hf_tok) == 201088
    assert tokenizers_tok.get_vocab_size(with_added_tokens=True) == 201088
    specials = [i for i in range(199998, 201088) if enc().is_special_token(i)]
    assert len(specials) == 201088 - 199998     # every id from <|startoftext|> up is a Harmony special token
    for i in specials:
        name = enc().decode([i])
        assert tokenizers_tok.id_to_token(i) == name
        assert tokenizers_tok.token_to_id(name) == i
        assert hf_tok.convert_ids_to_tokens(i) == name
    for name, i in KNOWN_SPECIALS.items():
        assert enc().encode(name, allowed_special="all") == [i]
        assert hf_tok.convert_tokens_to_ids(name) == i
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (199998, 200002, 199999)
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|return|>"
