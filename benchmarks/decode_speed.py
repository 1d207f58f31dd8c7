"""Decode speed: our runtime (MXFP4 experts packed, KV cache) vs transformers' ``generate``, same model, same run.

Both decode greedily the same number of new tokens (stop tokens ignored) after prompts of the same length, for each
of ``--batch-sizes`` (transformers: one ``generate`` call on the batch; ours: that many requests submitted together
to the continuous-batching scheduler); the script prints the total tokens/s of each and the ratio. The model is
the embedded tiny gpt-oss (default) or, with ``--shape 20b``, random weights with gpt-oss-20b's real dimensions
(``--layers`` of them, to fit the time); transformers then holds the experts dequantized in the compute dtype, which
is what it does without the hub's MXFP4 kernels.

    python benchmarks/decode_speed.py                       # tiny model, CPU
    python benchmarks/decode_speed.py --device cuda --shape 20b --layers 4
    python benchmarks/decode_speed.py --device cuda --shape 20b --layers 24 --batch-sizes 1,16,64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def build(args, dtype, device):
    """(transformers model, our runtime) holding the same weights."""
    from inference.model import checkpoint, mxfp4, runtime
    from inference.model.configs import published
    from inference.model.tiny import resolve_model
    if args.shape == "tiny":
        model_dir = resolve_model("tiny-gpt-oss")
        return checkpoint.load_model(model_dir, dtype, device), runtime.load(model_dir, dtype, device)
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = published("20b")       # openai/gpt-oss-20b's config, cut to --layers layers
    cfg["num_hidden_layers"], cfg["layer_types"] = args.layers, cfg["layer_types"][:args.layers]
    del cfg["quantization_config"]   # the weights below are built dense, then packed by hand
    config = GptOssConfig.from_dict(cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # built in the compute dtype: an fp32 copy of 24 dense layers would not fit 80 GB
    try:
        with torch.device(device):
            hf = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.02)
    tensors = {}
    for key, value in hf.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.pack(value.transpose(1, 2))        # (E, in, out) -> rows = out
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
        else:
            tensors[key] = value
    return hf.eval(), runtime.GptOss(config, tensors, dtype, device).eval()


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--shape", choices=("tiny", "20b"), default="tiny")
    ap.add_argument("--layers", type=int, default=4, help="layers of the 20b-shaped model")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1", help="comma-separated numbers of sequences decoded together")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    from inference.engine.scheduler import Scheduler
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    hf, ours = build(args, dtype, device)
    n, length = args.new_tokens, args.prompt_tokens + args.new_tokens
    sched = Scheduler(ours, (), max_seqs=max(sizes), pages=max(sizes) * -(-length // 64), max_len=length)
    name = "tiny gpt-oss" if args.shape == "tiny" else f"gpt-oss-20b shapes, {args.layers} layers, random weights"
    print(f"decode, {name}, {device.type} {str(dtype).removeprefix('torch.')}, prompts of {args.prompt_tokens} tokens, "
          f"{n} new tokens each, best of {args.repeats}")
    rows = []
    for size in sizes:
        prompts = torch.randint(0, 199_000, (size, args.prompt_tokens))
        ids = prompts.to(device)

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=199999)
            assert out.shape[1] == ids.shape[1] + n

        def run_ours():
            requests = sched.submit_many([(p, n, frozenset()) for p in prompts.tolist()])
            assert all(len(list(r.tokens())) == n for r in requests)

        for fn in (run_hf, run_ours):   # warm-up: allocator, kernels, CUDA graphs, lazy imports
            fn()
        t_hf = min(timed(run_hf, device) for _ in range(args.repeats))
        t_ours = min(timed(run_ours, device) for _ in range(args.repeats))
        row = dict(batch=size, transformers_tokens_per_s=round(size * n / t_hf, 1),
                   ours_tokens_per_s=round(size * n / t_ours, 1), ratio=round(t_hf / t_ours, 2))
        rows.append(row)
        print(f"  batch {size:3d}: transformers generate {row['transformers_tokens_per_s']:9.1f} tokens/s | "
              f"inference runtime {row['ours_tokens_per_s']:9.1f} tokens/s | ratio {row['ratio']:.2f}x", flush=True)
    held = dict(ours_mib=round(ours.nbytes() / 2**20), transformers_mib=round(
        sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**20))
    print(f"  weights held: ours {held['ours_mib']} MiB, transformers {held['transformers_mib']} MiB")
    if args.json:
        args.json.write_text(json.dumps(dict(
            benchmark="decode_speed", shape=args.shape, layers=args.layers if args.shape == "20b" else None,
            device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            dtype=str(dtype).removeprefix("torch."), prompt_tokens=args.prompt_tokens, new_tokens=n,
            repeats=args.repeats, results=rows, weights_held=held), indent=1) + "\n")


if __name__ == "__main__":
    main()
