"""Shared fixtures: a private cache (the tiny model is built fresh once per session, as on a new machine), the tiny
model, and a helper to run the real CLI in a subprocess."""

from __future__ import annotations

import os
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


def run_cli(*args: str, cwd: Path | str = REPO, timeout: int = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` for real, as a user would, capturing output."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli
