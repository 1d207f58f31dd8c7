"""Training a run, start to finish.

- :mod:`~finetune.train.pipeline`: ``run(recipe)``: the whole pipeline (data, model, evaluation before and after,
  training, adapter, run directory, tracking), and ``RunResult``.
- :mod:`~finetune.train.trainer`: TRL's ``SFTTrainer`` with our weighted loss, progress bar and metrics callbacks.
- :mod:`~finetune.train.checkpoints`: crash-safe checkpoints (completion mark with hashes, rotation, resume).
- :mod:`~finetune.train.stopping`: Ctrl-C / SIGTERM during training: a checkpoint at the end of the step, then stop.
- :mod:`~finetune.train.killpoints`: named points where the crash tests kill a run (a no-op otherwise).

May import every other ``finetune`` stage (data, model, track, ship are what a run strings together), ``inference``,
trl, transformers, peft and accelerate; mlflow only through ``finetune.track.tracking``.
"""
