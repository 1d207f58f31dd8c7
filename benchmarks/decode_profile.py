"""Where a decode step's time goes: per batch size, the replayed step's wall time and the GPU kernels of one step.

Loads a checkpoint from disk (``benchmarks/make_checkpoint.py``) into our runtime, fills ``b`` slots with prompts
of ``--prompt-tokens`` tokens, then for each batch size prints

- the wall time of a decode step replayed as a CUDA graph (what serving runs), and the tokens/s it implies;
- the same step run eagerly under ``torch.profiler``: GPU time summed over its kernels, their count, and the kernels
  that take most of it, grouped by name (what to fuse or speed up next);
- a prefill of ``b`` prompts (eager, as the scheduler runs it), and the kernels of a prefill of one prompt.

    python benchmarks/make_checkpoint.py --shape 20b /dev/shm/m20
    python benchmarks/decode_profile.py --model /dev/shm/m20 --batch-sizes 1,16,64 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kernels(fn) -> tuple[float, int, list[tuple[str, float, int]]]:
    """(GPU ms summed over kernels, kernel count, [(name, ms, count)] by time) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    by_name: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    total, count = 0.0, 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            name = e.name[:90]
            by_name[name][0] += us / 1000
            by_name[name][1] += 1
            total += us / 1000
            count += 1
    top = sorted(((n, round(ms, 3), c) for n, (ms, c) in by_name.items()), key=lambda t: -t[1])
    return total, count, top


def measure(model, b: int, args, cuda: bool) -> dict:
    """One batch size's numbers (see the module docstring)."""
    from inference.engine.batch import Stepper
    from inference.engine.cache import SlotCache
    length = args.prompt_tokens + 3 * args.steps + 16
    cache = SlotCache(model, b, b * -(-length // 64), length)
    graphs, eager = Stepper(model, cache, ()), Stepper(model, cache, (), graphs=False)
    prompts = torch.randint(0, 199_000, (b, args.prompt_tokens)).tolist()

    def prefill(n: int):
        for s in range(n):
            cache.release(s)
            cache.allocate(s, length)
        return eager.prefill(list(range(n)), prompts[:n], [0] * n, [args.prompt_tokens] * n)

    prefill(b)                        # compiles
    prefill_ms = timed(lambda: prefill(b))
    prefill_one_ms = timed(lambda: prefill(1))    # one new prompt alone, as a server admits it
    pre_gpu_ms, pre_count, pre_top = kernels(lambda: prefill(1)) if cuda else (0.0, 0, [])
    tokens = prefill(b).argmax(-1).tolist()
    pages = cache.pages_for(length)

    def step(stepper):
        nonlocal tokens
        tokens = stepper.decode(tokens, [0] * b, pages).argmax(-1).tolist()

    for _ in range(3):                # eager, capture, first replay
        step(graphs)
    replay_ms = timed(lambda: [step(graphs) for _ in range(args.steps)]) / args.steps
    step(eager)                       # warm the eager path, then profile one step
    gpu_ms, count, top = kernels(lambda: step(eager)) if cuda else (0.0, 0, [])
    return dict(batch=b, replay_ms=round(replay_ms, 3), tokens_per_s=round(b * 1000 / replay_ms, 1),
                eager_kernel_ms=round(gpu_ms, 3), kernels=count, prefill_tokens=b * args.prompt_tokens,
                prefill_ms=round(prefill_ms, 1), prefill_one_ms=round(prefill_one_ms, 1),
                prefill_one_kernel_ms=round(pre_gpu_ms, 3), prefill_one_kernels=pre_count, top=top[:args.top],
                prefill_one_top=pre_top[:args.top])


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a gpt-oss checkpoint directory")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="replayed steps timed per batch size")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from inference.model import runtime
    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    model = runtime.load(args.model, torch.bfloat16 if cuda else torch.float32, args.device).eval()
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    for b in (int(b) for b in args.batch_sizes.split(",")):
        row = measure(model, b, args, cuda)
        results.append(row)
        print(f"batch {b}: replayed step {row['replay_ms']:.2f} ms ({row['tokens_per_s']} tokens/s); eager step: "
              f"{row['kernels']} kernels, {row['eager_kernel_ms']:.2f} ms of GPU time; prefill of {b} x "
              f"{args.prompt_tokens} tokens {row['prefill_ms']:.1f} ms, of one {row['prefill_one_ms']:.1f} ms "
              f"({row['prefill_one_kernels']} kernels, {row['prefill_one_kernel_ms']:.2f} ms of GPU time)", flush=True)
        for name, ms, c in row["top"]:
            print(f"   {ms:8.3f} ms  {c:5d}x  {name}")
        print("  prefill of one prompt, by kernel:")
        for name, ms, c in row["prefill_one_top"]:
            print(f"   {ms:8.3f} ms  {c:5d}x  {name}")
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        device = torch.cuda.get_device_name() if cuda else "cpu"
        args.json.write_text(json.dumps(dict(benchmark="decode_profile", model=str(args.model), device=device,
                                             results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
