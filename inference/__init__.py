"""The runtime: what serving a gpt-oss model and its adapters needs, and nothing of training.

On top, the Harmony format (``harmony``: offline vocabulary, rendering, parsing; ``conversations``: messages and
tools validated), the evaluation loss and ``evaluate``, and ``python -m inference`` (``cli``); then a folder per
stage: ``model/`` (checkpoints on disk, the MXFP4 codec and kernels, the forward, adapters, the tiny model),
``engine/`` (batching, KV cache, scheduling, sampling) and ``serve/`` (the OpenAI-compatible server).

May import torch, transformers, safetensors and openai-harmony. Never ``finetune``, peft or trl, and no autograd
code (tests/test_layering.py).
"""
