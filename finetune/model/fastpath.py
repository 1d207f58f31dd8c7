"""Our training path for gpt-oss + LoRA, switched on and off through the libraries' own registries.

- **Experts:** :func:`finetune.kernels.experts.moe_experts` registered in transformers' experts-implementation
  registry as ``finetune_lora``. PEFT keeps owning the adapter: its ``ParamWrapper`` layers on
  ``mlp.experts.gate_up_proj`` / ``down_proj`` hold ``lora_A`` / ``lora_B`` (so ``save_pretrained`` writes the
  usual PEFT adapter), and we read their factors with PEFT's own ``get_delta_factors``. What changes is that the
  outermost wrapper's forward hands the factors to the grouped kernel instead of parametrizing ``W + B A`` for all
  experts.
- **Attention:** :func:`finetune.kernels.attention.sink_attention` registered in transformers'
  ``AttentionInterface`` as ``finetune_sinks``: flash attention with gpt-oss's sinks and sliding window, exact
  forward and backward. It takes no mask (causal and the window are built in), which is exact for right-padded
  batches: a real token never sees a pad after it, and pads carry no loss. :func:`check_right_padded` enforces
  that for every training batch.
- **Loss:** :func:`finetune.kernels.loss.weighted_loss_sum`, which never holds full fp32 logits.
- **Precision:** the forward runs under bf16 autocast (:func:`autocast`) with PEFT's input up-casting switched off
  (its ``cast_input_dtype_enabled``): the LoRA weights stay fp32 master weights, their matmuls run in bf16.

``train.kernels`` in the recipe picks the path: ``auto`` (ours on CUDA, the reference elsewhere), ``fast`` or
``reference`` (transformers' eager attention + PEFT's parametrized experts, the oracle).

This module is the project's one seam for changing library behaviour: :data:`PATCHES` lists every change made to
transformers', PEFT's and torch's objects and why; :func:`patched` (or :func:`enable` / :func:`disable`) applies and
undoes them. Activation checkpointing is installed one way, training and benchmarks alike: transformers' own
``activation_checkpointing_enable`` with :func:`checkpoint_kwargs` (:func:`enable_checkpointing`).
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from finetune.kernels.attention import Packed, sink_attention
from finetune.kernels.experts import moe_experts
from finetune.kernels.tiles import recompute_context, tiled_mlp
from inference.errors import UserError
from inference.model.compiled import compile_works

EXPERTS_IMPL = "finetune_lora"
ATTENTION_IMPL = "finetune_sinks"  # no "flash" in the name: transformers would reroute it to a hub kernel
_STATE = "_finetune_fastpath"   # on the transformers model: [(patch, what to restore)] while the path is on


def _base(model):
    """The transformers model inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _experts_forward(self, hidden_states, router_indices, routing_weights):
    """transformers' experts-interface signature; ``self`` is a ``GptOssExperts``."""
    return moe_experts(hidden_states, router_indices, routing_weights,
                       gate_up=self.gate_up_proj, gate_up_bias=self.gate_up_proj_bias,
                       down=self.down_proj, down_bias=self.down_proj_bias, alpha=self.alpha, limit=self.limit,
                       lora_gate_up=_factors(self, "gate_up_proj"), lora_down=_factors(self, "down_proj"))


def _factors(experts, name):
    """``(lhs (E, in, r), rhs (E, r, out), scaling)`` of the active PEFT adapter on ``experts.<name>``, or None."""
    for wrapper in getattr(experts, "_finetune_lora", ()):
        if wrapper.parameter_name != name or wrapper.disable_adapters or wrapper.merged:
            continue
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if len(active) > 1:
            raise NotImplementedError("the fast expert path supports one active LoRA adapter")
        if active:
            if wrapper._did_swap_in_out_features:
                raise NotImplementedError("expert weights stored (experts, out, in) are not supported")
            return wrapper.get_delta_factors(active[0])
    return None


def _attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                       s_aux=None, **kwargs):
    """transformers' attention-interface signature: ``query (B, Hq, S, D)``, ``key``/``value (B, Hkv, S, D)``."""
    if dropout:
        raise UserError("the fast attention path has no attention dropout")
    # packed rows (data.packing): transformers' flash-attention keyword arguments, made by finetune.train.trainer's
    # collate and passed down by the model's forward
    cu = kwargs.get("cu_seq_lens_q")
    packed = Packed(cu, int(kwargs["max_length_q"])) if cu is not None else None
    out = sink_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), s_aux,
                         scaling, sliding_window, packed)
    return out, None                                                   # (B, S, Hq, D), no weights


def register() -> None:
    """Add our two implementations to transformers' registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPL, _experts_forward)
    AttentionInterface.register(ATTENTION_IMPL, _attention_forward)


def _bypass_forward(self, x, *args, **kwargs):
    """Outermost expert ``ParamWrapper``: call the experts directly; the registered forward adds the LoRA path."""
    return self._finetune_experts(x, *args, **kwargs)


def _expert_chains(model):
    """(outermost module at ``mlp.experts``, list of PEFT ParamWrappers around it, the transformers experts)."""
    for name, module in model.named_modules():
        if not name.endswith("mlp.experts"):
            continue
        wrappers, inner = [], module
        while hasattr(inner, "parameter_name") and hasattr(inner, "base_layer"):   # PEFT ParamWrapper
            wrappers.append(inner)
            inner = inner.base_layer
        yield module, wrappers, inner


SAVE_DEFAULT = frozenset({"experts", "attention"})
# Quantized (QLoRA) training is about memory: keep nothing beyond each layer's input, recompute the rest. The expert
# outputs alone would be 141 MB per gpt-oss-20b layer at 2,048 tokens, 3.4 GB over the 24 layers.
SAVE_QUANTIZED = frozenset()


def _policy(save: frozenset):
    """Selective checkpointing: keep what is expensive to recompute and cheap to hold, recompute the rest.

    ``experts``: the frozen expert matmuls' outputs (both dimensions large; the thin LoRA ones are recomputed);
    ``attention``: the flash attention forward; ``projections``: the q/k/v/o projections. The default (experts +
    attention) holds about 1.3 GiB per gpt-oss-20b layer at 16k tokens a step and removes most of the recomputed
    forward's time.
    """
    from torch.utils.checkpoint import CheckpointPolicy
    aten = torch.ops.aten

    packed_mm = torch.ops.finetune.mxfp4_grouped_mm.default

    def policy(ctx, op, *args, **kwargs):
        if "attention" in save and op is aten._flash_attention_forward.default:
            return CheckpointPolicy.MUST_SAVE
        if "experts" in save and op is aten._grouped_mm.default and min(args[1].shape[-2:]) >= 256:
            return CheckpointPolicy.MUST_SAVE
        if "experts" in save and op is packed_mm:   # the MXFP4 expert matmul: decode + matmul as one op
            return CheckpointPolicy.MUST_SAVE
        if "projections" in save and op in (aten.mm.default, aten.addmm.default) and \
                min(args[-1].shape[-2:]) >= 256:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _selective_context(save: frozenset = SAVE_DEFAULT):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_policy(save))


def checkpoint_kwargs(model, offload: bool = False) -> dict:
    """``activation_checkpointing_kwargs`` for transformers' Trainer: with our path on, selective checkpointing that
    keeps what :data:`SAVE_DEFAULT` (or the ``save`` given to :func:`enable`) names; plain non-reentrant
    checkpointing otherwise; with tiled MoE blocks, a recompute that marks its phase for them
    (:func:`finetune.kernels.tiles.recompute_context`). ``offload`` (recipe ``train.offload_activations``):
    transformers' own ``offload``, which holds what each checkpointed layer keeps (its input) in pinned host memory
    (``torch.autograd.graph.save_on_cpu``; for a model on the GPU only). The Trainer gets these
    (``finetune.train.trainer``), and so does :func:`enable_checkpointing`."""
    enabled = is_enabled(model)
    save = getattr(_base(model), "_finetune_save", None) if enabled else None
    tiled = bool(getattr(_base(model), "_finetune_tile", 0)) if enabled else False
    kwargs = {"use_reentrant": False}
    inner = functools.partial(_selective_context, save) if save else None
    if tiled:
        kwargs["context_fn"] = functools.partial(recompute_context, inner)
    elif inner is not None:   # without it: plain recomputation, no dispatch mode asking a policy about every op
        kwargs["context_fn"] = inner
    if offload and next(model.parameters()).is_cuda:   # on the CPU the activations are in host memory already
        kwargs["offload"] = True
    return kwargs


def enable_checkpointing(model, offload: bool = False) -> None:
    """Activation checkpointing on every decoder layer, installed the one way training and the benchmarks share:
    transformers' own ``activation_checkpointing_enable`` with :func:`checkpoint_kwargs` (what the Trainer calls when
    a recipe sets ``train.gradient_checkpointing``). Call it after :func:`enable` / :func:`disable`: the policy
    follows the path."""
    kwargs = checkpoint_kwargs(model, offload)
    offload = kwargs.pop("offload", False)     # transformers' own argument, as its Trainer pops it
    _base(model).activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)


def autocast(model):
    """The context our path's forward runs in: bf16 autocast for a bf16 model on CUDA (PEFT's LoRA weights are fp32
    master weights; autocast runs their matmuls in bf16 instead of casting every activation up to fp32), else none."""
    import contextlib
    p = next(model.parameters())
    if p.is_cuda and p.dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _norms(base):
    return [m for layer in base.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)] + \
        [base.model.norm]


@dataclass(frozen=True)
class Patch:
    """One change our path makes to a model's library objects: ``apply(model, base)`` makes it and returns what
    ``undo(model, base, state)`` needs to put everything back as it was."""
    name: str
    why: str
    apply: Callable[[Any, Any], Any]
    undo: Callable[[Any, Any, Any], None]


def _set_attention(model, base):
    before = base.config._attn_implementation
    base.set_attn_implementation(ATTENTION_IMPL)
    return before


def _set_experts(model, base):
    before = base.config._experts_implementation
    base.set_experts_implementation(EXPERTS_IMPL)
    return before


def _no_upcast(model, base):
    layers = _tuner_layers(model)
    before = [layer.cast_input_dtype_enabled for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return list(zip(layers, before))


def _restore_upcast(model, base, before):
    for layer, value in before:
        layer.cast_input_dtype_enabled = value


def _bypass_wrappers(model, base):
    changed = []
    for outer, wrappers, experts in _expert_chains(base):
        experts._finetune_lora = wrappers
        if wrappers:
            # a plain reference, not a submodule: registered, the experts' weights would appear a second time in
            # the state dict, and PEFT would write the base experts into every Trainer checkpoint of the adapter
            object.__setattr__(outer, "_finetune_experts", experts)
            outer.forward = types.MethodType(_bypass_forward, outer)
        changed.append((outer, experts))
    return changed


def _restore_wrappers(model, base, changed):
    for outer, experts in changed:
        del experts._finetune_lora
        if "forward" in vars(outer):
            del outer.forward
            del outer._finetune_experts


def _tiled_forward(self, hidden_states):
    """A gpt-oss MLP's forward (``(B, S, H) -> ((B, S, H), router scores)``) over its tokens in tiles of
    ``self._finetune_tile`` (:func:`finetune.kernels.tiles.tiled_mlp`). The router scores, which the decoder layer
    drops, are not returned (a model that asks for router logits keeps the untiled block: see :func:`_tile_mlps`)."""
    b, s, h = hidden_states.shape
    mlp = type(self).forward

    def run(x):                                    # (t, H) -> (t, H)
        return mlp(self, x[None])[0][0]

    return tiled_mlp(run, hidden_states.reshape(b * s, h), self._finetune_tile).reshape(b, s, h), None


def _tile_mlps(model, base):
    tile = getattr(base, "_finetune_tile", 0)
    if not tile or getattr(base.config, "output_router_logits", False):
        return []
    mlps = [layer.mlp for layer in base.model.layers]
    for mlp in mlps:
        mlp._finetune_tile = tile
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return mlps


def _untile_mlps(model, base, mlps):
    for mlp in mlps:
        del mlp.forward
        del mlp._finetune_tile


def _compile_norms(model, base):
    if not (next(base.parameters()).is_cuda and compile_works()):
        return []
    for norm in _norms(base):
        norm.compile(dynamic=True)
    return _norms(base)


def _uncompile_norms(model, base, norms):
    for norm in norms:
        norm._compiled_call_impl = None   # what nn.Module.compile set: back to the eager forward


# Everything our path changes in transformers', PEFT's and torch's objects, and why. Each change is to one model's
# objects (a config value through transformers' own setter, a PEFT layer's switch, an instance attribute), never to
# a library's classes or modules, and :func:`disable` undoes each exactly (tests/test_fastpath.py checks both).
PATCHES: tuple[Patch, ...] = (
    Patch("attention implementation",
          f"'{ATTENTION_IMPL}' through transformers' AttentionInterface registry: flash attention with gpt-oss's "
          "sinks and sliding window, exact backward",
          _set_attention, lambda model, base, before: base.set_attn_implementation(before)),
    Patch("experts implementation",
          f"'{EXPERTS_IMPL}' through transformers' experts registry: grouped matmuls with the LoRA side path, "
          "packed MXFP4 decoded piecewise",
          _set_experts, lambda model, base, before: base.set_experts_implementation(before)),
    Patch("PEFT input up-cast off",
          "each LoRA layer's own cast_input_dtype_enabled switch: bf16 autocast runs the fp32 LoRA weights' "
          "matmuls in bf16 instead of every activation being cast up to fp32",
          _no_upcast, _restore_upcast),
    Patch("expert wrappers bypassed",
          "the outermost PEFT ParamWrapper on mlp.experts calls the experts directly (an instance forward); the "
          "registered experts forward reads the LoRA factors with PEFT's get_delta_factors instead of PEFT "
          "forming W + B A for all experts",
          _bypass_wrappers, _restore_wrappers),
    Patch("MoE blocks tiled",
          "an instance forward on each layer's mlp when train.mlp_tile_tokens is set: the router and experts run "
          "over the step's tokens in tiles, forward and backward (finetune.kernels.tiles), so their "
          "intermediates follow the tile, not the sequence",
          _tile_mlps, _untile_mlps),
    Patch("RMSNorms compiled",
          "nn.Module.compile on CUDA: gpt-oss's fp32 RMSNorm is six elementwise kernels in eager mode, one compiled",
          _compile_norms, _uncompile_norms),
)


def enable(model, save: frozenset | None = None, mlp_tile: int = 0) -> None:
    """Switch a (PEFT-wrapped) gpt-oss model to our path: every change in :data:`PATCHES`; :func:`disable`
    undoes them. Prefer :func:`patched` where the path is needed for a block.

    Its forward must then run under :func:`autocast` (``finetune.train.trainer`` does): PEFT no longer casts activations
    to the fp32 LoRA weights. The path is for training batches (right-padded, no KV cache). ``save``: what
    selective checkpointing keeps (None: :data:`SAVE_DEFAULT`, or :data:`SAVE_QUANTIZED` for a quantized model;
    empty: plain recomputation), installed by :func:`enable_checkpointing` or the Trainer. ``mlp_tile``: tokens per
    tile of the MoE blocks (0: untiled; recipe ``train.mlp_tile_tokens``); tiled blocks keep no expert outputs, so
    ``experts`` leaves ``save``.
    """
    from finetune.model.lora import is_quantized
    register()
    base = _base(model)
    if is_enabled(model):
        return
    save = save if save is not None else SAVE_QUANTIZED if is_quantized(model) else SAVE_DEFAULT
    base._finetune_save = save - {"experts"} if mlp_tile else save
    base._finetune_tile = mlp_tile
    setattr(base, _STATE, [(patch, patch.apply(model, base)) for patch in PATCHES])


def disable(model) -> None:
    """Undo :func:`enable`, in reverse order (nothing to do when the path is off)."""
    base = _base(model)
    applied = getattr(base, _STATE, None)
    if applied is None:
        return
    for patch, before in reversed(applied):
        patch.undo(model, base, before)
    delattr(base, _STATE)
    del base._finetune_save, base._finetune_tile


@contextlib.contextmanager
def patched(model, save: frozenset | None = None, mlp_tile: int = 0):
    """Our path on ``model`` for the block (:func:`enable`), undone on exit whatever happens (:func:`disable`)."""
    enable(model, save, mlp_tile)
    try:
        yield model
    finally:
        disable(model)


def is_enabled(model) -> bool:
    base = _base(model)
    return getattr(base, _STATE, None) is not None


def keep_activations(model, layers: int) -> int:
    """Leave the last ``layers`` decoder layers out of activation checkpointing (the rest stay checkpointed).

    A checkpointed layer runs its forward twice; one that keeps its activations does not, at the cost of holding
    them until its backward (about 3 GiB per gpt-oss-20b layer at 16k tokens a step). Returns how many are kept.
    """
    base = _base(model)
    decoder = base.model.layers
    for i, layer in enumerate(decoder):
        if getattr(layer, "_finetune_checkpointed", None) is None:
            layer._finetune_checkpointed = bool(getattr(layer, "gradient_checkpointing", False))
        layer.gradient_checkpointing = layer._finetune_checkpointed and i < len(decoder) - layers
    return sum(1 for layer in decoder if layer._finetune_checkpointed and not layer.gradient_checkpointing)


def choose(kernels: str, device: torch.device) -> tuple[bool, str]:
    """(use our path?, why) for the recipe's ``train.kernels`` on ``device``."""
    if kernels == "reference":
        return False, "train.kernels=reference"
    if kernels == "fast":
        return True, "train.kernels=fast"
    if device.type == "cuda":
        return True, "auto on CUDA"
    return False, "auto without CUDA: the fast kernels are CUDA kernels"


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Our attention ignores the padding mask, which is exact only when every row is real tokens then pads."""
    if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise UserError("the fast training path needs right-padded batches (a real token follows a pad here); "
                        "set train.kernels=reference")
