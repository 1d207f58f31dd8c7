"""QLoRA on MXFP4 experts: measured peak GPU memory and tokens/s next to ``python -m finetune estimate``'s prediction.

A model with gpt-oss-20b's or gpt-oss-120b's real shapes is built with random weights: the experts directly in the
packed MXFP4 layout (random e2m1 codes, scales around 2^-7 so values have the usual ~0.02 spread; no bf16 copy ever
exists), everything else in bf16 (std 0.02). Training runs as ``finetune`` runs a recipe with ``quantization: mxfp4``:
PEFT LoRA on q/k/v/o and both expert projections, gradient checkpointing, ``finetune.model.fastpath`` (experts decoded
piecewise inside the expert matmuls, forward and backward), the chunked loss, the recipe's optimizer, the input
embedding in host memory when the recipe says so. Every token of every row carries loss (the most logits work).

For each ``batch x seq`` it prints and writes to JSON: the measured peak (``torch.cuda.max_memory_allocated`` over
the steps, weights included; reserved memory beside it), median tokens/s, and the estimator's peak and its error.
``--longest`` then grows the sequence (batch 1) until the measured peak passes ``--budget-gib``.

    python benchmarks/qlora_memory.py --shape 20b --longest --json qlora-20b.json          # on the GPU
    python benchmarks/qlora_memory.py --shape 120b --runs 1x2048,1x8192 --json qlora-120b.json
    python benchmarks/qlora_memory.py --shape tiny --device cpu --runs 1x64 --steps 1 --warmup 1 --optimizer adamw_torch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # before CUDA starts: less slack

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def config_for(shape: str):
    """tiny: the embedded model's config; 20b, 120b: the published ones (:mod:`inference.model.configs`)."""
    from transformers import GptOssConfig
    if shape == "tiny":
        from inference.model.tiny import tiny_config_dict
        return GptOssConfig.from_dict(tiny_config_dict())
    from inference.model.configs import published_config
    return published_config(shape)


def build_packed(cfg, device: torch.device, dtype: torch.dtype, host_embedding: bool, seed: int = 0):
    """``GptOssForCausalLM`` with random weights, experts as packed :class:`Mxfp4Weight` made directly on ``device``."""
    from transformers import GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from finetune.kernels.packed import Mxfp4Weight
    from finetune.model.lora import HostEmbedding
    from inference.model.mxfp4 import GROUP

    with torch.device("meta"):
        model = GptOssForCausalLM(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        where = torch.device("cpu") if host_embedding and name == "model.embed_tokens.weight" else device
        if ".experts." in name and name.endswith(("gate_up_proj", "down_proj")):
            experts, k, n = p.shape                                                        # (E, in, out)
            blocks = torch.randint(0, 256, (experts, n, k // GROUP, GROUP // 2), dtype=torch.uint8, device=device,
                                   generator=gen)
            scales = torch.randint(119, 122, (experts, n, k // GROUP), dtype=torch.uint8, device=device, generator=gen)
            state[name] = Mxfp4Weight(blocks, scales, dtype)
        elif "norm" in name:
            state[name] = torch.ones(p.shape, dtype=dtype, device=where)
        elif name.endswith("bias") or name.endswith("sinks"):
            state[name] = torch.zeros(p.shape, dtype=dtype, device=where)
        else:
            g = gen if where == device else None
            state[name] = (torch.randn(p.shape, dtype=dtype, device=where, generator=g) * 0.02)
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.device(device):
        model.model.rotary_emb = GptOssRotaryEmbedding(cfg)
    if host_embedding:
        model.model.embed_tokens = HostEmbedding(model.model.embed_tokens)
    model.config.use_cache = False
    return model


def recipe_for(args, batch: int, seq: int, offload: bool = False, tile: int = 0, host_head: bool = False):
    from finetune.recipe import load_recipe
    root = Path(__file__).resolve().parent.parent
    return load_recipe(root / "recipes" / "gpt-oss-20b-lora.yaml", [
        "model.device=cuda" if args.device == "cuda" else "model.device=cpu", f"model.quantization={args.quantization}",
        f"model.embedding={args.embedding}", f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}",
        f"train.batch_size={batch}", f"data.max_length={seq}", f"train.optimizer={args.optimizer}",
        "train.gradient_checkpointing=true", f"train.offload_activations={str(offload).lower()}",
        f"train.mlp_tile_tokens={tile}", "train.kernels=fast", f"model.lm_head={'cpu' if host_head else 'gpu'}"])


def parse_run(spec: str) -> dict:
    """``BATCHxSEQ[:o][:h][:tN][:wN][:s]``: o offloads the layer inputs, h keeps the output layer in host memory
    (model.lm_head=cpu), tN tiles the MoE blocks by N tokens, wN overrides
    --warmup for this run (e.g. w0 for the longest sequences once the kernels are compiled), s records the allocator
    in its last step and prints what is live at the peak (CUDA)."""
    size, *flags = spec.split(":")
    batch, seq = (int(x) for x in size.split("x"))
    run = {"batch": batch, "seq": seq, "offload": False, "tile": 0, "warmup": None, "snapshot": False,
           "host_head": False}
    for flag in flags:
        if flag in ("o", "s", "h"):
            run[{"o": "offload", "s": "snapshot", "h": "host_head"}[flag]] = True
        elif flag[:1] in ("t", "w") and flag[1:].isdigit():
            run["tile" if flag[0] == "t" else "warmup"] = int(flag[1:])
        else:
            raise SystemExit(f"--runs: unknown flag {flag!r} in {spec!r} (o, h, s, tN, wN)")
    return run


def live_at_peak(snapshot: dict, top: int = 30) -> list[dict]:
    """Replay the allocator trace of ``torch.cuda.memory._snapshot()`` to its highest point and group the blocks live
    there by where they were allocated (the innermost frames in finetune, transformers, peft or torch.utils): what
    the peak is made of, beyond what was allocated before recording started."""
    events = [e for e in snapshot["device_traces"][0] if e["action"] in ("alloc", "free_completed")]
    total = best = best_at = 0
    live = {}
    for i, e in enumerate(events):                   # pass 1: where the peak is
        total += e["size"] if e["action"] == "alloc" else -e["size"]
        if total > best:
            best, best_at = total, i
    for e in events[:best_at + 1]:                   # pass 2: what is live there
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)

    def where(e):
        frames = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in e.get("frames", [])
                  if any(k in f["filename"] for k in ("finetune/", "transformers/", "peft/", "torch/utils/",
                                                      "torch/_functorch", "qlora_memory", "torchinductor"))][:3]
        # backward allocations have no Python frames: their size (a multiple of the sequence) says what they are
        return " < ".join(frames) or f"no Python frame, {e['size'] / 2**20:.1f} MiB blocks"

    groups = {"peak reached in": {"where": "peak reached in: " + where(events[best_at]), "MiB": 0.0, "blocks": 0}}
    for e in live.values():
        key = where(e)
        g = groups.setdefault(key, {"where": key, "MiB": 0.0, "blocks": 0})
        g["MiB"] += e["size"] / 2**20
        g["blocks"] += 1
    rows = [groups.pop("peak reached in")] + sorted(groups.values(), key=lambda g: -g["MiB"])[:top]
    for g in rows:
        g["MiB"] = round(g["MiB"], 1)
    return [{"where": "total above the start of recording", "MiB": round(best / 2**20, 1), "blocks": len(live)}] + rows


def make_optimizer(params, name: str):
    if name == "adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=1e-5)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=("20b", "120b", "tiny"), default="20b")
    ap.add_argument("--runs", default="1x2048,2x2048,4x2048,1x8192",
                    help="comma-separated BATCHxSEQ[:o][:h][:tN][:wN][:s] (o: train.offload_activations, h: "
                         "model.lm_head=cpu, tN: train.mlp_tile_tokens=N, wN: N warm-up steps for this run, s: what "
                         "is live at its peak)")
    ap.add_argument("--levers", default="", help="o, h, tN or several (o:h:t8192) for the --longest probes")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--quantization", default="mxfp4", choices=("mxfp4", "nf4"))
    ap.add_argument("--optimizer", default="adamw_8bit", choices=("adamw_torch", "adamw_8bit", "sgd"))
    ap.add_argument("--embedding", default="cpu", choices=("auto", "gpu", "cpu"))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--longest", action="store_true", help="then grow seq at batch 1 until past --budget-gib")
    ap.add_argument("--budget-gib", default="14,14.9", help="comma-separated GiB budgets for --longest (14.9 GiB: a "
                    "16 GB card)")
    ap.add_argument("--decode-budget-mib", type=int, default=None,
                    help="fix finetune.kernels.experts.DECODE_BUDGET_BYTES (MiB; default: adaptive)")
    ap.add_argument("--profile", action="store_true", help="print the top GPU kernels of one step of the first run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from finetune.estimate import estimate
    from finetune.kernels import attention
    from finetune.kernels.loss import QUANTIZED_CHUNK_ROWS, weighted_loss_sum
    from finetune.model import fastpath
    from finetune.model.lora import add_lora, is_quantized

    if args.decode_budget_mib:
        from finetune.kernels import experts as moe
        moe.DECODE_BUDGET_BYTES = args.decode_budget_mib * 2**20
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = config_for(args.shape)
    first = [int(x) for x in args.runs.split(",")[0].split(":")[0].split("x")]
    plan = estimate(recipe_for(args, *first), cfg, device=device.type)
    host_embedding = cuda and plan.embedding == "cpu"
    from finetune.kernels import experts as moe
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "decode_budget": "adaptive (finetune.kernels.experts.decode_budget)" if moe.DECODE_BUDGET_BYTES is None
           else f"{moe.DECODE_BUDGET_BYTES // 2**20} MiB",
           "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "rank": args.rank,
           "quantization": args.quantization, "optimizer": args.optimizer,
           "embedding": "cpu" if host_embedding else "gpu",
           # steps above this many tokens run the attention backward per key/value head (None: never)
           "whole_backward_tokens": attention.WHOLE_BACKWARD_TOKENS, "runs": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    t0 = time.perf_counter()
    model = build_packed(cfg, device, dtype, host_embedding)
    if args.quantization == "nf4":
        from finetune.model.quantize import quantize_attention_nf4
        quantize_attention_nf4(model, compute_dtype=dtype)
    model.enable_input_require_grads()
    pm, coverage = add_lora(model, recipe_for(args, *first))
    assert is_quantized(pm)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():   # PEFT starts B at 0; a trained-looking adapter makes the LoRA paths do real work
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = make_optimizer(params, args.optimizer)
    levers = {}

    def use_levers(offload: bool, tile: int):
        """Our path with these levers, checkpointing installed as the Trainer installs it."""
        if levers == {"offload": offload, "tile": tile}:
            return
        fastpath.disable(pm)
        fastpath.enable(pm, mlp_tile=tile)
        fastpath.enable_checkpointing(pm, offload=offload)
        levers.update(offload=offload, tile=tile)

    use_levers(False, 0)
    heads = {"gpu": pm.get_base_model().lm_head}

    def use_head(host: bool):
        """The output layer on the device, or in host memory as model.lm_head=cpu keeps it (off the device)."""
        from finetune.model.lora import HostLMHead
        base, resident = pm.get_base_model(), heads["gpu"]
        if host and not isinstance(base.lm_head, HostLMHead):
            resident.to("cpu")
            if "cpu" not in heads:                # one pinned copy, made once
                heads["cpu"] = HostLMHead(resident)
            base.lm_head = heads["cpu"]
        elif not host and isinstance(base.lm_head, HostLMHead):
            base.lm_head = resident.to(device)

    pm.train()
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["lora_trainable_M"] = round(coverage["trainable"] / 1e6, 1)
    res["weights_on_gpu_GiB"] = round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None
    print(f"{res['device']}: gpt-oss-{args.shape} shapes, {cfg.num_hidden_layers} layers x {cfg.num_local_experts} "
          f"experts, {res['weights_on_gpu_GiB']} GiB on the GPU after building (embedding {res['embedding']}), "
          f"{res['lora_trainable_M']}M LoRA parameters (r={args.rank}), {args.optimizer}", flush=True)

    def step(ids):
        with fastpath.autocast(pm):
            total, weight, _ = weighted_loss_sum(pm, ids, torch.ones_like(ids), torch.ones_like(ids),
                                                 QUANTIZED_CHUNK_ROWS)
            loss = total / weight
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def measure(batch: int, seq: int, steps: int, warmup: int, offload: bool = False, tile: int = 0,
                snapshot: bool = False, host_head: bool = False) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(seq * 10 + batch)
        row = {"batch": batch, "seq": seq, "offload": offload, "mlp_tile_tokens": tile,
               "lm_head": "cpu" if host_head else "gpu"}
        use_levers(offload, tile)
        use_head(host_head)
        est = estimate(recipe_for(args, batch, seq, offload, tile, host_head), cfg, device=device.type)
        row["estimate_GiB"] = round(est.peak_bytes / 2**30, 2)
        row["estimate"] = {k: round(v / 2**30, 3) for k, v in est.gpu.items()}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        try:
            for i in range(warmup + steps):
                ids = torch.randint(0, cfg.vocab_size - 1000, (batch, seq), generator=gen).to(device)
                if cuda:
                    torch.cuda.synchronize()
                record = snapshot and i == warmup + steps - 1
                if record:
                    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
                t = time.perf_counter()
                loss = step(ids)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                if record:
                    try:
                        row["live_at_peak"] = live_at_peak(torch.cuda.memory._snapshot())
                    except Exception as exc:   # a diagnostic: never lose the run's numbers to it
                        row["live_at_peak"] = [{"where": f"snapshot analysis failed: {exc!r}", "MiB": 0, "blocks": 0}]
                    torch.cuda.memory._record_memory_history(enabled=None)
                row.setdefault("first_loss", round(float(loss), 4))
        except torch.OutOfMemoryError as exc:
            opt.zero_grad(set_to_none=True)
            row["error"] = f"out of memory: {str(exc)[:160]}"
            return row
        if steps:
            row["step_s"] = round(statistics.median(times[warmup:]), 3)
            row["tok_s"] = round(batch * seq / row["step_s"])
        import resource
        row["host_max_rss_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # so far
        if cuda:
            row["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            row["estimate_error"] = round(row["estimate_GiB"] / row["peak_GiB"] - 1, 3)
        return row

    for spec in args.runs.split(","):
        run = parse_run(spec)
        batch, seq = run["batch"], run["seq"]
        row = measure(batch, seq, args.steps, args.warmup if run["warmup"] is None else run["warmup"],
                      run["offload"], run["tile"], snapshot=run["snapshot"] and cuda, host_head=run["host_head"])
        res["runs"].append(row)
        shown = {k: v for k, v in row.items() if k not in ("estimate", "live_at_peak")}
        print(f"  {batch} x {seq}: {json.dumps(shown)}", flush=True)
        for g in row.get("live_at_peak", []):
            print(f"    {g['MiB']:>10.1f} MiB {g['blocks']:>5}  {g['where']}", flush=True)
        save()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size - 1000, (first[0], first[1]), generator=gen).to(device)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step(ids)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        res["profile"] = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
        res["profile_cpu"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40,
                                                       max_name_column_width=60)
        print(res["profile"], flush=True)
        save()

    if args.longest:
        budgets = [float(b) for b in args.budget_gib.split(",")]
        probes = []
        probe_levers = parse_run("1x1" + (":" + args.levers if args.levers else ""))
        for seq in (2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072):
            row = measure(1, seq, 0, 1, probe_levers["offload"], probe_levers["tile"],
                          host_head=probe_levers["host_head"])
            probes.append(row)
            print(f"  probe 1 x {seq}: {json.dumps({k: v for k, v in row.items() if k != 'estimate'})}", flush=True)
            if "error" in row or row.get("peak_GiB", 0) > max(budgets):
                break
        res["longest_probe"] = probes
        res["longest_seq_within_budget"] = {
            str(b): max([p["seq"] for p in probes if "error" not in p and p.get("peak_GiB", 1e9) <= b], default=None)
            for b in budgets}
        print(f"longest sequence (batch 1) within each budget (GiB): {res['longest_seq_within_budget']}", flush=True)
        save()

    print("\n| batch x seq | levers | peak GiB (reserved) | estimate GiB (error) | tokens/s |")
    print("|---|---|---|---|---|")
    for row in res["runs"]:
        lever = "+".join((["offload"] if row["offload"] else []) +
                         (["host lm_head"] if row.get("lm_head") == "cpu" else []) +
                         ([f"tiles of {row['mlp_tile_tokens']}"] if row["mlp_tile_tokens"] else [])) or "-"
        print(f"| {row['batch']} x {row['seq']} | {lever} | {row.get('peak_GiB', '-')} "
              f"({row.get('reserved_GiB', '-')}) | "
              f"{row['estimate_GiB']} ({row.get('estimate_error', '-')}) | {row.get('tok_s', row.get('error'))} |")
    save()


if __name__ == "__main__":
    main()
