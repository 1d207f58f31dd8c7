"""Our training path (finetune.model.fastpath: grouped expert LoRA + sink attention) against the reference, fp32 on CPU.

The oracle is transformers' eager gpt-oss with PEFT's LoRA (``ParamWrapper`` on the experts). On CPU the kernels run
their plain twins (per-expert matmuls, dense attention maths), so what is checked here is everything around the
kernels: sorting rows by expert once, the gather/scatter backward, the LoRA side path and its scaling, biases, the
clamped SwiGLU, routing-weight gradients, the sink renormalisation and its backward (including the sink gradient),
the sliding-window boundary, GQA, and the PEFT wiring (adapters saved and reloaded as plain PEFT). The CUDA kernels
themselves are checked against the same oracle in ``tests/gpu/test_fastpath_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EPS32, FP32_MARGIN, assert_float64_close, assert_fp32_close, float64, run, summation_bound

from finetune.kernels.attention import sink_attention
from finetune.kernels.experts import grouped_mm, moe_experts
from finetune.kernels.loss import weighted_loss_sum
from finetune.model import fastpath
from finetune.model.lora import add_lora
from inference.errors import UserError
from tests.test_lora import fill_, make_recipe


def _eager_attention(q, k, v, sinks, scale, window):
    """transformers' own eager gpt-oss attention, fed the mask its eager mask builder makes: the oracle."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    class Module(torch.nn.Module):
        pass
    module = Module()
    module.num_key_value_groups = q.shape[2] // k.shape[2]
    module.sinks = sinks
    module.training = False
    n = q.shape[1]
    i, j = torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None, :]
    keep = (j <= i) & ((j > i - window) if window else True)
    mask = torch.zeros(n, n, device=q.device).masked_fill(~keep, torch.finfo(torch.float32).min)[None, None]
    out, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                     scaling=scale)
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_sink_attention_matches_eager_values_and_all_gradients(window):
    g = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D = 2, 13, 4, 2, 8        # 13 > window: rows both inside and past the window boundary
    q, k, v = (torch.randn(B, S, h, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64) * 2
    grad = torch.randn(B, S, Hq, D, generator=g, dtype=torch.float64)
    results = []
    # the reference also in fp32: its distance from float64 measures how much rounding this maths amplifies
    for fn, dtype in ((_eager_attention, torch.float64), (sink_attention, torch.float64), (_eager_attention, None)):
        leaves = [t.to(dtype or torch.float32, copy=True).requires_grad_() for t in (q, k, v, sinks)]
        out = fn(*leaves, 0.3, window)
        out.backward(grad.to(dtype or torch.float32))
        results.append([out.detach()] + [t.grad for t in leaves])
    ref, ours, ref32 = results
    for name, a, b, b32 in zip(["out", "dq", "dk", "dv", "dsinks"], ours, ref, ref32):
        assert b.abs().max() > 1e-3, name               # every gradient is really exercised
        assert_float64_close(a, b, b32, name)


@pytest.mark.parametrize("packed", [False, True])
def test_attention_backward_one_key_value_head_at_a_time_is_the_whole_backward(monkeypatch, packed):
    """Long steps run the attention backward per key/value head (WHOLE_BACKWARD_TOKENS): same gradients, bit for
    bit, as all heads at once (the plain twin here; flash in tests/gpu/test_fastpath_cuda.py)."""
    from finetune.kernels import attention
    from finetune.train.trainer import packed_inputs
    g = torch.Generator().manual_seed(3)
    B, S, Hq, Hkv, D = 2, 11, 6, 3, 4
    q, k, v = (torch.randn(B, S, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    sinks, grad = torch.randn(Hq, generator=g), torch.randn(B, S, Hq, D, generator=g)
    layout = None
    if packed:
        args = packed_inputs([[4, 7], [11]], S)
        layout = attention.Packed(args["cu_seq_lens_q"], args["max_length_q"])
    results = []
    for whole in (10**9, 0):
        monkeypatch.setattr(attention, "WHOLE_BACKWARD_TOKENS", whole)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        sink_attention(*leaves, 0.5, 3, layout).backward(grad)
        results.append([t.grad for t in leaves])
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), *results):
        assert b.abs().max() > 1e-3, name
        assert torch.equal(a, b), name


def test_sink_attention_window_boundary_is_the_reference_one():
    """A key exactly ``window`` positions back is masked, one less is seen: moving it changes only the latter."""
    g = torch.Generator().manual_seed(1)
    S, W = 9, 4
    q, k, v = (torch.randn(1, S, 1, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sinks = torch.zeros(1, dtype=torch.float64)
    base = sink_attention(q, k, v, sinks, 1.0, W)[0, -1]
    for back, seen in ((W, False), (W - 1, True)):
        v2 = v.clone()
        v2[0, S - 1 - back] += 10
        changed = not torch.allclose(sink_attention(q, k, v2, sinks, 1.0, W)[0, -1], base)
        assert changed == seen, back


def test_grouped_mm_twin_is_per_expert_matmul():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(10, 6, generator=g), torch.randn(3, 6, 5, generator=g)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)       # an empty middle group
    ref = torch.cat([x[:4] @ w[0], x[10:10] @ w[1], x[4:] @ w[2]])
    assert ((grouped_mm(x, w, offs) - ref).abs() <= summation_bound(x, w, offs)).all()   # fp32, any summation order


def _peft_tiny(tiny_model, tmp_path, r=4):
    peft_model, _ = add_lora(tiny_model, make_recipe(tmp_path, [f"lora.r={r}", f"lora.alpha={2 * r}"]))
    g = torch.Generator().manual_seed(3)
    # B starts at zero in PEFT; give every factor values so the LoRA path changes outputs and all grads are non-zero
    fill_([p for n, p in peft_model.named_parameters() if "lora_" in n], g, std=0.05)
    return peft_model


def _batch(seed=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 199_000, (2, 90), generator=g)        # 90 > the tiny model's 64-token window
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0                                               # right padding on the second row
    weights = torch.rand(ids.shape, generator=g) * mask
    return ids, mask, weights


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    total, weight, _ = weighted_loss_sum(model, *batch)
    loss = total / weight
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fast_path_loss_and_lora_gradients_equal_transformers_peft(tiny_model, tmp_path):
    model = _peft_tiny(tiny_model, tmp_path)
    model.train()
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    fastpath.enable(model)
    assert model.get_base_model().config._attn_implementation == fastpath.ATTENTION_IMPL
    loss, grads = _loss_and_grads(model, batch)
    fastpath.disable(model)
    again, _ = _loss_and_grads(model, batch)
    exact_loss, exact = _loss_and_grads(float64(copy.deepcopy(model)), batch)   # the reference in float64

    assert torch.isfinite(ref_loss) and loss != 0
    assert_fp32_close(loss, ref_loss, exact_loss, "loss")
    torch.testing.assert_close(again, ref_loss, rtol=0, atol=0)   # disable restores the reference exactly
    assert grads.keys() == ref_grads.keys()
    experts = [n for n in grads if ".experts." in n]
    assert len(experts) == 2 * 2 * 2                               # 2 layers x {gate_up, down} x {A, B}
    for name in grads:
        assert ref_grads[name].abs().max() > 0, name
        assert_fp32_close(grads[name], ref_grads[name], exact[name], name)


def experts_case(H=16, I=8, E=5, k=2, T=11, r=3, seed=5):
    """A GptOssExperts layer (float64, CPU), its inputs (routing given) and LoRA factors for both expert weights."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    experts = GptOssExperts(cfg).double()
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(T, H, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    rw = torch.softmax(torch.randn(T, k, dtype=torch.float64), -1)
    lora = {n: (torch.randn(E, getattr(experts, n).shape[1], r, dtype=torch.float64) * 0.3,
                torch.randn(E, r, getattr(experts, n).shape[2], dtype=torch.float64) * 0.3, 0.7)
            for n in ("gate_up_proj", "down_proj")}
    return cfg, experts, (x, idx, rw), lora, torch.randn(T, H, dtype=torch.float64)


def run_experts(case, fast: bool, dtype=torch.float64, device="cpu"):
    """(output, [dx, d routing weights, dA/dB of gate_up, dA/dB of down]) of ours (fast) or transformers' eager
    experts with the LoRA folded into the weights (``W + s * lhs @ rhs``, differentiable in the factors)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    cfg, experts, (x, idx, rw), lora, grad = case
    experts = GptOssExperts(cfg).to(device, dtype)
    experts.load_state_dict({n: t.to(device, dtype) for n, t in case[1].state_dict().items()})
    # copy=True: every run gets its own leaves (a no-op .to() would hand back the case's tensors themselves)
    xs, ws = x.to(device, dtype, copy=True).requires_grad_(), rw.to(device, dtype, copy=True).requires_grad_()
    fs = {n: (a.to(device, dtype, copy=True).requires_grad_(), b.to(device, dtype, copy=True).requires_grad_(), s)
          for n, (a, b, s) in lora.items()}
    idx = idx.to(device)
    if fast:
        out = moe_experts(xs, idx, ws, gate_up=experts.gate_up_proj, gate_up_bias=experts.gate_up_proj_bias,
                          down=experts.down_proj, down_bias=experts.down_proj_bias, alpha=experts.alpha,
                          limit=experts.limit, lora_gate_up=fs["gate_up_proj"], lora_down=fs["down_proj"])
    else:
        for n, (lhs, rhs, s) in fs.items():
            weight = getattr(experts, n).detach()
            delattr(experts, n)
            setattr(experts, n, weight + s * lhs @ rhs)
        out = experts(xs, idx, ws)
    out.backward(grad.to(device, dtype))
    return out.detach(), [xs.grad, ws.grad] + [t.grad for f in fs.values() for t in f[:2]]


def test_fast_experts_equal_eager_experts_with_routing_gradients():
    """moe_experts alone against transformers' eager GptOssExperts (LoRA folded into W), incl. d(routing weights)."""
    case = experts_case()
    (ref, ref_grads), (ours, our_grads) = run_experts(case, False), run_experts(case, True)
    ref32, ref32_grads = run_experts(case, False, torch.float32)   # how much rounding this maths amplifies
    assert all(a is not b for a, b in zip(our_grads, ref_grads))
    assert_float64_close(ours, ref, ref32, "out")
    for i, (a, b, b32) in enumerate(zip(our_grads, ref_grads, ref32_grads)):
        assert b.abs().max() > 1e-6, i
        assert_float64_close(a, b, b32, str(i))


def test_adapter_trained_on_fast_path_saves_as_plain_peft(tiny_model, tiny_model_dir, tmp_path):
    """The adapters stay PEFT's: one fast step, save, reload into plain transformers + PEFT, same outputs."""
    from peft import PeftModel

    from inference.model.checkpoint import load_model
    model = _peft_tiny(tiny_model, tmp_path)
    fastpath.enable(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = _batch(6)
    total, weight, _ = weighted_loss_sum(model, *batch)
    (total / weight).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        fast_logits = model(input_ids=batch[0][:1, :60]).logits
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        plain_logits = plain(input_ids=batch[0][:1, :60]).logits
        exact = float64(plain)(input_ids=batch[0][:1, :60]).logits
    assert_fp32_close(fast_logits, plain_logits, exact, "logits")


def test_choose_and_padding_guard():
    assert fastpath.choose("auto", torch.device("cpu"))[0] is False
    assert fastpath.choose("auto", torch.device("cuda"))[0] is True
    assert fastpath.choose("reference", torch.device("cuda"))[0] is False
    assert fastpath.choose("fast", torch.device("cpu"))[0] is True
    fastpath.check_right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(UserError, match="right-padded"):
        fastpath.check_right_padded(torch.tensor([[0, 1, 1]]))


def test_readme_train_speed_smoke_command_measures_both_paths_on_the_same_batches(tmp_path):
    """The README's CPU smoke command of benchmarks/train_speed.py: both paths train, the JSON has the comparison,
    and on the same weights and batch the two losses agree (fp32 on CPU)."""
    import json
    import re
    import shlex
    import sys

    from conftest import REPO
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    command = re.search(r"`(python benchmarks/train_speed\.py --shape tiny[^`]*)`", readme).group(1)
    out = tmp_path / "speed.json"
    argv = [sys.executable] + shlex.split(command)[1:] + ["--json", str(out)]
    done = run(argv, cwd=REPO)   # within conftest.CLI_TIMEOUT_S
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    (row,) = res["runs"]
    assert row["seq"] == 64 and row["batch"] == 2
    for path in ("ours", "baseline", "baseline+noamp"):
        assert row[path]["tok_s"] > 0 and 0 < row[path]["mfu"] < 1
    assert row["ours"]["implementation"] == f"{fastpath.ATTENTION_IMPL} attention, {fastpath.EXPERTS_IMPL} experts"
    for path in ("baseline", "baseline+noamp"):   # transformers' own (eager on CPU: flex with sinks is CUDA-only)
        assert row[path]["implementation"] == "eager attention, eager experts"
    best = max(("baseline", "baseline+noamp"), key=lambda p: row[p]["tok_s"])
    assert row["best_baseline"] == best
    assert row["ratio"] == round(row["ours"]["tok_s"] / row[best]["tok_s"], 2)
    packing = res["packing"]                                   # --packing: the same sequences padded and packed
    assert packing["sequences"] == 8 and packing["packed"]["steps"] <= packing["padded"]["steps"]
    assert all(packing[m]["real_tok_s"] > 0 and 0 < packing[m]["real_share"] <= 1 for m in ("padded", "packed"))
    # The losses are rounded to 5 decimals (each up to 0.5e-5 off) from fp32 computations of the same maths, which
    # may differ by FP32_MARGIN times the fp32 error of that loss: measured here on the benchmark's own model (same
    # builder and seed) and a batch like its own, against float64.
    from benchmarks.train_speed import build
    model = build("tiny", None, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 199_000, (1, row["seq"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32_loss = model(input_ids=ids, labels=ids).loss.item()
        exact_loss = float64(model)(input_ids=ids, labels=ids).loss.item()
    tol = 2 * 0.5e-5 + FP32_MARGIN * max(abs(fp32_loss - exact_loss), EPS32 * abs(exact_loss))
    losses = res["same_weights_loss"]
    assert abs(losses["ours"] - losses["baseline"]) <= tol
    assert abs(losses["ours"] - losses["baseline+noamp"]) <= tol
    shares = res["expert_load"]["share_all_layers"]
    assert sum(shares) == pytest.approx(1.0, abs=len(shares) * 0.5e-4 + 1e-12)   # each share rounded to 4 decimals
    assert "ours / baseline" in done.stdout and "expert load" in done.stdout
    kinds = res["profile_breakdown"]                           # --profile: one step of ours by kind of kernel
    assert kinds["kernels_launched"] > 0 and kinds["kernel_ms"] > 0
    assert sum(kinds["share"].values()) == pytest.approx(1.0, abs=len(kinds["share"]) * 0.5e-3)
    assert kinds["share"]["matmul"] > 0                        # the LoRA and attention projections are aten::mm
    assert not any(m in e["name"] for e in kinds["largest_outside_matmul_and_attention"]
                   for m in ("aten::mm", "aten::addmm", "aten::bmm"))


def _library_classes(model):
    import peft
    from peft.tuners.lora import layer as lora_layer
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss
    return [gpt_oss.GptOssExperts, gpt_oss.GptOssAttention, gpt_oss.GptOssDecoderLayer, gpt_oss.GptOssRMSNorm,
            gpt_oss.GptOssModel, gpt_oss.GptOssForCausalLM, lora_layer.LoraLayer, lora_layer.Linear,
            lora_layer.ParamWrapper, peft.PeftModel, type(model), torch.nn.Module]


def _class_state(classes):
    """Each class's own attributes (by identity): what patching a library class in place would change. Leaves out
    what transformers memoizes on its own classes (``*_cached_value``, set by its set_attn_implementation)."""
    return {cls: {k: id(v) for k, v in vars(cls).items() if not k.endswith("_cached_value")} for cls in classes}


def _instance_state(model):
    """Every module's instance attributes: their names, and the values of the plain ones (flags, names)."""
    plain = (bool, int, float, str, type(None), tuple, frozenset)
    state = {name: (frozenset(vars(m)), {k: v for k, v in vars(m).items() if isinstance(v, plain)})
             for name, m in model.named_modules()}
    base = model.get_base_model()
    state["config"] = (base.config._attn_implementation, base.config._experts_implementation)
    return state


def test_the_patch_table_is_undone_exactly_and_library_classes_are_never_touched(tiny_model, tmp_path):
    """fastpath is the one seam that changes library behaviour: inside ``patched`` every change in its table is in
    force on this model's objects only; on exit, also after an error, the model is as it was, attribute for
    attribute, and no transformers/PEFT/torch class was modified at any point."""
    model = _peft_tiny(tiny_model, tmp_path)
    classes = _library_classes(model)
    classes_before, model_before = _class_state(classes), _instance_state(model)
    batch = _batch()
    with fastpath.patched(model):
        inside = _instance_state(model)
        applied = dict((patch.name, state) for patch, state in getattr(model.get_base_model(), fastpath._STATE))
        weighted_loss_sum(model, *batch)                    # the patched forward runs
        assert _class_state(classes) == classes_before
    assert [p.name for p in fastpath.PATCHES] == list(applied) and all(p.why for p in fastpath.PATCHES)
    # each patch that applies on this device changed something (the table is not stale)
    assert inside["config"] == (fastpath.ATTENTION_IMPL, fastpath.EXPERTS_IMPL) != model_before["config"]
    modules = {n: state for n, state in inside.items() if n != "config"}
    upcast = [n for n, (_, v) in modules.items() if v.get("cast_input_dtype_enabled") is False]
    assert upcast and all(model_before[n][1]["cast_input_dtype_enabled"] is True for n in upcast)
    bypassed = [n for n, (keys, _) in modules.items() if "forward" in keys]
    assert bypassed and all(n.endswith("mlp.experts") for n in bypassed), bypassed
    assert applied["RMSNorms compiled"] == []               # CUDA only
    assert _instance_state(model) == model_before and _class_state(classes) == classes_before
    assert not fastpath.is_enabled(model)

    with pytest.raises(RuntimeError, match="in the block"), fastpath.patched(model):
        raise RuntimeError("in the block")
    assert _instance_state(model) == model_before


def test_checkpointing_is_installed_one_way_with_the_paths_policy(tiny_model, tmp_path):
    """enable_checkpointing is transformers' activation_checkpointing_enable with checkpoint_kwargs, the arguments the
    Trainer gets: selective (the path's saved ops) while the path is on, plain non-reentrant otherwise."""
    model = _peft_tiny(tiny_model, tmp_path)
    layers = model.get_base_model().model.layers
    fastpath.enable_checkpointing(model)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    with fastpath.patched(model):
        fastpath.enable_checkpointing(model)
        kwargs = layers[0]._gradient_checkpointing_func.keywords
        assert kwargs.keys() == {"use_reentrant", "context_fn"} and kwargs["use_reentrant"] is False
        assert kwargs["context_fn"].func is fastpath._selective_context
        assert kwargs["context_fn"].args == (fastpath.SAVE_DEFAULT,)
    with fastpath.patched(model, save=frozenset()):         # nothing to save: plain recomputation
        assert fastpath.checkpoint_kwargs(model) == {"use_reentrant": False}
    assert fastpath.checkpoint_kwargs(model) == {"use_reentrant": False}
