"""Compare training runs from the MLflow store: one table sorted by a metric, and loss curves as a PNG.

``compare(targets)`` reads runs through :mod:`finetune.track.tracking` (so it works on anyone's runs in a shared store):
each target is a run id, a sweep's parent run id (its children), or an experiment name; none means every training
run in the store. ``plot_curves`` also draws a single run's ``metrics.jsonl`` (``RunResult.plot()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from inference.errors import UserError

# Columns taken from MLflow metrics: column -> metric keys, first found wins. eval_loss is our evaluator's loss on
# the held-out set after training (``eval.loss``); the Trainer's periodic eval_loss is the fallback.
METRICS = {"train_loss": ("train_loss",), "eval_loss": ("eval.loss", "eval_loss"),
           "exact_match": ("eval.exact_match",), "trained_tokens": ("trained_tokens",),
           "wall_time_s": ("wall_time_s",)}
ALWAYS = ("lora.r", "train.lr")  # key params shown even when every run has the same value
IGNORED_PREFIXES = ("output.", "tracking.")  # differ between any two runs and say nothing about training
HIGHER_IS_BETTER = {"exact_match", "trained_tokens"}
DEFAULT_SORT = "eval_loss"


@dataclass
class Comparison:
    """The compared runs (``table``: one row per run, best first by ``sort``), the loss-curve figure and its PNG."""

    table: object                # pandas.DataFrame
    sort: str
    figure: object = None        # matplotlib Figure
    png: Path | None = None

    def best(self) -> dict:
        """The first finished run of the table (the best by ``sort``), as a dict with ``run_id`` and ``run_dir``."""
        done = self.table[self.table["status"] == "FINISHED"]
        if done.empty:
            raise UserError("no finished run to pick from")
        return done.iloc[0].to_dict()

    def __str__(self) -> str:
        return format_table(self.table)

    def _repr_html_(self) -> str:
        return self.table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def compare(targets=None, uri: str | None = None, sort: str = DEFAULT_SORT, descending: bool | None = None,
            plot: str | Path | None = None, max_runs: int = 100) -> Comparison:
    """Compare runs; ``plot`` is where to save the loss curves as PNG (the figure is drawn either way)."""
    from finetune.track import tracking
    if isinstance(targets, str):
        targets = [targets]
    if max_runs < 1:
        raise UserError(f"--max-runs must be at least 1, got {max_runs}")
    uri = tracking.tracking_uri(uri)
    try:
        runs = tracking.find_runs(uri, list(targets or []), max_runs)
    except tracking.StoreError as exc:
        raise UserError(str(exc)) from None
    if not runs:
        raise UserError(f"no training runs found for {', '.join(targets) if targets else 'any experiment'} in {uri}")
    table = runs_table(runs, show=[sort])
    if sort not in table.columns:
        raise UserError(f"--sort {sort!r}: not a column (columns: {', '.join(table.columns)})")
    if descending is None:
        descending = sort in HIGHER_IS_BETTER
    # Finished runs first, then by the metric; runs without it last either way.
    table = table.assign(_done=table["status"] != "FINISHED").sort_values(
        ["_done", sort], ascending=[True, not descending], na_position="last", kind="stable").drop(columns="_done")
    table = table.reset_index(drop=True)
    curves = {}
    repeated = set(table["run"][table["run"].duplicated()])
    for row in table.itertuples():
        rows = [{"step": s, "loss": v} for s, v in tracking.metric_history(uri, row.run_id, "train_loss")]
        rows += [{"step": s, "eval_loss": v} for s, v in tracking.metric_history(uri, row.run_id, "eval_loss")]
        curves[f"{row.run} {row.run_id[:8]}" if row.run in repeated else row.run] = rows  # names may repeat
    figure = plot_curves(curves, plot)
    return Comparison(table, sort, figure, Path(plot) if plot else None)


def sortable(column: str, recipe_keys) -> bool:
    """Whether ``column`` can rank runs: a metric column, the run name or status, or a recipe key (a param)."""
    return column in METRICS or column in ("run", "status", "exports") or column in recipe_keys


def runs_table(runs: list[dict], show=()):
    """One row per run: name, status, key params (those of ``show`` that are params too), final metrics, export
    parity, ids."""
    import pandas as pd
    params = sorted({k for r in runs for k in r["params"]})
    varying = [k for k in params if not k.startswith(IGNORED_PREFIXES)
               and len({r["params"].get(k) for r in runs}) > 1]
    key = [*ALWAYS, *(k for k in show if k in params and k not in ALWAYS)]
    shown = [k for k in key if any(k in r["params"] for r in runs)] + [k for k in varying if k not in key]
    rows = []
    for r in runs:
        row = {"run": r["name"], "status": r["status"]}
        row |= {k: _number(r["params"].get(k)) for k in shown}
        for column, keys in METRICS.items():
            row[column] = next((r["metrics"][k] for k in keys if k in r["metrics"]), math.nan)
        exports = sorted((k.split(".")[1], v) for k, v in r["tags"].items()
                         if k.startswith("export.") and k.endswith(".parity"))
        row["exports"] = ", ".join(f"{fmt} {result}" for fmt, result in exports) or "-"
        row["run_id"] = r["run_id"]
        row["run_dir"] = r["tags"].get("run_dir", "-")
        rows.append(row)
    return pd.DataFrame(rows)


def _number(text):
    """Params come back as strings; show numbers as numbers (so they sort and format as such)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def format_table(table) -> str:
    """The comparison as text: losses to 4 decimals, exact match in %, ids shortened."""
    def fmt(column, value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if column == "exact_match":
            return f"{100 * value:.1f}%"
        if column == "trained_tokens":
            return f"{int(value):,}"
        if column == "wall_time_s":
            return f"{value:.0f}s"
        if column == "run_id":
            return value[:8]
        if isinstance(value, float):
            return f"{value:.4f}" if column.endswith("loss") else f"{value:g}"
        return str(value)

    columns = [c for c in table.columns if c != "run_dir"]
    cells = [[fmt(c, row[c]) for c in columns] for _, row in table.iterrows()]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    left = {"run", "status", "exports"}
    line = "  ".join(c.ljust(w) if c in left else c.rjust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in cells:
        out.append("  ".join(v.ljust(w) if c in left else v.rjust(w) for c, v, w in zip(columns, r, widths)))
    return "\n".join(out)


def plot_curves(curves: dict, path: str | Path | None = None):
    """Loss over steps, one colour per run: training loss solid, periodic eval loss dashed with markers.

    ``curves``: run label -> rows like ``metrics.jsonl``'s (``step`` with ``loss`` and/or ``eval_loss``). Returns a
    matplotlib Figure (drawn without pyplot, so no GUI backend is touched); saved as PNG when ``path`` is given.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (label, rows) in enumerate(curves.items()):
        color = f"C{i % 10}"
        train = sorted((r["step"], r["loss"]) for r in rows if r.get("loss") is not None)
        evals = sorted((r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None)
        if train:
            ax.plot(*zip(*train), color=color, label=f"{label} train")
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", label=f"{label} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # 9, 10, 12 rather than 9x10^0
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig
