"""Whether a merged export holds the merge: every tensor the adapter changes, read back from the export's files and
held against the exact merged weight, number by number (bf16) or 32-value group by group (MXFP4); every other tensor
against the base's, bit for bit (the layer checks feed each layer the trained model's input, so they never see the
embedding), and nothing extra.

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
- MXFP4 (the export's scale rounding): the group must be the quantizer's encoding of ``x`` up to ties. On the same
  scale as ``pack(x)``, every value a nearest grid value (as for bf16). On another scale, one the rule weighs for
  ``x`` (down or up), with a squared error ``||written - x||^2`` within ``sum 2 (|written - x| + |nearest - x| + 2
  slack) slack`` of the nearest's, the most a perturbation of ``slack`` per element can change which scale wins.
  Groups whose largest magnitude sits within ``slack`` of a boundary of the scale rules (a power of two, or six times
  one) may take either scale; they are counted, not judged. Values are compared, not codes (-0 and +0 are one
  value).

Anything else (a lost expert, a wrong scale or transpose, a tensor from the wrong layer, a missing tensor) leaves
numbers that are not a rounding of the merge, and the check names the tensor and the experts. It also reports how much
of the adapter's update each tensor kept in weight space, beside what the format's nearest encoding keeps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from finetune.ship.merge import expert_chunks, expert_rows
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
    seconds: float = 0.0
    untouched: int = 0                # tensors the adapter does not change, each found identical to the base's
    untouched_bytes: int = 0
    untouched_problems: list[str] = field(default_factory=list)   # one of them missing or changed; anything extra
    decides: bool = True
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.failures = list(self.untouched_problems)
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
        amb += (f"; {self.untouched} untouched tensors ({self.untouched_bytes:,} bytes) the base's, bit for bit"
                if self.untouched else "")
        return (f"{self.consumer} vs {self.against}, weights read back: {s['tensors']} adapted tensors, "
                f"{s['values']:,} {'values and groups' if self.fmt == 'mxfp4' else 'values'} checked, "
                f"{s['differ']:,} differ from the nearest encoding{' (rounding ties)' if self.passed else ''}{amb}"
                f"{kept}, in {self.seconds:.1f} s; budget: each the "
                f"format's nearest encoding of the exact merge within float32's error, every other tensor the base's "
                f"-> {status}")

    def to_dict(self) -> dict:
        return {"consumer": self.consumer, "against": self.against, "kind": "weights read back", "decides": True,
                "passed": self.passed, "failures": self.failures, "format": self.fmt, "seconds": round(self.seconds, 1),
                "untouched": self.untouched, "untouched_bytes": self.untouched_bytes, **self.summary(),
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
    started = time.perf_counter()
    device = torch.device(device)
    adapter = read_adapter(adapter_dir, read_config(model_dir), torch.float64, device)
    targets = [(m + ".weight", lora, False) for m, lora in sorted(adapter.linear.items())]
    targets += [(f"{layer}.mlp.experts.{proj}_proj", lora, True) for layer, loras in sorted(adapter.experts.items())
                for proj, lora in sorted(loras.items())]
    accounts = []
    with TensorFiles(model_dir) as base, TensorFiles(export_dir) as out, tqdm(
            total=len(targets), desc=f"weights read back ({device.type})", unit="tensor", leave=False,
            disable=not progress) as bar:
        for name, lora, is_experts in targets:
            if is_experts:
                account = _experts(base, out, name, lora, experts, scale_rounding, device, chunk_bytes)
            else:
                account = _linear(base, out, name, lora, device)
            accounts.append(account)
            bar.update(1)
        adapted = {name for name, _, _ in targets}
        n, nbytes, problems = _untouched(base, out, adapted, experts, scale_rounding, device, chunk_bytes)
    return WeightCheck(consumer or f"the export's files ({'merged-' + experts})", experts, accounts,
                       seconds=time.perf_counter() - started, untouched=n, untouched_bytes=nbytes,
                       untouched_problems=problems)


def _untouched(base: TensorFiles, out: TensorFiles, adapted: set[str], experts: str, scale_rounding: str, device,
               chunk_bytes: int) -> tuple[int, int, list[str]]:
    """Every tensor the adapter does not change, against the base: the merge copies it (a bf16 export decodes MXFP4
    experts, exactly; an MXFP4 export keeps their codes), so it must be bit for bit what the base gives; and the
    export holds nothing the base does not. Returns (tensors checked, their bytes, problems). Without this, a broken
    embedding, router or norm would pass: the layer-by-layer checks feed every layer the trained model's input."""
    packed = experts == "mxfp4"
    expected, problems, n, nbytes = set(), [], 0, 0
    for name in base.names():
        if name.endswith("_scales"):
            continue
        stem = name.removesuffix("_blocks")
        expert = name.endswith("_blocks") or (".mlp.experts." in name and name.endswith(("gate_up_proj", "down_proj")))
        keys = ([stem + "_blocks", stem + "_scales"] if packed else [stem]) if expert else [name]
        expected.update(keys)
        if stem in adapted or name in adapted:
            continue
        missing = [k for k in keys if k not in out]
        if missing:
            problems += [f"{k}: missing from the export" for k in missing]
            continue
        if expert and not (packed and name.endswith("_blocks")):      # decoded (bf16) or quantized (dense source)
            same = _same_experts(base, out, stem, packed, scale_rounding, device, chunk_bytes)
        else:                                                          # copied as stored
            same = all(out.dtypes[k] == base.dtypes[k] and out.shapes[k] == base.shapes[k] and torch.equal(
                _bytes(out[k]), _bytes(base[k])) for k in keys)
        if not same:
            problems.append(f"{stem}: not the base's, though the adapter does not change it")
        n += 1
        nbytes += sum(out.nbytes(k) for k in keys)
    problems += [f"{k}: in the export, not in the base" for k in sorted(set(out.names()) - expected)]
    return n, nbytes, problems


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's storage as bytes (so NaN payloads and -0 compare as written)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_experts(base: TensorFiles, out: TensorFiles, stem: str, packed: bool, scale_rounding: str, device,
                  chunk_bytes: int) -> bool:
    """An unadapted expert tensor as the merge writes it from the base: bf16 ``(E, in, out)`` of the decoded
    weight, or (a dense source) MXFP4 codes of it."""
    for span in expert_chunks(base, stem, chunk_bytes // 2):
        rows = expert_rows(base, stem, span, device)                           # (e, out, in) float32
        if packed:
            blocks, scales = mxfp4.pack(rows, scale_rounding)
            want = [blocks, scales]
            got = [out.rows(stem + "_blocks", span), out.rows(stem + "_scales", span)]
        else:
            want, got = [rows.transpose(1, 2).to(torch.bfloat16)], [out.rows(stem, span)]
        if any(g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g.to(device), w) for g, w in zip(got, want)):
            return False
    return True


def _problem(name: str, problem: str) -> TensorAccount:
    return TensorAccount(name, 0, 0, 0, 0.0, 0.0, problem=problem)


class _Sums:
    """One tensor's account as its chunks of experts land (float64 sums; per expert for expert tensors)."""

    def __init__(self, name: str, per_expert: bool):
        self.name, self.per_expert = name, per_expert
        self.values = self.differ = self.wrong = self.ambiguous = 0
        self.along = self.along_nearest = self.norm = 0.0
        self.kept: list[tuple[int, float]] = []          # (expert, kept)
        self.wrong_experts: list[int] = []

    def account(self) -> TensorAccount:
        norm = max(self.norm, 1e-300)
        worst = min(self.kept, key=lambda p: p[1]) if self.per_expert and self.kept else (None, None)
        return TensorAccount(self.name, self.values, self.differ, self.wrong, self.along / norm,
                             self.along_nearest / norm, self.ambiguous, worst[1], worst[0], self.wrong_experts)


class _Chunk:
    """A chunk of ``e`` experts (a linear weight is one "expert") of one adapted tensor, as the runtime holds it:
    ``W (e, out, in)`` float32 (the base, decoded: exact), ``A (e, r, in)``, ``B (e, r, out)`` float64. Holds the
    update ``delta`` and the exact merge ``x``, float64 ``(e, out, in)``, and accounts a written tensor against them.
    Whole-chunk passes are few (the merge, the rounding, one comparison, the update kept); the slack and the error
    test run only where the written number or group differs from the nearest encoding (rounding ties, or errors)."""

    PIECE = 1 << 20          # values (bf16) or groups (MXFP4) examined at a time where they differ

    def __init__(self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, start: int):
        self.W, self.A, self.B, self.scale, self.start = W, A, B, scale, start
        self.delta = torch.einsum("eri,ero->eoi", A, B).mul_(scale)
        self.x = self.delta + W
        # ||delta_e||^2 = scale^2 tr((A A^T)(B B^T)): (r, r) products instead of a pass over (out, in)
        self.norm = torch.einsum("eri,esi->ers", A, A).mul_(torch.einsum("ero,eso->ers", B, B)).sum((1, 2)) * scale ** 2

    def along(self, written: torch.Tensor) -> torch.Tensor:
        """``<written - W, delta>`` per expert ``(e,)``, float64."""
        t = written.to(torch.float64).sub_(self.W)
        return t.mul_(self.delta).flatten(1).sum(1)

    def slack(self, j: int, o: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Four times float32's error bound for ``W + scale * B A`` at rows ``o``, columns ``i`` (same shape) of
        expert ``j``: ``(r + 2) 2^-24 (|W| + scale sum_r |B||A|)`` (r products, one scaling, one addition)."""
        r = self.A.shape[1]
        size = (self.A[j].abs()[:, i] * self.B[j].abs()[:, o]).sum(0).mul_(self.scale)        # (r, ...) -> (...)
        return (self.W[j][o, i].abs().double() + size).mul_(SLACK_FACTOR * (r + 2) * 2.0 ** -24)

    def bf16(self, written: torch.Tensor, sums: _Sums) -> None:
        """``written (e, out, in)`` bf16: each value must be ``bf16(x)`` or within the slack of being as near."""
        nearest = self.x.to(torch.bfloat16)
        differ = written != nearest                                                       # (e, out, in)
        along = self.along(written)
        extra = 0.0
        for j in differ.flatten(1).any(1).nonzero().flatten().tolist():
            flat = differ[j].flatten().nonzero().flatten()
            wrong = 0
            for piece in flat.split(self.PIECE):
                o, i = piece // differ.shape[2], piece % differ.shape[2]
                x, w, n = self.x[j][o, i], written[j][o, i].double(), nearest[j][o, i].double()
                wrong += int(((w - x).abs() > (n - x).abs() + self.slack(j, o, i)).sum())
                extra += float(((n - w) * self.delta[j][o, i]).sum())
            sums.wrong += wrong
            if wrong and sums.per_expert:
                sums.wrong_experts.append(self.start + j)
        self._finish(sums, differ.numel(), int(differ.sum()), along, extra)

    def mxfp4(self, blocks: torch.Tensor, scales: torch.Tensor, scale_rounding: str, sums: _Sums) -> None:
        """``blocks (e, out, G, 16)``, ``scales (e, out, G)``: each group's squared error from ``x`` must be the
        nearest encoding's, or within what the slack can change, or the group sits at a scale-rule boundary."""
        n_blocks, n_scales = mxfp4.pack(self.x.float(), scale_rounding)
        written = mxfp4.unpack(blocks, scales)                                            # (e, out, in)
        # by value: codes differ where values do not (-0 and +0; any scale of an all-zero group)
        differ = (written != mxfp4.unpack(n_blocks, n_scales)).unflatten(-1, (-1, mxfp4.GROUP)).any(-1)  # (e, out, G)
        along = self.along(written)
        del written
        extra = 0.0
        cols = torch.arange(mxfp4.GROUP, device=blocks.device)
        for j in differ.flatten(1).any(1).nonzero().flatten().tolist():
            flat = differ[j].flatten().nonzero().flatten()
            wrong = 0
            for piece in flat.split(self.PIECE // mxfp4.GROUP):
                o, g = piece // differ.shape[2], piece % differ.shape[2]                  # (n,) groups
                i = g[:, None] * mxfp4.GROUP + cols                                       # (n, 32) columns
                o2 = o[:, None].expand_as(i)
                x = self.x[j][o2, i]
                w = mxfp4.unpack(blocks[j][o, g][:, None], scales[j][o, g][:, None]).double()    # (n, 32)
                n = mxfp4.unpack(n_blocks[j][o, g][:, None], n_scales[j][o, g][:, None]).double()
                bad, amb = _wrong_groups(w, n, x, self.slack(j, o2, i), scales[j][o, g], n_scales[j][o, g])
                wrong += int(bad.sum())
                sums.ambiguous += int(amb.sum())
                extra += float(((n - w) * self.delta[j][o2, i]).sum())
            sums.wrong += wrong
            if wrong and sums.per_expert:
                sums.wrong_experts.append(self.start + j)
        self._finish(sums, differ.numel(), int(differ.sum()), along, extra)

    def _finish(self, sums: _Sums, values: int, differ: int, along: torch.Tensor, extra: float) -> None:
        sums.values += values
        sums.differ += differ
        sums.along += float(along.sum())
        sums.along_nearest += float(along.sum()) + extra
        sums.norm += float(self.norm.sum())
        if sums.per_expert:
            sums.kept += [(self.start + k, a / n) for k, (a, n) in enumerate(zip(along.tolist(), self.norm.tolist()))
                          if n > 0]


def _linear(base: TensorFiles, out: TensorFiles, name: str, lora, device) -> TensorAccount:
    """An attention projection: bf16 in every merged export, ``(out, in)``; held as one "expert"."""
    if name not in out:
        return _problem(name, "missing from the export")
    if out.dtypes[name] != "BF16" or out.shapes[name] != base.shapes[name]:
        return _problem(name, f"written as {out.dtypes[name]} {out.shapes[name]}, expected BF16 {base.shapes[name]}")
    sums = _Sums(name, per_expert=False)
    chunk = _Chunk(base[name].to(device, torch.float32)[None], lora.A[None], lora.B.T[None], lora.scale, 0)
    chunk.bf16(out[name].to(device)[None], sums)                  # lora: A (r, in), B (out, r) -> B^T (r, out)
    return sums.account()


def _experts(base: TensorFiles, out: TensorFiles, name: str, lora, experts: str, scale_rounding: str, device,
             chunk_bytes: int) -> TensorAccount:
    """One expert projection ``(E, out, in)`` (as the runtime holds it), a chunk of experts at a time."""
    packed = experts == "mxfp4"
    keys = [name + "_blocks", name + "_scales"] if packed else [name]
    missing = [k for k in keys if k not in out]
    if missing:
        return _problem(name, f"{', '.join(missing)} missing from the export")
    sums = _Sums(name, per_expert=True)
    for span in expert_chunks(base, name, chunk_bytes // 2):                  # merge's budget is for float32 rows
        W = expert_rows(base, name, span, device)                              # (e, out, in) float32, exact
        chunk = _Chunk(W, lora.A[span], lora.B[span], lora.scale, span.start)
        shape = tuple(W.shape)
        if packed:
            blocks, scales = out.rows(name + "_blocks", span), out.rows(name + "_scales", span)
            want = shape[:2] + (shape[2] // mxfp4.GROUP,)
            if blocks.dtype != torch.uint8 or tuple(scales.shape) != want or tuple(blocks.shape) != want + (16,):
                return _problem(name, f"written as {tuple(blocks.shape)} / {tuple(scales.shape)}, which does not "
                                      f"encode {shape} per chunk")
            chunk.mxfp4(blocks.to(device), scales.to(device), scale_rounding, sums)
        else:
            rows = out.rows(name, span)                                        # transformers' (e, in, out) bf16
            if rows.dtype != torch.bfloat16 or tuple(rows.shape) != (shape[0], shape[2], shape[1]):
                return _problem(name, f"written as {rows.dtype} {tuple(rows.shape)}, expected bf16 "
                                      f"{(shape[0], shape[2], shape[1])} per chunk")
            chunk.bf16(rows.to(device).transpose(1, 2), sums)
        del W, chunk
    return sums.account()


def _wrong_groups(written, nearest, x, slack, w_scale, n_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups ``(n, 32)`` -> ``(n,)`` where the written group is not the quantizer's encoding of ``x`` up to ties:
    wrong, and ambiguous (at a scale-rule boundary: either scale is right). ``w_scale``/``n_scale``: the groups' E8M0
    bytes ``(n,)``, written and nearest. On the nearest's scale, every value must be a nearest grid value (within the
    slack of as near); on another scale, that scale must be one the rule weighs for ``x`` (down or up) and the group's
    squared error within what the slack can change of the nearest's. (A whole-group error bound alone would be too
    loose: it scales with the group's quantization error, and one value moved by a lost update hides in it.)"""
    ew, en = (written - x).abs(), (nearest - x).abs()
    values_ok = (ew <= en + slack).all(-1)
    amax = x.abs().amax(-1)
    down, up = mxfp4.scale_rule(amax.float())                  # as the quantizer saw x: in float32
    w_exp = w_scale.int() - mxfp4.SCALE_BIAS
    weighed = (w_exp == down) | (w_exp == up)
    excess = (ew.square().sum(-1) - en.square().sum(-1)).abs()
    allowed = (2 * (ew + en + 2 * slack) * slack).sum(-1)
    smax = slack.amax(-1)
    ambiguous = _near_pow2(amax, smax) | _near_pow2(amax / mxfp4.E2M1_MAX, smax / mxfp4.E2M1_MAX)
    ok = torch.where(w_scale == n_scale, values_ok, weighed & (excess <= allowed)) | ambiguous
    return ~ok, ambiguous


def _near_pow2(v: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Whether ``v`` lies within ``tol`` of a power of two (float64, elementwise; zero is never near one)."""
    _, e = torch.frexp(v)                                      # v = m * 2**e, m in [0.5, 1)
    below = torch.ldexp(torch.full_like(v, 0.5), e)            # the power of two at or below v
    return (v > 0) & ((v - below <= tol) | (2 * below - v <= tol))
