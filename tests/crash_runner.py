"""Runs ``python -m finetune`` commands one after another, each in a forked child of this one process, so the
crash-safety tests pay for importing torch, transformers, TRL and PEFT once instead of once per kill.

Usage: ``python tests/crash_runner.py PLAN.json RUN_DIR``, where the plan is a list of ``{"args": [...], "kill_at":
NAME or null}``. Each child runs the real command line (:func:`finetune.cli.main`) with ``GPT_OSS_WORKBENCH_KILL_AT``
set as asked (:mod:`finetune.train.killpoints`: it SIGKILLs itself there, or sends itself SIGTERM). Nothing has run a
torch operation in this process before it forks (only imports), so the children start from a clean state. After
each child, what it left is noted: its exit status (negative: killed by that signal), run.json's status and the
checkpoints in RUN_DIR (complete ones marked); all of it printed as one JSON line at the end.
"""

import gc
import json
import os
import sys
import time
from pathlib import Path

from finetune.train.pipeline import set_quiet_environment

set_quiet_environment()     # as `finetune run` does first: before anything below imports bitsandbytes

import datasets  # noqa: E402, F401  (imported here, once, for every child)
import mlflow.store.db.utils  # noqa: E402, F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: E402, F401
import mlflow.tracking  # noqa: E402, F401
import peft  # noqa: E402, F401
import transformers  # noqa: E402, F401
import trl  # noqa: E402, F401

import finetune.estimate  # noqa: E402, F401
import finetune.track.tracking  # noqa: E402, F401
import finetune.train.trainer  # noqa: E402, F401
import inference.engine  # noqa: E402, F401
import inference.evaluate  # noqa: E402, F401
from finetune.cli import main  # noqa: E402
from finetune.train.checkpoints import MARK  # noqa: E402
from finetune.train.killpoints import ENV  # noqa: E402


def state(run_dir: Path) -> dict:
    info = run_dir / "run.json"
    status = json.loads(info.read_text(encoding="utf-8")).get("status") if info.is_file() else None
    found = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [p.name + ("+" if (p / MARK).is_file() else "") for p in found]   # "+": marked complete
    return {"status": status, "checkpoints": ckpts}


def run(plan: list[dict], run_dir: Path) -> list[dict]:
    results = []
    # What the imports made lives as long as this process: out of every child's garbage collections (a full one
    # walks ~700,000 objects, about 0.5 s) and their copy-on-write (Python's gc.freeze, for a parent about to fork).
    gc.freeze()
    for step in plan:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.environ.pop(ENV, None)
            if step.get("kill_at"):
                os.environ[ENV] = step["kill_at"]
            try:
                code = main(step["args"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:     # noqa: BLE001 - a child must never return into the parent's loop
                import traceback
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code or 0)
        started = time.monotonic()
        _, status = os.waitpid(pid, 0)
        results.append({"code": os.waitstatus_to_exitcode(status), "seconds": round(time.monotonic() - started, 2),
                        **state(run_dir)})
    return results


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(json.dumps(run(json.load(f), Path(sys.argv[2]))), flush=True)
