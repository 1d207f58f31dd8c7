"""Tests for the tiny gpt-oss builder (inference.model.tiny) and the checkpoint reader/writer
(inference.model.checkpoint).

Oracles: transformers' own gpt-oss loader with its MXFP4 dequantizer (``Mxfp4Config(dequantize=True)``) for what a
checkpoint means, and an independent vectorized MX quantizer (written here from the OCP MX rules) for what the writer
must have stored for the seeded weights.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_fp32_close, float64
from safetensors import safe_open

from inference.errors import UserError
from inference.model.checkpoint import load_model, load_state_dict, read_config, save_checkpoint
from inference.model.tiny import build_tiny, file_digest, tiny_config_dict, tiny_state_dict

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
LAYER_KEYS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
    "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "self_attn.sinks", "mlp.router.weight", "mlp.router.bias",
    "mlp.experts.gate_up_proj_blocks", "mlp.experts.gate_up_proj_scales", "mlp.experts.gate_up_proj_bias",
    "mlp.experts.down_proj_blocks", "mlp.experts.down_proj_scales", "mlp.experts.down_proj_bias",
)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def ref_mx_dequantize(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 quantize-dequantize along the last dim, from the rules: scale 2**(floor(log2 amax) - 2) per group of 32,
    nearest e2m1 value with ties to the even code, saturation at 6. Brute force over the 8 magnitudes, float64."""
    g = x.detach().to(torch.float64).reshape(*x.shape[:-1], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    exp = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)))) - 2
    scale = torch.pow(2.0, exp)
    y = g.abs() / scale
    grid = torch.tensor(E2M1, dtype=torch.float64)
    dist = (y.unsqueeze(-1) - grid).abs()
    cand = dist == dist.amin(-1, keepdim=True)
    even = torch.tensor([True, False] * 4)
    pick = torch.where((cand & even).any(-1), (cand & even).to(torch.int8).argmax(-1), cand.to(torch.int8).argmax(-1))
    q = torch.copysign(grid[pick] * scale, g)
    return q.reshape(x.shape).to(torch.float32)


def hf_oracle(model_dir):
    from transformers import GptOssForCausalLM, Mxfp4Config
    return GptOssForCausalLM.from_pretrained(str(model_dir), quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=torch.float32, attn_implementation="eager").eval()


def linked_copy(src: Path, dst: Path, config_edit=None) -> Path:
    """A model dir sharing the (large) safetensors file, with an optionally edited config.json."""
    dst.mkdir(parents=True)
    os.symlink(src / "model.safetensors", dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        cfg.update(config_edit)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ---------------------------------------------------------------------------------------------------- builder

def test_builder_is_deterministic(tiny_model_dir, tmp_path):
    again = build_tiny(tmp_path / "a", seed=0)
    names = sorted(p.name for p in Path(tiny_model_dir).iterdir())
    assert sorted(p.name for p in again.iterdir()) == names
    for name in names:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert file_digest(again) == file_digest(tiny_model_dir)
    assert not [p for p in tmp_path.iterdir() if p.name != "a"], "the builder left its work folder behind"


@pytest.fixture(scope="module")
def seeded0():
    return tiny_state_dict(tiny_config_dict(), 0)


def test_seed_changes_weights(seeded0):
    a, b = seeded0, tiny_state_dict(tiny_config_dict(), 1)
    assert a.keys() == b.keys()
    random_keys = [k for k in a if a[k].std() > 0]
    assert "model.embed_tokens.weight" in random_keys and "model.layers.0.mlp.experts.down_proj" in random_keys
    assert all(not torch.equal(a[k], b[k]) for k in random_keys)


def test_layout_like_gpt_oss_20b(tiny_model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (tiny_model_dir / name).is_file(), name
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss"
    assert cfg["architectures"] == ["GptOssForCausalLM"]
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert cfg["vocab_size"] == 201088
    H, I, E, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["num_hidden_layers"]
    nq, nkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    assert len(cfg["layer_types"]) == L
    assert set(cfg["layer_types"]) == {"sliding_attention", "full_attention"}

    tensors = read_safetensors(tiny_model_dir / "model.safetensors")
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{k}" for i in range(L) for k in LAYER_KEYS}
    assert set(tensors) == expected
    assert not [k for k in tensors if k.endswith(("gate_up_proj", "down_proj"))]
    for i in range(L):
        p = f"model.layers.{i}.mlp.experts."
        shapes = {"gate_up_proj_blocks": (E, 2 * I, H // 32, 16), "gate_up_proj_scales": (E, 2 * I, H // 32),
                  "down_proj_blocks": (E, H, I // 32, 16), "down_proj_scales": (E, H, I // 32),
                  "gate_up_proj_bias": (E, 2 * I), "down_proj_bias": (E, H)}
        for name, shape in shapes.items():
            assert tuple(tensors[p + name].shape) == shape, name
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
            assert tensors[p + name].dtype == torch.uint8
        assert tuple(tensors[f"model.layers.{i}.self_attn.sinks"].shape) == (nq,)
        assert tuple(tensors[f"model.layers.{i}.self_attn.k_proj.weight"].shape) == (nkv * D, H)
    for k, t in tensors.items():
        if not k.endswith(("_blocks", "_scales")):
            assert t.dtype == torch.bfloat16, k
    assert tuple(tensors["model.embed_tokens.weight"].shape) == (201088, H)
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert 200002 in gen["eos_token_id"] and 200012 in gen["eos_token_id"]     # <|return|> and <|call|>


def test_written_weights_are_the_seeded_weights(tiny_model_dir, seeded0):
    """The writer stored the seeded weights: bf16 for the dense ones, MXFP4 (per the MX rules) for the experts."""
    seeded = seeded0
    loaded = load_state_dict(tiny_model_dir)
    assert loaded.keys() == seeded.keys()
    for k, v in seeded.items():
        if k.endswith(("gate_up_proj", "down_proj")):
            # (E, in, out): MX groups of 32 run along the input features (the on-disk rows are output features)
            want = ref_mx_dequantize(v.transpose(1, 2)).transpose(1, 2)
        else:
            want = v.to(torch.bfloat16).to(torch.float32)
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], want), k


# ----------------------------------------------------------------------------------------------- loader vs transformers

def test_load_model_matches_transformers(tiny_model_dir, tiny_model):
    ref = hf_oracle(tiny_model_dir)
    ours = tiny_model.state_dict()
    theirs = ref.state_dict()
    assert ours.keys() == theirs.keys()
    experts = [k for k in ours if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 2 * tiny_model.config.num_hidden_layers
    for k in ours:
        assert theirs[k].dtype == torch.float32, k
        assert ours[k].shape == theirs[k].shape, k
        assert torch.equal(ours[k], theirs[k]), k
    assert not tiny_model.training
    assert type(tiny_model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"

    g = torch.Generator().manual_seed(0)
    sequences = [torch.tensor([[200006, 1428, 200008, 12194, 200007]]),     # a few Harmony-looking ids
                 torch.randint(0, 199998, (2, 17), generator=g),
                 torch.randint(0, 201088, (1, 100), generator=g)]           # longer than the sliding window (64)
    exact = float64(copy.deepcopy(ref))   # the same weights in float64: how far fp32 rounding takes the logits
    with torch.no_grad():
        for ids in sequences:
            a = tiny_model(input_ids=ids).logits
            b = ref(input_ids=ids).logits
            assert a.shape == (*ids.shape, 201088)
            assert torch.isfinite(a).all()
            assert_fp32_close(a, b, exact(input_ids=ids).logits, f"logits of {tuple(ids.shape)} ids")


# ---------------------------------------------------------------------------------------------------- loader errors

def user_error(path) -> str:
    with pytest.raises(UserError) as info:
        load_model(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_directory(tmp_path):
    msg = user_error(tmp_path / "nope")
    assert "not found" in msg and "nope" in msg


def test_directory_without_config(tmp_path):
    msg = user_error(tmp_path)
    assert "config.json" in msg


def test_wrong_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    msg = user_error(tmp_path)
    assert "llama" in msg and "gpt_oss" in msg
    with pytest.raises(UserError):
        read_config(tmp_path)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    msg = user_error(tmp_path)
    assert "config.json" in msg and "JSON" in msg


def test_no_weights(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    msg = user_error(tmp_path)
    assert "safetensors" in msg


@pytest.mark.parametrize("edit", [{"hidden_size": 256}, {"intermediate_size": 64}, {"num_local_experts": 8}])
def test_weights_that_do_not_match_config(tiny_model_dir, tmp_path, edit):
    model_dir = linked_copy(tiny_model_dir, tmp_path / "m", edit)
    msg = user_error(model_dir)
    assert "do not match" in msg
    assert str(model_dir) in msg


# ---------------------------------------------------------------------------------------------------- writer round trip

def test_save_checkpoint_round_trip(tiny_model_dir, tiny_model, tmp_path):
    state = tiny_model.state_dict()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    out = tmp_path / "saved"
    save_checkpoint(state, config, out)
    assert json.loads((out / "config.json").read_text()) == config
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # decoded experts are on the MXFP4 grid and dense weights came from bf16: re-writing reproduces the file
    written = read_safetensors(out / "model.safetensors")
    original = read_safetensors(tiny_model_dir / "model.safetensors")
    assert written.keys() == original.keys()
    for k in original:
        assert written[k].dtype == original[k].dtype and torch.equal(written[k], original[k]), k
    reloaded = load_model(out).state_dict()
    assert reloaded.keys() == state.keys()
    for k in state:
        assert torch.equal(reloaded[k], state[k]), k
