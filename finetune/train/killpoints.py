"""Named points where the crash-safety tests kill a training run on purpose; nothing happens unless asked.

``GPT_OSS_WORKBENCH_KILL_AT=NAME`` kills the process the first time it reaches ``NAME``; ``NAME#N`` the N-th time.
The process sends itself SIGKILL, which nothing can catch or clean up after, as the kernel's OOM killer or a lost
machine would. ``NAME#N:TERM`` (or ``:INT``) sends SIGTERM (Ctrl-C's SIGINT) there instead and carries on, so the
run's own signal handling (:mod:`finetune.train.stopping`) takes it from there. A name lands inside a checkpoint save,
or between two writes of the run's own files, every time, which a signal from outside at a random moment would not.
``tests/test_kill_points.py`` kills a run at each of :data:`POINTS` and checks that ``--resume`` ends with the very
adapter of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "GPT_OSS_WORKBENCH_KILL_AT"

POINTS = {
    "eval-before": "the evaluation before training has run; eval_before.json not yet written",
    "step": "an optimizer step has ended; nothing of it saved yet",
    "save:begin": "a checkpoint save starts (its directory may not exist yet)",
    "save:adapter": "a checkpoint's adapter is written; its optimizer and scheduler are not",
    "save:optimizer": "a checkpoint's optimizer and scheduler are written; its RNG state is not",
    "save:state": "the Trainer has written the whole checkpoint; our trained-token file (the completion mark) is not",
    "save:marked": "a checkpoint is complete; older ones not yet rotated out",
    "train-end": "training has ended; the final adapter is not yet saved",
    "adapter:written": "the final adapter is written under its temporary name, not yet renamed",
    "eval-after": "the evaluation after training has run; eval_report.json not yet written",
    "record": "everything is written but run.json, which still says running",
}

_seen: dict[str, int] = {}


def reached(name: str) -> None:
    """Kill this process here if :data:`ENV` names this point (and this is the occurrence it names)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    head, _, how = spec.rpartition(":")       # names hold colons too ("save:begin"); a signal suffix is upper case
    if how not in ("KILL", "TERM", "INT"):
        head, how = spec, ""
    target, _, nth = head.partition("#")
    if name != target:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        sig = {"": signal.SIGKILL, "KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}[how]
        print(f"{'killed' if sig == signal.SIGKILL else signal.Signals(sig).name} at {name} ({ENV})",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.kill(os.getpid(), sig)
