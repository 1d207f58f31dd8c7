"""The model for training: gpt-oss loaded from disk with LoRA on attention and experts, quantized or not, and our
fast training path.

- :mod:`~finetune.model.lora`: loading for training, LoRA placement (PEFT) and its coverage report, device, dtype and
  quantization choices, the host-memory embedding.
- :mod:`~finetune.model.quantize`: NF4 attention projections (bitsandbytes) for QLoRA.
- :mod:`~finetune.model.fastpath`: our CUDA training path, and the one seam that changes library behaviour (a table
  of every patch and why, applied and undone by one context manager).

May import ``finetune.kernels`` (the kernels the fast path plugs in), ``finetune.recipe``, ``inference``, torch,
transformers, peft and bitsandbytes.
"""
