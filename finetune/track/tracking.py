"""Experiment tracking behind a tiny interface; the only module that imports mlflow.

Writing: ``start(...)`` returns a tracker with ``log_params / log_metrics(step) / set_tags / log_artifact / close``.
With ``tracking.mlflow: false`` it is a no-op. Reading: :func:`find_runs` and :func:`metric_history` give plain
dicts for ``python -m finetune compare``.

The store is ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a local sqlite file ``mlflow.db`` in the
working directory; when the recipe names no store and a notebook has an MLflow run active, that run's store. MLflow's
telemetry is switched off before import (nothing phones home).

Everything goes through ``MlflowClient`` with explicit run ids, never MLflow's global "active run" or "current
experiment": a notebook's own MLflow state is left as it was. When a notebook has a run active in the same store,
ours is created as its child (``mlflow.parentRunId``), in the parent's experiment so the UI shows them together;
a sweep's runs are children of the sweep's parent run the same way.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from inference.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "finetune.kind"          # "run" or "sweep": how compare tells our runs from anything else in the store


def tracking_uri(configured: str | None) -> str:
    """The store to use, with a relative sqlite path made absolute (run.json must find it from anywhere).

    A URI with a password in it (``https://user:secret@host``) is refused: the URI is printed and stored in run.json.
    MLflow reads credentials from its own environment variables, which this project never prints or stores."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    problem = credentials_problem(uri)
    if problem:
        raise UserError(f"{'tracking.tracking_uri' if configured else 'MLFLOW_TRACKING_URI'}: {problem}")
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def credentials_problem(uri: str) -> str | None:
    """Why ``uri`` must not be used as given (it holds a password), or None."""
    if "://" in uri and urlsplit(uri).password is not None:
        return ("the tracking URI holds a password, which would be printed and stored in run.json; give it without "
                "one and put the credentials in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN), which MLflow reads itself")
    return None


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging

    from mlflow.tracking import MlflowClient
    for name in ("mlflow", "alembic"):  # no "creating tables" chatter on every run (set after mlflow's own setup)
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(uri)


def caller_store() -> str | None:
    """The store of the run the caller (a notebook) has active, if any.

    An active run can only exist if the caller imported mlflow, so a plain CLI run never imports it for this.
    """
    if "mlflow" not in sys.modules:
        return None
    import mlflow
    return tracking_uri(mlflow.get_tracking_uri()) if mlflow.active_run() is not None else None


def active_parent(uri: str) -> tuple[str | None, str | None]:
    """(run id, experiment id) of a run the caller has active in this store, else (None, None). A run active in
    another store cannot be a parent: we say so and log unnested."""
    theirs = caller_store()
    if theirs is None:
        return None, None
    import mlflow
    active = mlflow.active_run()
    if theirs != uri:
        print(f"note: the active MLflow run {active.info.run_id} is in another store ({theirs}); this run goes to "
              f"{uri} and is not nested under it", file=sys.stderr)
        return None, None
    return active.info.run_id, active.info.experiment_id


class NullTracker:
    """Tracking switched off."""

    run_id = None
    uri = None
    experiment_id = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker:
    """One MLflow run, new or continued (``run_id``, for ``--resume``)."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, kind: str = "run"):
        self.uri = uri
        self._client = client = _client(uri)
        if run_id:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            self.run_id, self.experiment_id = run_id, run.info.experiment_id
            return
        parent_experiment = None
        if parent_run_id is None:
            parent_run_id, parent_experiment = active_parent(uri)
        elif parent_run_id:
            parent_experiment = client.get_run(parent_run_id).info.experiment_id
        self.experiment_id = parent_experiment or _experiment_id(client, experiment)
        tags = {KIND_TAG: kind} | ({PARENT_TAG: parent_run_id} if parent_run_id else {})
        run = client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        # MLflow refuses to change a logged param; on resume the same values are logged again, which it accepts.
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]
        for i in range(0, len(clean), 500):
            self._client.log_batch(self.run_id, metrics=clean[i:i + 500])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag
        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status)


def _experiment_id(client, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created meanwhile by another process: use theirs
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start(enabled: bool, uri: str | None, experiment: str, run_name: str, run_id: str | None = None,
          parent_run_id: str | None = None, kind: str = "run"):
    """A tracker for this run. ``run_id`` continues an earlier MLflow run (``--resume``); ``parent_run_id`` makes it
    a child of that run (a sweep's); otherwise it is a child of the caller's active run in the same store, if any."""
    if not enabled:
        return NullTracker()
    if uri is None and run_id is None and parent_run_id is None:
        uri = caller_store()  # a recipe that names no store logs where the notebook's active run is
    return MlflowTracker(tracking_uri(uri), experiment, run_name, run_id, parent_run_id, kind)


def get_run(uri: str, run_id: str):
    """The ``mlflow.entities.Run`` (for a result's ``mlflow_run``)."""
    return _client(uri).get_run(run_id)


def record_export(uri: str | None, run_id: str, entry: dict, parity_file: Path | None) -> None:
    """Add an export (format, path, parity result) to an existing MLflow run, without touching any active run.

    A store that cannot be reached is reported on stderr, not raised: the export itself is done by then.
    """
    fmt = entry["format"]
    try:
        client = _client(tracking_uri(uri))
        client.set_tag(run_id, f"export.{fmt}.parity", "passed" if entry["passed"] else "failed")
        client.set_tag(run_id, f"export.{fmt}.path", entry["path"] or "-")
        if entry.get("error"):
            client.set_tag(run_id, f"export.{fmt}.error", entry["error"][:5000])
        if parity_file is not None:
            client.log_artifact(run_id, str(parity_file), f"exports/{fmt}")
    except Exception as exc:  # noqa: BLE001 - any store failure is reported the same way
        print(f"warning: could not record the {fmt} export in MLflow run {run_id} at {uri}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------- reading (compare)


class StoreError(Exception):
    """The store or a run/experiment named for reading does not exist (the message says which)."""


def check_store(uri: str) -> None:
    """Refuse to read a sqlite store that does not exist (opening it would create an empty one)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_file():
        raise StoreError(f"no MLflow store at {uri[len(prefix):]} (run a recipe first, or pass --uri / set "
                         "MLFLOW_TRACKING_URI)")


def _as_dict(run) -> dict:
    info, data = run.info, run.data
    return {"run_id": info.run_id, "name": info.run_name, "status": info.status, "experiment_id": info.experiment_id,
            "start_time": info.start_time, "end_time": info.end_time, "params": dict(data.params),
            "metrics": dict(data.metrics), "tags": dict(data.tags)}


def find_runs(uri: str, targets: list[str], max_runs: int = 100) -> list[dict]:
    """Our training runs named by ``targets``, newest first, as plain dicts (params, metrics, tags, status...).

    Each target is a run id (a sweep's parent stands for its children), or an experiment name (its training runs).
    No targets: every training run in the store. Sweep parents themselves are never listed: they do not train.
    """
    check_store(uri)
    client = _client(uri)
    runs: dict[str, dict] = {}

    def add(found, named=False):
        for r in found:
            tags = r.data.tags
            ours = tags.get(KIND_TAG) == "run" or (KIND_TAG not in tags and "run_dir" in tags)  # older runs: no kind
            if (named or ours) and r.info.lifecycle_stage == "active":
                runs.setdefault(r.info.run_id, _as_dict(r))

    def search(experiment_ids, filter_string=""):
        return client.search_runs(experiment_ids, filter_string, max_results=max_runs,
                                  order_by=["attributes.start_time DESC"])

    if not targets:
        ids = [e.experiment_id for e in client.search_experiments()]
        add(search(ids) if ids else [])
    for target in targets:
        run = None
        try:
            run = client.get_run(target)
        except Exception:  # noqa: BLE001 - not a run id: try it as an experiment name
            pass
        if run is not None:
            if run.data.tags.get(KIND_TAG) == "sweep":
                add(search([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run.info.run_id}'"))
            else:
                add([run], named=True)
            continue
        experiment = client.get_experiment_by_name(target)
        if experiment is None:
            names = sorted(e.name for e in client.search_experiments())
            raise StoreError(f"{target!r} is neither a run id nor an experiment in {uri} (experiments: "
                             f"{', '.join(names) or 'none'})")
        add(search([experiment.experiment_id]))
    return sorted(runs.values(), key=lambda r: -(r["start_time"] or 0))[:max_runs]


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of one metric, by step."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))
