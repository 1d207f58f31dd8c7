"""Tests for finetune.model.quantize: NF4 attention projections (QLoRA-style) on the tiny gpt-oss, CPU.

Oracles: bitsandbytes for NF4 itself (its ``dequantize_4bit`` of the very weights we quantized), transformers'
eager gpt-oss for everything else (a copy of the model whose attention linears hold those dequantized weights must
give the same logits). PEFT must then put its own bnb 4-bit LoRA layer on the quantized projections, train them and
save an adapter indistinguishable (by keys) from one trained on the unquantized model.
"""

from __future__ import annotations

import copy
import gc
import sys
import weakref

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from conftest import FP32_MARGIN, float64
from safetensors import safe_open
from torch import nn

from finetune.model.lora import add_lora
from finetune.model.quantize import attention_projections, nf4_bytes, quantize_attention_nf4
from finetune.recipe import load_recipe
from inference.errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    """The tiny gpt-oss in fp32, loaded once for this module: tests work on deep copies."""
    from inference.model.checkpoint import load_model
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def recipe(repo_root):
    return load_recipe(repo_root / "recipes" / "tiny-cpu.yaml")


def fresh(base, dtype: torch.dtype = torch.float32):
    return copy.deepcopy(base).to(dtype)


def expected_names(model) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}" for i in range(model.config.num_hidden_layers) for p in PROJECTIONS]


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(seed))  # (B, T)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids).logits  # (B, T, V)
    return out if out.dtype == torch.float64 else out.float()


class ComputeLinear(nn.Linear):
    """The oracle's projection: an ``nn.Linear`` holding a dequantized weight, multiplying in ``compute_dtype`` the way
    ``Linear4bit`` does (input cast in, weight cast to the input's dtype, result cast back)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__(weight.shape[1], weight.shape[0], device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)   # (out, in)
        self.bias = nn.Parameter(bias, requires_grad=False)       # (out,)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(self.compute_dtype)
        return nn.functional.linear(y, self.weight.to(self.compute_dtype), self.bias.to(self.compute_dtype)).to(x.dtype)


def dequantized_oracle(base, quantized, names: list[str], dtype: torch.dtype, compute_dtype: torch.dtype):
    """A copy of the unquantized model whose attention linears hold bitsandbytes' dequantization of ``quantized``'s."""
    oracle = fresh(base, dtype)
    for name in names:
        layer = quantized.get_submodule(name)
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in), the original dtype
        parent, _, child = name.rpartition(".")
        setattr(oracle.get_submodule(parent), child, ComputeLinear(weight, layer.bias.detach(), compute_dtype))
    return oracle


# (model dtype, compute dtype): fp32 as on CPU by default, bf16 as on a GPU, and the mixed case.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype,compute_dtype", DTYPES, ids=["fp32", "bf16", "fp32-compute-bf16"])
def test_forward_matches_bitsandbytes_dequantization(base, dtype, compute_dtype):
    model = fresh(base, dtype)
    names = quantize_attention_nf4(model, compute_dtype)
    oracle = dequantized_oracle(base, model, names, dtype, compute_dtype)
    ids = token_ids()
    got, want, unquantized = logits(model, ids), logits(oracle, ids), logits(fresh(base, dtype), ids)
    # bitsandbytes and the oracle round the same maths in `dtype` / `compute_dtype` (in whatever order their kernels
    # sum): FP32_MARGIN times the oracle's measured distance from itself in float64 on the same dequantized weights
    exact = logits(float64(dequantized_oracle(base, model, names, torch.float64, torch.float64)), ids)
    tol = FP32_MARGIN * max((want - exact).abs().max().item(), torch.finfo(dtype).eps * exact.abs().max().item())
    assert (got - want).abs().max() <= tol
    for name in names:  # an eval forward left the standard layout (bnb's AVX512-BF16 CPU repacking is off)
        assert not getattr(model.get_submodule(name).weight.quant_state, "packing_format_for_cpu", False)
    # Quantization really happened, and is the few-percent error NF4 is, not garbage.
    drift = (got - unquantized).norm() / unquantized.norm()
    assert 1e-3 < drift < 0.5, drift
    for name in names:
        original = base.get_submodule(name).weight.to(dtype).float()
        weight = oracle.get_submodule(name).weight.float()
        error = (weight - original).norm() / original.norm()
        assert 0.02 < error < 0.15, (name, error)  # NF4 on Gaussian-like weights: about 10% RMS


def test_only_attention_projections_are_replaced(base, monkeypatch):
    model = fresh(base)
    before = {n: (type(m), {k: (p.dtype, p.detach().clone()) for k, p in m.named_parameters(recurse=False)})
              for n, m in model.named_modules()}
    original_q = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    sources = {model.get_submodule(n).weight.data_ptr(): n for n in expected_names(model)}
    quantized_from = []
    real_quantize = bnb.functional.quantize_4bit

    def spy(A, *args, **kwargs):
        quantized_from.append(sources.get(A.data_ptr(), tuple(A.shape)))
        return real_quantize(A, *args, **kwargs)
    monkeypatch.setattr(bnb.functional, "quantize_4bit", spy)
    names = quantize_attention_nf4(model, torch.float32)

    assert names == expected_names(model)
    # One probe of a (2, 64) block, then each original weight exactly once, read in place (no copy first).
    assert quantized_from == [(2, 64), *names]
    assert model.is_loaded_in_4bit  # what PEFT reads to pick its bnb LoRA layer
    gc.collect()
    assert original_q() is None, "the fp32 weight outlived its quantization"
    for name in names:
        layer, original = model.get_submodule(name), base.get_submodule(name)
        assert type(layer) is bnb.nn.Linear4bit
        state = layer.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == ("nf4", 64, True)
        assert tuple(state.shape) == tuple(original.weight.shape) and state.dtype == torch.float32
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == original.weight.numel() // 2
        assert layer.weight.bnb_quantized and layer.compute_dtype == torch.float32
        assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, original.bias)
        assert not layer.weight.requires_grad and layer.weight.device == original.weight.device
        assert not layer.support_avx512bf16_for_cpu

    after = dict(model.named_modules())
    assert set(after) == set(before)
    for name, (kind, params) in before.items():
        if name in names:
            continue
        assert type(after[name]) is kind, name
        for key, (dtype, value) in params.items():
            now = getattr(after[name], key)
            assert now.dtype == dtype and torch.equal(now, value), f"{name}.{key}"
    for name in ("model.embed_tokens", "lm_head", "model.layers.0.mlp.router", "model.layers.1.mlp.experts"):
        assert type(after[name]) is before[name][0]


def test_bfloat16_compute_keeps_bias_in_compute_dtype(base):
    model = fresh(base)
    quantize_attention_nf4(model, torch.bfloat16)
    for name in expected_names(model):
        layer = model.get_submodule(name)
        assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
        assert layer.weight.quant_state.dtype == torch.float32  # quantized from the fp32 original, not a bf16 copy
    assert model.lm_head.weight.dtype == torch.float32


def test_nf4_bytes_against_the_memory_estimator_formula():
    """A gpt-oss-sized projection (2880 x 4096, bf16): packed codes 1/2 byte, 8-bit absmax per 64 weights, an fp32
    absmax per 256 of those; on top, per tensor, the 16-entry NF4 code book, the 256-entry 8-bit code book and the
    fp32 offset (1092 bytes, 0.02% here)."""
    holder = nn.Module()
    holder.layers = nn.ModuleList([nn.Module()])
    holder.layers[0].self_attn = nn.Module()
    holder.layers[0].self_attn.q_proj = nn.Linear(4096, 2880, dtype=torch.bfloat16)
    assert nf4_bytes(holder) == 0
    assert quantize_attention_nf4(holder, torch.bfloat16) == ["layers.0.self_attn.q_proj"]
    n = 2880 * 4096
    formula = n * (0.5 + 1 / 64 + 4 / (64 * 256))
    per_tensor = 16 * 4 + 256 * 4 + 4
    assert nf4_bytes(holder) == formula + per_tensor
    # per weight: the formula's bytes, up to the per-tensor overhead (0.02% here; 1.001: float rounding of the ratio)
    assert nf4_bytes(holder) / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1.001 * per_tensor / formula)


def test_nf4_bytes_of_the_tiny_model_sums_its_layers(base):
    model = fresh(base)
    quantize_attention_nf4(model, torch.float32)
    per_layer = [nf4_bytes(model.get_submodule(n)) for n in expected_names(model)]
    assert per_layer[0] == 128 * 128 // 2 + 128 * 128 // 64 + 4 + 1092   # q_proj (128, 128): one nested block
    assert per_layer[1] == 64 * 128 // 2 + 64 * 128 // 64 + 4 + 1092       # k_proj (64, 128)
    assert nf4_bytes(model) == sum(per_layer)  # nothing shared between layers (bnb copies the code books per tensor)


def test_peft_lora_on_nf4_trains_and_saves_the_same_adapter_keys(base, recipe, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = fresh(base)
    quantize_attention_nf4(model, torch.float32)
    peft_model, _ = add_lora(model, recipe)
    wrappers = attention_projections(peft_model)
    assert len(wrappers) == len(expected_names(base))
    for wrapper in wrappers.values():
        assert isinstance(wrapper, LoraLinear4bit) and type(wrapper.get_base_layer()) is bnb.nn.Linear4bit

    def attention_lora(which: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in peft_model.named_parameters() if ".self_attn." in n and f".{which}." in n}

    lora_a, lora_b = attention_lora("lora_A"), attention_lora("lora_B")
    assert len(lora_a) == len(lora_b) == len(wrappers)

    def loss_backward() -> None:
        peft_model.zero_grad(set_to_none=True)
        ids = token_ids(1)
        peft_model(input_ids=ids, labels=ids).loss.backward()

    peft_model.train()
    loss_backward()  # lora_B starts at zero, so only lora_B gets a gradient on the first step
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values()), "lora_B without gradient"
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    loss_backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_a.values()), "lora_A without gradient"
    assert all(p.grad is None for p in peft_model.parameters() if not p.requires_grad)

    quantized_dir, plain_dir = tmp_path / "nf4", tmp_path / "plain"
    peft_model.save_pretrained(str(quantized_dir))
    add_lora(fresh(base), recipe)[0].save_pretrained(str(plain_dir))
    keys = {}
    for d in (quantized_dir, plain_dir):
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            keys[d] = sorted(f.keys())
    assert keys[quantized_dir] == keys[plain_dir] and any(".self_attn.q_proj.lora_A." in k for k in keys[plain_dir])
    # ... and it loads, as trained, on the unquantized base.
    reloaded = PeftModel.from_pretrained(fresh(base), str(quantized_dir))
    trained = {n: p for n, p in peft_model.named_parameters() if ".lora_" in n}
    for name, value in reloaded.named_parameters():
        if ".lora_" in name:
            assert torch.equal(value, trained[name]), name


def test_quantizing_twice_is_a_user_error(base):
    model = fresh(base)
    quantize_attention_nf4(model, torch.float32)
    with pytest.raises(UserError, match=r"already quantized \(model\.layers\.0\.self_attn\.q_proj is a bitsandbytes"):
        quantize_attention_nf4(model, torch.float32)


def toy_attention(projection: nn.Module) -> nn.Module:
    """``layers.0.self_attn.q_proj`` = ``projection``: the smallest tree that has an attention projection."""
    root = nn.Module()
    root.layers = nn.ModuleList([nn.Module()])
    root.layers[0].self_attn = nn.Module()
    root.layers[0].self_attn.q_proj = projection
    return root


def test_a_model_without_attention_projections_is_a_user_error():
    with pytest.raises(UserError, match="no attention projections to quantize"):
        quantize_attention_nf4(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), torch.float32)


def test_lora_before_quantization_is_a_user_error():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(toy_attention(nn.Linear(64, 64)), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UserError, match=r"q_proj is a peft\.tuners\.lora\.layer\.Linear, not a torch nn\.Linear; "
                                        "quantize the base model before adding LoRA"):
        quantize_attention_nf4(model, torch.float32)


def test_missing_bitsandbytes_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    model = toy_attention(nn.Linear(64, 64))
    with pytest.raises(UserError, match=r"pip install bitsandbytes.*quantization: mxfp4"):
        quantize_attention_nf4(model, torch.float32)
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear


def test_a_device_bitsandbytes_cannot_serve_is_a_user_error_and_leaves_the_model_alone(monkeypatch):
    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")
    monkeypatch.setattr(bnb.functional, "quantize_4bit", unsupported)
    model = toy_attention(nn.Linear(64, 64))
    with pytest.raises(UserError, match=r"cannot quantize on cpu .*quantization: mxfp4"):
        quantize_attention_nf4(model, torch.float32)
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
