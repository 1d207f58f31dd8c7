"""QLoRA on packed MXFP4 experts (CPU): the packed weight, the decoding expert matmul, loading, and training
gradients against the same weights decoded to dense up front (transformers' eager gpt-oss as the oracle)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_fp32_close, float64, run, summation_bound

from finetune.kernels import experts as moe
from finetune.kernels.loss import weighted_loss_sum
from finetune.kernels.packed import Mxfp4Weight
from finetune.model import fastpath
from finetune.model.lora import HostEmbedding, add_lora, is_quantized
from finetune.recipe import load_recipe
from inference.model import mxfp4
from inference.model.checkpoint import load_model

REPO_RECIPE = "recipes/tiny-cpu.yaml"


def random_packed(experts=3, out=64, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, out, k // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (experts, out, k // 32), dtype=torch.uint8, generator=g)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_unpack_for_every_byte_and_a_range_of_scales(dtype):
    blocks = torch.arange(256, dtype=torch.uint8).reshape(16, 16)[None].expand(32, 16, 16).contiguous()  # (32, 16, 16)
    scales = torch.arange(112, 144, dtype=torch.uint8)[:, None].expand(32, 16).contiguous()             # (32, 16)
    assert torch.equal(mxfp4.decode(blocks, scales, dtype), mxfp4.unpack(blocks, scales, dtype))


def test_packed_weight_looks_dense_and_stays_packed():
    blocks, scales = random_packed()
    w = Mxfp4Weight(blocks, scales, torch.float32)
    dense = mxfp4.unpack(blocks, scales).transpose(1, 2)              # (E, in, out)
    assert w.shape == dense.shape == (3, 96, 64) and w.dtype == torch.float32
    param = torch.nn.Parameter(w, requires_grad=False)
    assert isinstance(param, torch.nn.Parameter) and isinstance(param, Mxfp4Weight)
    # detaching, copying, moving and changing the reported dtype keep the bytes packed
    module = torch.nn.Module()
    module.w = param
    module.to("cpu")
    clone = copy.deepcopy(module)
    for t in (module.w, clone.w, param.detach(), module.state_dict()["w"]):
        assert isinstance(t, Mxfp4Weight)
    assert clone.w.blocks.data_ptr() != blocks.data_ptr() and torch.equal(clone.w.blocks, blocks)
    assert module.to(torch.bfloat16).w.dtype == torch.bfloat16 and isinstance(module.w, Mxfp4Weight)
    # any other use sees the decoded values
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    assert torch.equal(w[1], dense[1])
    # the same numbers multiplied, possibly in another summation order (layout): within the fp32 summation bound
    assert ((x @ w[2] - x @ dense[2]).abs() <= summation_bound(x, dense[2])).all()
    assert torch.equal(w + 0, dense)
    assert w.packed_bytes == blocks.numel() + scales.numel() == w.numel() * 17 // 32
    assert "Mxfp4Weight" in repr(w)


@pytest.mark.parametrize("budget", [None, 3 * 96 * 4 * 16, 3 * 64 * 32 * 4])
def test_packed_grouped_mm_forward_and_input_gradient_equal_dense(budget, monkeypatch):
    if budget:   # small budgets force the piecewise decode (16 output features / one 32-group at a time)
        monkeypatch.setattr(moe, "DECODE_BUDGET_BYTES", budget)
    blocks, scales = random_packed()
    packed = Mxfp4Weight(blocks, scales, torch.float32)
    dense = packed.dequantize().contiguous()                          # (E, in, out)
    offs = torch.tensor([9, 9, 31], dtype=torch.int32)                # expert 1 gets no rows
    g = torch.Generator().manual_seed(1)
    x = torch.randn(31, 96, generator=g, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = moe.grouped_mm(x, packed, offs), moe.grouped_mm(x2, dense, offs)
    grad = torch.randn(y.shape, generator=g)
    (y * grad).sum().backward()
    (y2 * grad).sum().backward()
    # Both multiply the same fp32 numbers (decoded MXFP4 values are exact), in different summation orders (slices,
    # layout): forward sums K = 96 terms per output, the input gradient N = 64 per input, each within its fp32 bound.
    assert ((y - y2).abs() <= summation_bound(x, dense, offs)).all()
    assert ((x.grad - x2.grad).abs() <= summation_bound(grad, dense.transpose(1, 2), offs)).all()
    assert y.abs().max() > 0.1


def test_load_model_keeps_experts_packed_with_equal_logits(tiny_model_dir):
    dense = load_model(tiny_model_dir)
    packed = load_model(tiny_model_dir, packed_experts=Mxfp4Weight)
    experts = packed.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, Mxfp4Weight) and not experts.gate_up_proj.requires_grad
    assert is_quantized(packed) and not is_quantized(dense)
    dense_bytes = sum(p.numel() * p.element_size() for n, p in dense.named_parameters() if ".experts." in n
                      and not n.endswith("bias"))
    packed_bytes = sum(p.packed_bytes for p in packed.parameters() if isinstance(p, Mxfp4Weight))
    assert packed_bytes * 128 == dense_bytes * 17        # 4.25 bits per weight against fp32's 32
    ids = torch.randint(0, 5000, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():   # the same weights; only the summation order of the matmuls may differ (layout)
        a, b = packed(input_ids=ids).logits, dense(input_ids=ids).logits
        exact = float64(load_model(tiny_model_dir))(input_ids=ids).logits
    assert_fp32_close(a, b, exact, "logits")


def _lora_models(tiny_model_dir):
    recipe = load_recipe(REPO_RECIPE)
    models = {}
    for name, packed in (("dense", False), ("packed", True)):
        torch.manual_seed(0)
        models[name], _ = add_lora(load_model(tiny_model_dir, packed_experts=Mxfp4Weight if packed else None), recipe)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # a trained-looking adapter (PEFT starts B at zero), the same in both
        for (n1, p1), (n2, p2) in zip(models["dense"].named_parameters(), models["packed"].named_parameters()):
            assert n1 == n2
            if p1.requires_grad:
                value = torch.randn(p1.shape, generator=g) * 0.05
                p1.copy_(value)
                p2.copy_(value)
    return models


def _loss_and_grads(model, ids, fast: bool):
    if fast:
        fastpath.enable(model)
    model.zero_grad()
    total, weight, _ = weighted_loss_sum(model, ids, torch.ones_like(ids), torch.ones_like(ids).float())
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if fast:
        fastpath.disable(model)
    return total.item(), grads


def test_packed_training_loss_and_lora_gradients_equal_dequantized_up_front(tiny_model_dir):
    models = _lora_models(tiny_model_dir)
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(5))
    oracle_loss, oracle = _loss_and_grads(models["dense"], ids, fast=False)       # transformers eager, dense
    # the same oracle in float64: how far its fp32 run is from the exact result sets the tolerances
    exact_loss, exact = _loss_and_grads(float64(copy.deepcopy(models["dense"])), ids, fast=False)
    for fast in (True, False):   # our grouped path decoding in the matmuls; PEFT's path through the fallback
        loss, grads = _loss_and_grads(models["packed"], ids, fast)
        assert_fp32_close(torch.tensor(loss), torch.tensor(oracle_loss), torch.tensor(exact_loss), "loss")
        assert grads.keys() == oracle.keys() and any(".experts." in n for n in grads)
        for name, g in grads.items():
            assert g.abs().max() > 0, name
            assert_fp32_close(g, oracle[name], exact[name], name)
    assert not any(p.grad is not None for p in models["packed"].parameters() if isinstance(p, Mxfp4Weight))


def test_host_embedding_matches_and_is_not_a_parameter(tiny_model_dir):
    model = load_model(tiny_model_dir)
    emb = model.model.embed_tokens
    host = HostEmbedding(emb)
    ids = torch.randint(0, 5000, (2, 7), generator=torch.Generator().manual_seed(4))
    assert torch.equal(host(ids), emb(ids))
    model.model.embed_tokens = host
    assert "model.embed_tokens.weight" not in dict(model.named_parameters())
    assert model.get_input_embeddings() is host


def test_fast_path_leaves_the_state_dict_and_the_saved_adapter_alone(tiny_model_dir, tmp_path):
    """Switching our path on must not add keys: the Trainer saves checkpoints while it is on."""
    from peft.utils import get_peft_model_state_dict
    model, _ = add_lora(load_model(tiny_model_dir, packed_experts=Mxfp4Weight), load_recipe(REPO_RECIPE))
    keys = set(model.state_dict())
    adapter = set(get_peft_model_state_dict(model, state_dict=model.state_dict()))
    fastpath.enable(model)
    assert set(model.state_dict()) == keys
    assert set(get_peft_model_state_dict(model, state_dict=model.state_dict())) == adapter
    assert all(".lora_" in k for k in adapter) and any(".experts." in k for k in adapter)
    model.save_pretrained(str(tmp_path), state_dict=model.state_dict())     # as the Trainer's checkpoints call it
    fastpath.disable(model)


def test_qlora_benchmark_smoke_on_cpu(repo_root):
    """The benchmark's CPU smoke command from its docstring: builds packed random weights, trains, estimates."""
    import sys
    proc = run([sys.executable, "benchmarks/qlora_memory.py", "--shape", "tiny", "--device", "cpu", "--runs",
                "1x64,1x64:t16:w0,1x64:h:w0", "--steps", "1", "--warmup", "1", "--optimizer", "adamw_torch"],
               cwd=repo_root)   # CLI_TIMEOUT_S
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 1 x 64 | - |" in proc.stdout and "| 1 x 64 | tiles of 16 |" in proc.stdout and "estimate" in proc.stdout
    assert "| 1 x 64 | host lm_head |" in proc.stdout
