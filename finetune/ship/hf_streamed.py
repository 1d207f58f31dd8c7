"""transformers' own gpt-oss (and PEFT on top) on a checkpoint too big to load whole: one decoder layer at a time.

The reference consumer of an export is ``GptOssForCausalLM.from_pretrained`` (+ ``PeftModel.from_pretrained``), which
dequantizes MXFP4 experts: 42 GB of bf16 for gpt-oss-20b, more than the 24 GB cards people train it on. Here the
same modules run with their weights brought in per layer: the model (and the PEFT wrapping, with the adapter's real
weights) is built on the meta device; embedding, final norm and head are read once; a forward pre-hook on each
decoder layer reads that layer's tensors from the safetensors files (MXFP4 experts decoded by transformers' own
``convert_moe_packed_tensors``) onto the device, and a forward hook puts them back on the meta device. All probes
run as one right-padded batch, so each layer is read once. Device memory holds one dense layer (1.6 GB at 20b in
bf16) plus embedding and head; PEFT's LoRA weights stay resident (they are small).

:func:`layers` runs the same teacher-forced (:func:`teacher_forced`, which hooks a model loaded whole as well): each
decoder layer is fed a given input (a reference's hidden states) in place of what the layer before computed, and
its output is recorded, per sequence ``(T, H)``, the currency of :func:`inference.model.streamed.layers`.

Nothing of transformers or PEFT is patched: parameters are swapped, and hooks registered, on the module instances they
belong to, between calls, and the hooks are removed when the forward returns.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch

from inference.model import streamed
from inference.model.checkpoint import TensorFiles, read_config

_WRAPPED = re.compile(r"\.base_layer(?=\.|$)")


def logits(model_dir: str | Path, sequences: list[list[int]], adapter_dir: str | Path | None, dtype: torch.dtype,
           device: str | torch.device, progress: bool = True) -> list[torch.Tensor]:
    """Logits ``(T, V)`` (float32, CPU) of each sequence from transformers' ``GptOssForCausalLM`` (eager attention),
    with ``PeftModel.from_pretrained(adapter_dir)`` on top when given, holding one decoder layer at a time."""
    return _forward(model_dir, sequences, adapter_dir, dtype, device, progress)[0]


def layers(model_dir: str | Path, sequences: list[list[int]], adapter_dir: str | Path | None, dtype: torch.dtype,
           device: str | torch.device, inputs: list[list[torch.Tensor]], progress: bool = True,
           routing: list[list[torch.Tensor]] | None = None) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Teacher-forced, as :func:`inference.model.streamed.layers`: decoder layer ``l`` runs on ``inputs[l]`` (per
    sequence ``(T, H)``) whatever the layer before it computed. Returns each layer's output per sequence ``(T, H)``
    and the logits ``(T, V)`` of the final norm and head on the last layer's output (float32, CPU). ``routing``
    (per layer, per sequence ``(T, k)``): the experts each token is sent to (:func:`teacher_forced`)."""
    logits_, outputs = _forward(model_dir, sequences, adapter_dir, dtype, device, progress, inputs, routing)
    return outputs, logits_


def _forward(model_dir: str | Path, sequences: list[list[int]], adapter_dir: str | Path | None, dtype: torch.dtype,
             device: str | torch.device, progress: bool, inputs: list[list[torch.Tensor]] | None = None,
             routing: list[list[torch.Tensor]] | None = None):
    """Logits, and with ``inputs`` each layer's outputs (fed those inputs), holding one decoder layer at a time."""
    from tqdm.auto import tqdm
    from transformers import GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    model_dir, device = Path(model_dir), torch.device(device)
    config = read_config(model_dir)
    config._attn_implementation = "eager"
    config.dtype = dtype
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    with TensorFiles(model_dir) as files:
        # Everything but the experts stays resident (gpt-oss-20b: 3.8 GB in bf16), before PEFT wraps anything: PEFT
        # puts a LoRA on its base weight's device, which must be a real one.
        for path, module in model.named_modules():
            for name, _ in list(module.named_parameters(recurse=False)):
                key = f"{path}.{name}"
                if ".mlp.experts." not in key:
                    _set(module, name, files[key].to(device, dtype))
        with torch.device(device):
            model.model.rotary_emb = GptOssRotaryEmbedding(config)   # non-persistent: not in the checkpoint
        top = model
        if adapter_dir is not None:
            top = _with_adapter(model, Path(adapter_dir), device)
        bar = tqdm(total=config.num_hidden_layers, desc=f"transformers on {model_dir.name} (layer-streamed)",
                   unit="layer", leave=False, disable=not progress)
        handles = []
        for i, layer in enumerate(model.model.layers):
            loaded: list = []
            handles.append(layer.register_forward_pre_hook(_loader(files, i, dtype, device, loaded)))
            handles.append(layer.register_forward_hook(_unloader(bar, loaded)))
        try:
            with teacher_forced(model.model.layers, sequences, inputs, routing) as outputs:
                return run(top, sequences, device), outputs
        finally:
            for h in handles:
                h.remove()
            bar.close()


def run(model, sequences: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Logits ``(T, V)`` (float32, CPU) of each sequence, all in one right-padded batch: real tokens keep positions
    0..T-1."""
    ids, mask = streamed.padded(sequences, device)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits                               # (B, T, V)
    return [out[row, :len(s)].float().cpu() for row, s in enumerate(sequences)]


@contextmanager
def teacher_forced(decoder_layers, sequences: list[list[int]], inputs: list[list[torch.Tensor]] | None,
                   routing: list[list[torch.Tensor]] | None = None):
    """Hooks on transformers' decoder layer instances (a model loaded whole or layer-streamed) while the block runs:
    a forward pre-hook replaces layer ``l``'s ``hidden_states`` with ``inputs[l]`` (per sequence ``(T, H)``,
    right-padded into the batch ``(B, T, H)`` that :func:`run` makes), and a forward hook records its output per
    sequence, float32 on the CPU. With ``routing`` (per layer, per sequence ``(T, k)``), a forward hook on the
    layer's router replaces its top-k with those experts, weighted as gpt-oss weighs its own choice (softmax of the
    router's logits at them), as :class:`inference.model.runtime.Layer`'s ``route`` does. Yields the list
    ``[layer][sequence]`` that fills as the model runs; with no ``inputs``, nothing is hooked and it stays empty."""
    outputs: list[list[torch.Tensor]] = []
    handles = []
    if inputs is not None:
        if len(inputs) != len(decoder_layers) or (routing is not None and len(routing) != len(decoder_layers)):
            raise ValueError(f"{len(inputs)} layers of inputs for a model of {len(decoder_layers)}")
        for i, layer in enumerate(decoder_layers):
            handles.append(layer.register_forward_pre_hook(_feeder(inputs[i], sequences), with_kwargs=True))
            handles.append(layer.register_forward_hook(_recorder(sequences, outputs)))
            if routing is not None:
                handles.append(layer.mlp.router.register_forward_hook(_router(routing[i], sequences)))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _feeder(rows: list[torch.Tensor], sequences: list[list[int]]):
    everyone = list(range(len(sequences)))        # run() pads every sequence into one batch

    def hook(layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]                                # (B, T, H)
        fed = streamed.batched_inputs(rows, everyone, sequences, hidden.dtype, hidden.device)
        if args:
            return (fed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fed}
    return hook


def _router(rows: list[torch.Tensor], sequences: list[list[int]]):
    """A forward hook on ``GptOssTopKRouter`` (which returns logits, scores, indices over the batch's ``B*T`` rows):
    each real token sent to its given experts ``(T_i, k)``; padded rows to experts 0..k-1 (their outputs are
    dropped)."""
    everyone = list(range(len(sequences)))        # run() pads every sequence into one batch

    def hook(router, args, output):
        logits = output[0]                                                                   # (B*T, E)
        fixed = streamed.batched_routing(rows, everyone, sequences, logits.device)          # (B*T, k)
        scores = torch.nn.functional.softmax(logits.gather(1, fixed), dim=1, dtype=logits.dtype)
        return (logits, scores, fixed) + tuple(output[3:])
    return hook


def _recorder(sequences: list[list[int]], outputs: list):
    def hook(layer, args, output):
        hidden = output[0] if isinstance(output, tuple) else output                          # (B, T, H)
        outputs.append([hidden[row, :len(s)].float().cpu() for row, s in enumerate(sequences)])
    return hook


def _with_adapter(model, adapter_dir: Path, device: torch.device):
    """``PeftModel.from_pretrained`` on the meta-device model, then PEFT's own loader into real LoRA weights.

    PEFT wraps the model (its config, its layers, its forward); with ``low_cpu_mem_usage`` it makes the LoRA weights
    on the meta device, and moves each to the device of its base weight, which for the experts is still the meta
    device. So the LoRA weights are given real (empty) storage on ``device``, in the dtype PEFT chose, and filled by
    ``set_peft_model_state_dict`` from the adapter's file: PEFT's key mapping and loading, nothing of ours.
    """
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    top = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False, low_cpu_mem_usage=True)
    lora = []
    for path, module in top.named_modules():
        if "lora_" in path:
            for name, p in list(module.named_parameters(recurse=False)):
                _set(module, name, torch.empty_like(p, device=device))
                lora.append(f"{path}.{name}")
    result = set_peft_model_state_dict(top, load_peft_weights(str(adapter_dir), device="cpu"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing or not lora:
        raise RuntimeError(f"{adapter_dir}: PEFT did not load every LoRA weight (unexpected "
                           f"{result.unexpected_keys[:3]}, missing {missing[:3]})")
    return top


def _set(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)


def _loader(files: TensorFiles, index: int, dtype: torch.dtype, device: torch.device, loaded: list):
    """A pre-hook that reads decoder layer ``index``'s expert weights onto ``device`` (MXFP4 decoded by transformers'
    own ``convert_moe_packed_tensors`` into its ``(E, in, out)`` layout); ``loaded`` remembers what it set."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    prefix = f"model.layers.{index}."

    def hook(layer, args):
        for path, module in layer.named_modules():
            if "lora_" in path:
                continue
            for name, p in list(module.named_parameters(recurse=False)):
                if not p.is_meta:
                    continue
                key = prefix + _WRAPPED.sub("", f"{path}.{name}" if path else name)
                if key + "_blocks" in files:
                    value = convert_moe_packed_tensors(files[key + "_blocks"].to(device),
                                                       files[key + "_scales"].to(device), dtype=dtype)
                else:
                    value = files[key].to(device, dtype)
                _set(module, name, value)
                loaded.append((module, name))
    return hook


def _unloader(bar, loaded: list):
    """A forward hook that puts what the pre-hook loaded back on the meta device."""
    def hook(layer, args, output):
        for module, name in loaded:
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        loaded.clear()
        bar.update(1)
    return hook
