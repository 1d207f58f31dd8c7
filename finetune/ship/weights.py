"""Whether a merged export holds the merge: every tensor the adapter changes, read back from the export's files and
held against the exact merged weight, number by number (bf16) or 32-value group by group (MXFP4).

Why it exists: the layer-by-layer logits check (:mod:`finetune.ship.parity`) sees an expert's update only through the
probe tokens routed to that expert. At gpt-oss-20b size a merge that lost one expert's whole LoRA update kept 0.998 of
the adapter's effect in that layer and passed. Weights do not depend on routing: this check does.

The reference is formed here, not by the merge: ``x = W + scale * B A`` in float64 from the base checkpoint's decoded
weight and the adapter file. A written number (bf16) or group (MXFP4) passes when it is the format's nearest encoding
of ``x``, up to what the merge's float32 arithmetic may legitimately move:

- float32 forms ``W + scale * sum_r B A`` with an error of at most ``(r + 2) * 2**-24 * (|W| + scale * sum_r |B||A|)``
  per element (r products summed, one scaling, one addition). ``slack`` is four times that bound.
- bf16: ``|written - x| <= |bf16(x) - x| + slack``. A correct float32 merge can differ from ``bf16(x)`` only where
  ``x`` lies within its float32 error of a rounding midpoint, and then by that distance (twice it at most).
- MXFP4 (the export's scale rounding): the group's squared error ``||written - x||^2`` may exceed the nearest
  encoding's by ``sum 2 (|written - x| + |nearest - x| + 2 slack) slack``, the most a perturbation of ``slack`` per
  element can change which encoding is nearest. Groups whose largest magnitude sits within ``slack`` of a boundary of
  the scale rules (a power of two, or six times one) may take either scale; they are counted, not judged.

Anything else (a lost expert, a wrong scale or transpose, a tensor from the wrong layer, a missing tensor) leaves
numbers that are not a rounding of the merge, and the check names the tensor and the experts. It also reports how much
of the adapter's update each tensor kept in weight space, beside what the format's nearest encoding keeps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from inference.model import mxfp4
from inference.model.adapters import read_adapter
from inference.model.checkpoint import TensorFiles, read_config

SLACK_FACTOR = 4                 # times float32's error bound for the merge's sum (see the module docstring)
CHUNK_BYTES = 1 << 29            # float64 bytes of one expert chunk: the check's temporaries stay a few GiB at 120b


@dataclass
class TensorAccount:
    """One adapted tensor of the export against the exact merge.

    ``values``: numbers (bf16) or 32-value groups (MXFP4) checked; ``differ``: how many are not the format's nearest
    encoding of the exact merge (rounding ties included); ``wrong``: how many are farther from it than float32's slack
    allows (not a rounding of the merge); ``ambiguous``: MXFP4 groups at a scale-rule boundary (either scale is right).
    ``kept`` / ``kept_nearest``: ``<written - W, delta> / ||delta||^2`` for the export and for the nearest encoding;
    ``min_expert_kept``: the lowest per-expert ``kept`` (experts only) and ``wrong_experts`` those with wrong values."""

    name: str
    values: int
    differ: int
    wrong: int
    kept: float
    kept_nearest: float
    ambiguous: int = 0
    min_expert_kept: float | None = None
    min_expert: int | None = None
    wrong_experts: list[int] = field(default_factory=list)
    problem: str | None = None   # the tensor could not be checked at all (missing, wrong shape or dtype)


@dataclass
class WeightCheck:
    """The export's adapted tensors read back (:class:`TensorAccount` each). Passes when every one is present and no
    number or group is wrong."""

    consumer: str
    fmt: str                     # "bf16" or "mxfp4": how the export stores experts
    tensors: list[TensorAccount]
    against: str = "exact merge (base + adapter in float64)"
    decides: bool = True
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.failures = []
        for t in self.tensors:
            if t.problem:
                self.failures.append(f"{t.name}: {t.problem}")
            elif t.wrong:
                unit = "groups" if self.fmt == "mxfp4" and ".experts." in t.name else "values"
                experts = f" (experts {_ranges(t.wrong_experts)})" if t.wrong_experts else ""
                self.failures.append(f"{t.name}: {t.wrong:,} of {t.values:,} {unit}{experts} are not a rounding of "
                                     f"the merge (update kept {t.kept:.4f}, nearest encoding keeps "
                                     f"{t.kept_nearest:.4f})")
        self.passed = not self.failures

    def summary(self) -> dict:
        checked = [t for t in self.tensors if not t.problem]
        experts = [t for t in checked if t.min_expert_kept is not None]
        worst = min(experts, key=lambda t: t.min_expert_kept) if experts else None
        return {"tensors": len(self.tensors), "values": sum(t.values for t in checked),
                "differ": sum(t.differ for t in checked), "wrong": sum(t.wrong for t in checked),
                "ambiguous": sum(t.ambiguous for t in checked),
                "min_kept": min((t.kept for t in checked), default=None),
                "min_kept_nearest": min((t.kept_nearest for t in checked), default=None),
                "min_expert_kept": worst.min_expert_kept if worst else None,
                "min_expert": f"{worst.name} expert {worst.min_expert}" if worst else None}

    def line(self) -> str:
        s = self.summary()
        status = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures[:3]) + (
            f"; and {len(self.failures) - 3} more tensors" if len(self.failures) > 3 else "")
        kept = "" if s["min_kept"] is None else (f", update kept in weight space ≥ {s['min_kept']:.4f} per tensor "
                                                 f"(the nearest encoding's ≥ {s['min_kept_nearest']:.4f})")
        if s["min_expert_kept"] is not None:
            kept += f", ≥ {s['min_expert_kept']:.4f} per expert ({s['min_expert']})"
        amb = f", {s['ambiguous']:,} at a scale boundary" if s["ambiguous"] else ""
        return (f"{self.consumer} vs {self.against}, weights read back: {s['tensors']} adapted tensors, "
                f"{s['values']:,} {'values and groups' if self.fmt == 'mxfp4' else 'values'} checked, "
                f"{s['differ']:,} differ from the nearest encoding{' (rounding ties)' if self.passed else ''}{amb}"
                f"{kept}; budget: each the "
                f"format's nearest encoding of the exact merge within float32's error -> {status}")

    def to_dict(self) -> dict:
        return {"consumer": self.consumer, "against": self.against, "kind": "weights read back", "decides": True,
                "passed": self.passed, "failures": self.failures, "format": self.fmt, **self.summary(),
                "per_tensor": [asdict(t) for t in self.tensors]}


def _ranges(ids: list[int], most: int = 8) -> str:
    text = ", ".join(str(i) for i in ids[:most])
    return text + (f" and {len(ids) - most} more" if len(ids) > most else "")


def check(model_dir: str | Path, adapter_dir: str | Path, export_dir: str | Path, experts: str,
          scale_rounding: str = "best", device: str | torch.device = "cpu", consumer: str | None = None,
          chunk_bytes: int = CHUNK_BYTES, progress: bool = True) -> WeightCheck:
    """Read back every tensor of ``export_dir`` that the adapter at ``adapter_dir`` changes in the base at
    ``model_dir`` and hold it against the exact merge (see the module docstring). ``experts`` is how the export stores
    expert weights: ``"bf16"`` (dense, transformers' ``(E, in, out)``) or ``"mxfp4"`` (``*_blocks``/``*_scales``,
    quantized with ``scale_rounding``). Runs on ``device`` a tensor (experts: a chunk of experts) at a time."""
    from tqdm.auto import tqdm

    from finetune.ship.merge import expert_chunks, expert_rows
    device = torch.device(device)
    adapter = read_adapter(adapter_dir, read_config(model_dir), torch.float64, device)
    targets = [(m + ".weight", lora, None) for m, lora in sorted(adapter.linear.items())]
    targets += [(f"{layer}.mlp.experts.{proj}_proj", lora, proj) for layer, loras in sorted(adapter.experts.items())
                for proj, lora in sorted(loras.items())]
    accounts = []
    with TensorFiles(model_dir) as base, TensorFiles(export_dir) as out, tqdm(
            total=len(targets), desc=f"weights read back ({device.type})", unit="tensor", leave=False,
            disable=not progress) as bar:
        for name, lora, proj in targets:
            if proj is None:
                accounts.append(_linear(base, out, name, lora, device))
            else:
                accounts.append(_experts(base, out, name, lora, experts, scale_rounding, device, chunk_bytes,
                                         expert_chunks, expert_rows))
            bar.update(1)
    return WeightCheck(consumer or f"the export's files ({'merged-' + experts})", experts, accounts)


def _slack(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, experts: bool) -> torch.Tensor:
    """Four times float32's error bound for ``W + scale * B A`` per element (float64, ``W``'s shape)."""
    r = A.shape[-2]
    size = (torch.einsum("eri,ero->eoi", A.abs(), B.abs()) if experts else B.abs() @ A.abs()) * scale
    return (W.abs() + size).mul_(SLACK_FACTOR * (r + 2) * 2.0 ** -24)


class _Sums:
    """Running numerators and denominators of one tensor's account (float64 scalars, per expert where asked)."""

    def __init__(self):
        self.values = self.differ = self.wrong = self.ambiguous = 0
        self.along = self.along_nearest = self.norm = 0.0
        self.per_expert: list[tuple[int, float]] = []    # (expert, kept)
        self.wrong_experts: list[int] = []

    def add(self, written, nearest, W, delta, differ, wrong, start: int | None, ambiguous: int = 0) -> None:
        """One chunk: ``written``/``nearest``/``W``/``delta`` ``(e, out, in)`` (or ``(out, in)``) float64; ``differ``
        and ``wrong`` boolean per value or group, same leading dims."""
        self.values += differ.numel()
        self.differ += int(differ.sum())
        self.wrong += int(wrong.sum())
        self.ambiguous += ambiguous
        if start is None:
            along = ((written - W) * delta).sum()
            self.along += float(along)
            self.along_nearest += float(((nearest - W) * delta).sum())
            self.norm += float(delta.square().sum())
            return
        along = ((written - W) * delta).flatten(1).sum(1)                                  # (e,)
        norm = delta.square().flatten(1).sum(1)
        self.along += float(along.sum())
        self.along_nearest += float(((nearest - W) * delta).sum())
        self.norm += float(norm.sum())
        kept = (along / norm.clamp_min(1e-300)).tolist()
        self.per_expert += [(start + i, k) for i, (k, n) in enumerate(zip(kept, norm.tolist())) if n > 0]
        bad = wrong.flatten(1).any(1).nonzero().flatten().tolist()
        self.wrong_experts += [start + i for i in bad]

    def account(self, name: str) -> TensorAccount:
        norm = max(self.norm, 1e-300)
        worst = min(self.per_expert, key=lambda p: p[1]) if self.per_expert else (None, None)
        return TensorAccount(name, self.values, self.differ, self.wrong, self.along / norm, self.along_nearest / norm,
                             self.ambiguous, worst[1], worst[0], self.wrong_experts)


def _problem(name: str, problem: str) -> TensorAccount:
    return TensorAccount(name, 0, 0, 0, 0.0, 0.0, problem=problem)


def _linear(base: TensorFiles, out: TensorFiles, name: str, lora, device) -> TensorAccount:
    """An attention projection: bf16 in every merged export, ``(out, in)``."""
    if name not in out:
        return _problem(name, "missing from the export")
    if out.dtypes[name] != "BF16" or out.shapes[name] != base.shapes[name]:
        return _problem(name, f"written as {out.dtypes[name]} {out.shapes[name]}, expected BF16 {base.shapes[name]}")
    W = base[name].to(device, torch.float64)
    delta = (lora.B @ lora.A) * lora.scale                                               # (out, r) @ (r, in)
    x = W + delta
    slack = _slack(W, lora.A, lora.B, lora.scale, experts=False)
    written = out[name].to(device, torch.float64)
    nearest = x.to(torch.bfloat16).to(torch.float64)
    sums = _Sums()
    sums.add(written, nearest, W, delta, written != nearest, (written - x).abs() > (nearest - x).abs() + slack, None)
    return sums.account(name)


def _experts(base: TensorFiles, out: TensorFiles, name: str, lora, experts: str, scale_rounding: str, device,
             chunk_bytes: int, expert_chunks, expert_rows) -> TensorAccount:
    """One expert projection ``(E, out, in)`` (as the runtime holds it), a chunk of experts at a time."""
    packed = experts == "mxfp4"
    keys = [name + "_blocks", name + "_scales"] if packed else [name]
    missing = [k for k in keys if k not in out]
    if missing:
        return _problem(name, f"{', '.join(missing)} missing from the export")
    sums = _Sums()
    for chunk in expert_chunks(base, name, chunk_bytes // 2):                 # merge's budget is for float32 rows
        W = expert_rows(base, name, chunk, device).double()                   # (e, out, in), exact
        A, B = lora.A[chunk], lora.B[chunk]                                   # (e, r, in), (e, r, out)
        delta = torch.einsum("eri,ero->eoi", A, B) * lora.scale
        x = W + delta
        slack = _slack(W, A, B, lora.scale, experts=True)
        if packed:
            blocks, scales = out.rows(name + "_blocks", chunk), out.rows(name + "_scales", chunk)
            if blocks.dtype != torch.uint8 or scales.shape != x.shape[:-1] + (x.shape[-1] // mxfp4.GROUP,):
                return _problem(name, f"written as {tuple(blocks.shape)}/{tuple(scales.shape)}, which does not "
                                      f"encode {tuple(x.shape)}")
            written = mxfp4.unpack(blocks.to(device), scales.to(device)).double()
            n_blocks, n_scales = mxfp4.pack(x.float(), scale_rounding)
            nearest = mxfp4.unpack(n_blocks, n_scales).double()
            differ = (n_scales != scales.to(device)) | (n_blocks != blocks.to(device)).any(-1)   # (e, out, G)
            wrong, ambiguous = _wrong_groups(written, nearest, x, slack)
            sums.add(written, nearest, W, delta, differ, wrong, chunk.start, int((ambiguous & differ).sum()))
        else:
            rows = out.rows(name, chunk)                                      # transformers' (e, in, out) bf16
            if rows.dtype != torch.bfloat16 or tuple(rows.shape) != (x.shape[0], x.shape[2], x.shape[1]):
                return _problem(name, f"written as {rows.dtype} {tuple(rows.shape)}, expected bf16 "
                                      f"{(x.shape[0], x.shape[2], x.shape[1])} per chunk")
            written = rows.to(device).transpose(1, 2).double()
            nearest = x.to(torch.bfloat16).double()
            sums.add(written, nearest, W, delta, written != nearest,
                     (written - x).abs() > (nearest - x).abs() + slack, chunk.start)
        del W, delta, x, slack, written, nearest
    return sums.account(name)


def _wrong_groups(written, nearest, x, slack) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 32-value group ``(e, out, G)``: wrong (farther from ``x`` than the nearest encoding plus the slack allows,
    and not at a scale boundary) and ambiguous (at a scale boundary)."""
    g = lambda t: t.unflatten(-1, (-1, mxfp4.GROUP))                        # noqa: E731  (e, out, G, 32)
    ew, en, s = g(written - x).abs(), g(nearest - x).abs(), g(slack)
    excess = ew.square().sum(-1) - en.square().sum(-1)
    allowed = (2 * (ew + en + 2 * s) * s).sum(-1)
    amax, smax = g(x).abs().amax(-1), s.amax(-1)
    ambiguous = _near_pow2(amax, smax) | _near_pow2(amax / mxfp4.E2M1_MAX, smax / mxfp4.E2M1_MAX)
    return (excess > allowed) & ~ambiguous, ambiguous


def _near_pow2(v: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Whether ``v`` lies within ``tol`` of a power of two (float64, elementwise; zero is never near one)."""
    m, e = torch.frexp(v)                                      # v = m * 2**e, m in [0.5, 1)
    below = torch.ldexp(torch.full_like(v, 0.5), e)            # the power of two at or below v
    return (v > 0) & ((v - below <= tol) | (2 * below - v <= tol))
