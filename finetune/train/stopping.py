"""Stopping a training run on SIGINT or SIGTERM with a complete checkpoint, at the next step boundary.

While :func:`graceful` is active (around ``trainer.train``), the first Ctrl-C or SIGTERM does not break the step in
progress. It asks :class:`StopAtStepEnd`, a Trainer callback, to save a checkpoint and stop at the end of that step,
and says so on stderr. When ``train`` has returned, :meth:`Stop.raise_if_requested` raises what the signal means
elsewhere in the project: ``KeyboardInterrupt`` for SIGINT, :class:`inference.errors.Terminated` for SIGTERM. The
pipeline then marks the run interrupted (run.json, MLflow) and the CLI prints the ``--resume`` command and exits
130 / 143. The run resumes from that checkpoint exactly as from any other.

A second signal raises at once. So does the first one when no step boundary comes within ``wait_s`` (a timer sends
the same signal again). Stopping at once is safe too: a checkpoint interrupted while being written lacks its
completion marker (``trained_tokens.json``, written last), and resume skips it.

Only the main thread can own signal handlers; elsewhere :func:`graceful` changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from transformers import TrainerCallback

from inference.errors import Terminated

WAIT_S = 120.0   # a 20b step takes about a second, its first one up to 80 s (kernel compilation) and a save a few
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Stop:
    """The signal asked for, if any; shared by the handler and the callback."""

    def __init__(self):
        self.signum: int | None = None

    def raise_if_requested(self, step: int | None = None) -> None:
        if self.signum is None:
            return
        where = f" (checkpoint-{step} saved)" if step is not None else ""
        raise Terminated(f"stopped by SIGTERM{where}") if self.signum == signal.SIGTERM else \
            KeyboardInterrupt(f"stopped by Ctrl-C{where}")


class StopAtStepEnd(TrainerCallback):
    """Save and stop at the end of the optimizer step during which a stop was asked for."""

    def __init__(self, stop: Stop):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


@contextlib.contextmanager
def graceful(stop: Stop, wait_s: float = WAIT_S, echo=None):
    """Route SIGINT and SIGTERM to ``stop`` while the block runs (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    timer: threading.Timer | None = None

    def handler(signum, frame):
        nonlocal timer
        if stop.signum is not None:             # the second signal, or the wait ran out: stop now
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        stop.signum = signum
        echo(f"{NAMES[signum]}: stopping after this step with a checkpoint (up to {wait_s:.0f} s; "
             f"{NAMES[signum]} again stops at once)")
        timer = threading.Timer(wait_s, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()

    previous = {s: signal.signal(s, handler) for s in NAMES}
    try:
        yield stop
    finally:
        if timer is not None:
            timer.cancel()
        for s, h in previous.items():
            signal.signal(s, h)
