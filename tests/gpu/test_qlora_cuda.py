"""QLoRA on packed MXFP4 experts on CUDA: the compiled decode, the decoding grouped matmul (bf16 ``grouped_mm``,
whole and piecewise) and training on the tiny model, each against the same MXFP4 weights decoded to dense up front.

Run on the device machine (``pytest tests/gpu``). The decoded values are exact in bf16, so packed and dense up front
multiply the same numbers: the only differences are the matmuls' summation orders (layout and slicing).
"""

from __future__ import annotations

import pytest
import torch

from finetune import fastpath
from finetune.model import is_quantized
from inference import kernels, moe, mxfp4
from inference.checkpoint import load_model
from inference.loss import weighted_loss_sum
from tests.test_qlora import _lora_models, random_packed

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decoders_equal_unpack_on_cuda_whole_and_sliced(dtype):
    blocks, scales = random_packed(experts=4, out=256, k=1024)
    blocks, scales = blocks.to(CUDA), scales.to(CUDA)
    full = mxfp4.unpack(blocks, scales, dtype)                                   # (E, 256, 1024)
    assert torch.equal(mxfp4.decode(blocks, scales, dtype), full)                # the compiled PyTorch twin
    assert torch.equal(kernels.mxfp4_decode(blocks, scales, dtype), full)        # the Triton decoder
    # the slices the expert matmul decodes: output rows (forward), input groups (backward)
    assert torch.equal(kernels.mxfp4_decode(blocks[:, 48:112], scales[:, 48:112], dtype), full[:, 48:112])
    assert torch.equal(kernels.mxfp4_decode(blocks[:, :, 3:17], scales[:, :, 3:17], dtype), full[:, :, 96:544])


@pytest.mark.parametrize("budget", [None, 4 * 512 * 2 * 64])
def test_packed_grouped_mm_equals_dense_in_bf16(budget, monkeypatch):
    if budget:   # 64 output features / 2 groups of inputs at a time
        monkeypatch.setattr(moe, "DECODE_BUDGET_BYTES", budget)
    blocks, scales = random_packed(experts=4, out=256, k=512)
    packed = mxfp4.Mxfp4Weight(blocks.to(CUDA), scales.to(CUDA), torch.bfloat16)
    dense = packed.dequantize().contiguous()                                   # (E, in, out) bf16
    offs = torch.tensor([300, 300, 700, 1000], dtype=torch.int32, device=CUDA)
    x = torch.randn(1000, 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = moe.grouped_mm(x, packed, offs), moe.grouped_mm(x2, dense, offs)
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    assert rel(y, y2) < 1e-3 and rel(x.grad, x2.grad) < 1e-3


def test_packed_training_equals_dequantized_up_front_on_cuda(tiny_model_dir):
    """fp32 on the GPU (tight, as on CPU; see test_fastpath_cuda for why not bf16 on a tiny model)."""
    models = {k: m.to(CUDA) for k, m in _lora_models(tiny_model_dir).items()}
    assert is_quantized(models["packed"]) and all(p.is_cuda for p in models["packed"].parameters())
    ids = torch.randint(0, 5000, (2, 64), generator=torch.Generator().manual_seed(5)).to(CUDA)
    results = {}
    for name, model in models.items():
        fastpath.enable(model)
        model.zero_grad()
        total, _, _ = weighted_loss_sum(model, ids, torch.ones_like(ids), torch.ones_like(ids).float())
        total.backward()
        results[name] = (total.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        fastpath.disable(model)
    (loss_p, grads_p), (loss_d, grads_d) = results["packed"], results["dense"]
    assert abs(loss_p - loss_d) <= 1e-5 * abs(loss_d)
    for name, g in grads_d.items():
        assert rel(grads_p[name], g) < 1e-4, name


def test_packed_load_on_cuda_saves_the_decoded_experts_bytes(tiny_model_dir):
    def allocated_by(load):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = load()
        return model, torch.cuda.memory_allocated() - before

    packed, packed_bytes = allocated_by(lambda: load_model(tiny_model_dir, torch.bfloat16, CUDA, packed_experts=True))
    _, dense_bytes = allocated_by(lambda: load_model(tiny_model_dir, torch.bfloat16, CUDA))
    expert_bytes = sum(p.packed_bytes for p in packed.parameters() if isinstance(p, mxfp4.Mxfp4Weight))
    dense_expert_bytes = sum(p.numel() * 2 for p in packed.parameters() if isinstance(p, mxfp4.Mxfp4Weight))
    assert expert_bytes * 64 == dense_expert_bytes * 17             # 4.25 bits against bf16's 16
    # nothing dense of the experts stays alive: the difference is the whole saving (allocator rounding apart)
    assert dense_bytes - packed_bytes >= 0.95 * (dense_expert_bytes - expert_bytes)


def test_packed_peft_model_round_trips_through_host_memory(tiny_model_dir):
    """What evaluation does on a small GPU (finetune.pipeline.parked_on_host): the training model to the host and
    back, packed experts and all, with the same outputs and the same parameter objects (the optimizer holds them)."""
    model = _lora_models(tiny_model_dir)["packed"].to(CUDA)
    ids = torch.randint(0, 5000, (1, 16), generator=torch.Generator().manual_seed(2)).to(CUDA)
    params = dict(model.named_parameters())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.to("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(isinstance(p, mxfp4.Mxfp4Weight) for n, p in model.named_parameters() if n.endswith("_proj")
               and ".experts." in n)
    model.to(CUDA)
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
