"""The pieces of gpt-oss's expert layer that serving and training share: gpt-oss's clamped SwiGLU, the fused
epilogues that follow each expert matmul (bias, LoRA output, SwiGLU, routing weight) and the MXFP4 expert decoder.

Each epilogue is one fused kernel on CUDA (:func:`inference.model.compiled.fused`) and the same PyTorch expression
elsewhere. The runtime's expert path is in :mod:`inference.model.runtime`; training's grouped matmuls over tokens sorted
by expert, with their backward passes, are in ``finetune.kernels.experts``.
"""

from __future__ import annotations

import torch

from inference.model import kernels, mxfp4
from inference.model.compiled import fused


def swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU: ``(S, 2I)`` with gate/up interleaved (as gpt-oss stores them) -> ``(S, I)``."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@fused
def gate_up_epilogue(mm, lora, bias, expert, alpha: float, limit: float):
    """``swiglu(x W_e + b_e [+ LoRA])`` for ``(S, 2I)`` matmul outputs: one pass instead of five."""
    h = mm + bias[expert]
    if lora is not None:
        h = h + lora
    return swiglu(h, alpha, limit)


@fused
def down_epilogue(mm, lora, bias, expert, weight):
    """``(h W_e + b_e [+ LoRA]) * routing weight`` for ``(S, H)`` matmul outputs."""
    y = mm + bias[expert]
    if lora is not None:
        y = y + lora
    return y * weight[:, None].to(y.dtype)


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed ``(E, R, G, 16)`` -> ``(E, R, G * 32)``: the Triton decoder on CUDA, its PyTorch twin elsewhere."""
    if blocks.is_cuda and kernels.available():
        return kernels.mxfp4_decode(blocks, scales, dtype)
    return mxfp4.decode(blocks, scales, dtype)
