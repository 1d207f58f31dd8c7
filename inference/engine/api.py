"""The Python face of the runtime: load once, then chat, complete or stream, with adapters chosen per call.

``Engine.load(model, adapters={"name": dir}, merge=False)`` loads an HF-layout gpt-oss directory (or the tiny
model's name) with its MXFP4 experts kept packed, plus any number of PEFT adapters. Each adapter is a *model id*:
``engine.model_ids`` is ``[engine.base_id, *adapter names]`` and every call picks one with ``model=``. With
``merge=True`` (one adapter) the adapter is folded into the weights and the merged model is served under the
adapter's name; its experts are then held dense, which costs about four times the packed memory.

Streams yield :class:`Delta` events as tokens arrive and end with exactly one :class:`Completion`. Closing the
generator early (``gen.close()``, or dropping it) stops generation and gives its KV memory back. All streams, of
any threads, are generated together by one :class:`~inference.engine.scheduler.Scheduler` (continuous batching:
a request joins the running batch at the next step; each sequence keeps its own adapter, sampling and stop rules).
``max_batch`` caps the sequences generated at once, ``kv_memory`` the bytes of KV cache, ``max_queue`` the requests
that may wait for a slot (beyond it, :class:`Overloaded`). :meth:`Engine.generate` completes many prompts at once
(evaluation, export checks).

Errors a caller can cause are :class:`inference.errors.UserError` subclasses: bad messages
(``inference.conversations.MessageError``), :class:`UnknownModel`, :class:`PromptTooLong`, :class:`BadParameter`,
:class:`TooLarge` (more KV memory than the engine has), raised before any token is computed, and
:class:`Overloaded` (the waiting queue is full). A stream given ``max_wait`` raises
:class:`~inference.engine.scheduler.QueueTimeout` from its first ``next()`` when it waited that long for a slot
without getting one; ``admitted()`` is called when it gets one (a server sends a stream's headers then), and
``cancelled()`` is asked while it waits too, so a caller that went away leaves the queue at once.

    engine = Engine.load("tiny-gpt-oss")
    reply = engine.chat([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=64)
    reply.reasoning, reply.content
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Literal

from inference import harmony
from inference.engine.scheduler import Scheduler
from inference.errors import UserError

CPU_KV_MEMORY = 1 << 30   # bytes of KV cache on the CPU unless told otherwise
CUDA_KV_SHARE = 0.5       # on CUDA: this share of the memory free after loading, unless told otherwise


class UnknownModel(UserError):
    """A call named a model id that is neither the base nor a loaded adapter."""


class PromptTooLong(UserError):
    """The prompt leaves no room to generate within the context window (checked before any compute)."""


class BadParameter(UserError):
    """A sampling parameter is out of range (the message names it)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible."""

    max_tokens: int | None = None     # None: up to the end of the context window
    temperature: float = 1.0          # 0 <= t <= 2
    top_p: float = 1.0                # 0 < p <= 1
    seed: int | None = None
    stop: tuple[str, ...] = ()        # stop strings (or one string), matched in the content; not included in it


@dataclass(frozen=True)
class Delta:
    """A piece of the reply as it streams.

    ``kind``: ``reasoning`` (analysis channel), ``content`` (final channel, and commentary preambles) or
    ``tool_call`` (arguments text of tool call number ``index``; the first delta of each call carries ``name`` and
    ``call_id``).
    """

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    index: int = 0
    name: str | None = None
    call_id: str | None = None


@dataclass(frozen=True)
class Completion:
    """A whole reply. ``finish_reason``: ``stop`` (end of turn, a stop string, or output Harmony cannot parse),
    ``length`` (max_tokens or the context window), ``tool_calls`` (the model called a tool and waits for its result)
    or ``cancelled`` (the caller's ``cancelled()`` said so). ``parsed`` is False when the model wrote something
    Harmony cannot parse (what came before it is kept; ``token_ids`` hold all of it)."""

    reasoning: str | None
    content: str | None
    tool_calls: list[dict]            # [{"id", "name", "arguments"}], arguments a JSON string as the model wrote it
    finish_reason: Literal["stop", "length", "tool_calls", "cancelled"]
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    parsed: bool = True


class Engine:
    """A loaded model with its adapters; see the module docstring."""

    def __init__(self, model, base_id: str, context_length: int | None = None, max_batch: int | None = None,
                 kv_memory: int | None = None, max_queue: int = 256):
        self.model = model                          # inference.model.runtime.GptOss
        self.base_id = base_id
        self.context_length = min(context_length or model.context_length, model.context_length)
        cuda = model.embed.device.type == "cuda"
        self.max_batch = max_batch or (64 if cuda else 8)
        self.kv_memory, self.max_queue = kv_memory, max_queue
        for name, value in (("max_batch", self.max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be an integer >= 1, got {value!r}")
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()
        self._stop_ids = frozenset(harmony.stop_token_ids())
        self._call_id = harmony.encoding().encode("<|call|>", allowed_special="all")[0]

    @property
    def scheduler(self) -> Scheduler:
        """Built at first use: its KV memory is sized from what is free then. Under a lock: a fresh server's first
        requests arrive together, and each building its own scheduler would each get the whole batch and queue."""
        with self._scheduler_lock:
            return self._scheduler or self._build_scheduler()

    def _build_scheduler(self) -> Scheduler:
        from inference.engine.cache import PAGE, page_bytes, slot_bytes
        budget = self.kv_memory
        if budget is None:
            if self.model.embed.device.type == "cuda":
                import torch
                budget = int(torch.cuda.mem_get_info(self.model.embed.device)[0] * CUDA_KV_SHARE)
            else:
                budget = CPU_KV_MEMORY
        per_seq = -(-self.context_length // PAGE)
        pages = (budget - self.max_batch * slot_bytes(self.model)) // max(page_bytes(self.model), 1)
        pages = min(pages, self.max_batch * per_seq)
        if pages < 1:
            raise UserError(f"kv_memory {budget} bytes cannot hold {self.max_batch} sequences' sliding-window "
                            "caches; lower max_batch or raise kv_memory")
        cuda = self.model.embed.device.type == "cuda"
        self._scheduler = Scheduler(self.model, tuple(self.model.adapters), self.max_batch, int(pages),
                                    self.context_length, self.max_queue, 2048 if cuda else 512)
        return self._scheduler

    def size_for(self, sequences: int, length: int) -> "Engine":
        """Before the first generation: room for exactly ``sequences`` sequences of up to ``length`` tokens (batch,
        context and KV memory), for a fixed workload such as an export's probes, where the default KV budget (half
        of the free GPU memory) would only raise the peak."""
        import math

        from inference.engine.cache import PAGE, page_bytes, slot_bytes
        if self._scheduler is not None:
            raise RuntimeError("size_for() after the first generation")
        self.max_batch = max(1, sequences)
        self.context_length = min(max(2, length), self.model.context_length)
        self.kv_memory = self.max_batch * (slot_bytes(self.model)
                                           + math.ceil(self.context_length / PAGE) * page_bytes(self.model))
        return self

    def stats(self) -> dict:
        """:meth:`Scheduler.stats`: running and waiting requests, tokens/s, KV pages, the worker's time in prefill and
        decode (the counters all zero before the first generation)."""
        if self._scheduler is None:
            return {"running": 0, "waiting": 0, "tokens_per_second": 0.0, "max_running": self.max_batch,
                    "generated_tokens": 0, **dict.fromkeys(Scheduler.WORK, 0)}
        return self._scheduler.stats()

    def close(self) -> None:
        """Cancel every generation in flight and stop the scheduler's worker (a server calls it on shutdown)."""
        if self._scheduler is not None:
            self._scheduler.close()

    @property
    def adapter_ids(self) -> list[str]:
        return list(self.model.adapters)

    @property
    def model_ids(self) -> list[str]:
        return [self.base_id, *self.adapter_ids]

    @classmethod
    def load(cls, model: str | Path, adapters: dict[str, str | Path] | None = None, merge: bool = False,
             dtype=None, device=None, name: str | None = None, context_length: int | None = None,
             **limits) -> "Engine":
        """Load ``model`` (directory, ``tiny-gpt-oss[@seed]`` or a hub id already in the local cache) and adapters.

        ``dtype``/``device`` default to bf16 on CUDA, else fp32 on CPU. ``name`` is the base model's id (default:
        the name given, or the directory's name). ``context_length`` caps the window below the model's own.
        ``limits``: ``max_batch``, ``kv_memory`` (bytes), ``max_queue`` (see the module docstring).
        """
        from inference.model import adapters as lora
        from inference.model import runtime
        from inference.model.tiny import resolve_model
        adapters = dict(adapters or {})
        if merge and len(adapters) != 1:
            raise UserError(f"merge needs exactly one adapter, got {len(adapters)}")
        if context_length is not None and context_length < 2:
            raise UserError(f"context_length must be at least 2, got {context_length}")
        model_dir = resolve_model(str(model))
        base_id = name or (str(model) if not Path(str(model)).expanduser().is_dir() else model_dir.name)
        for adapter_name in adapters:
            if not adapter_name or adapter_name == base_id or any(c.isspace() for c in adapter_name):
                raise UserError(f"bad adapter name {adapter_name!r}: needs a non-empty name without spaces that "
                                f"differs from the base model's id {base_id!r}")
        rt = runtime.load(model_dir, dtype=dtype, device=device)
        read = {n: lora.read_adapter(p, rt) for n, p in adapters.items()}  # all checked before any is applied
        if merge:
            (base_id, adapter), = read.items()
            lora.merge(rt, adapter)
        else:
            for adapter_name, adapter in read.items():
                lora.attach(rt, adapter_name, adapter)
        return cls(rt, base_id, context_length, **limits)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    reasoning_effort: str | None = None) -> list[int]:
        """OpenAI-style chat messages (+ tools) → Harmony prompt ids ending with ``<|start|>assistant``."""
        from inference.conversations import normalize_messages, normalize_tools
        if reasoning_effort is not None and reasoning_effort not in harmony.REASONING_EFFORTS:
            raise BadParameter(f"reasoning_effort must be one of {', '.join(harmony.REASONING_EFFORTS)}, "
                               f"got {reasoning_effort!r}")
        msgs = normalize_messages(messages, where="messages", strict_keys=False)
        specs = normalize_tools(tools, "tools")
        options = harmony.HarmonyOptions(reasoning_effort=reasoning_effort or "medium")
        return harmony.render_prompt(msgs, specs, options)

    def adapter_index(self, model: str | None) -> int:
        """A model id as the scheduler's adapter index (0: the base)."""
        adapter = self.adapter_for(model)
        return 0 if adapter is None else self.model.adapters.index(adapter) + 1

    def adapter_for(self, model: str | None) -> str | None:
        """The runtime adapter behind a model id (None for the base); UnknownModel for an id that is not loaded."""
        model = model or self.base_id
        if model not in self.model_ids:
            raise UnknownModel(f"model {model!r} does not exist (available: {', '.join(self.model_ids)})")
        return None if model == self.base_id else model

    def _check(self, prompt_ids: list[int], params: SamplingParams, model: str | None) -> tuple[str | None, int]:
        """Validate a request; returns (adapter or None, tokens that may be generated)."""
        adapter = self.adapter_for(model)
        checks = [
            (params.max_tokens is not None and (isinstance(params.max_tokens, bool)
             or not isinstance(params.max_tokens, int) or params.max_tokens < 1), "max_tokens must be an integer >= 1"),
            (not isinstance(params.temperature, (int, float)) or not 0 <= params.temperature <= 2,
             "temperature must be between 0 and 2"),
            (not isinstance(params.top_p, (int, float)) or not 0 < params.top_p <= 1, "top_p must be in (0, 1]"),
            (params.seed is not None and (isinstance(params.seed, bool) or not isinstance(params.seed, int)),
             "seed must be an integer"),
            (not all(isinstance(x, str) and x for x in params.stop), "stop must be non-empty strings"),
        ]
        for bad, message in checks:
            if bad:
                raise BadParameter(message)
        if not prompt_ids:
            raise BadParameter("the prompt is empty")
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise PromptTooLong(f"the prompt is {len(prompt_ids)} tokens; the context window is {self.context_length}, "
                                "so no token can be generated")
        return adapter, min(params.max_tokens or room, room)

    def stream(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(), model: str | None = None,
               cancelled: Callable[[], bool] | None = None, max_wait: float | None = None,
               admitted: Callable[[], None] | None = None) -> Iterator[Delta | Completion]:
        """Deltas as tokens arrive, then one Completion. Validates ``model``, ``params`` and the prompt length
        now (this is not a generator function), so errors come before any compute, and queues the request (or
        raises :class:`Overloaded`). ``cancelled`` is asked after every token, visible or not, and every 0.2 s while
        no token comes (a server passes "has the client gone?"): then the Completion's finish_reason is
        ``cancelled``. ``max_wait``: seconds the request may wait for a slot (the first ``next()`` then raises
        :class:`~inference.engine.scheduler.QueueTimeout`); ``admitted()`` is called, in the consuming thread,
        when it gets one."""
        if isinstance(params.stop, str):   # one stop string, not its characters
            params = replace(params, stop=(params.stop,))
        adapter, max_new = self._check(list(prompt_ids), params, model)
        return self._run(list(prompt_ids), params, adapter, max_new, cancelled, max_wait, admitted)

    def _run(self, prompt: list[int], params: SamplingParams, adapter: str | None, max_new: int,
             cancelled: Callable[[], bool] | None, max_wait: float | None = None,
             admitted: Callable[[], None] | None = None) -> Iterator[Delta | Completion]:
        index = 0 if adapter is None else self.model.adapters.index(adapter) + 1
        request = self.scheduler.submit(prompt, max_new, self._stop_ids, params.temperature, params.top_p,
                                        params.seed, index, max_wait=max_wait)
        return self._events(request, prompt, params, cancelled, admitted)

    def _events(self, request, prompt: list[int], params: SamplingParams, cancelled: Callable[[], bool] | None,
                admitted: Callable[[], None] | None = None) -> Iterator[Delta | Completion]:
        parser = harmony.ReplyStream()
        content = _StopText(params.stop)
        reasoning: list[str] = []
        calls: list[dict] = []
        tokens: list[int] = []
        finish = "length"
        gen = request.tokens(gone=cancelled, admitted=admitted)
        try:
            for token in gen:
                tokens.append(token)
                for kind, text, call in parser.feed(token):
                    if kind == "analysis":
                        reasoning.append(text)
                        yield Delta("reasoning", text)
                    elif kind == "tool_call" and not text:
                        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "name": parser.calls[call],
                                      "arguments": ""})
                        yield Delta("tool_call", "", call, calls[call]["name"], calls[call]["id"])
                    elif kind == "tool_call":
                        calls[call]["arguments"] += text
                        yield Delta("tool_call", text, call)
                    else:
                        if content.stopped:
                            continue
                        piece = content.add(text)
                        if piece:
                            yield Delta("content", piece)
                if content.stopped or parser.broken:
                    finish = "stop"
                    break
                if cancelled is not None and cancelled():
                    finish = "cancelled"
                    break
                if token in self._stop_ids:
                    finish = "tool_calls" if token == self._call_id and calls else "stop"
        finally:
            gen.close()     # cancels the request: its slot and KV memory come back at the next step
        if request.abandoned:   # cancelled() said so while no token came (waiting for a slot, say)
            finish = "cancelled"
        rest = content.flush()
        if rest:
            yield Delta("content", rest)
        yield Completion("".join(reasoning) or None, content.text or None, calls, finish, len(prompt), len(tokens),
                         tokens, not parser.broken)

    def generate(self, prompts: list[list[int]], max_new: int, model: str | None = None,
                 params: SamplingParams = SamplingParams(temperature=0), on_done=None) -> list[list[int]]:
        """Token ids generated for each prompt (a stop token included when reached), all submitted at once and
        generated together; a prompt that leaves no room gets ``[]``. ``on_done()`` is called as each finishes."""
        index = self.adapter_index(model)
        rooms = [min(max_new, self.context_length - len(p)) for p in prompts]
        queued = iter(self.scheduler.submit_many([(p, room, self._stop_ids, params.temperature, params.top_p,
                                                   params.seed, index) for p, room in zip(prompts, rooms) if room > 0]))
        requests = [next(queued) if room > 0 else None for room in rooms]
        out = []
        try:
            for r in requests:
                out.append(list(r.tokens()) if r is not None else [])
                if on_done is not None:
                    on_done()
        finally:
            for r in requests:
                if r is not None:
                    r.cancel()
        return out

    def complete(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                 model: str | None = None) -> Completion:
        """Generate to the end and return the whole reply."""
        *_, done = self.stream(prompt_ids, params, model)
        return done

    def chat(self, messages: list[dict], tools: list[dict] | None = None, reasoning_effort: str | None = None,
             model: str | None = None, **sampling) -> Completion:
        """``complete`` for chat messages; ``sampling`` are :class:`SamplingParams` fields."""
        return self.complete(self.encode_chat(messages, tools, reasoning_effort), _params(sampling), model)

    def stream_chat(self, messages: list[dict], tools: list[dict] | None = None, reasoning_effort: str | None = None,
                    model: str | None = None, **sampling) -> Iterator[Delta | Completion]:
        """``stream`` for chat messages; ``sampling`` are :class:`SamplingParams` fields."""
        return self.stream(self.encode_chat(messages, tools, reasoning_effort), _params(sampling), model)


def _params(sampling: dict) -> SamplingParams:
    known = set(asdict(SamplingParams()))
    unknown = sorted(set(sampling) - known)
    if unknown:
        raise BadParameter(f"unknown sampling parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = (sampling["stop"],)
    return SamplingParams(**{**sampling, "stop": tuple(sampling.get("stop", ()))})


class _StopText:
    """Reply text with stop strings cut out: holds back just enough characters to see a stop string whole."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""          # released so far
        self.pending = ""
        self.stopped = False

    def add(self, piece: str) -> str:
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
        else:
            cut = len(self.pending) - self.hold
            out, self.pending = self.pending[:max(cut, 0)], self.pending[max(cut, 0):]
        self.text += out
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out
