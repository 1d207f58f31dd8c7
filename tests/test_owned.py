"""finetune.owned: output.overwrite removes what a run of this tool wrote, and nothing else."""

from __future__ import annotations

import json

import pytest

from finetune import owned
from finetune.train.pipeline import create_run_dir
from inference.errors import UserError


def _earlier_run(run_dir):
    """A run directory as an earlier run leaves it, plus files of the user's."""
    owned.claim(run_dir, "run", owned.RUN_ENTRIES)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    for name in ("run.json", "recipe.yaml", "metrics.jsonl"):
        (run_dir / name).write_text("{}\n")
    (run_dir / "notes.txt").write_text("mine\n")
    (run_dir / "data").mkdir()
    (run_dir / "data" / "train.jsonl").write_text("{}\n")


def test_overwrite_removes_the_earlier_runs_files_and_keeps_the_users(tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(run_dir)
    said = []
    create_run_dir(run_dir, resume=False, echo=said.append)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([owned.MARKER, "notes.txt", "data"])
    assert (run_dir / "data" / "train.jsonl").read_text() == "{}\n"
    assert owned.marker(run_dir)["kind"] == "run"            # claimed again for the new run
    assert "kept what it did not write: data, notes.txt" in said[0]


def test_a_folder_without_the_marker_is_never_emptied(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("model: {}\n")
    (folder / "run.json").write_text("{}\n")
    with pytest.raises(UserError, match="not a run directory this tool created"):
        owned.clear(folder, "run")
    with pytest.raises(UserError, match="not a sweep directory"):   # a run's marker does not make it a sweep
        _earlier_run(tmp_path / "run")
        owned.clear(tmp_path / "run", "sweep")
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml", "run.json"]


def test_a_marker_naming_paths_outside_its_directory_removes_nothing_there(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("also listed, inside: removed\n")
    (run_dir / owned.MARKER).write_text(json.dumps({"kind": "run", "entries": [
        "../precious.txt", str(outside), "sub/../../precious.txt", "precious.txt"]}))
    assert owned.clear(run_dir, "run") == []
    assert outside.read_text() == "keep\n"


def test_a_sweep_clears_its_child_runs_but_not_files_inside_them_it_did_not_write(tmp_path):
    sweep = tmp_path / "sweep"
    owned.claim(sweep, "sweep", owned.SWEEP_ENTRIES + ("lr-0.1",))
    (sweep / "sweep.json").write_text("{}\n")
    _earlier_run(sweep / "lr-0.1")
    left = owned.clear(sweep, "sweep")
    assert left == ["lr-0.1"] and sorted(p.name for p in (sweep / "lr-0.1").iterdir()) == ["data", "notes.txt"]


def test_resume_of_a_run_that_stopped_before_run_json_says_what_to_do(tmp_path, monkeypatch):
    from conftest import REPO

    from finetune.recipe import load_recipe
    from finetune.train.pipeline import check_run_dir
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(REPO / "recipes/tiny-cpu.yaml", [f"output.dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="holds no run to resume"):
        check_run_dir(recipe, resume=True)
    owned.claim(tmp_path / "run", "run", owned.RUN_ENTRIES)     # killed right after the directory was created
    (tmp_path / "run" / "recipe.yaml").write_text("{}\n")
    with pytest.raises(UserError, match="stopped before it had started training.*output.overwrite=true"):
        check_run_dir(recipe, resume=True)


def test_an_export_removes_work_left_by_killed_exports_only(tmp_path):
    """A SIGKILLed export leaves its ``.FORMAT.partial-PID-*`` work directory; the next export removes it, but not
    the work of an export still running, nor anything else in exports/."""
    import os
    import subprocess
    import sys

    from finetune.ship.export import clean_stale_partials
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    exports = tmp_path / "exports"
    for name in (f".peft.partial-{dead_pid}-abc", f".gguf.partial-{os.getpid()}-def", "peft", ".notes"):
        (exports / name).mkdir(parents=True)
        (exports / name / "f").write_text("x")
    said = []
    assert clean_stale_partials(exports, said.append) == [f".peft.partial-{dead_pid}-abc"]
    assert sorted(p.name for p in exports.iterdir()) == [f".gguf.partial-{os.getpid()}-def", ".notes", "peft"]
    assert "killed export" in said[0]
