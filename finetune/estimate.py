"""``python -m finetune estimate``: a training run's peak GPU memory and disk, predicted before any model load.

This module owns the memory model of our training path (:func:`estimate`) and its report (:func:`format_estimate`).
Only the model's ``config.json`` is read, so a run can be planned on a laptop for a GPU it does not have
(``--gpu-memory 80``); a model directory holding nothing but ``config.json`` is enough, the shipped recipes' models
(openai/gpt-oss-20b and -120b) need nothing at all (their published configs are carried), and Python callers may pass
a ``GptOssConfig`` built in code instead.

What is counted (``d`` = bytes of the compute dtype): frozen weights as they sit on the device (experts packed in
MXFP4 at 4.25 bits unless quantization is ``none``, attention in NF4 under ``nf4``), LoRA weights and gradients in
fp32 and the optimizer state, activations kept for the backward (all layers, or the layer inputs under gradient
checkpointing, plus what selective checkpointing saves), and the largest of the step's short-lived phases: the
backward of one layer (its recomputed activations, gradients and, for packed experts, the MXFP4 decode slice; on our
path under checkpointing, counted tensor by tensor in its attention and MoE phases) or the chunked loss. Everything is
a worst case per step: every row padded to ``data.max_length``. The CUDA context is not part of torch's peak; it is
reserved separately (:data:`CONTEXT_RESERVE`) when checking the fit.

Checked against measured peaks (``benchmarks/qlora_memory.py``, ``benchmarks/train_speed.py``; H200 and H100),
between 0.6% under and 1.8% over: QLoRA on gpt-oss-20b from 2,048 to 131,072 tokens a step (batch 1 to 4, MXFP4
and NF4, with and without the long-sequence levers) and gpt-oss-120b at 2,048, 8,192 and 65,536
(``tests/test_estimate.py`` replays every committed measurement); gpt-oss-20b bf16 within 1% at 16,384. The
long-sequence factors were fitted on the first H100 runs; the per-head attention backward and the output layer in
host memory were measured after, without refitting.

The ``auto`` memory settings are decided here (:func:`_plan`): the input embedding and the output layer stay on the
GPU, and the long-sequence levers off, unless the run would then not fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from finetune.kernels import attention, experts, loss
from finetune.recipe import Recipe, apply_overrides
from inference.errors import UserError

GIB = 2**30
MIB = 2**20

# Calibration of the per-layer activation and backward figures below against peaks measured on the GPU (H200,
# benchmarks/qlora_memory.py, gpt-oss-20b shapes at 2,048-8,192 tokens a step: measured / term-by-term sum = 0.53 to
# 0.64). The term-by-term sum counts every tensor as alive at once; in the backward, each is freed as soon as its
# gradient has passed, so only about half are alive at the peak.
ACTIVATION_FACTOR = 0.55
# The CUDA context and the caching allocator's own use: outside torch's peak (max_memory_allocated), inside the GPU's.
CONTEXT_RESERVE = GIB // 2
# Rows of the chunked cross-entropy per pass (finetune.kernels.loss): fewer when the experts are packed, whose
# decode scratch shares the step's memory with the logits.
CHUNK_ROWS = loss.CHUNK_ROWS
QUANTIZED_CHUNK_ROWS = loss.QUANTIZED_CHUNK_ROWS
# Tokens per tile of the MoE blocks that train.mlp_tile_tokens=auto tries, largest first, while the run does not fit:
# 8,192 tokens of gpt-oss-20b's block are about 1.2 GiB of intermediates and gradients; fewer tokens per tile mean
# smaller grouped matmuls and one more MXFP4 decode of every expert per tile.
MLP_TILES_AUTO = (8192, 4096, 2048, 1024)
# The fast path's layer backward under checkpointing (_fast_backward_bytes) counts the tensors each phase holds. Two
# factors calibrate the MoE phase against peaks measured on gpt-oss-20b shapes (H100, benchmarks/qlora_memory.py,
# 2,048-131,072 tokens, benchmarks/results/qlora-20b-mxfp4-h100-2026-12-07-long.json): what it holds beside the
# block measured 50,060 bytes a token where 47,488 are counted (x 1.06), and of the block's own intermediates and
# gradients about three quarters are alive at once (199,700 of 265,472 bytes a token). The attention phase needs no
# factor: 93,200 bytes a token measured, 93,184 counted.
FAST_MOE_HELD = 1.06
FAST_MOE_ALIVE = 0.76

MXFP4_BYTES = 0.5 + 1 / 32                  # 4-bit codes + one uint8 scale per 32 weights
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)   # bitsandbytes: 4-bit codes, blocks of 64, double-quantized absmax
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_8bit": 2, "sgd": 0}   # state per trainable parameter
CHECKPOINT_EXTRA = MIB                      # scheduler, rng states and trainer state in every checkpoint


@dataclass
class Estimate:
    """Predicted memory of one training run on ``device``; byte counts, ordered as the report shows them.

    ``gpu`` holds the device memory (host memory when ``device`` is cpu), ``disk`` the run directory's files
    (``export ...`` entries: what an export written later would add).
    """

    device: str                  # "cuda" | "cpu"
    dtype: str                   # compute dtype: "bfloat16" | "float32"
    quantization: str            # resolved: none | mxfp4 | nf4
    embedding: str               # resolved: gpu | cpu
    tokens_per_step: int         # batch_size * max_length (worst case: every row padded to max_length)
    trainable_params: int        # LoRA parameters
    gpu: dict[str, int]
    peak_bytes: int              # sum of gpu
    disk: dict[str, int]
    capacity_bytes: int | None   # the GPU's total memory (detected or --gpu-memory), None if unknown
    capacity_name: str | None    # e.g. "NVIDIA H200" or "--gpu-memory 80 GiB"
    warnings: list[str]
    config_source: str | None = None   # where the model's config.json came from (None: passed in code)
    offload: bool = False              # resolved train.offload_activations
    mlp_tile_tokens: int = 0           # resolved train.mlp_tile_tokens (0: untiled)
    offloaded_bytes: int = 0           # pinned host memory holding the offloaded layer inputs
    lm_head: str = "gpu"               # resolved model.lm_head: gpu | cpu
    longest_fitting: int | None = None  # longest data.max_length that fits the capacity (None: no capacity known)

    @property
    def reserve_bytes(self) -> int:
        """What the device needs beyond torch's peak: the CUDA context on a GPU, nothing on the CPU."""
        return CONTEXT_RESERVE if self.device == "cuda" else 0

    def fits(self) -> bool | None:
        """Peak plus the CUDA context (on a GPU) within the capacity; None when the capacity is unknown."""
        if self.capacity_bytes is None:
            return None
        return self.peak_bytes + self.reserve_bytes <= self.capacity_bytes

    def to_dict(self) -> dict:
        """JSON-able: the fields plus ``context_reserve_bytes`` and ``fits``."""
        return {**asdict(self), "context_reserve_bytes": self.reserve_bytes, "fits": self.fits()}


# ---------------------------------------------------------------- the model's numbers


class ModelNotHere(UserError):
    """The recipe's model (its config.json) is not on this machine, so nothing can be estimated."""


CARRIED = "published config.json, carried by this project (nothing was downloaded)"   # a source's ending


def model_config(recipe: Recipe):
    """``(GptOssConfig, where it came from)`` of the recipe's model, from its config.json alone: the model's directory
    (or hub cache) when it is on this machine, else the published config of openai/gpt-oss-20b or -120b, which this
    project carries (:mod:`inference.model.configs`; the source then ends with :data:`CARRIED`)."""
    from inference.model.checkpoint import read_config
    from inference.model.configs import published_config
    from inference.model.tiny import resolve_model
    name = recipe.model.name_or_path
    try:
        path = resolve_model(name)
    except UserError as exc:
        carried = published_config(name)
        if carried is not None:
            return carried, f"{name}'s {CARRIED}"
        raise ModelNotHere(f"model.name_or_path: {exc}. The estimate needs only the model's config.json: point "
                           "model.name_or_path at a directory holding it (e.g. model.name_or_path=/path/to/dir)"
                           ) from None
    return read_config(path), f"{path}/config.json"


def _attention_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each attention projection."""
    H, D = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H)}


def _expert_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each expert projection (transformers holds them as (E, in, out))."""
    H, I = config.hidden_size, config.intermediate_size
    return {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}


def weight_bytes(config, quantization: str, d: int) -> dict[str, int]:
    """Bytes of the frozen base weights by group, as held on the device (embedding included)."""
    H, E, L, V = config.hidden_size, config.num_local_experts, config.num_hidden_layers, config.vocab_size
    expert_weights = E * sum(i * o for i, o in _expert_shapes(config).values())
    expert_biases = E * sum(o for _, o in _expert_shapes(config).values())
    attention = _attention_shapes(config).values()
    attention_weights = sum(i * o for i, o in attention)
    biases = sum(o for _, o in attention) if getattr(config, "attention_bias", True) else 0
    attention_rest = biases + config.num_attention_heads                # biases and the per-head sinks
    packed = quantization in ("mxfp4", "nf4")
    return {
        "experts": L * round(expert_weights * (MXFP4_BYTES if packed else d) + expert_biases * d),
        "attention": L * round(attention_weights * (NF4_BYTES if quantization == "nf4" else d) + attention_rest * d),
        "router + norms": (L * (E * H + E + 2 * H) + H) * d,
        "embedding": V * H * d,
        "lm_head": V * H * d,
    }


def parameter_count(config) -> int:
    """Every parameter of the base model, experts counted dense (what a bf16 merge writes)."""
    return sum(weight_bytes(config, "none", 1).values())


def lora_parameters(recipe: Recipe, config) -> int:
    """Trainable LoRA parameters: r * (in + out) per adapted projection, per expert for the expert weights."""
    r, shapes = recipe.lora.r, _attention_shapes(config)
    unknown = [m for m in recipe.lora.target_modules if m not in shapes]
    if unknown:
        raise UserError(f"lora.target_modules: {unknown} match no module of this model "
                        f"(attention projections are {', '.join(shapes)})")
    per_layer = sum(r * sum(shapes[m]) for m in recipe.lora.target_modules)
    per_layer += sum(config.num_local_experts * r * sum(_expert_shapes(config)[p]) for p in recipe.lora.target_experts)
    return config.num_hidden_layers * per_layer


# ---------------------------------------------------------------- activations and the step's transients


def _layer_bytes_per_token(recipe: Recipe, config, d: int) -> tuple[float, float]:
    """(attention half, MoE half) of what one decoder layer's forward keeps for its backward, per token, summed term
    by term (every tensor alive at once; :data:`ACTIVATION_FACTOR` scales that to what is alive at the peak)."""
    H, I, E, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    Hq, Hkv, D, r = config.num_attention_heads, config.num_key_value_heads, config.head_dim, recipe.lora.r
    attention = (2 * H * 4                        # input RMSNorm: the fp32 upcast input and its normalised copy
                 + H * d                          # normed input of q/k/v, back in the compute dtype
                 + (Hq * D + 2 * Hkv * D) * d * 2  # q, k, v and their rotary-embedded copies
                 + Hq * D * d                     # attention output, the input of o_proj
                 + Hq * 4                         # fp32 log-sum-exp per head, kept by the flash backward
                 + 2 * H * d                      # o_proj output and the residual sum
                 + len(recipe.lora.target_modules) * r * d)   # x @ A per adapted attention projection
    experts = (H * 4 * 2 + H * d                  # post-attention RMSNorm: fp32 intermediates and normed output
               + E * 4 * 2                        # router logits and their softmax, fp32
               + k * H * d                        # the token's row gathered once per chosen expert
               + k * 2 * I * d                    # gate_up matmul output (the SwiGLU's input)
               + k * I * d                        # SwiGLU output, the input of down
               + 2 * k * H * d                    # down matmul output and its routing-weighted rows
               + H * d                            # the k rows summed back per token
               + len(recipe.lora.target_experts) * k * r * d * 2)  # x @ A_e per routed row, and its (padded) copy
    return attention, experts


def layer_activation_bytes_per_token(recipe: Recipe, config, d: int) -> float:
    """What one decoder layer keeps for its backward, per token, times :data:`ACTIVATION_FACTOR`."""
    return sum(_layer_bytes_per_token(recipe, config, d)) * ACTIVATION_FACTOR


@dataclass(frozen=True)
class Levers:
    """The memory levers as resolved for one run: ``offload`` (each checkpointed layer's input in host memory),
    ``mlp_tile`` (tokens per tile of the MoE blocks, 0: untiled), ``host_head`` (the output layer in host memory,
    read by the loss in slices)."""
    offload: bool = False
    mlp_tile: int = 0
    host_head: bool = False


def activation_bytes(recipe: Recipe, config, quantization: str, d: int, tokens: int,
                     levers: Levers = Levers()) -> dict[str, int]:
    """Activations held at the start of the backward, by part (the recomputed layer is part of the backward phase,
    see :func:`step_bytes`)."""
    H, I, L, k = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_experts_per_tok
    if not recipe.train.gradient_checkpointing:
        attention, moe = _layer_bytes_per_token(recipe, config, d)
        # a tiled MoE block keeps only its input and recomputes the rest tile by tile in its backward
        moe = H * d if levers.mlp_tile else moe * ACTIVATION_FACTOR
        return {"activations: all layers": L * round(tokens * (attention * ACTIVATION_FACTOR + moe))}
    selective = 0
    if quantization == "none":
        # The selective-checkpoint policy keeps the expensive matmul outputs so the recompute skips them: expert
        # gate_up and down outputs (not when the blocks are tiled), attention output and its fp32 log-sum-exp.
        # Packed experts keep none of them: decoding again is cheaper than holding them.
        kept = 0 if levers.mlp_tile else k * (2 * I + H) * d
        selective = tokens * (kept + config.num_attention_heads * config.head_dim * d + config.num_attention_heads * 4)
    return {"activations: layer inputs": 0 if levers.offload else L * tokens * H * d,   # the checkpoint boundary
            "activations: selective saves": L * selective}


def offloaded_bytes(recipe: Recipe, config, d: int, levers: Levers) -> int:
    """Pinned host memory holding the layer inputs when they are offloaded. PyTorch's pinned-memory cache rounds each
    block up to a power of two (measured: 33 GiB peak RSS at 131,072 tokens of gpt-oss-20b, 17 GiB of inputs)."""
    if not levers.offload:
        return 0
    block = recipe.train.batch_size * recipe.data.max_length * config.hidden_size * d      # one layer's input
    return config.num_hidden_layers * (1 << (block - 1).bit_length())


def _decode_bytes(config, d: int, moe_tokens: int) -> int:
    """The packed experts' decode scratch: finetune.kernels.experts decodes a slice of output features of all experts
    at a time (a multiple of 16 within the budget) and matmuls every routed row against it, so the decoded slice plus
    that slice of the output."""
    H, I, E, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    projection = E * H * 2 * I * d                                   # the largest expert projection, whole
    budget = experts.decode_budget(projection)                       # read at call time: it can be tuned
    columns = min(2 * I, max(16, budget // (E * H * d) // 16 * 16))
    return min(projection, budget) + moe_tokens * k * columns * d


def _fast_backward_bytes(recipe: Recipe, config, d: int, tokens: int, levers: Levers) -> dict[str, int]:
    """The backward of one checkpointed decoder layer on the fast path (:mod:`finetune.model.fastpath`), in its two
    phases: the tensors the code holds at each, counted per token (see :data:`FAST_MOE_HELD`)."""
    H, I, k = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    Hq, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    Q, K = Hq * D, Hkv * D
    # the recomputed attention half: normed input, q, k, v as the kernel keeps them, its output, fp32 lse per head
    held = H * d + (Q + 2 * K) * d + Q * d + 4 * Hq
    grads = 2 * H * d                       # the gradient arriving at the layer, and the residual stream's
    # flash attention's backward: dq, dk, dv and its scratch, an fp32 dq accumulator and, with fewer key/value heads
    # than query heads, dk and dv expanded to every query head; above WHOLE_BACKWARD_TOKENS one key/value head at a
    # time (each group's inputs copied, its scratch, its gradients)
    if tokens > attention.WHOLE_BACKWARD_TOKENS and Hkv < Hq:
        G = Hq // Hkv
        scratch = G * D * (3 * d + 4 + 3 * d) + 4 * D * d + 4 * G
    else:
        scratch = Q * 4 + (2 * Q * d if Hkv < Hq else 0) + 4 * Hq
    attention_phase = tokens * (held + grads + Q * d + Q * d + 2 * K * d + scratch + (H * d if levers.offload else 0))
    # The MoE half: the attention half still held, the block's input, output and their gradients; then the block's
    # intermediates and gradients for the tokens of one tile (all tokens untiled).
    moe_tokens = min(tokens, levers.mlp_tile) if levers.mlp_tile else tokens
    moe_terms = _layer_bytes_per_token(recipe, config, d)[1] + k * 2 * I * d * 2      # + the gate_up gradients
    moe_phase = tokens * ((held + 4 * H * d) * FAST_MOE_HELD + (2 * H * d if levers.offload else 0)) + \
        moe_tokens * moe_terms * FAST_MOE_ALIVE + _decode_bytes(config, d, moe_tokens)
    return {"attention backward of one layer": round(attention_phase), "MoE backward of one layer": round(moe_phase)}


def step_bytes(recipe: Recipe, config, quantization: str, d: int, tokens: int,
               levers: Levers = Levers(), fast: bool = False) -> dict[str, int]:
    """The phases of a step that add short-lived memory on top of what is held; the peak is the largest.

    On the fast path under gradient checkpointing (``fast``), the backward of one layer in its attention and MoE
    phases (:func:`_fast_backward_bytes`). Otherwise ``backward of one layer``: its recomputed activations (under
    checkpointing), the largest gradients (gate_up's output and its SwiGLU input's) and, for packed experts, the
    decoded MXFP4 slice; with tiled MoE blocks their part counts one tile's tokens; with offloaded inputs, the layer's
    input back on the GPU. Both: ``loss``, one chunk of logits, their gradient and the fp32 loss pass, plus the
    hidden states' gradient rows the loss hands back.
    """
    H, I, k, V = config.hidden_size, config.intermediate_size, config.num_experts_per_tok, config.vocab_size
    packed = quantization != "none"
    rows = min(tokens, QUANTIZED_CHUNK_ROWS if packed else CHUNK_ROWS)
    if levers.host_head:
        # finetune.kernels.loss.streamed_cross_entropy: one slice of the output layer, a chunk of rows' fp32 logits
        # and probabilities against it, the picked rows and their fp32 gradient accumulator
        part = min(V, loss.HEAD_SLICE_ROWS)
        loss_phase = {"loss (one slice of the output layer)":
                      round(part * H * d + rows * part * (4 + 4 + d) + tokens * H * (d + 4 + d))}
    else:
        loss_phase = {"loss (one chunk of logits)": round(rows * V * (d + d + 4) + tokens * H * d)}
    if fast and recipe.train.gradient_checkpointing:
        return {**_fast_backward_bytes(recipe, config, d, tokens, levers), **loss_phase}
    moe_tokens = min(tokens, levers.mlp_tile) if levers.mlp_tile else tokens
    backward = moe_tokens * k * 2 * I * d * 2                            # the gate_up gradients
    if recipe.train.gradient_checkpointing:
        attention_half, moe = _layer_bytes_per_token(recipe, config, d)
        backward += tokens * attention_half + moe_tokens * moe
    backward *= ACTIVATION_FACTOR
    if levers.offload:
        backward += tokens * H * d
    if packed:
        backward += _decode_bytes(config, d, moe_tokens)
    return {"backward of one layer": round(backward), **loss_phase}


def disk_bytes(recipe: Recipe, config, trainable: int) -> dict[str, int]:
    """The run directory's adapter and checkpoints, then what each merge export would write."""
    adapter = trainable * 4
    checkpoint = adapter + trainable * OPTIMIZER_BYTES[recipe.train.optimizer] + CHECKPOINT_EXTRA
    kept = recipe.train.save_total_limit
    packed_experts = weight_bytes(config, "mxfp4", 2)["experts"] - weight_bytes(config, "none", 2)["experts"]
    return {"final adapter": adapter,
            f"checkpoints ({kept} kept)": kept * checkpoint,
            "export merged-bf16": parameter_count(config) * 2,
            "export merged-mxfp4": parameter_count(config) * 2 + packed_experts}


# ---------------------------------------------------------------- the estimate


def _device(recipe: Recipe) -> str:
    """The recipe's device; cuda when asked for even without a GPU here (planning for another machine)."""
    if recipe.model.device != "auto":
        return recipe.model.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _build(recipe: Recipe, config, device: str, capacity_bytes: int | None, embedding: str,
           levers: Levers) -> Estimate:
    """The estimate for one resolved set of choices (``embedding``: gpu | cpu)."""
    from finetune.model.lora import pick_dtype, pick_quantization
    dtype = pick_dtype(recipe, torch.device(device))[0]
    d = dtype.itemsize
    quantization = pick_quantization(recipe, torch.device(device))[0]
    tokens = recipe.train.batch_size * recipe.data.max_length
    trainable = lora_parameters(recipe, config)
    from finetune.model.fastpath import choose
    # measured and calibrated for packed experts (QLoRA); bf16 LoRA keeps the older, term-summed model
    fast = choose(recipe.train.kernels, torch.device(device))[0] and quantization != "none"
    phases = step_bytes(recipe, config, quantization, d, tokens, levers, fast=fast)
    phase = max(phases, key=phases.get)
    held = activation_bytes(recipe, config, quantization, d, tokens, levers)
    grads = trainable * 4
    if fast and recipe.train.gradient_checkpointing:
        # the backward frees each layer's input as it fills that layer's LoRA gradients: the peak holds the larger
        # of the two (the inputs at the first layer back, the gradients at the last), not both
        room = {"LoRA grads | layer inputs": max(grads, held.pop("activations: layer inputs"))}
    else:
        room = {"LoRA grads": grads}
    gpu = {**weight_bytes(config, quantization, d),
           "LoRA weights": trainable * 4, **room,
           "optimizer state": trainable * OPTIMIZER_BYTES[recipe.train.optimizer],
           **held,
           f"step peak: {phase}": phases[phase]}
    if embedding == "cpu" and device == "cuda":
        gpu["embedding"] = 0
    if levers.host_head and device == "cuda":
        gpu["lm_head"] = 0
    return Estimate(device=device, dtype=str(dtype).removeprefix("torch."), quantization=quantization,
                    embedding=embedding, tokens_per_step=tokens, trainable_params=trainable, gpu=gpu,
                    peak_bytes=sum(gpu.values()), disk=disk_bytes(recipe, config, trainable),
                    capacity_bytes=capacity_bytes, capacity_name=None, warnings=[], offload=levers.offload,
                    mlp_tile_tokens=levers.mlp_tile, offloaded_bytes=offloaded_bytes(recipe, config, d, levers),
                    lm_head="cpu" if levers.host_head or device == "cpu" else "gpu")


def lever_limits(recipe: Recipe, device: str) -> tuple[str | None, str | None]:
    """Why ``train.offload_activations`` / ``train.mlp_tile_tokens`` cannot apply to this run (None: they can)."""
    from finetune.model.fastpath import choose
    offload = ("the CPU holds activations in host memory already" if device != "cuda" else
               "it needs train.gradient_checkpointing" if not recipe.train.gradient_checkpointing else None)
    fast, why = choose(recipe.train.kernels, torch.device(device))
    return offload, None if fast else f"it applies to the fast training path only ({why})"


def _plan(recipe: Recipe, config, device: str, capacity_bytes: int | None) -> tuple[Estimate, list[str]]:
    """The estimate without warnings, and notes on what ``auto`` chose or what a setting cannot do here.

    ``auto`` settings start at their fastest choice and each lever is taken, in this order, only while the run does
    not fit: the input embedding to the CPU, the layer inputs to host memory, the output layer to host memory (a
    tenth of a second a step), the MoE blocks in tiles (slower the smaller)."""
    train, notes = recipe.train, []
    no_offload, no_tile = lever_limits(recipe, device)
    for key, value, why in (("offload_activations", train.offload_activations, no_offload),
                            ("mlp_tile_tokens", train.mlp_tile_tokens, no_tile)):
        if why and value not in ("auto", False, 0):
            notes.append(f"train.{key}={str(value).lower()} has no effect here: {why}")
    levers = Levers(offload=train.offload_activations is True and not no_offload,
                    mlp_tile=train.mlp_tile_tokens if isinstance(train.mlp_tile_tokens, int) and not no_tile else 0,
                    host_head=recipe.model.lm_head == "cpu" and device == "cuda")
    embedding = "cpu" if device == "cpu" or recipe.model.embedding == "cpu" else "gpu"
    est = _build(recipe, config, device, capacity_bytes, embedding, levers)
    if device == "cpu":     # the whole model is in host memory: nothing to move
        return est, notes
    # (lever, note, applies, take): taken in this order while the run does not fit; smaller tiles after larger
    steps = [("embedding", "model.embedding=auto: the input embedding goes to the CPU",
              recipe.model.embedding == "auto", lambda e, lv: ("cpu", lv)),
             ("offload", "train.offload_activations=auto: each layer's checkpointed input goes to pinned host memory",
              train.offload_activations == "auto" and not no_offload,
              lambda e, lv: (e, replace(lv, offload=True))),
             ("lm_head", "model.lm_head=auto: the output layer goes to host memory (the loss reads it in slices)",
              recipe.model.lm_head == "auto", lambda e, lv: (e, replace(lv, host_head=True))),
             *(("tile", f"train.mlp_tile_tokens=auto: the MoE blocks run in tiles of {tile:,} tokens",
                train.mlp_tile_tokens == "auto" and not no_tile,
                lambda e, lv, tile=tile: (e, replace(lv, mlp_tile=tile))) for tile in MLP_TILES_AUTO)]
    saved: dict[str, tuple[str, int]] = {}
    for lever, what, applies, take in steps:
        if est.fits() is not False or not applies:
            continue
        embedding, levers = take(embedding, levers)
        alt = _build(recipe, config, device, capacity_bytes, embedding, levers)
        saved[lever] = (what, saved.get(lever, ("", 0))[1] + est.peak_bytes - alt.peak_bytes)
        est = alt
    notes += [f"{what}, saving {_gib(n)} GiB of GPU memory (the run does not fit without it)"
              for what, n in saved.values()]
    return est, notes


def _levers(recipe: Recipe, est: Estimate) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each memory lever this recipe does not use yet."""
    train, out = recipe.train, []
    if est.quantization == "none":
        out.append(("model.quantization=mxfp4", ["model.quantization=mxfp4"]))
    if est.quantization != "nf4":
        out.append(("model.quantization=nf4", ["model.quantization=nf4"]))
    if train.optimizer == "adamw_torch":
        out.append(("train.optimizer=adamw_8bit", ["train.optimizer=adamw_8bit"]))
    if est.embedding == "gpu":
        out.append(("model.embedding=cpu", ["model.embedding=cpu"]))
    if est.lm_head == "gpu" and est.device == "cuda":
        out.append(("model.lm_head=cpu", ["model.lm_head=cpu"]))
    if not train.gradient_checkpointing:
        out.append(("train.gradient_checkpointing=true", ["train.gradient_checkpointing=true"]))
    no_offload, no_tile = lever_limits(recipe, est.device)
    if not est.offload and not no_offload:
        out.append(("train.offload_activations=true", ["train.offload_activations=true"]))
    if not est.mlp_tile_tokens and not no_tile:
        tile = MLP_TILES_AUTO[0]
        out.append((f"train.mlp_tile_tokens={tile}", [f"train.mlp_tile_tokens={tile}"]))
    if train.batch_size > 1:   # the same examples per optimizer step, in more, smaller steps
        b, a = train.batch_size // 2, train.grad_accum * train.batch_size // (train.batch_size // 2)
        out.append((f"train.batch_size={b} train.grad_accum={a}", [f"train.batch_size={b}", f"train.grad_accum={a}"]))
    if recipe.data.max_length >= 32:
        half = recipe.data.max_length // 2
        out.append((f"data.max_length={half} (drops or truncates longer examples)", [f"data.max_length={half}"]))
    return out


def _does_not_fit(recipe: Recipe, config, est: Estimate) -> str:
    """How far over the capacity the run is, and what each untried lever would save."""
    over = est.peak_bytes + est.reserve_bytes - est.capacity_bytes
    needs = "(peak + CUDA context)" if est.reserve_bytes else "(peak)"
    lines = [f"does not fit: needs {_gib(est.peak_bytes + est.reserve_bytes)} GiB {needs}, "
             f"{_gib(over)} GiB more than the {_gib(est.capacity_bytes)} GiB of {est.capacity_name}; levers:"]
    for label, overrides in _levers(recipe, est):
        alt, _ = _plan(apply_overrides(recipe, overrides), config, est.device, est.capacity_bytes)
        verdict = "fits" if alt.fits() else "still over"
        lines.append(f"{label}: saves {_gib(est.peak_bytes - alt.peak_bytes)} GiB ({verdict})")
    if len(lines) == 1:
        lines.append("none left in this recipe: a GPU with more memory, or fewer LoRA targets or a smaller lora.r")
    return "\n".join(lines)


def _capacity(device: str) -> tuple[int | None, str | None]:
    """The first GPU's total memory and name when training on an available CUDA device."""
    if device != "cuda" or not torch.cuda.is_available():
        return None, None
    return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)


def estimate(recipe: Recipe, config=None, *, device: str | None = None, capacity_bytes: int | None = None,
             capacity_name: str | None = None) -> Estimate:
    """Predict the peak device memory and the disk of training ``recipe``; no model is loaded.

    ``config`` is the model's ``GptOssConfig`` (default: read from the recipe's model directory), ``device``
    overrides the recipe's, ``capacity_bytes`` the detected GPU memory (``capacity_name`` says where it came from).
    """
    source = None
    if config is None:
        config, source = model_config(recipe)
    device = device or _device(recipe)
    if capacity_bytes is None:
        capacity_bytes, capacity_name = _capacity(device)
    est, notes = _plan(recipe, config, device, capacity_bytes)
    est.capacity_name, est.config_source = capacity_name, source
    est.warnings += notes
    if device == "cuda" and recipe.train.kernels == "reference":
        est.warnings.append("train.kernels=reference: eager attention (a tokens x tokens score matrix per head) and "
                            "PEFT's dense expert update use more memory than this estimate, which models our path")
    if est.fits() is False:
        est.warnings.append(_does_not_fit(recipe, config, est))
    if est.capacity_bytes is not None and device == "cuda":
        est.longest_fitting = longest_fitting(recipe, config, device, est.capacity_bytes)
    return est


def longest_fitting(recipe: Recipe, config, device: str, capacity_bytes: int, step: int = 1024) -> int:
    """The longest ``data.max_length`` (a multiple of ``step`` up to the model's context) at which the recipe fits
    ``capacity_bytes`` with its batch size and its ``auto`` levers taking what they need; 0 when none does."""
    top = config.max_position_embeddings // step

    def fits(n: int) -> bool:
        return bool(_plan(apply_overrides(recipe, [f"data.max_length={n * step}"]), config, device,
                          capacity_bytes)[0].fits())

    lo, hi = 0, top                 # fits(lo) holds (0: nothing to check), the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * step


# ---------------------------------------------------------------- the report


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_estimate(est: Estimate) -> str:
    """The estimate as a small table in GiB: device memory by component, peak, capacity and fit, disk, warnings."""
    reserve = "+ CUDA context (not counted in torch's peak)"
    width = max(len(k) for k in [*est.gpu, *est.disk, reserve, f"capacity ({est.capacity_name})"]) + 2

    def row(label: str, n: int, note: str = "") -> str:
        return f"  {label:<{width}}{n / GIB:>9.3f}{note}"

    def heading(text: str) -> str:
        return f"{text:<{width + 2}}{'GiB':>9}"

    moved_head = est.device == "cuda" and est.lm_head == "cpu"
    lines = [f"Estimated memory for training on {est.device}: {est.dtype}, quantization {est.quantization}, "
             f"embedding on {est.embedding}, " + ("lm_head on cpu, " if moved_head else "") +
             f"{est.tokens_per_step:,} tokens per step, "
             f"{est.trainable_params:,} LoRA parameters"]
    if est.offload or est.mlp_tile_tokens:
        lines.append("long-sequence levers: " + "; ".join(
            ([f"layer inputs offloaded ({_gib(est.offloaded_bytes)} GiB of pinned host memory)"] if est.offload
             else []) + ([f"MoE blocks in tiles of {est.mlp_tile_tokens:,} tokens"] if est.mlp_tile_tokens else [])))
    if est.config_source:
        lines.append(f"model config: {est.config_source}")
    lines.append(heading("GPU memory" if est.device == "cuda" else "host memory (device cpu)"))
    moved = {"embedding"} if est.device == "cuda" and est.embedding == "cpu" else set()
    moved |= {"lm_head"} if moved_head else set()
    lines += [row(name, n, "  (on the CPU)" if name in moved else "") for name, n in est.gpu.items()]
    lines.append(row("peak", est.peak_bytes))
    if est.reserve_bytes:
        lines.append(row(reserve, est.reserve_bytes))
    if est.capacity_bytes is None:
        lines.append("  capacity: no GPU detected; pass --gpu-memory GIB to check the fit" if est.device == "cuda"
                     else "  capacity: not checked on the CPU; pass --gpu-memory GIB to check against that much memory")
    else:
        spare = est.capacity_bytes - est.peak_bytes - est.reserve_bytes
        lines += [row(f"capacity ({est.capacity_name})", est.capacity_bytes),
                  f"  fits: yes, {_gib(spare)} GiB to spare" if est.fits() else f"  fits: NO, {_gib(-spare)} GiB over"]
        if est.longest_fitting is not None:
            lines.append(f"  longest sequence that fits: {est.longest_fitting:,} tokens per row (data.max_length, "
                         f"same batch and settings, auto levers as needed)" if est.longest_fitting
                         else "  longest sequence that fits: none (not even 1,024 tokens per row)")
    run = {name: n for name, n in est.disk.items() if not name.startswith("export ")}
    lines += [heading("disk"), *(row(name, n) for name, n in run.items()), row("run total", sum(run.values()))]
    lines += [row(name, n, "  (if exported later)") for name, n in est.disk.items() if name not in run]
    if est.warnings:
        lines += ["warnings:", *("  - " + w.replace("\n", "\n      ") for w in est.warnings)]
    return "\n".join(lines)
