"""GGUF export for llama.cpp (:mod:`finetune.ship.gguf`), read back by gguf-py and run by llama.cpp itself, against our
runtime (:mod:`inference.model.runtime`) on CPU.

Two models of the tiny gpt-oss architecture:

- ``small``: every bias, norm and sink set to seeded random values (the tiny model's zero biases and unit norms
  would hide a bias or norm that went astray) and a 300-id byte-level vocabulary, so that gguf-py's
  ``GGUFReader`` parses its GGUF in a blink (the 650k strings of the real vocabulary take it ~30 s) and llama.cpp
  loads it at once: layout, bytes, metadata, stop tokens, logits, LoRA.
- the tiny model itself, with the real o200k_harmony vocabulary, for what needs it: llama.cpp's tokenizer, and
  logits and greedy decoding on a Harmony conversation (its first 64 positions are inside the sliding window, the
  rest beyond it), in the default bf16 export.

Tolerances, from what llama.cpp computes differently (measured values noted at each constant):

- llama.cpp's CPU kernels multiply MXFP4 experts by activations quantized to 8 bits (q8_0: blocks of 32 with an
  fp16 scale), and it always rounds YaRN's correction range to whole dimensions (gpt-oss ships ``truncate:
  false``). With both emulated in our runtime, the f32 GGUF gives our logits to float32 precision, with and
  without the LoRA: that is the proof that the conversion is exact. q8_0 rounding is discontinuous, though: a 1e-7
  difference in summation order (as around the LoRA's small matmuls) can move one value across a rounding
  boundary, and the one-quantum change travels on to later positions (seen once, on another seed: most positions
  at 2e-5, a few up to 0.03). So the emulated comparison bounds the median position and the mean.
- Without emulation logits differ by ~0.03 at a typical position (mean ~0.008) on logits of magnitude ~3-8; bf16
  weights add little (llama.cpp rounds the matmul inputs to bf16). Now and then a near-tied top-2 expert choice
  flips, which moves that one position's logits by up to ~1.5. So: a mean, a bound per position that only a few
  positions may exceed, and top-1 agreement where the top two logits are not a near-tie.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ATTENTION, EPS32, FP32_MARGIN, make_adapter

from finetune.ship import gguf as export
from inference import harmony
from inference.errors import UserError
from inference.model import adapters, runtime
from inference.model.checkpoint import read_config, save_checkpoint
from inference.model.mxfp4 import FP4_VALUES, unpack
from inference.model.tiny import tiny_config_dict, tiny_state_dict

# f32 GGUF vs ours emulating llama.cpp: the median over positions of the max abs logit difference is held to
# FP32_MARGIN times the same median between our emulating runtime in fp32 and in float64 (measured 1.7e-6 and 1.9e-6
# with the LoRA, against 1.7e-6 between fp32 and float64; unemulated 0.03); the mean abs difference (measured 4e-7;
# unemulated 0.008) to TOL_EMULATED_MEAN, a measured constant: it leaves room for one q8_0 rounding flip travelling on
# (seen once, on another seed: most positions at 2e-5, a few up to 0.03) and is still 8x below the unemulated mean
TOL_EMULATED_MEAN = 1e-3
# GGUF vs ours, llama.cpp's approximations not emulated: these are measured distances from llama.cpp's own arithmetic
# (q8_0 activations, bf16 matmul inputs), not rounding, each with its margin stated: the mean abs logit difference
# (measured 0.008-0.011: ~3x) ...
TOL_MEAN = 0.03
# ... a position's max abs logit difference (measured: median position 0.03-0.06, max 0.06 without a flipped expert
# choice: ~4x) may exceed TOL_POSITION at this share of positions at most (measured: at most one position, by up to
# 1.5; 3% allows 4 of 160) ...
TOL_POSITION = 0.25
OUTLIERS = 0.03
# ... and the argmax agrees at this share of positions at least (measured 0.99-1.0), of those where our top two
# logits are DECISIVE apart (the rest are near-ties, which any rounding may swap: measured 0.966 over all positions;
# DECISIVE is about twice a typical position's max difference, so those differences cannot swap a decisive top two)
DECISIVE = 0.1
TOP1 = 0.95
SMALL_V = 300


# ------------------------------------------------------------------------------------------------------- models

def vary(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random biases, norms and sinks in place of the tiny model's zeros and ones."""
    g = torch.Generator().manual_seed(seed)
    for key, t in state.items():
        if key.endswith("bias") or key.endswith("sinks"):
            state[key] = torch.randn(t.shape, generator=g) * 0.5
        elif key.endswith("norm.weight"):
            state[key] = 1 + torch.randn(t.shape, generator=g) * 0.2
    return state


def small_tokenizer_json() -> str:
    """A byte-level BPE: the 256 byte symbols, two merges, Harmony's stop specials and one plain added token."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"he": 256, "hel": 257}
    tok = Tokenizer(BPE(vocab, [("h", "e"), ("he", "l")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in
                            ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>", "<|end|>")])  # 258..262
    tok.add_tokens([AddedToken("hello world", normalized=False, special=False)])                         # 263
    return tok.to_str()


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    target = tmp_path_factory.mktemp("small") / "model"
    config = tiny_config_dict() | {"vocab_size": SMALL_V, "bos_token_id": 258, "eos_token_id": 260,
                                   "pad_token_id": 259}
    save_checkpoint(vary(tiny_state_dict(config, seed=3), seed=4), config, target)
    (target / "tokenizer.json").write_text(small_tokenizer_json(), encoding="utf-8")
    (target / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def small_ggufs(small_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("small-gguf")
    return {wt: export.write_model(small_dir, root / f"small-{wt}.gguf", weight_type=wt) for wt in ("bf16", "f32")}


@pytest.fixture(scope="module")
def reader(small_ggufs):
    import gguf
    return gguf.GGUFReader(small_ggufs["bf16"])


@pytest.fixture(scope="module")
def harmony_gguf(tiny_model_dir, tmp_path_factory):
    return export.write_model(tiny_model_dir, tmp_path_factory.mktemp("harmony-gguf") / "harmony.gguf")


@pytest.fixture(scope="module")
def adapter_dir(small_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "lora"
    return make_adapter(small_dir, out, seed=1, modules=ATTENTION + ("lm_head",))


@pytest.fixture(scope="module")
def lora_gguf(adapter_dir, small_dir, tmp_path_factory):
    return export.write_lora(adapter_dir, small_dir, tmp_path_factory.mktemp("lora-gguf") / "lora.gguf")


def with_adapter(model, adapter_dir):
    """``model`` with the adapter attached as "lora", and as "no-experts" without its expert part."""
    adapter = adapters.read_adapter(adapter_dir, model)
    adapters.attach(model, "lora", adapter)
    adapters.attach(model, "no-experts", adapters.Adapter(adapter.path, adapter.linear, {}))
    return model


@pytest.fixture(scope="module")
def small(small_dir, adapter_dir):
    """Our runtime, fp32, on the small model, with the adapter."""
    return with_adapter(runtime.load(small_dir, torch.float32, "cpu"), adapter_dir)


@pytest.fixture(scope="module")
def emulated_dir(small_dir, tmp_path_factory):
    """The small model with YaRN's correction range rounded to whole dimensions (``truncate: true``) as llama.cpp
    computes it; the other approximation (q8_0 expert inputs) is patched in by the test using it."""
    target = tmp_path_factory.mktemp("emulated")
    for f in small_dir.iterdir():
        if f.name != "config.json":
            (target / f.name).symlink_to(f)
    cfg = json.loads((small_dir / "config.json").read_text())
    cfg["rope_parameters"]["truncate"] = True
    (target / "config.json").write_text(json.dumps(cfg))
    return target


@pytest.fixture(scope="module")
def emulated(emulated_dir, adapter_dir):
    """Our runtime on that model, in fp32 and (for the tolerance) in float64."""
    return {dtype: with_adapter(runtime.load(emulated_dir, dtype, "cpu"), adapter_dir)
            for dtype in (torch.float32, torch.float64)}


@pytest.fixture(scope="module")
def harmony_model(tiny_model_dir):
    return runtime.load(tiny_model_dir, torch.float32, "cpu")


# ------------------------------------------------------------------------------------------------------- probes

def harmony_probes() -> dict[str, list[int]]:
    """Harmony token ids by openai-harmony, both longer than the sliding window (64): a tool-calling conversation
    with reasoning, and a chat prompt ending where the assistant's next turn starts."""
    tools = [{"name": "get_weather", "description": "Current weather for a city.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Is it raining in Paris right now? I need to know before I go out."},
                {"role": "assistant", "thinking": "I should look the weather up rather than guess.",
                 "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]}]
    chat = [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."},
            {"role": "user", "content": "And one larger than a hundred?"}]
    (tools_call,) = harmony.render_for_training(messages, tools)   # one assistant turn: one sequence
    return {"tools": tools_call.ids, "chat": harmony.render_prompt(chat)}


HARMONY = harmony_probes()
SMALL_IDS = torch.randint(0, SMALL_V, (160,), generator=torch.Generator().manual_seed(0)).tolist()  # > window 64


@torch.no_grad()
def our_logits(model, ids: list[int], adapter: str | None = None) -> np.ndarray:
    return model.logits(model(torch.tensor([ids]), adapter=adapter), adapter)[0].numpy()


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Logit differences ``(T, V)``: max, median and per position of the per-position max, mean, top-1 agreement
    (over all positions, and over the decisive ones)."""
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs)
    per_position = diff.max(axis=-1)
    top2 = np.sort(ours, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= DECISIVE
    same = ours.argmax(-1) == theirs.argmax(-1)
    return {"max": float(per_position.max()), "median": float(np.median(per_position)), "mean": float(diff.mean()),
            "top1": float(same.mean()), "top1_decisive": float(same[decisive].mean()), "per_position": per_position}


def report(what: str, got: dict) -> None:
    print(f"\n{what}: max {got['max']:.2e}, median position {got['median']:.2e}, mean {got['mean']:.2e}, "
          f"top-1 {got['top1']:.3f} ({got['top1_decisive']:.3f} where decisive)", end="")


def assert_close(got: dict) -> None:
    assert got["mean"] < TOL_MEAN
    assert (got["per_position"] > TOL_POSITION).mean() <= OUTLIERS
    assert got["top1_decisive"] >= TOP1


@pytest.fixture(scope="module")
def llama_small(small_ggufs, lora_gguf):
    """llama.cpp's logits on the small model by (weight type, adapter), each computed once."""
    return {(wt, lora): export.llama_logits(small_ggufs[wt], SMALL_IDS, lora_file=lora and lora_gguf)
            for wt in ("bf16", "f32") for lora in (None, "lora")}


# -------------------------------------------------------------------------------------------------- MXFP4 layout

def test_mxfp4_relayout_of_a_hand_made_block():
    import gguf
    # One group of 32 values whose e2m1 code is its index mod 16: HF byte j = code(2j) | code(2j+1) << 4.
    codes = [k % 16 for k in range(32)]
    blocks = torch.tensor([[codes[2 * j] | codes[2 * j + 1] << 4 for j in range(16)]], dtype=torch.uint8)  # (1, 16)
    scales = torch.tensor([128], dtype=torch.uint8)                      # (1,): E8M0 128 = 2 ** 1
    raw = export.mxfp4_to_ggml(blocks, scales)
    # GGML: the scale byte, then qs[j] = code(j) | code(j + 16) << 4 = j | j << 4, i.e. 0x00, 0x11, ..., 0xFF
    assert raw.tolist() == [128] + [j | j << 4 for j in range(16)]
    # by hand: element k = e2m1(k % 16) * 2 -> 0, 1, 2, 3, 4, 6, 8, 12, -0, -1, -2, -3, -4, -6, -8, -12, twice
    by_hand = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12] * 2
    assert gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.MXFP4).tolist() == by_hand
    assert unpack(blocks, scales).tolist() == [v * 2 for v in FP4_VALUES] * 2 == by_hand


def tensor(reader, name: str):
    (t,) = [t for t in reader.tensors if t.name == name]
    return t


def test_experts_keep_their_exact_mxfp4_codes_and_split_gate_up(reader, small_dir):
    import gguf
    from safetensors.torch import load_file
    src = load_file(str(small_dir / "model.safetensors"))
    for i in range(2):
        e = f"model.layers.{i}.mlp.experts."
        for name, proj, rows in (("ffn_gate_exps", "gate_up_proj", slice(0, None, 2)),
                                 ("ffn_up_exps", "gate_up_proj", slice(1, None, 2)),
                                 ("ffn_down_exps", "down_proj", slice(None))):
            t = tensor(reader, f"blk.{i}.{name}.weight")
            blocks, scales = src[e + proj + "_blocks"][:, rows], src[e + proj + "_scales"][:, rows]
            assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
            # gguf-py's own MXFP4 decoder on the file's bytes == our decoder on the checkpoint's, exactly
            values = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.MXFP4)
            assert np.array_equal(values, unpack(blocks, scales).numpy())
            # and bit for bit the same codes (a re-quantization could turn -0 into +0 and still decode equal)
            raw = np.asarray(t.data).reshape(*blocks.shape[:3], 17)            # (E, out, groups, 1 + 16)
            qs = torch.from_numpy(raw[..., 1:].copy())
            codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)                    # element order
            assert torch.equal(codes[..., 0::2] | codes[..., 1::2] << 4, blocks)
            assert torch.equal(torch.from_numpy(raw[..., 0].copy()), scales)
        for name, key, cols in (("ffn_gate_exps", "gate_up_proj_bias", slice(0, None, 2)),
                                ("ffn_up_exps", "gate_up_proj_bias", slice(1, None, 2)),
                                ("ffn_down_exps", "down_proj_bias", slice(None))):
            bias = np.asarray(tensor(reader, f"blk.{i}.{name}.bias").data)
            assert np.array_equal(bias, src[e + key][:, cols].float().numpy())
            assert bias.std() > 0.1                                            # a real (varied) bias


# ------------------------------------------------------------------------------------------- what the file holds

def field(reader, key: str):
    return reader.fields[key].contents()


def test_metadata_and_tokenizer_read_back(reader):
    import gguf
    assert field(reader, "general.architecture") == "gpt-oss"
    assert field(reader, "general.type") == "model"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    expected = {"context_length": 4096, "embedding_length": 128, "block_count": 2, "feed_forward_length": 128,
                "expert_feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2,
                "attention.key_length": 32, "attention.value_length": 32, "expert_count": 4,
                "expert_used_count": 2, "attention.sliding_window": 64, "attention.sliding_window_pattern":
                [True, False], "rope.freq_base": 150000.0, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
                "rope.scaling.original_context_length": 4096, "rope.scaling.yarn_beta_fast": 32.0,
                "rope.scaling.yarn_beta_slow": 1.0}
    assert {k: field(reader, "gpt-oss." + k) for k in expected} == expected
    assert field(reader, "gpt-oss.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tok = {k: field(reader, "tokenizer.ggml." + k) for k in (
        "model", "pre", "bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "padding_token_id",
        "add_bos_token")}
    assert tok == {"model": "gpt2", "pre": "gpt-4o", "bos_token_id": 258, "eos_token_id": 260, "eot_token_id": 260,
                   "eom_token_id": 261, "padding_token_id": 259, "add_bos_token": False}
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == SMALL_V
    assert tokens[256:264] == ["he", "hel", "<|startoftext|>", "<|endoftext|>", "<|return|>", "<|call|>", "<|end|>",
                               "hello world"]
    T = gguf.TokenType
    assert types[0] == types[257] == T.NORMAL and types[263] == T.USER_DEFINED
    assert set(types[258:263]) == {T.CONTROL} and set(types[264:]) == {T.UNUSED} and tokens[299] == "[PAD299]"
    assert field(reader, "tokenizer.ggml.merges") == ["h e", "he l"]
    assert field(reader, "tokenizer.chat_template") == "{{ messages }}"


def test_tensor_table(reader):
    import gguf
    Q = gguf.GGMLQuantizationType
    H, I, E, D, V = 128, 128, 4, 32, SMALL_V
    # GGML order (innermost first), as llama.cpp's loader checks them (models/openai-moe.cpp)
    want = {"token_embd.weight": (Q.BF16, [H, V]), "output_norm.weight": (Q.F32, [H]),
            "output.weight": (Q.BF16, [H, V])}
    for i in range(2):
        b = f"blk.{i}."
        want |= {b + "attn_norm.weight": (Q.F32, [H]), b + "post_attention_norm.weight": (Q.F32, [H]),
                 b + "attn_q.weight": (Q.BF16, [H, 4 * D]), b + "attn_q.bias": (Q.F32, [4 * D]),
                 b + "attn_k.weight": (Q.BF16, [H, 2 * D]), b + "attn_k.bias": (Q.F32, [2 * D]),
                 b + "attn_v.weight": (Q.BF16, [H, 2 * D]), b + "attn_v.bias": (Q.F32, [2 * D]),
                 b + "attn_output.weight": (Q.BF16, [4 * D, H]), b + "attn_output.bias": (Q.F32, [H]),
                 b + "attn_sinks.weight": (Q.F32, [4]), b + "ffn_gate_inp.weight": (Q.F32, [H, E]),
                 b + "ffn_gate_inp.bias": (Q.F32, [E]),
                 b + "ffn_gate_exps.weight": (Q.MXFP4, [H, I, E]), b + "ffn_gate_exps.bias": (Q.F32, [I, E]),
                 b + "ffn_up_exps.weight": (Q.MXFP4, [H, I, E]), b + "ffn_up_exps.bias": (Q.F32, [I, E]),
                 b + "ffn_down_exps.weight": (Q.MXFP4, [I, H, E]), b + "ffn_down_exps.bias": (Q.F32, [H, E])}
    got = {t.name: (t.tensor_type, [int(n) for n in t.shape]) for t in reader.tensors}
    assert got == want


def test_weights_are_the_checkpoints_own(reader, small_ggufs, small_dir):
    import gguf
    from safetensors.torch import load_file
    src = load_file(str(small_dir / "model.safetensors"))
    q = np.asarray(tensor(reader, "blk.1.attn_q.weight").data).view(np.uint16)
    assert np.array_equal(q, src["model.layers.1.self_attn.q_proj.weight"].view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(np.asarray(tensor(reader, "blk.0.attn_sinks.weight").data),
                          src["model.layers.0.self_attn.sinks"].float().numpy())
    out = tensor(gguf.GGUFReader(small_ggufs["f32"]), "output.weight")
    assert out.tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(np.asarray(out.data), src["lm_head.weight"].float().numpy())


# ------------------------------------------------------------------------------------ llama.cpp: the small model

@pytest.mark.parametrize("weight_type", ["bf16", "f32"])
@pytest.mark.parametrize("lora", [None, "lora"])
def test_logits_match_our_runtime(small, llama_small, weight_type, lora):
    got = compare(our_logits(small, SMALL_IDS, lora), llama_small[weight_type, lora])
    report(f"{weight_type} GGUF{' + LoRA' if lora else ''}, {len(SMALL_IDS)} tokens", got)
    assert_close(got)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0 and back: per 32 values, d = amax / 127 (kept as fp16), q = round(x / d)."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(d > 0, d, 1))
    return (q * d.half().float()).reshape(x.shape)


@pytest.mark.parametrize("lora", [None, "lora"])
def test_f32_gguf_is_exact_under_llama_cpp_arithmetic(emulated, llama_small, monkeypatch, lora):
    """With llama.cpp's two approximations emulated in our runtime, the f32 GGUF's logits are ours, with and
    without the LoRA: the conversion adds no error, and every part of the adapter reaches llama.cpp."""
    def project(self, x, proj, e, loras):   # q8_0 input for the MXFP4 matmul only; the F32 LoRA path sees x as is
        y = base_project(self, q8_0(x), proj, e, None)
        if loras and proj in loras:
            y = y + (x @ loras[proj].A[e].T) @ loras[proj].B[e] * loras[proj].scale
        return y

    base_project = runtime.Experts._project
    monkeypatch.setattr(runtime.Experts, "_project", project)
    ours = our_logits(emulated[torch.float32], SMALL_IDS, lora)
    got = compare(ours, llama_small["f32", lora])
    report(f"f32 GGUF{' + LoRA' if lora else ''}, llama.cpp's arithmetic emulated", got)
    fp32 = compare(ours, our_logits(emulated[torch.float64], SMALL_IDS, lora))   # our own fp32 rounding
    assert got["median"] <= FP32_MARGIN * max(fp32["median"], EPS32 * float(np.abs(ours).max()))
    assert got["mean"] < TOL_EMULATED_MEAN and got["top1"] == 1.0


def test_expert_lora_reaches_llama_cpp(small, llama_small):
    theirs = llama_small["f32", "lora"]
    moved = compare(theirs, llama_small["f32", None])
    # the adapter moves llama.cpp's logits as much as ours ...
    assert moved["mean"] > 5 * TOL_MEAN and moved["top1"] < 0.8
    # ... and that includes its expert part: without it, ours are far from llama.cpp's
    assert compare(our_logits(small, SMALL_IDS, "no-experts"), theirs)["mean"] > 5 * TOL_MEAN
    assert compare(our_logits(small, SMALL_IDS, "lora"), theirs)["mean"] < TOL_MEAN


# -------------------------------------------------------------------------- llama.cpp: Harmony, the real vocab

def test_llama_tokenizes_harmony_as_openai_harmony(harmony_gguf):
    ids = HARMONY["tools"]
    text = harmony.encoding().decode(ids)
    assert all(special in text for special in ("<|constrain|>", "<|channel|>", "<|call|>"))
    assert export.llama_tokenize(harmony_gguf, text) == ids


def test_llama_stops_at_return_and_call_only(small_ggufs):
    import llama_cpp
    with export._llama(small_ggufs["bf16"], vocab_only=True) as llm:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        eog = {t for t in range(SMALL_V) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        assert eog == {259, 260, 261}            # <|endoftext|>, <|return|>, <|call|>; <|end|> ends a message only
        assert llama_cpp.llama_vocab_eos(vocab) == llama_cpp.llama_vocab_eot(vocab) == 260
        assert llm.tokenize(b"<|return|>hello worldhel", add_bos=False, special=True) == [260, 263, 257]


@pytest.mark.parametrize("probe", HARMONY)
def test_harmony_logits_match_our_runtime(harmony_model, harmony_gguf, probe):
    ids = HARMONY[probe]
    got = compare(our_logits(harmony_model, ids), export.llama_logits(harmony_gguf, ids))
    report(f"bf16 GGUF, Harmony {probe} ({len(ids)} tokens)", got)
    assert_close(got)


def test_greedy_continuation_matches(harmony_model, harmony_gguf):
    from inference.engine import Engine
    prompt = harmony.render_prompt([{"role": "user", "content": "Tell me a story about a lighthouse."}])
    (mine,) = Engine(harmony_model, "harmony").generate([prompt], 6)
    assert export.llama_greedy(harmony_gguf, prompt, 6) == mine


# --------------------------------------------------------------------------------------------------------- LoRA

def test_lora_file_layout(lora_gguf, adapter_dir, small_dir):
    import gguf
    reader = gguf.GGUFReader(lora_gguf)
    assert (field(reader, "general.type"), field(reader, "general.architecture"), field(reader, "adapter.type")) == (
        "adapter", "gpt-oss", "lora")
    assert field(reader, "adapter.lora.alpha") == 16.0                 # llama.cpp's alpha / r = PEFT's 16 / 8
    got = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    H, I, E, r = 128, 128, 4, 8
    for i in range(2):   # GGML order, as llama-adapter.cpp checks them against the base tensors
        b = f"blk.{i}."
        assert got[b + "attn_q.weight.lora_a"] == [H, r] and got[b + "attn_q.weight.lora_b"] == [r, 128]
        assert got[b + "attn_k.weight.lora_b"] == [r, 64] and got[b + "attn_output.weight.lora_a"] == [128, r]
        assert got[b + "ffn_gate_exps.weight.lora_a"] == got[b + "ffn_up_exps.weight.lora_a"] == [H, r, E]
        assert got[b + "ffn_gate_exps.weight.lora_b"] == got[b + "ffn_up_exps.weight.lora_b"] == [r, I, E]
        assert got[b + "ffn_down_exps.weight.lora_a"] == [I, r, E]
        assert got[b + "ffn_down_exps.weight.lora_b"] == [r, H, E]
    assert got["output.weight.lora_a"] == [H, r] and got["output.weight.lora_b"] == [r, SMALL_V]     # lm_head
    assert len(got) == 2 * 2 * (4 + 3) + 2               # layers x (a, b) x (4 projections + 3 experts), lm_head
    # gate_up's B split by output column: even -> gate, odd -> up; A shared
    lora = adapters.read_adapter(adapter_dir, read_config(small_dir)).experts["model.layers.1"]["gate_up"]
    B = lora.B.transpose(1, 2).numpy()                                # (E, 2I, r)
    for name, rows in (("ffn_gate_exps", slice(0, None, 2)), ("ffn_up_exps", slice(1, None, 2))):
        assert np.array_equal(np.asarray(tensor(reader, f"blk.1.{name}.weight.lora_b").data), B[:, rows])
        assert np.array_equal(np.asarray(tensor(reader, f"blk.1.{name}.weight.lora_a").data), lora.A.numpy())


def test_rslora_alpha_keeps_peft_scale(adapter_dir, small_dir, tmp_path):
    import gguf
    rs = tmp_path / "rs"
    shutil.copytree(adapter_dir, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text()) | {"use_rslora": True}
    (rs / "adapter_config.json").write_text(json.dumps(cfg))
    reader = gguf.GGUFReader(export.write_lora(rs, small_dir, tmp_path / "rs.gguf"))
    assert field(reader, "adapter.lora.alpha") / 8 == pytest.approx(16 / 8 ** 0.5, rel=1e-6)   # PEFT: alpha/sqrt(r)


# --------------------------------------------------------------------------------------------------- read back

TWO_D = ["token_embd.weight"] + [f"blk.{i}.attn_{p}.weight" for i in range(2) for p in ("q", "k", "v", "output")] + [
    "output.weight"]                                     # the weights weight_type applies to, in the writer's order


def read_back_passes(result, file) -> None:
    """``result`` passed, having compared every tensor the file holds (bytes too) and every metadata key."""
    import gguf
    reader = gguf.GGUFReader(file)
    assert result.passed and result.failures == [], result.failures
    assert result.parsed is False            # the header was the plan's, byte for byte: no parse needed
    assert result.tensors == result.file_tensors == result.planned_tensors == len(reader.tensors)
    assert result.nbytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert result.keys == len([k for k in reader.fields if not k.startswith("GGUF.")])
    assert result.line().endswith("-> PASS") and f"{result.tensors} of {result.tensors} tensors" in result.line()
    assert result.to_dict()["kind"] == "file read back" and result.to_dict()["decides"] is True


@pytest.mark.parametrize("weight_type", ["bf16", "f32"])
def test_model_gguf_reads_back_as_planned(small_ggufs, small_dir, weight_type):
    result = export.read_back_model(small_dir, small_ggufs[weight_type], weight_type=weight_type)
    read_back_passes(result, small_ggufs[weight_type])
    assert result.tensors == 3 + 2 * 19 and result.keys > 30       # embedding, norm, head; 19 a layer; tokenizer


def test_lora_gguf_reads_back_as_planned(lora_gguf, adapter_dir, small_dir):
    result = export.read_back_lora(adapter_dir, small_dir, lora_gguf)
    read_back_passes(result, lora_gguf)
    assert result.tensors == 30


def test_one_flipped_expert_byte_fails_naming_that_tensor(small_ggufs, small_dir, tmp_path):
    import gguf
    broken = tmp_path / "broken.gguf"
    shutil.copyfile(small_ggufs["bf16"], broken)
    t = tensor(gguf.GGUFReader(broken), "blk.1.ffn_up_exps.weight")
    with open(broken, "r+b") as f:                       # one byte in the middle of the tensor's MXFP4 data
        f.seek(t.data_offset + t.n_bytes // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))
    result = export.read_back_model(small_dir, broken)
    assert not result.passed and result.failures == [f"blk.1.ffn_up_exps.weight: 1 of {t.n_bytes:,} bytes differ"]
    assert not result.parsed                             # found at the offsets the plan's header implies
    assert result.tensors == 41                          # every tensor still compared: the others are as planned
    assert result.line().endswith(f"-> FAIL: blk.1.ffn_up_exps.weight: 1 of {t.n_bytes:,} bytes differ")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(broken.read_bytes()[:t.data_offset])
    (failure,) = export.read_back_model(small_dir, truncated).failures
    assert failure.startswith("truncated.gguf: not a readable GGUF")


def test_another_adapters_lora_fails_naming_its_tensors(adapter_dir, small_dir, tmp_path):
    import gguf
    other = make_adapter(small_dir, tmp_path / "other" / adapter_dir.name, seed=2, modules=ATTENTION + ("lm_head",))
    other_gguf = export.write_lora(other, small_dir, tmp_path / "other.gguf")
    result = export.read_back_lora(adapter_dir, small_dir, other_gguf)
    names = [t.name for t in gguf.GGUFReader(other_gguf).tensors]
    # same names, shapes, rank and alpha (the metadata passes); every tensor's values are another seed's
    assert len(result.failures) == len(names) == 30 and result.tensors == 30
    assert [f.split(": ")[0] for f in result.failures] == names
    assert all(f.endswith("bytes differ") and ".lora_" in f for f in result.failures)
    assert result.line().endswith("; and 27 more")


def test_read_back_names_types_metadata_and_missing_tensors(small_ggufs, small_dir, adapter_dir, tmp_path):
    # an f32 file where the plan says bf16: the 2-D weights' types
    result = export.read_back_model(small_dir, small_ggufs["f32"], weight_type="bf16")
    assert result.failures == [f"{name}: type F32, planned BF16" for name in TWO_D]
    assert result.tensors == 41 - len(TWO_D)
    # a config llama.cpp reads differently (2 experts per token in the file, 3 in the source)
    edited = edited_copy(small_dir, tmp_path / "m", config={"num_experts_per_tok": 3})
    result = export.read_back_model(edited, small_ggufs["bf16"], name=small_dir.name)
    assert result.parsed and result.failures == ["metadata gpt-oss.expert_used_count: 2, planned 3"]
    # an adapter without expert LoRA against the file with it, and the other way round
    attention = make_adapter(small_dir, tmp_path / "attention" / adapter_dir.name, seed=1,
                             modules=ATTENTION + ("lm_head",), experts=())
    experts = {f"blk.{i}.ffn_{p}_exps.weight.lora_{ab}" for i in range(2) for p in ("gate", "up", "down")
               for ab in "ab"}
    result = export.read_back_lora(attention, small_dir, export.write_lora(adapter_dir, small_dir,
                                                                            tmp_path / "full.gguf"))
    extra = {f.split(": ")[0] for f in result.failures if f.endswith(": in the file, not planned")}
    assert extra == experts and result.file_tensors == 30 and result.planned_tensors == 18
    result = export.read_back_lora(adapter_dir, small_dir, export.write_lora(attention, small_dir,
                                                                              tmp_path / "attention.gguf"))
    missing = {f.split(": ")[0] for f in result.failures if f.endswith(": missing from the file")}
    assert missing == experts and result.file_tensors == 18


# ------------------------------------------------------------------------------------------------------ refusals

def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def edited_copy(model_dir, target, *, config: dict | None = None, tensors=None):
    """A copy of ``model_dir`` with config.json edited and ``tensors(state) -> state`` applied to its weights."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(model_dir, target)
    if config:
        cfg = json.loads((target / "config.json").read_text()) | config
        (target / "config.json").write_text(json.dumps(cfg))
    if tensors:
        save_file(tensors(load_file(str(target / "model.safetensors"))), str(target / "model.safetensors"))
    return target


def test_a_config_without_bos_takes_the_tokenizers_startoftext(small_dir, small_ggufs, tmp_path):
    """openai/gpt-oss-20b's published config.json names no bos_token_id (transformers reads None): the GGUF gets the
    tokenizer's own <|startoftext|>, as from a config that names it, and reads back as planned."""
    import gguf
    edited = edited_copy(small_dir, tmp_path / "m", config={"bos_token_id": None})
    out = export.write_model(edited, tmp_path / "nobos.gguf", name=small_dir.name)
    bos = [gguf.GGUFReader(f).fields["tokenizer.ggml.bos_token_id"].contents() for f in (out, small_ggufs["bf16"])]
    assert bos[0] == bos[1] == 258
    assert export.read_back_model(edited, out, name=small_dir.name).passed


def test_dense_experts_are_refused(small_dir, tmp_path):
    def densify(state):
        blocks = state.pop("model.layers.0.mlp.experts.gate_up_proj_blocks")
        scales = state.pop("model.layers.0.mlp.experts.gate_up_proj_scales")
        state["model.layers.0.mlp.experts.gate_up_proj"] = unpack(blocks, scales).transpose(1, 2).contiguous()
        return state
    msg = user_error(export.write_model, edited_copy(small_dir, tmp_path / "m", tensors=densify), tmp_path / "o.gguf")
    assert "dense" in msg and "model.layers.0.mlp.experts.gate_up_proj" in msg
    assert not (tmp_path / "o.gguf").exists()


def test_tensors_without_a_place_are_refused(small_dir, tmp_path):
    def extra(state):
        return state | {"model.layers.1.mlp.shared_expert.weight": torch.zeros(4, 4)}
    msg = user_error(export.write_model, edited_copy(small_dir, tmp_path / "m", tensors=extra), tmp_path / "o.gguf")
    assert "no place" in msg and "model.layers.1.mlp.shared_expert.weight" in msg


def test_settings_llama_cpp_hard_codes_are_refused(small_dir, tmp_path):
    msg = user_error(export.write_model, edited_copy(small_dir, tmp_path / "m", config={"swiglu_limit": 10.0}),
                     tmp_path / "o.gguf")
    assert "swiglu_limit 10.0" in msg and "7.0" in msg
    assert "weight_type" in user_error(export.write_model, small_dir, tmp_path / "o.gguf", weight_type="q8_0")


def test_adapter_with_a_module_the_export_cannot_carry_is_refused(adapter_dir, small_dir, tmp_path):
    # A router LoRA: llama.cpp could apply one, but our runtime cannot, so the export could not be checked against
    # it; the whole adapter is refused, naming the module, rather than written without it.
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "router"
    shutil.copytree(adapter_dir, bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    state |= {"base_model.model.model.layers.0.mlp.router.lora_A.weight": torch.ones(8, 128),
              "base_model.model.model.layers.0.mlp.router.lora_B.weight": torch.ones(4, 8)}
    save_file(state, str(bad / "adapter_model.safetensors"))
    msg = user_error(export.write_lora, bad, small_dir, tmp_path / "o.gguf")
    assert "model.layers.0.mlp.router" in msg
    assert not (tmp_path / "o.gguf").exists()


def test_missing_llama_input_is_a_user_error(tmp_path):
    assert "not found" in user_error(export.llama_logits, tmp_path / "none.gguf", [1, 2])
