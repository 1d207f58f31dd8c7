"""The notebooks in notebooks/, executed top to bottom in a real Jupyter kernel (nbclient) on the tiny model, with
the settings they ship (their ``parameters`` cells are the quick ones: each notebook takes under a minute on 2 cores).

Each runs in a scratch copy of the layout it expects (notebooks/, recipes/, data/), so runs/ and mlflow.db land
there. What the notebooks produced is then checked from outside: files, the MLflow store, and the cells' outputs.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, SERVER_START_S, TRAIN_TIMEOUT_S
from nbclient import NotebookClient

pytestmark = pytest.mark.slow   # trains or runs whole commands: left out of the quick loop (-m "not slow")

NOTEBOOKS = REPO / "notebooks"
SHIPPED = ("01-quickstart.ipynb", "02-data.ipynb", "03-compare-runs.ipynb")


def test_notebooks_are_stored_without_outputs():
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(SHIPPED)
    for name in found:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name


def execute(name: str, tmp_path: Path, monkeypatch) -> tuple[Path, nbformat.NotebookNode]:
    work = tmp_path / "project"
    (work / "notebooks").mkdir(parents=True)
    for sub in ("recipes", "data"):
        (work / sub).symlink_to(REPO / sub)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The kernel inherits this environment: the project importable, the default MLflow store (./mlflow.db).
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # A cell that trains may take minutes on a busy machine, and so may starting the kernel: generous limits, each
    # still failing a hung cell or kernel. The cell's last outputs may also arrive well after its reply there; by
    # default nbclient waits 4 s for them and then drops them silently, so it waits as long as for a kernel start
    # (and fails loudly past that).
    NotebookClient(nb, timeout=TRAIN_TIMEOUT_S, startup_timeout=SERVER_START_S, iopub_timeout=SERVER_START_S,
                   raise_on_iopub_timeout=True, kernel_name="python3",
                   resources={"metadata": {"path": str(work / "notebooks")}}).execute()
    return work, nb


def outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text_of(nb) -> str:
    parts = []
    for o in outputs(nb):
        parts.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def images(nb) -> list[bytes]:
    return [base64.b64decode(o["data"]["image/png"]) for o in outputs(nb) if "image/png" in o.get("data", {})]


def test_quickstart(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    work, nb = execute("01-quickstart.ipynb", tmp_path, monkeypatch)
    run_dir = work / "runs/quickstart-1"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed"
    run = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    report = json.loads((run_dir / "eval_report.json").read_text())
    assert report["after"]["loss"] < 3 < report["before"]["loss"]   # 60 steps: the model has clearly learned
    text = text_of(nb)
    assert "RunResult(run_dir=" in text and info["mlflow_run_id"] in text
    # the training bar is a notebook widget, and no line per logged step was printed
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs(nb))
    assert "step   20/60  loss" not in text
    assert len(images(nb)) == 1 and images(nb)[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert "base model:" in text and "quickstart:" in text and "thinking:" in text
    assert "dataset_fingerprint" in text and "lora.coverage.experts" in text


def test_data(tmp_path, monkeypatch):
    from finetune.data.prepare import preview_examples
    from finetune.recipe import load_recipe
    work, nb = execute("02-data.ipynb", tmp_path, monkeypatch)
    html = "\n".join(o["data"]["text/html"] for o in outputs(nb) if "text/html" in o.get("data", {}))
    # the highlighted rendering: final answers, reasoning and tool calls each in their colour
    for kind in ("final", "analysis", "tool_call"):
        assert f'title="{kind}"' in html, kind
    assert "&lt;|start|&gt;" in html and "&lt;|message|&gt;" in html  # Harmony's tokens escaped, not eaten as tags
    recipe = load_recipe(REPO / "recipes/tiny-cpu.yaml", [f"data.train={REPO / 'data/sample/chat.jsonl'}",
                                                          "data.eval=null"])
    text = text_of(nb)
    assert repr(preview_examples(recipe, n=3)) in text  # the same examples and per-channel counts as the library


def test_compare_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    work, nb = execute("03-compare-runs.ipynb", tmp_path, monkeypatch)
    sweep = json.loads((work / "runs/sweep-1/sweep.json").read_text())
    assert sweep["status"] == "completed" and len(sweep["runs"]) == 2
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    children = [client.get_run(r["run_id"]) for r in sweep["runs"]]
    assert all(c.data.tags["mlflow.parentRunId"] == sweep["mlflow_run_id"] for c in children)
    best = min(children, key=lambda c: c.data.metrics["eval.loss"])
    # the best run was exported, passed its parity checks, and MLflow knows
    parity = json.loads((Path(best.data.tags["run_dir"]) / "exports/peft/parity.json").read_text())
    assert parity["passed"] is True
    assert client.get_run(best.info.run_id).data.tags["export.peft.parity"] == "passed"
    assert (work / "runs/sweep-1/compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(images(nb)) == 1
    text = text_of(nb)
    assert f"best: {best.info.run_name}" in text and "PASS" in text and "peft passed" in text


@pytest.fixture(autouse=True)
def _no_stray_store():
    """Notebooks run in their scratch copy; nothing may land in the checkout."""
    before = (REPO / "mlflow.db").exists()
    yield
    assert (REPO / "mlflow.db").exists() == before
