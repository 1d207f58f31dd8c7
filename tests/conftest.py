"""Shared fixtures: a private cache (the tiny model is built fresh once per session, as on a new machine), the tiny
model, helpers to run the real CLI and servers in subprocesses, and the tolerances of fp32 comparisons.

Every test starts from the same random state (:func:`_seeded`), so what a test draws never depends on which tests
ran before it; tests that draw random inputs seed their own generators besides.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Limits for subprocesses, meant never to be hit by a working command: a 2-core machine running the whole suite and
# something else besides runs a command several times slower than an idle one (the README demo takes ~2 min idle and
# ran past 600 s under load), and a limit that is hit fails a correct test. A hung process still fails, at the limit.
CLI_TIMEOUT_S = 900        # one CLI command (seconds idle; a short training or benchmark run: a minute or two)
TRAIN_TIMEOUT_S = 2400     # a command that trains for real, e.g. the README demo (~2 min idle) or a sweep
SERVER_START_S = 600       # a server process importing torch and loading the model until it answers (~10 s idle)


def _cuda() -> bool:
    return torch.cuda.is_available()


# tests/gpu needs a CUDA GPU: on the device machine, `python -m pytest tests/gpu -n 0`; elsewhere it is not collected.
collect_ignore = [] if _cuda() else ["gpu"]


def pytest_configure(config):
    # One private cache for the whole session (subprocesses inherit it; so do pytest-xdist's workers, started after
    # this runs in the controller); the tiny model is built on first use, under a lock (inference.cache.locked).
    if "GPT_OSS_WORKBENCH_CACHE" not in os.environ:
        import tempfile
        os.environ["GPT_OSS_WORKBENCH_CACHE"] = tempfile.mkdtemp(prefix="gptoss-test-cache-")
    # Under pytest-xdist (the README's test command runs one worker per core): each worker, and each command it
    # starts, gets its share of the cores. Two workers each spinning up a thread pool as wide as the machine would
    # oversubscribe it and run slower than one.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    # OpenMP threads that wait at a barrier sleep instead of spinning. Recipes pin their own thread count
    # (train.num_threads), so two runs started by two workers oversubscribe the cores, and spinning threads then burn
    # each other's time slices: measured on the 2-core machine, two concurrent 40-step tiny runs took 240 s each with
    # spinning and 28 s each with sleeping (one run alone: 27 s and 29 s). Inherited by every command a test starts.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items):
    """The order whole files are handed to the workers (``--dist loadfile``, so a file's module fixtures are built
    once; ``--no-loadscope-reorder`` in pyproject.toml keeps this order, where pytest-xdist would sort the files by
    their number of tests and deal the two longest, which have two tests each, out last to run alone while the other
    worker idled). A worker takes the next file when it has two tests or fewer left, so the heavy files go first:

    1. the first file that uses the shared demo run (``demo_run``): it starts training it at once;
    2. the other files with slow tests (whole training runs, notebooks, servers), most slow tests first;
    3. the other files that use the demo run: by the time a worker takes one, the demo is trained and it does not
       sit waiting on the demo's lock;
    4. the rest, in collection order. Each file's tests keep their order."""
    import collections
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    demo = [item.path for item in items if "demo_run" in item.fixturenames]

    def group(path) -> tuple[int, int]:
        if demo and path == demo[0]:
            return 0, 0
        if path in demo:
            return 2, 0
        return (1, -slow[path]) if slow[path] else (3, 0)

    items.sort(key=lambda item: group(item.path))   # stable: files and tests otherwise keep collection order


def pytest_collection_finish(session):
    """What collection imported (torch, transformers, PEFT, MLflow, every test module: about a million objects) lives
    as long as this process, so Python's garbage collector stops walking it. Measured over the suite on 2 workers:
    94 full collections (set off by allocation counts, or called by accelerate's Trainer, export checks and sweeps)
    took 36 s of the workers' time without this, 119 took 23 s with it. What is garbage now is collected first, so
    nothing unreachable is kept."""
    import gc
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _seeded():
    """The global random state every test starts from: module construction (nn.Linear, PEFT's LoRA init) and any
    draw without a generator give the same values whatever ran before (fixtures of a wider scope seed themselves)."""
    import numpy as np
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny gpt-oss, built into the session cache."""
    from inference.model.tiny import tiny_path
    return tiny_path()


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh fp32 copy of the tiny model (transformers' GptOssForCausalLM, eager attention)."""
    from inference.model.checkpoint import load_model
    return load_model(tiny_model_dir)


def readme_commands() -> tuple[str, str]:
    """The first two bash blocks of the README: setup-and-run, then the test command."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    return blocks[0].strip(), blocks[1].strip()


def _demo(shared: Path) -> subprocess.CompletedProcess:
    """The README's main command, run once in ``shared/demo`` under a lock; later callers (other pytest-xdist
    workers) read back what it printed."""
    import json

    from inference.cache import locked
    work, printed = shared / "demo", shared / "demo-output.json"
    with locked(shared / "demo.lock"):
        if not printed.is_file():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            shutil.copytree(REPO / "recipes", work / "recipes")
            shutil.copytree(REPO / "data", work / "data")
            setup, _ = readme_commands()
            main_command = setup.split("&&")[-1].split()  # python -m finetune run recipes/tiny-cpu.yaml
            assert main_command[:2] == ["python", "-m"]
            proc = run_cli(*main_command[2:], cwd=work, timeout=TRAIN_TIMEOUT_S)
            printed.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode,
                                           "stdout": proc.stdout, "stderr": proc.stderr}), encoding="utf-8")
    return subprocess.CompletedProcess(**json.loads(printed.read_text(encoding="utf-8")))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_model_dir):
    """The README's main command, exactly, in a scratch copy of recipes/ and data/ (so mlflow.db and runs/ land
    there and not in the checkout). Once per session: the end-to-end and export tests share it, also across
    pytest-xdist workers (it runs under a lock in the session's shared temporary directory)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent               # one basetemp per worker, under the session's
    return shared / "demo", _demo(shared)


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def make_adapter(model_dir, out, seed: int, modules=ATTENTION, experts=EXPERTS, r: int = 8, alpha: int = 16):
    """A real PEFT LoRA adapter for ``model_dir`` (attention ``modules`` and expert tensors ``experts``), every
    lora_A/lora_B filled with seeded noise: PEFT's lora_B starts at zero, which would make the adapter a no-op and
    every parity test on it vacuous."""
    from peft import LoraConfig, get_peft_model

    from inference.model.checkpoint import load_model
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), target_parameters=list(experts) or None)
    model = get_peft_model(load_model(model_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def run(argv: list[str], timeout: float = CLI_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)``; past ``timeout`` the test fails showing what the
    process had printed (subprocess kills it), rather than with a bare TimeoutExpired."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(map(str, argv))} still running after {timeout} s\n--- stdout:\n"
                    f"{_text(exc.stdout)[-5000:]}\n--- stderr:\n{_text(exc.stderr)[-5000:]}", pytrace=False)


def run_cli(*args: str, cwd: Path | str = REPO, timeout: float = CLI_TIMEOUT_S, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` for real, as a user would, capturing output (``input`` typed on its stdin)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return run([sys.executable, "-m", *args], timeout=timeout, cwd=str(cwd), env=full_env, input=input)


def wait_for(ready, server: subprocess.Popen, what: str, timeout: float = SERVER_START_S, every: float = 0.5,
             group: bool = False):
    """Poll ``ready()`` until it returns something other than None (it may raise OSError while the server is not up)
    and return that; fail, showing the server's output, if the server exits or ``timeout`` passes first. ``group``:
    the server was started with ``start_new_session=True`` and is stopped with its whole process group."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = ready()
        except OSError:
            value = None
        if value is not None:
            return value
        if server.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {server.returncode}" if server.poll() is not None else f"no answer in {timeout} s"
            out, err = stop(server, group=group)
            pytest.fail(f"{what}: {state}\n--- stdout:\n{out[-5000:]}\n--- stderr:\n{err[-5000:]}", pytrace=False)
        time.sleep(every)


def stop(server: subprocess.Popen, timeout: float = 120, group: bool = False) -> tuple[str, str]:
    """Terminate a server started with ``Popen(..., stdout=PIPE, stderr=PIPE, text=True)`` and return its output;
    killed if it has not exited within ``timeout`` (shutting down on a busy machine may take a while). ``group``: the
    whole process group of a server started with ``start_new_session=True`` (its workers hold the pipes too)."""
    def signal_it(sig):
        try:
            if group:
                os.killpg(server.pid, sig)
            else:
                server.send_signal(sig)
        except ProcessLookupError:   # already gone
            pass

    signal_it(signal.SIGTERM)
    try:
        out, err = server.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_it(signal.SIGKILL)
        out, err = server.communicate()
    return _text(out), _text(err)


# ------------------------------------------------------------------------------------------- fp32 comparisons

EPS32 = torch.finfo(torch.float32).eps
# Two fp32 computations of the same maths in different orders each land about as far from the exact result as the
# measured reference does: their errors add (2x), with 2x more to spare for one landing further out than the other.
FP32_MARGIN = 4


def summation_bound(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise bound on how far two fp32 evaluations of ``a @ b`` (per expert group ending at ``offs[e]`` when
    given) in any two summation orders can differ: each is within ``K * eps/2 * sum_k |a_k b_k|`` of the exact
    value (K terms; a and b themselves exact fp32 numbers), so the two within ``K * eps * (|a| @ |b|)``."""
    from finetune.kernels.experts import _gmm_loop
    a, b = a.detach().abs().double(), b.detach().abs().double()
    return a.shape[-1] * EPS32 * (_gmm_loop(a, b, offs) if offs is not None else a @ b)


def fp32_tolerance(ref32: torch.Tensor, exact: torch.Tensor) -> float:
    """How far another fp32 computation of the same maths may be from ``ref32``: FP32_MARGIN times ``ref32``'s
    measured distance from the float64 result ``exact`` (at least one fp32 ulp of the largest value)."""
    err = (ref32.double() - exact.double()).abs().max().item()
    return FP32_MARGIN * max(err, EPS32 * exact.double().abs().max().item())


def assert_fp32_close(ours: torch.Tensor, ref32: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """``ours`` equals the fp32 reference ``ref32`` up to fp32 rounding, as measured against ``exact``."""
    tol = fp32_tolerance(ref32, exact)
    diff = (torch.as_tensor(ours).double() - torch.as_tensor(ref32).double()).abs().max().item()
    assert diff <= tol, f"{what}: max abs difference {diff:.3g} > {tol:.3g} (fp32 error of the reference x margin)"


def assert_float64_close(ours: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, what: str = "") -> None:
    """Two float64 computations of the same maths: rounding errors scale with the unit roundoff, so the reference's
    float64 error is its fp32 run's distance from it (``ref32``) times eps64 / eps32; FP32_MARGIN times that (at
    least one float64 ulp of the largest value) bounds the distance of ``ours`` from ``ref64``."""
    eps64 = torch.finfo(torch.float64).eps
    err = (ref32.double() - ref64).abs().max().item() * eps64 / EPS32
    tol = FP32_MARGIN * max(err, eps64 * ref64.abs().max().item())
    diff = (ours - ref64).abs().max().item()
    assert diff <= tol, f"{what}: max abs difference {diff:.3g} > {tol:.3g} (float64 error of the reference x margin)"


def float64(model):
    """``model`` (transformers' gpt-oss, or PEFT around it) in float64, for an exact reference: with eager experts,
    since transformers' grouped_mm experts take no float64."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_experts_implementation("eager")
    return model.double()


@pytest.fixture
def cli():
    return run_cli
