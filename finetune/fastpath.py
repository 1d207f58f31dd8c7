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
"""

from __future__ import annotations

import types

import torch

from finetune.kernels.attention import sink_attention
from finetune.kernels.experts import moe_experts
from inference.compiled import compile_works
from inference.errors import UserError

EXPERTS_IMPL = "finetune_lora"
ATTENTION_IMPL = "finetune_sinks"  # no "flash" in the name: transformers would reroute it to a hub kernel
_STATE = "_finetune_fastpath"   # on the transformers model: (attention impl, experts impl) to restore


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
    out = sink_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), s_aux,
                         scaling, sliding_window)
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


def _checkpoint_func(save: frozenset = SAVE_DEFAULT):
    import functools

    from torch.utils.checkpoint import checkpoint
    return functools.partial(checkpoint, use_reentrant=False,
                             context_fn=functools.partial(_selective_context, save))


def checkpoint_kwargs(model) -> dict:
    """``gradient_checkpointing_kwargs`` for the Trainer when our path is on (it re-enables checkpointing itself)."""
    import functools
    save = getattr(_base(model), "_finetune_save", SAVE_DEFAULT)
    if not save:   # plain recomputation: no dispatch mode asking a policy about every operation
        return {"use_reentrant": False}
    return {"use_reentrant": False, "context_fn": functools.partial(_selective_context, save)}


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


def enable(model, selective_checkpointing: bool = True, save: frozenset | None = None) -> None:
    """Switch a (PEFT-wrapped) gpt-oss model to our path. ``disable`` restores what it had.

    Its forward must then run under :func:`autocast` (``finetune.train`` does): PEFT no longer casts activations
    to the fp32 LoRA weights. The path is for training batches (right-padded, no KV cache). ``save``: what
    selective checkpointing keeps (None: :data:`SAVE_DEFAULT`, or :data:`SAVE_QUANTIZED` for a quantized model).
    """
    from finetune.model import is_quantized
    register()
    base = _base(model)
    if getattr(base, _STATE, None) is not None:
        return
    if save is None:
        save = SAVE_QUANTIZED if is_quantized(model) else SAVE_DEFAULT
    base._finetune_save = save
    setattr(base, _STATE, (base.config._attn_implementation, base.config._experts_implementation))
    base.set_attn_implementation(ATTENTION_IMPL)
    base.set_experts_implementation(EXPERTS_IMPL)
    if selective_checkpointing and save:
        # transformers' GradientCheckpointingLayer calls whatever sits in ``_gradient_checkpointing_func``. With
        # nothing to save, plain checkpointing is the same and cheaper: the selective policy is a Python dispatch
        # mode consulted on every operation of the forward and its recomputation (a host-bound cost at small steps).
        for layer in base.model.layers:
            if getattr(layer, "gradient_checkpointing", False):
                layer._finetune_previous_func = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = _checkpoint_func(save)
    if next(base.parameters()).is_cuda and compile_works():
        # gpt-oss's fp32 RMSNorm is six elementwise kernels in eager mode; nn.Module.compile fuses each into one
        for norm in _norms(base):
            norm.compile(dynamic=True)
    # PEFT's own switch: no up-cast of each activation to the fp32 LoRA weights (autocast handles the dtypes)
    for layer in _tuner_layers(model):
        layer.cast_input_dtype_enabled = False
    for outer, wrappers, experts in _expert_chains(base):
        experts._finetune_lora = wrappers
        if wrappers:
            # a plain reference, not a submodule: registered, the experts' weights would appear a second time in
            # the state dict, and PEFT would write the base experts into every Trainer checkpoint of the adapter
            object.__setattr__(outer, "_finetune_experts", experts)
            outer.forward = types.MethodType(_bypass_forward, outer)


def disable(model) -> None:
    base = _base(model)
    state = getattr(base, _STATE, None)
    if state is None:
        return
    attn, experts_impl = state
    base.set_attn_implementation(attn)
    base.set_experts_implementation(experts_impl)
    for layer in base.model.layers:
        if "_finetune_previous_func" in vars(layer):
            layer._gradient_checkpointing_func = layer._finetune_previous_func
            del layer._finetune_previous_func
    for layer in _tuner_layers(model):
        layer.cast_input_dtype_enabled = True
    for norm in _norms(base):
        norm._compiled_call_impl = None   # what nn.Module.compile set: back to the eager forward
    for outer, wrappers, experts in _expert_chains(base):
        experts._finetune_lora = ()
        if "forward" in vars(outer):
            del outer.forward
            del outer._finetune_experts
    setattr(base, _STATE, None)


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
