"""Parity checks for exports: each artifact, reloaded by its real consumer, against the trained model.

**Probes.** Fixed Harmony conversations (:data:`PROBES`, one longer than gpt-oss's sliding window) plus up to
``held_out`` conversations from the run's eval set. Each probe is the Harmony prompt followed by the trained model's
own greedy continuation, so positions inside the answer, where the adapter matters most, are compared too.

**Reference.** The trained model as the run saved it: the base with the adapter applied beside it (unmerged), in our
runtime (which matches transformers + PEFT to ~1e-5, see tests/test_runtime.py), in float32 unless asked, where
:class:`Where` says (the GPU when there is one; loaded whole when it fits, else layer-streamed). All probes run as
padded batches (:mod:`inference.model.streamed`), greedy continuations decoded together. The base alone is measured as
well, to know how far the adapter moved the model.

**Comparison** of an artifact's teacher-forced logits ``(T, V)`` per probe with the reference's:

- ``max_abs``: largest logit difference; ``top1``: share of positions whose argmax agrees;
- ``kl``: mean KL(reference || artifact) in nats per position;
- ``effect_kept``: the share of the adapter's effect the artifact carries, ``<a - b, r - b> / ||r - b||^2`` over all
  logits (``a`` artifact, ``r`` reference, ``b`` base): 1 when the artifact moves the base exactly as the trained
  model does, 0 when the adapter was lost (the silent failure this module exists to catch).

A :class:`Check` turns a comparison into pass/fail under named criteria; a failed check fails the export.

**Layer by layer.** Free-running logits compound every layer's error through the next: at gpt-oss-20b shapes a
bf16-sized perturbation flips MoE routing and cascades (the trained model in bf16 against itself in float32: top-1
42.8%, effect kept 0.71), so they cannot tell a correct lossy export from a broken one there. A
:class:`LayerReference` holds the trained model's input ``h_l`` to every decoder layer (float32, layer-streamed), its
output ``r_l`` and the base's ``b_l`` on it; an artifact's layer ``l`` runs on the same ``h_l`` (ours:
:func:`inference.model.streamed.layers`; transformers: :func:`finetune.ship.hf_streamed.teacher_forced`), so errors
never compound, and sends each token to the experts the trained model's router chose there (the base too), so a
top-k choice flipped by a small difference cannot swamp the weights' difference. :class:`LayerComparison`: per layer
the relative error ``||a_l - r_l|| / ||r_l - h_l||`` and the effect kept ``<a_l - b_l, r_l - b_l> / ||r_l - b_l||^2``,
plus the teacher-forced logits (final norm and head on the last layer's output). A :class:`LayerCheck` holds them to
a budget measured in the same run (:func:`layer_criteria`): the trained model's own layers in bf16 on the same inputs.
The lossy formats (merged-bf16, merged-mxfp4) pass or fail on it; their free-running checks are reported beside.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from inference import harmony

if TYPE_CHECKING:
    import torch

PROBES: tuple[tuple[str, ...], ...] = (
    ("What colour is the sky on a clear day?",),
    ("Name three prime numbers and say why they are prime.",),
    ("You are a careful assistant.", "Summarise in one sentence: a LoRA adapter adds a low-rank update to frozen "
     "weights, so fine-tuning trains few parameters and the base model stays untouched."),
    # Longer than gpt-oss's sliding window (128 tokens; 64 on the tiny model) so windowed layers are exercised.
    ("Read the following notes and answer the question at the end. " + " ".join(
        f"Note {i}: the shipment numbered {100 + 7 * i} left the warehouse on day {i + 1} and arrived intact."
        for i in range(4)) + " Question: which shipment left on day three?",),
)
CONTINUATION = 16      # greedy tokens of the trained model appended to each probe prompt


@dataclass
class Probe:
    ids: list[int]
    prompt_len: int
    source: str


@dataclass
class Comparison:
    max_abs: float
    top1: float
    kl: float
    effect_kept: float | None
    positions: int

    def line(self) -> str:
        kept = "-" if self.effect_kept is None else f"{self.effect_kept:.4f}"
        return (f"max |Δlogit| {self.max_abs:.2e}, top-1 agreement {100 * self.top1:.1f}%, KL {self.kl:.2e}, "
                f"adapter effect kept {kept} ({self.positions} positions)")


@dataclass
class Check:
    """One consumer of one artifact, compared with ``against``; ``criteria`` say what passing means."""

    consumer: str
    against: str
    comparison: Comparison
    criteria: dict[str, float]          # max_abs / min_top1 / max_kl / min_kept / max_kept
    extra: dict = field(default_factory=dict)
    decides: bool = True                # False: reported only (its numbers), another check decides
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0   # its own run (set by run_checks); consumer passes shared by several checks come before

    def __post_init__(self):
        c, k = self.comparison, self.criteria
        tests = [("max_abs", c.max_abs <= k.get("max_abs", float("inf")), f"max |Δlogit| {c.max_abs:.2e} > "
                  f"{k.get('max_abs')}"),
                 ("min_top1", c.top1 >= k.get("min_top1", 0.0), f"top-1 agreement {c.top1:.4f} < {k.get('min_top1')}"),
                 ("max_kl", c.kl <= k.get("max_kl", float("inf")), f"KL {c.kl:.2e} > {k.get('max_kl')}")]
        if c.effect_kept is not None:
            tests += [("min_kept", c.effect_kept >= k.get("min_kept", float("-inf")),
                       f"adapter effect kept {c.effect_kept:.4f} < {k.get('min_kept')}"),
                      ("max_kept", c.effect_kept <= k.get("max_kept", float("inf")),
                       f"adapter effect kept {c.effect_kept:.4f} > {k.get('max_kept')}")]
        self.failures = [msg for key, ok, msg in tests if key in k and not ok]
        for key, value in self.extra.items():
            if key.endswith("_equal") and value is False:
                self.failures.append(f"{key.removesuffix('_equal').replace('_', ' ')} differ")
        self.passed = not self.failures

    def line(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.extra.items())
        if not self.decides:
            return (f"{self.consumer} vs {self.against}, free-running logits: {self.comparison.line()}{extra}; "
                    "not a pass criterion here (free-running errors compound over layers; the layer-by-layer "
                    "check decides)")
        status = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (f"{self.consumer} vs {self.against}, free-running logits: {self.comparison.line()}{extra}; budget "
                f"{budget_text(self.criteria)} -> {status}")

    def to_dict(self) -> dict:
        return {"consumer": self.consumer, "against": self.against, "kind": "free-running logits",
                "decides": self.decides, "passed": self.passed, "failures": self.failures, "seconds": self.seconds,
                "criteria": self.criteria, "extra": self.extra, **asdict(self.comparison)}


def budget_text(criteria: dict[str, float]) -> str:
    """Criteria as a reader wants them on a check line: ``max |Δlogit| ≤ 0.001, KL ≤ 0.01, ...``."""
    words = {"max_abs": "max |Δlogit| ≤", "max_kl": "KL ≤", "min_top1": "top-1 ≥", "min_kept": "effect kept ≥",
             "max_kept": "effect kept ≤"}
    return ", ".join(f"{words[k]} {v:.4g}" for k, v in criteria.items() if k in words) or "none"


@dataclass
class LayerComparison:
    """An artifact's decoder layers against the trained model's, each fed the trained model's input ``h_l`` (the
    errors of one layer never reach the next). Per layer ``l``, over real positions (``a_l`` the artifact's output,
    ``r_l`` the trained model's, ``b_l`` the base's, all on ``h_l``):

    - ``rel_err[l] = ||a_l - r_l|| / ||r_l - h_l||``: the error relative to the layer's own residual update;
    - ``kept[l] = <a_l - b_l, r_l - b_l> / ||r_l - b_l||^2``: the adapter's effect kept in this layer (None where the
      adapter does not move the layer: ``||r_l - b_l||`` below :data:`UNTOUCHED` of the update).

    ``logits``: final norm and head on the last layer's output, compared as :func:`compare` does (one layer's error
    and the head's, no cascade)."""

    rel_err: list[float]
    kept: list[float | None]
    logits: Comparison
    positions: int

    @property
    def worst_rel_err(self) -> tuple[float, int]:
        """(the largest relative error, its layer)."""
        return max((e, i) for i, e in enumerate(self.rel_err))

    @property
    def kept_range(self) -> tuple[tuple[float, int], tuple[float, int]] | None:
        """((the smallest effect kept, its layer), (the largest, its layer)), or None when no layer is adapted."""
        pairs = [(k, i) for i, k in enumerate(self.kept) if k is not None]
        return (min(pairs), max(pairs)) if pairs else None

    @property
    def worst_kept_err(self) -> float:
        """The largest ``|1 - kept[l]|`` over adapted layers (0 when none is)."""
        return max((abs(1 - k) for k in self.kept if k is not None), default=0.0)

    def line(self) -> str:
        err, layer = self.worst_rel_err
        kept = self.kept_range
        kept_text = "-" if kept is None else (f"{kept[0][0]:.4f} (layer {kept[0][1]}) .. {kept[1][0]:.4f} "
                                              f"(layer {kept[1][1]})")
        return (f"relative error worst {err:.2e} (layer {layer}), adapter effect kept {kept_text} over "
                f"{len(self.rel_err)} layers ({self.positions} positions); teacher-forced logits: {self.logits.line()}")

    def to_dict(self) -> dict:
        return {"rel_err": self.rel_err, "kept": self.kept, "positions": self.positions,
                "worst_rel_err": self.worst_rel_err[0], "worst_rel_err_layer": self.worst_rel_err[1],
                "worst_kept_err": self.worst_kept_err, "logits": asdict(self.logits)}


@dataclass
class LayerCheck:
    """One consumer of one artifact compared layer by layer with the trained model (:class:`LayerComparison`);
    ``criteria`` (:func:`layer_criteria`): ``max_rel_err`` and ``max_kept_err`` (``|1 - kept|``) or ``min_kept``,
    each in every layer, and ``logits``, :class:`Check` criteria for the teacher-forced logits. ``budget`` says
    where the bounds came from."""

    consumer: str
    against: str
    comparison: LayerComparison
    criteria: dict
    budget: str = ""
    extra: dict = field(default_factory=dict)
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0   # its own run (set by run_checks); consumer passes shared by several checks come before

    def __post_init__(self):
        c, k = self.comparison, self.criteria
        self.failures = []

        def over(values: list[tuple[int, float]], what: str, bound: float, sign: str) -> None:
            if values:
                layer, value = max(values, key=lambda v: abs(v[1] - (1 if "kept" in what else 0)))
                self.failures.append(f"{what} {value:.4g} {sign} {bound:.4g} in {len(values)} of {len(c.rel_err)} "
                                     f"layers (worst: layer {layer})")

        if "max_rel_err" in k:
            over([(i, e) for i, e in enumerate(c.rel_err) if e > k["max_rel_err"]], "relative error",
                 k["max_rel_err"], ">")
        adapted = [(i, x) for i, x in enumerate(c.kept) if x is not None]
        if "max_kept_err" in k:
            over([(i, x) for i, x in adapted if abs(1 - x) > k["max_kept_err"]], "adapter effect kept",
                 k["max_kept_err"], "off 1 by more than")
        if "min_kept" in k:
            over([(i, x) for i, x in adapted if x < k["min_kept"]], "adapter effect kept", k["min_kept"], "<")
        if k.get("logits"):
            logits = Check(self.consumer, self.against, c.logits, k["logits"])
            self.failures += [f"teacher-forced logits: {f}" for f in logits.failures]
        self.passed = not self.failures

    def budget_line(self) -> str:
        k = self.criteria
        parts = [f"relative error ≤ {k['max_rel_err']:.3g}" if "max_rel_err" in k else "",
                 f"|1 - effect kept| ≤ {k['max_kept_err']:.3g}" if "max_kept_err" in k else "",
                 f"effect kept ≥ {k['min_kept']:.3g}" if "min_kept" in k else ""]
        text = ", ".join(p for p in parts if p) + " in every layer"
        if k.get("logits"):
            text += f"; teacher-forced logits {budget_text(k['logits'])}"
        return text + (f" ({self.budget})" if self.budget else "")

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        extra = "".join(f", {k} {v}" for k, v in self.extra.items())
        return (f"{self.consumer} vs {self.against}, layer by layer (each layer fed the trained model's input): "
                f"{self.comparison.line()}{extra}; budget {self.budget_line()} -> {status}")

    def to_dict(self) -> dict:
        return {"consumer": self.consumer, "against": self.against, "kind": "layer by layer", "decides": True,
                "passed": self.passed, "failures": self.failures, "seconds": self.seconds, "criteria": self.criteria,
                "budget": self.budget, "extra": self.extra, **self.comparison.to_dict()}


# -- probes and the reference ---------------------------------------------------------------------------------------

def _messages(texts: tuple[str, ...]) -> list[dict]:
    *system, user = texts
    return [{"role": "system", "content": s} for s in system] + [{"role": "user", "content": user}]


def probe_prompts(held_out: list | None = None, options: harmony.HarmonyOptions | None = None) -> list[Probe]:
    """Prompt token ids of the fixed probes and of held-out conversations (``inference.conversations.Example``
    objects, cut before their last assistant turn)."""
    options = options or harmony.HarmonyOptions(reasoning_effort="low")
    out = [Probe(harmony.render_prompt(_messages(p), None, options), 0, f"probe {i}") for i, p in enumerate(PROBES)]
    for i, ex in enumerate(held_out or []):
        msgs = list(ex.messages)
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        out.append(Probe(harmony.render_prompt(msgs[:last], ex.tools, options.with_builtin_tools(ex.builtin_tools)),
                         0, f"held-out {i}"))
    for p in out:
        p.prompt_len = len(p.ids)
    return out


@dataclass
class Where:
    """Where models run for the checks: ``device`` and ``dtype`` (float32 unless bf16 is asked for), and how many
    bytes one model may hold there when loaded whole (``budget``); a model that needs more runs layer-streamed
    (:mod:`inference.model.streamed`: one decoder layer at a time), which bounds memory at any size."""

    device: "torch.device"
    dtype: "torch.dtype"
    budget: int

    @classmethod
    def pick(cls, device: str | None = None, max_memory: int | None = None, dtype: str = "float32") -> "Where":
        """The GPU when there is one (or ``device="cuda"``), else the CPU; float32 unless ``dtype="bfloat16"``.
        ``budget``: 90% of the free memory there (host: MemAvailable), capped at 90% of ``max_memory``.

        Float32 is the default on the GPU too: on a gpt-oss-20b-shaped model bf16's own error is as large as a LoRA
        adapter's effect (measured: bf16 vs float32 logits agree on 43% of top-1 tokens and carry 71% of the
        adapter's effect, benchmarks/results/export_scale-20b-h200-bf16-checks-*.json), so a bf16 reference cannot
        tell a correct export from a broken one. Float32 whole fits a 20b in ~18 GiB (experts stay packed) and
        anything bigger runs layer-streamed.
        """
        import torch
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else available_host_memory()
        if max_memory is not None:
            free = min(free, max_memory)
        return cls(dev, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype], int(free * 0.9))

    def fits(self, model_dir: Path, dense: bool = False) -> bool:
        return resident_bytes(model_dir, self.dtype, dense) <= self.budget

    def describe(self, model_dir: Path, dense: bool = False) -> str:
        how = "whole" if self.fits(model_dir, dense) else "layer-streamed"
        kind = "GPU" if self.device.type == "cuda" else "CPU"
        return f"{kind}, {str(self.dtype).removeprefix('torch.')}, {how}"


def available_host_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or total RAM where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes(model_dir: Path, dtype: "torch.dtype", dense: bool = False) -> int:
    """Bytes a model's weights take loaded in ``dtype``: MXFP4 experts packed (our runtime) or, with ``dense``,
    decoded (transformers dequantizes them); read from the safetensors headers only."""
    import math

    from inference.model.checkpoint import TensorFiles
    size = {"torch.float32": 4}.get(str(dtype), 2)
    total = 0
    with TensorFiles(model_dir) as files:
        for name, shape in files.shapes.items():
            n = math.prod(shape)
            if files.dtypes[name] == "U8":
                total += (2 * n * size if name.endswith("_blocks") else 0) if dense else n
            else:
                total += n * size
    return total


class Reference:
    """The trained model (base + adapter, unmerged, in our runtime) and the base alone, with their logits on the
    probes, computed where :class:`Where` says: loaded whole when it fits, else layer-streamed.

    In bf16 the reference carries bf16's own error; ``precision`` measures it in the same run (the trained model in
    bf16 against the same in float32, layer-streamed on the same device) and the bf16 pass criteria are derived from
    it (:func:`criteria`). In float32 ``precision`` is None.
    """

    def __init__(self, model_dir: Path, adapter_dir: Path, prompts: list[Probe], where: Where | None = None,
                 progress: bool = True):
        import torch
        self.model_dir, self.adapter_dir = Path(model_dir), Path(adapter_dir)
        self.where = where or Where.pick()
        self.seconds = 0.0          # set by the caller that timed it
        self.progress = progress
        self.engine = None
        self.by_layer: LayerReference | None = None     # the trained model layer by layer, once measured (layers())
        self.streamed = not self.where.fits(self.model_dir)
        if self.streamed:
            self.probes = _greedy_streamed(self.model_dir, self.adapter_dir, prompts, self.where, progress)
            out = streamed_logits(self.model_dir, self.probes, {"trained": self.adapter_dir, None: None},
                                  self.where, "reference logits", progress)
            self.trained, self.base = out["trained"], out[None]
        else:
            from inference.engine import Engine
            self.engine = Engine.load(self.model_dir, adapters={"trained": self.adapter_dir}, dtype=self.where.dtype,
                                      device=self.where.device).size_for(*_workload(p.ids for p in prompts))
            with _bar(len(prompts), "reference: greedy continuations", progress, "probe") as bar:
                done = self.engine.generate([p.ids for p in prompts], CONTINUATION, "trained",
                                            on_done=bar.update)   # all probes together, continuously batched
            self.probes = [Probe(p.ids + d, p.prompt_len, p.source) for p, d in zip(prompts, done)]
            self.trained = self.logits_with("trained")
            self.base = self.logits_with(None)
        self.precision = None
        if self.where.dtype != torch.float32:
            exact = Where(self.where.device, torch.float32, 0)     # float32, always layer-streamed
            out = streamed_logits(self.model_dir, self.probes, {"trained": self.adapter_dir, None: None}, exact,
                                  "reference in float32 (bf16's own error)", progress)
            self.precision = compare(self.trained, out["trained"], out[None])

    def layers(self, progress: bool = True, budget: bool = True) -> "LayerReference":
        """The trained model layer by layer (:class:`LayerReference`), measured on first use in float32, and with
        ``budget`` its bf16 error too (what a bf16 merge is held to), layer-streamed on the reference's device
        whatever ``where.dtype`` says."""
        if self.by_layer is None:
            self.by_layer = LayerReference.measure(self.model_dir, self.adapter_dir, self.probes, self.where.device,
                                                  progress)
        if budget and self.by_layer.bf16 is None:
            self.by_layer.measure_bf16(self.model_dir, self.adapter_dir, self.probes, self.where.device, progress)
        return self.by_layer

    def logits_with(self, adapter: str | None) -> list["torch.Tensor"]:
        """Logits of the loaded reference model (whole) with one of its adapters, or the base with None."""
        return _model_logits(self.engine.model, self.probes, adapter)

    def adapter_logits(self, adapter_dir: Path, name: str) -> list["torch.Tensor"]:
        """Our runtime with the adapter at ``adapter_dir`` read from its files, beside the reference's own."""
        if self.engine is None:
            return runtime_logits(self.model_dir, self.probes, self.where, adapter_dir)
        from inference.model.adapters import attach, read_adapter
        attach(self.engine.model, name, read_adapter(adapter_dir, self.engine.model))
        return self.logits_with(name)

    def release(self) -> None:
        """Free the loaded reference model (its logits stay): the artifacts' consumers need the memory."""
        if self.engine is not None:
            self.engine = None
            _free(self.where)

    def continuation(self, probe: Probe) -> list[int]:
        return probe.ids[probe.prompt_len:]


@dataclass
class LayerReference:
    """The trained model layer by layer, on the probes (all per layer, per probe ``(T, H)``, float32 on the CPU):
    ``inputs`` its hidden states entering each layer (free-running, float32), ``routing`` the experts its router
    chose for each token in each layer ``(T, k)``, ``trained`` each layer's output on them, ``base`` the base's layer
    on the same inputs and held to the same experts; the teacher-forced logits of both (final norm and head on the
    last layer's output); and ``bf16``, the budget: the trained model's own layers computed in bf16 on the same
    inputs and experts, compared with their float32 selves (:class:`LayerComparison`; measured only when asked
    for). Every artifact's layer is held to ``routing`` too: a top-k choice is discrete, and at gpt-oss-20b shapes
    the adapter alone sends about one position in ten to other experts, which would swamp the weights' differences
    (see :func:`inference.model.streamed.layers`)."""

    inputs: list[list["torch.Tensor"]]
    trained: list[list["torch.Tensor"]]
    base: list[list["torch.Tensor"]]
    trained_logits: list["torch.Tensor"]
    base_logits: list["torch.Tensor"]
    routing: list[list["torch.Tensor"]]
    bf16: LayerComparison | None = None

    @classmethod
    def measure(cls, model_dir: Path, adapter_dir: Path, probes: list[Probe], device, progress: bool = True
                ) -> "LayerReference":
        """One layer-streamed pass of our runtime on ``device`` in float32: the trained model free-running and the
        base fed its inputs and its experts."""
        import torch

        from inference.model import streamed
        with _layer_bar("reference layer by layer, float32", progress) as tick:
            exact = streamed.layers(model_dir, [p.ids for p in probes], {"trained": adapter_dir, None: None},
                                    torch.float32, device, tick, follow="trained")
        return cls(exact.inputs, exact.outputs["trained"], exact.outputs[None], exact.logits["trained"],
                   exact.logits[None], exact.routing)

    def measure_bf16(self, model_dir: Path, adapter_dir: Path, probes: list[Probe], device, progress: bool = True
                     ) -> LayerComparison:
        """The budget (``bf16``): the trained model in bf16 fed the same inputs, one more layer-streamed pass."""
        import torch

        from inference.model import streamed
        with _layer_bar("reference layer by layer, bf16 (the budget)", progress) as tick:
            low = streamed.layers(model_dir, [p.ids for p in probes], {"trained": adapter_dir}, torch.bfloat16,
                                  device, tick, inputs=self.inputs, routing=self.routing)
        self.bf16 = compare_layers(low.outputs["trained"], low.logits["trained"], self)
        return self.bf16


def _bar(total: int, desc: str, progress: bool, unit: str = "token"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress)


def _free(where: Where) -> None:
    import gc

    import torch
    gc.collect()
    if where.device.type == "cuda":
        torch.cuda.empty_cache()


def _model_logits(model, probes: list[Probe], adapter: str | None) -> list["torch.Tensor"]:
    from inference.model import streamed
    return streamed.model_logits(model, [p.ids for p in probes], adapter)   # batched as the layer-streamed pass


# -- consumers ------------------------------------------------------------------------------------------------------

def streamed_logits(model_dir: Path, probes: list[Probe], adapters: dict, where: Where, desc: str,
                    progress: bool = True, last_only: bool = False) -> dict:
    """:func:`inference.model.streamed.logits` with a progress bar over its layers."""
    from inference.model import streamed
    with _layer_bar(desc + " (layer-streamed)", progress) as tick:
        return streamed.logits(model_dir, [p.ids for p in probes], adapters, where.dtype, where.device, tick,
                               last_only)


@contextmanager
def _layer_bar(desc: str, progress: bool):
    """A progress bar over a layer-streamed pass; yields the ``progress(done, total)`` callback it takes."""
    from tqdm.auto import tqdm
    with tqdm(desc=desc, unit="layer", leave=False, disable=not progress) as bar:
        def tick(done, total):
            bar.total = total
            bar.update(done - bar.n)
        yield tick


def runtime_logits(model_dir: Path, probes: list[Probe], where: Where | None = None,
                   adapter_dir: Path | None = None, progress: bool = True) -> list["torch.Tensor"]:
    """Our runtime (MXFP4 experts kept packed when the directory has them) where ``where`` says (default: float32
    on the CPU), loaded whole when it fits, else layer-streamed; the model is freed before returning."""
    import torch
    where = where or Where(torch.device("cpu"), torch.float32, 1 << 62)
    if not where.fits(model_dir):
        name = "a" if adapter_dir else None
        return streamed_logits(model_dir, probes, {name: adapter_dir}, where, f"our runtime on {model_dir.name}",
                               progress)[name]
    from inference.engine import Engine
    engine = Engine.load(model_dir, adapters={"a": adapter_dir} if adapter_dir else None, dtype=where.dtype,
                         device=where.device)
    try:
        return _model_logits(engine.model, probes, "a" if adapter_dir else None)
    finally:
        del engine
        _free(where)


def transformers_logits(model_dir: Path, probes: list[Probe], adapter_dir: Path | None = None,
                        where: Where | None = None, progress: bool = True) -> list["torch.Tensor"]:
    """transformers' ``GptOssForCausalLM`` (eager attention) with ``PeftModel.from_pretrained`` on top for an
    adapter, where ``where`` says (default: float32 on the CPU). Loaded whole with ``from_pretrained`` when its dense
    weights fit (MXFP4 checkpoints through ``Mxfp4Config(dequantize=True)``, transformers' own path for them); else
    layer-streamed through transformers' own modules (:mod:`finetune.ship.hf_streamed`)."""
    return _transformers(model_dir, probes, adapter_dir, where, progress)[0]


def transformers_layers(model_dir: Path, probes: list[Probe], inputs: list[list["torch.Tensor"]],
                        adapter_dir: Path | None = None, where: Where | None = None, progress: bool = True,
                        routing: list[list["torch.Tensor"]] | None = None
                        ) -> tuple[list[list["torch.Tensor"]], list["torch.Tensor"]]:
    """transformers as in :func:`transformers_logits`, teacher-forced: each decoder layer fed ``inputs[l]`` (per
    probe ``(T, H)``; :func:`finetune.ship.hf_streamed.teacher_forced`). Returns each layer's outputs per probe and
    the logits of the final norm and head on the last one."""
    logits, outputs = _transformers(model_dir, probes, adapter_dir, where, progress, inputs, routing)
    return outputs, logits


def _transformers(model_dir: Path, probes: list[Probe], adapter_dir: Path | None, where: Where | None,
                  progress: bool, inputs: list | None = None, routing: list | None = None):
    import torch

    from finetune.ship import hf_streamed
    where = where or Where(torch.device("cpu"), torch.float32, 1 << 62)
    sequences = [p.ids for p in probes]
    if not where.fits(model_dir, dense=True):
        if inputs is None:
            return hf_streamed.logits(model_dir, sequences, adapter_dir, where.dtype, where.device, progress), None
        outputs, logits = hf_streamed.layers(model_dir, sequences, adapter_dir, where.dtype, where.device, inputs,
                                             progress, routing)
        return logits, outputs
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # "MXFP4 on CPU will be dequantized" and load bars: expected, not news
    hf_logging.disable_progress_bar()
    try:
        from inference.model.checkpoint import read_dir_json
        quant = read_dir_json(model_dir, "config.json", "model", "gpt-oss model").get("quantization_config") or {}
        extra = {"quantization_config": Mxfp4Config(dequantize=True)} if quant.get("quant_method") == "mxfp4" else {}
        model = GptOssForCausalLM.from_pretrained(str(model_dir), dtype=where.dtype, attn_implementation="eager",
                                                  local_files_only=True, device_map=str(where.device), **extra)
        top = model
        if adapter_dir is not None:
            from peft import PeftModel
            top = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    try:
        if inputs is None:
            # one probe at a time, unpadded, as a user would call it
            top.eval()
            with torch.no_grad():
                return [top(input_ids=torch.tensor([s], device=where.device)).logits[0].float().cpu()
                        for s in sequences], None
        with hf_streamed.teacher_forced(model.model.layers, sequences, inputs, routing) as outputs:
            return hf_streamed.run(top, sequences, where.device), outputs
    finally:
        del model, top
        _free(where)


def runtime_layers(model_dir: Path, probes: list[Probe], inputs: list[list["torch.Tensor"]],
                   where: Where | None = None, adapter_dir: Path | None = None, progress: bool = True,
                   routing: list[list["torch.Tensor"]] | None = None
                   ) -> tuple[list[list["torch.Tensor"]], list["torch.Tensor"]]:
    """Our runtime teacher-forced (:func:`inference.model.streamed.layers`, float32 where ``where`` says, one layer
    at a time whatever fits): each decoder layer fed ``inputs[l]`` (per probe ``(T, H)``) and, with ``routing``,
    held to those experts. Returns each layer's outputs per probe and the logits of the final norm and head on the
    last one."""
    import torch

    from inference.model import streamed
    where = where or Where(torch.device("cpu"), torch.float32, 1 << 62)
    name = "a" if adapter_dir else None
    with _layer_bar(f"our runtime on {model_dir.name}, layer by layer", progress) as tick:
        out = streamed.layers(model_dir, [p.ids for p in probes], {name: adapter_dir}, torch.float32, where.device,
                              tick, inputs=inputs, routing=routing)
    return out.outputs[name], out.logits[name]


# -- pass criteria --------------------------------------------------------------------------------------------------

# Measured on the tiny demo run (tests/test_export.py), all in float32 on the CPU:
# - IDENTICAL: one artifact read by two float32 consumers, or the adapter reloaded unchanged: differences are float32
#   summation order, ~2e-5 on logits of magnitude ~10; 1e-3 leaves room for other BLAS builds and nothing else.
#   No top-1 bound: with every logit within max_abs, an argmax can only differ between two tokens tied within
#   2 * max_abs, which says nothing about the export (gpt-oss-120b shapes: transformers + PEFT vs our runtime, max
#   |Δlogit| 5.5e-5, flipped 1 of 502 argmaxes, benchmarks/results/export_scale-120b-*.json).
IDENTICAL = {"max_abs": 1e-3, "min_kept": 0.999, "max_kept": 1.001}
# In bf16 (on a GPU) every consumer carries bf16's own error. The reference measures it in the same run (its bf16
# logits against its float32 ones: Reference.precision, distance d). Two consumers each within d of the exact values
# are within 2d of each other; MARGIN more on top. KL grows with the square of a logit perturbation, so its bound
# scales with (2 * MARGIN) ** 2. tests/test_ship_scale.py shows on the tiny model that the bf16 thresholds derived
# this way pass a correct export and fail a broken one.
MARGIN = 2.0

# Layer by layer (LayerCheck), measured on the tiny model with tests/test_ship_scale.py's adapter, float32 on the CPU:
# - UNTOUCHED: a layer whose adapter effect ||r - b|| is below this share of its update ||r - h|| has no effect to
#   keep (kept is None there). A layer the adapter leaves alone gives exactly 0; an adapted one gives ~0.3.
UNTOUCHED = 1e-5
# - FLOAT32_LAYER: the floor of every layer-wise bound, float32 noise: transformers + PEFT against our runtime (the
#   same weights, two float32 consumers) differ by relative error 4e-7 and |1 - kept| 3e-8 per layer; the floors
#   leave 25x (and 3,000x) room for other BLAS builds. For the teacher-forced logits the floor is IDENTICAL.
FLOAT32_LAYER = {"max_rel_err": 1e-5, "max_kept_err": 1e-4}
# - the budget of a bf16 merge: the trained model's own layers computed in bf16 on the reference's inputs, against
#   float32 (LayerReference.bf16, measured in the same run): relative error 0.0099 / 0.0104 in layers 0 / 1, |1 -
#   kept| 0.0014 / 0.0007; teacher-forced logits max |Δlogit| 0.071, KL 3.5e-5, kept 0.9994. A merge rounded to bf16
#   once and computed in float32 must stay within 2 * MARGIN of bf16's WORST layer (a per-layer |1 - kept| is a
#   projection that can be near 0 by chance in one layer; the worst layer's is not): measured, the correct merge
#   0.0123 / 0.0033 and 0.0013 / 0.0002 (bounds 0.042 and 0.0055); one expert's LoRA zeroed in layer 0, 0.117 and
#   0.114 there; the adapter dropped (the base alone), 0.34 / 0.32 and kept 0 in both.


def layer_criteria(kind: str, budget: LayerComparison | None = None, min_kept: float | None = None) -> dict:
    """Pass criteria of a :class:`LayerCheck`: ``"bf16-merge"`` (a merge rounded to bf16, from ``budget``, the
    reference's own bf16 error, see :data:`FLOAT32_LAYER`'s comment) or ``"mxfp4-merge"`` (``min_kept`` of the
    adapter's effect in every layer and on the teacher-forced logits: MXFP4's rounding error has no bf16 bound)."""
    if kind == "mxfp4-merge":
        return {"min_kept": min_kept, "logits": {"min_kept": min_kept}}
    if kind != "bf16-merge" or budget is None:
        raise ValueError(f"layer_criteria({kind!r}): expected 'bf16-merge' with a budget, or 'mxfp4-merge'")
    k = 2 * MARGIN
    logits = {key: v for key, v in derived(budget.logits).items() if key != "min_top1"}   # max_abs bounds top-1
    return {"max_rel_err": max(k * budget.worst_rel_err[0], FLOAT32_LAYER["max_rel_err"]),
            "max_kept_err": max(k * budget.worst_kept_err, FLOAT32_LAYER["max_kept_err"]),
            "logits": loosest(logits, IDENTICAL)}


def budget_of(budget: LayerComparison) -> str:
    """Where bf16-merge bounds come from, for the check line."""
    err, layer = budget.worst_rel_err
    return (f"{2 * MARGIN:g}x the trained model's own bf16 error on the same inputs, worst layer: relative error "
            f"{err:.2e} (layer {layer}), |1 - effect kept| {budget.worst_kept_err:.2e}")


def criteria(kind: str, precision: Comparison | None = None) -> dict[str, float]:
    """Pass criteria of a free-running check: ``"identical"`` (same code and weights as the reference) or ``"same"``
    (two consumers of the same weights). With ``precision`` (the reference's own bf16 error), the bounds widen to what
    that error allows, never narrower than float32's. (A merge against the trained model is held to
    :func:`layer_criteria`.)"""
    base = {"identical": IDENTICAL, "same": IDENTICAL}[kind]
    if kind == "identical" or precision is None:
        return dict(base)
    return loosest(base, derived(precision))


def derived(precision: Comparison) -> dict[str, float]:
    """Bounds for two bf16 consumers, from the measured bf16-vs-float32 distance of one (see MARGIN)."""
    k = 2 * MARGIN
    kept_err = abs(1 - precision.effect_kept) if precision.effect_kept is not None else 0.0
    return {"max_abs": k * precision.max_abs, "max_kl": k * k * precision.kl,
            "min_top1": max(0.0, 1 - k * (1 - precision.top1)), "min_kept": 1 - k * kept_err,
            "max_kept": 1 + k * kept_err}


def loosest(*bounds: dict[str, float]) -> dict[str, float]:
    """Per criterion the most permissive bound of those given (``max_*`` the largest, ``min_*`` the smallest)."""
    out: dict[str, float] = {}
    for b in bounds:
        for key, value in b.items():
            pick = max if key.startswith("max_") else min
            out[key] = pick(out[key], value) if key in out else value
    return out


def without_kept(bounds: dict[str, float]) -> dict[str, float]:
    """Bounds for a comparison without a base (artifact vs artifact): the effect-kept ones dropped."""
    return {k: v for k, v in bounds.items() if "kept" not in k}


def greedy(model_dir: Path, prompts: list[list[int]], where: Where, adapter_dir: Path | None = None,
           progress: bool = True) -> list[list[int]]:
    """Our runtime's greedy continuations (up to CONTINUATION tokens, ending at a stop token) where ``where`` says:
    loaded whole when it fits, else one layer-streamed pass per token."""
    probes = [Probe(list(p), len(p), "greedy") for p in prompts]
    if where.fits(model_dir):
        from inference.engine import Engine
        engine = Engine.load(model_dir, adapters={"a": adapter_dir} if adapter_dir else None, dtype=where.dtype,
                             device=where.device).size_for(*_workload(prompts))
        try:
            return engine.generate([list(p) for p in prompts], CONTINUATION, "a" if adapter_dir else None)
        finally:
            engine.close()
            del engine
            _free(where)
    done = _greedy_streamed(model_dir, adapter_dir, probes, where, progress)
    return [p.ids[p.prompt_len:] for p in done]


def _workload(prompts) -> tuple[int, int]:
    """(sequences, longest length) of greedy continuations of ``prompts`` (token id lists)."""
    lengths = [len(p) for p in prompts]
    return len(lengths), max(lengths, default=1) + CONTINUATION


def _greedy_streamed(model_dir: Path, adapter_dir: Path | None, prompts: list[Probe], where: Where,
                     progress: bool) -> list[Probe]:
    """Greedy continuations, one layer-streamed pass per new token for all unfinished probes."""
    stops = set(harmony.stop_token_ids())
    probes = [Probe(list(p.ids), p.prompt_len, p.source) for p in prompts]
    live = list(range(len(probes)))
    name = "a" if adapter_dir else None
    for step in range(CONTINUATION):
        if not live:
            break
        out = streamed_logits(model_dir, [probes[i] for i in live], {name: adapter_dir}, where,
                              f"greedy token {step + 1}/{CONTINUATION}", progress, last_only=True)
        for i, logits in zip(list(live), out[name]):
            token = int(logits[-1].argmax())
            probes[i].ids.append(token)
            if token in stops:
                live.remove(i)
    return probes


# -- comparing ------------------------------------------------------------------------------------------------------

def compare(artifact: list["torch.Tensor"], reference: list["torch.Tensor"],
            base: list["torch.Tensor"] | None = None) -> Comparison:
    """Compare teacher-forced logits ``(T, V)`` probe by probe (see the module docstring for the measures).

    Sums are accumulated per probe so no ``(all positions, V)`` temporaries are made (V is 201,088 for gpt-oss).
    """
    import torch
    max_abs = kl = agree = num = den = 0.0
    positions = 0
    for i, (a, r) in enumerate(zip(artifact, reference, strict=True)):
        a, r = a.float(), r.float()
        if a.shape != r.shape:
            raise ValueError(f"probe {i}: logit shapes differ: {tuple(a.shape)} vs {tuple(r.shape)}")
        # Fused reductions (dot products, kl_div) and one (T, V) difference reused: V is large and this runs on CPU.
        d = a - r
        if base is not None:
            effect = (r - base[i].float()).view(-1)            # r - b; then a - b = d + (r - b)
            e2 = float(torch.dot(effect, effect))
            num += float(torch.dot(d.view(-1), effect)) + e2
            den += e2
            del effect
        max_abs = max(max_abs, float(d.abs_().max()))
        del d
        agree += float((a.argmax(-1) == r.argmax(-1)).sum())
        kl += float(torch.nn.functional.kl_div(torch.log_softmax(a, -1), torch.log_softmax(r, -1), reduction="sum",
                                               log_target=True))
        positions += a.shape[0]
    kept = num / max(den, 1e-30) if base is not None else None
    return Comparison(max_abs=max_abs, top1=agree / positions, kl=max(kl / positions, 0.0), effect_kept=kept,
                      positions=positions)


def compare_layers(outputs: list[list["torch.Tensor"]], logits: list["torch.Tensor"], ref: "LayerReference"
                   ) -> LayerComparison:
    """An artifact's per-layer outputs ``[layer][probe] (T, H)`` on the reference's inputs, and its teacher-forced
    logits, against the trained model's and the base's (see :class:`LayerComparison`). Sums in float64."""
    if len(outputs) != len(ref.inputs):
        raise ValueError(f"{len(outputs)} layers of outputs for {len(ref.inputs)} layers of the reference")
    rel_err, kept = [], []
    for a_l, h_l, r_l, b_l in zip(outputs, ref.inputs, ref.trained, ref.base):
        err = update = effect = along = 0.0
        for a, h, r, b in zip(a_l, h_l, r_l, b_l, strict=True):
            a, h, r, b = a.double(), h.double(), r.double(), b.double()         # (T, H)
            if a.shape != r.shape:
                raise ValueError(f"layer outputs differ in shape: {tuple(a.shape)} vs {tuple(r.shape)}")
            err += float(((a - r) ** 2).sum())
            update += float(((r - h) ** 2).sum())
            e = r - b
            effect += float((e * e).sum())
            along += float(((a - b) * e).sum())
        rel_err.append((err / max(update, 1e-300)) ** 0.5)
        kept.append(along / effect if effect > UNTOUCHED ** 2 * update else None)
    return LayerComparison(rel_err, kept, compare(logits, ref.trained_logits, ref.base_logits),
                           sum(x.shape[0] for x in ref.inputs[0]))


def run_checks(checks: list[Callable[[], Check]], echo=print) -> list[Check]:
    """Run each check, printing its line as it lands; each records how long it took (``seconds``, in parity.json)."""
    import time
    out = []
    for make in checks:
        started = time.perf_counter()
        check = make()
        check.seconds = round(time.perf_counter() - started, 1)
        echo("  " + check.line())
        out.append(check)
    return out
