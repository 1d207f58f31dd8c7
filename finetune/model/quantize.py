"""QLoRA-style NF4 for gpt-oss attention: ``model.quantization: nf4`` beyond the packed MXFP4 experts.

This module owns one step and one measurement:

- :func:`quantize_attention_nf4` swaps every ``model.layers.N.self_attn.{q,k,v,o}_proj`` ``nn.Linear`` of a
  transformers ``GptOssForCausalLM`` for a ``bitsandbytes.nn.Linear4bit`` (NF4, blocksize 64, double quant), in place,
  on the weight's own device, before LoRA is added. It marks the model ``is_loaded_in_4bit`` (what transformers' own
  bitsandbytes loader sets), which is how PEFT's ``get_peft_model`` knows to wrap those layers with its bnb 4-bit LoRA
  layer (``peft.tuners.lora.bnb.Linear4bit``) instead of the plain ``lora.Linear``.
- :func:`nf4_bytes` counts the bytes the quantized weights really hold (packed codes + quantization state), the
  ground truth for the memory estimator's ``0.5 + 1/64 + 4/(64*256)`` bytes per weight.

The router, the experts (packed MXFP4 or dense, someone else's business), the embedding and ``lm_head`` are left
alone: the router is tiny and decides which experts run, and the embedding and ``lm_head`` (201,088 rows) are what
QLoRA keeps in 16 bits too (transformers' bitsandbytes loader skips ``lm_head`` for the same reason: logits precision).

NF4 itself is bitsandbytes' (``bitsandbytes.functional.quantize_4bit``); we never reimplement it, and its
``dequantize_4bit`` is the oracle in the tests.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from inference.errors import UserError

BLOCKSIZE = 64          # weights per absmax (QLoRA's choice); 2880 and 4096 are multiples of it
QUANT_TYPE = "nf4"
DOUBLE_QUANT = True     # fp32 absmax (4/64 byte a weight) -> 8 bits + an fp32 per 256 of them: 1/64 + 4/16384
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

# ``model.layers.N.self_attn.q_proj`` (also under a prefix, e.g. a PEFT wrapper's ``base_model.model.``).
_PROJECTION = re.compile(r"(?:^|\.)layers\.\d+\.self_attn\.(?:" + "|".join(PROJECTIONS) + r")$")

_FIX = "install bitsandbytes (pip install bitsandbytes) or use model.quantization: mxfp4"


def _bnb():
    """bitsandbytes, or a UserError saying what to do instead."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (quantize_4bit / dequantize_4bit live here)
    except Exception as exc:  # ImportError, or a broken native library raising anything at import
        raise UserError(f"model.quantization: nf4 needs bitsandbytes, which cannot be imported here ({exc}); "
                        f"{_FIX}") from None
    return bitsandbytes


def attention_projections(model: nn.Module) -> dict[str, nn.Module]:
    """The attention projection modules of ``model`` by qualified name, whatever their type."""
    return {name: module for name, module in model.named_modules() if _PROJECTION.search(name)}


def _check_quantizable(projections: dict[str, nn.Module], bnb) -> None:
    """Every projection must be a plain ``nn.Linear`` (``Linear4bit`` is a subclass of it, hence ``type() is``)."""
    if not projections:
        raise UserError("model.quantization: nf4 found no attention projections to quantize "
                        f"(no module named layers.N.self_attn.{{{','.join(PROJECTIONS)}}}); is this a gpt-oss model?")
    already = [n for n, m in projections.items() if isinstance(m, bnb.nn.Linear4bit)]
    if already:
        raise UserError(f"model.quantization: nf4: the attention projections are already quantized ({already[0]} is "
                        "a bitsandbytes Linear4bit); quantize a freshly loaded model once")
    other = [(n, f"{type(m).__module__}.{type(m).__qualname__}") for n, m in projections.items()
             if type(m) is not nn.Linear]
    if other:
        name, kind = other[0]
        raise UserError(f"model.quantization: nf4: {name} is a {kind}, not a torch nn.Linear; quantize the base "
                        "model before adding LoRA (add_lora then wraps the 4-bit layers itself)")


def _probe(bnb, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Quantize and multiply one tiny block on ``device`` so an unsupported device fails before the model is touched
    (half a model in NF4 would be worse than none)."""
    try:
        w = torch.linspace(-1, 1, 2 * BLOCKSIZE, device=device).reshape(2, BLOCKSIZE)  # (out=2, in=64)
        packed, state = bnb.functional.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=DOUBLE_QUANT,
                                                     quant_type=QUANT_TYPE)
        x = torch.ones(3, BLOCKSIZE, device=device, dtype=compute_dtype)
        bnb.matmul_4bit(x, packed, quant_state=state)  # (3, 64) x W(2, 64)^T -> (3, 2), as Linear4bit.forward calls it
    except Exception as exc:  # bitsandbytes signals a missing backend with assorted exception types
        raise UserError(f"model.quantization: nf4: bitsandbytes cannot quantize on {device} with compute dtype "
                        f"{compute_dtype} ({type(exc).__name__}: {exc}); {_FIX}") from None


def _to_nf4(linear: nn.Linear, compute_dtype: torch.dtype, bnb) -> nn.Module:
    """One ``nn.Linear`` (weight ``(out, in)``) -> ``Linear4bit`` holding packed codes ``(out*in/2, 1)`` uint8."""
    weight = linear.weight
    device = weight.device
    # Built on meta: Linear4bit's own __init__ would allocate (and randomly initialise) a full-size weight first.
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=DOUBLE_QUANT, quant_type=QUANT_TYPE,
                              device="meta")
    # Params4bit quantizes in ``.to(device)`` (``.cuda()`` is ``.to("cuda")``) whenever it is not yet quantized,
    # CPU included, and only then (``bnb_quantized`` guards it): this is the one quantization of the original
    # weight, in its own dtype (no extra rounding through compute_dtype first).
    param = bnb.nn.Params4bit(weight.detach(), requires_grad=False, blocksize=BLOCKSIZE,
                              compress_statistics=DOUBLE_QUANT, quant_type=QUANT_TYPE, module=layer)
    layer.weight = param.to(device)  # sets layer.quant_state too
    if linear.bias is not None:
        # bnb casts the input to compute_dtype and would recast a bias of another dtype on every call.
        layer.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=compute_dtype),
                                  requires_grad=linear.bias.requires_grad)
    # On CPUs with AVX512-BF16, bnb's forward (eval mode, no grad) rewrites the weight in place into a CPU-only
    # layout: absmax un-nested to bf16, every matmul in bf16 whatever compute_dtype says, through an op with no
    # backward, and it stays so when training resumes (evaluation runs between training steps here). Keep the
    # standard layout: the one QLoRA trains with and the one nf4_bytes and dequantize_4bit describe.
    layer.support_avx512bf16_for_cpu = False
    layer.train(linear.training)
    return layer


def quantize_attention_nf4(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Replace the attention projections of a (non-PEFT) transformers gpt-oss model with bitsandbytes NF4 layers.

    Each ``nn.Linear`` at ``model.layers.N.self_attn.{q,k,v,o}_proj`` becomes a ``bnb.nn.Linear4bit`` (NF4, blocksize
    64, double-quantized absmax) on the device its weight is on; matmuls run in ``compute_dtype``, the bias is kept in
    ``compute_dtype``, the original weight is dropped. Returns the replaced modules' names, in model order. Call it
    before ``finetune.model.lora.add_lora``; a UserError when bitsandbytes is missing or cannot work on the device, when
    there is nothing to quantize, or when it was done already.
    """
    bnb = _bnb()
    projections = attention_projections(model)
    _check_quantizable(projections, bnb)
    for device in sorted({m.weight.device for m in projections.values()}, key=str):
        _probe(bnb, device, compute_dtype)
    names = list(projections)
    for name in names:
        # Popped, so that once swapped out the layer's bf16/fp32 weight has no reference left and is freed now,
        # not after the last layer: memory falls layer by layer, the peak is the model as loaded plus one layer's codes.
        linear = projections.pop(name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _to_nf4(linear, compute_dtype, bnb))
        del linear
    # What transformers' bitsandbytes loader sets; PEFT reads it to dispatch its bnb 4-bit LoRA layer.
    model.is_loaded_in_4bit = True
    return names


def nf4_bytes(module_or_model: nn.Module) -> int:
    """Bytes held by the bitsandbytes 4-bit weights under ``module_or_model``: packed codes, absmax (8-bit when
    double-quantized), the nested absmax and offset, and the two code books (bnb copies them into every tensor's
    state: 16 + 256 fp32 entries), each storage counted once. 0 when nothing is quantized.

    Per ``(out, in)`` weight with blocksize 64 and double quant: ``out*in/2`` + ``out*in/64`` + 4 per 256 absmax +
    1092 bytes (code books and offset), i.e. the estimator's ``0.5 + 1/64 + 4/(64*256)`` per weight plus 1092.
    """
    bnb = _bnb()
    seen: dict[tuple[torch.device, int], int] = {}

    def count(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor):
            seen[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()

    for p in module_or_model.parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            continue
        count(p.data)
        state = p.quant_state
        if state is None:
            continue
        for t in (state.absmax, state.code, state.offset):
            count(t)
        nested = getattr(state, "state2", None)
        if nested is not None:
            count(nested.absmax)
            count(nested.code)
    return sum(seen.values())
