"""Crash safety under signals: SIGTERM stops a training run as Ctrl-C does, recorded, with the way to go on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import CLI_TIMEOUT_S, REPO


def test_sigterm_during_training_records_the_stop_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = ["recipes/tiny-cpu.yaml", f"output.dir={out}", "tracking.mlflow=false", "evaluation.before_training=false",
            "train.logging_steps=1", "train.save_steps=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "run", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + CLI_TIMEOUT_S
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)                  # training, a few steps in
    stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 143, stderr[-2000:]
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert "--resume" in stderr and str(out) in stderr          # the command to continue, with its overrides
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "Terminated" in info["error"]
