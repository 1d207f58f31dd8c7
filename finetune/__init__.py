"""LoRA fine-tuning of gpt-oss from YAML recipes: ``python -m finetune run recipe.yaml`` or, from Python::

    import finetune
    result = finetune.run("recipes/tiny-cpu.yaml", overrides=["train.max_steps=50"])
    finetune.export(result, "merged-mxfp4")     # or "peft", "merged-bf16", "gguf", "gguf-lora", "ollama"

Heavy libraries load only when a run starts.
"""

from __future__ import annotations

from pathlib import Path


def load_recipe(path, overrides=()):
    """Read and validate a recipe (see :mod:`finetune.recipe`)."""
    from finetune.recipe import load_recipe as _load
    return _load(path, list(overrides))


def run(recipe, overrides=(), resume: bool = False):
    """Run a recipe (a path or a loaded :class:`finetune.recipe.Recipe`); returns a
    :class:`finetune.pipeline.RunResult`."""
    from finetune.pipeline import run as _run
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise TypeError("overrides apply to a recipe path; edit the Recipe object directly instead")
    return _run(recipe, resume=resume)


def export(run, to: str, out=None, force: bool = False, **options):
    """Export a run (its directory or the result of :func:`run`) as ``to``, parity-checked; returns a
    :class:`finetune.exports.ExportResult`. See :func:`finetune.exports.export` for the options."""
    from finetune.exports import export as _export
    return _export(run, to, out=out, force=force, **options)
