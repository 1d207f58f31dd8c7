"""QLoRA on packed MXFP4 experts on CUDA: the compiled decode, the decoding grouped matmul (bf16 ``grouped_mm``,
whole and piecewise) and training on the tiny model, each against the same MXFP4 weights decoded to dense up front.

Run on the device machine (``pytest tests/gpu``). The decoded values are exact in bf16, so packed and dense up front
multiply the same numbers: the only differences are the matmuls' summation orders (layout and slicing).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import EPS32, FP32_MARGIN, float64

from finetune.kernels import experts as moe
from finetune.kernels.loss import weighted_loss_sum
from finetune.kernels.packed import Mxfp4Weight
from finetune.model import fastpath
from finetune.model.lora import is_quantized
from inference.model import kernels, mxfp4
from inference.model.checkpoint import load_model
from tests.test_mxfp4 import assert_same_bits, ldexp_reference
from tests.test_qlora import _lora_models, random_packed

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_decoders_are_ldexp_for_every_scale_byte_and_code(dtype):
    """Every decoder on the GPU (unpack, the compiled decode, the Triton kernel) gives ``math.ldexp``'s bits for all
    256 scale bytes x 16 codes: byte 255 keeps zeros, code 8 stays -0.0 (``torch.equal`` takes -0.0 for 0.0)."""
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes * 0x11).repeat(256, 1)[None, None].to(CUDA)            # (1, 1, 256, 16): byte c is (c, c)
    scales = torch.arange(256, dtype=torch.uint8)[None, None].to(CUDA)    # (1, 1, 256): one expert, one row
    want = ldexp_reference(dtype)
    for name, decoded in (("unpack", mxfp4.unpack(blocks, scales, dtype)),
                          ("decode", mxfp4.decode(blocks, scales, dtype)),
                          ("triton", kernels.mxfp4_decode(blocks, scales, dtype))):
        out = decoded.reshape(256, 16, 2).cpu()
        for half in (0, 1):
            assert_same_bits(out[..., half].contiguous(), want)   # (the failing decoder: `name`)


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
    packed = Mxfp4Weight(blocks.to(CUDA), scales.to(CUDA), torch.bfloat16)
    dense = packed.dequantize().contiguous()                                   # (E, in, out) bf16
    offs = torch.tensor([300, 300, 700, 1000], dtype=torch.int32, device=CUDA)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 512, generator=g).to(CUDA, torch.bfloat16).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = moe.grouped_mm(x, packed, offs), moe.grouped_mm(x2, dense, offs)
    grad = torch.randn(y.shape, generator=g).to(CUDA, torch.bfloat16)
    y.backward(grad)
    y2.backward(grad)
    # Both round to bf16 (fp32 accumulation in different orders): held to FP32_MARGIN times the dense path's measured
    # distance from the same products in float64 (the bf16 inputs and decoded weights are exact there).
    exact_y = moe._gmm_loop(x.detach().double(), dense.double(), offs)
    exact_dx = moe._gmm_loop(grad.double(), dense.double().transpose(1, 2), offs)
    assert rel(y, y2) <= FP32_MARGIN * rel(y2, exact_y)
    assert rel(x.grad, x2.grad) <= FP32_MARGIN * rel(x2.grad, exact_dx)


def test_packed_training_equals_dequantized_up_front_on_cuda(tiny_model_dir):
    """fp32 on the GPU (tight, as on CPU; see test_fastpath_cuda for why not bf16 on a tiny model)."""
    models = {k: m.to(CUDA) for k, m in _lora_models(tiny_model_dir).items()}
    assert is_quantized(models["packed"]) and all(p.is_cuda for p in models["packed"].parameters())
    models["exact"] = float64(copy.deepcopy(models["dense"]))   # the tolerances' reference: eager, float64
    ids = torch.randint(0, 5000, (2, 64), generator=torch.Generator().manual_seed(5)).to(CUDA)
    results = {}
    for name, model in models.items():
        if name != "exact":
            fastpath.enable(model)
        model.zero_grad()
        total, _, _ = weighted_loss_sum(model, ids, torch.ones_like(ids), torch.ones_like(ids).float())
        total.backward()
        results[name] = (total.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if name != "exact":
            fastpath.disable(model)
    (loss_p, grads_p), (loss_d, grads_d), (loss_e, grads_e) = results["packed"], results["dense"], results["exact"]
    # two fp32 runs of the same maths: FP32_MARGIN times the dense run's measured distance from float64
    assert abs(loss_p - loss_d) <= FP32_MARGIN * max(abs(loss_d - loss_e), EPS32 * abs(loss_e))
    for name, g in grads_d.items():
        assert rel(grads_p[name], g) <= FP32_MARGIN * max(rel(g, grads_e[name]), EPS32), name


def test_packed_load_on_cuda_saves_the_decoded_experts_bytes(tiny_model_dir):
    def allocated_by(load):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = load()
        return model, torch.cuda.memory_allocated() - before

    packed, packed_bytes = allocated_by(lambda: load_model(tiny_model_dir, torch.bfloat16, CUDA,
                                                           packed_experts=Mxfp4Weight))
    _, dense_bytes = allocated_by(lambda: load_model(tiny_model_dir, torch.bfloat16, CUDA))
    expert_bytes = sum(p.packed_bytes for p in packed.parameters() if isinstance(p, Mxfp4Weight))
    dense_expert_bytes = sum(p.numel() * 2 for p in packed.parameters() if isinstance(p, Mxfp4Weight))
    assert expert_bytes * 64 == dense_expert_bytes * 17             # 4.25 bits against bf16's 16
    # nothing dense of the experts stays alive: the difference is the whole saving (allocator rounding apart)
    assert dense_bytes - packed_bytes >= 0.95 * (dense_expert_bytes - expert_bytes)


def test_packed_peft_model_round_trips_through_host_memory(tiny_model_dir):
    """What evaluation does on a small GPU (finetune.train.pipeline.parked_on_host): the training model to the host and
    back, packed experts and all, with the same outputs and the same parameter objects (the optimizer holds them)."""
    model = _lora_models(tiny_model_dir)["packed"].to(CUDA)
    ids = torch.randint(0, 5000, (1, 16), generator=torch.Generator().manual_seed(2)).to(CUDA)
    params = dict(model.named_parameters())
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.to("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(isinstance(p, Mxfp4Weight) for n, p in model.named_parameters() if n.endswith("_proj")
               and ".experts." in n)
    model.to(CUDA)
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_offloaded_and_tiled_training_equal_the_plain_step_and_offload_frees_the_layer_inputs(tiny_model_dir):
    """train.offload_activations (transformers' own offload: each checkpointed layer's input in pinned host memory)
    gives bit-identical loss and gradients, and between forward and backward the GPU holds that many bytes less;
    train.mlp_tile_tokens on top stays within fp32 rounding (float64 as the measure)."""
    models = {k: m.to(CUDA) for k, m in _lora_models(tiny_model_dir).items()}
    model = models["packed"]
    exact = float64(copy.deepcopy(models["dense"]))
    ids = torch.randint(0, 5000, (2, 512), generator=torch.Generator().manual_seed(6)).to(CUDA)
    ones = torch.ones_like(ids)

    def step(m, offload=False, tile=0, fast=True):
        with fastpath.patched(m, mlp_tile=tile) if fast else contextlib.nullcontext():
            fastpath.enable_checkpointing(m, offload=offload)
            m.train()
            m.zero_grad()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            total, _, _ = weighted_loss_sum(m, ids, ones, ones.float())
            held = torch.cuda.memory_allocated() - before          # what the forward leaves for the backward
            total.backward()
            m.get_base_model().activation_checkpointing_disable()
        return total.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, held

    loss, grads, held = step(model)
    loss_o, grads_o, held_o = step(model, offload=True)
    loss_t, grads_t, _ = step(model, offload=True, tile=100)
    loss_e, grads_e, _ = step(exact, fast=False)
    assert loss_o == loss and all(torch.equal(grads_o[n], g) for n, g in grads.items())
    cfg = model.get_base_model().config
    inputs = cfg.num_hidden_layers * ids.numel() * cfg.hidden_size * 4          # fp32 layer inputs
    assert held - held_o >= 0.9 * inputs, (held, held_o, inputs)
    assert abs(loss_t - loss) <= FP32_MARGIN * max(abs(loss - loss_e), EPS32 * abs(loss_e))
    for name, g in grads.items():
        assert rel(grads_t[name], g) <= FP32_MARGIN * max(rel(g, grads_e[name]), EPS32), name
