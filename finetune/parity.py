"""Parity checks for exports: each artifact, reloaded by its real consumer, against the trained model.

**Probes.** Fixed Harmony conversations (:data:`PROBES`, one longer than gpt-oss's sliding window) plus up to
``held_out`` conversations from the run's eval set. Each probe is the Harmony prompt followed by the trained model's
own greedy continuation, so positions inside the answer, where the adapter matters most, are compared too.

**Reference.** The trained model as the run saved it: the base with the adapter applied beside it (unmerged), in
float32 on CPU, in our runtime (which matches transformers + PEFT to ~1e-5, see tests/test_runtime.py). The base
alone is measured as well, to know how far the adapter moved the model.

**Comparison** of an artifact's teacher-forced logits ``(T, V)`` per probe with the reference's:

- ``max_abs``: largest logit difference; ``top1``: share of positions whose argmax agrees;
- ``kl``: mean KL(reference || artifact) in nats per position;
- ``effect_kept``: the share of the adapter's effect the artifact carries, ``<a - b, r - b> / ||r - b||^2`` over all
  logits (``a`` artifact, ``r`` reference, ``b`` base): 1 when the artifact moves the base exactly as the trained
  model does, 0 when the adapter was lost (the silent failure this module exists to catch).

A :class:`Check` turns a comparison into pass/fail under named criteria; a failed check fails the export.
"""

from __future__ import annotations

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
    passed: bool = False
    failures: list[str] = field(default_factory=list)

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
        status = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        extra = "".join(f", {k} {v}" for k, v in self.extra.items())
        return f"{self.consumer} vs {self.against}: {self.comparison.line()}{extra} -> {status}"

    def to_dict(self) -> dict:
        return {"consumer": self.consumer, "against": self.against, "passed": self.passed,
                "failures": self.failures, "criteria": self.criteria, "extra": self.extra,
                **asdict(self.comparison)}


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


class Reference:
    """The trained model (base + adapter, unmerged, fp32 CPU) and the base alone, with their logits on probes."""

    def __init__(self, model_dir: Path, adapter_dir: Path, prompts: list[Probe]):
        import torch

        from inference.engine import Engine, SamplingParams
        self.engine = Engine.load(model_dir, adapters={"trained": adapter_dir}, dtype=torch.float32, device="cpu")
        self.probes = []
        for p in prompts:
            done = self.engine.complete(p.ids, SamplingParams(max_tokens=CONTINUATION, temperature=0.0), "trained")
            self.probes.append(Probe(p.ids + done.token_ids, p.prompt_len, p.source))
        self.trained = [self.logits(p.ids, "trained") for p in self.probes]
        self.base = [self.logits(p.ids, None) for p in self.probes]

    def logits(self, ids: list[int], adapter: str | None) -> "torch.Tensor":
        import torch
        model = self.engine.model
        with torch.no_grad():
            return model.logits(model(torch.tensor([ids]), adapter=adapter), adapter)[0].float()

    def continuation(self, probe: Probe) -> list[int]:
        return probe.ids[probe.prompt_len:]


# -- consumers ------------------------------------------------------------------------------------------------------

def runtime_logits(model_dir: Path, probes: list[Probe], adapter_dir: Path | None = None) -> list["torch.Tensor"]:
    """Our runtime (MXFP4 experts kept packed when the directory has them), fp32 on CPU."""
    import torch

    from inference.engine import Engine
    engine = Engine.load(model_dir, adapters={"a": adapter_dir} if adapter_dir else None, dtype=torch.float32,
                         device="cpu")
    name = "a" if adapter_dir else None
    model = engine.model
    with torch.no_grad():
        return [model.logits(model(torch.tensor([p.ids]), adapter=name), name)[0].float() for p in probes]


def transformers_logits(model_dir: Path, probes: list[Probe], adapter_dir: Path | None = None) -> list["torch.Tensor"]:
    """transformers' ``GptOssForCausalLM.from_pretrained`` (eager, fp32), with ``PeftModel.from_pretrained`` on top
    for an adapter; MXFP4 checkpoints through ``Mxfp4Config(dequantize=True)`` (transformers' CPU path for them)."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # "MXFP4 on CPU will be dequantized" and load bars: expected, not news
    hf_logging.disable_progress_bar()
    try:
        from inference.checkpoint import read_dir_json
        quant = read_dir_json(model_dir, "config.json", "model", "gpt-oss model").get("quantization_config") or {}
        extra = {"quantization_config": Mxfp4Config(dequantize=True)} if quant.get("quant_method") == "mxfp4" else {}
        model = GptOssForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager",
                                                  local_files_only=True, **extra)
        if adapter_dir is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([p.ids])).logits[0].float() for p in probes]


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
        # Fused reductions (dot products, kl_div) and in-place temporaries: V is large and this runs on CPU.
        max_abs = max(max_abs, float((a - r).abs_().max()))
        agree += float((a.argmax(-1) == r.argmax(-1)).sum())
        kl += float(torch.nn.functional.kl_div(torch.log_softmax(a, -1), torch.log_softmax(r, -1), reduction="sum",
                                               log_target=True))
        if base is not None:
            b = base[i].float()
            effect = (r - b).view(-1)
            num += float(torch.dot((a - b).view(-1), effect))
            den += float(torch.dot(effect, effect))
        positions += a.shape[0]
    kept = num / max(den, 1e-30) if base is not None else None
    return Comparison(max_abs=max_abs, top1=agree / positions, kl=max(kl / positions, 0.0), effect_kept=kept,
                      positions=positions)


def run_checks(checks: list[Callable[[], Check]], echo=print) -> list[Check]:
    """Run each check, printing its line as it lands."""
    out = []
    for make in checks:
        check = make()
        echo("  " + check.line())
        out.append(check)
    return out
