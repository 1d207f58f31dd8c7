"""The Engine (:mod:`inference.engine`) and its continuous batching on the tiny gpt-oss, fp32 CPU.

Greedy generation is checked token for token against transformers' ``generate`` (PEFT for the adapter) on Harmony
prompts from ``data/tiny/eval.jsonl``, one of them long enough that prompt and reply cross the sliding window.

A random tiny gpt-oss never writes Harmony, so its replies have no channels and no text. To test what the Engine makes
of Harmony (deltas, reasoning, content, tool calls, stop strings, closing a stream) the tiny model is *scripted* in
memory: attention and expert outputs are zeroed, so the final hidden state is the current token's embedding alone,
and embeddings and ``lm_head`` rows are set so that greedy decoding after ``assistant`` writes a chosen text exactly.
The parser itself (:class:`inference.harmony.ReplyStream`) is also tested on hand-written token sequences.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_adapter

from inference import harmony
from inference.conversations import MessageError, load_jsonl_examples
from inference.engine import BadParameter, Completion, Delta, Engine, PromptTooLong, SamplingParams, UnknownModel
from inference.engine.batch import PAD_ID
from inference.evaluate import make_cases
from inference.model.checkpoint import load_model

BASE, TUNED = "tiny", "tuned"
SHORT_NEW, LONG_NEW = 24, 80      # greedy tokens generated for the eval prompts and for the long prompt
FINAL = "<|channel|>final<|message|> red green blue cyan<|return|>"
ANALYSIS = "<|channel|>analysis<|message|> thinking about colours"
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
HI = [{"role": "user", "content": "hi"}]


def encode(text: str) -> list[int]:
    return harmony.encoding().encode(text, allowed_special="all")


@functools.cache
def prompts() -> list[list[int]]:
    """Three Harmony prompts from the eval data, then a long one (~170 tokens)."""
    options = harmony.HarmonyOptions(reasoning_effort="low")
    examples = load_jsonl_examples("data/tiny/eval.jsonl", limit=12)
    cases = [make_cases(ex.messages, ex.tools, options)[0] for ex in examples[:3]]   # single-turn: one each
    question = " ".join(ex.messages[0]["content"] for ex in examples)
    (long,) = make_cases([{"role": "user", "content": question}, {"role": "assistant", "content": "ok"}], None,
                         options)
    return [c.prompt_ids for c in cases] + [long.prompt_ids]


def max_new(i: int) -> int:
    return LONG_NEW if i == 3 else SHORT_NEW


def until_stop(tokens: list[int]) -> list[int]:
    """Tokens up to and including the first Harmony stop token."""
    stops = set(harmony.stop_token_ids())
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i + 1]
    return tokens


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / TUNED, seed=1)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dir):
    return Engine.load(tiny_model_dir, adapters={TUNED: adapter_dir}, dtype=torch.float32, device="cpu", name=BASE)


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapter_dir) -> dict[str, list[list[int]]]:
    """transformers' greedy ``generate`` for each prompt, base and adapter (PEFT), cut after the first stop token."""
    from peft import PeftModel
    oracles = {BASE: load_model(tiny_model_dir),
               TUNED: PeftModel.from_pretrained(load_model(tiny_model_dir), str(adapter_dir))}
    out = {}
    for name, model in oracles.items():
        out[name] = []
        for i, p in enumerate(prompts()):
            ids = torch.tensor([p])
            with torch.no_grad():
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new(i), eos_token_id=harmony.stop_token_ids(),
                                     pad_token_id=PAD_ID)
            out[name].append(until_stop(gen[0, len(p):].tolist()))
    assert out[BASE] != out[TUNED]     # the adapter changes what is generated
    return out


def scripted_engine(model_dir, text: str) -> Engine:
    """An Engine whose greedy reply to any prompt ending in ``assistant`` is exactly ``text`` (then whatever)."""
    from inference.model import runtime
    rt = runtime.load(model_dir, torch.float32, "cpu")
    script = encode("assistant") + encode(text)
    H = rt.cfg.hidden_size
    assert len(set(script)) == len(script) <= H      # a bigram machine: each token has one successor
    with torch.no_grad():
        for layer in rt.layers:                      # every layer adds exactly zero to the residual stream
            layer.attn.o_proj.weight.zero_()
            layer.attn.o_proj.bias.zero_()
            layer.experts.down_blocks.zero_()        # MXFP4 code 0 is +0.0
            layer.experts.down_bias.zero_()
        rt.norm.weight.fill_(1.0)
        rt.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(zip(script, script[1:])):
            rt.embed[token] = 0.0
            rt.embed[token, i] = 1.0                 # normalized: sqrt(H) along dimension i
            rt.lm_head.weight[successor, i] = 4.0    # logit 4 * sqrt(H) ~ 45, every other token 0
    return Engine(rt, "scripted")


@pytest.fixture(scope="module")
def scripted(tiny_model_dir) -> dict[str, Engine]:
    return {text: scripted_engine(tiny_model_dir, text) for text in (FINAL, ANALYSIS, TOOL_CALL)}


@pytest.fixture(scope="module")
def short_engine(tiny_model_dir):
    return Engine.load(tiny_model_dir, dtype=torch.float32, device="cpu", context_length=64)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)

def wait_idle(engine, seconds: float = 10.0) -> None:
    import time
    end = time.monotonic() + seconds
    while not engine.scheduler.idle():
        assert time.monotonic() < end, "the scheduler did not go idle"
        time.sleep(0.01)
    assert engine.scheduler.cache.empty()               # every slot and page came back


# ------------------------------------------------------------------------------------------- greedy vs transformers

@pytest.mark.parametrize("model", [BASE, TUNED])
def test_greedy_matches_transformers_generate(engine, expected, model):
    for i, p in enumerate(prompts()):
        done = engine.complete(p, greedy(max_new(i)), model=model)
        assert done.token_ids == expected[model][i], f"prompt {i}"
        assert done.prompt_tokens == len(p) and done.completion_tokens == len(done.token_ids)
    assert len(prompts()[3]) > 2 * 64     # the long case crosses the sliding window (64) twice before generating


@pytest.mark.parametrize("model", [BASE, TUNED])
def test_generate_many_equals_one_by_one(engine, expected, model):
    batch = prompts()
    assert len({len(p) for p in batch}) > 1          # ragged prompts, prefilled together
    out = engine.generate(batch, SHORT_NEW, model)
    assert out == [until_stop(e[:SHORT_NEW]) for e in expected[model]]
    wait_idle(engine)


# --------------------------------------------------------------------------------------------------------- sampling

def sample(engine, **kw) -> list[int]:
    return engine.complete(prompts()[0], SamplingParams(max_tokens=8, **kw)).token_ids


def test_sampling_is_reproducible_by_seed(engine):
    a = sample(engine, temperature=1.0, seed=1)
    assert len(a) == 8 and a == sample(engine, temperature=1.0, seed=1)
    assert a != sample(engine, temperature=1.0, seed=2)
    assert sample(engine, temperature=0.7, top_p=0.9, seed=5) == sample(engine, temperature=0.7, top_p=0.9, seed=5)


def test_tiny_top_p_and_zero_temperature_are_greedy(engine, expected):
    greedy_tokens = expected[BASE][0][:8]
    assert sample(engine, temperature=1.0, top_p=1e-6, seed=3) == greedy_tokens
    assert sample(engine, temperature=0, top_p=0.5, seed=4) == greedy_tokens
    assert sample(engine, temperature=1.0, seed=3) != greedy_tokens    # the seed alone does not make it greedy


# -------------------------------------------------------------------------------------------------------- streaming

def run_stream(engine, prompt, params) -> tuple[list[Delta], Completion]:
    events = list(engine.stream(prompt, params))
    *deltas, done = events
    assert all(isinstance(d, Delta) for d in deltas) and isinstance(done, Completion)
    return deltas, done


def joined(deltas: list[Delta], kind: str) -> str | None:
    return "".join(d.text for d in deltas if d.kind == kind) or None


@pytest.mark.parametrize("text, max_tokens, reasoning, content, finish, pieces", [
    (FINAL, 100, None, " red green blue cyan", "stop", [" red", " green", " blue", " cyan"]),
    (ANALYSIS, 6, " thinking about colours", None, "length", [" thinking", " about", " colours"]),
])
def test_stream_equals_complete(scripted, text, max_tokens, reasoning, content, finish, pieces):
    engine = scripted[text]
    prompt = engine.encode_chat(HI)
    deltas, done = run_stream(engine, prompt, greedy(max_tokens))
    assert (done.reasoning, done.content, done.finish_reason, done.tool_calls) == (reasoning, content, finish, [])
    assert joined(deltas, "reasoning") == done.reasoning and joined(deltas, "content") == done.content
    assert [d.text for d in deltas] == pieces                          # one delta per text token, as they come
    assert done.token_ids == encode(text)[:max_tokens]
    assert done.prompt_tokens == len(prompt) and done.completion_tokens == len(done.token_ids)
    assert engine.complete(prompt, greedy(max_tokens)) == done


def test_tool_call_through_the_engine(scripted):
    engine = scripted[TOOL_CALL]
    deltas, done = run_stream(engine, engine.encode_chat(HI), greedy(100))
    assert done.finish_reason == "tool_calls" and done.content is None and done.reasoning is None
    (call,) = done.tool_calls
    assert call["name"] == "get_weather" and call["arguments"] == '{"city":"Paris"}' and call["id"].startswith("call_")
    first, *rest = [d for d in deltas if d.kind == "tool_call"]
    assert (first.name, first.call_id, first.text, first.index) == ("get_weather", call["id"], "", 0)
    assert "".join(d.text for d in rest) == call["arguments"] and all(d.index == 0 for d in rest)


def test_random_model_stream_is_consistent(engine):
    """The real tiny model writes no Harmony: no deltas, a 'length' finish and usage counting every token."""
    prompt = prompts()[0]
    deltas, done = run_stream(engine, prompt, greedy(5))
    assert [d for d in deltas if d.text] == [] and done.finish_reason == "length"
    assert (done.prompt_tokens, done.completion_tokens, len(done.token_ids)) == (len(prompt), 5, 5)


def test_streams_read_in_turn_keep_their_own_cache_and_adapter(engine, expected):
    """Two streams consumed in turn (base and adapter, different prompts, as concurrent requests are) share the
    running batch and each give their own greedy tokens."""
    a = engine.stream(prompts()[0], greedy(SHORT_NEW))
    b = engine.stream(prompts()[1], greedy(SHORT_NEW), model=TUNED)
    *_, done_a = a
    *_, done_b = b
    assert done_a.token_ids == expected[BASE][0] and done_b.token_ids == expected[TUNED][1]


# ----------------------------------------------------------------------------------------------------- stop strings

@pytest.mark.parametrize("stop, content", [
    ((" blue",), " red green"),
    (("een bl",), " red gr"),                  # spans two tokens
    ((" cyan", " green"), " red"),             # the earliest of several
])
def test_stop_string_cuts_the_content(scripted, stop, content):
    engine = scripted[FINAL]
    prompt = engine.encode_chat(HI)
    full = engine.complete(prompt, greedy(100))
    assert full.content == " red green blue cyan"
    deltas, done = run_stream(engine, prompt, greedy(100, stop=stop))
    assert done.content == content == joined(deltas, "content") and done.finish_reason == "stop"
    assert done.completion_tokens < full.completion_tokens     # generation stopped at the stop string


def test_a_single_stop_string_is_not_split_into_characters(scripted):
    """``SamplingParams(stop=" blue")`` (a str, not a tuple) must mean the stop string " blue", or be refused; it
    must not silently become the five one-character stop strings ' ', 'b', 'l', 'u', 'e'."""
    engine = scripted[FINAL]
    prompt = engine.encode_chat(HI)
    try:
        done = engine.complete(prompt, greedy(100, stop=" blue"))
    except BadParameter as exc:
        assert "stop" in str(exc)
    else:
        assert done.content == " red green"


def test_stop_string_never_seen_changes_nothing(scripted):
    engine = scripted[FINAL]
    prompt = engine.encode_chat(HI)
    done = engine.complete(prompt, greedy(100, stop=("purple",)))
    assert done == engine.complete(prompt, greedy(100))


def test_max_tokens_gives_length(engine):
    done = engine.complete(prompts()[0], greedy(3))
    assert done.finish_reason == "length" and len(done.token_ids) == done.completion_tokens == 3


# --------------------------------------------------------------------------------------------------- closing early

def test_closing_a_stream_stops_generation_and_frees_its_cache(scripted, engine):
    wait_idle(engine)
    before = engine.scheduler.generated
    # the random model writes no Harmony (no deltas) and does not stop by itself: read its tokens directly
    request = engine.scheduler.submit(prompts()[0], 1000, frozenset(harmony.stop_token_ids()))
    tokens = request.tokens()
    next(tokens)
    tokens.close()
    wait_idle(engine)                                    # its slot and pages came back
    assert engine.scheduler.generated - before < 500     # it stopped long before its 1000 tokens
    scripted_engine = scripted[FINAL]
    prompt = scripted_engine.encode_chat(HI)
    gen = scripted_engine.stream(prompt, greedy(100))
    assert next(gen) == Delta("content", " red")
    gen.close()
    assert scripted_engine.complete(prompt, greedy(100)).content == " red green blue cyan"
    wait_idle(scripted_engine)


# ------------------------------------------------------------------------------------------------- eager validation

@pytest.mark.parametrize("params, model, error, words", [
    (SamplingParams(), "nope", UnknownModel, ["'nope'", "tiny, tuned"]),
    (SamplingParams(temperature=3), None, BadParameter, ["temperature"]),
    (SamplingParams(top_p=0), None, BadParameter, ["top_p"]),
    (SamplingParams(max_tokens=0), None, BadParameter, ["max_tokens"]),
])
def test_stream_validates_before_generating(engine, params, model, error, words):
    with pytest.raises(error) as info:
        engine.stream(prompts()[0], params, model)          # not iterated: the error comes at the call
    assert all(w in str(info.value) for w in words), str(info.value)


def test_prompt_too_long(short_engine):
    with pytest.raises(PromptTooLong, match="64"):
        short_engine.stream(list(range(1000, 1064)), greedy(1))
    with pytest.raises(PromptTooLong):
        short_engine.stream(prompts()[0], greedy(1))
    done = short_engine.complete(list(range(1000, 1063)), greedy(10))   # one token of room left
    assert done.completion_tokens == 1 and done.finish_reason == "length"


@pytest.mark.parametrize("messages, words", [
    ([{"role": "wizard", "content": "hi"}], ["'wizard'", "message 1"]),
    ([], ["empty"]),
])
def test_encode_chat_rejects_bad_messages(engine, messages, words):
    with pytest.raises(MessageError) as info:
        engine.encode_chat(messages)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_unknown_sampling_parameter(engine):
    with pytest.raises(BadParameter, match="'bogus'"):
        engine.chat(HI, bogus=1)
    with pytest.raises(BadParameter, match="temperature"):
        engine.stream_chat(HI, temperature=-1)


# ------------------------------------------------------------------------------------------------ Harmony parsing

def feed_all(tokens: list[int]) -> tuple[harmony.ReplyStream, list[tuple[str, str, int]]]:
    parser = harmony.ReplyStream()
    return parser, [piece for t in tokens for piece in parser.feed(t)]


def test_reply_stream_analysis_then_final():
    tokens = encode("<|channel|>analysis<|message|>Let me think.<|end|>"
                    "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>")
    parser, pieces = feed_all(tokens)
    assert {kind for kind, _, _ in pieces} == {"analysis", "final"}
    assert "".join(t for k, t, _ in pieces if k == "analysis") == "Let me think."
    assert "".join(t for k, t, _ in pieces if k == "final") == "Hello there!"
    assert [k for k, _, _ in pieces] == sorted(k for k, _, _ in pieces)    # all analysis before any final
    assert not parser.broken and parser.calls == []
    reply = harmony.parse_completion(tokens)
    assert (reply.analysis, reply.final, reply.complete) == ("Let me think.", "Hello there!", True)


def test_reply_stream_tool_call():
    tokens = encode("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant" + TOOL_CALL)
    parser, pieces = feed_all(tokens)
    calls = [(t, c) for k, t, c in pieces if k == "tool_call"]
    assert calls[0] == ("", 0)                              # the announcement comes first
    assert parser.calls == ["get_weather"]
    assert len(calls) > 2 and "".join(t for t, _ in calls) == '{"city":"Paris"}' and {c for _, c in calls} == {0}
    assert "".join(t for k, t, _ in pieces if k == "analysis") == "Need the weather."
    assert harmony.parse_completion(tokens).tool_calls == [{"name": "get_weather", "arguments": '{"city":"Paris"}'}]


def test_reply_stream_commentary_preamble_and_broken_input():
    _, pieces = feed_all(encode("<|channel|>commentary<|message|>Checking.<|end|>"))
    assert pieces == [("commentary", t, -1) for _, t, _ in pieces] and "".join(t for _, t, _ in pieces) == "Checking."
    parser, pieces = feed_all(encode("<|channel|>final<|message|>ok<|end|><|message|>more text"))
    assert parser.broken and "".join(t for _, t, _ in pieces) == "ok"
    assert parser.feed(encode("x")[0]) == []               # nothing more is parsed once broken


def test_an_engine_sized_for_a_workload_holds_exactly_it(tiny_model_dir, expected):
    """``size_for`` (an export's probes): room for the given sequences and no more KV memory, same greedy output."""
    from inference.engine.cache import PAGE
    batch = prompts()
    longest = max(map(len, batch)) + SHORT_NEW
    sized = Engine.load(tiny_model_dir, dtype=torch.float32, device="cpu").size_for(len(batch), longest)
    try:
        assert sized.generate(batch, SHORT_NEW, None) == [until_stop(e[:SHORT_NEW]) for e in expected[BASE]]
        wait_idle(sized)
        stats = sized.stats()
        assert stats["max_running"] == len(batch)
        assert stats["kv_pages"] == len(batch) * -(-longest // PAGE)
        assert stats["kv_pages_free"] == stats["kv_pages"]          # all back once done
        with pytest.raises(RuntimeError, match="after the first generation"):
            sized.size_for(1, 10)
    finally:
        sized.close()
