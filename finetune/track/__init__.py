"""Tracking runs and comparing them.

- :mod:`~finetune.track.tracking`: MLflow (the only module that imports it): runs nested under a notebook's, reading
  runs back.
- :mod:`~finetune.track.comparison`: compare runs from the MLflow store (sorted table, loss curves).
- :mod:`~finetune.track.sweeps`: grid sweeps as child runs of one parent run.
- :mod:`~finetune.track.ui`: ``python -m finetune ui`` (MLflow's server on our store, loopback by default).

May import ``finetune.recipe``, ``finetune.train`` (a sweep runs runs), ``inference`` and mlflow (tracking only).
"""
