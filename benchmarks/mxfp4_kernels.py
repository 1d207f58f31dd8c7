"""The decode step's expert matmul, kernel by kernel: each MXFP4 kernel of the runtime at gpt-oss shapes, checked and
timed.

For each projection of a gpt-oss-20b (or 120b) expert layer and each number of tokens in a step (each token routed to
``k`` distinct experts at random), every kernel is first checked against the exact product (float64 on the GPU,
expert by expert) within the bound the GPU tests use (fp32 accumulation of exact bf16 products, one rounding to
bf16), then timed with ``triton.testing.do_bench`` (median). Printed: microseconds and the bandwidth the routed
experts' bytes imply (the floor is those bytes at the card's memory speed: about 3 TB/s on an H100). Kernels:
``grouped`` (``inference.model.kernels.mxfp4_grouped``, what a step of several tokens runs) and ``matvec``
(``mxfp4_matvec``, one token), the latter also with ``fast`` (``matvec_fast``: the bf16 decode the runtime uses when
a weight's scales fit, ``kernels.scales_fit_bf16``; the random weights here do).

    python benchmarks/mxfp4_kernels.py --shape 20b --json out.json
    python benchmarks/mxfp4_kernels.py --tokens 16,64 --sweep --routing skewed --json out.json   # tiles compared

``--sweep`` also times the grouped kernel's candidate tiles (:func:`sweep_tiles`) and prints the fastest correct
ones; ``--routing skewed`` draws experts with weights 1 / (e + 1), as a trained router's uneven load.

``benchmarks/results/mxfp4_kernels-20b-h100-2026-12-07.json`` also holds ``tl.dot_scaled`` variants, measured with
this script at commit 0de6428 and since removed, and ``...-h200-2026-12-07-fast-decode.json`` a ``grouped_fast``
variant, measured at commit 8181e93 and since removed (see the comments in ``mxfp4_grouped``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPS32 = torch.finfo(torch.float32).eps


def exact_products(x: torch.Tensor, blocks, scales, experts: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """``W[experts[i]] @ x[i]`` in float64, one expert decoded at a time (``absolute``: |W| @ |x|, for the bound)."""
    from inference.model import mxfp4
    out = torch.zeros(x.shape[0], blocks.shape[1], dtype=torch.float64, device=x.device)
    for e in experts.unique().tolist():
        rows = (experts == e).nonzero()[:, 0]
        b = blocks[e:e + 1] & 0x77 if absolute else blocks[e:e + 1]
        w = mxfp4.unpack(b, scales[e:e + 1], torch.float64)[0]                            # (N, K)
        xs = x[rows].double().abs() if absolute else x[rows].double()
        out[rows] = xs @ w.T
    return out


def variants(tokens: int, sweep: bool) -> dict[str, tuple | None]:
    """name -> grouped tile (None: the kernel's own choice, or not the grouped kernel)."""
    names = dict.fromkeys(["grouped", "matvec", "matvec_fast"] if tokens * 4 <= 32 else ["grouped"])
    if sweep and tokens > 1:
        for tile in sweep_tiles(tokens):
            names[tile_name(tile)] = tile
    return names


def sweep_tiles(tokens: int) -> list[tuple]:
    """Tiles of ``kernels.mxfp4_grouped`` to try for a step of ``tokens`` tokens: rows per block (16 and the
    kernel's own), per-group scaling or per-weight, output/input block, warps, pipeline stages, weights as the
    left operand (swap), even/odd values as two dots (deint)."""
    from inference.model import kernels
    own = kernels.grouped_tile(tokens)[0]
    tiles = []
    for block_m in sorted({16, own}):
        for block_n in (64, 128):
            for swap in (False, True):
                tiles.append((block_m, True, block_n, 32, 4, 3, swap, False))
        for block_n, block_k, warps in ((64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8), (64, 256, 8)):
            for swap in (False, True):
                for deint in (False, True):
                    tiles.append((block_m, False, block_n, block_k, warps, 3, swap, deint))
        # narrow output blocks with long input steps: more programs (E x N/32) and more bytes in flight per step,
        # for the few rows per expert of a decode step, where the kernel reads at a fifth of HBM's bandwidth
        for block_n, block_k, warps, stages in ((32, 256, 4, 3), (32, 512, 4, 3), (64, 256, 8, 4)):
            for swap in (False, True):
                tiles.append((block_m, False, block_n, block_k, warps, stages, swap, False))
    return tiles


def tile_name(tile: tuple) -> str:
    m, per_group, n, k, w, s, swap, deint = tile
    return (f"m{m} {'group' if per_group else 'weight'} n{n} k{k} w{w} s{s}" + (" swap" if swap else "")
            + (" deint" if deint else ""))


def run(name: str, tile, x, blocks, scales, experts, tokens, rows):
    from inference.model import kernels
    if name.startswith("matvec"):
        return kernels.mxfp4_matvec(x, blocks, scales, experts, fast=name == "matvec_fast")
    return kernels.mxfp4_grouped(x, blocks, scales, experts, tokens, rows, tile=tile)


def route(tokens: int, E: int, k: int, routing: str, g: torch.Generator) -> torch.Tensor:
    """``(tokens * k,)`` expert numbers, k distinct per token: ``uniform``, or ``skewed`` (expert e drawn with
    weight 1 / (e + 1), so a few experts take many rows, as trained routers do)."""
    if routing == "uniform":
        return torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(tokens)]).flatten()
    weights = 1.0 / torch.arange(1, E + 1, device="cuda", dtype=torch.float32)
    return torch.multinomial(weights.expand(tokens, E), k, replacement=False, generator=g).flatten()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="20b", choices=("20b", "120b"))
    ap.add_argument("--tokens", default="1,4,16,64,256,1024")
    ap.add_argument("--routing", default="uniform", choices=("uniform", "skewed"))
    ap.add_argument("--sweep", action="store_true", help="also time sweep_tiles()'s tiles of the grouped kernel")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import triton.testing

    from inference.model import kernels
    from inference.model.configs import published
    cfg = published(args.shape)
    E, H, I, k = (cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"],
                  cfg["num_experts_per_tok"])
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"gate_up": (2 * I, H), "down": (H, I)}
    weights = {}
    for proj, (N, K) in shapes.items():
        # random codes, scales around 2^-7 (decoded std ~0.02, as benchmarks/make_checkpoint.py writes)
        blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8, device="cuda", generator=g)
        scales = torch.randint(118, 123, (E, N, K // 32), dtype=torch.uint8, device="cuda", generator=g)
        weights[proj] = (blocks, scales)
    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        experts = route(tokens, E, k, args.routing, g)
        active = experts.unique().numel()
        for proj, (N, K) in shapes.items():
            blocks, scales = weights[proj]
            x = (torch.randn(tokens * k, K, device="cuda", generator=g)).to(torch.bfloat16)
            exact = exact_products(x, blocks, scales, experts)
            bound = K * EPS32 * exact_products(x, blocks, scales, experts, absolute=True) \
                + torch.finfo(torch.bfloat16).eps * exact.abs()
            rows = kernels.expert_rows(experts, E, tokens)
            moved = active * N * K // 2 * (1 + 1 / 16) + x.numel() * 2 + tokens * k * N * 2   # bytes at least
            row = dict(tokens=tokens, proj=proj, active_experts=active, bytes=int(moved), variants={})
            for name, tile in variants(tokens, args.sweep).items():
                try:
                    out = run(name, tile, x, blocks, scales, experts, tokens, rows).double()
                except Exception as e:          # a tile the compiler refuses (e.g. out of shared memory)
                    row["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
                    continue
                ratio = ((out - exact).abs() / bound).max().item()
                us = triton.testing.do_bench(lambda: run(name, tile, x, blocks, scales, experts, tokens, rows),
                                             warmup=20, rep=80, return_mode="median") * 1000
                row["variants"][name] = dict(us=round(us, 1), GBps=round(moved / us / 1000, 1),
                                             error_over_bound=round(ratio, 3), ok=ratio <= 1)
            ok = {n: v for n, v in row["variants"].items() if v.get("ok")}
            best = min(ok, key=lambda n: ok[n]["us"]) if ok else None
            row["best"] = best
            results.append(row)
            base = row["variants"]["grouped"]["us"]
            print(f"tokens {tokens:4d} {proj:8s} experts {active:3d}: grouped {base} us; best {best} "
                  f"{ok[best]['us'] if best else '-'} us ({ok[best]['GBps'] if best else '-'} GB/s)", flush=True)
            if args.sweep:
                top = sorted(ok, key=lambda n: ok[n]["us"])[:5]
                print("   fastest: " + "; ".join(f"{n} {ok[n]['us']} us" for n in top), flush=True)
            bad = [n for n, v in row["variants"].items() if not v.get("ok")]
            if bad:
                print("   not ok: " + "; ".join(f"{n}: {row['variants'][n]}" for n in bad)[:1500], flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(benchmark="mxfp4_kernels", shape=args.shape, routing=args.routing,
                                             device=torch.cuda.get_device_name(), results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
