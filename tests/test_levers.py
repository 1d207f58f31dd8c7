"""The memory levers for long sequences give the same loss and LoRA gradients as without them (fp32, CPU, tiny model).

- ``train.mlp_tile_tokens``: the MoE blocks run over the step's tokens in tiles (finetune.kernels.tiles), forward
  and backward; inside a checkpointed layer the recompute skips the block.
- ``train.offload_activations``: transformers' own ``offload`` holds each checkpointed layer's input in pinned host
  memory. It needs a GPU (pinned memory; on a CPU run the activations are in host memory already), so its equality
  and its saving are tested in ``tests/gpu/test_qlora_cuda.py``; here, that the Trainer's arguments carry it.
- ``model.lm_head: cpu``: the output layer in host memory, read by the loss in slices of vocabulary rows
  (finetune.kernels.loss.streamed_cross_entropy).

Tiled is compared with the same model's untiled step, with float64 as the measure of fp32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_fp32_close, float64

from finetune.kernels.loss import weighted_loss_sum
from finetune.model import fastpath
from tests.test_fastpath import _batch, _loss_and_grads, _peft_tiny


class _RouterTokens:
    """Tokens seen by each call of every layer's router (a forward hook): which tiles ran, and how often."""

    def __init__(self, model):
        self.calls: list[int] = []
        self.handles = [layer.mlp.router.register_forward_hook(self._hook)
                        for layer in model.get_base_model().model.layers]

    def _hook(self, module, args, out):
        self.calls.append(args[0].shape[0])

    def remove(self):
        for h in self.handles:
            h.remove()


def _step(model, batch, tile=0, checkpointing=True, offload=False):
    with fastpath.patched(model, mlp_tile=tile):
        if checkpointing:
            fastpath.enable_checkpointing(model, offload=offload)
        counter = _RouterTokens(model)
        try:
            loss, grads = _loss_and_grads(model, batch)
        finally:
            counter.remove()
        model.get_base_model().activation_checkpointing_disable()
    return loss, grads, counter.calls


@pytest.mark.parametrize("tile", [7, 64])
def test_tiled_moe_blocks_give_the_same_loss_and_gradients(tiny_model, tmp_path, tile):
    model = _peft_tiny(tiny_model, tmp_path)
    model.train()
    batch = _batch()                                      # 2 rows x 90 tokens, the second right-padded
    tokens = batch[0].numel()
    layers = len(model.get_base_model().model.layers)
    ref_loss, ref, ref_calls = _step(model, batch)
    loss, grads, calls = _step(model, batch, tile)
    exact_loss, exact, _ = _step(float64(copy.deepcopy(model)), batch)

    # untiled: each layer's block runs on all tokens in the forward and again in the checkpoint's recompute
    assert ref_calls == [tokens] * (2 * layers)
    # tiled: forward tiles, then the backward's tiles; the recompute skipped the block (else 3x the tokens)
    per_pass = [min(tile, tokens - i) for i in range(0, tokens, tile)]
    assert sorted(calls) == sorted(per_pass * (2 * layers)) and max(calls) <= tile
    assert_fp32_close(loss, ref_loss, exact_loss, "loss")
    assert grads.keys() == ref.keys() and any(".experts." in n for n in grads)
    for name in grads:
        assert ref[name].abs().max() > 0, name
        assert_fp32_close(grads[name], ref[name], exact[name], name)


def test_tiled_moe_blocks_without_checkpointing_and_without_gradients(tiny_model, tmp_path):
    """Tiling does not depend on checkpointing; under no_grad (evaluation) the tiles run and nothing is kept."""
    model = _peft_tiny(tiny_model, tmp_path)
    batch = _batch()
    ref_loss, ref, _ = _step(model, batch, checkpointing=False)
    loss, grads, calls = _step(model, batch, tile=32, checkpointing=False)
    exact_loss, exact, _ = _step(float64(copy.deepcopy(model)), batch, checkpointing=False)
    assert max(calls) <= 32
    assert_fp32_close(loss, ref_loss, exact_loss, "loss")
    for name in grads:
        assert_fp32_close(grads[name], ref[name], exact[name], name)
    with torch.no_grad(), fastpath.patched(model, mlp_tile=32):
        counter = _RouterTokens(model)
        total, weight, _ = weighted_loss_sum(model, *batch)
        counter.remove()
    assert max(counter.calls) <= 32
    assert_fp32_close(total / weight, ref_loss, exact_loss, "loss without gradients")


def test_checkpoint_kwargs_carry_the_levers(tiny_model, tmp_path):
    """What the Trainer gets (and enable_checkpointing installs): offload as transformers' own key, a recompute
    that marks its phase only when the blocks are tiled, and tiled blocks keep no expert outputs."""
    from finetune.kernels.tiles import recompute_context
    model = _peft_tiny(tiny_model, tmp_path)
    with fastpath.patched(model, save=fastpath.SAVE_DEFAULT, mlp_tile=128):
        kwargs = fastpath.checkpoint_kwargs(model, offload=True)
        assert "offload" not in kwargs and kwargs["use_reentrant"] is False     # a model on the CPU: no offload
        assert kwargs["context_fn"].func is recompute_context
        assert kwargs["context_fn"].args[0].args == (fastpath.SAVE_DEFAULT - {"experts"},)
        assert all("forward" in vars(layer.mlp) for layer in model.get_base_model().model.layers)
    assert all("forward" not in vars(layer.mlp) for layer in model.get_base_model().model.layers)
    with fastpath.patched(model):
        assert fastpath.checkpoint_kwargs(model)["context_fn"].func is fastpath._selective_context
    assert fastpath.checkpoint_kwargs(model, offload=True) == {"use_reentrant": False}


@pytest.mark.parametrize("chunk, rows", [(8, 128), (1000, 999), (1, 1000)])
def test_streamed_cross_entropy_is_the_cross_entropy(chunk, rows):
    """Slices of vocabulary rows (targets on both sides of every boundary) and chunks of rows: the per-row losses and
    the hidden states' gradient of the plain expression, to fp32 rounding (float64 as the measure)."""
    from finetune.kernels.loss import linear_cross_entropy, streamed_cross_entropy
    g = torch.Generator().manual_seed(5)
    N, H, V = 37, 16, 1000
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (N,), generator=g)
    scale = torch.rand(N, generator=g)                      # a weighted sum, as the training loss is

    def run(fn, dtype):
        h = hidden.to(dtype, copy=True).requires_grad_()
        losses = fn(h, weight.to(dtype), targets)
        (losses.to(dtype) * scale.to(dtype)).sum().backward()
        return losses.detach(), h.grad

    ours = run(lambda h, w, t: streamed_cross_entropy(h, w, t, chunk, rows), torch.float32)
    ref = run(lambda h, w, t: linear_cross_entropy(h, w, t, chunk), torch.float32)
    exact = run(lambda h, w, t: torch.nn.functional.cross_entropy(h @ w.T, t, reduction="none"), torch.float64)
    for name, a, b, e in zip(("losses", "grad"), ours, ref, exact):
        assert b.abs().max() > 1e-3, name
        assert_fp32_close(a, b, e, name)


def test_output_layer_in_host_memory_gives_the_same_loss_and_gradients(tiny_model, tmp_path):
    """model.lm_head=cpu: the tiny model's 201,088-row output layer as a HostLMHead (13 slices of rows), not a
    parameter, left on the host by .to(); loss and every LoRA gradient are those of the resident layer."""
    from finetune.model.lora import HostLMHead
    model = _peft_tiny(tiny_model, tmp_path)
    model.train()
    batch = _batch()
    ref_loss, ref = _loss_and_grads(model, batch)
    exact_loss, exact = _loss_and_grads(float64(copy.deepcopy(model)), batch)
    host = copy.deepcopy(model)
    base = host.get_base_model()
    resident = base.lm_head
    base.lm_head = HostLMHead(resident)
    assert not any(n.endswith("lm_head.weight") for n, _ in host.named_parameters())
    assert host.to("meta").get_base_model().lm_head.weight.device.type == "cpu"     # .to() leaves it on the host
    host = copy.deepcopy(model)
    host.get_base_model().lm_head = HostLMHead(resident)
    loss, grads = _loss_and_grads(host, batch)
    assert_fp32_close(loss, ref_loss, exact_loss, "loss")
    assert grads.keys() == ref.keys()
    for name in grads:
        assert ref[name].abs().max() > 0, name
        assert_fp32_close(grads[name], ref[name], exact[name], name)
    x = torch.randn(3, resident.in_features)
    assert torch.allclose(host.get_base_model().lm_head(x), resident(x), rtol=1e-5, atol=1e-6)
