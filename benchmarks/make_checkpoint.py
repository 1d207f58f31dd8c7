"""A gpt-oss checkpoint with real shapes on disk, in the exact layout OpenAI ships, for measuring real-scale paths.

``python benchmarks/make_checkpoint.py --shape 20b OUT`` writes what ``openai/gpt-oss-20b`` holds, with random
weights: ``config.json`` (gpt-oss-20b's or -120b's architecture, ``quantization_config`` mxfp4), sharded
``model-0000N-of-0000M.safetensors`` (at most ``--shard-gib`` each) + ``model.safetensors.index.json``, the experts
as MXFP4 ``*_blocks``/``*_scales``, everything else bf16, ``generation_config.json`` and the real o200k_harmony
tokenizer. Every real-scale measurement (run, export, eval, serve) starts from such a directory, never from a model
built in memory.

The weights have a realistic spread: every matrix is drawn N(0, 0.02^2) (experts too, then quantized to MXFP4 with
the OCP scale rule, so the decoded experts keep that spread), biases N(0, 0.02^2), norms 1, attention sinks N(0, 1).
They are made on the GPU when there is one (the 20b in well under a minute), one layer at a time; host memory holds
one shard at most. The directory is built beside ``OUT`` and renamed into place when complete.

    python benchmarks/make_checkpoint.py --shape 20b /tmp/gpt-oss-20b-random        # ~13 GB
    python benchmarks/make_checkpoint.py --shape tiny --shard-gib 0.05 /tmp/tiny-sharded   # CPU smoke, 4 shards
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STD = 0.02                 # weight spread, as gpt-oss's initializer_range
MARKER = "RANDOM_WEIGHTS.md"   # what says a directory is one of ours (so --force may replace it)

def config_dict(shape: str) -> dict:
    """config.json for ``shape`` (20b, 120b or tiny), without its quantization_config: for 20b and 120b the
    published file of openai/gpt-oss-20b or -120b (:mod:`inference.model.configs`), for tiny the embedded model's."""
    from inference.model.configs import published
    from inference.model.tiny import tiny_config_dict
    if shape == "tiny":
        return tiny_config_dict()
    cfg = published(shape)
    del cfg["quantization_config"]
    return cfg


def layer_tensors(cfg: dict, i: int, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Layer ``i``'s tensors in the checkpoint layout (experts packed, rows = output features), on the CPU."""
    from inference.model import mxfp4
    H, I, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    D, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def normal(*shape, std=STD):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std

    p = f"model.layers.{i}."
    dense = {
        "input_layernorm.weight": torch.ones(H, device=device),
        "post_attention_layernorm.weight": torch.ones(H, device=device),
        "self_attn.q_proj.weight": normal(nq * D, H), "self_attn.q_proj.bias": normal(nq * D),
        "self_attn.k_proj.weight": normal(nkv * D, H), "self_attn.k_proj.bias": normal(nkv * D),
        "self_attn.v_proj.weight": normal(nkv * D, H), "self_attn.v_proj.bias": normal(nkv * D),
        "self_attn.o_proj.weight": normal(H, nq * D), "self_attn.o_proj.bias": normal(H),
        "self_attn.sinks": normal(nq, std=1.0),
        "mlp.router.weight": normal(E, H), "mlp.router.bias": normal(E),
        "mlp.experts.gate_up_proj_bias": normal(E, 2 * I), "mlp.experts.down_proj_bias": normal(E, H),
    }
    out = {p + k: v.to(torch.bfloat16).cpu() for k, v in dense.items()}
    for name, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):   # (E, out, in), one expert at a time
        parts = [mxfp4.pack(normal(rows, cols)) for _ in range(E)]
        out[p + f"mlp.experts.{name}_blocks"] = torch.stack([b for b, _ in parts]).cpu()   # (E, out, in/32, 16)
        out[p + f"mlp.experts.{name}_scales"] = torch.stack([s for _, s in parts]).cpu()   # (E, out, in/32)
    return out


def write(shape: str, out: Path, shard_bytes: int, device: torch.device, seed: int = 0, force: bool = False,
          echo=print) -> dict:
    """Write the checkpoint to ``out``; returns what was measured (seconds, bytes, peak host and GPU memory)."""
    from tqdm.auto import tqdm

    from inference.model.checkpoint import ShardWriter, built_aside, make_readable
    from inference.model.configs import QUANTIZATION_CONFIG
    from inference.model.tiny import generation_config_dict
    from inference.model.tokenizer import write_tokenizer

    out = out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (force and (out / MARKER).is_file()):
            raise SystemExit(f"error: {out} exists and is not empty (--force replaces a directory this script wrote)")
    cfg = config_dict(shape)
    started = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with built_aside(out, f".{out.name}.partial-") as work:
        shards = ShardWriter(work, shard_bytes)
        V, H = cfg["vocab_size"], cfg["hidden_size"]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            shards.add(name, (torch.randn(V, H, generator=gen, device=device) * STD).to(torch.bfloat16).cpu())
        shards.add("model.norm.weight", torch.ones(H, dtype=torch.bfloat16))
        for i in tqdm(range(cfg["num_hidden_layers"]), desc=f"writing gpt-oss-{shape}", unit="layer"):
            for name, tensor in layer_tensors(cfg, i, gen, device).items():
                shards.add(name, tensor)
        files = shards.finish()
        config = cfg | {"quantization_config": QUANTIZATION_CONFIG}
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (work / "generation_config.json").write_text(
            json.dumps(generation_config_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_tokenizer(work, cfg["max_position_embeddings"])
        (work / MARKER).write_text(
            f"# gpt-oss-{shape} shapes, random weights (seed {seed})\n\nWritten by `benchmarks/make_checkpoint.py` "
            "for measuring speed and memory. Not a trained model.\n", encoding="utf-8")
        make_readable(work)   # mkdtemp and safetensors create owner-only files
    result = {
        "shape": shape, "out": str(out), "device": str(device), "seconds": round(time.time() - started, 1),
        "bytes": sum(f.stat().st_size for f in out.iterdir()), "shards": len(files),
        "peak_host_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),   # KiB on Linux
        "peak_gpu_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    echo(f"wrote {out}: {result['bytes'] / 1e9:.2f} GB in {result['shards']} shard(s), {result['seconds']} s "
         f"on {device}; peak host RSS {result['peak_host_rss_GiB']} GiB"
         + (f", peak GPU {result['peak_gpu_GiB']} GiB" if result["peak_gpu_GiB"] is not None else ""))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the directory to write (must not exist, or be empty)")
    ap.add_argument("--shape", choices=("20b", "120b", "tiny"), default="20b")
    ap.add_argument("--shard-gib", type=float, default=4.0, help="the most one safetensors shard holds (default 4)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace OUT if this script wrote it")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args()
    if not args.shard_gib > 0:
        raise SystemExit("error: --shard-gib must be positive")
    result = write(args.shape, args.out, int(args.shard_gib * 2**30), torch.device(args.device), args.seed,
                   args.force)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
