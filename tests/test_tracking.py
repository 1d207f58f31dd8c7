"""Tracking: where runs go, and that our run nests inside one already active (a notebook's)."""

import json

from finetune.track import tracking


def test_tracking_uri_precedence_and_absolute_sqlite_paths(monkeypatch, tmp_path):
    # Relative sqlite paths become absolute, so run.json's URI finds the store from any working directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking.tracking_uri(None) == f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert tracking.tracking_uri("sqlite:///recipe.db") == f"sqlite:///{tmp_path / 'recipe.db'}"
    assert tracking.tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert tracking.tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_disabled_tracking_is_a_no_op(tmp_path, monkeypatch):
    """Disabled, nothing reaches MLflow: no run, no store created (neither the default ./mlflow.db nor the one the
    environment names), and a notebook's active run is left alone."""
    import mlflow
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    t = tracking.start(False, None, "x", "y")
    t.log_params({"a": 1})
    t.log_metrics({"loss": 1.0}, step=1)
    t.set_tags({"k": "v"})
    t.close()
    assert t.run_id is None and mlflow.active_run() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_nested_under_an_active_run_and_logs_for_real(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # set_tracking_uri also sets it; restored after the test
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("outer")
    with mlflow.start_run() as outer:
        t = tracking.start(True, uri, "inner", "child")
        t.log_params({"train.lr": "0.001"})
        t.log_metrics({"loss": 2.0, "skipped": float("nan")}, step=3)
        t.set_tags({"k": "v"})
        t.close()
        assert mlflow.active_run().info.run_id == outer.info.run_id  # the notebook's run is still the active one
    mlflow.set_tracking_uri(previous)
    run = MlflowClient(uri).get_run(t.run_id)
    assert run.data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert run.info.experiment_id == outer.info.experiment_id  # shown under its parent in the UI
    assert run.data.params == {"train.lr": "0.001"} and run.data.metrics == {"loss": 2.0}
    assert run.data.tags["k"] == "v" and run.info.status == "FINISHED"


def test_a_tracking_uri_with_a_password_is_refused_wherever_it_comes_from(monkeypatch):
    import pytest

    from finetune.recipe import load_recipe
    from inference.errors import UserError
    secret = "https://bob:hunter2@mlflow.example.com"
    with pytest.raises(UserError, match="holds a password") as refused:
        load_recipe("recipes/tiny-cpu.yaml", [f"tracking.tracking_uri={secret}"])
    assert "hunter2" not in str(refused.value)                          # not even in the error
    monkeypatch.setenv("MLFLOW_TRACKING_URI", secret)
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI: the tracking URI holds a password") as refused:
        tracking.tracking_uri(None)
    assert "hunter2" not in str(refused.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob@mlflow.example.com")   # a user name alone is no secret
    assert tracking.tracking_uri(None) == "https://bob@mlflow.example.com"


def test_tracking_log_chooses_what_leaves_the_run_directory(tmp_path):
    """``tracking.log=[]``: MLflow gets the metrics and nothing else (no params, lineage tags, files, adapter);
    the default sends all of it, the evaluation report (held-out answers) included."""
    from conftest import REPO
    from mlflow.tracking import MlflowClient

    import finetune
    from finetune.recipe import load_recipe
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    runs = {}
    for name, log in (("none", "[]"), ("all", None)):
        overrides = [f"output.dir={tmp_path / name}", f"tracking.tracking_uri={uri}", "train.max_steps=2",
                     "train.save_steps=2", "train.logging_steps=1", "train.batch_size=2", "data.eval=null"]
        overrides += [f"tracking.log={log}"] if log else []
        runs[name] = finetune.run(load_recipe(REPO / "recipes/tiny-cpu.yaml", overrides))
    client = MlflowClient(uri)
    quiet, full = (client.get_run(runs[n].mlflow_run_id) for n in ("none", "all"))
    assert quiet.data.metrics and not quiet.data.params
    # the losses MLflow holds (train_loss) are the ones the run recorded (metrics.jsonl's loss), step for step, with
    # tracking.log=[] too
    for name, run in (("none", quiet), ("all", full)):
        recorded = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        sent = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
        assert len(sent) == 2 and sent == {r["step"]: r["loss"] for r in recorded if "loss" in r}
    assert not [k for k in quiet.data.tags if not k.startswith(("mlflow.", "finetune."))]
    assert client.list_artifacts(quiet.info.run_id) == []
    assert full.data.params and "run_dir" in full.data.tags
    assert {"adapter", "eval_report.json", "recipe.yaml", "run.json", "metrics.jsonl", "coverage.json"} <= \
        {a.path for a in client.list_artifacts(full.info.run_id)}
