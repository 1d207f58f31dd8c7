"""Continuous batching: requests join the running batch at any step and leave it as soon as they end.

:class:`Scheduler` owns the KV memory (:class:`~inference.engine.cache.SlotCache`) and a worker thread that runs
while there is work. Each iteration it

1. retires requests that finished or were cancelled (their slot and pages come back at once; the last live slot
   moves into the hole, so live sequences always fill slots ``[0, n)``),
2. admits waiting requests, oldest first, while a slot and the pages for prompt + ``max_new`` tokens are free,
3. runs one prefill chunk: up to ``prefill_tokens`` prompt tokens over the admitted sequences still reading their
   prompt, as one batch (a long prompt takes several iterations, so decoding sequences never wait long). While
   others are decoding, new prompts are gathered first: their prefill runs once there are enough of them to share
   one forward (a quarter of the decoding sequences) or the oldest has waited :data:`PREFILL_WAIT_STEPS` decode
   steps. A prefill forward has a fixed cost (every layer's kernels are launched one by one, not replayed as a
   graph) that one prompt per step would pay at every step under steady load; with nothing decoding a prompt is
   read at once.
4. runs one decode step for every sequence that is generating, and hands each its next token.

A request's tokens arrive on its own queue (:meth:`Request.tokens`); closing that iterator or :meth:`Request.cancel`
ends it at the next iteration, whether it is generating or still waiting (the consumer can ask "is my caller gone?"
while no token comes, so a waiting request notices too). Submitting beyond ``max_queue`` waiting requests raises
:class:`Overloaded` (a server answers 429). A request submitted with ``max_wait`` that is still waiting that many
seconds later (checked each iteration, right after admission, so a slot freed in that iteration still goes to it)
leaves the queue and its consumer raises :class:`QueueTimeout` (a server answers 503). A failure inside a step is
handed to every request in flight (each consumer raises it), the memory is cleared, and the scheduler goes on with
new requests.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from inference.engine.batch import Stepper
from inference.engine.cache import SlotCache
from inference.engine.sampling import choose, generator
from inference.errors import UserError

PREFILL_WAIT_STEPS = 16   # decode steps a new prompt may wait for others to share its prefill (see the docstring)
PREFILL_SHARE = 4         # ... or until the new prompts number a quarter of the decoding sequences

_END = object()
_ADMITTED = object()   # put on a request's queue when it gets its slot (see Request.tokens' ``admitted``)
_SCHEDULERS: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()
_WORKERS: list[threading.Thread] = []    # strong references: a worker may outlive its scheduler's last other owner


@atexit.register
def _stop_all() -> None:
    """A worker thread still inside torch when the interpreter finalizes aborts the process ("terminate called
    without an active exception"), so at exit every scheduler cancels its work and every worker thread is joined.
    The threads are joined themselves, not through their schedulers: when the caller has dropped the engine, the
    worker holds the scheduler's last reference, and freeing it (and its KV tensors) is the thread's very last act,
    after the scheduler has already forgotten the thread."""
    for scheduler in list(_SCHEDULERS):
        scheduler.close(timeout=0)   # cancel all first, so the joins below are short
    for worker in list(_WORKERS):
        worker.join(30.0)


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


class Overloaded(UserError):
    """Every slot is busy and the waiting queue is full: try again later."""


class TooLarge(UserError):
    """A request needs more KV memory than the scheduler has in total."""


class QueueTimeout(UserError):
    """A request waited its ``max_wait`` seconds for a slot without getting one, and was dropped from the queue."""


@dataclass(eq=False)
class Request:
    """One sequence to generate: ``max_new`` tokens at most, ending at a stop id (which it yields)."""

    prompt: list[int]
    max_new: int
    stop_ids: frozenset[int]
    temperature: float
    top_p: float
    generator: torch.Generator | None
    adapter: int                           # 0: the base; i: the scheduler's names[i - 1]
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    slot: int | None = None
    read: int = 0                          # prompt tokens already in the cache
    admitted_step: int = 0                 # the scheduler's decode-step count when it got its slot
    out: list[int] = field(default_factory=list)
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    deadline: float | None = None          # perf_counter time by which it must have a slot (None: wait for ever)
    abandoned: bool = False                # its consumer's ``gone()`` said so while no token came

    def cancel(self) -> None:
        self.cancelled = True

    def tokens(self, gone: Callable[[], bool] | None = None, admitted: Callable[[], None] | None = None,
               every: float = 0.2) -> Iterator[int]:
        """The generated ids as they come (blocking); closing it early cancels the request.

        ``admitted()`` is called once, in the consuming thread, when the request gets its slot. ``gone()`` is asked
        every ``every`` seconds while no token comes (waiting for a slot, a long prefill): when it says True the
        request is cancelled, marked ``abandoned``, and the iterator ends at once (the scheduler frees its place at
        its next iteration), so a caller that went away never holds a place in the queue."""
        try:
            while True:
                try:
                    event = self.events.get(timeout=every if gone is not None else None)
                except queue.Empty:
                    if gone():
                        self.abandoned = True
                        return
                    continue
                if event is _END:
                    return
                if event is _ADMITTED:
                    if admitted is not None:
                        admitted()
                    continue
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            self.cancel()


class Scheduler:
    """See the module docstring. ``names``: the adapters a request's index picks; ``max_len``: the longest
    sequence (prompt + generated) one slot may hold."""

    WORK = ("prefill_seconds", "prefills", "prefill_tokens", "decode_seconds", "decode_steps")   # see stats()

    def __init__(self, model, names: tuple[str, ...], max_seqs: int, pages: int, max_len: int,
                 max_queue: int = 256, prefill_tokens: int = 2048, graphs: bool | None = None):
        self.model, self.names = model, names
        self.cache = SlotCache(model, max_seqs, pages, max_len)
        self.stepper = Stepper(model, self.cache, names, graphs)
        self.max_queue, self.prefill_tokens = max_queue, prefill_tokens
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._live: list[Request] = []           # by slot: live[i].slot == i
        self._worker: threading.Thread | None = None
        self._recent: deque[tuple[float, int]] = deque()   # (time, tokens) of the last steps, for tokens/s
        self._firsts: deque[tuple[float, float]] = deque()  # (time, seconds from submission to first token)
        self.generated = 0
        # where the worker's time goes, cumulative (a monitor takes differences): prefill forwards, decode steps
        # (each including the choice of its tokens), and how many of each. Only for the counters, nothing waits for
        # the device: on CUDA a prefill chunk that ends no prompt (chooses no token) counts its launch, and its GPU
        # time lands in the step that next reads a result.
        self.work = {k: 0.0 if k.endswith("seconds") else 0 for k in self.WORK}
        _SCHEDULERS.add(self)

    # ------------------------------------------------------------------ what callers use

    def submit(self, prompt: list[int], max_new: int, stop_ids: frozenset[int], temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, adapter: int = 0, bounded: bool = True,
               max_wait: float | None = None) -> Request:
        """Queue a request (``bounded``: refuse with :class:`Overloaded` when ``max_queue`` are already waiting;
        ``max_wait``: seconds it may wait for a slot before it fails with :class:`QueueTimeout`)."""
        return self.submit_many([(prompt, max_new, stop_ids, temperature, top_p, seed, adapter)], bounded,
                                max_wait)[0]

    def submit_many(self, items: list[tuple], bounded: bool = False, max_wait: float | None = None) -> list[Request]:
        """Queue several requests (each ``submit``'s arguments as a tuple) at once: they join the same step."""
        if max_wait is not None and not max_wait > 0:
            raise UserError(f"max_wait must be a positive number of seconds, got {max_wait!r}")
        requests = [self._request(*item) for item in items]
        for r in requests:
            r.deadline = None if max_wait is None else r.submitted + max_wait
        with self._lock:
            if bounded and len(self._waiting) + len(requests) > self.max_queue:
                raise Overloaded(f"the server is at capacity ({len(self._live)} generating, {len(self._waiting)} "
                                 "waiting); retry shortly")
            self._waiting.extend(requests)
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="inference-scheduler", daemon=True)
                _WORKERS[:] = [w for w in _WORKERS if w.is_alive()]
                _WORKERS.append(self._worker)
                self._worker.start()
        return requests

    def _request(self, prompt: list[int], max_new: int, stop_ids: frozenset[int], temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, adapter: int = 0) -> Request:
        need = self.cache.pages_for(len(prompt) + max_new)
        if need > self.cache.pages or len(prompt) + max_new > self.cache.max_len:
            raise TooLarge(f"the prompt ({len(prompt)} tokens) plus up to {max_new} generated tokens need "
                           f"{need} KV pages; this engine holds {self.cache.pages} pages of {self.cache.max_len} "
                           "tokens per sequence at most (raise the KV memory or lower max_tokens)")
        rng = generator(seed, self.model.embed.device) if temperature > 0 else None
        return Request(list(prompt), max_new, frozenset(stop_ids), temperature, top_p, rng, adapter)

    def stats(self) -> dict:
        """Running and waiting requests, generated tokens per second and time to first token (p50, p95: from
        submission to the first token chosen) over the last 10 s, free KV pages, and the worker's time so far in
        prefill forwards and decode steps with their counts (``prefill_seconds``, ``prefills``,
        ``prefill_tokens``, ``decode_seconds``, ``decode_steps``)."""
        now = time.perf_counter()
        with self._lock:
            recent = [(t, n) for t, n in self._recent if now - t <= 10.0]
            firsts = sorted(s for t, s in self._firsts if now - t <= 10.0)
            running, waiting = len(self._live), len(self._waiting)
            work = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.work.items()}
        rate = sum(n for _, n in recent) / 10.0 if recent else 0.0
        ttft = {}
        if firsts:
            ttft = {"ttft_p50_s": round(firsts[len(firsts) // 2], 4),
                    "ttft_p95_s": round(firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))], 4)}
        return {**ttft, "running": running, "waiting": waiting, "tokens_per_second": round(rate, 1),
                "max_running": self.cache.slots, "kv_pages_free": self.cache.free_pages,
                "kv_pages": self.cache.pages, "generated_tokens": self.generated, **work}

    def idle(self) -> bool:
        with self._lock:
            return not self._live and not self._waiting and self._worker is None

    def close(self, timeout: float = 30.0) -> None:
        """Cancel everything and wait for the worker to stop."""
        with self._lock:
            for r in [*self._live, *self._waiting]:
                r.cancel()
            worker = self._worker
        if worker is not None:
            worker.join(timeout)

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._live and not self._waiting:
                    self._worker = None
                    return
            try:
                self._step()
            except BaseException as exc:   # noqa: BLE001 - handed to every consumer; the worker must not die silently
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            victims = [*self._live, *self._waiting]
            self._live, self._waiting = [], deque()
        for r in victims:
            r.events.put(exc)
        for slot in range(self.cache.slots):
            self.cache.release(slot)

    def _step(self) -> None:
        self._retire()
        self._admit()
        self._expire()
        self._prefill()
        self._decode()
        self._retire()

    def _retire(self) -> None:
        with self._lock:
            for r in [r for r in self._live if r.finished or r.cancelled]:
                if not r.finished:
                    r.finished = True
                    r.events.put(_END)
                slot, last = r.slot, len(self._live) - 1
                self.cache.release(slot)
                if slot != last:                 # keep live slots contiguous: the last one fills the hole
                    moved = self._live[last]
                    self.cache.move(last, slot)
                    moved.slot = slot
                    self._live[slot] = moved
                self._live.pop()
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                r.events.put(_END)

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._live) < self.cache.slots:
                r = self._waiting[0]
                if self.cache.pages_for(len(r.prompt) + r.max_new) > self.cache.free_pages:
                    break                        # oldest first: it waits for pages rather than being overtaken
                self._waiting.popleft()
                r.slot = len(self._live)
                r.admitted_step = self.work["decode_steps"]
                self.cache.allocate(r.slot, len(r.prompt) + r.max_new)
                self._live.append(r)
                r.events.put(_ADMITTED)

    def _expire(self) -> None:
        """Drop the waiting requests past their deadline. Run right after admission: a request is dropped only when
        it could not get a slot in this iteration either."""
        now = time.perf_counter()
        with self._lock:
            late = [r for r in self._waiting if r.deadline is not None and now > r.deadline and not r.cancelled]
            for r in late:
                self._waiting.remove(r)
                r.finished = True
                r.events.put(QueueTimeout(f"waited {_seconds(now - r.submitted)} s for a free slot (the limit is "
                                          f"{_seconds(r.deadline - r.submitted)} s; {len(self._live)} generating, "
                                          f"{len(self._waiting)} still waiting): the server is overloaded, retry "
                                          "later"))

    def _prefill_due(self) -> bool:
        """Whether the prompts waiting to be read go now (see the module docstring): nothing else is decoding, a
        long prompt is part-way read, enough of them share the forward, or the oldest has waited long enough."""
        pending = [r for r in self._live if r.read < len(r.prompt) and not r.cancelled]
        if not pending:
            return False
        decoding = len(self._live) - len(pending)
        return (decoding == 0 or any(r.read for r in pending) or len(pending) * PREFILL_SHARE >= decoding
                or self.work["decode_steps"] - min(r.admitted_step for r in pending) >= PREFILL_WAIT_STEPS)

    def _prefill(self) -> None:
        if not self._prefill_due():
            return
        budget, rows = self.prefill_tokens, []
        for r in self._live:
            if r.read < len(r.prompt) and budget > 0 and not r.cancelled:
                take = min(len(r.prompt) - r.read, budget)
                rows.append((r, r.prompt[r.read:r.read + take]))
                budget -= take
        if not rows:
            return
        started = time.perf_counter()
        logits = self.stepper.prefill([r.slot for r, _ in rows], [c for _, c in rows], [r.adapter for r, _ in rows],
                                      [r.read + len(c) for r, c in rows])
        for r, chunk in rows:
            r.read += len(chunk)
        done = [i for i, (r, _) in enumerate(rows) if r.read == len(r.prompt)]
        if done:
            self._emit([rows[i][0] for i in done], logits[done])
        with self._lock:
            self.work["prefill_seconds"] += time.perf_counter() - started
            self.work["prefills"] += 1
            self.work["prefill_tokens"] += sum(len(c) for _, c in rows)

    def _decode(self) -> None:
        live = list(self._live)
        active = [r.read == len(r.prompt) and r.out and not r.finished and not r.cancelled for r in live]
        if not any(active):
            return
        tokens = [r.out[-1] if a else None for r, a in zip(live, active)]
        pages = max(self.cache.pages_for(len(r.prompt) + len(r.out)) for r, a in zip(live, active) if a)
        started = time.perf_counter()
        logits = self.stepper.decode(tokens, [r.adapter for r in live], pages)
        chosen = [i for i, a in enumerate(active) if a]
        self._emit([live[i] for i in chosen], logits[chosen])
        with self._lock:
            self.work["decode_seconds"] += time.perf_counter() - started
            self.work["decode_steps"] += 1

    def _emit(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Choose each request's next token from its row of ``logits``, hand it over, and mark finished ones."""
        tokens = choose(logits, [r.temperature for r in requests], [r.top_p for r in requests],
                        [r.generator for r in requests])
        now = time.perf_counter()
        for r, token in zip(requests, tokens):
            if not r.out:
                self._firsts.append((now, now - r.submitted))
            r.out.append(token)
            r.events.put(token)
            if token in r.stop_ids or len(r.out) >= r.max_new:
                r.finished = True
                r.events.put(_END)
        self.generated += len(tokens)
        now = time.perf_counter()
        with self._lock:
            self._recent.append((now, len(tokens)))
            for window in (self._recent, self._firsts):
                while window and now - window[0][0] > 10.0:
                    window.popleft()
