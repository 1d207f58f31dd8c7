"""The fine-tuning recipe: one typed schema, one home for every default, one loader.

This module owns the YAML recipe format (``model``, ``data``, ``harmony``, ``lora``, ``train``,
``evaluation``, ``output``, ``tracking``): its pydantic models (unknown keys are rejected
everywhere, strings are never silently coerced into numbers or booleans), the loader with
``key=value`` overrides, and turning validation failures into human messages that list every
problem at once as ``<yaml.path> (line N): <what is wrong>``.

Paths: relative paths in a recipe (``data.train``, ``data.eval``, ``output.dir``, and a local
``model.name_or_path``) are kept as written and resolved against the CURRENT WORKING DIRECTORY,
not the recipe's folder: recipes in ``recipes/`` are run from the repo root
(``python -m finetune run recipes/tiny-cpu.yaml``) and say ``data/tiny/train.jsonl``.
Use :func:`resolve_path` to turn them into absolute paths.

YAML is only ever read with ``yaml.safe_load`` / ``yaml.compose`` (both safe). Imports stay light:
stdlib, yaml and pydantic only.
"""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.errors import UserError
from inference.harmony import CHANNELS, REASONING_EFFORTS


class RecipeError(UserError):
    """A recipe (or an override of it) is missing, malformed or invalid; the message says where."""


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=True)


class ModelConfig(_Section):
    """Which base model to fine-tune and where to put it."""

    name_or_path: str = Field(
        "tiny-gpt-oss", description="an embedded model name, a local HF-layout directory, or a hub id")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    quantization: Literal["auto", "none", "mxfp4", "nf4"] = Field(
        "auto", description="auto: mxfp4 on CUDA, none on CPU; none: experts decoded to dtype at load; mxfp4: "
                            "experts stay packed as shipped (frozen) and are decoded inside the expert matmuls; "
                            "nf4: mxfp4 plus the attention projections in bitsandbytes NF4")
    embedding: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="where the input embedding lives: auto (on the GPU unless the memory estimate does not "
                            "fit, then on the CPU), gpu, cpu")
    lm_head: Literal["auto", "gpu", "cpu"] = Field(
        "auto", description="where the output layer lives: auto (on the GPU unless the memory estimate does not fit, "
                            "then in host memory, read by the loss in slices), gpu, cpu")

    _check_path = field_validator("name_or_path")(_no_nul)


class DataConfig(_Section):
    """Training and held-out conversations, and how they become token sequences."""

    train: str = Field(description="path to a JSONL file or a local HF dataset directory")
    eval: str | None = Field(None, description="held-out set; if null and eval_fraction > 0, split from train")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of train held out when eval is not given")
    format: Literal["auto", "openai", "sharegpt"] = Field("auto", description="conversation layout of each record")
    max_length: int = Field(2048, ge=16, description="tokens per example")
    overlong: Literal["drop", "truncate"] = Field("drop", description="what to do with examples longer than max_length")
    packing: bool = Field(False, description="pack several training sequences into each row of max_length tokens "
                                             "(train.batch_size then counts rows); attention and the loss never "
                                             "cross from one sequence to the next")
    max_train_examples: int | None = Field(None, ge=1, description="cap on training examples (null: all)")
    max_eval_examples: int | None = Field(None, ge=1, description="cap on evaluation examples (null: all)")

    _check_paths = field_validator("train", "eval")(_no_nul)


class LossWeights(_Section):
    """Per-kind weight of assistant tokens in the loss (0 masks that kind out)."""

    final: float = Field(1.0, ge=0, description="assistant messages on the final channel")
    analysis: float = Field(1.0, ge=0, description="chain-of-thought on the analysis channel")
    commentary: float = Field(
        0.0, ge=0, description="assistant preambles on the commentary channel without a recipient")
    tool_call: float = Field(1.0, ge=0, description="commentary messages addressed to a tool (recipient set)")

    @model_validator(mode="after")
    def _some_positive(self) -> LossWeights:
        if not any(w > 0 for w in (self.final, self.analysis, self.commentary, self.tool_call)):
            raise ValueError("at least one loss weight must be > 0 (all are 0, nothing would be trained)")
        return self


class HarmonyConfig(_Section):
    """How conversations are rendered in the harmony chat format, and which assistant tokens are trained."""

    reasoning_effort: Literal[REASONING_EFFORTS] = Field(
        "medium", description="reasoning effort in the system message (a record's own reasoning_effort wins)")
    conversation_start_date: str | None = Field(
        "2025-06-28", description="YYYY-MM-DD, pinned so data never changes with the calendar; null: no date line")
    knowledge_cutoff: str | None = Field("2024-06", description="YYYY-MM in the system message; null: no line")
    model_identity: str | None = Field(None, description="system message identity line (null: the harmony default)")
    required_channels: list[Literal[CHANNELS]] | None = Field(
        list(CHANNELS),
        description="the system message's '# Valid channels' line (null: no such line)")
    builtin_tools: list[Literal["browser", "python"]] = Field(
        [], description="gpt-oss's built-in tools declared in every system message (a record adds its own with "
                        "tools: [{type: python}])")
    developer_instructions: str | None = Field(
        None, description="instructions for the developer message, before each record's system/developer messages")
    tool_namespaces: dict[str, str] = Field(
        {}, description="descriptions of tool namespaces: a tool named crm.lookup is lookup in namespace crm")
    trained_turns: Literal["all", "last"] = Field(
        "all", description="all: every assistant turn, each as generated in its own context; last: only the last "
                           "assistant turn of each conversation, earlier turns are context")
    loss_weights: LossWeights = Field(default_factory=LossWeights, description="which assistant tokens are trained on")

    @field_validator("conversation_start_date", "knowledge_cutoff", mode="before")
    @classmethod
    def _dates(cls, value: Any, info) -> Any:
        if isinstance(value, date):  # YAML reads an unquoted 2025-06-28 as a date
            value = value.isoformat()
        if not isinstance(value, str):
            return value  # None is allowed; the strict str check reports anything else
        day = info.field_name == "conversation_start_date"
        pattern = r"\d{4}-\d{2}-\d{2}" if day else r"\d{4}-(0[1-9]|1[0-2])"
        try:
            if not re.fullmatch(pattern, value):
                raise ValueError
            if day:
                date.fromisoformat(value)
        except ValueError:
            like = "2025-06-28" if day else "2024-06"
            raise ValueError(f"must be a date like {like} or null (got {value!r})") from None
        return value

    @field_validator("required_channels", "builtin_tools")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"lists an entry twice ({value})")
        return value

    @field_validator("required_channels")
    @classmethod
    def _channels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must list at least one channel, or be null for no '# Valid channels' line")
        return value

    @field_validator("tool_namespaces")
    @classmethod
    def _namespaces(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name) or name in ("browser", "python"):
                raise ValueError(f"{name!r} is not a namespace name (letters, digits, _ and -; browser and python "
                                 "are the built-in tools)")
        return value

    @field_validator("developer_instructions")
    @classmethod
    def _instructions(cls, value: str | None) -> str | None:
        return _no_nul(value)


class LoraConfig(_Section):
    """The LoRA adapter: rank, scaling and which weights it attaches to."""

    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="attention linear layers to adapt")
    target_experts: list[Literal["gate_up_proj", "down_proj"]] = Field(
        ["gate_up_proj", "down_proj"], description="MoE expert weights to adapt (may be empty)")

    @model_validator(mode="after")
    def _dropout_with_experts(self) -> LoraConfig:
        # PEFT adapts the 3-D expert tensors as parameters, where input dropout cannot be applied.
        if self.dropout and self.target_experts:
            raise ValueError("dropout must be 0 when target_experts is set (PEFT cannot apply dropout to expert "
                             "parameters)")
        return self


class TrainConfig(_Section):
    """Optimisation: schedule, batch, optimizer, checkpoints."""

    epochs: float = Field(1.0, gt=0, description="passes over the training set (ignored when max_steps is set)")
    max_steps: int = Field(-1, description="-1 means use epochs; otherwise the number of optimizer steps")
    batch_size: int = Field(4, ge=1, description="examples per device step")
    grad_accum: int = Field(1, ge=1, description="device steps per optimizer step")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0: off)")
    optimizer: Literal["adamw_torch", "adamw_8bit", "sgd"] = Field("adamw_torch", description="optimizer")
    seed: int = Field(0, description="seed for data order, splits and adapter init")
    logging_steps: int = Field(10, ge=1, description="log metrics every N optimizer steps")
    eval_steps: int | None = Field(None, ge=1, description="null: evaluate at the end of each epoch only")
    save_steps: int | None = Field(None, ge=1, description="null: checkpoint at the end of each epoch")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept on disk")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")
    offload_activations: bool | Literal["auto"] = Field(
        "auto", description="with gradient_checkpointing on CUDA: hold each layer's checkpointed input in pinned "
                            "host memory instead of on the GPU (layers x tokens x hidden x 2 bytes; one copy each "
                            "way per layer and step); auto: on when the memory estimate does not fit without it")
    mlp_tile_tokens: int | Literal["auto"] = Field(
        "auto", description="run each layer's MoE block (router + experts) over the step's tokens in tiles of this "
                            "many, forward and backward, so its intermediates follow the tile, not the sequence "
                            "(exact: tokens are routed independently; fast path only); 0: never; auto: "
                            "8192 when the memory estimate does not fit otherwise")
    kernels: Literal["auto", "fast", "reference"] = Field(
        "auto", description="auto: our fast gpt-oss LoRA path on CUDA, the reference elsewhere; fast; reference "
                            "(transformers eager attention + PEFT's expert LoRA)")
    num_threads: int | None = Field(None, ge=1, description="CPU threads (null: the library default)")

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"must be -1 (use epochs) or >= 1 (got {value})")
        return value

    @field_validator("mlp_tile_tokens", mode="before")
    @classmethod
    def _tile(cls, value):
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"must be auto, 0 (never tile) or a number of tokens per tile (got {value!r})")
        return value

    @field_validator("offload_activations", mode="before")
    @classmethod
    def _offload(cls, value):
        if value != "auto" and not isinstance(value, bool):
            raise ValueError(f"must be auto, true or false (got {value!r})")
        return value


class EvaluationConfig(_Section):
    """Evaluation of the base model and the adapter."""

    before_training: bool = Field(True, description="evaluate the untouched base first, to show before vs after")
    max_new_tokens: int = Field(128, ge=1, description="generation budget per example for exact match")
    max_examples: int | None = Field(64, ge=1, description="cap on generations for exact match (null: all)")


class OutputConfig(_Section):
    """Where the run directory goes."""

    dir: str = Field("runs/default", description="run directory (relative to the current working directory)")
    overwrite: bool = Field(False, description="replace an earlier run in output.dir: removes only what a run of "
                            "this tool wrote there (its marker lists it); other files stay")

    @field_validator("dir")
    @classmethod
    def _safe_dir(cls, value: str) -> str:
        _no_nul(value)
        target = resolve_path(None, value)
        for bad, what in ((Path("/"), "the filesystem root"), (Path.home(), "the home directory"),
                          (Path.cwd(), "the current working directory")):
            if target == bad.resolve():
                raise ValueError(f"refuses to write runs into {what} ({value!r}); use a subdirectory such as runs/NAME")
        return value


# What tracking.log may name (see TrackingConfig.log): each is logged to MLflow only when listed.
LOGGED_ITEMS = ("adapter", "params", "tags", "recipe.yaml", "run.json", "coverage.json", "metrics.jsonl",
                "eval_report.json", "exports")
LOGGED = Literal[LOGGED_ITEMS]


class TrackingConfig(_Section):
    """Experiment tracking with MLflow."""

    mlflow: bool = Field(True, description="log params, metrics and artifacts to MLflow")
    tracking_uri: str | None = Field(None, description="null: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = Field("gpt-oss-finetune", description="MLflow experiment name")
    run_name: str | None = Field(None, description="MLflow run name (null: derived from output.dir)")
    log: list[LOGGED] = Field(
        list(LOGGED_ITEMS), description="what goes to MLflow beyond the metrics: adapter, params (every recipe "
        "value, data paths included), tags (lineage: run directory, base model, fingerprints, versions), recipe.yaml, "
        "run.json (paths, estimate, versions), coverage.json, metrics.jsonl, eval_report.json (held-out reference "
        "answers and the model's answers), exports (each export's parity.json: paths and numbers); [] logs metrics "
        "only")

    @field_validator("tracking_uri")
    @classmethod
    def _no_password(cls, value):
        from finetune.track.tracking import credentials_problem
        problem = credentials_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("log")
    @classmethod
    def _no_repeats(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"names an item twice: {value}")
        return value


class Recipe(_Section):
    """A whole fine-tuning run: every section but data is optional."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="base model")
    data: DataConfig = Field(description="datasets (data.train is required)")
    harmony: HarmonyConfig = Field(default_factory=HarmonyConfig, description="chat rendering and loss masking")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapter shape")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="before/after evaluation")
    output: OutputConfig = Field(default_factory=OutputConfig, description="run directory")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking")


# ---------------------------------------------------------------- paths and serialisation


def resolve_path(recipe_path_or_base_dir: str | Path | None, value: str | Path) -> Path:
    """Absolute path for a path written in a recipe. ``~`` is expanded.

    Relative paths are resolved against the current working directory. The first argument may be
    an existing directory to resolve against instead; a recipe file path or None means the cwd.
    """
    path = Path(value).expanduser()
    base = Path(recipe_path_or_base_dir) if recipe_path_or_base_dir is not None else None
    base = base if base is not None and base.is_dir() else Path.cwd()
    return (path if path.is_absolute() else base / path).resolve()


def looks_like_path(name_or_path: str) -> bool:
    """True if model.name_or_path means a local directory rather than an embedded name or hub id."""
    return name_or_path.startswith((".", "/", "~")) or ("/" in name_or_path and Path(name_or_path).exists())


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain, fully resolved (defaults included) dict of a recipe."""
    return recipe.model_dump(mode="json")


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of a recipe, sections in schema order; loads back to an equal recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys to string values (for MLflow params); strings as is, everything else as compact JSON."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return out


# ---------------------------------------------------------------- loading


# YAML 1.2 floats that PyYAML (YAML 1.1) reads as strings: 1e-4, 5E3, 1.0e5 (no dot or unsigned exponent).
_SCI_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _fix_floats(node: yaml.Node, value: Any, depth: int = 6) -> Any:
    """Turn unquoted scientific-notation strings (per the composed nodes) into floats, in place."""
    if isinstance(node, yaml.ScalarNode):
        plain = node.style is None and isinstance(value, str) and _SCI_FLOAT.fullmatch(value)
        return float(value) if plain else value
    if depth and isinstance(node, yaml.MappingNode) and isinstance(value, dict):
        for key_node, value_node in node.value:
            if key_node.value in value:
                value[key_node.value] = _fix_floats(value_node, value[key_node.value], depth - 1)
    elif depth and isinstance(node, yaml.SequenceNode) and isinstance(value, list) and len(node.value) == len(value):
        value[:] = [_fix_floats(n, v, depth - 1) for n, v in zip(node.value, value)]
    return value


def _parse(text: str) -> tuple[Any, yaml.Node | None]:
    """yaml.safe_load plus YAML 1.2 scientific floats (lr: 1e-4 is a number); also the composed nodes."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    return _fix_floats(node, yaml.safe_load(text)), node


def _line_map(node: yaml.Node | None, path: tuple = (), out: tuple[dict, list] | None = None, depth: int = 4):
    """Map each path (a tuple) to the 1-based line of its key or list item; collect duplicate keys."""
    lines, dups = out = out or ({}, [])
    if depth and isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            if child in lines:
                dups.append((child, key_node.start_mark.line + 1))
            lines[child] = key_node.start_mark.line + 1
            _line_map(value_node, child, out, depth - 1)
    elif depth and isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _line_map(item, (*path, i), out, depth - 1)
    return out


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _describe(err: dict) -> str:
    kind, got, ctx = err["type"], err.get("input"), err.get("ctx", {})
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        section = _section_at(err["loc"][:-1])
        return f"unknown key (valid keys: {', '.join(section.model_fields) if section else '?'})"
    if kind == "literal_error":
        choices = ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
        return f"must be one of: {choices} (got {_show(got)})"
    expected = {"float_type": "a number", "float_parsing": "a number", "int_type": "an integer",
                "int_from_float": "an integer", "int_parsing": "an integer", "bool_type": "true or false",
                "string_type": "a string", "list_type": "a list", "model_type": "a mapping", "dict_type": "a mapping"}
    if kind in expected:
        return f"expected {expected[kind]}, got {_show(got)}"
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than": ("<", "lt"), "less_than_equal": ("<=", "le")}
    if kind in bounds:
        op, key = bounds[kind]
        bound = ctx[key]
        return f"must be {op} {int(bound) if float(bound).is_integer() else bound} (got {_show(got)})"
    if kind == "finite_number":
        return f"must be a finite number (got {_show(got)})"
    return err["msg"].removeprefix("Value error, ")


def _apply_override(raw: dict, override: str) -> str | None:
    """Set one ``dotted.key=value`` in raw; return a problem message or None."""
    if "=" not in override:
        return f"override {override!r}: expected key=value (e.g. train.lr=1e-4)"
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    model: Any = Recipe
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            where = ".".join(parts[:i]) or "the top level"
            valid = f" (valid keys: {', '.join(model.model_fields)})" if model else ""
            return f"override {override!r}: unknown key {part!r} in {where}{valid}"
        model = _section_at(tuple(parts[: i + 1]))
    try:
        value = _parse(text)[0]
    except yaml.YAMLError as exc:
        return f"override {override!r}: value is not valid YAML ({getattr(exc, 'problem', None) or exc})"
    node = raw
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            return f"override {override!r}: {'.'.join(parts[: i + 1])} is not a mapping in the recipe"
        node = node[part]
    node[parts[-1]] = value
    return None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem at once."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    try:
        raw, node = _parse(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    return _validate(raw, node, str(path), list(overrides))


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """A copy of ``recipe`` with ``key=value`` overrides applied and validated (errors as for load_recipe)."""
    return _validate(recipe_to_dict(recipe), None, "recipe", list(overrides))


def _validate(raw: Any, node: yaml.Node | None, label: str, overrides: list[str]) -> Recipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise RecipeError(f"{label}: the top level must be a mapping of sections (model, data, ...), got a {kind}")
    # A section whose keys are all commented out reads as null: treat it as empty.
    raw = {k: {} if v is None and k in Recipe.model_fields else v for k, v in raw.items()}
    lines, dups = _line_map(node)
    problems = [f"{'.'.join(map(str, p))} (line {n}): duplicate key" for p, n in dups]
    overridden = []
    for override in overrides:
        problem = _apply_override(raw, override)
        problems += [problem] if problem else []
        overridden += [] if problem else [(tuple(override.partition("=")[0].strip().split(".")), override)]
    raw.setdefault("data", {})  # so a recipe without data says "data.train: required"
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            source = next((o for p, o in overridden if loc[: len(p)] == p), None)
            if source and loc[:2] == ("tracking", "tracking_uri"):
                source = source.partition("=")[0] + "=..."     # it may hold a password: never echoed
            where = f" (override {source!r})" if source else (f" (line {lines[loc]})" if loc in lines else "")
            problems.append(f"{'.'.join(map(str, loc))}{where}: {_describe(err)}")
    if problems:
        if len(problems) == 1:
            raise RecipeError(f"{label}: {problems[0]}")
        raise RecipeError(f"{label}: {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))
    return recipe
