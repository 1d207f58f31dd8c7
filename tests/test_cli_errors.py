"""The real command line (``python -m finetune``) on bad inputs: every mistake ends in one ``error:`` message that names
the culprit (recipe file + YAML path + line, dataset file + line), exit code 2, no traceback, and nothing written.

Each test works in its own tmp dir (the cwd of the command), with the tiny dataset copied there and recipes written
there, so relative paths in recipes resolve inside it. ``run`` invocations here all fail before a model is loaded.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from finetune import cli as cli_module
from finetune.recipe import dump_recipe, load_recipe, recipe_to_dict
from inference.errors import UserError

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "mlflow")

BASE = """\
model:
  name_or_path: tiny-gpt-oss
  device: cpu
data:
  train: data/train.jsonl
  eval: data/eval.jsonl
  max_length: 256
harmony:
  reasoning_effort: low
train:
  max_steps: 1
  batch_size: 2
  num_threads: 2
evaluation:
  before_training: false
  max_new_tokens: 1
  max_examples: 1
output:
  dir: out/run1
tracking:
  experiment: cli-errors
"""

USER = {"role": "user", "content": "Color of sky?"}
GOOD = {"messages": [USER, {"role": "assistant", "thinking": "sky is usually blue.", "content": "blue"}]}


# -------------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def work(tmp_path):
    """tmp_path with data/{train,eval}.jsonl copied from data/tiny and r.yaml = BASE."""
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(REPO / "data" / "tiny" / name, tmp_path / "data" / name)
    (tmp_path / "r.yaml").write_text(BASE, encoding="utf-8")
    return tmp_path


def write_recipe(work: Path, text: str, name: str = "r.yaml") -> str:
    (work / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return name


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path.name


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root (relative path -> bytes, mtime_ns), and every directory (-> None)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
    return out


def error_of(proc) -> str:
    """Check a failed command's shape and return its error message (``error:`` and any continuation lines).

    The error is the last thing on stderr: a line starting ``error:``, possibly followed by the message's own indented
    continuation lines (a recipe with several problems lists one per line). No traceback anywhere.
    """
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    heads = [i for i, line in enumerate(lines) if not line[0].isspace()]
    assert heads, proc.stderr
    assert lines[heads[-1]].startswith("error: "), proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    if len(lines) - heads[-1] > 1:  # a multi-line message announces its list
        assert "problems:" in lines[heads[-1]], proc.stderr
    return "\n".join(lines[heads[-1]:])


def fails(cli, work: Path, *args: str) -> str:
    """Run ``python -m finetune ARGS`` in work; it must fail cleanly and write nothing."""
    before = snapshot(work)
    msg = error_of(cli("finetune", *args, cwd=work))
    assert not (work / "out").exists()
    assert snapshot(work) == before, "the failed command wrote or changed files"
    return msg


# -------------------------------------------------------------------------------------------------------- recipe errors


N = len(BASE.splitlines())  # lines appended to BASE start at N + 1
RECIPE_ERRORS = {
    "malformed-yaml": ("data:\n  train: data/train.jsonl\n lora: [\n", ["r.yaml", "invalid YAML at line 3"]),
    "unknown-key": (BASE + "lora:\n  rank: 4\n",
                    ["r.yaml", f"lora.rank (line {N + 2}): unknown key", "valid keys: r, alpha"]),
    "wrong-type": (BASE.replace("  max_steps: 1\n", "  max_steps: 1\n  lr: fast\n"),
                   ["r.yaml", "train.lr (line 12): expected a number, got 'fast'"]),
    "bad-enum": (BASE.replace("reasoning_effort: low", "reasoning_effort: extreme"),
                 ["r.yaml", "harmony.reasoning_effort (line 9): must be one of: low, medium, high (got 'extreme')"]),
    "several": (BASE.replace("reasoning_effort: low", "reasoning_effort: extreme")
                .replace("  max_steps: 1\n", "  max_steps: 1\n  lr: fast\n") + "lora:\n  rank: 4\nbogus: 1\n",
                ["r.yaml: 4 problems:", "harmony.reasoning_effort (line 9): must be one of",
                 "train.lr (line 12): expected a number", f"lora.rank (line {N + 3}): unknown key",
                 f"bogus (line {N + 4}): unknown key"]),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(RECIPE_ERRORS))
def test_recipe_errors(cli, work, command, case):
    text, needles = RECIPE_ERRORS[case]
    write_recipe(work, text)
    msg = fails(cli, work, command, "r.yaml")
    for needle in needles:
        assert needle in msg, msg
    assert "pydantic" not in msg


@pytest.mark.parametrize("command", ["validate", "run"])
def test_missing_dataset(cli, work, command):
    msg = fails(cli, work, command, "r.yaml", "data.train=data/missing.jsonl")
    assert "data.train" in msg and "data/missing.jsonl" in msg and "not found" in msg


@pytest.mark.parametrize("command", ["validate", "run"])
def test_missing_model_directory(cli, work, command):
    write_recipe(work, BASE.replace("name_or_path: tiny-gpt-oss", "name_or_path: ./nope"))
    msg = fails(cli, work, command, "r.yaml")
    assert "model.name_or_path" in msg and "./nope" in msg and "not found" in msg


def test_missing_recipe_file(cli, work):
    msg = fails(cli, work, "validate", "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


# ---------------------------------------------------------------------------------------------------- data errors (run)


def _insert_bad_line_3(work: Path) -> None:
    lines = (work / "data" / "train.jsonl").read_text().splitlines()
    (work / "data" / "train.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")


def _records(*records):
    return lambda work: write_jsonl(work / "data" / "train.jsonl", list(records))


THINKING_ONLY = {"messages": [USER, {"role": "assistant", "thinking": "sky is usually blue."}]}
DATA_CASES = {  # name: (how to spoil the data, extra arguments to ``run r.yaml``)
    "malformed-jsonl": (_insert_bad_line_3, []),
    "unknown-role": (_records(GOOD, {"messages": [{"role": "robot", "content": "beep"}, GOOD["messages"][1]]}, GOOD),
                     []),
    "empty-conversation": (_records(GOOD, GOOD, GOOD, {"messages": []}), []),
    "no-trainable-tokens": (_records(GOOD, GOOD, THINKING_ONLY, GOOD), ["harmony.loss_weights.analysis=0"]),
    "all-too-long": (lambda work: None, ["data.max_length=16", "data.max_train_examples=8"]),
}


def data_error(cli, work: Path, name: str) -> str:
    """``python -m finetune run`` on a spoilt dataset: it fails in data preparation, before the model is loaded."""
    spoil, args = DATA_CASES[name]
    spoil(work)
    return fails(cli, work, "run", "r.yaml", *args)


def test_jsonl_line_nested_too_deep_for_the_parser(cli, work):
    with open(work / "data" / "train.jsonl", "a", encoding="utf-8") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
    lines = (work / "data" / "train.jsonl").read_text(encoding="utf-8").count("\n")
    msg = fails(cli, work, "run", "r.yaml")
    assert f"data/train.jsonl:{lines}:" in msg and "nested too deeply" in msg


def test_a_run_that_needs_far_more_memory_than_there_is_is_refused_before_loading(cli, work):
    msg = fails(cli, work, "run", "r.yaml", "lora.r=1000000000")
    assert "GiB of cpu memory" in msg and "lower lora.r" in msg


def test_malformed_jsonl_line(cli, work):
    msg = data_error(cli, work, "malformed-jsonl")
    assert "data/train.jsonl:3:" in msg and "not valid JSON" in msg


def test_unknown_role(cli, work):
    msg = data_error(cli, work, "unknown-role")
    assert "data/train.jsonl:2:" in msg and "'robot'" in msg and "role" in msg


def test_empty_conversation(cli, work):
    msg = data_error(cli, work, "empty-conversation")
    assert "data/train.jsonl:4:" in msg and "empty conversation" in msg


def test_example_without_trainable_tokens(cli, work):
    msg = data_error(cli, work, "no-trainable-tokens")
    assert "data/train.jsonl:3:" in msg and "no trainable tokens" in msg and "loss_weights" in msg


def test_all_examples_too_long(cli, work):
    msg = data_error(cli, work, "all-too-long")
    assert "data/train.jsonl" in msg and "max_length=16" in msg and "dropped" in msg
    assert "all 8 training examples" in msg


# ------------------------------------------------------------------------------------------------------ run directories


def make_run_dir(work: Path, lr: float = 0.5) -> Path:
    """out/run1 as a finished run of a different recipe would leave it (plus a file of the user's)."""
    run_dir = work / "out" / "run1"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"status": "completed", "mlflow_run_id": None}) + "\n")
    (run_dir / "recipe.yaml").write_text(dump_recipe(load_recipe(work / "r.yaml", [f"train.lr={lr}"])))
    (run_dir / "adapter" / "adapter_config.json").write_text("{}\n")
    (run_dir / "notes.txt").write_text("keep me\n")
    return run_dir


def fails_keeping(cli, work: Path, *args: str) -> str:
    """Like fails(), for commands run where out/ already exists: nothing under work may change."""
    before = snapshot(work)
    msg = error_of(cli("finetune", *args, cwd=work))
    assert snapshot(work) == before, "the failed command wrote, changed or deleted files"
    return msg


def test_existing_run_is_not_clobbered(cli, work):
    run_dir = make_run_dir(work)
    msg = fails_keeping(cli, work, "run", "r.yaml")
    assert "output.dir" in msg and str(run_dir) in msg
    assert "--resume" in msg and "overwrite" in msg


def test_resume_with_a_different_recipe(cli, work):
    run_dir = make_run_dir(work, lr=0.5)
    msg = fails_keeping(cli, work, "run", "r.yaml", "--resume")
    assert "--resume" in msg and "different recipe" in msg and str(run_dir) in msg


def test_overwrite_refuses_a_directory_that_is_not_a_run(cli, work):
    (work / "out" / "run1" / "sub").mkdir(parents=True)
    (work / "out" / "run1" / "thesis.tex").write_text("precious\n")
    (work / "out" / "run1" / "sub" / "data.csv").write_text("1,2\n")
    msg = fails_keeping(cli, work, "run", "r.yaml", "output.overwrite=true")
    assert "output.dir" in msg and "not a run directory" in msg and str(work / "out" / "run1") in msg


def test_overwrite_refuses_a_folder_that_merely_holds_a_recipe_yaml(cli, work):
    """The data folder a user trains from, with its own recipe.yaml: not a run of this tool (no marker), so
    output.overwrite=true must delete nothing in it."""
    folder = work / "out" / "run1"
    folder.mkdir(parents=True)
    shutil.copy(work / "r.yaml", folder / "recipe.yaml")
    shutil.copy(work / "data" / "train.jsonl", folder / "train.jsonl")
    (folder / "run.json").write_text("{}\n")
    (folder / "notes.txt").write_text("mine\n")
    msg = fails_keeping(cli, work, "run", "r.yaml", "output.overwrite=true")
    assert "not a run directory this tool created" in msg and str(folder) in msg


def test_output_dir_is_a_file(cli, work):
    (work / "out").mkdir()
    (work / "out" / "run1").write_text("a file\n")
    msg = fails_keeping(cli, work, "run", "r.yaml")
    assert "output.dir" in msg and "not a directory" in msg


def test_output_dir_under_a_file(work, monkeypatch):
    # out/ is a file, so out/run1 can never be created: check_run_dir (which runs before data preparation and model
    # loading) must refuse it, like an output.dir that is itself a file. In-process: the CLI would only fail (with a
    # traceback) after loading the model.
    from finetune.train.pipeline import check_run_dir

    monkeypatch.chdir(work)
    (work / "out").write_text("a file, where output.dir needs a directory\n")
    recipe = load_recipe("r.yaml")
    with pytest.raises(UserError) as info:
        check_run_dir(recipe, resume=False)
    assert "output.dir" in str(info.value) and str(work / "out") in str(info.value)
    assert (work / "out").read_text() == "a file, where output.dir needs a directory\n"


@pytest.mark.parametrize("state", ["missing", "empty", "not-a-run"])
def test_resume_without_a_run(cli, work, state):
    run_dir = work / "out" / "run1"
    if state != "missing":
        run_dir.mkdir(parents=True)
    if state == "not-a-run":
        (run_dir / "notes.txt").write_text("keep me\n")
    msg = fails_keeping(cli, work, "run", "r.yaml", "--resume")
    assert "--resume" in msg and "no run to resume" in msg and str(run_dir) in msg
    assert run_dir.exists() == (state != "missing")


def test_corrupt_run_json_is_a_clean_error(cli, work):
    run_dir = make_run_dir(work)
    (run_dir / "run.json").write_text('{"status": "runn')  # e.g. a disk that filled up
    for extra in ((), ("--resume",)):
        msg = fails_keeping(cli, work, "run", "r.yaml", *extra)
        assert str(run_dir) in msg


# ------------------------------------------------------------------------------------------------------------ overrides


def test_bad_override_is_named(cli, work):
    msg = fails(cli, work, "validate", "r.yaml", "train.lr=oops")
    assert "train.lr" in msg and "oops" in msg and "expected a number" in msg


def test_unknown_override_key_is_named(cli, work):
    msg = fails(cli, work, "validate", "r.yaml", "train.lrr=1")
    assert "train.lrr=1" in msg and "'lrr'" in msg


def test_print_resolved_recipe_with_override(cli, work):
    write_recipe(work, "data:\n  train: data/train.jsonl\nlora:\n  r: 4\n", "small.yaml")
    proc = cli("finetune", "validate", "--print", "small.yaml", "train.lr=0.01", cwd=work)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["lr"] == 0.01
    assert printed["lora"]["r"] == 4 and printed["data"]["train"] == "data/train.jsonl"
    # defaults for everything the file does not say
    assert list(printed) == ["model", "data", "harmony", "lora", "train", "evaluation", "output", "tracking"]
    assert printed["model"]["name_or_path"] == "tiny-gpt-oss" and printed["data"]["eval"] is None
    assert printed["train"]["weight_decay"] == 0.0 and printed["train"]["lr_scheduler"] == "cosine"
    assert printed["harmony"]["conversation_start_date"] == "2025-06-28"
    assert printed["harmony"]["loss_weights"] == {"final": 1.0, "analysis": 1.0, "commentary": 0.0, "tool_call": 1.0}
    assert printed["lora"]["target_experts"] == ["gate_up_proj", "down_proj"]
    assert printed["tracking"]["experiment"] == "gpt-oss-finetune"
    # and it is a complete recipe that loads back to the same thing
    (work / "printed.yaml").write_text(proc.stdout)
    assert recipe_to_dict(load_recipe(work / "printed.yaml")) == printed
    assert printed == recipe_to_dict(load_recipe(work / "small.yaml", ["train.lr=0.01"]))


@pytest.mark.parametrize("argv, overrides, options", [
    (["run", "r.yaml", "--resume", "train.lr=1e-4"], ["train.lr=1e-4"], {"resume": True}),
    (["run", "--resume", "r.yaml", "train.lr=1e-4", "lora.r=4"], ["train.lr=1e-4", "lora.r=4"], {"resume": True}),
    (["preview", "r.yaml", "-n", "3", "data.max_length=512"], ["data.max_length=512"], {"n": 3}),
    (["preview", "r.yaml", "a=1", "-n", "3", "b=2"], ["a=1", "b=2"], {"n": 3}),
    (["estimate", "r.yaml", "--json", "lora.r=4", "--gpu-memory", "16", "train.batch_size=2"],
     ["lora.r=4", "train.batch_size=2"], {"json": True, "gpu_memory": 16.0}),
    (["sweep", "r.yaml", "--sort", "train_loss", "lora.r=4,8"], ["lora.r=4,8"], {"sort": "train_loss"}),
])
def test_overrides_are_accepted_anywhere_after_the_recipe(argv, overrides, options):
    from finetune.cli import parse
    args = parse(argv)
    assert args.recipe == "r.yaml" and args.overrides == overrides, args
    assert {k: getattr(args, k) for k in options} == options


def test_leftover_words_that_are_not_overrides_are_refused(cli, work):
    proc = cli("finetune", "validate", "r.yaml", "--print", "train.lr=0.01", "oops", cwd=work)
    assert proc.returncode == 2 and "unrecognized arguments: oops" in proc.stderr, proc.stderr
    proc = cli("finetune", "export", "out/run1", "--to", "peft", "train.lr=0.01", cwd=work)
    assert proc.returncode == 2 and "unrecognized arguments: train.lr=0.01" in proc.stderr, proc.stderr


def test_preview_with_an_override_after_a_flag(cli, work):
    """``preview R -n 1 key=value`` runs with the override (here: reasoning not trained)."""
    proc = cli("finetune", "preview", "r.yaml", "-n", "1", "harmony.loss_weights.analysis=0", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert "analysis 0" in proc.stdout.splitlines()[-1] and "final 0" not in proc.stdout.splitlines()[-1]


# -------------------------------------------------------------------------------------------------- light imports, help


def imported_modules(stderr: str) -> list[str]:
    names = [line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]
    return [n for n in names if n and n != "imported package"]


@pytest.mark.parametrize("args", [("--help",), ("validate", "--help")])
def test_help_stays_light(cli, repo_root, args):
    proc = cli("finetune", *args, cwd=repo_root, env={"PYTHONPROFILEIMPORTTIME": "1"})  # = python -X importtime
    assert proc.returncode == 0, proc.stderr
    modules = imported_modules(proc.stderr)
    assert "finetune.cli" in modules  # the import log is really there
    heavy = sorted({m for m in modules if m.split(".")[0] in HEAVY})
    assert not heavy, f"{' '.join(args)} imported {heavy[:10]}"
    assert proc.stdout.startswith("usage: python -m finetune")


def test_validate_finds_what_run_would_refuse_all_at_once(cli, work):
    """Every bad line of the data (not only the first), a recipe given as data, and a run that cannot fit anywhere:
    ``validate`` refuses what ``run`` would, before any model loads."""
    write_jsonl(work / "data" / "train.jsonl", [GOOD, "{broken", {"messages": 3}, GOOD, "{also broken"])
    msg = fails(cli, work, "validate", "r.yaml")
    assert msg.startswith("error: 3 problems:"), msg
    for line in ("data/train.jsonl:2: not valid JSON", "data/train.jsonl:3: 'messages' must be a list",
                 "data/train.jsonl:5: not valid JSON"):
        assert line in msg, msg
    write_jsonl(work / "data" / "train.jsonl", ["{broken"] * (cli_module.MAX_LISTED + 5))
    msg = fails(cli, work, "validate", "r.yaml")
    assert msg.startswith(f"error: {cli_module.MAX_LISTED + 5} problems:") and msg.endswith("... and 5 more"), msg
    shutil.copy(REPO / "data" / "tiny" / "train.jsonl", work / "data" / "train.jsonl")
    msg = fails(cli, work, "validate", "r.yaml", "data.train=r.yaml")
    assert "r.yaml: is a YAML file; a dataset is JSON lines" in msg and "problems" not in msg, msg
    msg = fails(cli, work, "validate", "r.yaml", "lora.r=100000000")
    assert "the run needs about" in msg and "lower lora.r" in msg, msg
    proc = cli("finetune", "validate", "r.yaml", cwd=work)
    assert proc.returncode == 0 and proc.stdout.strip() == "r.yaml: OK", proc.stderr


# -------------------------------------------------------------------------------------------------------------- preview


def test_preview_marks_trained_spans(cli, repo_root):
    proc = cli("finetune", "preview", "recipes/tiny-cpu.yaml", "-n", "2", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "\x1b[" not in out  # not a tty: plain markers
    assert "⟦" in out and "⟧" in out
    assert "<|channel|>final<|message|>" in out
    headers = [line for line in out.splitlines() if line.startswith("── ")]
    assert len(headers) == 2 and all("data/tiny/train.jsonl:" in h for h in headers)
    # trained spans hold the assistant's reply; the user's question is never inside one
    trained = "".join(part.split("⟧")[0] for part in out.split("⟦")[2:])  # [0] before the legend, [1] legend
    assert "<|channel|>final<|message|>" in trained and "<|start|>user" not in trained
    first = json.loads((repo_root / "data" / "tiny" / "train.jsonl").read_text().splitlines()[0])
    assert first["messages"][1]["content"] + "<|return|>" in trained
    assert first["messages"][0]["content"] not in trained
    # per-channel totals: a line with every channel, equal to the sum of the per-example counts
    total_line = [line for line in out.splitlines() if line.startswith("trained tokens per channel")]
    assert len(total_line) == 1 and "over 2 examples" in total_line[0]

    def counts(text: str) -> dict[str, int]:
        return {k: int(v) for k, v in (item.rsplit(" ", 1) for item in text.split(": ", 1)[-1].split(", "))}

    totals = counts(total_line[0])
    assert set(totals) == {"final", "analysis", "commentary", "tool_call"}
    per_example = [counts(h.split("trained: ", 1)[1]) for h in headers]
    assert totals == {k: sum(c[k] for c in per_example) for k in totals}
    assert totals["final"] > 0 and totals["analysis"] > 0 and totals["commentary"] == 0


# ------------------------------------------------------------------------------------------------------ shipped recipes


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(cli, repo_root, recipe):
    proc = cli("finetune", "validate", f"recipes/{recipe}", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    elsewhere = "" if recipe.startswith("tiny") else (  # the real models are not on a CPU test machine
        f" (model openai/{recipe.rsplit('-', 1)[0]} is not on this machine: its memory was estimated from the "
        "published config.json)")
    assert proc.stdout.strip() == f"recipes/{recipe}: OK{elsewhere}"
