"""PEFT LoRA adapters for the runtime: read an adapter directory, check it fits the base, attach or merge it.

An adapter directory is what PEFT's ``save_pretrained`` writes (and what training here produces):
``adapter_config.json`` + ``adapter_model.safetensors``. Attention projections are ordinary LoRA on ``nn.Linear``
(``lora_A (r, in)``, ``lora_B (out, r)``). Experts come through PEFT's ``target_parameters``: for a 3-D parameter
``(E, in, out)`` PEFT stores ``lora_A (E*r, in)`` (rows grouped by expert) and ``lora_B (out, r*E)`` (columns
``rank * E + expert``), so that expert ``e``'s update is ``delta[e] = scale * A_e^T B_e`` with ``A_e (r, in)`` and
``B_e (r, out)``. Two parameters of one module nest (``experts.base_layer.lora_A`` …); which is which is decided by
shape, since ``gate_up (H -> 2I)`` and ``down (I -> H)`` can never both fit.

Only what the runtime computes exactly is accepted (plain or rsLoRA; no DoRA, biases, patterns or
``modules_to_save``); anything else is a one-line :class:`UserError` naming the adapter and the reason.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from inference.errors import UserError
from inference.model.checkpoint import read_dir_json
from inference.model.runtime import GptOss, Lora, expected_shapes

LINEAR_TARGETS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class Adapter:
    """An adapter's weights keyed by runtime module: ``linear["model.layers.0.self_attn.q_proj"]`` and
    ``experts["model.layers.0"]["gate_up" | "down"]``."""

    path: Path
    linear: dict[str, Lora]
    experts: dict[str, dict[str, Lora]]


def _config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    cfg = read_dir_json(path, "adapter_config.json", "adapter", "PEFT adapter")
    unsupported = [
        (cfg.get("peft_type", "LORA") != "LORA", f"peft_type {cfg.get('peft_type')!r} (only LORA)"),
        (bool(cfg.get("use_dora")), "DoRA"),
        (cfg.get("bias", "none") != "none" or bool(cfg.get("lora_bias")), "trained biases"),
        (bool(cfg.get("modules_to_save")), f"modules_to_save {cfg.get('modules_to_save')}"),
        (bool(cfg.get("rank_pattern")) or bool(cfg.get("alpha_pattern")), "rank_pattern/alpha_pattern"),
        (bool(cfg.get("trainable_token_indices")), "trainable_token_indices"),
    ]
    for bad, what in unsupported:
        if bad:
            raise UserError(f"{path}: adapter uses {what}, which the runtime does not support")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1 or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise UserError(f"{cfg_path}: needs an integer 'r' >= 1 and a numeric 'lora_alpha'")
    return cfg


def read_adapter(path: str | Path, base, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Adapter:
    """Read and check a PEFT adapter against ``base``: a loaded :class:`GptOss` (tensors then follow its device and
    dtype) or just its ``GptOssConfig`` (tensors in ``dtype`` on ``device``; for merging without loading the model)."""
    from safetensors import safe_open
    path = Path(path)
    if isinstance(base, GptOss):
        model_cfg, dev, dt = base.cfg, base.embed.device, base.dtype
    else:
        model_cfg, dev, dt = base, torch.device(device), dtype
    shapes = expected_shapes(model_cfg)
    cfg = _config(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        extra = " (adapter_model.bin is a pickle; re-save it with safe_serialization=True)" if (
            path / "adapter_model.bin").exists() else ""
        raise UserError(f"{path}: no adapter_model.safetensors{extra}")
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                raise UserError(f"{path}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
            pairs.setdefault((m["module"], m["nest"]), {})[m["ab"]] = f.get_tensor(key)
    if not pairs:
        raise UserError(f"{path}: adapter holds no LoRA weights")
    adapter = Adapter(path, {}, {})
    for (module, nest), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            (have,) = ab
            raise UserError(f"{path}: {module} has lora_{have} but no lora_{'B' if have == 'A' else 'A'}")
        A, B = ab["A"].to(dev, torch.float32), ab["B"].to(dev, torch.float32)
        if module.endswith(".mlp.experts"):
            layer = module.removesuffix(".mlp.experts")
            name, lora = _expert_lora(path, model_cfg, shapes, layer, A, B, r, scale)
            if name in adapter.experts.setdefault(layer, {}):
                raise UserError(f"{path}: two LoRA updates for {layer}.mlp.experts.{name}_proj")
            adapter.experts[layer][name] = Lora(lora.A.to(dt), lora.B.to(dt), scale)
        else:
            out_f, in_f = _linear_shape(path, shapes, module)
            if A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
                raise UserError(f"{path}: {module} LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit the "
                                f"base weight ({out_f}, {in_f}); was it trained on a different base model?")
            adapter.linear[module] = Lora(A.to(dt), B.to(dt), scale)
    return adapter


def _module(base: GptOss, module: str):
    """The runtime object for a transformers module path (``model.layers.3.self_attn.q_proj``), or None."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if module == "lm_head":
        return base.lm_head
    if m is None or int(m[1]) >= len(base.layers):
        return None
    layer = base.layers[int(m[1])]
    if m[2] in LINEAR_TARGETS:
        return getattr(layer.attn, m[2].removeprefix("self_attn."))
    if m[2] == "mlp.experts":
        return layer.experts
    return None


def _adaptable(module: str) -> bool:
    """Whether the runtime can carry a LoRA on this transformers module path."""
    m = re.fullmatch(r"model\.layers\.\d+\.(.+)", module)
    return module == "lm_head" or (m is not None and m[1] in LINEAR_TARGETS | {"mlp.experts"})


def _linear_shape(path: Path, shapes: dict, module: str) -> tuple[int, int]:
    """``(out, in)`` of the base weight a linear LoRA targets, or a UserError."""
    shape = shapes.get(module + ".weight")
    if shape is None or not _adaptable(module):
        raise UserError(f"{path}: adapter targets {module!r}, which this base model does not have or the runtime "
                        "cannot adapt (attention projections, lm_head and experts are supported)")
    return shape


def _expert_lora(path: Path, cfg, shapes: dict, layer: str, A, B, r: int, scale: float) -> tuple[str, Lora]:
    """Split PEFT's stacked expert LoRA into per-expert ``A (E, r, in)`` and ``B (E, r, out)``."""
    if layer + ".mlp.experts.gate_up_proj_bias" not in shapes:
        raise UserError(f"{path}: adapter targets {layer}.mlp.experts, which this base model does not have")
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    io = {"gate_up": (H, 2 * I), "down": (I, H)}
    fits = [n for n, (i, o) in io.items() if A.shape == (E * r, i) and B.shape == (o, r * E)]
    if not fits:
        raise UserError(f"{path}: {layer}.mlp.experts LoRA shapes A {tuple(A.shape)}, B {tuple(B.shape)} fit neither "
                        f"gate_up_proj nor down_proj of this base ({E} experts, hidden {H}, intermediate {I}, "
                        f"r {r}); was it trained on a different base model?")
    A_e = A.reshape(E, r, A.shape[1])                              # (E, r, in)
    B_e = B.reshape(B.shape[0], r, E).permute(2, 1, 0)             # (E, r, out)
    return fits[0], Lora(A_e.contiguous(), B_e.contiguous(), scale)


def attach(base: GptOss, name: str, adapter: Adapter) -> None:
    """Make ``adapter`` selectable as ``name`` in every forward call (unmerged: computed beside the base)."""
    if name in base.adapters:
        raise UserError(f"adapter name {name!r} is used twice")
    for module, lora in adapter.linear.items():
        _module(base, module).loras[name] = lora
    for layer, loras in adapter.experts.items():
        _module(base, layer + ".mlp.experts").loras[name] = loras
    base.adapters.append(name)


def attach_layer(layer, index: int, name: str, adapter: Adapter) -> None:
    """Attach the part of ``adapter`` that belongs to decoder layer ``index`` to a lone :class:`Layer` (the
    layer-streamed forward builds one layer at a time; ``lm_head`` is its caller's)."""
    prefix = f"model.layers.{index}."
    for module, lora in adapter.linear.items():
        if module.startswith(prefix):
            getattr(layer.attn, module.removeprefix(prefix + "self_attn.")).loras[name] = lora
    if f"model.layers.{index}" in adapter.experts:
        layer.experts.loras[name] = adapter.experts[f"model.layers.{index}"]


def merge(base: GptOss, adapter: Adapter) -> None:
    """Fold ``adapter`` into the base weights for good (merged experts are held dense, in the base dtype)."""
    for module, lora in adapter.linear.items():
        _module(base, module).merge(lora)
    for layer, loras in adapter.experts.items():
        _module(base, layer + ".mlp.experts").merge(loras)
