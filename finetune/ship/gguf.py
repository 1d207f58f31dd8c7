"""GGUF export for llama.cpp: a gpt-oss model directory becomes one GGUF file, a PEFT adapter a GGUF LoRA.

This module owns the mapping from our HF-layout gpt-oss (``inference.model.checkpoint``) and PEFT adapters
(``inference.model.adapters``) to llama.cpp's ``gpt-oss`` architecture, and the llama.cpp calls that check an export:

- :func:`write_model`: hyper-parameters, the o200k_harmony tokenizer and every tensor under llama.cpp's name. Experts
  stay MXFP4: the checkpoint's codes and scales are moved into GGML's ``block_mxfp4`` byte layout, never re-quantized,
  and the interleaved ``gate_up`` is split into ``ffn_gate_exps`` / ``ffn_up_exps``.
- :func:`write_lora`: an adapter as ``llama_adapter_lora_init`` loads it (``<base tensor>.lora_a`` / ``.lora_b``,
  expert LoRA as 3-D per-expert tensors for llama.cpp's ``mul_mat_id`` LoRA path), with ``adapter.lora.alpha`` chosen
  so that llama.cpp's ``alpha / rank`` is PEFT's scale.
- :func:`read_back_model`, :func:`read_back_lora`: a written file read back (memory-mapped, one tensor in memory at a
  time) and held against the writer's own plan, re-made from the same source: its header byte for byte (every
  metadata key and value, each tensor's name, GGML type and shape), then each tensor's bytes (MXFP4 experts bit for
  bit); where the header differs, gguf-py parses the file to name what differs. It proves the
  file holds exactly what the writer planned from that source, at any size (:class:`ReadBack`). The plan itself (names,
  layouts, the gate/up split) it shares with the writer, so a mistake there passes it: ``tests/test_gguf.py`` checks
  the plan against the checkpoint independently, and llama.cpp's runs on the tiny model check that llama.cpp computes
  with it what our runtime does.
- :func:`llama_logits`, :func:`llama_greedy`, :func:`llama_tokenize`: llama.cpp (through llama-cpp-python) on a GGUF,
  for parity checks against :mod:`inference.model.runtime`.

Shapes are written in numpy order (outermost first); GGUF stores them reversed, so a numpy ``(E, I, H)`` tensor is
GGML's ``ne = {H, I, E}``. ``H`` hidden, ``I`` expert intermediate size, ``E`` experts, ``V`` vocabulary, ``r`` rank.
The writers and read-backs need the ``gguf`` package and the helpers need ``llama_cpp``: the project's ``gguf`` extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from inference.errors import UserError
from inference.model.checkpoint import TensorFiles, read_config
from inference.model.runtime import expected_shapes

ARCH = "gpt-oss"
WEIGHT_TYPES = ("bf16", "f32")
INSTALL_HINT = 'install the project\'s gguf extra: pip install -e ".[gguf]"'
# llama.cpp's gpt-oss graph hard-codes its SwiGLU constants and reads no YaRN betas for this architecture, so a
# checkpoint with other values cannot be represented (llama-graph.cpp, LLM_FFN_SWIGLU_OAI_MOE; llama-hparams.h).
LLAMA_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
LLAMA_YARN_BETAS = {"beta_fast": 32.0, "beta_slow": 1.0}
# Harmony's turn ends. llama.cpp stops generating at its end-of-generation set, which it builds from token texts
# (<|return|> and <|call|> are on that list, and <|end|> is taken off it when both are present); naming them as the
# eot/eom ids as well keeps llama.cpp from guessing an eot token from the texts (it would pick <|end|> or
# <|endoftext|>, whichever its hash map yields first).
RETURN, CALL, START_OF_TEXT = "<|return|>", "<|call|>", "<|startoftext|>"
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError(f"GGUF export needs the gguf package; {INSTALL_HINT}") from None
    return gguf


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"running a GGUF needs llama-cpp-python; {INSTALL_HINT}") from None
    return llama_cpp


# ------------------------------------------------------------------------------------------------- MXFP4 layout

def mxfp4_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """HF MXFP4 ``blocks (..., G, 16)`` + ``scales (..., G)`` → GGML ``block_mxfp4`` bytes ``(..., G * 17)``.

    Only bits move. HF: byte ``j`` of a group holds element ``2j`` (low nibble) and ``2j+1`` (high nibble). GGML
    (ggml-common.h, ``dequantize_row_mxfp4``): one E8M0 byte, then 16 bytes where ``qs[j]`` holds element ``j`` (low)
    and ``j+16`` (high). The 4-bit codes index the same e2m1 table on both sides (GGML doubles the table and halves
    the scale), and the E8M0 byte is copied as is.
    """
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)      # (..., G, 32) in element order
    qs = codes[..., :16] | (codes[..., 16:] << 4)                              # (..., G, 16)
    return torch.cat((scales.unsqueeze(-1), qs), dim=-1).flatten(-2).contiguous().numpy()


# --------------------------------------------------------------------------------------------------- file writing

@dataclass
class _Tensor:
    """One tensor of the output: ``shape`` in numpy order (bytes per row for MXFP4), produced only when written."""

    name: str
    shape: tuple[int, ...]
    qtype: str                                  # a gguf.GGMLQuantizationType name: F32, BF16, MXFP4
    load: Callable[[], np.ndarray]

    @property
    def np_dtype(self):
        return {"F32": np.float32, "BF16": np.uint16, "MXFP4": np.uint8}[self.qtype]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.np_dtype).itemsize

    @property
    def ggml_shape(self) -> list[int]:
        """GGML's ``ne`` as the file's tensor info holds it: innermost first, in elements (MXFP4: 32 per 17 bytes)."""
        gguf = _gguf()
        shape = self.shape
        if self.qtype == "MXFP4":
            shape = gguf.quants.quant_shape_from_byte_shape(shape, gguf.GGMLQuantizationType.MXFP4)
        return [int(n) for n in reversed(shape)]


def _write(writer, tensors: list[_Tensor], out_file: Path, what: str) -> Path:
    """Write header, metadata and ``tensors`` (one at a time, so memory stays at one tensor) to ``out_file``, via a
    temporary file renamed into place. A progress bar appears only if writing takes more than a few seconds."""
    from tqdm.auto import tqdm
    gguf = _gguf()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, t.np_dtype, t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(t.nbytes for t in tensors)
        with tqdm(total=total, desc=f"writing {what}", unit="B", unit_scale=True, delay=3.0, leave=False) as bar:
            for t in tensors:
                data = t.load()
                if data.dtype != t.np_dtype or data.nbytes != t.nbytes:
                    raise RuntimeError(f"{t.name}: produced {data.dtype} {data.shape}, planned {t.qtype} {t.shape}")
                writer.write_tensor_data(data)
                bar.update(t.nbytes)
        writer.close()
        os.replace(tmp, out_file)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out_file


def _as(t: torch.Tensor, qtype: str) -> np.ndarray:
    """Values of ``t`` as the bytes of ``qtype`` (numpy has no bfloat16, so BF16 travels as its uint16 bits)."""
    if qtype == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.to(torch.float32).contiguous().numpy()


def _tensor_name(kind: str, layer: int | None = None, suffix: str = "weight") -> str:
    """llama.cpp's name for a tensor, from gguf-py's own table (``kind`` is a ``gguf.MODEL_TENSOR`` member name)."""
    gguf = _gguf()
    member = gguf.MODEL_TENSOR[kind]
    assert member in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT_OSS], kind
    return gguf.TENSOR_NAMES[member].format(bid=layer) + "." + suffix


# ------------------------------------------------------------------------------------------------------ the model

# Per-layer tensors other than the experts: source suffix -> (gguf kind, suffix, F32 always?). Norms, biases and
# sinks are F32 (llama.cpp's 1-D ops want F32); so is the router, as llama.cpp's converter and quantizer keep it:
# top-k routing flips on small errors, and the tensor is tiny.
_LAYER_TENSORS = {
    "input_layernorm.weight": ("ATTN_NORM", "weight", True),
    "post_attention_layernorm.weight": ("ATTN_POST_NORM", "weight", True),
    "self_attn.q_proj.weight": ("ATTN_Q", "weight", False),
    "self_attn.q_proj.bias": ("ATTN_Q", "bias", True),
    "self_attn.k_proj.weight": ("ATTN_K", "weight", False),
    "self_attn.k_proj.bias": ("ATTN_K", "bias", True),
    "self_attn.v_proj.weight": ("ATTN_V", "weight", False),
    "self_attn.v_proj.bias": ("ATTN_V", "bias", True),
    "self_attn.o_proj.weight": ("ATTN_OUT", "weight", False),
    "self_attn.o_proj.bias": ("ATTN_OUT", "bias", True),
    "self_attn.sinks": ("ATTN_SINKS", "weight", True),
    "mlp.router.weight": ("FFN_GATE_INP", "weight", True),
    "mlp.router.bias": ("FFN_GATE_INP", "bias", True),
}
_DENSE_EXPERTS = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)")


def _check_source(model_dir: Path, cfg, source: TensorFiles) -> None:
    """Refuse, naming the tensors, a checkpoint that llama.cpp's gpt-oss cannot carry exactly."""
    def listing(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")

    dense = sorted(k for k in source.shapes if _DENSE_EXPERTS.fullmatch(k))
    if dense:
        raise UserError(f"{model_dir}: experts are dense ({listing(dense)}); GGUF export carries MXFP4 experts as "
                        "they are (*_blocks/*_scales) and does not quantize; export from an MXFP4 checkpoint, or "
                        "merge with experts='mxfp4' first")
    want = expected_shapes(cfg)
    extra = sorted(set(source.shapes) - set(want))
    if extra:
        raise UserError(f"{model_dir}: tensors with no place in llama.cpp's gpt-oss: {listing(extra)}")
    missing = sorted(set(want) - set(source.shapes))
    wrong = sorted(f"{k} {source.shapes[k]} != {want[k]}" for k in want if k in source.shapes
                   and source.shapes[k] != want[k])
    wrong += sorted(f"{k} is {source.dtypes[k]}, not uint8" for k in source.shapes
                    if k.endswith(("_blocks", "_scales")) and source.dtypes[k] != "U8")
    if missing or wrong:
        raise UserError(f"{model_dir}: weights do not match config.json: "
                        f"{listing([f'missing {k}' for k in missing] + wrong)}")


def _check_config(model_dir: Path, cfg) -> dict:
    """The config's YaRN parameters, after refusing what llama.cpp's gpt-oss would silently compute differently."""
    problems = [f"{k} {getattr(cfg, k, v)} (llama.cpp uses {v})" for k, v in LLAMA_SWIGLU.items()
                if getattr(cfg, k, v) != v]
    rope = dict(cfg.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "yarn"):
        problems.append(f"rope_type {rope_type!r} (gpt-oss uses yarn)")
    if rope_type == "yarn":
        problems += [f"rope {k} {rope.get(k)} (llama.cpp uses {v})" for k, v in LLAMA_YARN_BETAS.items()
                     if rope.get(k, v) != v]
        problems += [f"rope {k} {rope[k]} (llama.cpp derives it from the factor)"
                     for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None]
    kinds = set(cfg.layer_types) - {"sliding_attention", "full_attention"}
    if kinds:
        problems.append(f"layer_types {sorted(kinds)}")
    if problems:
        raise UserError(f"{model_dir}: llama.cpp's gpt-oss cannot represent {'; '.join(problems)}")
    return rope


def _plan_tensors(cfg, source: TensorFiles, weight_type: str) -> list[_Tensor]:
    """Every output tensor, in llama.cpp's names and layouts, each read from the checkpoint when it is written."""
    wt = weight_type.upper()

    def plain(name: str, key: str, f32: bool) -> _Tensor:
        qtype = "F32" if f32 else wt
        return _Tensor(name, source.shapes[key], qtype, lambda: _as(source[key], qtype))

    def mxfp4_rows(name: str, key: str, rows: slice) -> _Tensor:
        # blocks (E, out, in/32, 16) + scales (E, out, in/32) -> (E, out', in/32 * 17) bytes, out' the rows taken
        E, out, groups, _ = source.shapes[key + "_blocks"]
        n_rows = len(range(out)[rows])
        return _Tensor(name, (E, n_rows, groups * 17), "MXFP4",
                       lambda: mxfp4_to_ggml(source[key + "_blocks"][:, rows], source[key + "_scales"][:, rows]))

    def bias(name: str, key: str, cols: slice) -> _Tensor:
        E, out = source.shapes[key]
        return _Tensor(name, (E, len(range(out)[cols])), "F32", lambda: _as(source[key][:, cols], "F32"))

    gate, up, every = slice(0, None, 2), slice(1, None, 2), slice(None)   # gate_up interleaves: gate even, up odd
    tensors = [plain(_tensor_name("TOKEN_EMBD"), "model.embed_tokens.weight", False)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors += [plain(_tensor_name(kind, i, suffix), p + key, f32)
                    for key, (kind, suffix, f32) in _LAYER_TENSORS.items()]
        experts = p + "mlp.experts."
        tensors += [
            mxfp4_rows(_tensor_name("FFN_GATE_EXP", i), experts + "gate_up_proj", gate),      # (E, I, H/32 * 17)
            mxfp4_rows(_tensor_name("FFN_UP_EXP", i), experts + "gate_up_proj", up),          # (E, I, H/32 * 17)
            mxfp4_rows(_tensor_name("FFN_DOWN_EXP", i), experts + "down_proj", every),        # (E, H, I/32 * 17)
            bias(_tensor_name("FFN_GATE_EXP", i, "bias"), experts + "gate_up_proj_bias", gate),   # (E, I)
            bias(_tensor_name("FFN_UP_EXP", i, "bias"), experts + "gate_up_proj_bias", up),       # (E, I)
            bias(_tensor_name("FFN_DOWN_EXP", i, "bias"), experts + "down_proj_bias", every),     # (E, H)
        ]
    tensors += [plain(_tensor_name("OUTPUT_NORM"), "model.norm.weight", True),
                plain(_tensor_name("OUTPUT"), "lm_head.weight", False)]
    return tensors


def _add_hparams(writer, cfg, rope: dict) -> None:
    """The hyper-parameters llama.cpp's gpt-oss loader reads (llama-model.cpp, models/openai-moe.cpp)."""
    gguf = _gguf()
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_expert_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)          # also the rotary dimension and the 1/sqrt(d) attention scale
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_expert_count(cfg.num_local_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_sliding_window(cfg.sliding_window)
    # Which layers slide, spelled out from config.json (llama.cpp would otherwise assume "every other, first").
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if rope.get("rope_type") == "yarn":
        # As llama.cpp's converter writes them. Note: llama.cpp always rounds YaRN's correction range to whole
        # dimensions, as gpt-oss's reference does with truncate=True; a config with truncate=False (gpt-oss ships
        # that) gets slightly different frequencies for the few dimensions inside the ramp.
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope.get("beta_fast", LLAMA_YARN_BETAS["beta_fast"]))
        writer.add_rope_scaling_yarn_beta_slow(rope.get("beta_slow", LLAMA_YARN_BETAS["beta_slow"]))


def _add_tokenizer(writer, model_dir: Path, cfg) -> None:
    """o200k_harmony as llama.cpp's byte-level BPE (``gpt2`` model, ``gpt-4o`` pre-tokenizer), from tokenizer.json."""
    gguf = _gguf()
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json (the GGUF carries the tokenizer)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise UserError(f"{path}: expected a byte-level BPE tokenizer (o200k_harmony), got {model.get('type')!r}")
    V = cfg.vocab_size
    ids = dict(model["vocab"])
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    ids |= {t["content"]: i for i, t in added.items()}
    if max(ids.values()) >= V:
        raise UserError(f"{path}: token ids reach {max(ids.values())}, beyond vocab_size {V} of config.json")
    kind = {k: int(getattr(gguf.TokenType, k)) for k in ("NORMAL", "CONTROL", "USER_DEFINED", "UNUSED")}
    tokens = [f"[PAD{i}]" for i in range(V)]          # ids no token uses (none in o200k_harmony's 201,088)
    types = [kind["UNUSED"]] * V
    for text, i in ids.items():
        tokens[i] = text
        if i not in added:
            types[i] = kind["NORMAL"]
        elif added[i].get("special") or (text.startswith("<|") and text.endswith("|>")):
            types[i] = kind["CONTROL"]                 # Harmony's specials: parsed from text, never plain text
        else:
            types[i] = kind["USER_DEFINED"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    missing = [t for t in (RETURN, CALL) if t not in ids]
    if missing:
        raise UserError(f"{path}: no {' or '.join(missing)} token; not a Harmony (gpt-oss) tokenizer")

    def first(x):
        return x[0] if isinstance(x, (list, tuple)) else x

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o")                 # llama.cpp's name for the o200k split pattern
    # 650k items: naming the element type spares gguf-py a type check per item (a second of a 4 s export)
    K, T = gguf.Keys.Tokenizer, gguf.GGUFValueType
    writer.add_key_value(K.LIST, tokens, T.ARRAY, sub_type=T.STRING)
    writer.add_key_value(K.TOKEN_TYPE, types, T.ARRAY, sub_type=T.INT32)
    writer.add_key_value(K.MERGES, merges, T.ARRAY, sub_type=T.STRING)
    # openai/gpt-oss-20b's and -120b's published config.json name no bos_token_id (transformers then says None);
    # the tokenizer's own BOS is <|startoftext|>, which llama.cpp's converter writes too
    bos = first(cfg.bos_token_id)
    bos = ids.get(START_OF_TEXT) if bos is None else bos
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_eos_token_id(ids[RETURN])
    writer.add_eot_token_id(ids[RETURN])
    writer.add_eom_token_id(ids[CALL])
    if cfg.pad_token_id is not None:
        writer.add_pad_token_id(first(cfg.pad_token_id))
    writer.add_add_bos_token(False)                    # Harmony prompts start with <|start|>, never a BOS
    writer.add_add_eos_token(False)
    template = _chat_template(model_dir)
    if template:
        writer.add_chat_template(template)


def _chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def write_model(model_dir: str | Path, out_file: str | Path, *, weight_type: str = "bf16",
                name: str | None = None) -> Path:
    """Convert an HF-layout gpt-oss directory with MXFP4 experts into one GGUF file for llama.cpp.

    ``weight_type`` ("bf16" or "f32") is for the 2-D weights other than experts and router (embedding, attention,
    output); norms, biases, sinks and the router are F32, experts keep their MXFP4 codes bit for bit.
    """
    with _model_plan(model_dir, weight_type, name) as (writer, tensors):
        return _write(writer, tensors, Path(out_file), "GGUF model")


@contextlib.contextmanager
def _model_plan(model_dir: str | Path, weight_type: str, name: str | None):
    """:func:`write_model`'s plan, shared with :func:`read_back_model`: a GGUFWriter (no file yet) holding every
    key/value of the file, and the tensors, each read from the checkpoint (open while the block runs) when asked."""
    gguf = _gguf()
    if weight_type not in WEIGHT_TYPES:
        raise UserError(f"weight_type: expected one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    rope = _check_config(model_dir, cfg)
    with TensorFiles(model_dir) as source:
        _check_source(model_dir, cfg, source)
        writer = gguf.GGUFWriter(None, ARCH)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, cfg, rope)
        _add_tokenizer(writer, model_dir, cfg)
        yield writer, _plan_tensors(cfg, source, weight_type)


# ------------------------------------------------------------------------------------------------------- the LoRA

_LINEAR_KINDS = {"self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K", "self_attn.v_proj": "ATTN_V",
                 "self_attn.o_proj": "ATTN_OUT"}


def _linear_target(module: str) -> str | None:
    """llama.cpp's weight for a linear LoRA target (``model.layers.3.self_attn.q_proj``), or None if it has none."""
    if module == "lm_head":
        return _tensor_name("OUTPUT")
    m = LAYER.fullmatch(module)
    if m and m[2] in _LINEAR_KINDS:
        return _tensor_name(_LINEAR_KINDS[m[2]], int(m[1]))
    return None


def _lora_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> list[_Tensor]:
    """``name.lora_a`` and ``name.lora_b`` in F32. llama-adapter.cpp checks ``a.ne[0]`` = the base's input size,
    ``b.ne[1]`` = its output size and ``a.ne[1] == b.ne[0]`` = r (the rank its scale divides by)."""
    a, b = a.float().contiguous(), b.float().contiguous()
    return [_Tensor(name + ".lora_a", tuple(a.shape), "F32", lambda: a.numpy()),
            _Tensor(name + ".lora_b", tuple(b.shape), "F32", lambda: b.numpy())]


def write_lora(adapter_dir: str | Path, model_dir: str | Path, out_file: str | Path, *,
               name: str | None = None) -> Path:
    """Convert a PEFT LoRA adapter trained on the gpt-oss at ``model_dir`` into a GGUF LoRA adapter for llama.cpp.

    Attention projections and ``lm_head`` map to their llama.cpp weights; expert LoRA becomes per-expert 3-D tensors
    (``a (E, r, in)``, ``b (E, out, r)``), with ``gate_up`` split like the base weight: A is shared, B's output
    columns ``::2`` go to ``ffn_gate_exps`` and ``1::2`` to ``ffn_up_exps``. Anything trained that llama.cpp has no
    tensor for refuses the whole export.
    """
    writer, tensors = _lora_plan(Path(adapter_dir), Path(model_dir), name)
    return _write(writer, tensors, Path(out_file), "GGUF LoRA")


def _lora_plan(adapter_dir: Path, model_dir: Path, name: str | None) -> tuple[object, list[_Tensor]]:
    """:func:`write_lora`'s plan, shared with :func:`read_back_lora`: a GGUFWriter (no file yet) holding every
    key/value of the file, and the tensors (the adapter, float32, in memory: a few MB to a few hundred)."""
    from inference.model.adapters import read_adapter
    gguf = _gguf()
    cfg = read_config(model_dir)
    adapter = read_adapter(adapter_dir, cfg, torch.float32, "cpu")
    scales = {lora.scale for lora in adapter.linear.values()} | {
        lora.scale for loras in adapter.experts.values() for lora in loras.values()}
    ranks = {lora.A.shape[0] for lora in adapter.linear.values()} | {
        lora.A.shape[1] for loras in adapter.experts.values() for lora in loras.values()}
    if len(scales) != 1 or len(ranks) != 1:   # one alpha per file: llama.cpp derives each scale as alpha / rank
        raise UserError(f"{adapter_dir}: LoRA scales {sorted(scales)} and ranks {sorted(ranks)} differ between "
                        "modules; a GGUF adapter has one alpha")
    (scale,), (rank,) = scales, ranks
    if scale == 0:   # llama.cpp reads alpha 0 as "no alpha": scale 1 instead of 0
        raise UserError(f"{adapter_dir}: lora_alpha is 0, so the adapter changes nothing; nothing to export")

    tensors, unrepresentable = [], []
    for module, lora in sorted(adapter.linear.items()):
        target = _linear_target(module)
        if target is None:
            unrepresentable.append(module)
            continue
        tensors += _lora_pair(target, lora.A, lora.B)                          # a (r, in), b (out, r)
    for layer, loras in sorted(adapter.experts.items()):
        m = LAYER.fullmatch(layer + ".mlp.experts")
        for proj, lora in sorted(loras.items()):
            if m is None or proj not in ("gate_up", "down"):
                unrepresentable.append(f"{layer}.mlp.experts.{proj}_proj")
                continue
            i, B = int(m[1]), lora.B.transpose(1, 2)                          # B (E, r, out) -> (E, out, r)
            if proj == "gate_up":
                tensors += _lora_pair(_tensor_name("FFN_GATE_EXP", i), lora.A, B[:, 0::2])   # a (E, r, H), b (E, I, r)
                tensors += _lora_pair(_tensor_name("FFN_UP_EXP", i), lora.A, B[:, 1::2])
            else:
                tensors += _lora_pair(_tensor_name("FFN_DOWN_EXP", i), lora.A, B)            # a (E, r, I), b (E, H, r)
    if unrepresentable:
        raise UserError(f"{adapter_dir}: llama.cpp has no tensor for the LoRA on {', '.join(unrepresentable)}; "
                        "refusing to export an adapter that would silently lose them")

    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name or adapter_dir.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp scales by alpha / r (r from lora_b's shape); PEFT by lora_alpha / r, or / sqrt(r) with rsLoRA.
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)
    return writer, tensors


# ------------------------------------------------------------------------------------------------- reading back

COMPARE_BYTES = 1 << 26          # bytes compared per step: the comparison's temporaries stay at 64 MiB


@dataclass
class ReadBack:
    """A GGUF file read back with gguf-py against the writer's plan for it (:func:`read_back_model`,
    :func:`read_back_lora`), shaped like :class:`finetune.ship.weights.WeightCheck` for ``parity.json``.

    ``tensors``: tensors whose bytes were compared (type and shape as planned), of ``file_tensors`` in the file and
    ``planned_tensors`` planned; ``nbytes``: their bytes; ``keys``: metadata keys planned (each compared). Passes when
    the file holds exactly the planned tensors, types, shapes, bytes and metadata."""

    consumer: str
    against: str
    tensors: int = 0
    file_tensors: int = 0
    planned_tensors: int = 0
    nbytes: int = 0
    keys: int = 0
    seconds: float = 0.0
    parsed: bool = False          # the header differed from the plan's bytes: GGUFReader parsed it to say where
    decides: bool = True
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.passed = not self.failures

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures[:3]) + (
            f"; and {len(self.failures) - 3} more" if len(self.failures) > 3 else "")
        return (f"{self.consumer} vs {self.against}, file read back: {self.tensors} of {self.file_tensors} tensors "
                f"({self.nbytes:,} bytes) and {self.keys} metadata keys compared with the plan, bit for bit, in "
                f"{self.seconds:.1f} s -> {status}")

    def to_dict(self) -> dict:
        return {"consumer": self.consumer, "against": self.against, "kind": "file read back", "decides": True,
                "passed": self.passed, "failures": self.failures, "tensors": self.tensors,
                "file_tensors": self.file_tensors, "planned_tensors": self.planned_tensors, "bytes": self.nbytes,
                "keys": self.keys, "seconds": round(self.seconds, 1), "parsed": self.parsed}


def read_back_model(model_dir: str | Path, gguf_file: str | Path, *, weight_type: str = "bf16",
                    name: str | None = None, consumer: str | None = None, against: str | None = None) -> ReadBack:
    """Read ``gguf_file`` back and hold it against what :func:`write_model` plans from ``model_dir`` with the same
    ``weight_type`` and ``name``: every tensor's name, GGML type, shape and bytes (MXFP4 experts bit for bit), and
    every metadata key and value. Memory-mapped, one tensor in memory at a time; at any model size."""
    gguf_file = Path(gguf_file)
    with _model_plan(model_dir, weight_type, name) as (writer, tensors):
        return _read_back(gguf_file, writer, tensors, consumer or f"gguf-py ({gguf_file.name} read back)",
                          against or f"the GGUF writer's plan from {model_dir}")


def read_back_lora(adapter_dir: str | Path, model_dir: str | Path, lora_file: str | Path, *,
                   name: str | None = None, consumer: str | None = None, against: str | None = None) -> ReadBack:
    """Read ``lora_file`` back and hold it against what :func:`write_lora` plans from the adapter at ``adapter_dir``
    (for the gpt-oss at ``model_dir``): every ``.lora_a`` / ``.lora_b`` tensor bit for bit, and every metadata key
    (``adapter.lora.alpha`` included)."""
    lora_file = Path(lora_file)
    writer, tensors = _lora_plan(Path(adapter_dir), Path(model_dir), name)
    return _read_back(lora_file, writer, tensors, consumer or f"gguf-py ({lora_file.name} read back)",
                      against or f"the GGUF writer's plan from {adapter_dir}")


def _read_back(path: Path, writer, tensors: list[_Tensor], consumer: str, against: str) -> ReadBack:
    """``path`` compared with a writer's plan: metadata, then the planned tensors in order (each produced from its
    source only now, as when written), then tensors nobody planned. When the file's header (metadata and tensor
    infos) is byte for byte the plan's, the tensors are compared at the offsets it implies (:func:`_same_header`);
    otherwise gguf-py's GGUFReader parses the file (memory-mapped; 14 s for a 201k-token vocabulary) to say what
    differs."""
    started = time.time()
    planned_kv = dict(writer.kv_data[0])
    result = ReadBack(consumer, against, planned_tensors=len(tensors), keys=len(planned_kv))
    offsets = _same_header(path, writer, tensors)
    if offsets is not None:
        _compare_at(path, tensors, offsets, result)
    else:
        _compare_parsed(path, planned_kv, tensors, result)
    result.seconds = time.time() - started
    result.passed = not result.failures
    return result


def _same_header(path: Path, writer, tensors: list[_Tensor]) -> list[int] | None:
    """The absolute offset of each planned tensor's data when ``path`` starts with exactly the header, metadata and
    tensor infos the writer would write for this plan (and is as long as the plan's data), else None. The planned
    prefix is made by the writer itself, into a scratch file beside ``path``; the offsets follow its rule (each
    tensor padded to the alignment, data starting aligned after the infos)."""
    import tempfile
    gguf = _gguf()
    handle, name = tempfile.mkstemp(suffix=".gguf-header")
    os.close(handle)
    scratch = Path(name)
    try:
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, t.np_dtype, t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[t.qtype])
        writer.write_header_to_file(path=scratch)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        prefix = scratch.read_bytes()
    finally:
        writer.close()
        scratch.unlink(missing_ok=True)
    align = writer.data_alignment
    offsets, at = [], gguf.GGUFWriter.ggml_pad(len(prefix), align)
    for t in tensors:
        offsets.append(at)
        at += gguf.GGUFWriter.ggml_pad(t.nbytes, align)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(prefix))
    except OSError:
        return None
    end = offsets[-1] + tensors[-1].nbytes if tensors else len(prefix)
    return offsets if head == prefix and end <= size <= at else None


def _compare_at(path: Path, tensors: list[_Tensor], offsets: list[int], result: ReadBack) -> None:
    """The planned tensors' bytes against the file's at ``offsets`` (memory-mapped, one tensor at a time); names,
    types, shapes and metadata were equal as bytes."""
    from tqdm.auto import tqdm
    data = np.memmap(path, dtype=np.uint8, mode="r")
    result.file_tensors = len(tensors)
    with tqdm(total=sum(t.nbytes for t in tensors), desc=f"reading back {path.name}", unit="B", unit_scale=True,
              delay=3.0, leave=False) as bar:
        for t, at in zip(tensors, offsets):
            planned = t.load()
            if planned.dtype != t.np_dtype or planned.nbytes != t.nbytes:   # a planning bug, as _write refuses it
                result.failures.append(f"{t.name}: the plan produced {planned.dtype} {planned.shape}, planned "
                                       f"{t.qtype} {t.shape}")
                continue
            want = np.ascontiguousarray(planned).reshape(-1).view(np.uint8)
            differ = _bytes_differ(data[at:at + want.size], want)
            if differ:
                result.failures.append(f"{t.name}: {differ:,} of {want.size:,} bytes differ")
            result.tensors += 1
            result.nbytes += want.size
            bar.update(t.nbytes)
    del data


def _compare_parsed(path: Path, planned_kv: dict, tensors: list[_Tensor], result: ReadBack) -> None:
    """The file parsed by GGUFReader against the plan, key by key and tensor by tensor, each difference named."""
    from tqdm.auto import tqdm
    gguf = _gguf()
    result.parsed = True
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError) as exc:      # gguf-py's ways of saying "not a GGUF I can parse"
        result.failures = [f"{path.name}: not a readable GGUF ({exc})"]
    else:
        held = {t.name: t for t in reader.tensors}
        result.file_tensors = len(held)
        result.failures = _kv_problems(reader.fields, planned_kv)
        with tqdm(total=sum(t.nbytes for t in tensors), desc=f"reading back {path.name}", unit="B",
                  unit_scale=True, delay=3.0, leave=False) as bar:
            for t in tensors:
                problem, compared = _tensor_problem(held.get(t.name), t)
                if problem:
                    result.failures.append(f"{t.name}: {problem}")
                result.tensors += 1 if compared else 0
                result.nbytes += compared
                bar.update(t.nbytes)
        planned = {t.name for t in tensors}
        result.failures += [f"{name}: in the file, not planned" for name in held if name not in planned]
        del reader, held                                 # the memory map closes with its last view


def _tensor_problem(held, planned: _Tensor) -> tuple[str | None, int]:
    """A tensor of the file (gguf-py's ReaderTensor, or None) against the writer's plan for it: what differs (None
    when its type, shape and every byte are the plan's) and how many bytes were compared (0: type or shape wrong)."""
    if held is None:
        return "missing from the file", 0
    if held.tensor_type.name != planned.qtype:
        return f"type {held.tensor_type.name}, planned {planned.qtype}", 0
    shape = [int(n) for n in held.shape]
    if shape != planned.ggml_shape:
        return f"shape {shape}, planned {planned.ggml_shape} (GGML order, innermost first)", 0
    data = planned.load()
    if data.dtype != planned.np_dtype or data.nbytes != planned.nbytes:    # a planning bug, as _write refuses it
        return f"the plan produced {data.dtype} {data.shape}, planned {planned.qtype} {planned.shape}", 0
    want = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    got = np.asarray(held.data).reshape(-1).view(np.uint8)                 # memory-mapped: read as compared
    if got.size != want.size:
        return f"{got.size:,} bytes, planned {want.size:,}", 0
    differ = _bytes_differ(got, want)
    return (f"{differ:,} of {want.size:,} bytes differ" if differ else None), want.size


def _bytes_differ(got: np.ndarray, want: np.ndarray) -> int:
    """How many bytes of ``got`` differ from ``want`` (uint8 vectors of one size), COMPARE_BYTES at a time. A chunk
    is first compared as 64-bit words (about 15x faster than byte by byte: the common case is equal); only a chunk
    that differs is counted byte by byte."""
    differ = 0
    for i in range(0, want.size, COMPARE_BYTES):
        a, b = got[i:i + COMPARE_BYTES], want[i:i + COMPARE_BYTES]
        n = a.size - a.size % 8
        if not (np.array_equal(a[:n].view(np.uint64), b[:n].view(np.uint64)) and np.array_equal(a[n:], b[n:])):
            differ += int(np.count_nonzero(a != b))
    return differ


def _kv_problems(fields: dict, planned: dict) -> list[str]:
    """The file's metadata (gguf-py's ReaderFields by key) against the writer's (``gguf.GGUFValue`` by key): each key
    missing, not planned, or with another type or value, by name. Values compare as the file stores them (FLOAT32
    rounded to float32, arrays item by item)."""
    got = {k: f for k, f in fields.items() if not k.startswith("GGUF.")}   # the reader's header pseudo-fields
    problems = [f"metadata {k}: missing from the file" for k in planned if k not in got]
    for key, value in planned.items():
        if key in got:
            types, want = _stored(value)
            have_types, have = got[key].types, got[key].contents()
            if have_types != types:
                problems.append(f"metadata {key}: type {'/'.join(t.name for t in have_types)}, planned "
                                f"{'/'.join(t.name for t in types)}")
            elif have != want:
                problems.append(f"metadata {key}: {_difference(have, want)}")
    problems += [f"metadata {k}: in the file, not planned" for k in got if k not in planned]
    return problems


def _stored(value) -> tuple[list, object]:
    """A planned ``gguf.GGUFValue`` as gguf-py reads it back: its types (``[ARRAY, item type]`` for an array, the item
    type inferred as GGUFWriter infers it) and its value (FLOAT32 rounded to float32)."""
    T = _gguf().GGUFValueType

    def item(x, t):
        return float(np.float32(x)) if t == T.FLOAT32 else x

    if value.type != T.ARRAY:
        return [value.type], item(value.value, value.type)
    sub = value.sub_type or (T.UINT8 if isinstance(value.value, bytes) else T.get_type(value.value[0]))
    return [T.ARRAY, sub], [item(x, sub) for x in value.value]


def _difference(have, want) -> str:
    """``have, planned want``, short: a long list is named by its length or its first differing item."""
    if not (isinstance(have, list) and isinstance(want, list)):
        return f"{have!r}, planned {want!r}"
    if len(have) != len(want):
        return f"{len(have):,} items, planned {len(want):,}"
    i = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
    return f"item {i} of {len(want):,} is {have[i]!r}, planned {want[i]!r}"


# ----------------------------------------------------------------------------------------------- llama.cpp helpers

SEED = 1234
# ggml's log levels are NONE, DEBUG, INFO, WARN, ERROR, CONT (ggml.h). llama-cpp-python 0.3.x maps them as if they
# were NONE, INFO, WARN, ERROR, DEBUG, so with verbose=False it prints warnings and hides errors; we route the log
# ourselves while our calls run: nothing on stderr, errors kept for the message of a failed load.
_LOG_ERROR, _LOG_CONT = 4, 5


@contextlib.contextmanager
def _llama_log(llama_cpp):
    """llama.cpp's log while the block runs: errors collected in the yielded list, everything else dropped."""
    import ctypes
    errors: list[str] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def keep(level, text, _user_data):
        level = last[0] if level == _LOG_CONT else level
        last[0] = level
        if level == _LOG_ERROR:
            errors.append(text.decode("utf-8", errors="replace"))

    old, old_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(old), ctypes.byref(old_data))
    llama_cpp.llama_log_set(keep, None)
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(old, old_data)


@contextlib.contextmanager
def _llama(gguf_file, lora_file=None, n_ctx: int = 512, vocab_only: bool = False):
    """llama.cpp (through llama-cpp-python) on ``gguf_file`` plus ``lora_file`` at scale 1: 2 threads, a fixed seed,
    every position's logits kept, and the KV cache in F32, so that the only rounding is that of llama.cpp's kernels."""
    llama_cpp = _llama_cpp()
    for f in filter(None, (gguf_file, lora_file)):
        if not Path(f).is_file():
            raise UserError(f"GGUF file not found: {f}")
    what = f"{gguf_file} with {lora_file}" if lora_file else str(gguf_file)
    with _llama_log(llama_cpp) as errors:
        try:
            batch = min(n_ctx, 512)   # tokens per llama_decode; every position's logits are kept regardless
            # The adapter is not passed as ``lora_path``: llama-cpp-python then turns mmap off and reads the whole
            # base into anonymous memory (13.8 GB for a gpt-oss-20b), though llama.cpp applies a LoRA beside the
            # weights and works on a mapped base. It is attached below instead.
            llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_batch=batch, n_ubatch=batch,
                                  logits_all=True, n_threads=2, n_threads_batch=2, seed=SEED,
                                  type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                                  vocab_only=vocab_only, verbose=False)
        except ValueError as exc:   # llama-cpp-python's way of saying "load failed"; llama.cpp logged why
            raise UserError(f"llama.cpp could not load {what}: {_why(errors) or exc}") from None
        with contextlib.closing(llm), contextlib.ExitStack() as stack:
            if lora_file and not errors:
                _attach_lora(llama_cpp, llm, Path(lora_file), stack, errors)
            # llama-cpp-python 0.3.x goes on after a LoRA that llama.cpp refused (and crashes at the first decode),
            # so an error logged during loading is a failed load.
            if errors:
                raise UserError(f"llama.cpp could not load {what}: {_why(errors)}")
            yield llm


def _attach_lora(llama_cpp, llm, lora_file: Path, stack: contextlib.ExitStack, errors: list[str]) -> None:
    """Load ``lora_file`` against ``llm``'s model and set it on its context at scale 1, as llama-cpp-python's own
    ``lora_path`` does (freed when ``stack`` closes). Refused: a one-line error with llama.cpp's logged reason."""
    import ctypes
    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(lora_file).encode("utf-8"))
    if not adapter:
        raise UserError(f"llama.cpp could not load the LoRA adapter {lora_file}: "
                        f"{_why(errors) or 'no reason given'}")
    stack.callback(llama_cpp.llama_adapter_lora_free, adapter)
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(1.0)
    if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, scales):
        raise UserError(f"llama.cpp could not set the LoRA adapter {lora_file} on {llm.model_path}")


def _why(errors: list[str]) -> str:
    return " ".join(line.strip() for line in errors[-3:])


def llama_logits(gguf_file: str | Path, token_ids: list[int], *, lora_file: str | Path | None = None,
                 n_ctx: int | None = None) -> np.ndarray:
    """llama.cpp's teacher-forced logits ``(len(token_ids), V)`` float32: row ``t`` scores the token after ``t``."""
    return llama_logits_many(gguf_file, [token_ids], lora_file=lora_file, n_ctx=n_ctx)[0]


def llama_logits_many(gguf_file: str | Path, sequences: list[list[int]], *, lora_file: str | Path | None = None,
                      n_ctx: int | None = None) -> list[np.ndarray]:
    """:func:`llama_logits` for several sequences with one load (the KV cache is cleared between them)."""
    with _llama(gguf_file, lora_file, n_ctx or max(max(map(len, sequences)), 1)) as llm:
        out = []
        for ids in sequences:
            llm.reset()
            llm.eval(list(ids))
            out.append(np.array(llm.scores[:len(ids)], dtype=np.float32))   # a copy: the buffer is reused
        return out


def llama_greedy(gguf_file: str | Path, prompt_ids: list[int], max_new: int, *,
                 lora_file: str | Path | None = None) -> list[int]:
    """llama.cpp's greedy continuation of ``prompt_ids``: up to ``max_new`` ids, the last one an end-of-generation
    token (``<|return|>``, ``<|call|>``) if it came first."""
    return llama_greedy_many(gguf_file, [prompt_ids], max_new, lora_file=lora_file)[0]


def llama_greedy_many(gguf_file: str | Path, prompts: list[list[int]], max_new: int, *,
                      lora_file: str | Path | None = None) -> list[list[int]]:
    """:func:`llama_greedy` for several prompts with one load."""
    llama_cpp = _llama_cpp()
    with _llama(gguf_file, lora_file, max(map(len, prompts)) + max_new) as llm:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        outs = []
        for prompt_ids in prompts:
            llm.reset()
            out: list[int] = []
            llm.eval(list(prompt_ids))
            while len(out) < max_new:
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(token)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                llm.eval([token])
            outs.append(out)
        return outs


def llama_tokenize(gguf_file: str | Path, text: str) -> list[int]:
    """llama.cpp's tokens for ``text``, special tokens (``<|start|>`` …) parsed, no BOS added."""
    return llama_tokenize_many(gguf_file, [text])[0]


def llama_tokenize_many(gguf_file: str | Path, texts: list[str]) -> list[list[int]]:
    """:func:`llama_tokenize` for several texts with one (vocabulary-only) load."""
    with _llama(gguf_file, vocab_only=True) as llm:
        return [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in texts]
