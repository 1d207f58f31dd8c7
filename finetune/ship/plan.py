"""What an export will do, said before it starts: formats, output sizes, disk needed and free, where the checks run,
and a rough time. A destination whose disk cannot hold what will be written there is refused here, before anything
is written.

Sizes come from the safetensors headers (nothing is read but the headers):

- ``peft``: the adapter file; ``gguf-lora``: the adapter in float32 plus the base as GGUF (experts stay MXFP4);
- ``merged-mxfp4`` / ``gguf`` / ``ollama``: about the base's size (the experts keep 4.25 bits per weight); ``gguf``
  and ``ollama`` without a ``merged-mxfp4`` beside them build that merge in scratch space first;
- ``merged-bf16``: every expert decoded to bf16 (4 bytes per packed byte), the scales dropped.

Everything is built beside its destination and renamed into place, so scratch space counts on the destination's
filesystem. The time is an estimate from throughputs measured so far (:data:`RATES`), and says where they come from.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from inference.errors import UserError
from inference.model.checkpoint import TensorFiles

GiB = 1 << 30
HEADROOM = 1 * GiB          # left free on a filesystem after the export (logs, other writers, filesystem metadata)
# Throughputs measured so far, bytes per second, and a fixed cost (imports, CUDA start-up), never the fastest run seen:
# the reference (model bytes), a peft export's checks (model bytes), a merge with its checks (output bytes), a GGUF
# format (output bytes; llama.cpp's check on the CPU dominates). GPU: gpt-oss-20b and -120b shapes on an H100 host,
# float32 checks, caches cold (benchmarks/results/export_scale-{20b,120b}-h100-*2026-12-05.json: 20b peft 40 s,
# merged-mxfp4 63 s, merged-bf16 127 s, gguf 256 s; 120b peft 86 s). CPU: the tiny model on 2 cores, where fixed costs
# weigh more, so a big model on a CPU is a guess from them. The plan says which.
# read_back: a merged export's files read again and held against the exact merge (finetune.ship.weights), output
# bytes: on the CPU measured with two gpt-oss-20b-shaped layers (3.3 GB of bf16 experts in 42-47 s on 2 cores,
# 2026-12-08, while other work shared them); on the GPU not measured yet, taken as the merge's rate.
# gguf_read_back: a written GGUF read back against the writer's plan (finetune.ship.gguf.read_back_*), its bytes,
# plus gguf_header seconds per GGUF (the plan's header made again, the 201k-token vocabulary included, and compared):
# from one 20b-sized expert tensor re-made and compared on 2 cores (0.8 s per 141 MB) and the tiny GGUF (1.5 s in
# all), on either device (CPU work).
RATES = {"cuda": {"fixed": 13.0, "reference": 0.7e9, "peft": 1.3e9, "merge": 0.42e9, "gguf": 0.06e9,
                  "read_back": 0.42e9, "gguf_read_back": 0.17e9, "gguf_header": 2.0},
         "cpu": {"fixed": 5.0, "reference": 25e6, "peft": 25e6, "merge": 15e6, "gguf": 15e6, "read_back": 60e6,
                 "gguf_read_back": 0.17e9, "gguf_header": 2.0}}
RATE_SOURCE = {"cuda": "gpt-oss-20b and -120b shapes on an H100 host", "cpu": "the tiny model on a 2-core CPU"}
# The lossy formats are decided layer by layer (finetune.ship.parity.LayerCheck): each such pass reads the model once,
# layer-streamed in float32, counted here at the reference's throughput (not yet measured at real size).
MXFP4_FAMILY = ("merged-mxfp4", "gguf", "ollama")     # share one MXFP4 merge per command (export.py reuses it)


@dataclass
class Plan:
    formats: dict[str, Path]                            # format -> destination
    sizes: dict[str, int]                               # format -> bytes the export will hold
    scratch: dict[str, int]                             # format -> bytes of scratch space it needs while running
    where: object                                       # parity.Where
    reference: str
    model_bytes: int
    need: dict[Path, int] = field(default_factory=dict)  # filesystem (mount point) -> bytes needed at the peak
    free: dict[Path, int] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        rate = RATES[self.where.device.type]

        def cost(fmt: str) -> float:
            if fmt == "peft":
                return self.model_bytes / rate["peft"]
            if fmt == "ollama" and "gguf" in self.formats:
                return 0.0                                  # a link to the gguf export's file and a Modelfile
            return self.sizes[fmt] / rate["gguf" if fmt in ("gguf", "gguf-lora", "ollama") else "merge"]
        merges = ([self.sizes["merged-bf16"]] if "merged-bf16" in self.formats else []) + (
            [self.model_bytes] if any(f in self.formats for f in MXFP4_FAMILY) else [])   # each merge read back once
        ggufs = ([self.model_bytes] if "gguf" in self.formats or "ollama" in self.formats else []) + (
            [self.sizes["gguf-lora"]] if "gguf-lora" in self.formats else [])      # model.gguf once; base + adapter
        return (rate["fixed"] + (1 + self.layer_passes) * self.model_bytes / rate["reference"]
                + sum(cost(f) for f in self.formats) + sum(merges) / rate["read_back"]
                + sum(ggufs) / rate["gguf_read_back"] + len(ggufs) * rate["gguf_header"])

    @property
    def layer_passes(self) -> int:
        """Layer-streamed passes of the layer-by-layer checks: the trained model's layers once (float32) when a
        lossy format is asked for; for merged-bf16 its bf16 budget and its two consumers (transformers, our
        runtime); one for our runtime on the MXFP4 merge that merged-mxfp4, gguf and ollama share."""
        bf16 = "merged-bf16" in self.formats
        mxfp4 = any(f in self.formats for f in MXFP4_FAMILY)
        return (1 if bf16 or mxfp4 else 0) + (3 if bf16 else 0) + (1 if mxfp4 else 0)

    def lines(self) -> list[str]:
        out = [f"plan: {', '.join(f'{f} ({_size(self.sizes[f])})' for f in self.formats)}",
               f"checks run on: {self.reference}" + (f"; {self.layer_passes} layer-by-layer passes (float32)"
                                                      if self.layer_passes else "")]
        for mount, need in self.need.items():
            out.append(f"disk at {mount}: needs {_size(need)} (with scratch and {_size(HEADROOM)} headroom), "
                       f"{_size(self.free[mount])} free")
        out.append(f"expected time: about {_duration(self.seconds)} (rough: from throughput measured with "
                   f"{RATE_SOURCE[self.where.device.type]})")
        return out

    def check_disk(self) -> None:
        short = [(m, n) for m, n in self.need.items() if n > self.free[m]]
        if short:
            mount, need = short[0]
            raise UserError(f"not enough disk at {mount} for the export: it needs {_size(need)} and "
                            f"{_size(self.free[mount])} is free; free some space or pass --out on another disk")


def make(model_dir: Path, adapter_dir: Path, dests: dict[str, Path], where) -> Plan:
    """The plan for exporting ``adapter_dir`` on ``model_dir`` to ``dests`` (format -> destination)."""
    from finetune.ship.merge import AUX_FILES
    base, dense, packed_expert_bytes = _model_sizes(model_dir)
    aux = sum((model_dir / a).stat().st_size for a in AUX_FILES + ("config.json",) if (model_dir / a).is_file())
    base, dense = base + aux, dense + aux        # merges carry the tokenizer, config and generation defaults
    adapter = (adapter_dir / "adapter_model.safetensors").stat().st_size
    adapter_f32 = _adapter_f32(adapter_dir)
    sizes, scratch = {}, {}
    for fmt in dests:
        sizes[fmt] = {"peft": adapter, "merged-bf16": dense, "merged-mxfp4": base, "gguf": base,
                      "gguf-lora": adapter_f32 + base, "ollama": base}[fmt]
        scratch[fmt] = base if fmt in ("gguf", "ollama") and "merged-mxfp4" not in dests and not (
            fmt == "ollama" and "gguf" in dests) else 0
    plan = Plan(dict(dests), sizes, scratch, where, where.describe(model_dir), base)
    for fmt, dest in dests.items():
        mount = _mount(dest)
        plan.free.setdefault(mount, shutil.disk_usage(_existing(dest)).free)
        plan.need[mount] = plan.need.get(mount, HEADROOM) + sizes[fmt]
    for mount in plan.need:   # formats run one after another; each one's scratch is freed when it finishes
        plan.need[mount] += max(scratch[f] for f, d in dests.items() if _mount(d) == mount)
    return plan


def _model_sizes(model_dir: Path) -> tuple[int, int, int]:
    """Bytes of the checkpoint's tensors as stored, with experts decoded to bf16, and of its packed experts."""
    stored = dense = packed = 0
    with TensorFiles(model_dir) as files:
        for name in files.shapes:
            n = files.nbytes(name)
            stored += n
            if name.endswith("_blocks"):
                dense += 4 * n              # 2 values per byte, 2 bytes per bf16 value
                packed += n
            elif not name.endswith("_scales"):
                dense += n
    return stored, dense, packed


def _adapter_f32(adapter_dir: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt", device="cpu") as f:
        return sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def _mount(path: Path) -> Path:
    path = _existing(path).resolve()
    while not path.is_mount():
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
