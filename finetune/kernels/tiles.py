"""The MoE block run over a step's tokens in tiles: its memory follows the tile, not the sequence.

gpt-oss's MLP (router + experts) treats every token alone: a token's routing and expert outputs depend on nothing
but its own hidden state. So the block can run over the ``T`` tokens of a step in tiles of ``tile`` tokens with the
same result. Forward, :class:`_TiledMLP` runs the tiles without building a graph and keeps only the block's input
``x (T, H)``; backward, it recomputes one tile at a time with gradients and backpropagates it at once, so the
intermediates that dominate a long sequence's step (each token's ``k`` routed rows through gate_up, SwiGLU and down,
about 170 KB a token for gpt-oss-20b in bf16) exist for one tile only. LoRA gradients accumulate over the tiles into
the parameters' ``.grad`` as usual (a different summation order: equal within fp32 rounding, tested).

Inside a checkpointed decoder layer the block's forward would run a second time in the layer's recompute, only to
produce an output nothing reads (the recompute exists to rebuild saved tensors, and the block saves only its input).
:func:`recompute_context` marks that phase (the ``context_fn`` of ``torch.utils.checkpoint``); the block then returns
an empty result, and the recompute stops right after, having rebuilt the block's input (PyTorch's early stop).

The fast training path installs it (``finetune.model.fastpath``, recipe key ``train.mlp_tile_tokens``).
"""

from __future__ import annotations

import contextlib
import threading

import torch

_phase = threading.local()   # .recomputing: inside a checkpoint's recompute (the autograd thread sets it)


@contextlib.contextmanager
def _recomputing():
    before = getattr(_phase, "recomputing", False)
    _phase.recomputing = True
    try:
        yield
    finally:
        _phase.recomputing = before


def recompute_context(inner=None):
    """``context_fn`` for ``torch.utils.checkpoint``: the (forward, recompute) contexts of ``inner()`` (or none),
    the recompute one also marking the phase for :func:`tiled_mlp`."""
    forward, recompute = inner() if inner is not None else (contextlib.nullcontext(), contextlib.nullcontext())
    stack = contextlib.ExitStack()

    class _Recompute:
        def __enter__(self):
            stack.enter_context(recompute)
            stack.enter_context(_recomputing())

        def __exit__(self, *exc):
            return stack.__exit__(*exc)

    return forward, _Recompute()


def _autocast_state(x: torch.Tensor):
    """(device type, enabled, dtype) of the caller's autocast on ``x``'s device, to recompute under the same
    precision (autograd runs a backward outside the forward's autocast)."""
    device = x.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, tile, x):
        """``run(x_tile (t, H)) -> (t, H)``; ``x (T, H)``."""
        ctx.run, ctx.tile, ctx.autocast = run, tile, _autocast_state(x)
        ctx.save_for_backward(x)
        if getattr(_phase, "recomputing", False):
            # Nothing reads it (see the module docstring). ``detach`` allocates nothing, and it is the one way to
            # make a tensor here that selective checkpointing's replay ignores (its recompute must otherwise run
            # exactly the forward's operations).
            return x.detach()
        with torch.no_grad():
            return torch.cat([run(x[i:i + tile]) for i in range(0, x.shape[0], tile)])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        dx = torch.empty_like(x)
        for i in range(0, x.shape[0], ctx.tile):
            part = x[i:i + ctx.tile].detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.run(part)
            torch.autograd.backward(out, grad[i:i + ctx.tile])
            dx[i:i + ctx.tile] = part.grad
        return None, None, dx


def tiled_mlp(run, x: torch.Tensor, tile: int) -> torch.Tensor:
    """``run`` (a token-wise block, ``(t, H) -> (t, H)``) over ``x (T, H)`` in tiles of ``tile`` tokens; one call
    when the tokens fit one tile or no gradient is needed."""
    if x.shape[0] <= tile or not (torch.is_grad_enabled() and x.requires_grad):
        if torch.is_grad_enabled() or x.shape[0] <= tile:
            return run(x)
        return torch.cat([run(x[i:i + tile]) for i in range(0, x.shape[0], tile)])
    return _TiledMLP.apply(run, tile, x)
