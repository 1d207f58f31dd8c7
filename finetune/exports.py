"""``python -m finetune export RUN_DIR --to FORMAT``: ship what a run trained, each artifact proven to carry it.

Formats (:data:`FORMATS`):

- ``peft``: the adapter as vLLM and PEFT load it (``base_model_name_or_path`` set, experts through
  ``target_parameters``, no ``modules_to_save``); checked with ``PeftModel.from_pretrained`` on transformers and with
  our runtime.
- ``merged-bf16``: an HF-layout gpt-oss with the adapter folded in, experts dense bf16 (:mod:`finetune.merge`);
  checked with transformers and our runtime.
- ``merged-mxfp4``: the same with experts requantized to MXFP4 in the original layout (scale rounding ``"best"``: per
  group the lower-error of the OCP and the gpt-oss convention), plus ``quality_report.json`` (the rounding used;
  per-tensor quantization error, next to what pure ``down`` and pure ``up`` rounding would have reached, and adapter
  update kept; KL, top-1 agreement and adapter effect kept vs the bf16 merge on held-out data); checked with
  transformers (``Mxfp4Config(dequantize=True)``) and our runtime.
- ``gguf``: the MXFP4 merge as one GGUF in llama.cpp's gpt-oss layout; ``gguf-lora``: the adapter alone as a GGUF
  LoRA; ``ollama``: the merged GGUF with a Modelfile. All three checked by llama.cpp itself (llama-cpp-python).

Every export is written to a temporary directory beside its destination, checked (:mod:`finetune.parity`), and only
then renamed into place: a failed check or an error leaves nothing that looks complete. The result lands in
``parity.json`` inside the export, in the run's ``run.json`` and in its MLflow run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import parity
from finetune.parity import Check
from inference.errors import UserError

FORMATS = ("peft", "merged-bf16", "merged-mxfp4", "gguf", "gguf-lora", "ollama")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
HELD_OUT = 3           # held-out conversations of the run's eval set added to the fixed probes
MIN_EFFECT_KEPT = 0.8  # an MXFP4 merge must keep this share of the adapter's effect on the logits (see parity)
# How the MXFP4 merge picks each 32-value group's scale (inference.mxfp4): the lower-error of the OCP rule ("down") and
# gpt-oss's quantizer ("up"), never worse than either; the export line and quality_report.json name it.
SCALE_ROUNDING = "best"
SCALE_ROUNDING_MEANS = "per 32-value group the lower-error scale of 'down' (OCP MX rule) and 'up' (gpt-oss quantizer)"

# Pass criteria (see finetune.parity for the measures). Measured on the tiny demo run (tests/test_export.py):
# - SAME: one artifact read by two float32 consumers, or the adapter reloaded unchanged: differences are float32
#   summation order, ~2e-5 on logits of magnitude ~10; 1e-3 leaves room for other BLAS builds and nothing else.
SAME = {"max_abs": 1e-3, "min_top1": 1.0, "min_kept": 0.999, "max_kept": 1.001}
# - BF16: weights rounded to bf16 (8 significant bits) once; measured KL 5e-4, top-1 99.4%, effect kept 0.9998.
BF16 = {"max_kl": 1e-2, "min_top1": 0.97, "min_kept": 0.98, "max_kept": 1.02}


@dataclass
class ExportResult:
    format: str
    path: Path
    checks: list[Check]
    report: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclass
class _Run:
    run_dir: Path
    adapter_dir: Path
    model_dir: Path
    info: dict
    recipe: object | None


def _open_run(run, model: str | Path | None) -> _Run:
    """The run directory (or a ``RunResult``), its final adapter and the base model, or one clear error."""
    from inference.checkpoint import read_config
    from inference.tiny import resolve_model
    run_dir = Path(getattr(run, "run_dir", run))
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"{run_dir}: no final adapter ({adapter_dir} with adapter_config.json and "
                        "adapter_model.safetensors); did the run finish?")
    info = {}
    if (run_dir / "run.json").is_file():
        try:
            info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{run_dir / 'run.json'}: not valid JSON ({exc})") from None
    recipe = None
    if (run_dir / "recipe.yaml").is_file():
        from finetune.recipe import load_recipe
        recipe = load_recipe(run_dir / "recipe.yaml")
    if model is not None:
        model_dir = resolve_model(str(model))
    elif info.get("model_dir") and Path(info["model_dir"]).is_dir():
        model_dir = Path(info["model_dir"])
    elif recipe is not None:
        model_dir = resolve_model(recipe.model.name_or_path)
    else:
        raise UserError(f"{run_dir}: the base model is not recorded (no run.json or recipe.yaml); pass --model")
    from inference.adapters import read_adapter
    from inference.checkpoint import fingerprint
    read_adapter(adapter_dir, read_config(model_dir))  # the adapter must fit this base, else one clear error
    trained_on = info.get("model_fingerprint")
    if trained_on and fingerprint(model_dir) != trained_on:
        raise UserError(f"{run_dir}: the adapter was trained on {info.get('model_dir')}, and {model_dir} is a "
                        "different model (its weights differ); pass the model the run trained on")
    return _Run(run_dir, adapter_dir, model_dir, info, recipe)


def _held_out(run: _Run, echo) -> list:
    """Up to HELD_OUT conversations of the run's eval set (missing data only shrinks the probe set, with a note)."""
    if run.recipe is None:
        return []
    from finetune.data import load_split
    try:
        _, evals = load_split(run.recipe)
    except UserError as exc:
        echo(f"  (held-out data not available from here, probing with the fixed prompts only: {exc})")
        return []
    return [ex for ex in evals if any(m["role"] == "assistant" for m in ex.messages)][:HELD_OUT]


def _destination(run: _Run, fmt: str, out: str | Path | None, force: bool) -> Path:
    dest = Path(out) if out is not None else run.run_dir / "exports" / fmt
    dest = dest.expanduser().resolve()
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--out: {dest} exists and is not a directory")
    run_dir = run.run_dir.resolve()
    if dest == run_dir or dest in run_dir.parents or dest in (run.adapter_dir.resolve(), run.model_dir.resolve()):
        raise UserError(f"--out: {dest} would replace the run or its base model; choose another directory")
    if dest.is_dir() and any(dest.iterdir()):
        if not force:
            raise UserError(f"--out: {dest} already exists and is not empty; pass --force to replace it")
        if not (dest / "parity.json").is_file():  # --force replaces an earlier export, never anything else
            raise UserError(f"--out: {dest} is not empty and is not an export (no parity.json); refusing to delete it")
    return dest


def export(run, to: str | list[str], out: str | Path | None = None, force: bool = False,
           model: str | Path | None = None, base_name: str | None = None, min_effect_kept: float = MIN_EFFECT_KEPT,
           echo=print):
    """Export a run (its directory, or the ``RunResult`` that ``finetune.run`` returned) as ``to``.

    ``to`` is a format or a list of formats (or ``"gguf,ollama"``): several formats share one reference computation,
    and ``ollama`` next to ``gguf`` reuses that GGUF and its checks. ``out`` is the directory to write (one format;
    default ``RUN_DIR/exports/FORMAT``) or, for several, the directory that gets one sub-directory per format.
    ``model`` overrides the base model recorded by the run; ``base_name`` is the ``base_model_name_or_path`` written
    into a ``peft`` export (default: the recipe's model). Returns an :class:`ExportResult` (a list for several
    formats). Raises :class:`UserError` on bad input and when a parity check fails: nothing of that format is left
    behind, and the formats after it are not attempted.
    """
    from finetune.pipeline import set_quiet_environment
    formats = [f.strip() for f in to.split(",")] if isinstance(to, str) else list(to)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown export format {', '.join(map(repr, unknown)) or repr(to)}; choose from "
                        f"{', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise UserError(f"export formats repeat: {', '.join(formats)}")
    formats.sort(key=FORMATS.index)   # gguf before ollama, so ollama can reuse it
    set_quiet_environment()
    run_ = _open_run(run, model)
    if len(formats) == 1:
        dests = {formats[0]: _destination(run_, formats[0], out, force)}
    else:
        dests = {f: _destination(run_, f, Path(out) / f if out is not None else None, force) for f in formats}
    echo(f"exporting {run_.run_dir} as {', '.join(formats)} (base {run_.model_dir})")
    prompts = parity.probe_prompts(_held_out(run_, echo), _options(run_))
    echo(f"  reference: the trained model on {len(prompts)} probes (base + adapter, float32, CPU)")
    ref = parity.Reference(run_.model_dir, run_.adapter_dir, prompts)
    done: dict[str, ExportResult] = {}
    for fmt in formats:
        done[fmt] = _export_one(run_, fmt, dests[fmt], ref, done, base_name=base_name,
                                min_effect_kept=min_effect_kept, echo=echo)
    return done[formats[0]] if len(formats) == 1 else [done[f] for f in formats]


def _export_one(run: _Run, fmt: str, dest: Path, ref, done: dict, echo, **options) -> ExportResult:
    """One format: built in a temporary directory beside ``dest``, checked, then renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    started = time.time()
    try:
        echo(f"{fmt}:")
        artifact = work / "artifact"
        artifact.mkdir()
        scratch = work / "scratch"
        scratch.mkdir()
        checks, report = _EXPORTERS[fmt](run, ref, artifact, scratch, done=done, echo=echo, **options)
        result = ExportResult(fmt, dest, checks, report)
        _write_parity(artifact, result, run, time.time() - started, len(ref.probes))
        if not result.passed:
            raise UserError(f"export {fmt} failed its parity check "
                            f"({'; '.join(f for c in checks for f in c.failures)}); nothing was written")
        from inference.checkpoint import make_readable
        make_readable(artifact)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(artifact, dest)
    except BaseException as exc:
        _record(run, fmt, None, None, str(exc) if isinstance(exc, UserError) else type(exc).__name__)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _record(run, fmt, dest, result, None)
    echo(f"  parity: PASS ({len(checks)} checks); {fmt} written to {dest}")
    return result


def _options(run: _Run):
    from inference import harmony
    if run.recipe is None:
        return harmony.HarmonyOptions(reasoning_effort="low")
    from finetune.data import harmony_options
    return harmony_options(run.recipe)


# -- the formats ----------------------------------------------------------------------------------------------------

def _export_peft(run: _Run, ref, out: Path, scratch: Path, base_name=None, echo=print, **_) -> tuple[list, dict]:
    cfg = json.loads((run.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    name = base_name or (run.recipe.model.name_or_path if run.recipe is not None else str(run.model_dir))
    cfg |= {"base_model_name_or_path": name, "modules_to_save": None, "inference_mode": True}
    warning = vllm_rank_warning(cfg.get("r"))
    if warning:
        echo(f"  warning: {warning}")
    shutil.copy2(run.adapter_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        f"# LoRA adapter for {name}\n\nExported from `{run.run_dir}` by `python -m finetune export`.\n\n"
        f"```bash\nvllm serve {name} --enable-lora --lora-modules adapter={out.name}\n```\n", encoding="utf-8")
    echo("  parity:")
    checks = parity.run_checks([
        lambda: Check("transformers + PeftModel.from_pretrained", "trained model",
                      parity.compare(parity.transformers_logits(run.model_dir, ref.probes, out), ref.trained,
                                     ref.base), SAME),
        lambda: Check("our runtime (adapter unmerged)", "trained model",
                      parity.compare(parity.runtime_logits(run.model_dir, ref.probes, out), ref.trained, ref.base),
                      SAME),
    ], echo)
    return checks, {"rank": cfg.get("r"), "vllm_rank_ok": cfg.get("r") in VLLM_LORA_RANKS}


def vllm_rank_warning(rank) -> str | None:
    """Why vLLM would refuse an adapter of this rank, or None."""
    if rank in VLLM_LORA_RANKS:
        return None
    return (f"LoRA rank {rank} is not one vLLM accepts ({', '.join(map(str, VLLM_LORA_RANKS))}); vLLM will refuse "
            "this adapter (PEFT and our runtime load it)")


def _export_bf16(run: _Run, ref, out: Path, scratch: Path, echo=print, **_) -> tuple[list, dict]:
    from finetune.merge import merge
    merged = merge(run.model_dir, run.adapter_dir, out, "bf16")
    echo(f"  merged {len(merged.merged)} tensors; parity:")
    hf = parity.transformers_logits(out, ref.probes)
    checks = parity.run_checks([
        lambda: Check("transformers (merged-bf16)", "trained model", parity.compare(hf, ref.trained, ref.base), BF16),
        lambda: Check("our runtime (merged-bf16)", "transformers (merged-bf16)",
                      parity.compare(parity.runtime_logits(out, ref.probes), hf),
                      {k: v for k, v in SAME.items() if "kept" not in k}),
    ], echo)
    return checks, merged.summary()


def _mxfp4_merge(run: _Run, ref, out: Path, scratch: Path, min_effect_kept: float, echo) -> tuple[list, dict, list]:
    """The MXFP4 merge into ``out`` with its quality report and checks (shared by merged-mxfp4 and the GGUFs); also
    returns our runtime's logits on it."""
    from finetune.merge import merge
    merged = merge(run.model_dir, run.adapter_dir, out, "mxfp4", scale_rounding=SCALE_ROUNDING)
    bf16_dir = scratch / "merged-bf16"
    merge(run.model_dir, run.adapter_dir, bf16_dir, "bf16", progress=False)
    bf16 = parity.runtime_logits(bf16_dir, ref.probes)
    shutil.rmtree(bf16_dir)
    ours = parity.runtime_logits(out, ref.probes)
    vs_bf16 = parity.compare(ours, bf16, ref.base)
    held_out = [i for i, p in enumerate(ref.probes) if p.source.startswith("held-out")]
    vs_bf16_held = parity.compare([ours[i] for i in held_out], [bf16[i] for i in held_out],
                                  [ref.base[i] for i in held_out]) if held_out else None
    summary = merged.summary()
    echo(f"  requantized {summary['merged_tensors']} adapted tensors to MXFP4, scale rounding "
         f"'{merged.scale_rounding}' ({SCALE_ROUNDING_MEANS}; up in {summary.get('mean_up_share', 0):.0%} of groups): "
         f"mean relative error {summary.get('mean_rel_error', 0):.4f} (all down "
         f"{summary.get('mean_rel_error_down', 0):.4f}, all up {summary.get('mean_rel_error_up', 0):.4f}), adapter "
         f"update kept {summary.get('mean_delta_kept', 1):.4f} (min {summary.get('min_delta_kept', 1):.4f})")
    echo(f"  MXFP4 merge vs bf16 merge: {vs_bf16.line()}")
    report = {"scale_rounding": merged.scale_rounding, "scale_rounding_means": SCALE_ROUNDING_MEANS,
              "tensors": merged.to_dict(), "vs_bf16_merge": vs_bf16.__dict__,
              "vs_bf16_merge_held_out": vs_bf16_held.__dict__ if vs_bf16_held else None,
              "held_out_conversations": len(held_out)}
    (out / "quality_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    echo("  parity:")
    checks = parity.run_checks([
        lambda: Check("our runtime (merged-mxfp4, packed)", "trained model",
                      parity.compare(ours, ref.trained, ref.base), {"min_kept": min_effect_kept}),
        lambda: Check("transformers Mxfp4Config(dequantize=True)", "our runtime (merged-mxfp4)",
                      parity.compare(parity.transformers_logits(out, ref.probes), ours),
                      {k: v for k, v in SAME.items() if "kept" not in k}),
    ], echo)
    return checks, report, ours


def _export_mxfp4(run: _Run, ref, out: Path, scratch: Path, min_effect_kept: float, echo=print, **_):
    checks, report, _ = _mxfp4_merge(run, ref, out, scratch, min_effect_kept, echo)
    return checks, report


def _export_gguf(run: _Run, ref, out: Path, scratch: Path, min_effect_kept: float, done: dict | None = None,
                 echo=print, **_):
    from finetune import gguf
    mxfp4_done = (done or {}).get("merged-mxfp4")
    if mxfp4_done is not None:
        # The MXFP4 merge exported (and checked) a moment ago from the same run: convert that one.
        merged_dir, checks, report = mxfp4_done.path, list(mxfp4_done.checks), mxfp4_done.report
        echo(f"  the MXFP4 merge: the merged-mxfp4 export ({merged_dir}), checked above")
        ours = parity.runtime_logits(merged_dir, ref.probes)
    else:
        merged_dir = scratch / "merged-mxfp4"
        merged_dir.mkdir()
        checks, report, ours = _mxfp4_merge(run, ref, merged_dir, scratch, min_effect_kept, echo)
    gguf_file = gguf.write_model(merged_dir, out / "model.gguf")
    shutil.copy2(merged_dir / "quality_report.json", out / "quality_report.json")
    checks += parity.run_checks([lambda: _llama_check("llama.cpp (model.gguf)", gguf_file, None, merged_dir, ref,
                                                      ours, "our runtime (same MXFP4 merge)")], echo)
    return checks, report


def _export_gguf_lora(run: _Run, ref, out: Path, scratch: Path, echo=print, **_):
    from finetune import gguf
    base_gguf = gguf.write_model(run.model_dir, scratch / "base.gguf")
    lora_gguf = gguf.write_lora(run.adapter_dir, run.model_dir, out / "adapter.gguf")
    echo("  parity:")
    checks = parity.run_checks([lambda: _llama_check("llama.cpp (base GGUF + adapter.gguf)", base_gguf, lora_gguf,
                                                     None, ref, ref.trained, "trained model")], echo)
    return checks, {}


def _export_ollama(run: _Run, ref, out: Path, scratch: Path, min_effect_kept: float, done: dict, echo=print, **_):
    gguf_done = done.get("gguf")
    if gguf_done is not None:
        # The GGUF exported (and checked) a moment ago from the same run: the same bytes, so the same checks.
        shutil.copy2(gguf_done.path / "model.gguf", out / "model.gguf")
        shutil.copy2(gguf_done.path / "quality_report.json", out / "quality_report.json")
        if _sha256(out / "model.gguf") != _sha256(gguf_done.path / "model.gguf"):
            raise UserError(f"{out / 'model.gguf'}: copy differs from {gguf_done.path / 'model.gguf'}")
        echo(f"  model.gguf: the gguf export's file ({gguf_done.path}), checked above")
        checks, report = gguf_done.checks, gguf_done.report
    else:
        checks, report = _export_gguf(run, ref, out, scratch, min_effect_kept=min_effect_kept, done=done, echo=echo)
    (out / "Modelfile").write_text(modelfile(_options(run)), encoding="utf-8")
    (out / "README.md").write_text(
        f"# {run.run_dir.name} for Ollama\n\nExported from `{run.run_dir}` by `python -m finetune export`.\n\n"
        f"```bash\nollama create {run.run_dir.name} -f Modelfile && ollama run {run.run_dir.name}\n```\n",
        encoding="utf-8")
    return checks, report


def _sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_EXPORTERS = {"peft": _export_peft, "merged-bf16": _export_bf16, "merged-mxfp4": _export_mxfp4,
              "gguf": _export_gguf, "gguf-lora": _export_gguf_lora, "ollama": _export_ollama}


# -- llama.cpp ------------------------------------------------------------------------------------------------------

# llama.cpp on CPU multiplies MXFP4 experts with activations quantized to 8 bits (q8) and its own kernels, so its
# logits differ from a float32 reference by more than float32 noise. Measured on the tiny demo run: see
# tests/test_gguf.py. The criteria ask for the same next tokens almost everywhere and for the adapter's effect.
LLAMA = {"min_top1": 0.9, "max_kl": 5e-2}
LLAMA_LORA = LLAMA | {"min_kept": 0.9, "max_kept": 1.1}


def _llama_check(consumer: str, gguf_file: Path, lora_file: Path | None, same_weights_dir: Path | None, ref,
                 against_logits, against: str) -> Check:
    """llama.cpp's teacher-forced logits vs ``against_logits``; its greedy tokens vs our runtime's on the same weights
    (``same_weights_dir``) or vs the trained model's; its tokenizer vs openai-harmony."""
    from finetune import gguf
    logits = [_tensor(x) for x in gguf.llama_logits_many(gguf_file, [p.ids for p in ref.probes], lora_file=lora_file)]
    criteria = LLAMA_LORA if lora_file is not None else LLAMA
    comparison = parity.compare(logits, against_logits, ref.base)
    expected = _greedy_ours(same_weights_dir, ref) if same_weights_dir is not None else [
        ref.continuation(p) for p in ref.probes]
    got = gguf.llama_greedy_many(gguf_file, [p.ids[:p.prompt_len] for p in ref.probes], parity.CONTINUATION,
                                 lora_file=lora_file)
    same = sum(_until_stop(g) == _until_stop(e) for g, e in zip(got, expected))
    extra = {"greedy_same": f"{same}/{len(expected)}", "tokenizer_equal": _tokenizer_matches(gguf_file, ref)}
    check = Check(consumer, against, comparison, criteria, extra)
    if same < len(expected) - len(expected) // 4:  # q8 activations may flip a near-tie; most probes must agree
        check.failures.append(f"greedy tokens differ on {len(expected) - same} of {len(expected)} probes")
        check.passed = False
    return check


def _until_stop(ids: list[int]) -> list[int]:
    """Tokens up to (not including) the first end-of-turn token: where each side stops is its own business."""
    from inference import harmony
    stops = set(harmony.stop_token_ids())
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def _tensor(array):
    import torch
    return torch.from_numpy(array).float()


def _greedy_ours(model_dir: Path, ref) -> list[list[int]]:
    import torch

    from inference.engine import Engine, SamplingParams
    engine = Engine.load(model_dir, dtype=torch.float32, device="cpu")
    return [engine.complete(p.ids[:p.prompt_len], SamplingParams(max_tokens=parity.CONTINUATION,
                                                                  temperature=0.0)).token_ids for p in ref.probes]


def _tokenizer_matches(gguf_file: Path, ref) -> bool:
    """The GGUF's own tokenizer turns the probes' text into the same ids openai-harmony produced."""
    from finetune import gguf
    from inference import harmony
    enc = harmony.encoding()
    prompts = [p.ids[:p.prompt_len] for p in ref.probes]
    return gguf.llama_tokenize_many(gguf_file, [enc.decode(ids) for ids in prompts]) == prompts


def modelfile(options) -> str:
    """An Ollama Modelfile for a Harmony model: the GGUF, a Harmony template and the stop tokens."""
    from inference import harmony
    enc = harmony.encoding()
    system = enc.decode(harmony.render_prompt([{"role": "user", "content": "\x00"}], None, options))
    system = system[:system.index("<|start|>user")]
    return (
        "# Ollama Modelfile for a gpt-oss fine-tune (Harmony format); made by `python -m finetune export`.\n"
        "FROM ./model.gguf\n"
        'TEMPLATE """' + system
        + "{{- if .System }}<|start|>developer<|message|># Instructions\n\n{{ .System }}<|end|>{{ end }}"
        "{{- range .Messages }}"
        "{{- if eq .Role \"user\" }}<|start|>user<|message|>{{ .Content }}<|end|>"
        "{{- else if eq .Role \"assistant\" }}<|start|>assistant<|channel|>final<|message|>{{ .Content }}<|end|>"
        "{{- end }}{{- end }}<|start|>assistant\"\"\"\n"
        # <|end|> closes every message, the reasoning too: a turn ends only at <|return|> (answer) or <|call|> (tool).
        'PARAMETER stop "<|return|>"\nPARAMETER stop "<|call|>"\n'
        "PARAMETER temperature 1.0\nPARAMETER top_p 1.0\n")


# -- recording ------------------------------------------------------------------------------------------------------

def _write_parity(out: Path, result: ExportResult, run: _Run, seconds: float, probes: int) -> None:
    data = {"format": result.format, "run_dir": str(run.run_dir), "base_model": str(run.model_dir),
            "passed": result.passed, "seconds": round(seconds, 1), "probes": probes,
            "checks": [c.to_dict() for c in result.checks]}
    (out / "parity.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _record(run: _Run, fmt: str, path: Path | None, result: ExportResult | None, error: str | None) -> None:
    """Add the export to run.json and to the run's MLflow run (when it has one)."""
    entry = {"format": fmt, "path": str(path) if path else None, "passed": bool(result and result.passed),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "error": error}
    info_path = run.run_dir / "run.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info.setdefault("exports", []).append(entry)
        tmp = info_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, info_path)
    if run.info.get("mlflow_run_id"):
        from finetune import tracking
        tracking.record_export(run.info.get("tracking_uri"), run.info["mlflow_run_id"], entry,
                               path / "parity.json" if path else None)
