"""Shared fixtures: a private cache (the tiny model is built fresh once per session, as on a new machine), the tiny
model, and a helper to run the real CLI in a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# tests/gpu needs a CUDA GPU: on the device machine, `python -m pytest tests/gpu`; elsewhere it is not collected.
collect_ignore = [] if _cuda() else ["gpu"]


def pytest_configure(config):
    # One private cache for the whole session (subprocesses inherit it); the tiny model is built on first use.
    if "GPT_OSS_WORKBENCH_CACHE" not in os.environ:
        import tempfile
        os.environ["GPT_OSS_WORKBENCH_CACHE"] = tempfile.mkdtemp(prefix="gptoss-test-cache-")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny gpt-oss, built into the session cache."""
    from inference.tiny import tiny_path
    return tiny_path()


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh fp32 copy of the tiny model (transformers' GptOssForCausalLM, eager attention)."""
    from inference.checkpoint import load_model
    return load_model(tiny_model_dir)


def readme_commands() -> tuple[str, str]:
    """The first two bash blocks of the README: setup-and-run, then the test command."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    return blocks[0].strip(), blocks[1].strip()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_model_dir):
    """The README's main command, exactly, in a scratch copy of recipes/ and data/ (so mlflow.db and runs/ land
    there and not in the checkout). Once per session: the end-to-end and export tests share it."""
    work = tmp_path_factory.mktemp("demo")
    shutil.copytree(REPO / "recipes", work / "recipes")
    shutil.copytree(REPO / "data", work / "data")
    setup, _ = readme_commands()
    main_command = setup.split("&&")[-1].split()  # python -m finetune run recipes/tiny-cpu.yaml
    assert main_command[:2] == ["python", "-m"]
    proc = run_cli(*main_command[2:], cwd=work, timeout=600)
    return work, proc


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def make_adapter(model_dir, out, seed: int, modules=ATTENTION, experts=EXPERTS, r: int = 8, alpha: int = 16):
    """A real PEFT LoRA adapter for ``model_dir`` (attention ``modules`` and expert tensors ``experts``), every
    lora_A/lora_B filled with seeded noise: PEFT's lora_B starts at zero, which would make the adapter a no-op and
    every parity test on it vacuous."""
    import torch
    from peft import LoraConfig, get_peft_model

    from inference.checkpoint import load_model
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), target_parameters=list(experts) or None)
    model = get_peft_model(load_model(model_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out


def run_cli(*args: str, cwd: Path | str = REPO, timeout: int = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` for real, as a user would, capturing output."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli
