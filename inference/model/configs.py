"""The published ``config.json`` of openai/gpt-oss-20b and openai/gpt-oss-120b: facts this project carries, so that
a run can be planned (``python -m finetune estimate``) and real-shape checkpoints written
(``benchmarks/make_checkpoint.py``) without the weights and without a download.

The two files differ only in depth (24 vs 36 layers) and width of the expert layer (32 vs 128 experts); everything
else, the MXFP4 ``quantization_config`` included, is the same. :func:`published` returns a fresh copy each time.
"""

from __future__ import annotations

import copy

_LAYER_KINDS = ("sliding_attention", "full_attention")   # gpt-oss alternates, starting with a sliding layer
# The experts in MXFP4, everything else in bf16: what every gpt-oss checkpoint says (the ones we write too)
QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}


def _config(layers: int, experts: int) -> dict:
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002,
        "experts_per_token": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "layer_types": [_LAYER_KINDS[i % 2] for i in range(layers)],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": 64,
        "num_experts_per_tok": 4,
        "num_hidden_layers": layers,
        "num_key_value_heads": 8,
        "num_local_experts": experts,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "quantization_config": QUANTIZATION_CONFIG,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": 201088,
    }


PUBLISHED = {"openai/gpt-oss-20b": _config(24, 32), "openai/gpt-oss-120b": _config(36, 128)}
SHAPES = {"20b": "openai/gpt-oss-20b", "120b": "openai/gpt-oss-120b"}   # short names the benchmarks take


def published(name: str) -> dict | None:
    """The published config.json of ``name`` (a hub id such as ``openai/gpt-oss-20b``, or ``20b``/``120b``) as a
    dict, or None when this project does not carry it."""
    found = PUBLISHED.get(SHAPES.get(name, name))
    return copy.deepcopy(found) if found is not None else None


def published_config(name: str):
    """:func:`published` as transformers' ``GptOssConfig`` (None when not carried)."""
    found = published(name)
    if found is None:
        return None
    from transformers import GptOssConfig
    return GptOssConfig.from_dict(found)
