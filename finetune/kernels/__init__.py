"""Training's kernels, with their backward passes: what the fast training path (``finetune.model.fastpath``) plugs into
transformers and PEFT.

- :mod:`~finetune.kernels.experts`: the expert layer as grouped matmuls over tokens sorted by expert, with the LoRA
  side path, decoding packed MXFP4 experts piecewise forward and backward.
- :mod:`~finetune.kernels.attention`: attention with gpt-oss's sinks and sliding window (flash on CUDA), exact
  backward; packed rows (several sequences a row) through flash's variable-length mode.
- :mod:`~finetune.kernels.loss`: the weighted next-token loss with a chunked backward.
- :mod:`~finetune.kernels.packed`: ``Mxfp4Weight``, packed experts that look dense to PEFT.
- :mod:`~finetune.kernels.tiles`: the MoE block over a step's tokens in tiles, forward and backward (long sequences).

May import torch, ``inference``'s shared forward pieces (MXFP4 codec and decoder, fused epilogues, the weighted
loss) and transformers' mask builders (the loss, for packed rows on transformers' own attention); the runtime never
imports this package.
"""
