"""Grid sweeps: ``python -m finetune sweep recipe.yaml lora.r=8,16 train.lr=1e-4,3e-4``.

An override whose value has commas outside brackets and quotes is a sweep axis (``lora.r=8,16``); the rest apply to
every run (``lora.target_experts=[gate_up_proj,down_proj]`` is one value). Every combination is validated before
anything trains. One MLflow parent run holds the grid; each combination is a child run (its own run directory under
the sweep's ``output.dir``). A failed combination is recorded and the sweep goes on (``SweepResult.failed``; the
command exits non-zero if any failed). The sweep directory gets ``sweep.json`` (the grid and each child's status),
and the parent run gets the comparison table, the loss curves and the best run.
"""

from __future__ import annotations

import gc
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import owned
from finetune.recipe import Recipe, apply_overrides, dump_recipe, flatten, recipe_to_dict, resolve_path
from inference.errors import UserError


@dataclass
class SweepResult:
    """The parent MLflow run, the sweep directory, each child (``runs``: dicts with name, overrides, status,
    run_dir, run_id, error) and the comparison of the finished ones."""

    sweep_dir: Path
    parent_run_id: str | None
    runs: list[dict] = field(default_factory=list)
    comparison: object = None     # finetune.track.comparison.Comparison, or None when tracking is off

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.runs if r["status"] != "completed"]


def split_value(text: str) -> list[str]:
    """Split an override's value at commas outside [], {} and quotes."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    return parts + [current]


def parse_grid(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(overrides for every run, axes as (key, [value texts])) in the order given."""
    fixed, axes = [], []
    for override in overrides:
        key, eq, value = override.partition("=")
        values = split_value(value) if eq else [value]
        if len(values) == 1:
            fixed.append(override)
            continue
        key = key.strip()
        if any(not v.strip() for v in values):
            raise UserError(f"sweep axis {override!r}: empty value in the list")
        if len(set(values)) != len(values):
            raise UserError(f"sweep axis {override!r}: repeated value")
        if key in (k for k, _ in axes):
            raise UserError(f"sweep axis {key!r} given twice")
        axes.append((key, [v.strip() for v in values]))
    return fixed, axes


def grid_from_dict(grid: dict) -> list[tuple[str, list[str]]]:
    """``{"lora.r": [8, 16]}`` (Python values) -> axes of override texts."""
    axes = []
    for key, values in grid.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise UserError(f"sweep axis {key!r}: no values")
        axes.append((key, [json.dumps(v) for v in values]))
    return axes


def _label(key: str, value: str) -> str:
    short = key.rsplit(".", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{short}-{value.strip(chr(34))}").strip("_")


@dataclass
class _Child:
    name: str
    overrides: list[str]
    recipe: Recipe


def plan(recipe: Recipe, axes: list[tuple[str, list[str]]]) -> tuple[Path, list[_Child]]:
    """The sweep directory and one validated recipe per combination (all problems reported at once)."""
    from finetune.train.pipeline import NUMBER, numbered_dir
    if not axes:
        raise UserError("a sweep needs at least one axis: an override with several comma-separated values, "
                        "e.g. lora.r=8,16 train.lr=1e-4,3e-4")
    for key, _ in axes:
        if key.startswith(("output.", "tracking.")):
            raise UserError(f"sweep axis {key!r}: output and tracking settings are the same for the whole sweep")
    base_dir = recipe.output.dir
    if NUMBER in base_dir:
        base_dir = numbered_dir(base_dir)
    sweep_dir = resolve_path(None, base_dir)
    combos = list(itertools.product(*[[(k, v) for v in values] for k, values in axes]))
    width = len(str(len(combos)))
    children, problems = [], []
    for i, combo in enumerate(combos, 1):
        name = f"{i:0{width}d}-" + "_".join(_label(k, v) for k, v in combo)
        overrides = [f"{k}={v}" for k, v in combo]
        try:
            child = apply_overrides(recipe, overrides + [f"output.dir={json.dumps(str(Path(base_dir) / name))}",
                                                         f"tracking.run_name={json.dumps(name)}"])
        except UserError as exc:
            problems.append(f"{' '.join(overrides)}: {str(exc).removeprefix('recipe: ')}")
            continue
        children.append(_Child(name, overrides, child))
    if problems:
        raise UserError(f"{len(problems)} of {len(combos)} sweep combinations are invalid:\n"
                        + "\n".join(f"  {p}" for p in problems))
    return sweep_dir, children


def _check_sweep_dir(sweep_dir: Path, overwrite: bool) -> None:
    if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        if not overwrite:
            raise UserError(f"output.dir: {sweep_dir} is not empty; choose another output.dir (runs/NAME-{{n}} picks "
                            "a new one each time) or pass output.overwrite=true to replace an earlier sweep")
        mark = owned.marker(sweep_dir) if sweep_dir.is_dir() else None
        if mark is None or mark.get("kind") != "sweep":
            raise UserError(f"output.dir: {sweep_dir} is not empty and is not a sweep directory this tool created "
                            f"(no {owned.MARKER}); refusing to delete anything in it")


def sweep(recipe: Recipe, axes: list[tuple[str, list[str]]], echo=print, sort: str = "eval_loss") -> SweepResult:
    """Run every combination of ``axes`` on ``recipe`` (see the module docstring)."""
    from finetune.track import tracking
    from finetune.track.comparison import sortable
    from finetune.train.pipeline import in_notebook, run, set_quiet_environment
    from inference.files import write_json
    set_quiet_environment()
    if not sortable(sort, flatten(recipe_to_dict(recipe))):
        raise UserError(f"--sort {sort!r}: not a metric column or recipe key (e.g. eval_loss, exact_match, "
                        "train_loss, wall_time_s, lora.r)")
    sweep_dir, children = plan(recipe, axes)
    _check_sweep_dir(sweep_dir, recipe.output.overwrite)
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        left = owned.clear(sweep_dir, "sweep")   # what the earlier sweep wrote, its runs included; nothing else
        if left:
            echo(f"output.overwrite: kept what the earlier sweep did not write in {sweep_dir}: {', '.join(left[:5])}")
    owned.claim(sweep_dir, "sweep", owned.SWEEP_ENTRIES + tuple(Path(c.recipe.output.dir).name for c in children))
    (sweep_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    t = recipe.tracking
    parent = tracking.start(t.mlflow, t.tracking_uri, t.experiment, t.run_name or f"sweep {sweep_dir.name}",
                            kind="sweep")
    grid = {k: v for k, v in axes}
    parent.log_params({f"sweep.{k}": ",".join(v) for k, v in axes} | {"sweep.size": len(children)})
    parent.set_tags({"run_dir": str(sweep_dir), "sweep.axes": ", ".join(grid)})
    info = {"status": "running", "mlflow_run_id": parent.run_id, "tracking_uri": parent.uri, "grid": grid,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": []}
    result = SweepResult(sweep_dir, parent.run_id)
    log_lines = not in_notebook()
    try:
        for i, child in enumerate(children, 1):
            echo(f"── sweep run {i}/{len(children)}: {child.name} ({' '.join(child.overrides)})")
            entry = {"name": child.name, "overrides": child.overrides, "run_dir": str(resolve_path(None,
                     child.recipe.output.dir)), "run_id": None, "status": "running", "error": None}
            result.runs.append(entry)
            try:
                done = run(child.recipe, echo=echo, log_lines=log_lines, parent_run_id=parent.run_id)
                entry |= {"status": "completed", "run_id": done.mlflow_run_id,
                          "eval_loss": (done.eval_after or {}).get("loss")}
            except UserError as exc:  # bad data for this combination, out of memory...: record it and go on
                entry |= {"status": "failed", "error": str(exc)}
                echo(f"sweep run {child.name} failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - same: one combination must not lose the others
                entry |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                echo(f"sweep run {child.name} failed: {type(exc).__name__}: {exc}")
            finally:
                gc.collect()
                write_json(sweep_dir / "sweep.json", info | {"runs": result.runs})
    except BaseException:
        info["status"] = "interrupted"
        write_json(sweep_dir / "sweep.json", info | {"runs": result.runs})
        parent.close("KILLED")
        raise
    info["status"] = "completed" if not result.failed else "failed"
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(sweep_dir / "sweep.json", info | {"runs": result.runs})
    if parent.run_id and any(r["status"] == "completed" for r in result.runs):
        from finetune.track.comparison import compare
        result.comparison = compare(parent.run_id, uri=parent.uri, sort=sort, plot=sweep_dir / "loss-curves.png")
        (sweep_dir / "comparison.txt").write_text(str(result.comparison) + "\n", encoding="utf-8")
        best = result.comparison.best()
        parent.set_tags({"sweep.best_run_id": best["run_id"], "sweep.best_run": best["run"], "sweep.sorted_by": sort})
        for name in ("sweep.json", "comparison.txt", "loss-curves.png"):
            parent.log_artifact(sweep_dir / name)
        echo(str(result.comparison))
        echo(f"best by {sort}: {best['run']} ({best['run_dir']})")
    parent.close("FINISHED" if not result.failed else "FAILED")
    echo(f"sweep: {len(result.runs) - len(result.failed)} of {len(result.runs)} runs completed; {sweep_dir}"
         + (f"; MLflow parent run {parent.run_id} in {parent.uri}" if parent.run_id else ""))
    for r in result.failed:
        echo(f"failed: {r['name']}: {r['error']}")
    return result

