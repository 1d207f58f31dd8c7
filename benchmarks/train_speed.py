"""LoRA training speed: our path (finetune.model.fastpath) vs transformers + PEFT at its best settings, same run,
same inputs.

One model with random weights and gpt-oss-20b's real shapes (transformers' own initialisation, std 0.02, so routing
spreads over the experts: the expert-load histogram is printed), LoRA r=16 on q/k/v/o and on the experts (PEFT
``target_parameters``), gradient checkpointing, AdamW on the LoRA parameters. For each sequence length every path
trains on the same token batches:

- **baseline**: transformers' ``grouped_mm`` experts, ``flex_attention``, PEFT's parametrized expert LoRA, the model's
  own loss (``labels=input_ids``), under bf16 autocast as the Trainer runs it with ``bf16=True``;
- **baseline+noamp**: the same without autocast, as ``shared/reference/hf_peft_baseline.py`` measured it;
- **ours**: ``finetune.model.fastpath`` (grouped expert LoRA, flash attention with sinks, selective checkpointing)
  and our chunked loss, as ``finetune.train.trainer`` runs it.

Printed and written to JSON: tokens/s (median step), model FLOP utilisation against a bf16 matmul rate measured at
the start, peak GPU memory, each path's implementation, ours against the fastest baseline variant, and the loss of
every path on one batch with the same weights (they must agree up to rounding).

    python benchmarks/train_speed.py --json $OUT/train_speed.json          # on the GPU (about 4 minutes on an H200)
    python benchmarks/train_speed.py --shape tiny --device cpu --seqs 64 --tokens 128 --steps 1 --warmup 1   # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, n=8192) -> float:
    """Measured dense bf16 matmul TFLOP/s on this device (the MFU denominator)."""
    if device.type != "cuda":
        n = 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def build(shape: str, layers: int | None, device, dtype):
    from transformers import GptOssConfig, GptOssForCausalLM
    if shape == "20b":
        from inference.model.configs import published
        d = published("20b")
        if layers:
            d["num_hidden_layers"], d["layer_types"] = layers, d["layer_types"][:layers]
        cfg = GptOssConfig.from_dict(d)
    else:
        from inference.model.tiny import tiny_config_dict
        d = tiny_config_dict()
        if layers:
            d["num_hidden_layers"] = layers
            d["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
        cfg = GptOssConfig.from_dict(d)
    torch.manual_seed(0)
    with torch.device(device):
        model = GptOssForCausalLM._from_config(cfg, dtype=dtype)   # transformers' _init_weights: std 0.02
    model.config.use_cache = False
    return model


def flops_per_token(cfg, seq: int) -> float:
    """Model FLOPs per trained token: matmuls 6N (forward, recomputed forward, input-gradient backward; frozen
    weights get no weight gradient) + attention scores and values (forward, recompute, 2x backward)."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * q + 2 * h * kv + q * h + cfg.num_experts_per_tok * 3 * h * cfg.intermediate_size
    n = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size
    attn = 0.0
    for kind in cfg.layer_types:
        keys = (seq + 1) / 2 if kind == "full_attention" else min(cfg.sliding_window, (seq + 1) / 2)
        attn += 2 * 2 * q * keys                       # QK^T and PV, 2 FLOPs per multiply-add
    return 6 * n + 4 * attn


def expert_histogram(model, ids) -> dict:
    """Share of routed (token, slot) rows per expert, over all layers, for one batch."""
    counts = []

    def hook(module, args, out):
        counts.append(torch.bincount(out[2].reshape(-1), minlength=module.num_experts).float().cpu())

    base = model.get_base_model()
    handles = [layer.mlp.router.register_forward_hook(hook) for layer in base.model.layers]
    with torch.no_grad():
        base.model(input_ids=ids[:1])
    for h in handles:
        h.remove()
    per_layer = torch.stack(counts)                           # (L, E)
    share = per_layer / per_layer.sum(-1, keepdim=True)
    total = per_layer.sum(0) / per_layer.sum()
    return {"share_all_layers": [round(x, 4) for x in total.tolist()],
            "min_share_any_layer": round(share.min().item(), 4), "max_share_any_layer": round(share.max().item(), 4),
            "experts_unused_any_layer": int((per_layer == 0).sum().item())}


def print_histogram(hist):
    share = hist["share_all_layers"]
    top = max(share)
    print(f"expert load (share of routed rows, all layers; uniform = {1 / len(share):.4f}):")
    for i, s in enumerate(share):
        print(f"  expert {i:>2} {s:.4f} " + "#" * round(40 * s / top))
    print(f"  per layer: min {hist['min_share_any_layer']:.4f}, max {hist['max_share_any_layer']:.4f}, "
          f"(layer, expert) pairs with no rows: {hist['experts_unused_any_layer']}")


def length_mix(n: int, longest: int, seed: int = 0) -> list[int]:
    """``n`` conversation lengths, log-normal around a 600-token median (sigma 0.9: a tenth under 190 tokens, a tenth
    over 1,900), clipped to [32, longest]: chat SFT data is mostly short with a long tail."""
    import math
    import random
    r = random.Random(seed)
    return [min(longest, max(32, round(r.lognormvariate(math.log(600), 0.9)))) for _ in range(n)]


def measure_packing(args, pm, opt, device, width: int, use) -> dict:
    """Our path on the same sequences, padded (batches of ``--tokens // width`` sequences, each padded to its
    longest, as the Trainer's collate pads) and packed (rows of ``width`` tokens, as many rows a step): real tokens
    per second over all steps after one warm-up step each."""
    from finetune.data.packing import plan
    from finetune.kernels.loss import weighted_loss_sum
    from finetune.model import fastpath
    from finetune.train.trainer import packed_inputs
    rows_per_step = max(1, args.tokens // width)
    lengths = length_mix(args.packing, width)
    gen = torch.Generator(device="cpu").manual_seed(7)
    seqs = [torch.randint(0, 199_000, (n,), generator=gen) for n in lengths]
    use("ours")

    def batches(packed: bool):
        groups = plan(lengths, width) if packed else [list(range(i, min(i + rows_per_step, len(seqs))))
                                                      for i in range(0, len(seqs), rows_per_step)]
        steps = [groups[i:i + rows_per_step] for i in range(0, len(groups), rows_per_step)] if packed \
            else [[g] for g in groups]
        for step in steps:
            rows = [torch.cat([seqs[i] for i in row]) for row in step] if packed else [seqs[i] for i in step[0]]
            longest = width if packed else max(len(r) for r in rows)
            ids = torch.zeros(len(rows), longest, dtype=torch.long)
            mask, weights = torch.zeros_like(ids), torch.zeros(len(rows), longest)
            for b, r in enumerate(rows):
                ids[b, :len(r)], mask[b, :len(r)], weights[b, 1:len(r)] = r, 1, 1.0
            extra = None
            if packed:
                extra = packed_inputs([[lengths[i] for i in row] for row in step], width)
                extra = {k: v.to(device) if torch.is_tensor(v) else v for k, v in extra.items()}
                for b, row in enumerate(step):     # no sequence's first token is predicted from the one before
                    start = 0
                    for i in row:
                        weights[b, start] = 0.0
                        start += lengths[i]
            yield ids.to(device), mask.to(device), weights.to(device), extra, sum(len(r) for r in rows)

    out = {"sequences": len(lengths), "width": width, "rows_per_step": rows_per_step,
           "real_tokens": sum(lengths), "median_length": sorted(lengths)[len(lengths) // 2]}
    for mode in ("padded", "packed"):
        work = list(batches(mode == "packed"))
        times, slots, real = [], 0, 0
        for i, (ids, mask, weights, extra, tokens) in enumerate(work):
            sync(device)
            t = time.perf_counter()
            with fastpath.autocast(pm):
                total, weight, _ = weighted_loss_sum(pm, ids, mask, weights, packed=extra)
            (total / weight).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if i:                                     # the first step warms up (kernel compilation)
                times.append(time.perf_counter() - t)
                slots += ids.numel()
                real += tokens
        out[mode] = {"steps": len(work), "real_tok_s": round(real / sum(times)) if times else None,
                     "slot_tok_s": round(slots / sum(times)) if times else None,
                     "real_share": round(real / slots, 3) if slots else None}
        print(f"  packing: {mode}: {out[mode]}", flush=True)
    if out["padded"]["real_tok_s"] and out["packed"]["real_tok_s"]:
        out["gain"] = round(out["packed"]["real_tok_s"] / out["padded"]["real_tok_s"], 2)
        print(f"  packing: packed / padded real tokens per second: {out['gain']}x", flush=True)
    return out


# Kernel-name markers of the work a step is made of (CUDA kernels; aten op names on the CPU). Matmuls are what MFU
# counts; everything else is what issue 21's item 3 asks to remove.
KINDS = (("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "aten::mm", "aten::addmm", "aten::bmm",
                     "grouped_mm")),
         ("attention", ("flash", "fmha", "attention")),
         ("fused (inductor/triton)", ("triton",)),
         ("copy/cast", ("copy", "cast", "convert", "to_copy", "contiguous")),
         ("index/sort/scatter", ("index", "gather", "scatter", "sort", "cumsum", "radix")))


def kernel_breakdown(prof, cuda: bool) -> dict:
    """Share of one profiled step's kernel time (self CUDA time; self CPU time of aten ops on the CPU) by kind, the
    number of kernels launched, and the ten largest entries outside matmul and attention."""
    from torch.autograd import DeviceType
    rows = []
    for evt in prof.key_averages():
        if cuda and evt.device_type != DeviceType.CUDA:
            continue
        if not cuda and not evt.key.startswith("aten::"):
            continue
        t = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if t > 0:
            rows.append((evt.key, evt.count, t))
    total = sum(t for _, _, t in rows) or 1.0

    def kind(name):
        low = name.lower()
        return next((k for k, marks in KINDS if any(m in low for m in marks)), "other elementwise/reduction")

    kinds = [kind(name) for name, _, _ in rows]
    shares: dict[str, float] = {}
    for k, (_, _, t) in zip(kinds, rows):
        shares[k] = shares.get(k, 0.0) + t
    rest = sorted((r for k, r in zip(kinds, rows) if k not in ("matmul", "attention")), key=lambda r: -r[2])[:10]
    return {"kernel_ms": round(total / 1e3, 1), "kernels_launched": sum(c for _, c, _ in rows),
            "share": {k: round(v / total, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "largest_outside_matmul_and_attention": [
                {"name": n[:120], "count": c, "ms": round(t / 1e3, 2)} for n, c, t in rest]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=("20b", "tiny"), default="20b")
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's own (24 for 20b)")
    ap.add_argument("--seqs", default="2048,4096,8192", help="comma-separated sequence lengths")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens // seq)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per path and length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--paths", default="ours,baseline,baseline+noamp",
                    help="ours, baseline (bf16 autocast, as the Trainer runs it), baseline+noamp (as the reference "
                         "script: fp32 LoRA matmuls), ours+keepN (N last layers not activation-checkpointed), "
                         "ours+recompute (plain full-layer checkpointing)")
    ap.add_argument("--profile", action="store_true",
                    help="print the top kernels of one step of ours and that step's kernel time by kind (matmul, "
                         "attention, fused, copies, indexing, other)")
    ap.add_argument("--packing", type=int, default=0, metavar="N",
                    help="then measure data.packing on ours: N sequences of a realistic length mix (log-normal, "
                         "median 600 tokens, at most the first --seqs length), padded batches against packed rows "
                         "of the same tokens, real (not padding) tokens per second")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model

    from finetune.kernels.loss import weighted_loss_sum
    from finetune.model import fastpath

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "rank": args.rank, "tokens_per_step": args.tokens,
           "runs": []}
    import peft
    import transformers
    res["transformers"], res["peft"] = transformers.__version__, peft.__version__

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    rate = matmul_rate(device)   # TFLOP/s; kept unrounded for the MFU (a loaded 2-core CPU measures ~0.05)
    res["matmul_tflops"] = round(rate, 1) if rate >= 1 else round(rate, 4)
    print(f"{res['device']}: measured dense matmul {res['matmul_tflops']} TFLOP/s "
          f"({'bf16 8192^3' if cuda else 'fp32 1024^3'})", flush=True)

    model = build(args.shape, args.layers, device, dtype)
    cfg = model.config
    res["layers"] = cfg.num_hidden_layers
    res["weights_GiB"] = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30, 1)
    model.enable_input_require_grads()
    pm = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():   # PEFT starts B at 0; a trained-looking adapter makes both LoRA paths do real work
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    params = [p for p in pm.parameters() if p.requires_grad]
    res["lora_trainable_M"] = round(sum(p.numel() for p in params) / 1e6, 1)
    opt = torch.optim.AdamW(params, lr=1e-5)
    pm.train()
    print(f"{cfg.num_hidden_layers} layers, {res['weights_GiB']} GiB of weights, "
          f"{res['lora_trainable_M']}M LoRA parameters (r={args.rank})", flush=True)

    baseline_attn = "flex_attention" if cuda else "eager"   # flex with sinks is CUDA-only
    baseline_experts = "grouped_mm" if cuda else "eager"

    def loss_of(path, ids):
        if path.startswith("baseline"):
            # "baseline": as transformers' Trainer runs it with bf16=True (accelerate's bf16 autocast around the
            # forward); "baseline+noamp": as shared/reference/hf_peft_baseline.py did (PEFT's fp32 LoRA weights,
            # activations cast up to them)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and "+noamp" not in path else nullcontext()
            with amp:
                return pm(input_ids=ids, labels=ids).loss
        with fastpath.autocast(pm):   # as finetune.train.trainer runs it
            total, weight, _ = weighted_loss_sum(pm, ids, torch.ones_like(ids), torch.ones_like(ids))
        return total / weight

    def use(path):
        fastpath.disable(pm)
        if path.startswith("baseline"):
            model.set_attn_implementation(baseline_attn)
            model.set_experts_implementation(baseline_experts)
        else:
            save = set(fastpath.SAVE_DEFAULT)
            for part in path.split("+")[1:]:        # ours+save-projections, ours+nosave-attention, ...
                if part.startswith("save-"):
                    save.add(part[5:])
                elif part.startswith("nosave-"):
                    save.discard(part[7:])
            fastpath.enable(pm, save=frozenset() if "+recompute" in path else frozenset(save))
        fastpath.enable_checkpointing(pm)   # as the Trainer installs it: the path's policy, or plain for the baseline
        fastpath.keep_activations(pm, int(path.split("+keep")[1]) if "+keep" in path else 0)

    for seq in [int(s) for s in args.seqs.split(",")]:
        batch = max(1, args.tokens // seq)
        gen = torch.Generator(device="cpu").manual_seed(seq)
        batches = [torch.randint(0, 199_000, (batch, seq), generator=gen).to(device)
                   for _ in range(args.warmup + args.steps)]
        if seq == int(args.seqs.split(",")[0]):
            res["expert_load"] = expert_histogram(pm, batches[0])
            print_histogram(res["expert_load"])
        row = {"batch": batch, "seq": seq}
        for path in args.paths.split(","):
            use(path)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times, first_loss = [], None
            try:
                for i, ids in enumerate(batches):
                    sync(device)
                    t = time.perf_counter()
                    loss = loss_of(path, ids)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sync(device)
                    times.append(time.perf_counter() - t)
                    if i == 0:
                        first_loss = loss.detach().item()
                step = statistics.median(times[args.warmup:])
                tps = batch * seq / step
                row[path] = {"tok_s": round(tps), "step_s": round(step, 3),
                             "mfu": round(tps * flops_per_token(cfg, seq) / (rate * 1e12), 3),
                             "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
                             "first_loss": round(first_loss, 4)}
            except torch.OutOfMemoryError as exc:
                row[path] = {"error": f"out of memory: {str(exc)[:160]}"}
                opt.zero_grad(set_to_none=True)
            # each path continues from the adapter the previous one trained; equal-weight losses are compared below
            row[path]["implementation"] = f"{model.config._attn_implementation} attention, " \
                                          f"{model.config._experts_implementation} experts"
            print(f"  {path:>8} {batch} x {seq}: {row[path]}", flush=True)
        # the ratio is against the best baseline variant measured at this length
        bases = [p for p in row if isinstance(row[p], dict) and p.startswith("baseline") and "tok_s" in row[p]]
        if bases:
            row["best_baseline"] = max(bases, key=lambda p: row[p]["tok_s"])
        for path in [p for p in row if p.startswith("ours")]:
            if "tok_s" in row[path] and bases:
                key = "ratio" + path[4:]
                row[key] = round(row[path]["tok_s"] / row[row["best_baseline"]]["tok_s"], 2)
                print(f"  {path} / {row['best_baseline']} at {batch} x {seq}: {row[key]}x", flush=True)
        res["runs"].append(row)
        save()

    # Same weights, same batch, both paths: the losses must agree (bf16 rounding apart).
    ids = torch.randint(0, 199_000, (1, min(2048, int(args.seqs.split(",")[0]))), generator=g).to(device)
    with torch.no_grad():
        losses = {}
        for path in args.paths.split(","):
            use(path)
            losses[path] = round(float(loss_of(path, ids)), 5)
    res["same_weights_loss"] = losses
    print(f"loss on one batch, same weights: {losses}", flush=True)

    if args.packing:
        res["packing"] = measure_packing(args, pm, opt, device, int(args.seqs.split(",")[0]), use)
        save()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        use("ours")
        ids = batches[0]
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                     record_shapes=True) as prof:
            loss_of("ours", ids).backward()
            opt.zero_grad(set_to_none=True)
            sync(device)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
        shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=30,
                                                                    max_name_column_width=40)
        print(table)
        print(shapes)
        res["profile"] = table + "\n" + shapes
        res["profile_breakdown"] = kernel_breakdown(prof, cuda)
        print(f"kernel time of one step by kind: {json.dumps(res['profile_breakdown'], indent=1)}", flush=True)
    save()

    print("\n(baseline: the fastest transformers + PEFT variant measured at that length)")
    print("| batch x seq | baseline tok/s | ours tok/s | ours / baseline | MFU base / ours | peak GiB base / ours |")
    print("|---|---|---|---|---|---|")
    for row in res["runs"]:
        b, o = row.get(row.get("best_baseline", "baseline"), {}), row.get("ours", {})
        print(f"| {row['batch']} x {row['seq']} | {b.get('tok_s', '-')} | {o.get('tok_s', '-')} | "
              f"{row.get('ratio', '-')} | {b.get('mfu', '-')} / {o.get('mfu', '-')} | "
              f"{b.get('peak_GiB', '-')} / {o.get('peak_GiB', '-')} |")


if __name__ == "__main__":
    main()
