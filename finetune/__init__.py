"""LoRA fine-tuning of gpt-oss from YAML recipes: ``python -m finetune run recipe.yaml`` or, from Python::

    import finetune
    result = finetune.run("recipes/tiny-cpu.yaml", train={"max_steps": 50}, output={"dir": "runs/try-{n}"})
    result.history                              # logged metrics as a DataFrame; result.plot() draws the loss
    sweep = finetune.sweep("recipes/tiny-cpu.yaml", {"lora.r": [8, 16], "train.lr": [1e-3, 3e-3]})
    table = finetune.compare(sweep.parent_run_id)   # or an experiment name, or run ids
    finetune.export(table.best()["run_dir"], "merged-mxfp4")  # or "peft", "merged-bf16", "gguf", "gguf-lora", ...

Overrides are keyword arguments, one per recipe section (``train={"lr": 1e-4}``), or dotted keys
(``**{"train.lr": 1e-4}``), or ``key=value`` strings as on the command line (``overrides=["train.lr=1e-4"]``).
Heavy libraries load only when a run starts.

The package is the training side, a folder per stage of a run: ``recipe`` (the schema), ``data``, ``model``,
``kernels`` (training's kernels with their backward passes), ``train``, ``track``, ``ship``; ``estimate`` and
``cli`` beside them. May import ``inference`` (never the other way), trl, peft, transformers, accelerate, datasets,
bitsandbytes, and mlflow in ``finetune.track.tracking`` only.
"""

from __future__ import annotations

import json
from pathlib import Path


def _override_list(overrides, sections: dict) -> list[str]:
    """Command-line style ``key=value`` strings from ``overrides`` and keyword arguments (values as JSON, which
    the recipe loader reads as YAML, so types survive)."""
    out = [overrides] if isinstance(overrides, str) else list(overrides)

    def add(key, value):
        if isinstance(value, dict) and value:
            for sub, v in value.items():
                add(f"{key}.{sub}", v)
        else:
            out.append(f"{key}={json.dumps(value)}")

    for key, value in sections.items():
        add(key, value)
    return out


def _recipe(recipe, overrides=(), sections=None):
    from finetune.recipe import Recipe, apply_overrides
    overrides = _override_list(overrides, sections or {})
    if isinstance(recipe, Recipe):
        return apply_overrides(recipe, overrides) if overrides else recipe
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    raise TypeError(f"recipe must be a path or a finetune.recipe.Recipe, not {type(recipe).__name__}")


def load_recipe(path, overrides=()):
    """Read and validate a recipe (see :mod:`finetune.recipe`)."""
    from finetune.recipe import load_recipe as _load
    return _load(path, list(overrides))


def run(recipe, overrides=(), resume: bool = False, keep_model: bool = False, **sections):
    """Run a recipe (a path or a :class:`finetune.recipe.Recipe`, which is not modified); returns a
    :class:`finetune.train.pipeline.RunResult` (run id, run dir, ``history`` DataFrame, ``eval_report``, adapter path,
    ``mlflow_run``).

    In a notebook: a progress bar with the loss on it instead of a line per logged step; nested under the notebook's
    active MLflow run, if any. ``output={"dir": "runs/try-{n}"}`` gives each re-run of a cell its own directory
    (a fixed directory that already holds a run is refused, never overwritten, unless ``output.overwrite`` is set).
    ``keep_model=True`` keeps the trained PEFT model in memory as ``result.model`` (by default it is freed).
    """
    from finetune.train.pipeline import run as _run
    return _run(_recipe(recipe, overrides, sections), resume=resume, keep_model=keep_model)


def sweep(recipe, grid: dict, overrides=(), sort: str = "eval_loss", **sections):
    """Train every combination of ``grid`` (``{"lora.r": [8, 16], "train.lr": [1e-4, 3e-4]}``) as child runs of one
    MLflow parent run; returns a :class:`finetune.track.sweeps.SweepResult` with the comparison sorted by ``sort``.
    Sweep runs go into ``output.dir/NN-...`` (use ``{n}`` in output.dir for a new sweep directory each time)."""
    from finetune.track.sweeps import grid_from_dict
    from finetune.track.sweeps import sweep as _sweep
    return _sweep(_recipe(recipe, overrides, sections), grid_from_dict(grid), sort=sort)


def compare(targets=None, uri: str | None = None, sort: str = "eval_loss", descending: bool | None = None,
            plot=None, max_runs: int = 100):
    """Compare runs from the MLflow store: ``targets`` are run ids, sweep parent run ids or experiment names (none:
    all training runs). Returns a :class:`finetune.track.comparison.Comparison` (``table`` DataFrame, ``figure``,
    ``best()``); ``plot`` saves the loss curves as PNG there."""
    from finetune.track.comparison import compare as _compare
    return _compare(targets, uri=uri, sort=sort, descending=descending, plot=plot, max_runs=max_runs)


def export(run, to: str, out=None, force: bool = False, **options):
    """Export a run (its directory or the result of :func:`run`) as ``to``, parity-checked; returns a
    :class:`finetune.ship.ExportResult`. See :func:`finetune.ship.export` for the options."""
    from finetune.ship import export as _export
    return _export(run, to, out=out, force=force, **options)
