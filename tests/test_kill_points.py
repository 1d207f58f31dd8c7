"""A training run killed (SIGKILL) at 17 moments, six of them inside a checkpoint save, and stopped once by
SIGTERM, then resumed each time, ends exactly where the uninterrupted run ends: the same adapter bytes, losses,
trained tokens, evaluation, and one MLflow run. See finetune/train/killpoints.py for the moments and
finetune/train/checkpoints.py for why it holds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from conftest import REPO

from finetune.train.checkpoints import MARK
from finetune.train.killpoints import POINTS

pytestmark = pytest.mark.slow   # trains or runs whole commands: left out of the quick loop (-m "not slow")

# max_steps 6, a checkpoint every 2 steps, one kept: rotation is exercised on every save.
OVERRIDES = ["train.max_steps=6", "train.batch_size=4", "train.save_steps=2", "train.save_total_limit=1",
             "train.logging_steps=1", "train.eval_steps=null", "evaluation.max_examples=4",
             "evaluation.max_new_tokens=4"]

# Each process resumes what the one before it left; NAME#N is the N-th time that process reaches NAME. ":TERM": a
# SIGTERM there instead of a SIGKILL, which stops the run at the end of that step with a checkpoint.
KILLS = [
    "eval-before",        # before anything was trained
    "step:TERM",          # SIGTERM after step 1: checkpoint-1 saved, run marked interrupted, exit 143
    "step",               # step 2 done, no checkpoint of it yet: resume from checkpoint-1
    "save:begin",         # checkpoint-2, inside its save ...
    "save:adapter",
    "save:optimizer",
    "save:state",         # ... everything of the Trainer's written, not marked complete
    "save:marked",        # checkpoint-2 complete
    "save:state",         # checkpoint-4 unmarked, checkpoint-2 still there (resume from it)
    "step#2",             # from checkpoint-2: steps 3 and 4 done, checkpoint-4 not yet saved again
    "save:marked",        # checkpoint-4 complete, checkpoint-2 not yet rotated out
    "step",               # step 5
    "save:adapter",       # checkpoint-6 (the last step) half-written
    "save:marked",        # checkpoint-6 complete: training is over
    "train-end",          # resumed at the last step: not trained again
    "adapter:written",
    "eval-after",
    "record",
]


def _plan(recipe_args: list[str]) -> list[dict]:
    plan = [{"args": ["run", *recipe_args], "kill_at": KILLS[0]}]
    plan += [{"args": ["run", *recipe_args, "--resume"], "kill_at": k} for k in KILLS[1:]]
    # the last resume finishes the run; one more is refused: the run is complete
    return plan + [{"args": ["run", *recipe_args, "--resume"], "kill_at": None}] * 2


def _run(plan: list[dict], tmp_path, name: str) -> tuple[list[dict], str]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, str(REPO / "tests/crash_runner.py"), str(path), str(tmp_path / name)],
                          cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: r[k] for k in ("step", "loss", "trained_tokens") if k in r} for r in rows if "loss" in r]


def test_a_run_killed_at_every_point_resumes_to_the_uninterrupted_result(tmp_path):
    assert {k.removesuffix(":TERM").partition("#")[0] for k in KILLS} == set(POINTS)   # every point exercised
    inside_saves = [k for k in KILLS if k.split("#")[0] in ("save:begin", "save:adapter", "save:optimizer",
                                                            "save:state")]
    assert len(KILLS) >= 15 and len(inside_saves) >= 5
    evals = tmp_path / "eval.jsonl"     # a few held-out conversations: evaluation runs in every process
    evals.write_text("".join((REPO / "data/tiny/eval.jsonl").read_text().splitlines(keepends=True)[:4]))
    args = {}
    for name in ("whole", "killed"):
        store = tmp_path / f"{name}.db"
        args[name] = ["recipes/tiny-cpu.yaml", f"output.dir={tmp_path / name}", f"tracking.tracking_uri=sqlite:///{store}",
                      f"tracking.experiment=kills-{name}", f"data.eval={evals}", *OVERRIDES]
    (whole_result,), _ = _run([{"args": ["run", *args["whole"]], "kill_at": None}], tmp_path, "whole")
    assert whole_result["code"] == 0
    results, log = _run(_plan(args["killed"]), tmp_path, "killed")
    codes = [r["code"] for r in results]
    expected = [143 if k.endswith(":TERM") else -signal.SIGKILL for k in KILLS] + [0, 2]
    assert codes == expected, log[-4000:]          # each kill landed where it was meant to; the last run finished
    assert "finished (run.json: completed, adapter saved); there is nothing to resume" in log
    assert log.count("killed at ") == len(KILLS) - 1
    assert "skipping" in log and "incomplete" in log                      # half-saved checkpoints were passed over
    assert "their SHA-256 match" in log                                    # and resume says it checked the others
    # the SIGTERM: a complete checkpoint of the step it arrived in, the run marked interrupted, the way on printed
    termed = results[KILLS.index("step:TERM")]
    assert termed["status"] == "interrupted" and termed["checkpoints"] == ["checkpoint-1+"], termed
    assert "stopped by SIGTERM (checkpoint-1 saved)" in log and "--resume" in log

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert (killed / "adapter/adapter_model.safetensors").read_bytes() == \
        (whole / "adapter/adapter_model.safetensors").read_bytes()
    assert _metrics(killed) == _metrics(whole) and [m["step"] for m in _metrics(killed)] == list(range(1, 7))
    info, reference = (json.loads((d / "run.json").read_text()) for d in (killed, whole))
    assert info["status"] == "completed" and info["trained_tokens"] == reference["trained_tokens"] > 0
    assert json.loads((killed / "eval_report.json").read_text()) == json.loads((whole / "eval_report.json").read_text())
    # rotation kept one complete checkpoint, no incomplete ones, and no tokenizer copies
    kept = sorted(p.name for p in (killed / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-6"] and (killed / "checkpoints/checkpoint-6" / MARK).is_file()
    assert not list((killed / "checkpoints").rglob("tokenizer*"))

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'killed.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kills-killed").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"          # one run, continued each time
    assert runs[0].info.run_id == info["mlflow_run_id"]


def test_resume_forgets_steps_after_the_checkpoint_and_a_line_cut_short(tmp_path):
    """A kill while a metrics line was appended leaves half a line: resume drops it with the replayed steps."""
    from finetune.train.pipeline import _trim_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    _trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n'
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
