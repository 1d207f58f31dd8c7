"""The runtime: what serving a gpt-oss model and its adapters needs, and nothing of training.

Harmony (``harmony``: offline vocabulary, rendering, parsing; ``conversations``: messages and tools validated;
``tokenizer``), the model (``checkpoint``: HF-layout I/O; ``mxfp4``, ``kernels``, ``compiled``, ``moe``: the packed
experts and the kernels both sides share; ``runtime``, ``streamed``: the forward; ``adapters``; ``tiny``), the engine
(``engine/``: batching, KV cache, scheduling, sampling), ``evaluate``, the OpenAI-compatible server (``server``,
``openapi``) and ``python -m inference`` (``cli``).

May import torch, transformers, safetensors and openai-harmony. Never ``finetune``, peft or trl, and no autograd
code (tests/test_layering.py).
"""
