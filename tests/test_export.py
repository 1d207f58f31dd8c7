"""Exports of the README demo's trained run, each reloaded by its real consumer: PEFT (transformers + PeftModel),
merged bf16 and MXFP4 (transformers and our runtime), GGUF, GGUF LoRA and Ollama (read back by gguf-py against the
writer's plan, and run by llama.cpp itself); and every refusal. Weights in the artifacts are checked against the merge
formula computed here from the adapter file, not from the code under test."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file

import finetune
from finetune.ship import vllm_rank_warning
from finetune.ship.ollama import modelfile
from inference.errors import UserError
from inference.model import mxfp4

pytestmark = pytest.mark.slow   # trains or runs whole commands: left out of the quick loop (-m "not slow")

RUN = Path("runs/tiny-cpu")


@pytest.fixture(scope="module")
def run_copy(demo_run, tmp_path_factory):
    """A copy of the demo's working directory (run, data, MLflow store), so exports never touch the shared run."""
    work, proc = demo_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    dst = tmp_path_factory.mktemp("exports") / "demo"
    shutil.copytree(work, dst, ignore=shutil.ignore_patterns("checkpoints"))
    info_path = dst / RUN / "run.json"
    info = json.loads(info_path.read_text())
    info["tracking_uri"] = f"sqlite:///{dst / 'mlflow.db'}"
    info_path.write_text(json.dumps(info))
    return dst


@pytest.fixture
def run_dir(run_copy, monkeypatch):
    monkeypatch.chdir(run_copy)  # the recipe's data paths (held-out probes) are relative to where it ran
    return run_copy / RUN


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def shipped(run_copy):
    """merged-mxfp4, gguf, gguf-lora and ollama from one call (one reference; ollama reuses the GGUF)."""
    cwd = os.getcwd()
    os.chdir(run_copy)
    try:
        results = finetune.export(run_copy / RUN, "ollama,gguf-lora,gguf,merged-mxfp4", echo=quiet)
    finally:
        os.chdir(cwd)
    return {r.format: r for r in results}


def adapter_deltas(adapter_dir: Path, absolute: bool = False
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The merge formula from the adapter file itself: linear ``scale * B @ A``; experts per PEFT's layout
    (``A (E*r, in)`` grouped by expert, ``B (out, r*E)`` with column ``rank * E + expert``) as ``(E, in, out)``.
    ``absolute``: the same products of ``|A|`` and ``|B|`` (what bounds the rounding error of computing them)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, scale = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))
    linear, experts = {}, {}
    for key in t:
        if not key.endswith("lora_A.weight"):
            continue
        A, B = t[key].double(), t[key.replace("lora_A", "lora_B")].double()
        if absolute:
            A, B = A.abs(), B.abs()
        module = key.removeprefix("base_model.model.").split(".lora_A")[0]
        if ".mlp.experts" in module:
            E = A.shape[0] // r
            delta = torch.stack([A[e * r:(e + 1) * r].T @ B[:, [k * E + e for k in range(r)]].T for e in range(E)])
            proj = "gate_up_proj" if delta.shape[2] == 2 * delta.shape[1] else "down_proj"
            experts[module.split(".mlp.experts")[0] + ".mlp.experts." + proj] = delta * scale
        else:
            linear[module + ".weight"] = (B @ A) * scale
    return linear, experts


def assert_bf16_of(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor, terms: int, name: str) -> None:
    """``got`` is ``want`` (float64) as the export makes it: summed in float32, then rounded to bf16.

    The float32 sum of ``terms`` products is within ``f32 = terms * eps32 * magnitude`` of ``want`` (``magnitude``: the
    sum of the terms' absolute values), and rounding either value to bf16 moves it by at most half a bf16 spacing at
    ``|want| + f32``; so ``got`` and ``bf16(want)`` differ by at most one such spacing plus ``f32``."""
    want = want.double()
    exact = want.to(torch.bfloat16).double()
    f32 = terms * torch.finfo(torch.float32).eps * magnitude.double()
    _, e = torch.frexp(want.abs() + f32)                    # |x| = m * 2**e, m in [0.5, 1): spacing 2**(e - 1 - 7)
    spacing = torch.ldexp(torch.ones_like(want), e - 8)
    assert ((got.double() - exact).abs() <= spacing + f32).all(), name


def base_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    model_dir = Path(json.loads((run_dir / "run.json").read_text())["model_dir"])
    return load_file(str(model_dir / "model.safetensors"))


def passed_checks(export_dir: Path) -> list[dict]:
    report = json.loads((export_dir / "parity.json").read_text())
    assert report["passed"] is True and report["checks"], report
    assert all(c["passed"] for c in report["checks"])
    return report["checks"]


def readme_export_command() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## Ship what you trained")
    section = text[start:text.index("\n## ", start + 1)]
    (command,) = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    return command.split()


def test_readme_export_command_peft(run_copy):
    command = readme_export_command()
    assert command[:3] == ["python", "-m", "finetune"] and command[3:] == ["export", str(RUN), "--to", "peft"]
    proc = run_cli(*command[2:], cwd=run_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "transformers + PeftModel.from_pretrained (CPU, float32, whole) vs trained model" in out
    assert "-> PASS" in out and "plan: peft" in out and "disk at" in out and "expected time" in out
    assert "warning" not in out.lower()  # rank 16 is one vLLM accepts
    export = run_copy / RUN / "exports" / "peft"
    cfg = json.loads((export / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny-gpt-oss"
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert cfg["modules_to_save"] is None and cfg["r"] == 16
    assert (export / "adapter_model.safetensors").read_bytes() == (
        run_copy / RUN / "adapter" / "adapter_model.safetensors").read_bytes()
    readme = (export / "README.md").read_text()
    # every command names the export where it is (not a temporary folder) and the base the run trained on
    assert f"vllm serve tiny-gpt-oss --enable-lora --lora-modules adapter={export.resolve()}\n" in readme
    chat = re.search(r"^python -m inference chat .*$", readme, re.M).group(0).split()
    from inference.cli import parser  # the line parses as `python -m inference` would, and what it names loads
    from inference.engine import Engine
    args = parser().parse_args(chat[3:])
    assert Engine.load(args.model, adapters={"export": args.adapter}).adapter_ids == ["export"]
    umask = os.umask(0)
    os.umask(umask)  # what is shipped is readable as the umask allows (safetensors writes owner-only files)
    assert (export / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    checks = passed_checks(export)
    peft_check = checks[0]
    assert peft_check["max_abs"] <= 1e-3 and peft_check["top1"] == 1.0
    assert abs(peft_check["effect_kept"] - 1) < 1e-3

    # Independently of the export code: PEFT really loads the expert LoRA from the export.
    from peft import PeftModel

    from inference.model.checkpoint import load_model
    info = json.loads((run_copy / RUN / "run.json").read_text())
    model = PeftModel.from_pretrained(load_model(info["model_dir"]), str(export))
    files = load_file(str(export / "adapter_model.safetensors"))
    loaded = {k: v for k, v in model.state_dict().items() if "experts" in k and "lora_A" in k}
    assert loaded, "PEFT loaded no expert LoRA"
    key = next(k for k in files if "layers.1.mlp.experts" in k and "lora_A" in k)
    match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
    assert len(match) == 1 and torch.equal(match[0], files[key])

    # Recorded in run.json and in the run's MLflow run.
    assert info["exports"][-1]["format"] == "peft" and info["exports"][-1]["passed"] is True
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{run_copy / 'mlflow.db'}")
    run = client.get_run(info["mlflow_run_id"])
    assert run.data.tags["export.peft.parity"] == "passed"
    assert run.data.tags["export.peft.path"] == str(export)
    artifacts = [a.path for a in client.list_artifacts(info["mlflow_run_id"], "exports/peft")]
    assert artifacts == ["exports/peft/parity.json"]


def test_merged_bf16_folds_the_adapter_into_every_weight(run_dir):
    lines: list[str] = []
    result = finetune.export(run_dir, "merged-bf16", echo=lines.append)
    assert result.passed and result.path == run_dir / "exports" / "merged-bf16"
    cfg = json.loads((result.path / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged, base = load_file(str(result.path / "model.safetensors")), base_tensors(run_dir)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert not any(k.endswith(("_blocks", "_scales")) for k in merged)
    linear, experts = adapter_deltas(run_dir / "adapter")
    abs_linear, abs_experts = adapter_deltas(run_dir / "adapter", absolute=True)
    r = json.loads((run_dir / "adapter/adapter_config.json").read_text())["r"]
    assert len(linear) == 8 and len(experts) == 4
    for name, delta in linear.items():   # r products, the scale and the base: r + 2 float32 roundings at most
        assert_bf16_of(merged[name], base[name].double() + delta, base[name].double().abs() + abs_linear[name],
                       r + 2, name)
    for name, delta in experts.items():
        dense = mxfp4.unpack(base[name + "_blocks"], base[name + "_scales"]).transpose(1, 2).double()
        assert_bf16_of(merged[name], dense + delta, dense.abs() + abs_experts[name], r + 2, name)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    weights, hf_free, hf, ours, same = passed_checks(result.path)
    # the files read back: every adapted tensor the nearest bf16 of the exact merge but for rounding ties
    assert weights["kind"] == "weights read back" and weights["wrong"] == 0 and weights["tensors"] == 12
    assert weights["differ"] < 1e-3 * weights["values"] and weights["min_expert_kept"] > 0.99
    assert weights["untouched"] == len(base) - 12 - 4   # every other tensor (4 experts' scales pair their blocks)
    # free-running vs the trained model: reported, not deciding; layer by layer (transformers and our runtime on the
    # merged file) within 4x the trained model's own bf16 error, measured in the same run; the two consumers agree
    assert hf_free["kind"] == "free-running logits" and hf_free["decides"] is False and hf_free["effect_kept"] > 0.98
    budget = json.loads((result.path / "parity.json").read_text())["reference_bf16_layer_by_layer"]
    for check in (hf, ours):
        assert check["kind"] == "layer by layer" and check["criteria"]["max_rel_err"] == max(
            4 * budget["worst_rel_err"], 1e-5)
        assert 0 < check["worst_rel_err"] <= check["criteria"]["max_rel_err"] and len(check["rel_err"]) == 2
    assert hf["consumer"].startswith("transformers") and ours["consumer"].startswith("our runtime")
    assert same["against"] == "transformers (merged-bf16)" and same["max_abs"] <= 1e-3
    checks = [line for line in lines if " vs " in line]
    assert len(checks) == 5 and all(kind in line for line, kind in zip(checks, (
        "weights read back", "free-running logits", "layer by layer", "layer by layer", "free-running logits")))
    assert all("budget" in line or "not a pass criterion" in line for line in checks)
    # --force replaces an earlier export as a whole (any format; peft is the quickest to make again)
    (result.path / "stale.txt").write_text("from before")
    again = finetune.export(run_dir, "peft", out=result.path, force=True, echo=quiet)
    assert again.passed and not (result.path / "stale.txt").exists() and (result.path / "parity.json").is_file()
    assert not (result.path / "model.safetensors").exists()


def test_several_formats_in_one_call_in_order(shipped, run_dir):
    assert list(shipped) == ["merged-mxfp4", "gguf", "gguf-lora", "ollama"]
    assert all(r.path == run_dir / "exports" / f for f, r in shipped.items())
    formats = [e["format"] for e in json.loads((run_dir / "run.json").read_text())["exports"] if e["passed"]]
    assert formats[-4:] == list(shipped)


def test_merged_mxfp4_requantizes_with_mx_rounding_and_reports_quality(shipped, run_dir):
    result = shipped["merged-mxfp4"]
    assert result.passed
    merged, base = load_file(str(result.path / "model.safetensors")), base_tensors(run_dir)
    cfg = json.loads((result.path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert sorted(merged) == sorted(base)  # the original layout, name for name
    _, experts = adapter_deltas(run_dir / "adapter")
    for name, delta in experts.items():
        rows = mxfp4.unpack(base[name + "_blocks"], base[name + "_scales"]).double() + delta.transpose(1, 2)
        blocks, scales = mxfp4.pack(rows.float(), "best")
        # the same MX rounding applied to our float64 merge; a float32 merge may land on the other side of a tie
        assert (merged[name + "_scales"] == scales).float().mean() > 0.999, name
        assert (merged[name + "_blocks"] == blocks).float().mean() > 0.999, name
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.router.weight"):
        assert torch.equal(merged[name], base[name])
    report = json.loads((result.path / "quality_report.json").read_text())
    tensors = report["tensors"]["tensors"]
    assert len(tensors) == 4 and all(0 < t["rel_error"] < 0.2 and 0.5 < t["delta_kept"] < 1.05 for t in tensors)
    vs_trained = report["vs_trained"]
    assert 0 < vs_trained["kl"] and 0.5 < vs_trained["top1"] < 1 and 0.8 < vs_trained["effect_kept"] < 1.05
    assert report["held_out_conversations"] == 3 and report["vs_trained_held_out"]["positions"] > 0
    assert report["reference"] == "CPU, float32, whole" and report["reference_precision"] is None
    weights, runtime_free, runtime, transformers = passed_checks(result.path)
    # the files read back: every group the nearest MXFP4 encoding of the exact merge but for ties; the update each
    # expert tensor kept, measured from the files, is what the merge reported
    assert weights["kind"] == "weights read back" and weights["wrong"] == 0 and weights["format"] == "mxfp4"
    kept = {t["name"]: t["kept"] for t in weights["per_tensor"]}
    assert all(abs(kept[t["name"]] - t["delta_kept"]) < 1e-4 for t in tensors)
    assert transformers["consumer"].startswith("transformers Mxfp4Config") and transformers["max_abs"] <= 1e-3
    assert runtime_free["decides"] is False and runtime_free["effect_kept"] == vs_trained["effect_kept"]
    assert runtime["kind"] == "layer by layer" and runtime["criteria"]["min_kept"] == 0.8
    assert all(k is None or 0.8 <= k for k in runtime["kept"]) and runtime["extra"]["expert_update_kept"] >= 0.8
    assert report["vs_trained_layer_by_layer"]["kept"] == runtime["kept"]


def test_merged_mxfp4_rounding_is_no_worse_than_either_convention(shipped, run_dir):
    result = shipped["merged-mxfp4"]
    merged, base = load_file(str(result.path / "model.safetensors")), base_tensors(run_dir)
    report = json.loads((result.path / "quality_report.json").read_text())
    assert report["scale_rounding"] == "best" and "'down'" in report["scale_rounding_means"]
    assert report["tensors"]["summary"]["scale_rounding"] == "best"
    tensors = {t["name"]: t for t in report["tensors"]["tensors"]}
    _, experts = adapter_deltas(run_dir / "adapter")
    assert sorted(tensors) == sorted(experts)
    # The export merges in float32, we in float64: its W' is within a few float32 roundings (~1e-7 relative) of our
    # W, which moves a relative error of ~0.1 by ~1e-6 of itself (an element on the other side of a rounding tie
    # errs as much either way). 1e-4 of the error leaves a hundredfold margin and is far below the gaps between the
    # conventions measured here (several percent of the error).
    tol = 1e-4
    for name, delta in experts.items():
        t = tensors[name]
        assert t["scale_rounding"] == "best" and 0 < t["up_share"] < t["differ_share"] < 1, name
        # the report's own numbers: the same sums over the same groups, so no tolerance (see mxfp4.PackStats)
        assert t["rel_error"] <= min(t["rel_error_down"], t["rel_error_up"]), name
        # and what the artifact holds, measured here against both conventions applied to our merge
        want = mxfp4.unpack(base[name + "_blocks"], base[name + "_scales"]).double() + delta.transpose(1, 2)
        err = {}
        for rounding in ("down", "up"):
            q = mxfp4.unpack(*mxfp4.pack(want.float(), rounding)).double()
            err[rounding] = float((q - want).norm() / want.norm())
        got = mxfp4.unpack(merged[name + "_blocks"], merged[name + "_scales"]).double()
        err["best"] = float((got - want).norm() / want.norm())
        assert err["best"] <= min(err["down"], err["up"]) * (1 + tol), (name, err)
        for rounding, key in (("best", "rel_error"), ("down", "rel_error_down"), ("up", "rel_error_up")):
            assert math.isclose(t[key], err[rounding], rel_tol=tol), (name, rounding, t[key], err[rounding])


def test_gguf_export_runs_in_llama_cpp(shipped):
    # (the GGUF's layout, metadata and bit-exact MXFP4 codes are checked against the checkpoint in test_gguf.py on a
    # small vocabulary; here the export's own read-back parses the 201k-token vocabulary, about 15 s on 2 cores)
    result = shipped["gguf"]
    size = (result.path / "model.gguf").stat().st_size
    assert result.passed and size > 50e6
    assert json.loads((result.path / "quality_report.json").read_text())["vs_trained"]["positions"] > 0
    checks = passed_checks(result.path)
    # the MXFP4 merge's four checks, then the file read back against the writer's plan, then llama.cpp
    assert [c["kind"] for c in checks] == ["weights read back", "free-running logits", "layer by layer",
                                           "free-running logits", "file read back", "free-running logits"]
    read_back, llama = checks[4:]
    assert read_back["consumer"] == "gguf-py (model.gguf read back)" and read_back["decides"] is True
    # every tensor of the tiny model (embedding, final norm, head; 19 a layer) and nearly all the file's bytes (the
    # rest is the 201k-token vocabulary, also compared, as metadata)
    assert read_back["tensors"] == read_back["file_tensors"] == read_back["planned_tensors"] == 3 + 2 * 19
    assert 0.8 * size < read_back["bytes"] < size and read_back["keys"] > 30
    assert llama["consumer"].startswith("llama.cpp")
    assert llama["against"] == "our runtime (same MXFP4 merge)"
    assert llama["extra"]["tokenizer_equal"] is True and llama["top1"] >= 0.9 and llama["kl"] < 0.05
    same, total = map(int, llama["extra"]["greedy_same"].split("/"))
    assert total == 7 and same >= 6


def test_gguf_lora_export_carries_the_expert_updates_into_llama_cpp(shipped):
    from gguf import GGUFReader
    result = shipped["gguf-lora"]
    assert result.passed
    reader = GGUFReader(str(result.path / "adapter.gguf"))

    def text(key):
        f = reader.fields[key]
        return bytes(f.parts[f.data[0]]).decode()

    assert text("general.type") == "adapter" and text("adapter.type") == "lora"
    names = {t.name for t in reader.tensors}
    for part in ("gate", "up", "down"):
        assert {f"blk.1.ffn_{part}_exps.weight.lora_a", f"blk.1.ffn_{part}_exps.weight.lora_b"} <= names
    assert "blk.0.attn_q.weight.lora_a" in names
    base, adapter, check = passed_checks(result.path)
    assert (base["kind"], adapter["kind"]) == ("file read back", "file read back")
    assert base["consumer"] == "gguf-py (base.gguf read back)" and base["tensors"] == base["file_tensors"] == 41
    assert adapter["consumer"] == "gguf-py (adapter.gguf read back)"
    assert adapter["tensors"] == adapter["file_tensors"] == len(reader.tensors)
    assert check["against"] == "trained model" and 0.9 <= check["effect_kept"] <= 1.1
    # the base GGUF the adapter was checked against ships beside it, and the README's lines name both where they are
    assert (result.path / "base.gguf").read_bytes()[:4] == b"GGUF"   # the file llama.cpp just ran the check on
    readme = (result.path / "README.md").read_text()
    assert f"llama-server -m {result.path / 'base.gguf'} --lora {result.path / 'adapter.gguf'}" in readme


def test_ollama_export_has_modelfile_and_gguf(shipped):
    result = shipped["ollama"]
    assert result.passed
    assert (result.path / "model.gguf").read_bytes() == (shipped["gguf"].path / "model.gguf").read_bytes()
    text = (result.path / "Modelfile").read_text()
    assert text.splitlines()[1] == "FROM ./model.gguf" and (result.path / "model.gguf").is_file()
    stops = [line for line in text.splitlines() if line.startswith("PARAMETER stop")]
    # <|end|> closes the reasoning message too; stopping there would cut every answer off
    assert stops == ['PARAMETER stop "<|return|>"', 'PARAMETER stop "<|call|>"']
    assert "<|start|>system<|message|>" in text and "Reasoning: low" in text  # the recipe's reasoning effort
    assert "ollama create" in (result.path / "README.md").read_text()
    # the gguf export's file, so its checks: the read back and llama.cpp's
    checks = passed_checks(result.path)
    assert checks == passed_checks(shipped["gguf"].path)
    assert [c["consumer"] for c in checks[-2:]] == ["gguf-py (model.gguf read back)", "llama.cpp (model.gguf)"]


def test_modelfile_template_carries_the_recipes_options():
    # tests/test_ollama.py executes the template with Go's text/template against our renderer; here: the options
    from inference import harmony
    text = modelfile(harmony.HarmonyOptions(reasoning_effort="high", conversation_start_date=None))
    assert "Reasoning: high" in text and "Current date" not in text


def test_vllm_rank_warning():
    assert vllm_rank_warning(16) is None and vllm_rank_warning(320) is None
    assert "12" in vllm_rank_warning(12) and "vLLM" in vllm_rank_warning(12)


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_export_refusals(run_dir, tmp_path):
    assert "unknown export format 'onnx'" in user_error(finetune.export, run_dir, "onnx", echo=quiet)
    assert "formats repeat" in user_error(finetune.export, run_dir, ["peft", "peft"], echo=quiet)
    assert "run directory not found" in user_error(finetune.export, tmp_path / "nope", "peft", echo=quiet)
    empty = tmp_path / "unfinished"
    (empty / "checkpoints").mkdir(parents=True)
    assert "no final adapter" in user_error(finetune.export, empty, "peft", echo=quiet)
    # a model with the same shapes but other weights (a fine-tune of it, say): the run's fingerprint tells them apart
    base_dir = Path(json.loads((run_dir / "run.json").read_text())["model_dir"])
    tuned = tmp_path / "tuned"
    shutil.copytree(base_dir, tuned)
    from safetensors.torch import save_file
    tensors = load_file(str(base_dir / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1.01
    save_file(tensors, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    msg = user_error(finetune.export, run_dir, "peft", model=tuned, echo=quiet)
    assert "different model" in msg
    # a model of other shapes: the adapter does not fit
    other = tmp_path / "wider"
    shutil.copytree(base_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(cfg))
    assert "different base model" in user_error(finetune.export, run_dir, "peft", model=other, echo=quiet)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert "pass --force" in user_error(finetune.export, run_dir, "peft", out=occupied, echo=quiet)
    msg = user_error(finetune.export, run_dir, "peft", out=occupied, force=True, echo=quiet)
    assert "not an export (no parity.json); refusing to delete it" in msg
    assert (occupied / "keep.txt").read_text() == "mine"
    assert "would replace the run" in user_error(finetune.export, run_dir, "peft", out=run_dir.parent, echo=quiet)


def test_a_failed_parity_check_leaves_nothing_behind(run_dir):
    dest = run_dir / "exports" / "strict-mxfp4"
    msg = user_error(finetune.export, run_dir, "merged-mxfp4", out=dest, min_effect_kept=1.5, echo=quiet)
    assert "failed its parity check" in msg and "adapter effect kept" in msg
    assert not dest.exists()
    assert not [p for p in dest.parent.iterdir() if ".partial-" in p.name]
    last = json.loads((run_dir / "run.json").read_text())["exports"][-1]
    assert last["format"] == "merged-mxfp4" and last["passed"] is False and "parity" in last["error"]
