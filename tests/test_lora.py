"""Tests for finetune.model.lora: LoRA placement on gpt-oss (attention + MoE experts), the coverage report, what the
expert adapters compute, that training touches only the adapters, and the guards that refuse a LoRA set-up that
cannot work.

All in-process on the tiny gpt-oss (fp32, CPU). The expert adapters are PEFT ``ParamWrapper``s around the 3-D
``mlp.experts.gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H) tensors, which transformers' ``GptOssExperts``
applies as ``x @ W[e]`` (input features on dim 1, output features on dim 2).
"""

from __future__ import annotations

import copy
import re
import textwrap
import warnings

import pytest
import torch
from conftest import assert_fp32_close, float64

from finetune.model.lora import add_lora, coverage, format_coverage
from finetune.recipe import load_recipe
from inference.errors import UserError


def make_recipe(tmp_path, overrides=(), lora_yaml: str = ""):
    """A small recipe written to tmp_path (only data.train is required; the file need not exist for add_lora)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent("""\
        data:
          train: train.jsonl
        harmony:
          reasoning_effort: low
        """) + lora_yaml, encoding="utf-8")
    return load_recipe(path, list(overrides))


def lora_params(model, under: str, which: str) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters (``which`` is lora_A or lora_B) whose name contains ``under``."""
    return {n: p for n, p in model.named_parameters() if under in n and f".{which}." in n}


def experts_wrappers(peft_model, layer: int):
    """(outer, inner) ParamWrappers of one layer's experts: the outer adapts down_proj, the inner gate_up_proj."""
    outer = peft_model.base_model.model.model.layers[layer].mlp.experts
    inner = outer.base_layer
    assert outer.parameter_name == "down_proj" and inner.parameter_name == "gate_up_proj"
    return outer, inner


def expert_delta(wrapper, param: torch.Tensor) -> torch.Tensor:
    """Our own expert update, from lora_A/lora_B: LoRA's A reads the input features, B writes the output features,
    so for ``y = x @ W[e]`` the adapted weight is ``W[e] + scale * A_e^T @ B_e^T`` (shape (in, out)), in float64.

    How the ``r * E`` rank rows/columns are split into experts is PEFT's storage layout: lora_A's rows are
    expert-major ``(E, r)``, lora_B's columns are rank-major ``(r, E)``.
    """
    E, d_in, d_out = param.shape
    A = wrapper.lora_A["default"].weight.detach().double()   # (r * E, in)
    B = wrapper.lora_B["default"].weight.detach().double()   # (out, r * E)
    r = A.shape[0] // E
    assert A.shape == (r * E, d_in) and B.shape == (d_out, r * E)
    A_e = A.reshape(E, r, d_in)                      # (E, r, in)
    B_e = B.reshape(d_out, r, E).permute(2, 0, 1)    # (E, out, r)
    scale = wrapper.scaling["default"]
    return scale * torch.einsum("eri,eor->eio", A_e, B_e)


def linear_delta(module) -> torch.Tensor:
    """Standard LoRA on an nn.Linear: W (out, in) + scale * B @ A (float64, as expert_delta)."""
    A, B = module.lora_A["default"].weight.detach().double(), module.lora_B["default"].weight.detach().double()
    return module.scaling["default"] * (B @ A)


def fill_(params, generator, std=0.05):
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def rendered_example(recipe, colour: str = "red", thing: str = "cherry"):
    from finetune.data.prepare import harmony_options, loss_weights
    from inference.harmony import render_for_training
    messages = [{"role": "user", "content": f"Color of {thing}?"},
                {"role": "assistant", "thinking": f"{thing} is usually {colour}.", "content": colour}]
    (r,) = render_for_training(messages, None, harmony_options(recipe), loss_weights(recipe))   # one turn: one sequence
    ids = torch.tensor([r.ids])
    return ids, torch.ones_like(ids), torch.tensor([r.weights])


# ------------------------------------------------------------------------------------------------------------- coverage


def test_default_targets_cover_attention_and_experts(tiny_model, tmp_path):
    cfg = tiny_model.config
    recipe = make_recipe(tmp_path)
    assert recipe.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert recipe.lora.target_experts == ["gate_up_proj", "down_proj"]
    peft_model, report = add_lora(tiny_model, recipe)

    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n, _ in trainable)
    assert report["trainable"] == sum(p.numel() for _, p in trainable)
    assert report["total"] == sum(p.numel() for p in peft_model.parameters())
    assert report == coverage(peft_model)

    # Expected counts from the architecture: rank r per attention projection, rank r per expert per expert tensor.
    r, H, E, I = recipe.lora.r, cfg.hidden_size, cfg.num_local_experts, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = r * (H + q) + 2 * r * (H + kv) + r * (q + H)
    experts = r * E * (H + 2 * I) + r * E * (I + H)
    L = cfg.num_hidden_layers
    groups = report["groups"]
    assert groups.get("attention") == L * attention > 0
    assert groups.get("experts") == L * experts > 0
    assert groups.get("router", 0) == 0 and groups.get("other", 0) == 0
    assert report["trainable"] == L * (attention + experts)
    assert set(report["per_layer"]) == {str(i) for i in range(L)}
    for layer in report["per_layer"].values():
        assert layer.get("attention") == attention and layer.get("experts") == experts
        assert layer.get("router", 0) == 0

    text = format_coverage(report)
    for group in ("attention", "experts", "router", "other"):
        assert group in text
    assert f"{report['trainable']:,} trainable of {report['total']:,}" in text
    layer_lines = [line for line in text.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(layer_lines) == L
    total_line = next(line for line in text.splitlines() if line.strip().startswith("total"))
    assert total_line.split()[1:] == [f"{L * attention:,}", f"{L * experts:,}", "0", "0"]


def test_target_experts_empty_means_attention_only(tiny_model, tmp_path):
    _, report = add_lora(tiny_model, make_recipe(tmp_path, ["lora.target_experts=[]"]))
    assert report["groups"].get("attention", 0) > 0
    assert report["groups"].get("experts", 0) == 0


def test_target_modules_empty_means_experts_only(tiny_model, tmp_path):
    # PEFT must not fall back to its default target modules when the recipe asked for none.
    _, report = add_lora(tiny_model, make_recipe(tmp_path, ["lora.target_modules=[]"]))
    assert report["groups"].get("experts", 0) > 0
    assert report["groups"].get("attention", 0) == 0


# -------------------------------------------------------------------------------------------- what expert LoRA computes


def test_expert_lora_changes_expert_output_and_matches_merged_weights(tiny_model, tmp_path):
    cfg = tiny_model.config
    recipe = make_recipe(tmp_path)
    base = copy.deepcopy(tiny_model)  # get_peft_model wraps tiny_model in place; this copy stays untouched
    torch.manual_seed(0)              # PEFT initialises lora_A from the global generator (lora_B stays zero)
    peft_model, _ = add_lora(tiny_model, recipe)
    peft_model.eval()

    g = torch.Generator().manual_seed(1234)
    T, H, E, k = 8, cfg.hidden_size, cfg.num_local_experts, cfg.num_experts_per_tok
    x = torch.randn(T, H, generator=g)
    idx = torch.tensor([[t % E, (t + 1 + t // E) % E] for t in range(T)])  # every expert used, two per token
    assert idx.shape == (T, k) and set(idx.flatten().tolist()) == set(range(E))
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    ids = rendered_example(recipe)[0]

    layer = 0
    outer, inner = experts_wrappers(peft_model, layer)
    base_experts = base.model.layers[layer].mlp.experts

    def experts_out():
        with torch.no_grad():
            return outer(x, idx, w)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    with torch.no_grad():
        y_base = base_experts(x, idx, w)
    logits_base = logits(base)

    # PEFT's default init (B = 0): the adapted model is the base model, exactly.
    assert torch.equal(experts_out(), y_base)
    assert torch.equal(logits(peft_model), logits_base)

    # Attention LoRA on, expert LoRA still zero: the experts compute what the base experts do; the model changes.
    attn_B = lora_params(peft_model, ".self_attn.", "lora_B")
    expert_B = lora_params(peft_model, ".mlp.experts.", "lora_B")
    assert len(attn_B) == 4 * cfg.num_hidden_layers and len(expert_B) == 2 * cfg.num_hidden_layers
    fill_(attn_B.values(), g)
    assert torch.equal(experts_out(), y_base)
    assert not torch.allclose(logits(peft_model), logits_base, atol=1e-4)

    # Each expert tensor's LoRA alone changes the experts' output.
    for wrapper in (inner, outer):
        fill_([wrapper.lora_B["default"].weight], g)
        y = experts_out()
        assert (y - y_base).abs().max() > 1e-3, wrapper.parameter_name
        with torch.no_grad():
            wrapper.lora_B["default"].weight.zero_()
        assert torch.equal(experts_out(), y_base)

    # Now every adapter is non-zero: compare with a plain model whose weights are W + delta, computed by us, in fp32
    # and (for the tolerances: how far the fp32 reference is from the exact result) in float64.
    fill_(expert_B.values(), g)

    def merged_by_us(dtype):
        reference = copy.deepcopy(base).to(dtype)
        with torch.no_grad():
            for i, ref_layer in enumerate(reference.model.layers):
                o, n = experts_wrappers(peft_model, i)
                for wrapper in (o, n):
                    W = getattr(ref_layer.mlp.experts, wrapper.parameter_name)
                    delta = expert_delta(wrapper, W)
                    assert delta.shape == W.shape
                    W.add_(delta.to(dtype))
                attn = peft_model.base_model.model.model.layers[i].self_attn
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(ref_layer.self_attn, name).weight.add_(linear_delta(getattr(attn, name)).to(dtype))
        return reference

    reference, exact = merged_by_us(torch.float32), float64(merged_by_us(torch.float64))

    y_lora = experts_out()
    with torch.no_grad():
        y_ref = reference.model.layers[layer].mlp.experts(x, idx, w)
        y_exact = exact.model.layers[layer].mlp.experts(x.double(), idx, w.double())
    assert (y_lora - y_base).abs().max() > 1e-3
    assert_fp32_close(y_lora, y_ref, y_exact, "experts")

    logits_lora, logits_exact = logits(peft_model), logits(exact)
    assert (logits_lora - logits_base).abs().max() > 1e-3
    assert_fp32_close(logits_lora, logits(reference), logits_exact, "logits")

    # PEFT's own merge agrees with our delta, and the merged plain model computes what the adapted one does.
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert type(merged) is type(base)
    for ours, theirs, ours_exact in zip(reference.model.layers, merged.model.layers, exact.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            assert_fp32_close(getattr(theirs.mlp.experts, name), getattr(ours.mlp.experts, name),
                              getattr(ours_exact.mlp.experts, name), name)
    assert_fp32_close(logits(merged), logits_lora, logits_exact, "merged logits")


# --------------------------------------------------------------------------------------- training touches adapters only


def test_optimizer_steps_change_only_lora_params(tiny_model, tmp_path):
    from finetune.kernels.loss import weighted_loss_sum

    torch.manual_seed(0)
    recipe = make_recipe(tmp_path)
    peft_model, _ = add_lora(tiny_model, recipe)
    peft_model.train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    lora_names = {n for n in before if ".lora_A." in n or ".lora_B." in n}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == lora_names
    assert any(".mlp.experts." in n for n in lora_names) and any(".self_attn." in n for n in lora_names)

    ids, mask, weights = rendered_example(recipe)
    assert weights.sum() > 0

    def loss_value():
        total, wsum, count = weighted_loss_sum(peft_model, ids, mask, weights)
        assert count > 0
        return total / wsum

    # Every parameter goes to the optimizer: frozen ones may only stay put because no gradient reaches them.
    opt = torch.optim.AdamW(peft_model.parameters(), lr=1e-2, weight_decay=0.0)
    with torch.no_grad():
        initial = loss_value().item()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = loss_value()
        loss.backward()
        for n, p in peft_model.named_parameters():
            if n not in lora_names:
                assert p.grad is None, n
        opt.step()
    with torch.no_grad():
        final = loss_value().item()

    after = dict(peft_model.named_parameters())
    assert set(after) == set(before)
    for n, old in before.items():
        if n in lora_names:
            assert not torch.equal(after[n].detach(), old), f"LoRA parameter did not change: {n}"
        else:
            assert torch.equal(after[n].detach(), old), f"frozen parameter changed: {n}"
    assert final < initial


# --------------------------------------------------------------------------------------------------------------- guards


def test_experts_requested_on_a_model_without_experts(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    recipe = make_recipe(tmp_path, ["lora.target_modules=[q_proj]"])
    assert recipe.lora.target_experts == ["gate_up_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError) as info:
            add_lora(LlamaForCausalLM(config), recipe)
    msg = str(info.value)
    assert "target_experts" in msg and "gate_up_proj" in msg
    # The same model without expert targets is fine: the refusal is about the experts only.
    _, report = add_lora(LlamaForCausalLM(config), make_recipe(tmp_path, ["lora.target_modules=[q_proj]",
                                                                          "lora.target_experts=[]"]))
    assert report["groups"].get("attention", 0) > 0 and report["groups"].get("experts", 0) == 0


def test_unknown_target_module_is_named(tiny_model, tmp_path):
    with pytest.raises(UserError) as info:
        add_lora(tiny_model, make_recipe(tmp_path, ["lora.target_modules=[q_proj,qkv]"]))
    msg = str(info.value)
    assert "lora.target_modules" in msg and "['qkv']" in msg  # only the missing name is listed


def test_nothing_to_adapt_is_a_user_error(tiny_model, tmp_path):
    with pytest.raises(UserError) as info:
        add_lora(tiny_model, make_recipe(tmp_path, ["lora.target_modules=[]", "lora.target_experts=[]"]))
    assert "target" in str(info.value)


def test_dropout_with_expert_targets_is_refused(tiny_model, tmp_path):
    # PEFT's ParamWrapper cannot apply dropout; refused at recipe validation or, at the latest, by add_lora.
    with pytest.raises(UserError) as info:
        recipe = make_recipe(tmp_path, ["lora.dropout=0.1"])
        assert recipe.lora.target_experts  # the default targets the experts
        add_lora(tiny_model, recipe)
    assert "dropout" in str(info.value)


def test_dropout_without_expert_targets_is_fine(tiny_model, tmp_path):
    _, report = add_lora(tiny_model, make_recipe(tmp_path, ["lora.dropout=0.1", "lora.target_experts=[]"]))
    assert report["groups"].get("attention", 0) > 0
