"""gpt-oss checkpoint I/O in the Hugging Face layout (config.json + safetensors with MXFP4 experts).

On disk, expert weights are MXFP4 exactly as openai/gpt-oss-20b ships them::

    model.layers.{i}.mlp.experts.gate_up_proj_blocks  uint8 (E, 2*I, H/32, 16)   rows = output features
    model.layers.{i}.mlp.experts.gate_up_proj_scales  uint8 (E, 2*I, H/32)
    model.layers.{i}.mlp.experts.down_proj_blocks     uint8 (E, H, I/32, 16)
    model.layers.{i}.mlp.experts.down_proj_scales     uint8 (E, H, I/32)

In memory (transformers' ``GptOssExperts``) the same weights are ``gate_up_proj (E, H, 2*I)`` and
``down_proj (E, I, H)``: decoded rows become columns. Everything else is stored in bf16 under its transformers name.
Only safetensors is read or written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from inference.errors import UserError
from inference.model import mxfp4
from inference.model.configs import QUANTIZATION_CONFIG

EXPERT_PACKED = ("gate_up_proj", "down_proj")
# Bytes per element of safetensors' dtype names.
DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8}
SHARD_BYTES = 4 << 30     # the most one written safetensors shard holds (HF's own limit is 5 GB)


def read_dir_json(directory: str | Path, name: str, what: str, kind: str) -> dict:
    """``directory/name`` parsed, or a UserError: no such ``what`` directory, not a ``kind`` directory, bad JSON."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{what} directory not found: {directory}")
    path = directory / name
    if not path.is_file():
        raise UserError(f"{directory}: not a {kind} directory (no {name})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    return raw


def read_config(model_dir: str | Path):
    """The ``GptOssConfig`` of an HF-layout gpt-oss directory, or a UserError saying what is wrong with it."""
    from transformers import GptOssConfig
    cfg_path = Path(model_dir) / "config.json"
    raw = read_dir_json(model_dir, "config.json", "model", "gpt-oss model")
    if raw.get("model_type") != "gpt_oss":
        raise UserError(f"{cfg_path}: model_type is {raw.get('model_type')!r}, expected 'gpt_oss'")
    return GptOssConfig.from_dict(raw)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (sharded through an index, or one file); only safetensors is read."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{model_dir}: no model.safetensors (or model.safetensors.index.json); only safetensors is read")


class TensorFiles:
    """A checkpoint's tensors by name across its safetensors files: shapes and dtypes up front, each tensor read only
    when asked for (so a 120b checkpoint streams through one tensor at a time). A context manager::

        with TensorFiles(model_dir) as files:
            files.shapes["lm_head.weight"], files["lm_head.weight"]
    """

    def __init__(self, model_dir: str | Path):
        import contextlib

        from safetensors import safe_open
        self._stack = contextlib.ExitStack()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}          # safetensors' names: "U8", "BF16", ...
        self._files = {}
        for path in safetensors_files(Path(model_dir)):
            f = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            for key in f.keys():
                info = f.get_slice(key)
                self.shapes[key], self.dtypes[key] = tuple(info.get_shape()), info.get_dtype()
                self._files[key] = f

    def __enter__(self) -> "TensorFiles":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._files[key].get_tensor(key)

    def names(self) -> list[str]:
        return sorted(self._files)

    def nbytes(self, key: str) -> int:
        """Bytes ``key`` takes as stored (from the header: nothing is read)."""
        import math
        return math.prod(self.shapes[key]) * DTYPE_BYTES[self.dtypes[key]]

    def rows(self, key: str, rows: slice) -> torch.Tensor:
        """``self[key][rows]``, reading only those rows of the first dimension from disk."""
        return self._files[key].get_slice(key)[rows]


def fingerprint(model_dir: str | Path) -> str:
    """A cheap identity of a checkpoint: sha256 over config.json and, per safetensors file, its name, size and three
    64 KiB samples of its bytes (start, middle, end). Reads well under a MiB even for gpt-oss-120b, yet two models
    with equal shapes but different weights (another seed, another fine-tune) differ."""
    import hashlib
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in safetensors_files(model_dir):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for offset in (0, max(0, size // 2 - 32768), max(0, size - 65536)):
                f.seek(offset)
                h.update(f.read(65536))
    return h.hexdigest()


def load_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    packed_experts: Callable | None = None, cpu_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Read a checkpoint as transformers' ``GptOssForCausalLM`` state dict, MXFP4 experts decoded to ``dtype``, or
    with ``packed_experts`` given, kept packed as ``packed_experts(blocks, scales, dtype)`` (training's
    ``finetune.kernels.packed.Mxfp4Weight``, a tensor that looks dense to PEFT); dense experts stay dense.

    Tensors named in ``cpu_keys`` are read to the CPU whatever ``device`` is (an embedding kept off the GPU).
    """
    from safetensors import safe_open
    model_dir = Path(model_dir)
    raw: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                # one tensor at a time to its device, converted there: no second full copy on the host
                raw[key] = f.get_tensor(key).to("cpu" if key in cpu_keys else device)
    out = {}
    for key, tensor in raw.items():
        if key.endswith("_scales"):
            continue
        if key.endswith("_blocks"):
            base = key[: -len("_blocks")]
            scales = raw.get(base + "_scales")
            if scales is None:
                raise UserError(f"{model_dir}: {key} has no matching {base}_scales")
            if packed_experts:
                out[base] = packed_experts(tensor, scales, dtype)                    # (E, in, out), still packed
            else:   # decoded (E, out, in) -> transformers' (E, in, out)
                out[base] = mxfp4.unpack(tensor, scales, dtype).transpose(1, 2).contiguous()
        else:
            out[key] = tensor.to(dtype)
    return out


def _check_shapes(model, state: dict[str, torch.Tensor], model_dir: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in expected if k in state
             and tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [
            missing and f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}",
            extra and f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}",
            wrong and f"wrong shapes {wrong[:3]}"]))
        raise UserError(f"{model_dir}: weights do not match config.json ({detail})")


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "eager", packed_experts: Callable | None = None,
               cpu_keys: tuple[str, ...] = ()):
    """Build transformers' ``GptOssForCausalLM`` from an HF-layout directory with our own MXFP4 decoding.

    Parameters are created on the meta device and assigned from the checkpoint, so nothing is initialised twice.
    ``packed_experts`` keeps MXFP4 experts packed, as that type (frozen parameters; see :func:`load_state_dict`);
    ``cpu_keys`` names tensors kept on the CPU.
    """
    from transformers import GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    config._attn_implementation = attn_implementation
    state = load_state_dict(model_dir, dtype, device, packed_experts, cpu_keys)
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    _check_shapes(model, state, model_dir)
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        if packed_experts is not None and isinstance(p, packed_experts):
            p.requires_grad_(False)   # packed weights are frozen: the expert matmul gives them no gradient
    with torch.device(device):  # non-persistent buffers (rotary frequencies) are not in the checkpoint
        model.model.rotary_emb = GptOssRotaryEmbedding(config)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left uninitialised after loading: {leftover[:5]}")
    model.config.dtype = dtype
    return model.eval()


def save_checkpoint(state: dict[str, torch.Tensor], config_dict: dict, model_dir: str | Path,
                    weight_dtype: torch.dtype = torch.bfloat16) -> None:
    """Write an HF-layout checkpoint: experts packed to MXFP4 (``*_blocks``/``*_scales``), the rest in ``weight_dtype``.

    ``state`` uses transformers' names and layouts (experts ``(E, in, out)``).
    """
    from safetensors.torch import save_file
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in EXPERT_PACKED and ".mlp.experts." in key:
            blocks, scales = mxfp4.pack(value.transpose(1, 2))  # (E, in, out) -> (E, out, in) rows
            tensors[key + "_blocks"] = blocks  # (E, out, in/32, 16)
            tensors[key + "_scales"] = scales
        else:
            tensors[key] = value.to(weight_dtype)
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    tmp = model_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, model_dir / "model.safetensors")
    cfg = dict(config_dict)
    cfg["quantization_config"] = QUANTIZATION_CONFIG
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def built_aside(target: str | Path, prefix: str):
    """A new folder beside ``target`` to build a model directory in; when the block completes it replaces ``target``
    (the caller has checked that ``target`` may be replaced), and on any error it is deleted: nothing half-written
    ever stands at ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield work
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def make_readable(root: Path) -> None:
    """Ordinary permissions (as the umask allows) for what is shipped: safetensors and temporary directories are
    created owner-only, which would keep a team's serving account from reading the export."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


class ShardWriter:
    """Writes tensors as they come into HF safetensors shards of at most ``shard_bytes`` (``model.safetensors`` when
    one suffices, else ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``): host memory holds one
    shard at most. Shards are written under temporary names and get their final names in :meth:`finish`."""

    def __init__(self, out_dir: str | Path, shard_bytes: int = SHARD_BYTES):
        self.out_dir, self.shard_bytes = Path(out_dir), shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file
        path = self.out_dir / f"shard-{len(self.written):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, sorted(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> list[Path]:
        """Write what is pending, name the shards, write the index; the files written."""
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            os.replace(self.written[0][0], self.out_dir / "model.safetensors")
            return [self.out_dir / "model.safetensors"]
        weight_map, total, files = {}, 0, []
        for i, (path, names) in enumerate(self.written, start=1):
            final = self.out_dir / f"model-{i:05d}-of-{n:05d}.safetensors"
            total += path.stat().st_size
            os.replace(path, final)
            files.append(final)
            weight_map |= {name: final.name for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                                   encoding="utf-8")
        return files
