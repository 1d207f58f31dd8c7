"""The walking skeleton end to end: the README's commands, the shipped recipe learning, what lands in the run
directory and in MLflow, adapter reload parity, determinism and resume."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import EPS32, REPO, assert_fp32_close, float64, readme_commands, run, run_cli, stop, wait_for


def test_readme_starts_with_setup_and_test_commands():
    setup, tests = readme_commands()
    assert setup.startswith("python3 -m venv .venv")
    assert "pip install torch==2.13.0" in setup  # never an unpinned torch (it would pull the CUDA build)
    assert setup.index("torch==2.13.0") < setup.index("pip install -e .")
    assert "[dev]" not in setup      # the demo needs no test extras (they build llama.cpp from source)
    assert setup.endswith("python -m finetune run recipes/tiny-cpu.yaml")
    assert tests == 'pip install -e ".[dev]" && python -m pytest -q'
    assert tests in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_shipped_tiny_data_matches_its_generator():
    import tiny_task
    for name, text in tiny_task.expected_files().items():
        assert (REPO / "data" / "tiny" / name).read_text(encoding="utf-8") == text, name


@pytest.mark.slow
def test_demo_trains_and_visibly_learns(demo_run):
    work, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    assert "training:" in out and "step/s" in out  # the progress bar
    assert "LoRA coverage" in out
    losses = [float(x) for x in re.findall(r"step +\d+/\d+ +loss ([0-9.]+)", out)]
    assert len(losses) >= 5 and losses[-1] < losses[0] / 4, losses  # the loss falls, visibly
    report = json.loads((work / "runs/tiny-cpu/eval_report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["examples"] == after["examples"] == 48
    assert after["loss"] < before["loss"] - 5
    assert before["exact_match"] <= 0.05
    assert after["exact_match"] >= before["exact_match"] + 0.3, (before["exact_match"], after["exact_match"])
    assert after["final_rate"] > 0.8
    table = out[out.index("evaluation on held-out data: loss over 48 sequences, 48 answers generated"):]
    assert "exact match (final channel)" in table and "before" in table and "after" in table


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(title)
    return text[start:text.index("\n## ", start + 1)]


@pytest.mark.slow
def test_readme_inference_commands_on_the_trained_adapter(demo_run):
    """The README's eval, chat, serve + openai client and Python engine snippets, on the demo's adapter."""
    import os
    import socket
    import subprocess
    import sys
    work, proc = demo_run
    assert proc.returncode == 0
    section = _readme_section("## Chat with, evaluate and serve")
    commands = [line.split() for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()]
    assert [c[:4] for c in commands] == [["python", "-m", "inference", verb] for verb in ("eval", "chat", "serve")]
    eval_cmd, chat_cmd, serve_cmd = commands

    # eval with the run's settings reproduces training's end-of-run evaluation exactly: one code path
    done = run_cli(*eval_cmd[2:], cwd=work)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((work / eval_cmd[eval_cmd.index("--out") + 1]).read_text())
    after = json.loads((work / "runs/tiny-cpu/eval_report.json").read_text())["after"]
    for key in ("loss_tokens", "examples", "generated", "exact_match", "final_rate", "stop_rate"):
        assert report[key] == after[key], key
    # the loss is a float32 sum over loss_tokens terms: another process may add them in another order (threads)
    assert report["loss"] == pytest.approx(after["loss"], rel=after["loss_tokens"] * EPS32, abs=0)

    env = dict(os.environ, PYTHONPATH=str(REPO))
    chat = run([sys.executable, *chat_cmd[1:]], input="Name the color of banana.\n/quit\n", cwd=work, env=env)
    assert chat.returncode == 0, chat.stderr[-2000:]
    thinking = [ln for ln in chat.stdout.splitlines() if ln.startswith("thinking: ")]
    answer = [ln for ln in chat.stdout.splitlines() if ln.startswith("assistant: ")]
    assert thinking and "banana" in thinking[0] and answer == ["assistant: yellow"], chat.stdout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, *serve_cmd[1:], "--port", str(port)], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client_code = re.findall(r"```python\n(.*?)```", section, re.S)[0].replace(":8000/", f":{port}/")
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=5).close() or True, server,
                 "python -m inference serve")
        out = run([sys.executable, "-c", client_code], cwd=work, env=env)
        assert out.returncode == 0, (out.stderr[-2000:], server.poll())
        reasoning, content = out.stdout.strip().rsplit(" -> ", 1)
        assert "banana" in reasoning and content == "yellow", out.stdout
    finally:
        _, err = stop(server)
    assert "Traceback" not in err

    engine_code = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    out = run([sys.executable, "-c", engine_code], cwd=work, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].endswith("-> yellow stop " + lines[0].split()[-1]) and "banana" in lines[0], lines
    assert any(ln.startswith("reasoning ") for ln in lines) and any(ln.startswith("content 'yellow'") for ln in lines)


@pytest.mark.slow
def test_demo_run_directory(demo_run):
    work, proc = demo_run
    run_dir = work / "runs/tiny-cpu"
    from finetune.recipe import load_recipe, recipe_to_dict
    saved = load_recipe(run_dir / "recipe.yaml")
    shipped = yaml.safe_load((REPO / "recipes/tiny-cpu.yaml").read_text())
    assert recipe_to_dict(saved)["train"]["max_steps"] == shipped["train"]["max_steps"]
    assert recipe_to_dict(saved)["train"]["weight_decay"] == 0.0  # defaults are written out too
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed"
    assert 0 < info["first_step_s"] < info["wall_time_s"]   # the wait before the progress bar first moves
    assert info["coverage"]["groups"]["experts"] > 0 and info["coverage"]["groups"]["attention"] > 0
    assert info["data"]["trained_tokens_by_channel"]["analysis"] > 0
    adapter_cfg = json.loads((run_dir / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    assert sorted(adapter_cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert adapter_cfg["base_model_name_or_path"] == "tiny-gpt-oss"
    assert (run_dir / "adapter/adapter_model.safetensors").is_file()
    # Weights are safetensors only; checkpoints also carry the Trainer's resume state (optimizer, scheduler, RNG).
    weight_files = [p.name for p in run_dir.rglob("*") if "adapter_model" in p.name or "pytorch_model" in p.name]
    assert weight_files and all(name == "adapter_model.safetensors" for name in weight_files), weight_files
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in s for s in steps) and any("loss" in s for s in steps)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # checkpoints kept for --resume


@pytest.mark.slow
def test_demo_mlflow_run_contents(demo_run):
    work, _ = demo_run
    from mlflow.tracking import MlflowClient
    info = json.loads((work / "runs/tiny-cpu/run.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    shipped = yaml.safe_load((REPO / "recipes/tiny-cpu.yaml").read_text())
    assert float(params["train.lr"]) == shipped["train"]["lr"] and params["lora.r"] == str(shipped["lora"]["r"])
    assert params["train.weight_decay"] == "0.0"  # the flattened resolved recipe, defaults included
    assert params["model.name_or_path"] == "tiny-gpt-oss"
    tags = run.data.tags
    expected_fp = hashlib.sha256((REPO / "data/tiny/train.jsonl").read_bytes()).hexdigest()
    assert tags["dataset_fingerprint"] == expected_fp
    assert re.fullmatch(r"[0-9a-f]{16}", tags["harmony_hash"])
    for lib in ("torch", "transformers", "peft", "trl", "openai-harmony"):
        assert tags[f"version.{lib}"] not in ("", "missing")
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])  # the checkout the tests run in
    # lineage: row counts, trained tokens per channel, coverage, the base model's fingerprint
    train_rows = len((REPO / "data/tiny/train.jsonl").read_text().splitlines())
    eval_rows = len((REPO / "data/tiny/eval.jsonl").read_text().splitlines())
    assert tags["data.train_rows"] == str(train_rows) and tags["data.eval_rows"] == str(eval_rows)
    by_channel = info["data"]["trained_tokens_by_channel"]
    assert by_channel["final"] > 0 and by_channel["analysis"] > 0
    for channel, n in by_channel.items():
        assert tags[f"data.trained_tokens.{channel}"] == str(n)
    assert tags["data.trained_tokens"] == str(sum(by_channel.values()))
    layers = len(info["coverage"]["per_layer"])
    assert tags["lora.coverage.experts"].startswith(f"{layers} of {layers} layers")
    assert tags["lora.coverage.attention"].startswith(f"{layers} of {layers} layers")
    assert tags["model_fingerprint"] == info["model_fingerprint"]
    assert tags["finetune.kind"] == "run" and "mlflow.parentRunId" not in tags
    # trained tokens actually seen: 300 steps x 8 examples = 25 passes over 96 examples
    trained = run.data.metrics["trained_tokens"]
    assert trained == info["trained_tokens"] == 25 * info["data"]["trained_tokens"]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 5 and history[-1].value < history[0].value
    assert client.get_metric_history(run.info.run_id, "eval.exact_match")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "run.json", "coverage.json", "eval_report.json", "metrics.jsonl", "adapter"} <= artifacts
    # the Trainer's end-of-run mean loss is its own metric, not a last point on the per-step curve
    assert history[-1].step == 300 and run.data.metrics["train_loss_mean"] > history[-1].value
    adapter_files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files


def short_recipe(tmp_path: Path, **extra: str):
    """The tiny recipe shortened for in-process tests (still the real pipeline)."""
    from finetune.recipe import load_recipe
    shutil.copytree(REPO / "data", tmp_path / "data", dirs_exist_ok=True)
    overrides = {"data.train": str(tmp_path / "data/tiny/train.jsonl"), "data.eval": "null",
                 "train.max_steps": "6", "train.logging_steps": "1", "train.save_steps": "3",
                 "evaluation.before_training": "false", "tracking.mlflow": "false",
                 "output.dir": str(tmp_path / "run")} | extra
    return load_recipe(REPO / "recipes/tiny-cpu.yaml", [f"{k}={v}" for k, v in overrides.items()])


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_same_seed_same_losses_and_adapter_reloads_with_equal_logits(tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel

    import finetune
    from inference.model.checkpoint import load_model

    short = {"train.max_steps": "3"}
    a = finetune.run(short_recipe(tmp_path / "a", **short), keep_model=True)
    b = finetune.run(short_recipe(tmp_path / "b", **short))
    la, lb = losses(a.run_dir), losses(b.run_dir)
    assert sorted(la) == [1, 2, 3]
    assert la == lb  # bit-identical on CPU with the same seed
    c = finetune.run(short_recipe(tmp_path / "c", **short, **{"train.seed": "1"}))
    assert losses(c.run_dir) != la  # and the seed matters
    # The same run on our fast path (its CPU twins here; train.kernels=auto takes it on CUDA) with selective
    # activation checkpointing: the same loss curve, up to fp32 rounding.
    d = finetune.run(short_recipe(tmp_path / "d", **short, **{"train.kernels": "fast",
                                                               "train.gradient_checkpointing": "true"}))
    assert json.loads((d.run_dir / "run.json").read_text())["kernels"] == "fast"
    assert json.loads((a.run_dir / "run.json").read_text())["kernels"] == "reference"   # auto on CPU
    assert sorted(losses(d.run_dir)) == [1, 2, 3]
    # Measured (2-core CPU): the two curves are at most 1 fp32 ulp apart over the 3 steps (the fast path sums
    # attention and experts in another order); 64 ulps leaves room for other BLAS builds and thread counts.
    for step, loss in la.items():
        assert abs(losses(d.run_dir)[step] - loss) <= 64 * EPS32 * loss, step
    # QLoRA on the shipped MXFP4 experts (kept packed, decoded inside the expert matmuls) trains the same curve as
    # the run whose experts were decoded to fp32 at load: the decoded values are exactly the same numbers.
    e = finetune.run(short_recipe(tmp_path / "e", **short, **{"train.kernels": "fast", "model.quantization": "mxfp4",
                                                               "train.gradient_checkpointing": "true"}))
    assert json.loads((e.run_dir / "run.json").read_text())["quantization"] == "mxfp4"
    assert json.loads((a.run_dir / "run.json").read_text())["quantization"] == "none"   # auto on CPU
    assert losses(e.run_dir) == losses(d.run_dir)   # the same kernels on the same decoded numbers: bit for bit

    ids = torch.tensor([[200006, 1428, 200008, 3736, 382, 290, 3089, 328, 4044, 30, 200007, 200006, 173781]])
    reloaded = PeftModel.from_pretrained(load_model(tiny_model_dir), str(a.adapter_dir)).eval()
    plain = load_model(tiny_model_dir).eval()
    a.model.eval()
    with torch.no_grad():
        trained_logits = a.model(input_ids=ids).logits
        reloaded_logits = reloaded(input_ids=ids).logits
        base_logits = plain(input_ids=ids).logits
    # the same weights through the same modules: nothing differs but, at most, the order of fp32 sums
    assert_fp32_close(reloaded_logits, trained_logits, float64(reloaded)(input_ids=ids).logits, "reloaded adapter")
    assert (trained_logits - base_logits).abs().max() > 1e-3  # the adapter really changes the model


@pytest.mark.slow
def test_nf4_run_trains_and_its_adapter_loads_on_the_unquantized_base(tmp_path, tiny_model_dir):
    """model.quantization=nf4 through the whole pipeline (packed MXFP4 experts + NF4 attention, here on the CPU)."""
    import torch
    from peft import PeftModel

    import finetune
    from inference.model.checkpoint import load_model

    run = finetune.run(short_recipe(tmp_path / "q", **{"train.max_steps": "3", "model.quantization": "nf4",
                                                        "train.kernels": "fast"}))
    info = json.loads((run.run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["quantization"] == "nf4"
    assert info["estimate"]["quantization"] == "nf4"
    curve = losses(run.run_dir)
    assert sorted(curve) == [1, 2, 3] and all(0 < v < 20 for v in curve.values())
    # the adapter is a plain PEFT adapter: it applies to the unquantized base and changes its output
    ids = torch.tensor([[200006, 1428, 200008, 3736, 382, 290, 3089, 328, 4044, 30, 200007]])
    base = load_model(tiny_model_dir).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-4


def test_resume_refuses_a_different_recipe(tmp_path):
    import finetune
    from inference.errors import UserError
    first = finetune.run(short_recipe(tmp_path, **{"train.max_steps": "2"}))
    with pytest.raises(UserError, match="different recipe"):
        finetune.run(short_recipe(tmp_path, **{"train.max_steps": "4"}), resume=True)
    assert first.adapter_dir.is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("sample", ["chat.jsonl", "sharegpt.jsonl"])
def test_format_samples_train_end_to_end(tmp_path, sample):
    """The shipped format samples (tools, multi-turn, developer prompts, ShareGPT) go through the whole pipeline."""
    import finetune
    data = str(REPO / "data/sample" / sample)
    result = finetune.run(short_recipe(tmp_path, **{"data.train": data, "data.eval": data, "train.max_steps": "2",
                                                     "train.batch_size": "2", "evaluation.max_new_tokens": "8"}))
    # one training sequence per conversation (no turn reasons before a later turn), one generation per run of
    # assistant messages: chat.jsonl's tool-call conversation and its two-turn chat have two each, as does
    # sharegpt.jsonl's two-turn chat
    sequences, generations = {"chat.jsonl": (4, 6), "sharegpt.jsonl": (2, 3)}[sample]
    assert len((REPO / "data/sample" / sample).read_text().splitlines()) == sequences
    assert result.eval_after["examples"] == sequences and result.eval_after["generated"] == generations
    assert sorted(losses(result.run_dir)) == [1, 2]
    if sample == "chat.jsonl":
        assert result.stats["trained_tokens_by_channel"]["tool_call"] > 0


def test_shipped_tiny_chat_data_matches_its_generator():
    import tiny_task
    for name, text in tiny_task.expected_chat_files().items():
        assert (REPO / "data" / "tiny-chat" / name).read_text(encoding="utf-8") == text, name


@pytest.mark.slow
def test_multi_turn_fine_tune_ends_every_answer_at_return(tmp_path, monkeypatch, tiny_model_dir):
    """A multi-turn chat fine-tune (the shipped recipes/tiny-chat.yaml: three turns, two of them earlier turns that
    history stores with <|end|>) learns to end every held-out answer with <|return|>, the stop token, so generation
    stops there; training an earlier answer through its history terminator taught the model <|end|>, after which it
    kept generating."""
    import finetune
    from finetune.data.prepare import prepare
    from finetune.recipe import load_recipe
    from inference import harmony
    from inference.engine import Engine
    from inference.evaluate import generate_greedy

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(REPO / "recipes/tiny-chat.yaml", [
        f"data.train={REPO / 'data/tiny-chat/train.jsonl'}", f"data.eval={REPO / 'data/tiny-chat/eval.jsonl'}",
        "tracking.mlflow=false", f"output.dir={tmp_path / 'run'}"])
    result = finetune.run(recipe)
    after = result.eval_after
    assert after["generated"] == 96 and after["stop_rate"] == 1.0, after   # every turn of 32 chats
    assert after["exact_match"] >= 0.3, after   # it learnt the task, not only where to stop
    # the same, token by token: every completion is one final message ending in <|return|>, never <|end|>
    engine = Engine.load(tiny_model_dir, adapters={"run": result.adapter_dir})
    completions = generate_greedy(engine, [c.prompt_ids for c in prepare(recipe).eval_cases],
                                  recipe.evaluation.max_new_tokens, "run")
    enc = harmony.encoding()
    for tokens in completions:
        text = enc.decode(tokens)
        assert text.endswith("<|return|>") and "<|end|>" not in text, text
