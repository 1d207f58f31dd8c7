"""``run(recipe)``: one fine-tuning run, top to bottom: set up, evaluate, train, save, evaluate, record.

The run directory holds everything needed to understand and reuse the run::

    recipe.yaml        the resolved recipe (every default written out)
    run.json           status, timings, MLflow run id, library versions, data stats, coverage, trained tokens
    coverage.json      where LoRA sits: trainable parameters per layer and group (attention, experts)
    metrics.jsonl      one line per logged step
    checkpoints/       Trainer checkpoints (for --resume)
    adapter/           the final adapter in PEFT format (adapter_config.json + adapter_model.safetensors)
    eval_report.json   evaluation before and after training
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import owned
from finetune.recipe import Recipe, dump_recipe, flatten, recipe_to_dict, resolve_path
from finetune.train import killpoints
from inference.errors import UserError
from inference.files import write_atomic, write_json

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow", "openai-harmony",
             "safetensors")


@dataclass
class RunResult:
    """What :func:`run` returns: where everything went, and the numbers to look at.

    ``history`` is the logged metrics as a DataFrame (one row per logged step); ``eval_report`` the before/after
    evaluation; ``mlflow_run`` the MLflow run as stored (fetched when asked for); ``plot()`` draws the loss curves.
    """

    run_dir: Path
    adapter_dir: Path
    eval_before: dict | None
    eval_after: dict | None
    mlflow_run_id: str | None
    metrics: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    model: object = field(default=None, repr=False)  # the trained PEFT model (only with keep_model=True)
    tracking_uri: str | None = None
    trained_tokens: int = 0
    wall_time_s: float | None = None

    @property
    def run_id(self) -> str | None:
        return self.mlflow_run_id

    @property
    def eval_report(self) -> dict:
        return {"before": self.eval_before, "after": self.eval_after}

    @property
    def history(self):
        """The logged metrics (``metrics.jsonl``) as a pandas DataFrame, one row per logged step (a step's train,
        eval and end-of-training logs merged)."""
        import pandas as pd
        frame = pd.DataFrame(self.metrics)
        return frame.groupby("step").last() if "step" in frame else frame

    @property
    def mlflow_run(self):
        """The ``mlflow.entities.Run`` as the store has it (None when tracking was off)."""
        if not self.mlflow_run_id:
            return None
        from finetune.track.tracking import get_run
        return get_run(self.tracking_uri, self.mlflow_run_id)

    def plot(self, path=None):
        """Training (and eval) loss over steps as a matplotlib figure; also saved as PNG when ``path`` is given."""
        from finetune.track.comparison import plot_curves
        return plot_curves({self.run_dir.name: self.metrics}, path)

    def __repr__(self) -> str:
        def loss(report):
            return "-" if not report or report.get("loss") is None else f"{report['loss']:.4f}"
        em = (self.eval_after or {}).get("exact_match")
        return (f"RunResult(run_dir={str(self.run_dir)!r}, run_id={self.mlflow_run_id!r}, "
                f"steps={self.metrics[-1]['step'] if self.metrics else 0}, eval loss {loss(self.eval_before)} -> "
                f"{loss(self.eval_after)}" + (f", exact match {100 * em:.1f}%" if em is not None else "") + ")")


# (logger, start of a message) that a normal offline run cannot act on: see set_quiet_environment
_NOTICES = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
            ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-"
                                          "bitsandbytes'"))


class _HubKernelNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def set_quiet_environment() -> None:
    """Offline and quiet by default; each can be overridden by setting the variable first."""
    import warnings
    # Library deprecation notices (transformers 5 renames) are not actionable for someone running a recipe.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate)\.")
    # PEFT looks for the base model's config to decide whether to save embeddings; we never train them.
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    # bitsandbytes (imported by PEFT) tries to fetch a CPU kernel from the Hub at import and warns when it cannot
    # (and the kernels library notes it is offline): offline, and without trust_remote_code, it never can, and it
    # falls back to its own kernel. Nothing to act on, so these two messages, and only they, are dropped.
    for name, prefix in _NOTICES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _HubKernelNotice) for f in log.filters):
            log.addFilter(_HubKernelNotice(prefix))
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
                       "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def git_commit() -> str:
    """The commit of the code that ran (``unknown`` outside a git checkout or before the first commit)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else "unknown"


def _comparable(recipe: Recipe) -> dict:
    d = recipe_to_dict(recipe)
    d["output"].pop("overwrite", None)
    return d


NUMBER = "{n}"


def numbered_dir(template: str) -> str:
    """``runs/try-{n}`` -> ``runs/try-1``, or the next number whose directory is absent or empty (so re-running a
    notebook cell starts a new run instead of refusing, or replacing the last one)."""
    n = 1
    while True:
        candidate = template.replace(NUMBER, str(n))
        path = resolve_path(None, candidate)
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return candidate
        n += 1


def check_run_dir(recipe: Recipe, resume: bool) -> tuple[Path, dict]:
    """Decide what to do with the run directory, without touching it: refuse to clobber a different run.

    An ``output.dir`` with ``{n}`` is first made concrete (the recipe is updated, so recipe.yaml says where it went).
    """
    if NUMBER in recipe.output.dir:
        if resume:
            raise UserError(f"--resume: output.dir {recipe.output.dir!r} has {NUMBER}; name the run directory to "
                            "resume (e.g. output.dir=runs/try-2)")
        recipe.output.dir = numbered_dir(recipe.output.dir)
    run_dir = resolve_path(None, recipe.output.dir)
    info_path = run_dir / "run.json"
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"output.dir: {parent} exists and is not a directory")
            break
    if resume:
        if not info_path.is_file():
            mark = owned.marker(run_dir) if run_dir.is_dir() else None
            if mark is not None and mark.get("kind") == "run":   # created, then stopped before run.json
                raise UserError(f"--resume: the run in {run_dir} stopped before it had started training (no "
                                "run.json); start it again with output.overwrite=true")
            raise UserError(f"--resume: {run_dir} holds no run to resume")
        try:
            previous = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"--resume: {info_path} is unreadable ({exc}); cannot resume this run") from None
        from finetune.recipe import load_recipe
        saved = load_recipe(run_dir / "recipe.yaml")
        if _comparable(saved) != _comparable(recipe):
            raise UserError(f"--resume: {run_dir} holds a run with a different recipe ({run_dir / 'recipe.yaml'})")
        if previous.get("status") == "completed" and (run_dir / "adapter" / "adapter_model.safetensors").is_file():
            # resuming would retrain from the last checkpoint and replace a correct adapter (and its export records)
            raise UserError(f"--resume: {run_dir} finished (run.json: completed, adapter saved); there is nothing to "
                            "resume. To train further, start a new run in another output.dir")
        return run_dir, previous
    if run_dir.exists() and any(run_dir.iterdir()):
        if not recipe.output.overwrite:
            what = "already holds a run" if info_path.is_file() else "is not empty"
            raise UserError(f"output.dir: {run_dir} {what}; pass --resume to continue a run, "
                            "output.overwrite=true to replace it, or choose another output.dir")
        mark = owned.marker(run_dir)
        if mark is None or mark.get("kind") != "run":
            raise UserError(f"output.dir: {run_dir} is not empty and is not a run directory this tool created (no "
                            f"{owned.MARKER}); refusing to delete anything in it")
    return run_dir, {}


def create_run_dir(run_dir: Path, resume: bool, echo=print) -> None:
    """Create the run directory, or (``output.overwrite``, allowed by :func:`check_run_dir`) remove what an earlier
    run wrote there and nothing else; claimed as ours either way (:mod:`finetune.owned`)."""
    try:
        if resume:   # check_run_dir found this run's run.json and recipe: a run from before markers is ours too
            if owned.marker(run_dir) is None:
                owned.claim(run_dir, "run", owned.RUN_ENTRIES)
            return
        if run_dir.exists() and any(run_dir.iterdir()):
            left = owned.clear(run_dir, "run")
            if left:
                echo(f"output.overwrite: removed the earlier run in {run_dir}; kept what it did not write: "
                     f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
        owned.claim(run_dir, "run", owned.RUN_ENTRIES)
    except OSError as exc:
        raise UserError(f"output.dir: cannot create {run_dir} ({exc.strerror})") from None


def _logged_step(line: str) -> float:
    """The step a metrics line logs; a line a kill cut short while it was appended counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, forget logged steps after the checkpoint: they are about to be replayed."""
    if path.is_file():
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if _logged_step(line) <= last_step]
        write_atomic(path, "".join(r + "\n" for r in rows))


def format_eval(before: dict | None, after: dict | None) -> str:
    """Before/after evaluation as a small table."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    ref = after or before or {}
    rows = [("loss", "loss", num), ("perplexity", "perplexity", lambda v: "-" if v is None else f"{v:.2f}"),
            ("exact match (final channel)", "exact_match", pct), ("reached a final channel", "final_rate", pct),
            ("stopped (<|return|>/<|call|>)", "stop_rate", pct)]
    lines = [f"evaluation on held-out data: loss over {ref.get('examples', 0)} sequences, "
             f"{ref.get('generated', 0)} answers generated:", f"  {'':<30}{'before':>12}{'after':>12}"]
    for label, key, fmt in rows:
        lines.append(f"  {label:<30}{fmt((before or {}).get(key)):>12}{fmt((after or {}).get(key)):>12}")
    return "\n".join(lines)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (progress as a widget bar with the loss on it, no line per logged step)."""
    import sys
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell"


def run(recipe: Recipe, resume: bool = False, echo=print, log_lines: bool | None = None,
        parent_run_id: str | None = None, keep_model: bool = False) -> RunResult:
    """Train LoRA adapters as ``recipe`` says; returns where everything went.

    Every input is checked (run directory, data, model, adapter targets) before anything is written. ``recipe`` is
    not modified. ``log_lines``: print a line per logged step (default: yes, except in a notebook).
    ``parent_run_id``: the MLflow run to nest under (a sweep's); by default a notebook's active run, if any.
    ``keep_model=True`` returns the trained PEFT model in ``RunResult.model``; by default it is freed, so that a
    notebook that loads the adapter for inference, or re-runs the cell, does not hold a second copy of the model.
    """
    set_quiet_environment()
    started = time.time()
    recipe = recipe.model_copy(deep=True)  # check_run_dir fills in output.dir's {n}; the caller's stays reusable
    if log_lines is None:
        log_lines = not in_notebook()
    run_dir, previous = check_run_dir(recipe, resume)
    plan = _estimate(recipe, echo)
    prepared = _prepare_data(recipe, echo)
    model, tokenizer, setup = _load_model(recipe, echo, plan)
    create_run_dir(run_dir, resume, echo)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    tracker, info = _start_tracking(recipe, run_dir, previous, prepared.stats, setup, parent_run_id)
    try:
        result = _train_and_evaluate(recipe, model, tokenizer, prepared, run_dir, setup, tracker, resume, echo,
                                     log_lines)
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt)    # Ctrl-C or SIGTERM (errors.Terminated)
        write_json(run_dir / "run.json", info | {"status": "interrupted" if stopped else "failed",
                                                 "error": f"{type(exc).__name__}: {exc}".rstrip(": ")})
        if stopped:
            tracker.set_tags({"finetune.status": "interrupted"})
        tracker.close("KILLED" if stopped else "FAILED")
        raise
    for key in ("training_peak_gpu_bytes", "first_step_s"):
        if key in setup:
            info[key] = setup[key]
    _record(result, info, tracker, started, echo, recipe.tracking.log)
    if not keep_model:
        result.model = model = None
        _free_memory(setup["device"])
    return result


@contextlib.contextmanager
def parked_on_host(model, device, echo=print):
    """Move the training model to host memory while the block runs, when the GPU could not also hold the runtime's
    own copy of the base (evaluation loads one); back on ``device`` afterwards. A no-op when both fit, or on CPU.

    On a 16 GB GPU, gpt-oss-20b QLoRA holds about 12 GiB of weights; the runtime's packed copy is about as large.
    """
    import torch

    from finetune.model.lora import held_bytes
    on_gpu = sum(held_bytes(p) for p in model.parameters() if p.is_cuda) if device.type == "cuda" else 0
    free = torch.cuda.mem_get_info(device)[0] if on_gpu else 0
    if not on_gpu or free > 1.25 * on_gpu:    # the runtime's copy is no larger than ours; a margin for its buffers
        yield
        return
    echo(f"the training model waits in host memory during evaluation ({on_gpu / 2**30:.1f} GiB; "
         f"{free / 2**30:.1f} GiB free on the GPU)")
    model.to("cpu")
    _free_memory(device)
    try:
        yield
    finally:
        model.to(device)


def _free_memory(device) -> None:
    """Give the GPU back what the last phase held (a full garbage collection for anything in a reference cycle,
    then the caching allocator's free blocks). Nothing on CPU: refcounting already returned the evaluation engine
    (it has no cycles), whatever a cycle holds of the training model goes at Python's next automatic collection, and
    a forced one costs about 0.5 s with transformers, PEFT and MLflow loaded, three times a run."""
    if device.type != "cuda":
        return
    import gc

    import torch
    gc.collect()
    torch.cuda.empty_cache()


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while the block runs (as it was after). For parsing gpt-oss's 27 MB
    tokenizer.json: the millions of objects it makes set off two full collections of everything loaded so far (0.5 s
    each, measured with transformers, PEFT and MLflow loaded), and none of it is garbage."""
    import gc
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _prepare_data(recipe: Recipe, echo):
    import torch

    from finetune.data.prepare import prepare
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    prepared = prepare(recipe)
    s = prepared.stats
    echo(f"data: {s['train_examples']} training sequences from {s['train_rows']} conversations "
         f"(trained turns: {s['trained_turns']}; {s['trained_tokens']:,} trained tokens of "
         f"{s['train_tokens']:,}; by channel {s['trained_tokens_by_channel']}), {s['eval_examples']} eval; "
         f"dropped as too long: {s['dropped_overlong']}, truncated: {s['truncated']}")
    if recipe.data.packing:
        echo(f"packing: {s['train_examples']} sequences into {s['packed_rows']} rows of up to "
             f"{recipe.data.max_length:,} tokens ({s['packed_fill']:.1%} of the rows' tokens are real, not padding)")
    return prepared


def _estimate(recipe: Recipe, echo):
    """The memory and disk estimate, printed before anything heavy happens (``python -m finetune estimate``)."""
    from finetune.estimate import estimate, format_estimate
    plan = estimate(recipe)
    echo(format_estimate(plan))
    check_fits(plan)
    return plan


def check_fits(plan) -> None:
    """Refuse an estimate over twice the device's memory (``run`` and ``validate``)."""
    if plan.device == "cpu":
        capacity, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    else:
        capacity, where = plan.capacity_bytes, plan.capacity_name or "the GPU"
    # The estimate has been within -12% / +1% of measured peaks (README, "Estimate before you run"): twice the
    # memory there is can never fit, and trying would only end in an allocation error after loading the model.
    if capacity and plan.peak_bytes > 2 * capacity:
        raise UserError(f"the run needs about {plan.peak_bytes / 2**30:,.0f} GiB of {plan.device} memory (`python -m "
                        f"finetune estimate` shows why) and {where} has {capacity / 2**30:,.0f} GiB; lower lora.r, "
                        "train.batch_size or data.max_length")


def _load_model(recipe: Recipe, echo, plan):
    """Base model + LoRA on the chosen device, with the reasons for the automatic choices printed."""
    from transformers import AutoTokenizer, set_seed

    from finetune.model import fastpath
    from finetune.model.lora import format_coverage, load_for_training, pick_device, pick_dtype, pick_quantization
    from inference.model.tiny import resolve_model

    device, why_device = pick_device(recipe)
    dtype, why_dtype = pick_dtype(recipe, device)
    quantization, why_quantization = pick_quantization(recipe, device)
    embedding = plan.embedding if device.type == "cuda" else "cpu"
    echo(f"device: {device} ({why_device}); dtype: {str(dtype).removeprefix('torch.')} ({why_dtype}); "
         f"quantization: {quantization} ({why_quantization})"
         + (f"; embedding on the CPU (model.embedding={recipe.model.embedding})"
            if device.type == "cuda" and embedding == "cpu" else "")
         + (f"; output layer in host memory, read by the loss in slices (model.lm_head={recipe.model.lm_head})"
            if device.type == "cuda" and plan.lm_head == "cpu" else ""))
    model_dir = resolve_model(recipe.model.name_or_path)
    set_seed(recipe.train.seed)  # LoRA's A matrices are drawn here
    model, coverage = load_for_training(recipe, model_dir, device, dtype, quantization, embedding, plan.lm_head)
    echo(format_coverage(coverage))
    fast, why_kernels = fastpath.choose(recipe.train.kernels, device)
    if fast:
        fastpath.enable(model, mlp_tile=plan.mlp_tile_tokens)
    echo(f"training path: {'fast (grouped expert LoRA, flash attention with sinks)' if fast else 'reference'} "
         f"({why_kernels})")
    if plan.offload or plan.mlp_tile_tokens:
        echo("long-sequence levers: " + "; ".join(
            (["each layer's checkpointed input in pinned host memory (train.offload_activations)"] if plan.offload
             else []) + ([f"MoE blocks in tiles of {plan.mlp_tile_tokens:,} tokens (train.mlp_tile_tokens)"]
                         if plan.mlp_tile_tokens else [])))
    with _collector_paused():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer, {"device": device, "dtype": dtype, "model_dir": model_dir, "coverage": coverage,
                              "kernels": "fast" if fast else "reference", "quantization": quantization,
                              "embedding": embedding, "lm_head": plan.lm_head, "offload": plan.offload,
                              "estimate": plan.to_dict()}


def _start_tracking(recipe: Recipe, run_dir: Path, previous: dict, stats: dict, setup: dict,
                    parent_run_id: str | None = None):
    """Open the MLflow run (or continue it on resume), log params, lineage tags and data stats; write run.json."""
    from finetune.track import tracking
    from inference.model.checkpoint import fingerprint
    versions = library_versions()
    # On resume, the store the run started in (it may have been a notebook's, when the recipe names none).
    uri = recipe.tracking.tracking_uri or (previous.get("tracking_uri") if previous.get("mlflow_run_id") else None)
    tracker = tracking.start(recipe.tracking.mlflow, uri, recipe.tracking.experiment,
                             recipe.tracking.run_name or run_dir.name, previous.get("mlflow_run_id"),
                             parent_run_id=parent_run_id)
    info = {"status": "running", "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri, "model_dir": str(setup["model_dir"]),
            "model_fingerprint": fingerprint(setup["model_dir"]),
            "device": str(setup["device"]), "dtype": str(setup["dtype"]), "kernels": setup["kernels"],
            "quantization": setup["quantization"], "embedding": setup["embedding"], "lm_head": setup["lm_head"],
            "estimate": setup["estimate"],
            "versions": versions,
            "git_commit": git_commit(), "data": stats, "coverage": setup["coverage"]}
    write_json(run_dir / "run.json", info)
    logged = recipe.tracking.log
    if "params" in logged:
        tracker.log_params(flatten(recipe_to_dict(recipe)))
    if "tags" in logged:
        tracker.set_tags(lineage_tags(recipe, run_dir, info))
    (run_dir / "coverage.json").write_text(json.dumps(setup["coverage"], indent=2) + "\n", encoding="utf-8")
    if "coverage.json" in logged:
        tracker.log_artifact(run_dir / "coverage.json")
    tracker.log_metrics({f"data.{k}": v for k, v in stats.items() if isinstance(v, (int, float))} |
                        {f"data.trained_tokens.{k}": v for k, v in stats["trained_tokens_by_channel"].items()} |
                        {f"lora.params.{k}": v for k, v in setup["coverage"]["groups"].items()}, step=0)
    return tracker, info


def lineage_tags(recipe: Recipe, run_dir: Path, info: dict) -> dict:
    """What a run was made from, as MLflow tags: code, libraries, data (fingerprints, row counts, trained tokens per
    channel), the Harmony rendering and where LoRA sits (coverage). Exports add ``export.FORMAT.*`` later."""
    stats, cov = info["data"], info["coverage"]
    per_layer = cov["per_layer"]
    layers = {g: sum(1 for v in per_layer.values() if v.get(g)) for g in ("attention", "experts")}
    n_layers = sum(1 for k in per_layer if k != "-1")
    return {
        "git_commit": info["git_commit"], "base_model": recipe.model.name_or_path, "run_dir": str(run_dir),
        "model_fingerprint": info["model_fingerprint"],
        "dataset_fingerprint": stats["train_fingerprint"], "eval_dataset_fingerprint": stats["eval_fingerprint"],
        "data.train_rows": stats["train_rows"], "data.train_examples": stats["train_examples"],
        "data.eval_rows": stats["eval_rows"], "data.eval_examples": stats["eval_examples"],
        "data.trained_tokens": stats["trained_tokens"],
        **{f"data.trained_tokens.{k}": v for k, v in stats["trained_tokens_by_channel"].items()},
        "harmony_hash": stats["harmony_hash"],
        "lora.trainable_params": cov["trainable"],
        **{f"lora.coverage.{g}": f"{n} of {n_layers} layers, {cov['groups'].get(g, 0):,} params"
           for g, n in layers.items()},
        **{f"version.{k}": v for k, v in info["versions"].items()},
    }


def _record(result: RunResult, info: dict, tracker, started: float, echo, logged: list[str]) -> None:
    """Mark the run completed in run.json and MLflow, with its artefacts."""
    run_dir = result.run_dir
    info |= {"status": "completed", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "wall_time_s": round(time.time() - started, 1), "adapter": str(result.adapter_dir),
             "trained_tokens": result.trained_tokens}
    info.pop("error", None)
    killpoints.reached("record")
    write_json(run_dir / "run.json", info)
    last_step = result.metrics[-1]["step"] if result.metrics else 0
    tracker.log_metrics({"wall_time_s": info["wall_time_s"], "trained_tokens": result.trained_tokens}, last_step)
    for name in ("recipe.yaml", "run.json", "eval_report.json", "metrics.jsonl"):
        if name in logged:
            tracker.log_artifact(run_dir / name)
    if "adapter" in logged:
        tracker.log_artifact(result.adapter_dir, "adapter")
    tracker.close()
    result.mlflow_run_id, result.stats, result.tracking_uri = tracker.run_id, info["data"], tracker.uri
    result.wall_time_s = info["wall_time_s"]
    echo(f"adapter: {result.adapter_dir}\nrun directory: {run_dir}"
         + (f"\nMLflow run {tracker.run_id} in {tracker.uri}" if tracker.run_id else ""))


def _train_and_evaluate(recipe, model, tokenizer, prepared, run_dir, setup, tracker, resume, echo,
                        log_lines=True) -> RunResult:
    import torch
    from tqdm.auto import tqdm

    from finetune.model import fastpath
    from finetune.train import checkpoints, stopping
    from finetune.train.trainer import build_trainer, checkpoint_is_final, load_final_checkpoint
    from inference.engine import Engine
    from inference.evaluate import evaluate

    loss_examples = [(t.ids, t.weights, t.targets) for t in prepared.eval]
    ev = recipe.evaluation
    device = setup["device"]

    def run_eval(label: str, adapter_dir: Path | None = None) -> dict:
        # The runtime's own evaluation (as `python -m inference eval`), on the base or on the adapter as saved.
        with parked_on_host(model, device, echo):
            engine = Engine.load(setup["model_dir"], adapters={"run": adapter_dir} if adapter_dir else None,
                                 dtype=setup["dtype"], device=device)
            try:
                with tqdm(total=len(prepared.eval_cases), desc=f"evaluating ({label})", unit="conv",
                          leave=False) as bar:
                    return evaluate(engine, loss_examples, prepared.eval_cases, ev.max_new_tokens,
                                    model="run" if adapter_dir else None, progress=bar)
            finally:
                del engine
                _free_memory(device)

    has_eval = bool(loss_examples or prepared.eval_cases)
    before = None
    if has_eval and ev.before_training:
        report_path = run_dir / "eval_before.json"
        before = json.loads(report_path.read_text()) if resume and report_path.is_file() else run_eval("before")
        killpoints.reached("eval-before")
        write_json(report_path, before)
        tracker.log_metrics({f"eval_before.{k}": v for k, v in before.items() if isinstance(v, (int, float))}, 0)

    trainer = build_trainer(recipe, model, tokenizer, prepared.train, prepared.eval, run_dir, device, tracker,
                            log_lines, offload=setup["offload"])
    stop = stopping.Stop()
    trainer.add_callback(stopping.StopAtStepEnd(stop))
    found = checkpoints.latest(run_dir / "checkpoints", echo) if resume else None
    checkpoint = str(found) if found else None
    if found:
        mark = checkpoints.read_mark(found)
        trainer.trained_tokens = int(mark["trained_tokens"])
        verified = (" (its files are the ones this run wrote: their SHA-256 match; the Trainer's optimizer, "
                    "scheduler and RNG pickles load weights-only)") if "sha256" in mark else ""
        echo(f"resuming from {checkpoint}{verified}")
    elif resume:
        echo("no checkpoint yet: training from the start")
    if resume:
        _trim_metrics(run_dir / "metrics.jsonl", checkpoints.step_of(found) if found else 0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if checkpoint and checkpoint_is_final(checkpoint):
        # the Trainer, resumed at its last step, would train one step more: the run was killed after training
        # (saving the adapter or evaluating), so the checkpoint's adapter is the final one
        echo(f"{checkpoint} is the run's last step: not training again, finishing from it")
        load_final_checkpoint(trainer, checkpoint)
    else:
        with stopping.graceful(stop):
            trainer.train(resume_from_checkpoint=checkpoint)
        stop.raise_if_requested(trainer.state.global_step)
    checkpoints.rotate(run_dir / "checkpoints", recipe.train.save_total_limit)   # a kill may have cut it short
    killpoints.reached("train-end")
    if trainer.progress.first_step_s is not None:   # the wait before the bar moves (issue: a first step to trust)
        setup["first_step_s"] = trainer.progress.first_step_s
    if cuda:   # measured against the estimate printed first (python -m finetune estimate)
        setup["training_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        echo(f"peak GPU memory while training: {setup['training_peak_gpu_bytes'] / 2**30:.2f} GiB "
             f"(estimated {setup['estimate']['peak_bytes'] / 2**30:.2f} GiB)")
    # the fast path is for training batches (right-padded, no KV cache); whoever uses the model next gets the plain one
    fastpath.disable(model)

    adapter_dir = run_dir / "adapter"
    tmp = run_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # Embeddings are never trained here; saying so also spares PEFT from looking up the base model's files.
    model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    killpoints.reached("adapter:written")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(tmp, adapter_dir)

    after = run_eval("after", adapter_dir) if has_eval else None
    if after:
        tracker.log_metrics({f"eval.{k}": v for k, v in after.items() if isinstance(v, (int, float))},
                            trainer.state.global_step)
    killpoints.reached("eval-after")
    write_json(run_dir / "eval_report.json", {"before": before, "after": after})
    if has_eval:
        echo(format_eval(before, after))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return RunResult(run_dir, adapter_dir, before, after, None, metrics, model=model,
                     trained_tokens=trainer.trained_tokens)
