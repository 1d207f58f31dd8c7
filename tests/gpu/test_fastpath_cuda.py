"""Our training path's CUDA kernels (flash attention with sinks, grouped_mm expert LoRA) against the references.

Run on the device machine (``pytest tests/gpu``). Each kernel is checked in bf16 on its own inputs: ours is held to
the error that transformers' own eager bf16 computation makes against a float64 reference of the same maths, times 2
-- not to a tolerance picked to pass. The whole model is checked in fp32 on the GPU (tight, as on CPU): in bf16 a
tiny model's LoRA gradients move by several percent between any two implementations (top-k routing near-ties flip,
and every later difference follows), which says nothing about the kernels.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import EPS32, assert_fp32_close

from finetune.kernels import attention
from finetune.kernels.attention import sink_attention
from finetune.kernels.loss import weighted_loss_sum
from finetune.model import fastpath
from tests.test_fastpath import _batch, _eager_attention, _peft_tiny, experts_case, run_experts

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("window", [None, 128])
def test_flash_sink_attention_matches_reference_in_bf16(window):
    g = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D = 2, 333, 16, 2, 64       # gpt-oss's head size and 8:1 grouping; S crosses the window twice
    q, k, v = (torch.randn(B, S, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, generator=g)
    grad = torch.randn(B, S, Hq, D, generator=g)

    def run(fn, dtype, device):
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v, sinks)]
        out = fn(*leaves, 0.125, window)
        out.backward(grad.to(device, dtype))
        return [out.detach()] + [t.grad for t in leaves]

    exact = run(_eager_attention, torch.float64, "cpu")
    theirs = run(_eager_attention, torch.bfloat16, CUDA)
    assert attention.uses_flash(torch.empty(1, device=CUDA, dtype=torch.bfloat16))
    ours = run(sink_attention, torch.bfloat16, CUDA)
    for name, o, t, e in zip(("out", "dq", "dk", "dv", "dsinks"), ours, theirs, exact):
        e = e.to(CUDA)
        err, ref_err = rel(o, e), rel(t, e)
        print(f"{name}: ours {err:.2e}, transformers eager bf16 {ref_err:.2e}")
        assert err <= 2 * ref_err + EPS32, name   # (+ one fp32 ulp: a floor far below any bf16 error)


@pytest.mark.parametrize("window", [None, 128])
def test_packed_flash_attention_is_each_sequences_own_attention_in_bf16(window):
    """Flash attention's variable-length mode on packed rows (data.packing), against float64 attention over each
    sequence alone, held to the error of flash on each sequence alone in bf16 against the same float64."""
    from finetune.kernels.attention import Packed
    from finetune.train.trainer import packed_inputs
    g = torch.Generator().manual_seed(2)
    rows, width, Hq, Hkv, D = [[200, 41, 150], [300, 91]], 400, 16, 2, 64   # the first row ends in 9 pads
    args = packed_inputs(rows, width)
    cu = args["cu_seq_lens_q"].tolist()
    q, k, v = (torch.randn(len(rows), width, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, generator=g)
    grad = torch.randn(len(rows), width, Hq, D, generator=g)

    def per_sequence(dtype, device):
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v, sinks)]
        out = torch.zeros(q.shape, dtype=dtype, device=device)
        for start, end in zip(cu[:-1], cu[1:]):
            b, s = divmod(start, width)
            part = slice(s, s + end - start)
            o = sink_attention(*(t[b:b + 1, part] for t in leaves[:3]), leaves[3], 0.125, window)
            o.backward(grad[b:b + 1, part].to(device, dtype))
            out[b, part] = o[0].detach()
        return [out] + [t.grad for t in leaves]

    exact = per_sequence(torch.float64, "cpu")
    alone = per_sequence(torch.bfloat16, CUDA)
    leaves = [t.to(CUDA, torch.bfloat16).requires_grad_() for t in (q, k, v, sinks)]
    packed = Packed(args["cu_seq_lens_q"].to(CUDA), args["max_length_q"])
    out = sink_attention(*leaves, 0.125, window, packed)
    out.backward(grad.to(CUDA, torch.bfloat16))
    ours = [out.detach()] + [t.grad for t in leaves]
    for name, o, a, e in zip(("out", "dq", "dk", "dv", "dsinks"), ours, alone, exact):
        err, ref_err = rel(o, e.to(CUDA)), rel(a, e.to(CUDA))
        print(f"{name}: packed {err:.2e}, each sequence alone {ref_err:.2e}")
        assert err <= 2 * ref_err + EPS32, name


@pytest.mark.parametrize("packed", [False, True])
def test_flash_backward_per_key_value_head_is_as_exact_as_all_heads_at_once(monkeypatch, packed):
    """Long steps run flash attention's backward one key/value head at a time (WHOLE_BACKWARD_TOKENS, for memory).
    Each head's maths is its own, so its gradients must be as close to float64 as one call over all heads is (flash
    accumulates dq with atomics, so the two need not agree bit for bit)."""
    from finetune.train.trainer import packed_inputs
    g = torch.Generator().manual_seed(4)
    B, S, Hq, Hkv, D = 2, 640, 64, 8, 64              # gpt-oss's heads
    q, k, v = (torch.randn(B, S, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    sinks, grad = torch.randn(Hq, generator=g), torch.randn(B, S, Hq, D, generator=g)
    layout = cuda_layout = None
    if packed:
        args = packed_inputs([[300, 340], [17, 600]], S)
        layout = attention.Packed(args["cu_seq_lens_q"], args["max_length_q"])
        cuda_layout = attention.Packed(args["cu_seq_lens_q"].to(CUDA), args["max_length_q"])

    def grads(dtype, device, whole, where):
        monkeypatch.setattr(attention, "WHOLE_BACKWARD_TOKENS", whole)
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v, sinks)]
        sink_attention(*leaves, 0.125, 128, where).backward(grad.to(device, dtype))
        return [t.grad for t in leaves]

    exact = grads(torch.float64, "cpu", 10**9, layout)
    whole = grads(torch.bfloat16, CUDA, 10**9, cuda_layout)
    grouped = grads(torch.bfloat16, CUDA, 0, cuda_layout)
    for name, o, a, e in zip(("dq", "dk", "dv", "dsinks"), grouped, whole, exact):
        err, ref_err = rel(o, e.to(CUDA)), rel(a, e.to(CUDA))
        print(f"{name}: per key/value head {err:.2e}, all heads at once {ref_err:.2e}")
        assert err <= 2 * ref_err + EPS32, name


def test_grouped_expert_lora_matches_reference_in_bf16():
    """The expert layer's kernels (grouped_mm, fused epilogues, LoRA side path) with the routing given: ours in bf16
    against float64, held to transformers' eager bf16 experts (LoRA folded into W) against the same float64."""
    case = experts_case(H=256, I=256, E=8, k=4, T=1000, r=16, seed=7)
    exact = run_experts(case, False)
    theirs = run_experts(case, False, torch.bfloat16, CUDA)
    ours = run_experts(case, True, torch.bfloat16, CUDA)
    names = ["out", "dx", "d_routing", "d_gate_up_A", "d_gate_up_B", "d_down_A", "d_down_B"]
    for who, result in (("ours", ours), ("transformers", theirs)):
        assert all(g is not None for g in result[1]), (who, [n for n, g in zip(names[1:], result[1]) if g is None])
    for name, o, t, e in zip(names, [ours[0]] + ours[1], [theirs[0]] + theirs[1], [exact[0]] + exact[1]):
        err, ref_err = rel(o, e.to(CUDA)), rel(t, e.to(CUDA))
        print(f"{name}: ours {err:.2e}, transformers eager bf16 {ref_err:.2e}")
        assert err <= 2 * ref_err + EPS32, name   # (+ one fp32 ulp: a floor far below any bf16 error)


def _model_grads(tiny_model_dir, tmp_path, batch, dtype, fast, checkpointing=False):
    from inference.model.checkpoint import load_model
    model = _peft_tiny(load_model(tiny_model_dir, dtype, CUDA), tmp_path)
    model.get_base_model().set_experts_implementation("eager")
    if fast:
        fastpath.enable(model)
    if checkpointing:   # installed as training installs it: the path's selective policy
        fastpath.enable_checkpointing(model)
        model.get_base_model().enable_input_require_grads()
    model.train()
    with fastpath.autocast(model) if fast else contextlib.nullcontext():   # as finetune.train.trainer runs it
        total, weight, _ = weighted_loss_sum(model, *batch)
    loss = total / weight
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_fast_path_wiring_on_cuda_matches_reference_in_fp32(tiny_model_dir, tmp_path):
    """The whole path on the GPU (fused epilogues compiled for CUDA, PEFT wiring) in fp32 against the eager
    transformers + PEFT reference: loss and every LoRA gradient, as tight as on CPU."""
    batch = [t.to(CUDA) for t in _batch()]
    ref_loss, ref = _model_grads(tiny_model_dir, tmp_path, batch, torch.float32, False)
    loss, ours = _model_grads(tiny_model_dir, tmp_path, batch, torch.float32, True)
    # the reference again in float64 (same seeded LoRA values): its fp32 run's distance sets the tolerances
    exact_loss, exact = _model_grads(tiny_model_dir, tmp_path, batch, torch.float64, False)
    assert_fp32_close(loss, ref_loss, exact_loss, "loss")
    for name in ref:
        assert ref[name].abs().max() > 0, name
        assert_fp32_close(ours[name], ref[name], exact[name], name)


def test_selective_checkpointing_changes_nothing_in_bf16(tiny_model_dir, tmp_path):
    """Saved expert matmuls and flash outputs, the rest recomputed: the same kernels on the same inputs, so the
    gradients equal those of the same path without checkpointing."""
    batch = [t.to(CUDA) for t in _batch()]
    loss, plain = _model_grads(tiny_model_dir, tmp_path, batch, torch.bfloat16, True)
    ckpt_loss, ckpt = _model_grads(tiny_model_dir, tmp_path, batch, torch.bfloat16, True, checkpointing=True)
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=0)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)


def test_streamed_cross_entropy_from_host_memory_is_as_exact_as_the_resident_layer_in_bf16():
    """model.lm_head=cpu on CUDA: the output layer in pinned host memory, read in slices (non-blocking copies on the
    compute stream) against bf16 hidden states; losses and the hidden states' gradient as close to float64 as the
    resident layer's chunked loss."""
    from finetune.kernels.loss import linear_cross_entropy, streamed_cross_entropy
    g = torch.Generator().manual_seed(6)
    N, H, V = 700, 2880, 50_000
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.02
    targets = torch.randint(0, V, (N,), generator=g)
    scale = torch.rand(N, generator=g)

    def run(fn, h, w):
        h = h.clone().requires_grad_()
        losses = fn(h, w, targets.to(h.device))
        (losses.float() * scale.to(h.device)).sum().backward()
        return [losses.detach(), h.grad]

    exact = run(lambda h, w, t: torch.nn.functional.cross_entropy(h @ w.T, t, reduction="none"),
                hidden.double(), weight.double())
    hb, wb = hidden.to(CUDA, torch.bfloat16), weight.to(torch.bfloat16)
    resident = run(lambda h, w, t: linear_cross_entropy(h, w, t, 256), hb, wb.to(CUDA))
    streamed = run(lambda h, w, t: streamed_cross_entropy(h, w, t, 256, 16384), hb, wb.pin_memory())
    for name, o, a, e in zip(("losses", "grad"), streamed, resident, exact):
        err, ref_err = rel(o, e.to(CUDA)), rel(a, e.to(CUDA))
        print(f"{name}: streamed {err:.2e}, resident {ref_err:.2e}")
        assert err <= 2 * ref_err + EPS32, name
