"""Our gpt-oss forward (:mod:`inference.model.runtime`) and its adapters (:mod:`inference.model.adapters`) against the
oracle, transformers' eager ``GptOssForCausalLM`` (with PEFT for adapters), on the tiny gpt-oss in fp32 on CPU.

One input for everything: two rows of 150 random token ids, the second left-padded by 20, so both rows cross layer 0's
sliding window (64) and padding is exercised. Shown here: logits parity (whole sequence; KV-cached decoding, with the
sliding layer's ring buffer wrapping during prefill, during decoding and across chunks), adapters attached unmerged
(chosen per call, two at once) and merged, MXFP4 experts kept packed, and a one-line UserError for each bad input.

Tolerance: ours and the oracle are two fp32 computations of the same maths (differences measured at most ~7e-6,
often exactly 0, on logits of magnitude ~8), so ours may be ``FP32_MARGIN`` times as far from the oracle as the oracle
is from itself run in float64 (:func:`tol`).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import EPS32, FP32_MARGIN, float64, make_adapter

from inference.engine.batch import PAD_ID
from inference.errors import UserError
from inference.model import adapters, runtime
from inference.model.checkpoint import load_model

T, PAD = 150, 20  # sequence length (> sliding window 64) and left padding of row 1


def tensors_of(adapter_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``ids, mask (2, T)``: random ids; row 1 starts with PAD padding positions (mask 0)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 200_000, (2, T), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = PAD_ID, 0
    return ids, mask


def max_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference over real positions only (row 1's padding is excluded)."""
    return max(float((ours[0] - ref[0]).abs().max()), float((ours[1, PAD:] - ref[1, PAD:]).abs().max()))


def tol(ref: torch.Tensor, exact: torch.Tensor) -> float:
    """Max abs logit difference allowed from the fp32 oracle ``ref``: FP32_MARGIN times its distance from the same
    oracle in float64 (``exact``) over the real positions, at least one fp32 ulp of the largest logit."""
    return FP32_MARGIN * max(max_diff(ref, exact), EPS32 * float(exact.abs().max()))


@torch.no_grad()
def oracle_logits(model) -> torch.Tensor:
    ids, mask = inputs()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)   # as transformers' generate derives them for left padding
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    return logits if logits.dtype == torch.float64 else logits.float()   # a float64 oracle stays exact


@torch.no_grad()
def our_logits(model, adapter: str | None = None) -> torch.Tensor:
    ids, mask = inputs()
    return model.logits(model(ids, mask, adapter=adapter), adapter)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, root / name, seed) for name, seed in (("one", 1), ("two", 2))}


@pytest.fixture(scope="module")
def hf_logits(tiny_model_dir):
    return oracle_logits(load_model(tiny_model_dir))


@pytest.fixture(scope="module")
def peft_logits(tiny_model_dir, adapter_dirs):
    from peft import PeftModel
    return {name: oracle_logits(PeftModel.from_pretrained(load_model(tiny_model_dir), str(d)))
            for name, d in adapter_dirs.items()}


@pytest.fixture(scope="module")
def hf_tol(tiny_model_dir, hf_logits) -> float:
    return tol(hf_logits, oracle_logits(float64(load_model(tiny_model_dir))))


@pytest.fixture(scope="module")
def peft_tol(tiny_model_dir, adapter_dirs, peft_logits) -> dict[str, float]:
    from peft import PeftModel
    return {name: tol(peft_logits[name], oracle_logits(float64(PeftModel.from_pretrained(load_model(tiny_model_dir),
                                                                                         str(d)))))
            for name, d in adapter_dirs.items()}


@pytest.fixture(scope="module")
def rt(tiny_model_dir, adapter_dirs):
    """The runtime in fp32 with both adapters attached (unmerged); calls without ``adapter`` are the base model."""
    model = runtime.load(tiny_model_dir, torch.float32, "cpu")
    for name, d in adapter_dirs.items():
        adapters.attach(model, name, adapters.read_adapter(d, model))
    return model


# ---------------------------------------------------------------------------------------------------- base forward

def test_base_logits_match_transformers(rt, hf_logits, hf_tol, tiny_model_dir):
    ours = our_logits(rt)
    assert ours.shape == hf_logits.shape == (2, T, rt.cfg.vocab_size)
    assert max_diff(ours, hf_logits) <= hf_tol      # measured 0.0 (same operations in the same order)
    # Padding changes nothing: row 1 equals transformers on the same tokens unpadded.
    ids, _ = inputs()
    with torch.no_grad():
        alone = load_model(tiny_model_dir)(input_ids=ids[1:, PAD:]).logits
    assert float((ours[1, PAD:] - alone[0]).abs().max()) <= hf_tol    # measured 0.0


# -------------------------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("chunks", [
    [100] + [1] * 50,      # prefill longer than the window (the ring wraps while prefilling), then decode
    [40] + [1] * 110,      # prefill shorter than the window, the ring wraps while decoding
    [70, 80],              # chunked prefill: the second chunk attends over a full ring
    [30, 50, 1, 1, 68],    # chunks and single steps mixed
], ids=["prefill100+decode", "prefill40+decode", "chunks70+80", "mixed"])
def test_cached_decoding_matches_the_full_forward(rt, hf_logits, hf_tol, chunks):
    assert sum(chunks) == T
    ids, mask = inputs()
    cache = rt.new_cache(2, T)
    assert cache.k[0].shape[2] == rt.cfg.sliding_window == 64    # sliding layer: a ring of `window` slots
    assert cache.k[1].shape[2] == T                               # full layer: every column
    hidden, start = [], 0
    with torch.no_grad():
        for n in chunks:
            hidden.append(rt(ids[:, start:start + n], mask[:, start:start + n], cache))
            start += n
        ours = rt.logits(torch.cat(hidden, dim=1))
    assert max_diff(ours, hf_logits) <= hf_tol      # measured 4e-6 .. 6e-6
    # The ring holds exactly the last `window` positions of each row (row 1 has T - PAD real tokens).
    for row, seen in ((0, T), (1, T - PAD)):
        assert sorted(cache.pos[0][row].tolist()) == list(range(seen - 64, seen))
        assert cache.next_pos[row] == seen


def test_a_fixed_cache_decodes_like_the_full_forward(rt, hf_logits, hf_tol):
    """The fixed-shape decode step (what a CUDA graph replays) on CPU: whole buffers, device-side column count."""
    ids, mask = inputs()
    cache = rt.new_cache(2, T)
    with torch.no_grad():
        hidden = [rt(ids[:, :40], mask[:, :40], cache)]
        cache.fix()
        hidden += [rt(ids[:, t:t + 1], mask[:, t:t + 1], cache) for t in range(40, T)]   # the ring wraps here
        ours = rt.logits(torch.cat(hidden, dim=1))
    assert max_diff(ours, hf_logits) <= hf_tol
    assert int(cache.column) == T and cache.k[0].shape[2] == 64
    with pytest.raises(ValueError, match="fixed KV cache"):
        rt(ids[:, :1], mask[:, :1], cache)          # full, and a fixed cache never grows


def test_a_small_cache_grows_and_still_matches_the_full_forward(rt, hf_logits, hf_tol):
    ids, mask = inputs()
    cache = rt.new_cache(2, 5)           # far too small: it must grow (the sliding ring up to its window only)
    with torch.no_grad():
        hidden = [rt(ids[:, :3], mask[:, :3], cache)]
        hidden += [rt(ids[:, t:t + 1], mask[:, t:t + 1], cache) for t in range(3, T)]
        ours = rt.logits(torch.cat(hidden, dim=1))
    assert max_diff(ours, hf_logits) <= hf_tol
    assert cache.k[0].shape[2] == 64 and cache.k[1].shape[2] >= T and cache.capacity < 4 * T


# -------------------------------------------------------------------------------------------------------- adapters

def test_adapter_file_has_expert_lora(adapter_dirs):
    keys = list(tensors_of(adapter_dirs["one"]))
    assert any(k.endswith("mlp.experts.lora_A.weight") for k in keys)              # down_proj
    assert any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in keys)   # gate_up_proj (nested)
    assert any(k.endswith("self_attn.q_proj.lora_B.weight") for k in keys)


def test_adapters_change_the_logits(hf_logits, peft_logits):
    for name in ("one", "two"):
        assert max_diff(peft_logits[name], hf_logits) > 0.5    # measured 6.2 and 4.5 (not a no-op adapter)
    assert max_diff(peft_logits["one"], peft_logits["two"]) > 0.5


def test_attached_adapters_match_peft_and_are_chosen_per_call(rt, hf_logits, peft_logits, hf_tol, peft_tol):
    for name in ("one", None, "two"):            # in turn: nothing an adapter call does sticks to the next call
        ref, limit = (hf_logits, hf_tol) if name is None else (peft_logits[name], peft_tol[name])
        assert max_diff(our_logits(rt, name), ref) <= limit    # measured 0.0 (base), ~7e-6 (adapters)
    assert rt.adapters == ["one", "two"]


def test_merged_adapter_matches_peft_and_unpacks_the_experts(tiny_model_dir, adapter_dirs, peft_logits, peft_tol):
    model = runtime.load(tiny_model_dir, torch.float32, "cpu")
    adapters.merge(model, adapters.read_adapter(adapter_dirs["one"], model))
    assert max_diff(our_logits(model), peft_logits["one"]) <= peft_tol["one"]   # measured ~7e-6
    # Merging an adapter into MXFP4 experts leaves them dense (in the base dtype): requantizing is an export decision.
    for layer in model.layers:
        e = layer.experts
        assert not e.packed and not hasattr(e, "gate_up_blocks") and not hasattr(e, "down_scales")
        assert e.gate_up.dtype == e.down.dtype == torch.float32


# --------------------------------------------------------------------------------------------------- MXFP4 packed

def test_experts_stay_packed(rt):
    cfg = rt.cfg
    E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    for layer in rt.layers:
        e = layer.experts
        assert e.packed and not hasattr(e, "gate_up") and not hasattr(e, "down")
        assert e.gate_up_blocks.dtype == e.gate_up_scales.dtype == torch.uint8
        assert e.down_blocks.dtype == e.down_scales.dtype == torch.uint8
        assert e.gate_up_blocks.shape == (E, 2 * I, H // 32, 16) and e.down_blocks.shape == (E, H, I // 32, 16)


def test_bf16_runtime_holds_about_the_checkpoint_size(tiny_model_dir):
    model = runtime.load(tiny_model_dir, torch.bfloat16, "cpu")
    path = tiny_model_dir / "model.safetensors"
    with open(path, "rb") as f:   # safetensors: an 8-byte length, a JSON header of that length, then the tensors
        header = 8 + int.from_bytes(f.read(8), "little")
    weights_on_disk = path.stat().st_size - header
    # the runtime holds those bytes (bf16 + packed experts) and the rotary tables it computes, nothing more
    computed = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.startswith("rope."))
    assert abs(model.nbytes() - weights_on_disk) <= computed
    assert model.layers[0].experts.gate_up_blocks.dtype == torch.uint8


def test_dense_expert_checkpoint_is_held_dense_and_matches(tiny_model_dir, tmp_path, adapter_dirs, hf_logits,
                                                           peft_logits, hf_tol, peft_tol):
    """A checkpoint with experts stored dense (transformers' ``(E, in, out)`` layout, as a bf16 merge writes them)
    holding the tiny model's exact values (MXFP4 values are exact in bf16) gives the same logits, with adapters too."""
    from safetensors.torch import save_file

    from inference.model.checkpoint import load_state_dict
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    shutil.copy(tiny_model_dir / "config.json", dense_dir)
    save_file(load_state_dict(tiny_model_dir, torch.bfloat16), str(dense_dir / "model.safetensors"))
    model = runtime.load(dense_dir, torch.float32, "cpu")
    cfg = model.cfg
    for layer in model.layers:
        e = layer.experts
        assert not e.packed and not hasattr(e, "gate_up_blocks")
        assert e.gate_up.shape == (cfg.num_local_experts, cfg.hidden_size, 2 * cfg.intermediate_size)
    adapters.attach(model, "one", adapters.read_adapter(adapter_dirs["one"], model))
    assert max_diff(our_logits(model), hf_logits) <= hf_tol                        # measured 0.0
    assert max_diff(our_logits(model, "one"), peft_logits["one"]) <= peft_tol["one"]   # measured ~7e-6


# ------------------------------------------------------------------------------------------------------ bad inputs

def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def linked_copy(model_dir, target, edit: dict | None = None):
    """A model dir whose weights link to the tiny model's, with ``config.json`` edited."""
    target.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (target / f.name).symlink_to(f)
    cfg = json.loads((model_dir / "config.json").read_text()) | (edit or {})
    (target / "config.json").write_text(json.dumps(cfg))
    return target


def test_missing_model_dir(tmp_path):
    msg = user_error(runtime.load, tmp_path / "nope")
    assert "not found" in msg and "nope" in msg


def test_model_dir_without_config(tmp_path):
    assert "config.json" in user_error(runtime.load, tmp_path)


def test_wrong_model_type(tiny_model_dir, tmp_path):
    msg = user_error(runtime.load, linked_copy(tiny_model_dir, tmp_path / "m", {"model_type": "llama"}))
    assert "llama" in msg and "gpt_oss" in msg


@pytest.mark.parametrize("edit, names", [({"intermediate_size": 64}, "model.layers.0.mlp.experts."),
                                         ({"hidden_size": 256}, "lm_head.weight has shape (201088, 128)")])
def test_weights_that_do_not_match_the_config(tiny_model_dir, tmp_path, edit, names):
    model_dir = linked_copy(tiny_model_dir, tmp_path / "m", edit)
    msg = user_error(runtime.load, model_dir)
    assert "do not match config.json" in msg and str(model_dir) in msg and names in msg and "shape" in msg


def adapter_copy(adapter_dir, target, config_edit: dict | None = None, replace: dict | None = None):
    """A copy of an adapter dir with its config edited and some tensors replaced."""
    from safetensors.torch import save_file
    target.mkdir()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text()) | (config_edit or {})
    (target / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors_of(adapter_dir) | (replace or {}), str(target / "adapter_model.safetensors"))
    return target


@pytest.mark.parametrize("module, shape", [("model.layers.0.self_attn.q_proj", (8, 64)),
                                           ("model.layers.1.mlp.experts", (32, 64))])
def test_adapter_for_a_different_base(rt, adapter_dirs, tmp_path, module, shape):
    key = f"base_model.model.{module}.lora_A.weight"
    assert key in tensors_of(adapter_dirs["one"])
    bad = adapter_copy(adapter_dirs["one"], tmp_path / "a", replace={key: torch.zeros(shape)})
    msg = user_error(adapters.read_adapter, bad, rt)
    assert str(bad) in msg and module in msg and "different base" in msg and str(shape) in msg


def test_adapter_dir_missing(rt, tmp_path):
    assert "not found" in user_error(adapters.read_adapter, tmp_path / "nope", rt)


def test_adapter_dir_without_config(rt, adapter_dirs, tmp_path):
    shutil.copy(adapter_dirs["one"] / "adapter_model.safetensors", tmp_path)
    assert "no adapter_config.json" in user_error(adapters.read_adapter, tmp_path, rt)


def test_dora_adapter_is_refused(rt, adapter_dirs, tmp_path):
    bad = adapter_copy(adapter_dirs["one"], tmp_path / "a", config_edit={"use_dora": True})
    msg = user_error(adapters.read_adapter, bad, rt)
    assert "DoRA" in msg and str(bad) in msg


def test_pickled_adapter_is_refused(rt, adapter_dirs, tmp_path):
    shutil.copy(adapter_dirs["one"] / "adapter_config.json", tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"never unpickled")
    msg = user_error(adapters.read_adapter, tmp_path, rt)
    assert "adapter_model.safetensors" in msg and "adapter_model.bin" in msg


def test_unknown_adapter_name_at_forward_time(rt):
    msg = user_error(rt, torch.tensor([[1, 2, 3]]), None, None, "nope")
    assert "'nope'" in msg and "one, two" in msg


def test_adapter_name_used_twice(rt, adapter_dirs):
    msg = user_error(adapters.attach, rt, "one", adapters.read_adapter(adapter_dirs["one"], rt))
    assert "'one'" in msg and "twice" in msg
    assert rt.adapters == ["one", "two"]


def test_compiled_kernels_take_python_floats_as_constants():
    """compile_dynamic: shapes stay dynamic, a float argument is compiled in (no float64 CPU tensor among the graph's
    inputs, which on the GPU is a C++ kernel and inductor's ~50 s CPU-ISA probe) and a new value recompiles."""
    from inference.model.compiled import compile_dynamic
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([(type(x).__name__, getattr(x, "dtype", None)) for x in example_inputs])
        return gm.forward

    f = compile_dynamic(lambda x, alpha, limit: (x * alpha).clamp(max=limit), backend=backend)
    x4, x6 = torch.linspace(0, 8, 4), torch.linspace(0, 8, 6)
    torch.testing.assert_close(f(x4, 1.5, 7.0), (x4 * 1.5).clamp(max=7.0), rtol=0, atol=0)
    torch.testing.assert_close(f(x6, 1.5, 7.0), (x6 * 1.5).clamp(max=7.0), rtol=0, atol=0)
    assert len(graphs) == 1                                             # one graph for both lengths
    assert all(dtype != torch.float64 and kind not in ("float", "SymFloat") for kind, dtype in graphs[0]), graphs
    torch.testing.assert_close(f(x6, 0.5, 7.0), (x6 * 0.5).clamp(max=7.0), rtol=0, atol=0)
    assert len(graphs) == 2                                             # the constant changed: compiled again
    assert torch._dynamo.config.specialize_float is False              # torch's setting is back as it was
