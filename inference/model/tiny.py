"""The embedded default model: a tiny gpt-oss built locally from a seed, in exactly the HF layout of gpt-oss-20b.

``tiny-gpt-oss`` has the real architecture (sliding + full attention with sinks, a top-k routed MoE with MXFP4
experts, YaRN rotary) and the real o200k_harmony tokenizer and vocabulary (201,088 ids), with toy widths. Same seed,
same files, byte for byte. It is built on first use into a cache folder; :func:`resolve_model` turns a recipe's
``model.name_or_path`` into a directory.

The weights are random but scaled so that a small LoRA can visibly learn on CPU in a minute: the output layer's rows
are long enough that a hidden state aligned with one row can give that token most of the probability mass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from inference.errors import UserError

TINY_NAME = "tiny-gpt-oss"
TINY_SEED = 0
BUILDER_VERSION = "2"  # bump when the builder's output changes, so caches rebuild


def tiny_config_dict() -> dict:
    """config.json of the tiny model: gpt-oss-20b's architecture with toy widths."""
    from inference.model.tokenizer import VOCAB_SIZE
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "experts_per_token": 2,
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 4096,
        "initial_context_length": 4096,
        "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                            "truncate": False, "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
        "attention_bias": True,
        "attention_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "swiglu_limit": 7.0,
        "router_aux_loss_coef": 0.9,
        "output_router_logits": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 199998,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "dtype": "bfloat16",
        # Written by transformers >= 5 conventions; without it transformers 5.17 misreads the tokenizer as an old
        # Mistral one and warns about its (correct) split pattern.
        "transformers_version": "5.0.0",
    }


def tiny_state_dict(config: dict, seed: int = TINY_SEED) -> dict[str, torch.Tensor]:
    """Seeded random weights with transformers' names and layouts (experts ``(E, in, out)``), float32."""
    g = torch.Generator().manual_seed(seed)
    H, I, E = config["hidden_size"], config["intermediate_size"], config["num_local_experts"]
    V, D = config["vocab_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    state = {"model.embed_tokens.weight": normal(V, H, std=1.0),
             # rows of norm ~1.5 * sqrt(H)/sqrt(H): logits start near uniform, yet can be driven far apart
             "lm_head.weight": normal(V, H, std=0.12),
             "model.norm.weight": torch.ones(H)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": torch.ones(H),
            p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": normal(nq * D, H, std=H ** -0.5),
            p + "self_attn.q_proj.bias": torch.zeros(nq * D),
            p + "self_attn.k_proj.weight": normal(nkv * D, H, std=H ** -0.5),
            p + "self_attn.k_proj.bias": torch.zeros(nkv * D),
            p + "self_attn.v_proj.weight": normal(nkv * D, H, std=H ** -0.5),
            p + "self_attn.v_proj.bias": torch.zeros(nkv * D),
            p + "self_attn.o_proj.weight": normal(H, nq * D, std=(nq * D) ** -0.5),
            p + "self_attn.o_proj.bias": torch.zeros(H),
            p + "self_attn.sinks": normal(nq, std=0.5),
            p + "mlp.router.weight": normal(E, H, std=H ** -0.5),
            p + "mlp.router.bias": torch.zeros(E),
            p + "mlp.experts.gate_up_proj": normal(E, H, 2 * I, std=H ** -0.5),
            p + "mlp.experts.gate_up_proj_bias": torch.zeros(E, 2 * I),
            p + "mlp.experts.down_proj": normal(E, I, H, std=I ** -0.5),
            p + "mlp.experts.down_proj_bias": torch.zeros(E, H),
        }
    return state


def generation_config_dict() -> dict:
    return {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999,
            "do_sample": False, "transformers_version": "5.0.0"}


def build_tiny(target: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the complete tiny gpt-oss directory to ``target`` (atomically: built aside, then renamed)."""
    from inference.model.checkpoint import built_aside, save_checkpoint
    from inference.model.tokenizer import write_tokenizer
    target = Path(target)
    config = tiny_config_dict()
    with built_aside(target, ".tiny-") as work:
        save_checkpoint(tiny_state_dict(config, seed), config, work)
        write_tokenizer(work, config["max_position_embeddings"])
        (work / "generation_config.json").write_text(
            json.dumps(generation_config_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (work / "README.md").write_text(
            f"# {TINY_NAME} (seed {seed})\n\nA tiny random gpt-oss for tests and demos, built locally by "
            "`inference.model.tiny.build_tiny`. Not a trained model.\n", encoding="utf-8")
    return target


def models_cache_dir() -> Path:
    from inference.cache import cache_root
    return cache_root() / "models"


def tiny_path(seed: int = TINY_SEED) -> Path:
    """Where the tiny model lives once built (built on first call)."""
    from inference.cache import locked
    target = models_cache_dir() / f"{TINY_NAME}-seed{seed}-v{BUILDER_VERSION}"
    if not _built(target):
        with locked(target.parent / f".{target.name}.lock"):   # another process may be building it right now
            if not _built(target):
                build_tiny(target, seed)
    return target


def _built(target: Path) -> bool:
    return (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()


def resolve_model(name_or_path: str) -> Path:
    """A recipe's ``model.name_or_path`` -> a local HF-layout directory.

    ``tiny-gpt-oss`` (or ``tiny-gpt-oss@SEED``) is built locally; an existing directory is used as is; anything else
    is treated as a hub id and taken from the local hub cache (downloaded only if the user's hub access allows it).
    """
    if name_or_path == TINY_NAME or name_or_path.startswith(TINY_NAME + "@"):
        seed = int(name_or_path.split("@", 1)[1]) if "@" in name_or_path else TINY_SEED
        return tiny_path(seed)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") != 1:
        raise UserError(f"model not found: {name_or_path} (not a directory, not an embedded model name "
                        f"like {TINY_NAME!r}, not a hub id like 'openai/gpt-oss-20b')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except Exception as exc:
        raise UserError(f"model not found: {name_or_path} is not a local directory and the hub copy is not "
                        f"available offline ({type(exc).__name__})") from None


def file_digest(model_dir: Path) -> str:
    """sha256 over the files of a model directory (names and bytes), for determinism checks and lineage."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(model_dir)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
