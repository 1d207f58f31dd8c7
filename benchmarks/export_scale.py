"""Exports at real scale: each format of ``python -m finetune export`` on a gpt-oss-20b/120b-shaped run from disk.

    python benchmarks/export_scale.py --shape 20b --work /tmp/xs --formats peft,peft,gguf,merged-bf16 \
        --max-memory 22 --json benchmarks/results/export_scale-20b-h100-DATE.json
    python benchmarks/export_scale.py --shape 120b --work /dev/shm/xl --formats peft --max-memory 75 \
        --json benchmarks/results/export_scale-120b-h100-DATE.json

Steps: write the checkpoint (``benchmarks/make_checkpoint.py``; or ``--model DIR``), write a random adapter of the
shipped 20b QLoRA recipe's shape (``recipes/gpt-oss-20b-qlora.yaml``: its rank, alpha, attention modules and expert
tensors; names and shapes from PEFT itself, ``lora_A`` ~ N(0, 1/in), ``lora_B`` ~ N(0, 0.002^2) (``--b-std``), so
the update is ~1% of a weight), a run directory around it, then export each format in a fresh process (so
its peak memory is its own) and print/record: wall time (process, export, and the shared reference inside it), peak
host RSS (``VmHWM``, which counts the safetensors pages it touched, and the peak of anonymous memory, which does
not), peak GPU memory (allocated and reserved), output size and every parity check.

A format named twice is measured twice (the second run finds Triton's compiled kernels and Python's bytecode cached,
as a user's second export does); ``a+b`` exports both formats in one call (``gguf+ollama``, as ``--to gguf,ollama``);
``--profile DIR`` writes each format's cProfile summary there.

``--baseline`` also merges the same adapter the way the transformers + PEFT recipes do (``from_pretrained`` with
``Mxfp4Config(dequantize=True)`` on the GPU in bf16, ``PeftModel.from_pretrained``, ``merge_and_unload``,
``save_pretrained``; no parity check) and prints the ratio to our ``merged-bf16``. Outputs are deleted after they
are measured (the disk holds one at a time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "gpt-oss-20b-qlora.yaml"
B_STD = 0.002              # lora_B's spread: the update is ~1% of a weight (std 0.02), as after a short fine-tune


# -- memory sampling ------------------------------------------------------------------------------------------------

class Peaks:
    """Peak VmHWM and RssAnon of this process, sampled every 50 ms in a thread (RssAnon has no kernel high-water
    mark)."""

    def __init__(self):
        self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.anon = max(self.anon, _status("RssAnon"))
            time.sleep(0.05)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_host_rss_GiB": round(_status("VmHWM") / 2**30, 2),
                "peak_host_anon_GiB": round(max(self.anon, _status("RssAnon")) / 2**30, 2)}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _gpu_peaks() -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"peak_gpu_allocated_GiB": None, "peak_gpu_reserved_GiB": None}
    return {"peak_gpu_allocated_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_gpu_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# -- the adapter ----------------------------------------------------------------------------------------------------

def write_adapter(model_dir: Path, out: Path, seed: int = 0, b_std: float = B_STD) -> dict:
    """A random adapter of the 20b QLoRA recipe's shape for ``model_dir``, as PEFT names and shapes it."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import GptOssForCausalLM

    from inference.model.checkpoint import read_config
    lora = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=list(lora["target_modules"]),
                        target_parameters=[f"mlp.experts.{p}" for p in lora["target_experts"]])
    with torch.device("meta"):
        model = get_peft_model(GptOssForCausalLM(read_config(model_dir)), config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            std = p.shape[1] ** -0.5 if ".lora_A." in name else b_std
            tensors[name.replace(".default", "")] = (torch.randn(p.shape, generator=gen) * std).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(out))
    return {"r": lora["r"], "alpha": lora["alpha"], "tensors": len(tensors), "lora_B_std": b_std,
            "bytes": (out / "adapter_model.safetensors").stat().st_size}


# -- one format in a child process ----------------------------------------------------------------------------------

def child(fmt: str, run_dir: Path, out: Path, result_file: Path, max_memory: float | None,
          profile: Path | None = None) -> None:
    peaks = Peaks()
    started = time.time()
    import torch

    import finetune
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from finetune.ship import ExportFailed
    profiler = None
    if profile is not None:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    formats = fmt.split("+")                 # "gguf+ollama": one export call, as `--to gguf,ollama` would be
    t0 = time.time()
    try:
        results = finetune.export(run_dir, formats, out=out, max_memory=max_memory, progress=False)
        results = results if isinstance(results, list) else [results]
    except ExportFailed as failed:           # nothing was written; the checks say why, the times still count
        results = [failed.result]
    seconds = time.time() - t0
    if profiler is not None:
        _write_profile(profiler, profile / f"profile-{fmt}.txt")
    data = {"format": fmt, "passed": len(results) == len(formats) and all(r.passed for r in results),
            "export_seconds": round(seconds, 1),
            "format_seconds": {r.format: round(r.seconds, 1) for r in results},
            "reference_seconds": round(results[0].reference_seconds, 1),
            "process_seconds": round(time.time() - started, 1), "output_bytes": _bytes(out) if out.is_dir() else 0,
            "reference": results[0].reference, "checks": [c.to_dict() for r in results for c in r.checks],
            "report_summary": {r.format: _summary(r.report) for r in results}, **peaks.stop(), **_gpu_peaks()}
    result_file.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _summary(report: dict):
    tensors = report.get("tensors")
    return tensors.get("summary") if isinstance(tensors, dict) else report


def _write_profile(profiler, path: Path) -> None:
    """Where the time went (``--profile``): the top functions by cumulative and by own time."""
    import io
    import pstats
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(60)
    stats.sort_stats("tottime").print_stats(25)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue(), encoding="utf-8")


def baseline(model_dir: Path, adapter_dir: Path, out: Path, result_file: Path) -> None:
    """transformers + PEFT's merge, as their recipes do it, in bf16 (on the GPU when there is one)."""
    peaks = Peaks()
    started = time.time()
    import torch
    from peft import PeftModel
    from transformers import GptOssForCausalLM, Mxfp4Config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = GptOssForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16, device_map=device,
                                              quantization_config=Mxfp4Config(dequantize=True),
                                              local_files_only=True)
    loaded = time.time()
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), max_shard_size="4GB")
    data = {"format": "baseline: transformers + PEFT merge_and_unload (bf16, GPU, no parity check)",
            "process_seconds": round(time.time() - started, 1), "load_seconds": round(loaded - started, 1),
            "output_bytes": _bytes(out), **peaks.stop(), **_gpu_peaks()}
    result_file.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _spawn(args: list[str], result_file: Path, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], timeout=timeout)
    if proc.returncode != 0 or not result_file.is_file():
        return {"error": f"exit code {proc.returncode}"}
    return json.loads(result_file.read_text())


# -- the benchmark --------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("20b", "120b", "tiny"), default="20b")
    ap.add_argument("--work", type=Path, help="scratch directory (checkpoint, run, exports); required")
    ap.add_argument("--model", type=Path, help="an existing checkpoint instead of writing one")
    ap.add_argument("--formats", default="peft,merged-mxfp4,merged-bf16",
                    help="formats, each in its own process; a+b exports both in one call (gguf+ollama)")
    ap.add_argument("--max-memory", type=float, default=None, help="GiB a check may load whole (export's --max-memory)")
    ap.add_argument("--baseline", action="store_true", help="also time transformers + PEFT merge_and_unload")
    ap.add_argument("--b-std", type=float, default=B_STD, help=f"lora_B's spread (default {B_STD})")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per format")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--profile", type=Path, help="write each format's cProfile summary into this directory")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.run, args.out, args.result, args.max_memory, args.profile)
    if args.baseline_child:
        return baseline(args.model, args.run, args.out, args.result)

    if args.work is None:
        ap.error("--work is required")
    import torch

    from benchmarks import make_checkpoint
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = {"shape": args.shape, "date": time.strftime("%Y-%m-%d"), "formats": {},
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "max_memory_GiB": args.max_memory, "torch": torch.__version__}
    model_dir = args.model
    if model_dir is None:
        model_dir = work / f"gpt-oss-{args.shape}"
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        report["checkpoint"] = make_checkpoint.write(args.shape, model_dir, 4 << 30, device, force=True)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    report["adapter"] = write_adapter(model_dir, run_dir / "adapter", b_std=args.b_std)
    (run_dir / "run.json").write_text(json.dumps({"model_dir": str(model_dir)}) + "\n", encoding="utf-8")
    print(f"adapter: {report['adapter']}", flush=True)
    for fmt in args.formats.split(","):
        out, result_file = work / "exports" / fmt, work / f"{fmt}.json"
        shutil.rmtree(out, ignore_errors=True)
        result_file.unlink(missing_ok=True)
        extra = ["--max-memory", str(args.max_memory)] if args.max_memory else []
        extra += ["--profile", str(args.profile)] if args.profile else []
        data = _spawn(["--child", fmt, "--run", str(run_dir), "--out", str(out), "--result", str(result_file),
                       *extra], result_file, args.timeout)
        # a format named twice is measured twice (the second run finds the JIT and bytecode caches warm)
        runs = sum(k.split(" ")[0] == fmt for k in report["formats"])
        key = fmt if not runs else f"{fmt} (run {runs + 1})"
        report["formats"][key] = data
        print(f"== {key}: {json.dumps({k: v for k, v in data.items() if k != 'checks'})}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.baseline:
        out, result_file = work / "exports" / "baseline", work / "baseline.json"
        shutil.rmtree(out, ignore_errors=True)
        data = _spawn(["--baseline-child", "--model", str(model_dir), "--run", str(run_dir / "adapter"), "--out",
                       str(out), "--result", str(result_file)], result_file, args.timeout)
        report["baseline"] = data
        ours = report["formats"].get("merged-bf16", {}).get("process_seconds")
        if ours and data.get("process_seconds"):
            report["merged_bf16_speedup_vs_baseline"] = round(data["process_seconds"] / ours, 2)
        print(f"== baseline: {json.dumps(data)}; ours/baseline time ratio: "
              f"{report.get('merged_bf16_speedup_vs_baseline')}x faster", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
