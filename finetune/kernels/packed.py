"""Packed MXFP4 expert weights as a tensor PEFT and transformers can hold: :class:`Mxfp4Weight`.

It stands where a model expects a dense ``(E, in, out)`` weight (transformers' ``GptOssExperts`` parameters), so PEFT
can wrap it and the training path can hand the packed bytes to the expert matmul (:mod:`finetune.kernels.experts`),
which decodes them piecewise. Any other use of it decodes the whole tensor first: slow, but every library that
touches the weight sees the right values. The codec itself is :mod:`inference.model.mxfp4`.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from inference.model.mxfp4 import GROUP, decode


class Mxfp4Weight(torch.Tensor):
    """A frozen expert weight ``(E, in, out)`` of ``dtype`` stored as MXFP4 ``blocks (E, out, in/32, 16)`` and
    ``scales (E, out, in/32)`` (the checkpoint's layout: rows are output features).

    A tensor subclass (the way torchao holds its quantized weights): it reports the dense shape and dtype, so
    ``nn.Parameter``, PEFT's ``target_parameters`` and ``module.to`` work on it unchanged, while only the packed bytes
    (4.25 bits per weight) are in memory. Detaching, copying and moving keep it packed; any other operation sees
    the decoded dense tensor.
    """

    blocks: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def __new__(cls, blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        experts, out, groups, half = blocks.shape
        if half != GROUP // 2 or scales.shape != blocks.shape[:-1]:
            raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
        return torch.Tensor._make_wrapper_subclass(cls, (experts, groups * GROUP, out), dtype=dtype,
                                                   device=blocks.device, requires_grad=False)

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        self.blocks, self.scales = blocks, scales

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(E, in, out)`` tensor (a transposed view of the decoded ``(E, out, in)``)."""
        return decode(self.blocks, self.scales, dtype or self.dtype).transpose(-2, -1)

    @property
    def packed_bytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()

    def __repr__(self) -> str:   # printing must not decode gigabytes
        return f"Mxfp4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __tensor_flatten__(self):
        return ["blocks", "scales"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return Mxfp4Weight(inner["blocks"], inner["scales"], dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default):
            w = args[0]
            return Mxfp4Weight(w.blocks, w.scales, w.dtype)
        if func is aten.clone.default:
            w = args[0]
            return Mxfp4Weight(w.blocks.clone(), w.scales.clone(), w.dtype)
        if func is aten._to_copy.default:
            w = args[0]
            device = kwargs.get("device") or w.device
            return Mxfp4Weight(w.blocks.to(device), w.scales.to(device), kwargs.get("dtype") or w.dtype)

        def dense(t):
            return t.dequantize() if isinstance(t, Mxfp4Weight) else t
        return func(*tree_map(dense, args), **tree_map(dense, kwargs))
