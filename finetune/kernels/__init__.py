"""Training's kernels, with their backward passes: what the fast training path (``finetune.model.fastpath``) plugs into
transformers and PEFT.

- :mod:`~finetune.kernels.experts`: the expert layer as grouped matmuls over tokens sorted by expert, with the LoRA
  side path, decoding packed MXFP4 experts piecewise forward and backward.
- :mod:`~finetune.kernels.attention`: attention with gpt-oss's sinks and sliding window (flash on CUDA), exact
  backward.
- :mod:`~finetune.kernels.loss`: the weighted next-token loss with a chunked backward.
- :mod:`~finetune.kernels.packed`: ``Mxfp4Weight``, packed experts that look dense to PEFT.

May import torch and ``inference``'s shared forward pieces (MXFP4 codec and decoder, fused epilogues, the weighted
loss); the runtime never imports this package.
"""
