"""Experiment tracking behind a tiny interface; the only module that imports mlflow.

``start(recipe, run_dir)`` returns a tracker with ``log_params / log_metrics(step) / set_tags / log_artifact /
close``. With ``tracking.mlflow: false`` it is a no-op. The store is ``tracking.tracking_uri``, else
``MLFLOW_TRACKING_URI``, else a local sqlite file ``mlflow.db`` in the working directory. MLflow's telemetry is
switched off before import (nothing phones home). If a run is already active (a notebook), ours is nested in it.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(configured: str | None) -> str:
    """The store to use, with a relative sqlite path made absolute (run.json must find it from anywhere)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


class NullTracker:
    """Tracking switched off."""

    run_id = None
    uri = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class MlflowTracker:
    """One MLflow run."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import logging

        import mlflow
        for name in ("mlflow", "alembic"):  # no "creating tables" chatter on every run (set after mlflow's own setup)
            logging.getLogger(name).setLevel(logging.WARNING)
        self._mlflow = mlflow
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        nested = mlflow.active_run() is not None
        self._run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested)
        self.run_id = self._run.info.run_id

    def log_params(self, params: dict) -> None:
        # MLflow refuses to change a logged param; on resume the same values are logged again, which it accepts.
        items = list(params.items())
        for i in range(0, len(items), 100):
            self._mlflow.log_params({k: str(v)[:6000] for k, v in items[i:i + 100]}, run_id=self.run_id)

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if clean:
            self._mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path, run_id=self.run_id)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id)

    def close(self, status: str = "FINISHED") -> None:
        active = self._mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            self._mlflow.end_run(status=status)


def start(enabled: bool, uri: str | None, experiment: str, run_name: str, run_id: str | None = None):
    """A tracker for this run (``run_id`` continues an earlier MLflow run, for ``--resume``)."""
    if not enabled:
        return NullTracker()
    return MlflowTracker(tracking_uri(uri), experiment, run_name, run_id)


def record_export(uri: str | None, run_id: str, entry: dict, parity_file: Path | None) -> None:
    """Add an export (format, path, parity result) to an existing MLflow run, without touching any active run.

    A store that cannot be reached is reported on stderr, not raised: the export itself is done by then.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import sys

    from mlflow.tracking import MlflowClient
    fmt = entry["format"]
    try:
        client = MlflowClient(tracking_uri(uri))
        client.set_tag(run_id, f"export.{fmt}.parity", "passed" if entry["passed"] else "failed")
        client.set_tag(run_id, f"export.{fmt}.path", entry["path"] or "-")
        if entry.get("error"):
            client.set_tag(run_id, f"export.{fmt}.error", entry["error"][:5000])
        if parity_file is not None:
            client.log_artifact(run_id, str(parity_file), f"exports/{fmt}")
    except Exception as exc:  # noqa: BLE001 - any store failure is reported the same way
        print(f"warning: could not record the {fmt} export in MLflow run {run_id} at {uri}: {exc}", file=sys.stderr)
