"""Data: any supported chat format in, Harmony token ids and per-token loss weights out.

- :mod:`~finetune.data.formats`: reading and validating the accepted formats (JSONL chat/ShareGPT/prompt-completion,
  HF dataset directories) into normalized conversations, with errors that name the file and line.
- :mod:`~finetune.data.prepare`: rendering them with ``inference.harmony`` into training examples (ids, targets,
  weights), the eval split, the over-long policy, previews and counts.
- :mod:`~finetune.data.packing`: which training sequences share a row when ``data.packing`` is on.

May import ``inference`` (Harmony, conversations), ``finetune.recipe`` and the standard library; no model code.
"""
