"""The model: gpt-oss checkpoints on disk and the forward pass that serving runs, MXFP4 experts kept packed.

- :mod:`~inference.model.checkpoint`: HF-layout checkpoints (sharded safetensors, index, config), read with our MXFP4
  decoding (and transformers' ``GptOssForCausalLM``, the reference oracle), and written.
- :mod:`~inference.model.mxfp4`: the MXFP4 codec; :mod:`~inference.model.kernels`: Triton kernels with their PyTorch
  twins; :mod:`~inference.model.compiled`: elementwise code fused by torch.compile on CUDA;
  :mod:`~inference.model.moe`: the expert-layer pieces serving and training share.
- :mod:`~inference.model.runtime`: the forward with KV cache, sinks and sliding windows;
  :mod:`~inference.model.streamed`: the same one decoder layer at a time from disk.
- :mod:`~inference.model.adapters`: PEFT LoRA adapters read, checked, attached or merged.
- :mod:`~inference.model.tiny`, :mod:`~inference.model.tokenizer`: the embedded tiny gpt-oss and its o200k_harmony
  tokenizer, built offline.

May import torch, transformers (the oracle and configs), safetensors, ``inference.errors``, ``inference.cache``,
``inference.files`` and ``inference.harmony``; never the engine, the server or ``finetune``.
"""
