"""``python -m finetune export RUN_DIR --to FORMAT``: ship what a run trained, each artifact proven to carry it.

Formats (:data:`FORMATS`):

- ``peft``: the adapter as vLLM and PEFT load it (``base_model_name_or_path`` set, experts through
  ``target_parameters``, no ``modules_to_save``) with a README whose commands name the export where it lies; checked
  with ``PeftModel.from_pretrained`` on transformers and with our runtime.
- ``merged-bf16``: an HF-layout gpt-oss with the adapter folded in, experts dense bf16 (:mod:`finetune.ship.merge`);
  checked with transformers and our runtime, layer by layer against the trained model (within 2 * MARGIN of the
  trained model's own bf16 error, measured in the same run), and the two consumers against each other.
- ``merged-mxfp4``: the same with experts requantized to MXFP4 in the original layout (scale rounding ``"best"``: per
  group the lower-error of the OCP and the gpt-oss convention), plus ``quality_report.json`` (the rounding used;
  per-tensor quantization error, next to what pure ``down`` and pure ``up`` rounding would have reached, and adapter
  update kept; KL, top-1 agreement and adapter effect kept against the trained model, held-out data apart); checked
  with transformers (its own MXFP4 dequantization) and our runtime, and refused when a layer keeps less than
  ``--min-effect-kept`` of the adapter's effect or the expert updates were rounded away (:func:`_requantized_check`).
- ``gguf``: the MXFP4 merge as one GGUF in llama.cpp's gpt-oss layout; ``gguf-lora``: the adapter as a GGUF LoRA
  beside the base GGUF it was checked on; ``ollama``: the merged GGUF with a Modelfile (:mod:`finetune.ship.ollama`).
  Each GGUF file is read back with gguf-py and must hold exactly the tensors (bit for bit) and metadata the writer
  plans from the checked MXFP4 merge, the base or the adapter (:func:`finetune.ship.gguf.read_back_model`): this
  holds at any size. All three are also run by llama.cpp itself (llama-cpp-python), free-running, which decides as
  well: meaningful on the tiny model, while at real size with random weights its logits are chaotic.

Before anything is written the plan is printed and the disk checked (:mod:`finetune.ship.plan`). The reference and
every consumer run where :class:`finetune.ship.parity.Where` says: the GPU when there is one, loaded whole when the
model fits, else layer by layer. Every export is written to a temporary directory beside its destination, checked
(:mod:`finetune.ship.parity`: a lossy format against the trained model layer by layer, where errors cannot
compound; free-running logits reported beside), and only then renamed into place: a failed check, an error or
Ctrl-C leaves nothing that looks complete. A merged export's files are also read back, every adapted tensor held
against the exact merge (:mod:`finetune.ship.weights`): logits see an expert's update only through the tokens routed
to it, weights see all of it. The result lands in ``parity.json`` inside the export, in the run's
``run.json`` and in its MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.ship import parity
from finetune.ship.ollama import modelfile
from finetune.ship.parity import Check
from inference.errors import UserError
from inference.files import write_json

FORMATS = ("peft", "merged-bf16", "merged-mxfp4", "gguf", "gguf-lora", "ollama")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
HELD_OUT = 3           # held-out conversations of the run's eval set added to the fixed probes
MIN_EFFECT_KEPT = 0.8  # an MXFP4 merge must keep this share of the adapter's effect in every layer (see parity)
# How the MXFP4 merge picks each 32-value group's scale (inference.model.mxfp4): the lower-error of the OCP rule
# ("down") and gpt-oss's quantizer ("up"), never worse than either; the export line and quality_report.json name it.
SCALE_ROUNDING = "best"
SCALE_ROUNDING_MEANS = "per 32-value group the lower-error scale of 'down' (OCP MX rule) and 'up' (gpt-oss quantizer)"

class ExportFailed(UserError):
    """A parity check failed: nothing was written. ``result`` holds the checks (what failed and by how much)."""

    def __init__(self, message: str, result: "ExportResult"):
        super().__init__(message)
        self.result = result


@dataclass
class ExportResult:
    format: str
    path: Path
    checks: list[Check]
    report: dict = field(default_factory=dict)
    seconds: float = 0.0          # this format's own time (the shared reference not included)
    reference_seconds: float = 0.0
    reference: str = ""           # where and how the reference ran

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
    from inference.model.checkpoint import read_config
    from inference.model.tiny import resolve_model
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
    from inference.model.adapters import read_adapter
    from inference.model.checkpoint import fingerprint
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
    from finetune.data.prepare import load_split
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
           device: str | None = None, max_memory: float | None = None, check_dtype: str = "float32",
           echo=print, progress: bool = True):
    """Export a run (its directory, or the ``RunResult`` that ``finetune.run`` returned) as ``to``.

    ``to`` is a format or a list of formats (or ``"gguf,ollama"``): several formats share one reference computation,
    and ``ollama`` next to ``gguf`` reuses that GGUF and its checks. ``out`` is the directory to write (one format;
    default ``RUN_DIR/exports/FORMAT``) or, for several, the directory that gets one sub-directory per format.
    ``model`` overrides the base model recorded by the run; ``base_name`` is the ``base_model_name_or_path`` written
    into a ``peft`` export (default: the recipe's model). ``device`` (``"cuda"`` or ``"cpu"``; default the GPU when
    there is one) is where merges and checks run; ``max_memory`` (GiB) caps what a check may load whole (on the
    GPU, or the host with ``device="cpu"``; beyond it, models run layer-streamed); ``check_dtype`` is what the checks
    compute in (``"float32"``, or ``"bfloat16"`` with pass criteria widened by bf16's error as measured in the same
    run). Returns an :class:`ExportResult` (a list for several formats). Raises :class:`UserError` on bad input and
    when the disk is too small (before anything is written), :class:`ExportFailed` when a parity check fails: nothing
    of that format is left behind, and the formats after it are not attempted.
    """
    from finetune.ship import plan as planning
    from finetune.train.pipeline import set_quiet_environment
    formats = [f.strip() for f in to.split(",")] if isinstance(to, str) else list(to)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown export format {', '.join(map(repr, unknown)) or repr(to)}; choose from "
                        f"{', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise UserError(f"export formats repeat: {', '.join(formats)}")
    if device not in (None, "cuda", "cpu"):
        raise UserError(f"--device: expected cuda or cpu, got {device!r}")
    if device == "cuda" and not _cuda():
        raise UserError("--device cuda: no CUDA GPU is visible here")
    if check_dtype not in ("float32", "bfloat16"):
        raise UserError(f"--check-dtype: expected float32 or bfloat16, got {check_dtype!r}")
    if max_memory is not None and max_memory <= 0:
        raise UserError(f"--max-memory: expected a positive number of GiB, got {max_memory}")
    formats.sort(key=FORMATS.index)   # gguf before ollama, so ollama can reuse it
    set_quiet_environment()
    run_ = _open_run(run, model)
    if len(formats) == 1:
        dests = {formats[0]: _destination(run_, formats[0], out, force)}
    else:
        dests = {f: _destination(run_, f, Path(out) / f if out is not None else None, force) for f in formats}
    where = parity.Where.pick(device, None if max_memory is None else int(max_memory * (1 << 30)),
                              check_dtype)
    the_plan = planning.make(run_.model_dir, run_.adapter_dir, dests, where)
    echo(f"exporting {run_.run_dir} as {', '.join(formats)} (base {run_.model_dir})")
    for line in the_plan.lines():
        echo("  " + line)
    the_plan.check_disk()
    prompts = parity.probe_prompts(_held_out(run_, echo), _options(run_))
    echo(f"reference: the trained model on {len(prompts)} probes (base + adapter, "
         f"{where.describe(run_.model_dir)})")
    started = time.time()
    ref = parity.Reference(run_.model_dir, run_.adapter_dir, prompts, where, progress)
    ref.seconds = time.time() - started
    precision = "" if ref.precision is None else f"; its own {str(where.dtype).removeprefix('torch.')} error " \
        f"(vs float32): {ref.precision.line()}"
    echo(f"  ready in {ref.seconds:.1f} s{precision}")
    done: dict[str, ExportResult] = {}
    try:
        for fmt in formats:
            done[fmt] = _export_one(run_, fmt, dests[fmt], ref, done, base_name=base_name,
                                    min_effect_kept=min_effect_kept, echo=echo)
    finally:
        ref.release()
    return done[formats[0]] if len(formats) == 1 else [done[f] for f in formats]


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _export_one(run: _Run, fmt: str, dest: Path, ref, done: dict, echo, **options) -> ExportResult:
    """One format: built in a temporary directory beside ``dest``, checked, then renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(dest.parent, echo)
    # the pid in the name tells a later export whether the process building it is gone (killed: it cannot clean up)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}-", dir=dest.parent))
    started = time.time()
    try:
        echo(f"{fmt}:")
        artifact = work / "artifact"
        artifact.mkdir()
        scratch = work / "scratch"
        scratch.mkdir()
        if fmt != "peft":
            ref.release()   # the reference's model leaves the device: the artifacts' consumers need it
        checks, report = _EXPORTERS[fmt](run, ref, artifact, scratch, done=done, echo=echo, dest=dest, **options)
        result = ExportResult(fmt, dest, checks, report, time.time() - started, ref.seconds,
                              ref.where.describe(run.model_dir))
        _write_parity(artifact, result, run, ref)
        if not result.passed:
            hint = _hint(fmt, report)
            raise ExportFailed(f"export {fmt} failed its parity check "
                               f"({'; '.join(f for c in checks for f in c.failures)}){hint}; nothing was written",
                               result)
        from inference.model.checkpoint import make_readable
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
    echo(f"  parity: PASS ({len(checks)} checks); {fmt} written to {dest} in {result.seconds:.1f} s")
    return result


def clean_stale_partials(exports: Path, echo=print) -> list[str]:
    """Remove the work directories (``.FORMAT.partial-PID-*``) that exports killed mid-way left in ``exports``:
    only those whose process is gone; an export still running in another process keeps its own."""
    removed = []
    for path in sorted(exports.glob(".*.partial-*")):
        match = re.fullmatch(r"\..+\.partial-(\d+)-[^/]+", path.name)
        if match and path.is_dir() and not path.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        echo(f"removed {len(removed)} unfinished export(s) left by a killed export: {', '.join(removed)}")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process: alive
        return True
    return True


def _hint(fmt: str, report: dict) -> str:
    """What to do instead, when an MXFP4 merge lost the adapter: its update is finer than MXFP4's grid."""
    summary = (report.get("tensors") or {}).get("summary", {}) if fmt in ("merged-mxfp4", "gguf", "ollama") else {}
    kept = summary.get("mean_delta_kept")
    if kept is None or kept >= MIN_EFFECT_KEPT:
        return ""
    return (f". Requantizing to MXFP4 kept {kept:.0%} of the adapter's update (the update is finer than MXFP4's "
            "grid of 8 magnitudes per 32 values); ship it as peft (vLLM, PEFT, our runtime), merged-bf16, or "
            "gguf-lora (llama.cpp) instead")


def _options(run: _Run):
    from inference import harmony
    if run.recipe is None:
        return harmony.HarmonyOptions(reasoning_effort="low")
    from finetune.data.prepare import harmony_options
    return harmony_options(run.recipe)


# -- the formats ----------------------------------------------------------------------------------------------------

def _export_peft(run: _Run, ref, out: Path, scratch: Path, base_name=None, echo=print, dest: Path | None = None,
                 **_) -> tuple[list, dict]:
    cfg = json.loads((run.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    name = base_name or (run.recipe.model.name_or_path if run.recipe is not None else str(run.model_dir))
    cfg |= {"base_model_name_or_path": name, "modules_to_save": None, "inference_mode": True}
    warning = vllm_rank_warning(cfg.get("r"))
    if warning:
        echo(f"  warning: {warning}")
    shutil.copy2(run.adapter_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "README.md").write_text(peft_readme(run, name, dest or out), encoding="utf-8")
    echo("  parity:")
    where = ref.where
    checks = parity.run_checks([
        # the same code on the same device as the reference, reading the exported files: equal up to float noise
        lambda: Check(f"our runtime (adapter unmerged; {where.describe(run.model_dir)})", "trained model",
                      parity.compare(ref.adapter_logits(out, "exported"), ref.trained, ref.base),
                      parity.criteria("identical")),
        lambda: Check(f"transformers + PeftModel.from_pretrained ({where.describe(run.model_dir, dense=True)})",
                      "trained model", parity.compare(_transformers_peft(run, ref, out), ref.trained, ref.base),
                      parity.criteria("same", ref.precision)),
    ], echo)
    return checks, {"rank": cfg.get("r"), "vllm_rank_ok": cfg.get("r") in VLLM_LORA_RANKS}


def _transformers_peft(run: _Run, ref, out: Path) -> list:
    ref.release()    # the reference's model leaves the device first: transformers holds its own copy
    return parity.transformers_logits(run.model_dir, ref.probes, out, ref.where)


def peft_readme(run: _Run, name: str, path: Path) -> str:
    """The README of a peft export: commands that work when copied (the export's own path, the base's name)."""
    return (f"# LoRA adapter for {name}\n\nExported from `{run.run_dir}` by `python -m finetune export`.\n\n"
            "Serve it with vLLM (the base model, with this adapter selectable as `adapter`):\n\n"
            f"```bash\nvllm serve {name} --enable-lora --lora-modules adapter={path}\n```\n\n"
            "Load it with PEFT:\n\n"
            f"```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({name!r}), {str(path)!r})\n```\n\n"
            "Or with this workbench's runtime:\n\n"
            f"```bash\npython -m inference chat --model {name} --adapter {path}\n```\n")


def vllm_rank_warning(rank) -> str | None:
    """Why vLLM would refuse an adapter of this rank, or None."""
    if rank in VLLM_LORA_RANKS:
        return None
    return (f"LoRA rank {rank} is not one vLLM accepts ({', '.join(map(str, VLLM_LORA_RANKS))}); vLLM will refuse "
            "this adapter (PEFT and our runtime load it)")


def _export_bf16(run: _Run, ref, out: Path, scratch: Path, echo=print, **_) -> tuple[list, dict]:
    from finetune.ship import weights
    from finetune.ship.merge import merge
    where = ref.where
    merged = merge(run.model_dir, run.adapter_dir, out, "bf16", device=where.device)
    echo(f"  merged {len(merged.merged)} tensors on the {where.device.type.upper()}; parity:")
    layers = _layer_reference(ref, echo)
    criteria = parity.layer_criteria("bf16-merge", layers.bf16)
    budget = parity.budget_of(layers.bf16)
    exact = _float32(where)
    hf = parity.transformers_logits(out, ref.probes, where=where)
    checks = parity.run_checks([
        lambda: weights.check(run.model_dir, run.adapter_dir, out, "bf16", device=where.device,
                              progress=ref.progress),
        # free-running: at real size errors compound over layers (see parity), so these numbers are reported only
        lambda: Check(f"transformers (merged-bf16; {where.describe(out, dense=True)})", "trained model",
                      parity.compare(hf, ref.trained, ref.base), {}, decides=False),
        lambda: parity.LayerCheck(f"transformers (merged-bf16; {exact.describe(out, dense=True)})", "trained model",
                                  parity.compare_layers(*parity.transformers_layers(
                                      out, ref.probes, layers.inputs, where=exact, routing=layers.routing), layers),
                                  criteria, budget),
        lambda: parity.LayerCheck(f"our runtime (merged-bf16; {exact.device.type.upper()}, float32, layer-streamed)",
                                  "trained model", parity.compare_layers(*parity.runtime_layers(
                                      out, ref.probes, layers.inputs, exact, routing=layers.routing), layers),
                                  criteria, budget),
        lambda: Check(f"our runtime (merged-bf16; {where.describe(out)})", "transformers (merged-bf16)",
                      parity.compare(parity.runtime_logits(out, ref.probes, where), hf),
                      parity.without_kept(parity.criteria("same", ref.precision))),
    ], echo)
    return checks, merged.summary()


def _layer_reference(ref, echo, budget: bool = True) -> "parity.LayerReference":
    """The trained model layer by layer (measured once per export command), with its bf16 error when ``budget`` is
    asked for (printed when measured)."""
    fresh = ref.by_layer is None or (budget and ref.by_layer.bf16 is None)
    layers = ref.layers(ref.progress, budget)
    if fresh and budget:
        echo(f"  reference layer by layer (each layer fed the trained model's own input; float32, layer-streamed); "
             f"its own bf16 error on those inputs, the budget: {layers.bf16.line()}")
    return layers


def _float32(where: "parity.Where") -> "parity.Where":
    """The layer-wise checks compute in float32 wherever the others run: their budget is bf16's error."""
    import torch
    return parity.Where(where.device, torch.float32, where.budget)


def _mxfp4_merge(run: _Run, ref, out: Path, min_effect_kept: float, echo) -> tuple[list, dict, list]:
    """The MXFP4 merge into ``out`` with its quality report and checks (shared by merged-mxfp4 and the GGUFs); also
    returns our runtime's logits on it."""
    from finetune.ship import weights
    from finetune.ship.merge import merge
    where = ref.where
    merged = merge(run.model_dir, run.adapter_dir, out, "mxfp4", scale_rounding=SCALE_ROUNDING, device=where.device)
    ours = parity.runtime_logits(out, ref.probes, where)
    vs_trained = parity.compare(ours, ref.trained, ref.base)
    held_out = [i for i, p in enumerate(ref.probes) if p.source.startswith("held-out")]
    vs_held = parity.compare([ours[i] for i in held_out], [ref.trained[i] for i in held_out],
                             [ref.base[i] for i in held_out]) if held_out else None
    summary = merged.summary()
    echo(f"  requantized {summary['merged_tensors']} adapted tensors to MXFP4 on the {where.device.type.upper()}, "
         f"scale rounding '{merged.scale_rounding}' ({SCALE_ROUNDING_MEANS}; up in "
         f"{summary.get('mean_up_share', 0):.0%} of groups): mean relative error "
         f"{summary.get('mean_rel_error', 0):.4f} (all down {summary.get('mean_rel_error_down', 0):.4f}, all up "
         f"{summary.get('mean_rel_error_up', 0):.4f}), adapter update kept {summary.get('mean_delta_kept', 1):.4f} "
         f"(min {summary.get('min_delta_kept', 1):.4f})")
    layers = _layer_reference(ref, echo, budget=False)     # MXFP4's bounds are --min-effect-kept, not bf16's error
    exact = _float32(where)
    by_layer = parity.compare_layers(*parity.runtime_layers(out, ref.probes, layers.inputs, exact,
                                                            routing=layers.routing), layers)
    report = {"scale_rounding": merged.scale_rounding, "scale_rounding_means": SCALE_ROUNDING_MEANS,
              "tensors": merged.to_dict(), "vs_trained": vs_trained.__dict__,
              "vs_trained_layer_by_layer": by_layer.to_dict(),
              "vs_trained_held_out": vs_held.__dict__ if vs_held else None,
              "held_out_conversations": len(held_out), "reference": where.describe(run.model_dir),
              "reference_precision": ref.precision.__dict__ if ref.precision else None}
    (out / "quality_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    echo("  parity:")
    checks = parity.run_checks([
        lambda: weights.check(run.model_dir, run.adapter_dir, out, "mxfp4", SCALE_ROUNDING, where.device,
                              progress=ref.progress),
        # free-running: at real size errors compound over layers (see parity), so these numbers are reported only
        lambda: Check(f"our runtime (merged-mxfp4, packed; {where.describe(out)})", "trained model", vs_trained, {},
                      decides=False),
        lambda: _requantized_check(f"our runtime (merged-mxfp4, packed; {exact.device.type.upper()}, float32, "
                                   "layer-streamed)", by_layer, summary, min_effect_kept),
        lambda: Check(f"transformers Mxfp4Config(dequantize=True) ({where.describe(out, dense=True)})",
                      "our runtime (merged-mxfp4)", parity.compare(parity.transformers_logits(out, ref.probes,
                                                                                                where=where), ours),
                      parity.without_kept(parity.criteria("same", ref.precision))),
    ], echo)
    return checks, report, ours


def _requantized_check(consumer: str, by_layer: "parity.LayerComparison", summary: dict,
                       min_effect_kept: float) -> "parity.LayerCheck":
    """The MXFP4 merge against the trained model, layer by layer: the share of the adapter's effect kept in every
    layer (and on the teacher-forced logits), and the share of the expert updates kept in weight space (measured
    exactly by the merge). All must reach ``min_effect_kept``: attention LoRA survives requantization untouched, so
    the layers' outputs alone can look fine while every expert update was rounded away."""
    kept = summary.get("mean_delta_kept")
    extra = {} if kept is None else {"expert_update_kept": round(kept, 4)}
    check = parity.LayerCheck(consumer, "trained model", by_layer, parity.layer_criteria("mxfp4-merge",
                              min_kept=min_effect_kept), f"--min-effect-kept {min_effect_kept:g}; expert updates "
                              f"kept in weight space ≥ {min_effect_kept:g}", extra)
    if kept is not None and kept < min_effect_kept:
        check.failures.append(f"expert updates kept {kept:.4f} < {min_effect_kept} in weight space (MXFP4's grid "
                              "rounded them away)")
        check.passed = False
    return check


def _export_mxfp4(run: _Run, ref, out: Path, scratch: Path, min_effect_kept: float, echo=print, **_):
    checks, report, _ = _mxfp4_merge(run, ref, out, min_effect_kept, echo)
    return checks, report


def _export_gguf(run: _Run, ref, out: Path, scratch: Path, min_effect_kept: float, done: dict | None = None,
                 echo=print, **_):
    from finetune.ship import gguf
    mxfp4_done = (done or {}).get("merged-mxfp4")
    if mxfp4_done is not None:
        # The MXFP4 merge exported (and checked) a moment ago from the same run: convert that one.
        merged_dir, checks, report = mxfp4_done.path, list(mxfp4_done.checks), mxfp4_done.report
        echo(f"  the MXFP4 merge: the merged-mxfp4 export ({merged_dir}), checked above")
        ours = parity.runtime_logits(merged_dir, ref.probes, ref.where)
    else:
        merged_dir = scratch / "merged-mxfp4"
        merged_dir.mkdir()
        checks, report, ours = _mxfp4_merge(run, ref, merged_dir, min_effect_kept, echo)
    gguf_file = gguf.write_model(merged_dir, out / "model.gguf")
    shutil.copy2(merged_dir / "quality_report.json", out / "quality_report.json")
    checks += parity.run_checks([
        # the file holds exactly the planned tensors of the checked merge, which holds at any size; llama.cpp's own
        # forward is checked free-running only (meaningful on the tiny model, chaotic at real size)
        lambda: gguf.read_back_model(merged_dir, gguf_file, consumer="gguf-py (model.gguf read back)",
                                     against="the GGUF writer's plan from the checked MXFP4 merge"),
        lambda: _llama_check("llama.cpp (model.gguf)", gguf_file, None, merged_dir, ref, ours,
                             "our runtime (same MXFP4 merge)"),
    ], echo)
    return checks, report


def _export_gguf_lora(run: _Run, ref, out: Path, scratch: Path, echo=print, dest: Path | None = None, **_):
    from finetune.ship import gguf
    # The base GGUF ships beside the adapter: llama.cpp applies a GGUF LoRA to the GGUF it was made for, and this
    # is the one the check ran.
    base_gguf = gguf.write_model(run.model_dir, out / "base.gguf")
    lora_gguf = gguf.write_lora(run.adapter_dir, run.model_dir, out / "adapter.gguf")
    (out / "README.md").write_text(gguf_lora_readme(run, dest or out), encoding="utf-8")
    echo("  parity:")
    checks = parity.run_checks([
        lambda: gguf.read_back_model(run.model_dir, base_gguf, consumer="gguf-py (base.gguf read back)",
                                     against="the GGUF writer's plan from the base model"),
        lambda: gguf.read_back_lora(run.adapter_dir, run.model_dir, lora_gguf,
                                    consumer="gguf-py (adapter.gguf read back)",
                                    against="the GGUF writer's plan from the run's adapter"),
        lambda: _llama_check("llama.cpp (base.gguf + adapter.gguf)", base_gguf, lora_gguf, None, ref, ref.trained,
                             "trained model"),
    ], echo)
    return checks, {"base_gguf": "base.gguf", "base_model": str(run.model_dir)}


def gguf_lora_readme(run: _Run, path: Path) -> str:
    return (f"# GGUF LoRA adapter from {run.run_dir.name}\n\nExported from `{run.run_dir}` by `python -m finetune "
            f"export`. `adapter.gguf` is the adapter; `base.gguf` is the base model `{run.model_dir}` converted to "
            "GGUF, the file the adapter was checked against (llama.cpp applies a LoRA to the GGUF it was made "
            "for).\n\n"
            f"```bash\nllama-cli -m {path / 'base.gguf'} --lora {path / 'adapter.gguf'} -cnv\n"
            f"llama-server -m {path / 'base.gguf'} --lora {path / 'adapter.gguf'} --host 127.0.0.1 --port 8080\n```\n")


def _export_ollama(run: _Run, ref, out: Path, scratch: Path, min_effect_kept: float, done: dict, echo=print,
                   dest: Path | None = None, **_):
    gguf_done = done.get("gguf")
    if gguf_done is not None:
        # The GGUF exported (and checked) a moment ago from the same run: the same bytes, so the same checks.
        _link_or_copy(gguf_done.path / "model.gguf", out / "model.gguf")
        shutil.copy2(gguf_done.path / "quality_report.json", out / "quality_report.json")
        if os.path.getsize(out / "model.gguf") != os.path.getsize(gguf_done.path / "model.gguf") or (
                _sha256(out / "model.gguf") != _sha256(gguf_done.path / "model.gguf")):
            raise UserError(f"{out / 'model.gguf'}: copy differs from {gguf_done.path / 'model.gguf'}")
        echo(f"  model.gguf: the gguf export's file ({gguf_done.path}), checked above")
        checks, report = gguf_done.checks, gguf_done.report
    else:
        checks, report = _export_gguf(run, ref, out, scratch, min_effect_kept=min_effect_kept, done=done, echo=echo)
    (out / "Modelfile").write_text(modelfile(_options(run)), encoding="utf-8")
    name = run.run_dir.name
    (out / "README.md").write_text(
        f"# {name} for Ollama\n\nExported from `{run.run_dir}` by `python -m finetune export`.\n\n"
        f"```bash\ncd {dest or out} && ollama create {name} -f Modelfile && ollama run {name}\n```\n",
        encoding="utf-8")
    return checks, report


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when both are on one filesystem (a 13 GB GGUF is not copied twice), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _sha256(path: Path) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    from finetune.ship import gguf
    logits = [_tensor(x) for x in gguf.llama_logits_many(gguf_file, [p.ids for p in ref.probes], lora_file=lora_file)]
    criteria = LLAMA_LORA if lora_file is not None else LLAMA
    comparison = parity.compare(logits, against_logits, ref.base)
    prompts = [p.ids[:p.prompt_len] for p in ref.probes]
    expected = parity.greedy(same_weights_dir, prompts, ref.where) if same_weights_dir is not None else [
        ref.continuation(p) for p in ref.probes]
    got = gguf.llama_greedy_many(gguf_file, prompts, parity.CONTINUATION, lora_file=lora_file)
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


def _tokenizer_matches(gguf_file: Path, ref) -> bool:
    """The GGUF's own tokenizer turns the probes' text into the same ids openai-harmony produced."""
    from finetune.ship import gguf
    from inference import harmony
    enc = harmony.encoding()
    prompts = [p.ids[:p.prompt_len] for p in ref.probes]
    return gguf.llama_tokenize_many(gguf_file, [enc.decode(ids) for ids in prompts]) == prompts


# -- recording ------------------------------------------------------------------------------------------------------

def _write_parity(out: Path, result: ExportResult, run: _Run, ref) -> None:
    data = {"format": result.format, "run_dir": str(run.run_dir), "base_model": str(run.model_dir),
            "passed": result.passed, "seconds": round(result.seconds, 1),
            "reference_seconds": round(getattr(ref, "seconds", 0.0), 1), "probes": len(ref.probes),
            "reference": ref.where.describe(run.model_dir),
            "reference_precision": ref.precision.__dict__ if ref.precision is not None else None,
            "reference_bf16_layer_by_layer": ref.by_layer.bf16.to_dict() if ref.by_layer is not None
            and ref.by_layer.bf16 is not None else None,
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
        write_json(info_path, info)
    logged = run.recipe.tracking.log if run.recipe is not None else ["exports"]
    if run.info.get("mlflow_run_id") and "exports" in logged:
        from finetune.track import tracking
        tracking.record_export(run.info.get("tracking_uri"), run.info["mlflow_run_id"], entry,
                               path / "parity.json" if path else None)
