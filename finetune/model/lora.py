"""The base model and its LoRA adapters: device/dtype choice, PEFT set-up, and the coverage report.

LoRA goes on the attention projections (``target_modules``) and on the MoE experts through PEFT's
``target_parameters`` (the 3-D ``mlp.experts.gate_up_proj`` / ``down_proj`` tensors, one low-rank update per expert).
The coverage report counts trainable parameters per group (attention, experts, router, other) and per layer, so a
recipe that asked for experts and matched none fails here, before any training.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from finetune.kernels.packed import Mxfp4Weight
from finetune.recipe import Recipe
from inference.errors import UserError
from inference.model.checkpoint import load_model


def pick_device(recipe: Recipe) -> tuple[torch.device, str]:
    """The device to train on and why."""
    want = recipe.model.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device: cuda requested but no CUDA device is available")
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), "no CUDA device" if want == "auto" else "model.device=cpu"
    return torch.device("cuda"), "CUDA available" if want == "auto" else "model.device=cuda"


def pick_dtype(recipe: Recipe, device: torch.device) -> tuple[torch.dtype, str]:
    """The weight dtype and why (bf16 on CUDA, fp32 on CPU unless the recipe says otherwise)."""
    if recipe.model.dtype != "auto":
        return getattr(torch, recipe.model.dtype), f"model.dtype={recipe.model.dtype}"
    if device.type == "cuda":
        return torch.bfloat16, "auto on CUDA"
    return torch.float32, "auto on CPU (bf16 matmuls are slow there)"


def pick_quantization(recipe: Recipe, device: torch.device) -> tuple[str, str]:
    """How the base weights are held (``none``, ``mxfp4`` or ``nf4``) and why.

    ``auto`` keeps the experts packed in MXFP4 on CUDA (4.25 bits per weight instead of 16) and decodes them at
    load on the CPU, where the decode in every expert matmul would cost more than the memory it saves.
    """
    want = recipe.model.quantization
    if want != "auto":
        return want, f"model.quantization={want}"
    if device.type == "cuda":
        return "mxfp4", "auto on CUDA"
    return "none", "auto on CPU"


def expert_parameter_names(recipe: Recipe) -> list[str]:
    return [f"mlp.experts.{name}" for name in recipe.lora.target_experts]


def add_lora(model, recipe: Recipe):
    """Wrap ``model`` with PEFT LoRA as the recipe says; a UserError when a target matches nothing."""
    from peft import LoraConfig, get_peft_model

    lora = recipe.lora
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in names]
    if missing:
        raise UserError(f"lora.target_modules: {missing} match no module of this model "
                        f"(attention projections are q_proj, k_proj, v_proj, o_proj)")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules) or None,
                        target_parameters=expert_parameter_names(recipe) or None,
                        bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora: PEFT could not place the adapters ({exc})") from None
    report = coverage(peft_model)
    if recipe.lora.target_experts and report["groups"].get("experts", 0) == 0:
        raise UserError(f"lora.target_experts: {recipe.lora.target_experts} matched no expert parameters of this "
                        "model; refusing to train without them")
    return peft_model, report


_GROUPS = (("experts", re.compile(r"\.mlp\.experts\.")), ("router", re.compile(r"\.mlp\.router\.")),
           ("attention", re.compile(r"\.self_attn\.")))


def coverage(model) -> dict:
    """Trainable parameter counts: per group, per layer and group, and the total."""
    groups, per_layer = defaultdict(int), defaultdict(lambda: defaultdict(int))
    total = trainable = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        trainable += p.numel()
        group = next((g for g, rx in _GROUPS if rx.search(name)), "other")
        groups[group] += p.numel()
        layer = re.search(r"\.layers\.(\d+)\.", name)
        per_layer[int(layer.group(1)) if layer else -1][group] += p.numel()
    return {"trainable": trainable, "total": total, "groups": dict(groups),
            "per_layer": {str(k): dict(v) for k, v in sorted(per_layer.items())}}


def format_coverage(report: dict) -> str:
    """The coverage report as a small table."""
    cols = ["attention", "experts", "router", "other"]
    lines = [f"LoRA coverage: {report['trainable']:,} trainable of {report['total']:,} parameters "
             f"({100 * report['trainable'] / max(report['total'], 1):.3f}%)",
             "  layer " + "".join(f"{c:>12}" for c in cols)]
    for layer, groups in report["per_layer"].items():
        label = layer if layer != "-1" else "-"
        lines.append(f"  {label:>5} " + "".join(f"{groups.get(c, 0):>12,}" for c in cols))
    lines.append("  total " + "".join(f"{report['groups'].get(c, 0):>12,}" for c in cols))
    return "\n".join(lines)


def _is_nf4(p) -> bool:
    return type(p).__name__ == "Params4bit"   # by name: bitsandbytes is imported only when nf4 is asked for


def is_quantized(model) -> bool:
    """Whether the (PEFT-wrapped) model holds quantized base weights: packed MXFP4 experts or NF4 linears."""
    return any(isinstance(p, Mxfp4Weight) or _is_nf4(p) for p in model.parameters())


def held_bytes(p: torch.Tensor) -> int:
    """Bytes a parameter really holds: a packed MXFP4 weight its blocks and scales, an NF4 one its packed codes."""
    if isinstance(p, Mxfp4Weight):
        return p.packed_bytes
    return p.untyped_storage().nbytes() if _is_nf4(p) else p.numel() * p.element_size()


class HostEmbedding(torch.nn.Module):
    """A frozen input embedding kept in host memory: rows are looked up on the CPU and sent to the ids' device.

    gpt-oss's embedding is 201,088 x 2,880 (1.08 GiB in bf16) while a step reads a few thousand rows of it (12 MB
    per 2,048 tokens), so with a GPU too small for everything it is the cheapest gigabyte to move. ``weight`` is a
    plain attribute, not a parameter, so ``model.to(device)`` (the Trainer calls it) leaves it on the host.
    """

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.weight = embedding.weight.detach().to("cpu")                     # (V, H)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.padding_idx = embedding.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids.to("cpu"), self.weight)   # (B, T, H) on the host
        return rows.to(input_ids.device, non_blocking=True)


class HostLMHead(torch.nn.Module):
    """A frozen output layer kept in (pinned) host memory, the other 1.08 GiB of gpt-oss's vocabulary.

    Training never computes every logit: the loss reads the layer in slices of vocabulary rows
    (:func:`finetune.kernels.loss.streamed_cross_entropy`, chosen by ``weighted_loss_sum`` for this module), twice a
    step, about 2.2 GB over PCIe. ``forward`` (all logits, for small inputs) streams it the same way. ``weight`` is a
    plain attribute, so ``model.to(device)`` leaves it on the host, as :class:`HostEmbedding`'s.
    """

    streamed = True      # what finetune.kernels.loss.weighted_loss_sum looks for

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        if head.bias is not None:
            raise ValueError("an output layer with a bias cannot be kept in host memory")
        weight = head.weight.detach().to("cpu")                                 # (V, H)
        self.weight = weight.pin_memory() if torch.cuda.is_available() else weight
        self.bias = None
        self.out_features, self.in_features = self.weight.shape

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from finetune.kernels.loss import head_slices
        return torch.cat([hidden @ w.T for _, w in head_slices(self.weight, hidden.device)], dim=-1)


def load_for_training(recipe: Recipe, model_dir, device: torch.device, dtype: torch.dtype,
                      quantization: str = "none", embedding: str = "gpu", lm_head: str = "gpu"):
    """Base model (eager attention: the reference path, and the only one gpt-oss supports on CPU) + LoRA.

    ``quantization``: ``none`` (experts decoded to ``dtype``), ``mxfp4`` (experts kept packed, frozen) or ``nf4``
    (mxfp4 plus NF4 attention projections). ``embedding``, ``lm_head``: ``cpu`` keeps the input embedding, the output
    layer, in host memory.
    """
    host_embedding = embedding == "cpu" and device.type != "cpu"
    host_head = lm_head == "cpu" and device.type != "cpu"
    model = load_model(model_dir, dtype=dtype, device=device, attn_implementation="eager",
                       packed_experts=Mxfp4Weight if quantization in ("mxfp4", "nf4") else None,
                       cpu_keys=(("model.embed_tokens.weight",) if host_embedding else ()) +
                       (("lm_head.weight",) if host_head else ()))
    if host_embedding:
        model.model.embed_tokens = HostEmbedding(model.model.embed_tokens)
    if host_head:
        model.lm_head = HostLMHead(model.lm_head)
    if quantization == "nf4":
        from finetune.model.quantize import quantize_attention_nf4
        quantize_attention_nf4(model, compute_dtype=dtype)
    model.config.use_cache = False
    # What PEFT writes as base_model_name_or_path in adapter_config.json (the recipe's name, not a cache path).
    model.config._name_or_path = recipe.model.name_or_path
    model.name_or_path = recipe.model.name_or_path
    peft_model, report = add_lora(model, recipe)
    if quantization == "nf4":
        # The flag made PEFT pick its 4-bit LoRA layer; left set, TRL's SFTTrainer would cast every trainable
        # parameter to bf16 (fp32 models included). LoRA weights stay fp32 master weights, as in every other mode.
        model.is_loaded_in_4bit = False
    return peft_model, report
