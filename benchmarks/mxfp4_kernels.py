"""The decode step's expert matmul, kernel by kernel: each MXFP4 kernel variant at gpt-oss shapes, checked and timed.

For each projection of a gpt-oss-20b (or 120b) expert layer and each number of tokens in a step (each token routed to
``k`` distinct experts at random), every variant is first checked against the exact product (float64 on the GPU,
expert by expert) within the bound the GPU tests use (fp32 accumulation of exact bf16 products, one rounding to
bf16), then timed with ``triton.testing.do_bench`` (median). Printed: microseconds, the bandwidth the routed experts'
bytes imply, and which variant is fastest per row. Variants: the kernels in ``inference.model.kernels`` (``matvec``
for a few pairs, ``grouped``, and ``scaled`` on ``tl.dot_scaled`` over a grid of tiles).

    python benchmarks/mxfp4_kernels.py --shape 20b --json out.json
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


def variants(tokens: int) -> list[tuple[str, dict]]:
    out = [("grouped", {})]
    if tokens * 4 <= 32:
        out.append(("matvec", {}))
    for block_n, block_k, warps, stages in ((32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (64, 128, 4, 4),
                                            (64, 256, 4, 3), (64, 256, 8, 3), (128, 128, 4, 3), (128, 128, 8, 3),
                                            (128, 256, 4, 3), (128, 256, 8, 3)):
        out.append((f"scaled swap n{block_n} k{block_k} w{warps} s{stages}",
                    dict(tile=(block_n, block_k, warps, stages, True))))
    for block_n, warps in ((64, 4), (128, 8)):
        out.append((f"scaled x-w n{block_n} k128 w{warps} s3", dict(tile=(block_n, 128, warps, 3, False))))
    out.append(("scaled swap n64 k128 w4 s3 emulated", dict(tile=(64, 128, 4, 3, True), emulate=True)))
    return out


def fastest(results: list[dict], variants) -> list:
    """A ``kernels.TILES`` table: per measured number of tokens (the last row standing for up to the kernel's
    maximum), the correct variant with the least time summed over both projections."""
    from inference.model import kernels
    table = []
    counts = sorted({r["tokens"] for r in results})
    for i, tokens in enumerate(counts):
        rows = [r for r in results if r["tokens"] == tokens]
        total: dict[str, float] = {}
        for name, opts in variants(tokens):
            runs = [r["variants"].get(name, {}) for r in rows]
            if not opts.get("emulate") and all(v.get("ok") for v in runs):
                total[name] = sum(v["us"] for v in runs)
        best = min(total, key=total.get)
        opts = dict(variants(tokens))[best]
        entry = [best] if best in ("grouped", "matvec") else ["scaled", *opts["tile"]]
        bound = kernels.GROUPED_MAX_TOKENS if i == len(counts) - 1 else tokens
        table.append([bound, *entry])
    return table


def run(name: str, opts: dict, x, blocks, scales, experts, tokens, rows):
    from inference.model import kernels
    if name == "grouped":
        return kernels.mxfp4_grouped(x, blocks, scales, experts, tokens, rows)
    if name == "matvec":
        return kernels.mxfp4_matvec(x, blocks, scales, experts)
    return kernels.mxfp4_scaled(x, blocks, scales, experts, tokens, rows, **opts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="20b", choices=("20b", "120b"))
    ap.add_argument("--tokens", default="1,4,16,64,256,1024")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tiles", type=Path, help="write the fastest correct kernel per number of tokens here, as a "
                    "table inference.model.kernels reads from $GPT_OSS_MXFP4_TILES")
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
        experts = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(tokens)]).flatten()
        active = experts.unique().numel()
        for proj, (N, K) in shapes.items():
            blocks, scales = weights[proj]
            x = (torch.randn(tokens * k, K, device="cuda", generator=g)).to(torch.bfloat16)
            exact = exact_products(x, blocks, scales, experts)
            bound = K * EPS32 * exact_products(x, blocks, scales, experts, absolute=True) \
                + torch.finfo(torch.bfloat16).eps * exact.abs()
            rows = kernels.expert_rows_reference(experts, E, tokens)
            moved = active * N * K // 2 * (1 + 1 / 16) + x.numel() * 2 + tokens * k * N * 2   # bytes at least
            row = dict(tokens=tokens, proj=proj, active_experts=active, bytes=int(moved), variants={})
            for name, opts in variants(tokens):
                try:
                    out = run(name, opts, x, blocks, scales, experts, tokens, rows).double()
                    ratio = ((out - exact).abs() / bound).max().item()
                    us = triton.testing.do_bench(lambda: run(name, opts, x, blocks, scales, experts, tokens, rows),
                                                 warmup=20, rep=80, return_mode="median") * 1000
                    row["variants"][name] = dict(us=round(us, 1), GBps=round(moved / us / 1000, 1),
                                                 error_over_bound=round(ratio, 3), ok=ratio <= 1)
                except Exception as exc:   # noqa: BLE001 - a variant that does not compile is reported, not fatal
                    row["variants"][name] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
            ok = {n: v for n, v in row["variants"].items() if v.get("ok")}
            best = min(ok, key=lambda n: ok[n]["us"]) if ok else None
            row["best"] = best
            results.append(row)
            base = row["variants"]["grouped"].get("us")
            print(f"tokens {tokens:4d} {proj:8s} experts {active:3d}: grouped {base} us; best {best} "
                  f"{ok[best]['us'] if best else '-'} us ({ok[best]['GBps'] if best else '-'} GB/s)", flush=True)
            bad = [n for n, v in row["variants"].items() if not v.get("ok")]
            if bad:
                print("   not ok: " + "; ".join(f"{n}: {row['variants'][n]}" for n in bad)[:1500], flush=True)
    table = fastest(results, variants)
    print("fastest per step size: " + "; ".join(f"<= {row[0]} tokens: {' '.join(map(str, row[1:]))}" for row in table))
    if args.tiles:
        args.tiles.write_text(json.dumps(table) + "\n")
    if args.json:
        args.json.write_text(json.dumps(dict(benchmark="mxfp4_kernels", shape=args.shape, tiles=table,
                                             device=torch.cuda.get_device_name(), results=results), indent=1) + "\n")


if __name__ == "__main__":
    main()
