"""Folding a trained LoRA adapter into a gpt-oss checkpoint, one tensor at a time.

``merge(model_dir, adapter_dir, out_dir, experts="bf16" | "mxfp4", scale_rounding="best")`` writes an HF-layout
gpt-oss directory:

- ``bf16``: every weight in bf16, experts dense as transformers holds them (``gate_up_proj (E, H, 2I)``,
  ``down_proj (E, I, H)``), no ``quantization_config``.
- ``mxfp4``: experts requantized to MXFP4 in the original ``*_blocks``/``*_scales`` layout (``inference.model.mxfp4``: a
  power-of-two scale per 32 values, e2m1 elements rounded to nearest even), so the result loads wherever the original
  checkpoint loads. The scale of each group follows ``scale_rounding`` (``inference.model.mxfp4.SCALE_ROUNDINGS``): by
  default ``"best"``, the lower-error of the OCP rule (``"down"``, saturating above 6) and gpt-oss's own quantizer
  (``"up"``, never saturating), group by group, so never worse than either. Expert tensors the adapter did not touch
  are copied byte for byte.

The sum ``W + scale * B A`` is always formed in float32. Tensors stream through (one expert tensor of one layer is
in memory at a time) and are written in shards of at most ``shard_bytes``, so a 20b/120b merge needs no more memory
than its largest tensor. For ``mxfp4`` every adapted expert tensor gets a quantization report (:class:`TensorReport`):
how far requantizing moved it (and how far each pure convention would have), and how much of the adapter's update
survived the rounding.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from inference.errors import UserError
from inference.model import mxfp4
from inference.model.adapters import Adapter, read_adapter
from inference.model.checkpoint import (
    SHARD_BYTES,
    ShardWriter,
    TensorFiles,
    read_config,
    read_dir_json,
)
from inference.model.configs import QUANTIZATION_CONFIG

EXPERT_FORMATS = ("bf16", "mxfp4")
# Files of a model directory that travel with its weights (tokenizer, chat template, generation defaults).
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
             "chat_template.jinja", "chat_template.json")


@dataclass
class TensorReport:
    """What requantizing one adapted expert tensor ``(E, out, in)`` to MXFP4 did.

    ``rel_error``: ``||Q(W') - W'|| / ||W'||`` with ``W' = W + delta`` and the ``scale_rounding`` used;
    ``rel_error_down`` / ``rel_error_up``: the same had every group taken the down (OCP) or the up (gpt-oss) scale
    (``"best"`` is never above either); ``up_share``: the share of the 32-value groups encoded with the up scale where
    it differs from the down one (``differ_share`` of them do). ``delta_kept``: the share of the adapter's update that
    survived, ``<Q(W') - W, delta> / ||delta||^2`` (1 = all of it, 0 = rounded away); ``delta_rel``:
    ``||delta|| / ||W||``, how big the update was next to the weight.
    """

    name: str
    rel_error: float
    max_abs_error: float
    delta_kept: float
    delta_rel: float
    scale_rounding: str
    rel_error_down: float
    rel_error_up: float
    up_share: float
    differ_share: float


@dataclass
class MergeResult:
    out_dir: Path
    experts: str
    scale_rounding: str | None = None                    # how MXFP4 scales were chosen (None for bf16)
    merged: list[str] = field(default_factory=list)      # tensors the adapter changed
    tensors: list[TensorReport] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"experts": self.experts, "merged_tensors": len(self.merged)}
        if self.scale_rounding is not None:
            out["scale_rounding"] = self.scale_rounding
        if self.tensors:
            n = len(self.tensors)
            out |= {"mean_rel_error": sum(t.rel_error for t in self.tensors) / n,
                    "max_rel_error": max(t.rel_error for t in self.tensors),
                    "mean_rel_error_down": sum(t.rel_error_down for t in self.tensors) / n,
                    "mean_rel_error_up": sum(t.rel_error_up for t in self.tensors) / n,
                    "mean_up_share": sum(t.up_share for t in self.tensors) / n,
                    "mean_delta_kept": sum(t.delta_kept for t in self.tensors) / n,
                    "min_delta_kept": min(t.delta_kept for t in self.tensors)}
        return out

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "tensors": [asdict(t) for t in self.tensors]}


EXPERT_CHUNK_BYTES = 1 << 30   # float32 bytes of one expert chunk's rows: merge temporaries stay a few GiB at 120b


def default_device() -> torch.device:
    """Where the merge math runs: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def merge(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, experts: str = "bf16",
          shard_bytes: int = SHARD_BYTES, progress: bool = True, scale_rounding: str = "best",
          device: str | torch.device | None = None, expert_chunk_bytes: int = EXPERT_CHUNK_BYTES) -> MergeResult:
    """Fold the adapter at ``adapter_dir`` into the gpt-oss at ``model_dir``; write the result to ``out_dir``
    (which must not exist yet or be empty: the caller decides about replacing things). ``scale_rounding`` chooses
    the MXFP4 scales of requantized experts (``experts="mxfp4"``). The math runs on ``device`` (default: the GPU when
    there is one) a tensor, and for experts a chunk of experts (at most ``expert_chunk_bytes`` of float32 rows, at
    least one expert) at a time; what is written goes back to the host."""
    from tqdm.auto import tqdm
    if experts not in EXPERT_FORMATS:
        raise ValueError(f"experts must be one of {EXPERT_FORMATS}, got {experts!r}")
    if scale_rounding not in mxfp4.SCALE_ROUNDINGS:
        raise ValueError(f"scale_rounding must be one of {mxfp4.SCALE_ROUNDINGS}, got {scale_rounding!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    device = torch.device(device) if device is not None else default_device()
    cfg = read_config(model_dir)
    adapter = read_adapter(adapter_dir, cfg, torch.float32, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = ShardWriter(out_dir, shard_bytes)
    result = MergeResult(out_dir, experts, scale_rounding if experts == "mxfp4" else None)
    used: set[str] = set()
    with TensorFiles(model_dir) as src:
        names = [n for n in src.names() if not n.endswith("_scales")]
        total = sum(src.nbytes(n) for n in src.names())
        with tqdm(total=total, desc=f"merge ({experts} experts, {device.type})", unit="B", unit_scale=True,
                  leave=False, disable=not progress) as bar:
            for name in names:
                if name.endswith("_blocks") or (name.endswith(("gate_up_proj", "down_proj"))
                                                and ".mlp.experts." in name):
                    _merge_expert(src, name.removesuffix("_blocks"), adapter, shards, result, used, device,
                                  expert_chunk_bytes)
                    bar.update(src.nbytes(name) + (src.nbytes(name.removesuffix("_blocks") + "_scales")
                                                     if name.endswith("_blocks") else 0))
                else:
                    _merge_other(src, name, adapter, shards, result, used, device)
                    bar.update(src.nbytes(name))
    wanted = set(adapter.linear) | {f"{layer}.mlp.experts.{p}_proj" for layer, loras in adapter.experts.items()
                                    for p in loras}
    unused = sorted(wanted - used)
    if unused:  # read_adapter checked shapes against config.json; a checkpoint lacking the tensor is still possible
        raise UserError(f"{adapter.path}: LoRA updates with no tensor to merge into in {model_dir}: {unused[:5]}")
    shards.finish()
    _write_config(model_dir, out_dir, experts)
    for aux in AUX_FILES:
        if (model_dir / aux).is_file():
            shutil.copy2(model_dir / aux, out_dir / aux)
    return result


def _merge_other(src: TensorFiles, name: str, adapter: Adapter, shards: ShardWriter, result: MergeResult,
                 used: set[str], device: torch.device) -> None:
    tensor = src[name]
    module = name.removesuffix(".weight")
    lora = adapter.linear.get(module) if name.endswith(".weight") else None
    if lora is None:
        shards.add(name, tensor)   # untouched: kept in its stored dtype, bit for bit
        return
    merged = tensor.to(device).float() + (lora.B @ lora.A) * lora.scale          # (out, r) @ (r, in)
    shards.add(name, merged.to(torch.bfloat16).cpu())
    result.merged.append(name)
    used.add(module)


def expert_chunks(src: TensorFiles, base: str, budget: int = EXPERT_CHUNK_BYTES) -> list[slice]:
    """Slices of the expert axis whose float32 rows hold at most ``budget`` bytes (at least one expert each)."""
    key = base + "_blocks" if base + "_blocks" in src else base
    shape = src.shapes[key]
    E = shape[0]
    per_expert = 4 * (shape[1] * shape[2] * shape[3] * 2 if key.endswith("_blocks") else shape[1] * shape[2])
    step = max(1, budget // per_expert)
    return [slice(e, min(E, e + step)) for e in range(0, E, step)]


def expert_rows(src: TensorFiles, base: str, experts: slice, device: torch.device) -> torch.Tensor:
    """Experts ``experts`` of an expert weight as rows ``(e, out, in)`` in float32 on ``device`` (MXFP4 decoded)."""
    if base + "_blocks" in src:
        blocks = src.rows(base + "_blocks", experts).to(device)
        return mxfp4.unpack(blocks, src.rows(base + "_scales", experts).to(device))
    return src.rows(base, experts).to(device).float().transpose(1, 2)            # dense (e, in, out) -> (e, out, in)


def _merge_expert(src: TensorFiles, base: str, adapter: Adapter, shards: ShardWriter, result: MergeResult,
                  used: set[str], device: torch.device, chunk_bytes: int) -> None:
    experts = result.experts
    layer, proj = base.split(".mlp.experts.")
    lora = adapter.experts.get(layer, {}).get(proj.removesuffix("_proj"))
    if lora is None and experts == "mxfp4" and base + "_blocks" in src:
        shards.add(base + "_blocks", src[base + "_blocks"])        # untouched: the original codes, byte for byte
        shards.add(base + "_scales", src[base + "_scales"])
        return
    if lora is not None:
        used.add(base)
        result.merged.append(base)
    outputs: list[list[torch.Tensor]] = [[], []]
    stats = []
    max_abs = kept = delta_sq = rows_sq = 0.0
    for chunk in expert_chunks(src, base, chunk_bytes):
        rows = expert_rows(src, base, chunk, device)                   # (e, out, in) float32
        delta = None
        if lora is not None:
            delta = torch.einsum("eri,ero->eoi", lora.A[chunk], lora.B[chunk]) * lora.scale
        merged = rows if delta is None else rows + delta
        if experts == "bf16":
            outputs[0].append(merged.transpose(1, 2).to(torch.bfloat16).cpu())   # transformers' (e, in, out)
            continue
        if delta is None:                                             # a dense source, quantized: nothing to report
            blocks, scales = mxfp4.pack(merged, result.scale_rounding)  # (e, out, in/32, 16), (e, out, in/32)
        else:   # the codes, and the squared errors of the rounding used and of both pure conventions
            blocks, scales, chunk_stats = mxfp4.pack_with_stats(merged, result.scale_rounding)
            stats.append(chunk_stats)
            quant = mxfp4.unpack(blocks, scales)
            max_abs = max(max_abs, float((quant - merged).abs().max()))
            kept += float(((quant - rows) * delta).sum(dtype=torch.float64))
            delta_sq += float(delta.square().sum(dtype=torch.float64))
            rows_sq += float(rows.square().sum(dtype=torch.float64))
            del quant
        outputs[0].append(blocks.cpu())
        outputs[1].append(scales.cpu())
        del rows, delta, merged
    if experts == "bf16":
        shards.add(base, torch.cat(outputs[0]))
        return
    shards.add(base + "_blocks", torch.cat(outputs[0]))
    shards.add(base + "_scales", torch.cat(outputs[1]))
    if lora is None:
        return
    total = mxfp4.PackStats.combine(stats)
    result.tensors.append(TensorReport(
        base, total.rel_error(), max_abs, kept / max(delta_sq, 1e-30), (delta_sq / max(rows_sq, 1e-30)) ** 0.5,
        total.scale_rounding, total.rel_error("down"), total.rel_error("up"), total.up_share, total.differ_share))


def _write_config(model_dir: Path, out_dir: Path, experts: str) -> None:
    cfg = read_dir_json(model_dir, "config.json", "model", "gpt-oss model")
    if experts == "mxfp4":
        cfg["quantization_config"] = cfg.get("quantization_config") or QUANTIZATION_CONFIG
    else:
        cfg.pop("quantization_config", None)
    cfg["dtype"] = "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
