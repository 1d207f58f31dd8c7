"""``python -m finetune``: the command line. Imports stay light until a command needs the heavy libraries, so
``--help`` and ``validate`` answer in well under a second."""

from __future__ import annotations

import argparse
import sys

from inference.errors import UserError, run_command

EPILOG = "Overrides are dotted recipe keys: train.lr=1e-4 lora.r=16 data.eval=null"


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="recipe overrides, e.g. train.lr=1e-4 (anywhere after the recipe, options included)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m finetune", description="LoRA fine-tuning of gpt-oss from a recipe.",
                                 epilog=EPILOG)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train as the recipe says", epilog=EPILOG)
    _recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its latest checkpoint")
    p = sub.add_parser("validate", help="check a recipe (and that its paths exist) without loading a model",
                       epilog=EPILOG)
    _recipe_args(p)
    p.add_argument("--print", dest="print_recipe", action="store_true", help="print the resolved recipe")
    p = sub.add_parser("estimate", help="predict a run's peak GPU memory and disk from the model's config.json "
                       "(no model load) and check the fit; exit status 1 when it does not fit", epilog=EPILOG)
    _recipe_args(p)
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="GPU memory to check the fit against, in GiB "
                   "(default: the detected GPU's)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p = sub.add_parser("preview", help="show rendered training examples with trained tokens marked", epilog=EPILOG)
    _recipe_args(p)
    p.add_argument("-n", type=int, default=3, help="number of examples (default 3)")
    from finetune.ship import FORMATS, MIN_EFFECT_KEPT  # light: heavy imports happen inside export()
    p = sub.add_parser("export", help="ship a run's adapter (PEFT, merged bf16/MXFP4, GGUF, Ollama), parity-checked",
                       description="Export a finished run. Each artifact is reloaded by its real consumer and "
                       "compared with the trained model on fixed probes; a failed check writes nothing.")
    p.add_argument("run_dir", help="the run directory (output.dir of the recipe)")
    p.add_argument("--to", required=True, metavar="FORMAT[,FORMAT...]",
                   help=f"one or more (comma-separated) of: {', '.join(FORMATS)}")
    p.add_argument("--out", help="where to write it (default RUN_DIR/exports/FORMAT; for several formats, the "
                   "directory that gets one sub-directory per format)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--model", help="base model (default: the one the run trained on)")
    p.add_argument("--base-name", help="base_model_name_or_path written into a peft export (default: the recipe's "
                   "model.name_or_path)")
    p.add_argument("--min-effect-kept", type=float, default=MIN_EFFECT_KEPT,
                   help=f"MXFP4 merges must keep this share of the adapter's effect (default {MIN_EFFECT_KEPT})")
    p.add_argument("--device", choices=("cuda", "cpu"), help="where merges and checks run (default: the GPU when "
                   "there is one)")
    p.add_argument("--max-memory", type=float, metavar="GIB", help="the most memory (GPU, or host with --device "
                   "cpu) a check may load a model whole into (default: what is free); bigger models run layer by "
                   "layer")
    p.add_argument("--check-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="what the parity checks compute in (default float32; bfloat16 widens the pass criteria by "
                   "bf16's own error, measured in the same run)")
    p = sub.add_parser("sweep", help="train every combination of comma-separated override values, as child runs of "
                       "one MLflow parent run", epilog="Example: python -m finetune sweep recipes/tiny-cpu.yaml "
                       "lora.r=8,16 train.lr=1e-3,3e-3 train.max_steps=50. A value with commas outside brackets is "
                       "a sweep axis; [a,b] is one list value.")
    _recipe_args(p)
    p.add_argument("--sort", default="eval_loss", help="column to rank the runs by at the end (default eval_loss)")
    p = sub.add_parser("compare", help="table of runs from the MLflow store, sorted by a metric, and their loss "
                       "curves as PNG", description="Compare training runs from the MLflow store. Each TARGET is a "
                       "run id, a sweep's parent run id (its runs) or an experiment name; none: every training run.")
    p.add_argument("targets", nargs="*", metavar="TARGET", help="run ids, sweep parent run ids or experiment names")
    p.add_argument("--sort", default="eval_loss", help="column to sort by (default eval_loss; e.g. exact_match, "
                   "train_loss, wall_time_s, lora.r)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="descending", action="store_false", default=None,
                       help="smallest first (the default for losses and times)")
    order.add_argument("--descending", dest="descending", action="store_true",
                       help="largest first (the default for exact_match and trained_tokens)")
    p.add_argument("--plot", default="loss-curves.png", help="where to save the loss curves (default loss-curves.png)")
    p.add_argument("--csv", help="also write the table as CSV here")
    p.add_argument("--uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--max-runs", type=int, default=100, help="newest N runs at most (default 100)")
    p = sub.add_parser("ui", help="open the MLflow UI on the project's store (127.0.0.1 only by default)")
    p.add_argument("--uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    return ap


def check_paths(recipe) -> None:
    """Fail on dataset or model paths that do not exist (no model load)."""
    from finetune.recipe import looks_like_path, resolve_path
    problems = []
    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        if value and not resolve_path(None, value).exists():
            problems.append(f"data.{key}: dataset not found: {value}")
    name = recipe.model.name_or_path
    if looks_like_path(name) and not resolve_path(None, name).is_dir():
        problems.append(f"model.name_or_path: model directory not found: {name}")
    if problems:
        raise UserError("; ".join(problems))


MAX_LISTED = 20   # validate lists this many problems, then how many more there are


def validate(recipe) -> str:
    """What ``run`` would refuse before training, all at once: every bad line of the datasets (up to
    :data:`MAX_LISTED`), then the data preparation (Harmony rendering, lengths, eval split) and the memory estimate.
    Returns a note on what could not be checked here (the model is elsewhere), or ""."""
    import os

    from finetune.data.formats import find_problems
    from finetune.recipe import resolve_path
    problems = []
    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        if value:
            problems += [f"data.{key}: {p}" for p in find_problems(resolve_path(None, value), recipe.data.format)]
    note = ""
    if not problems:
        from finetune.data.prepare import prepare
        from finetune.estimate import CARRIED, ModelNotHere, estimate
        from finetune.train.pipeline import check_fits
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # validating never downloads a model
        def memory() -> None:
            nonlocal note
            plan = estimate(recipe)
            check_fits(plan)
            if plan.config_source and plan.config_source.endswith(CARRIED):   # the model is elsewhere: say so
                note = (f" (model {recipe.model.name_or_path} is not on this machine: its memory was estimated from "
                        "the published config.json)")

        for check in (lambda: prepare(recipe), memory):
            try:
                check()
            except ModelNotHere:   # a recipe written here for a machine that has the model: say what was not checked
                note = (f" (model {recipe.model.name_or_path} is not on this machine: its memory estimate was not "
                        "checked)")
            except UserError as exc:
                problems.append(str(exc))
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems[:MAX_LISTED]) + more)
    return note


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, overrides accepted anywhere after the recipe (``run R.yaml --resume train.lr=1e-4``,
    ``preview R.yaml -n 3 data.max_length=512``): argparse stops collecting positionals at the first option, so the
    ``key=value`` words it leaves over are added to the overrides; anything else left over is an error."""
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    overrides = [e for e in extra if takes_overrides and "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_command(lambda: _run(args))


def _run(args) -> int | None:
    if args.command == "compare":
        from finetune.track.comparison import compare
        result = compare(args.targets, uri=args.uri, sort=args.sort, descending=args.descending, plot=args.plot,
                         max_runs=args.max_runs)
        print(result)
        print(f"loss curves: {result.png}")
        if args.csv:
            result.table.to_csv(args.csv, index=False)
            print(f"table: {args.csv}")
        return
    if args.command == "ui":
        from finetune.track.ui import serve
        serve(args.uri, args.host, args.port)
        return
    if args.command == "export":
        from finetune.ship import export
        export(args.run_dir, args.to, out=args.out, force=args.force, model=args.model, base_name=args.base_name,
               min_effect_kept=args.min_effect_kept, device=args.device, max_memory=args.max_memory,
               check_dtype=args.check_dtype)
        return
    from finetune.recipe import dump_recipe, load_recipe
    if args.command == "sweep":
        from finetune.track.sweeps import parse_grid, sweep
        fixed, axes = parse_grid(args.overrides)
        recipe = load_recipe(args.recipe, fixed)
        check_paths(recipe)
        result = sweep(recipe, axes, sort=args.sort)
        if result.failed:
            raise UserError(f"{len(result.failed)} of {len(result.runs)} sweep runs failed (see above and "
                            f"{result.sweep_dir / 'sweep.json'})")
        return
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "estimate":
        return _estimate(recipe, args.gpu_memory, args.json)
    check_paths(recipe)
    if args.command == "validate":
        note = validate(recipe)
        print(dump_recipe(recipe) if args.print_recipe else f"{args.recipe}: OK{note}")
    elif args.command == "preview":
        from finetune.data.prepare import preview
        print(preview(recipe, args.n, color=sys.stdout.isatty()))
    elif args.command == "run":
        import shlex

        from finetune.train.pipeline import run
        try:
            run(recipe, resume=args.resume)
        except KeyboardInterrupt as exc:   # Ctrl-C or SIGTERM: run.json and MLflow already say so; say how to go on
            again = shlex.join(["python", "-m", "finetune", "run", args.recipe, *args.overrides, "--resume"])
            print(f"the run stopped{f' ({exc})' if str(exc) else ''}; to continue it from its last checkpoint: "
                  f"{again}", file=sys.stderr)
            raise


def _estimate(recipe, gpu_memory: float | None, as_json: bool) -> int:
    """Print the memory estimate of ``recipe``; the exit status says whether it fits: 0 it does (or no capacity is
    known), 1 it does not (bad input exits 2, as every command)."""
    import json
    import os

    from finetune.estimate import GIB, estimate, format_estimate
    if gpu_memory is not None and not 0 < gpu_memory < float("inf"):
        raise UserError(f"--gpu-memory must be a positive number of GiB (got {gpu_memory:g})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # planning never downloads a model
    if gpu_memory is None:
        est = estimate(recipe)
    else:
        est = estimate(recipe, capacity_bytes=round(gpu_memory * GIB), capacity_name=f"--gpu-memory {gpu_memory:g} GiB")
    print(json.dumps(est.to_dict(), indent=2) if as_json else format_estimate(est))
    return 1 if est.fits() is False else 0
