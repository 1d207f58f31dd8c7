"""The data scientist's workflow: finetune.run from a notebook (nested MLflow runs, re-runs, the result object),
sweeps as child runs of one parent, compare from the MLflow store, the MLflow UI command."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, TRAIN_TIMEOUT_S, run, run_cli, wait_for

from inference.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def workdir(tmp_path: Path) -> Path:
    """A scratch working directory with the repo's recipes and data, as a user's checkout has them."""
    for name in ("recipes", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


# Short runs: 2 optimizer steps on the tiny model, no evaluation (these tests are about bookkeeping, not learning).
QUICK = {"train": {"max_steps": 2, "logging_steps": 1, "save_steps": 2}, "data": {"eval": None},
         "evaluation": {"before_training": False}}
QUICK_CLI = ["train.max_steps=2", "train.logging_steps=1", "train.save_steps=2", "data.eval=null",
             "evaluation.before_training=false"]


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def real_png(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG that matplotlib can read back."""
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # not a blank canvas
    return image.shape[:2]


# ---------------------------------------------------------------- Python API (what a notebook does)


def test_overrides_as_keyword_arguments_keep_their_types():
    from finetune import _override_list
    got = _override_list(["lora.r=4"], {"train": {"lr": 1e-4, "max_steps": 5}, "data": {"eval": None},
                                        "output": {"dir": "runs/a b-{n}"}, "tracking.mlflow": False})
    assert got == ["lora.r=4", "train.lr=0.0001", "train.max_steps=5", "data.eval=null",
                   'output.dir="runs/a b-{n}"', "tracking.mlflow=false"]


def test_recipe_object_overrides_are_validated_and_do_not_touch_the_original(tmp_path):
    import finetune
    from finetune.recipe import RecipeError
    recipe = finetune.load_recipe(REPO / "recipes/tiny-cpu.yaml")
    changed = finetune._recipe(recipe, (), {"lora": {"r": 4}})
    assert changed.lora.r == 4 and recipe.lora.r == 16
    with pytest.raises(RecipeError, match=r"lora\.r \(override 'lora\.r=0'\): must be >= 1"):
        finetune._recipe(recipe, (), {"lora": {"r": 0}})
    with pytest.raises(RecipeError, match="unknown key 'trian'"):
        finetune._recipe(recipe, (), {"trian": {"lr": 1e-3}})


def test_numbered_output_dirs_skip_used_ones(tmp_path, monkeypatch):
    from finetune.train.pipeline import numbered_dir
    monkeypatch.chdir(tmp_path)
    assert numbered_dir("runs/try-{n}") == "runs/try-1"
    (tmp_path / "runs/try-1").mkdir(parents=True)
    assert numbered_dir("runs/try-{n}") == "runs/try-1"  # empty: still free
    (tmp_path / "runs/try-1/run.json").write_text("{}")
    (tmp_path / "runs/try-2").mkdir()
    (tmp_path / "runs/try-2/x").write_text("")
    assert numbered_dir("runs/try-{n}") == "runs/try-3"


def readme_block(language: str, after: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.search(rf"```{language}\n(.*?)```", text[text.index(after):], re.S).group(1).strip()


@pytest.mark.slow
def test_readme_snippet_in_a_notebook_with_an_active_run_and_reruns(tmp_path, monkeypatch):
    """The README's Python snippet, as a notebook cell: an MLflow run is active, the cell runs twice, then a run
    into a fixed directory that already holds one. Our runs are children of the notebook's run, in its store and
    experiment; the notebook's MLflow state is as it was; the earlier run's files are untouched by the later cells."""
    import mlflow
    from mlflow.tracking import MlflowClient

    import finetune
    snippet = readme_block("python", "From Python (a notebook)")
    assert "finetune.run(" in snippet and '"runs/quick-{n}"' in snippet
    monkeypatch.chdir(workdir(tmp_path))
    store = f"sqlite:///{tmp_path / 'notebook.db'}"   # not the default mlflow.db: our run must follow the notebook
    previous_uri = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")     # set_tracking_uri also sets it; restored after the test
    mlflow.set_tracking_uri(store)
    try:
        experiment = mlflow.set_experiment("my-notebook")
        with mlflow.start_run(run_name="analysis") as outer:
            cell: dict = {}
            exec(snippet, cell)
            first = cell["result"]
            before = tree_digest(first.run_dir)
            second = finetune.run("recipes/tiny-cpu.yaml", output={"dir": "runs/quick-{n}"}, **QUICK)  # again
            with pytest.raises(UserError, match="already holds a run"):
                finetune.run("recipes/tiny-cpu.yaml", output={"dir": str(first.run_dir)}, **QUICK)
            assert mlflow.active_run().info.run_id == outer.info.run_id
            assert mlflow.tracking.fluent._get_experiment_id() == experiment.experiment_id
        client = MlflowClient(store)
        assert client.get_run(outer.info.run_id).info.status == "FINISHED"
    finally:
        mlflow.set_tracking_uri(previous_uri)

    assert (first.run_dir.name, second.run_dir.name) == ("quick-1", "quick-2")
    assert tree_digest(first.run_dir) == before
    assert not (tmp_path / "mlflow.db").exists()
    for result in (first, second):
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and run.info.experiment_id == experiment.experiment_id
        assert run.data.tags["mlflow.parentRunId"] == outer.info.run_id
        assert run.data.tags["run_dir"] == str(result.run_dir)
        assert result.tracking_uri == store and result.mlflow_run.info.run_id == result.run_id
    assert json.loads((first.run_dir / "run.json").read_text())["mlflow_run_id"] == first.run_id

    # the result object: history as a DataFrame (one row per logged step), the eval report, the adapter, a plot
    history = first.history
    assert list(history.index[history["loss"].notna()]) == [1, 20]  # logging_first_step, then every 20 steps
    # 20 steps x 8 examples: one epoch of 96 examples and part of the next
    per_epoch = first.stats["trained_tokens"]
    assert history.loc[20, "trained_tokens"] == first.trained_tokens
    assert per_epoch < first.trained_tokens < 2 * per_epoch
    assert history.loc[20, "train_runtime"] > 0  # the end-of-training log merged into the step's row
    report = json.loads((first.run_dir / "eval_report.json").read_text())
    assert first.eval_report == report and report["after"]["loss"] < report["before"]["loss"]
    assert (first.adapter_dir / "adapter_model.safetensors").is_file()
    first.plot(tmp_path / "loss.png")
    real_png(tmp_path / "loss.png")
    assert "quick-1" in repr(first) and first.run_id in repr(first)


# ---------------------------------------------------------------- sweep and compare (command line)


def test_sweep_grammar():
    from finetune.track.sweeps import parse_grid
    fixed, axes = parse_grid(["lora.r=8,16", "train.lr=1e-4,3e-4", "train.max_steps=5",
                              "lora.target_experts=[gate_up_proj,down_proj]", 'tracking.run_name="a,b"'])
    assert fixed == ["train.max_steps=5", "lora.target_experts=[gate_up_proj,down_proj]", 'tracking.run_name="a,b"']
    assert axes == [("lora.r", ["8", "16"]), ("train.lr", ["1e-4", "3e-4"])]
    with pytest.raises(UserError, match="repeated value"):
        parse_grid(["lora.r=8,8"])
    with pytest.raises(UserError, match="empty value"):
        parse_grid(["lora.r=8,"])


def test_sweep_plans_the_grid_in_order_with_one_directory_per_combination(tmp_path, monkeypatch):
    from finetune.recipe import load_recipe
    from finetune.track.sweeps import plan
    monkeypatch.chdir(workdir(tmp_path))
    (tmp_path / "runs/g-1").mkdir(parents=True)
    (tmp_path / "runs/g-1/sweep.json").write_text("{}")
    recipe = load_recipe("recipes/tiny-cpu.yaml", ["output.dir=runs/g-{n}"])
    sweep_dir, children = plan(recipe, [("lora.r", ["8", "16"]), ("train.lr", ["1e-3", "3e-3"]),
                                        ("harmony.reasoning_effort", ["low", "high"])])
    assert sweep_dir == tmp_path / "runs/g-2"
    assert len(children) == 8 and children[0].name == "1-r-8_lr-1e-3_reasoning_effort-low"
    assert [(c.recipe.lora.r, c.recipe.train.lr, c.recipe.harmony.reasoning_effort) for c in children[:3]] == [
        (8, 1e-3, "low"), (8, 1e-3, "high"), (8, 3e-3, "low")]
    assert children[-1].recipe.output.dir == "runs/g-2/8-r-16_lr-3e-3_reasoning_effort-high"
    assert children[-1].recipe.tracking.run_name == children[-1].name
    assert recipe.lora.r == 16  # the base recipe is untouched


def test_sweep_refuses_invalid_combinations_before_training(tmp_path):
    work = workdir(tmp_path)
    proc = run_cli("finetune", "sweep", "recipes/tiny-cpu.yaml", "lora.r=4,0", "train.lr=1e-3,-1",
                   "output.dir=runs/bad", cwd=work)
    assert proc.returncode == 2
    assert "3 of 4 sweep combinations are invalid" in proc.stderr
    assert "lora.r=0 train.lr=1e-3: lora.r (override 'lora.r=0'): must be >= 1" in proc.stderr
    assert not (work / "runs").exists() and not (work / "mlflow.db").exists()
    proc = run_cli("finetune", "sweep", "recipes/tiny-cpu.yaml", "train.lr=1e-3", cwd=work)
    assert proc.returncode == 2 and "at least one axis" in proc.stderr
    proc = run_cli("finetune", "sweep", "recipes/tiny-cpu.yaml", "lora.r=8,16", "--sort", "accuracy", cwd=work)
    assert proc.returncode == 2 and "--sort 'accuracy': not a metric column or recipe key" in proc.stderr
    assert not (work / "runs").exists() and not (work / "mlflow.db").exists()


@pytest.mark.slow
def test_readme_sweep_runs_children_of_one_parent_and_compare_reads_them_back(tmp_path):
    """The README's sweep command (shortened by overrides appended to it: later overrides win), then compare."""
    from mlflow.tracking import MlflowClient
    work = workdir(tmp_path)
    command = readme_block("bash", "A sweep is the `run` command").split()
    assert command[:4] == ["python", "-m", "finetune", "sweep"]
    proc = run_cli(*command[2:], *QUICK_CLI, "--sort", "train_loss", cwd=work, timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads((work / "runs/sweep-1/sweep.json").read_text())
    assert sweep["status"] == "completed" and sweep["grid"] == {"lora.r": ["8", "16"]}
    names = ["1-r-8", "2-r-16"]
    assert [(r["name"], r["status"]) for r in sweep["runs"]] == [(n, "completed") for n in names]

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    parent = client.get_run(sweep["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["finetune.kind"] == "sweep"
    assert parent.data.params["sweep.lora.r"] == "8,16" and parent.data.params["sweep.size"] == "2"
    children = [client.get_run(r["run_id"]) for r in sweep["runs"]]
    for child, r in zip(children, ["8", "16"]):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.experiment_id == parent.info.experiment_id
        assert child.info.status == "FINISHED" and child.data.params["lora.r"] == r
        assert child.data.params["train.max_steps"] == "2"  # the appended override won over the README's 60
        assert (Path(child.data.tags["run_dir"]) / "adapter/adapter_model.safetensors").is_file()
    by_loss = sorted(children, key=lambda c: c.data.metrics["train_loss"])
    assert parent.data.tags["sweep.best_run_id"] == by_loss[0].info.run_id
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.json", "comparison.txt",
                                                                              "loss-curves.png"}

    # compare: by the parent run id (its children), as a sorted table, a PNG and a CSV
    proc = run_cli("finetune", "compare", parent.info.run_id, "--sort", "train_loss", "--plot", "curves.png",
                   "--csv", "runs.csv", cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "status", "lora.r", "train.lr"] and "exports" in header
    rows = [ln.split() for ln in lines[2:2 + len(names)]]
    assert lines[2 + len(names)] == "loss curves: curves.png"
    assert [r[0] for r in rows] == [c.info.run_name for c in by_loss]
    col = header.index("train_loss")
    assert [float(r[col]) for r in rows] == [round(c.data.metrics["train_loss"], 4) for c in by_loss]
    assert rows[0][header.index("trained_tokens")] == f"{int(by_loss[0].data.metrics['trained_tokens']):,}"
    real_png(work / "curves.png")
    import pandas as pd
    table = pd.read_csv(work / "runs.csv")
    assert list(table["run_id"]) == [c.info.run_id for c in by_loss] and list(table["lora.r"]) == [
        int(c.data.params["lora.r"]) for c in by_loss]

    # From Python: the same runs by experiment name, largest first when asked; bad targets are one clear error
    import finetune
    store = f"sqlite:///{work / 'mlflow.db'}"
    ranked = list(finetune.compare("tiny-cpu", uri=store, sort="lora.r", descending=True).table["run"])
    assert ranked == ["2-r-16", "1-r-8"]
    with pytest.raises(UserError, match="neither a run id nor an experiment .*tiny-cpu"):
        finetune.compare("no-such-experiment", uri=store)
    with pytest.raises(UserError, match="no MLflow store"):
        finetune.compare(uri=f"sqlite:///{work / 'missing.db'}")
    assert not (work / "missing.db").exists()


# ---------------------------------------------------------------- the MLflow UI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_command_serves_the_projects_store_on_localhost(tmp_path):
    from mlflow.tracking import MlflowClient
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "`python -m finetune ui`" in readme
    proc = run_cli("finetune", "ui", cwd=tmp_path)
    assert proc.returncode == 2 and "no MLflow store" in proc.stderr and not (tmp_path / "mlflow.db").exists()

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("team-experiment")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "finetune", "ui", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10"
        # polls up to conftest.SERVER_START_S: MLflow's server and its workers start slowly on a busy machine
        body = wait_for(lambda: json.loads(urllib.request.urlopen(url, timeout=60).read()), server, "finetune ui",
                        group=True)
        assert "team-experiment" in {e["name"] for e in body["experiments"]}
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).status == 200
        listening = run(["ss", "-ltnH", f"sport = :{port}"]).stdout
        addresses = set(re.findall(r"(\S+):%d\b" % port, listening))
        assert addresses and addresses <= {"127.0.0.1"}, listening
        server.send_signal(signal.SIGTERM)       # to `finetune ui` alone: it must stop MLflow's server and workers
        output = server.communicate(timeout=60)[0]
        assert server.returncode == 143 and "terminated (SIGTERM)" in output, output[-2000:]
        deadline = time.monotonic() + 30
        while run(["ss", "-ltnH", f"sport = :{port}"]).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not run(["ss", "-ltnH", f"sport = :{port}"]).stdout.strip()   # nothing holds the port any more
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 9)
        # MLflow's server runs in a process group of its own: whatever still listens on the port, if this failed
        for pid in re.findall(r"pid=(\d+)", run(["ss", "-ltnpH", f"sport = :{port}"]).stdout):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(int(pid)), 9)
        server.communicate(timeout=120)


def test_the_collector_pause_restores_what_was_there_even_on_error():
    """Loading the tokenizer pauses Python's garbage collector (finetune.train.pipeline): afterwards it is as before,
    on (the usual case) or off (a user who turned it off), also when loading fails."""
    import gc

    from finetune.train.pipeline import _collector_paused
    was = gc.isenabled()
    try:
        for before in (True, False):
            (gc.enable if before else gc.disable)()
            with _collector_paused():
                assert not gc.isenabled()
            assert gc.isenabled() is before
            with pytest.raises(OSError), _collector_paused():
                raise OSError("tokenizer.json unreadable")
            assert gc.isenabled() is before
    finally:
        (gc.enable if was else gc.disable)()
