"""Crash safety under signals: SIGTERM from outside stops a training run as Ctrl-C does, at the end of the step in
progress with a complete checkpoint, recorded as interrupted, with the way to go on. (tests/test_kill_points.py
resumes such a stop to the uninterrupted result.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import CLI_TIMEOUT_S, REPO

from finetune.train import checkpoints


def test_sigterm_during_training_records_the_stop_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = ["recipes/tiny-cpu.yaml", f"output.dir={out}", "tracking.mlflow=false", "evaluation.before_training=false",
            "train.logging_steps=1", "train.save_steps=1000"]
    proc = _training(args, out, lines=1)
    proc.send_signal(signal.SIGTERM)                  # training, a few steps in
    stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert "--resume" in stderr and str(out) in stderr          # the command to continue, with its overrides
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and "Terminated" in info["error"]
    # the step in progress finished and was saved, complete, before the exit
    saved = re.search(r"stopped by SIGTERM \(checkpoint-(\d+) saved\)", stderr)
    assert saved, stderr[-2000:]
    checkpoint = out / f"checkpoints/checkpoint-{saved.group(1)}"
    assert checkpoints.why_unusable(checkpoint) is None and (checkpoint / "adapter_model.safetensors").is_file()
    # quiet where nothing is wrong: no library notice a user cannot act on (bitsandbytes' hub kernel, offline)
    assert "kernels-community" not in stderr and "Warning" not in stderr, stderr[-2000:]


def _training(args: list[str], out, lines: int) -> subprocess.Popen:
    """``python -m finetune run ARGS``, returned once metrics.jsonl has ``lines`` lines (training is under way)."""
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "run", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + CLI_TIMEOUT_S
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= lines):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return proc


def test_a_second_signal_or_no_step_end_in_time_stops_at_once():
    """finetune.train.stopping with real signals, in this process: the first SIGTERM only asks for a stop at the end of
    the step; a second one raises at once; so does the first when no step ends within the wait."""
    import pytest

    from finetune.train import stopping
    from inference.errors import Terminated
    stop, before = stopping.Stop(), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), stopping.graceful(stop, wait_s=60, echo=lambda _: None):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM              # handled, nothing raised: the step goes on
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the second SIGTERM did not stop at once")
    assert signal.getsignal(signal.SIGTERM) is before                  # the handlers are put back
    stop, started = stopping.Stop(), time.monotonic()
    with pytest.raises(KeyboardInterrupt), stopping.graceful(stop, wait_s=0.3, echo=lambda _: None):
        os.kill(os.getpid(), signal.SIGINT)
        while time.monotonic() - started < 30:           # a step that never ends
            time.sleep(0.01)
    assert time.monotonic() - started < 10
    with pytest.raises(KeyboardInterrupt, match=r"stopped by Ctrl-C \(checkpoint-7 saved\)"):
        stop.raise_if_requested(7)
