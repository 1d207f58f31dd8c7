"""Training with TRL's ``SFTTrainer`` on our pre-tokenized Harmony examples.

We hand TRL ``input_ids`` + per-token ``loss_weights`` and ``labels`` (the trained target of each weighted position,
-100 where the weight is 0, so the Trainer counts trained tokens for gradient accumulation) and skip its own chat
templating. The one override is ``compute_loss``: the weighted loss of :mod:`finetune.kernels.loss`, which projects only
the weighted positions through the 201,088-row output layer. Progress and metrics go through callbacks: a tqdm bar with
loss lines, a JSONL metrics file in the run directory, and the tracker (MLflow).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune.data import packing
from finetune.kernels.loss import CHUNK_ROWS, QUANTIZED_CHUNK_ROWS, weighted_loss_sum
from finetune.model import fastpath
from finetune.model.lora import is_quantized
from finetune.recipe import Recipe
from finetune.train import killpoints
from finetune.train.checkpoints import CompleteCheckpoints
from inference.evaluate import pad_weighted

OPTIMIZERS = {"adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "sgd": "sgd"}


PACKED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_inputs(lengths: list[list[int]], width: int) -> dict:
    """What keeps packed sequences apart in the model, for rows of ``width`` tokens holding sequences of ``lengths``
    (each row's padding counts as one more sequence): ``position_ids (B, width)`` restarting at 0 per sequence, and
    transformers' flash-attention arguments: int32 offsets of every sequence in the flattened ``B * width`` tokens
    and the longest sequence (a Python int, so no device sync is needed to read it)."""
    positions, starts, longest = [], [0], 1
    for row in lengths:
        parts = list(row) + ([width - sum(row)] if width > sum(row) else [])
        positions += [p for n in parts for p in range(n)]
        for n in parts:
            starts.append(starts[-1] + n)
        longest = max(longest, *parts)
    cu = torch.tensor(starts, dtype=torch.int32)
    return {"position_ids": torch.tensor(positions).view(len(lengths), width), "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with <|endoftext|>, weights with 0; ``labels`` hold the trained target of each
    weighted position (the input token itself, or ``<|return|>`` where history stores ``<|end|>``), -100 elsewhere.
    Packed rows (a ``seq_lengths`` column) also get :func:`packed_inputs`."""
    ids, mask, weights, targets = pad_weighted([r["input_ids"] for r in rows], [r["loss_weights"] for r in rows],
                                               [r["targets"] for r in rows])
    labels = torch.where(weights > 0, targets, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": mask, "loss_weights": weights, "labels": labels}
    if "seq_lengths" in rows[0]:
        batch.update(packed_inputs([r["seq_lengths"] for r in rows], ids.shape[1]))
    return batch


def to_dataset(examples, pack_to: int | None = None):
    """The examples as a ``datasets.Dataset``; with ``pack_to``, packed into rows of that many tokens
    (:mod:`finetune.data.packing`), each row with its sequences' lengths."""
    from datasets import Dataset
    if pack_to:
        rows = packing.pack(examples, pack_to)
        return Dataset.from_dict({"input_ids": [r.ids for r in rows], "loss_weights": [r.weights for r in rows],
                                  "targets": [r.targets for r in rows], "seq_lengths": [r.lengths for r in rows]})
    return Dataset.from_dict({"input_ids": [e.ids for e in examples], "loss_weights": [e.weights for e in examples],
                              "targets": [e.targets for e in examples]})


def _trainer_class():
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is the Harmony-weighted loss, with logits only where weights are non-zero."""

        trained_tokens = 0  # tokens with non-zero loss weight in the training batches so far (restored on resume)
        loss_chunk = CHUNK_ROWS  # logits rows at once; build_trainer lowers it for quantized (memory-bound) models

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fast = fastpath.is_enabled(model)
            if fast:
                fastpath.check_right_padded(inputs["attention_mask"])
            packed = {k: inputs[k] for k in PACKED_KEYS if k in inputs}
            with fastpath.autocast(model) if fast else contextlib.nullcontext():
                total, weight, count = weighted_loss_sum(model, inputs["input_ids"], inputs["attention_mask"],
                                                         inputs["loss_weights"], self.loss_chunk, inputs["labels"],
                                                         packed or None)
            if model.training:
                self.trained_tokens += int(count)
            # With num_items_in_batch (trained tokens of the whole accumulation window) the Trainer does not
            # divide by the accumulation steps again; without it, it does, and we return this batch's mean.
            denom = num_items_in_batch if num_items_in_batch is not None else weight.clamp(min=1e-8)
            loss = total / denom
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                logs["trained_tokens"] = self.trained_tokens
            return super().log(logs, *args, **kwargs)

        def save_model(self, output_dir=None, _internal_call=False):
            if not _internal_call:
                return super().save_model(output_dir, _internal_call)
            # Inside a checkpoint save: the checkpoint holds the adapter, not another copy of the tokenizer (27 MB
            # each for gpt-oss); the base model's directory has it.
            killpoints.reached("save:begin")
            tokenizer, self.processing_class = self.processing_class, None
            try:
                super().save_model(output_dir, _internal_call)
            finally:
                self.processing_class = tokenizer
            killpoints.reached("save:adapter")

        def _save_optimizer_and_scheduler(self, output_dir):
            super()._save_optimizer_and_scheduler(output_dir)
            killpoints.reached("save:optimizer")

    return WeightedSFTTrainer


def checkpoint_is_final(checkpoint: str) -> bool:
    """Whether a checkpoint was saved at the run's last optimizer step (its trainer_state.json says so)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def load_final_checkpoint(trainer, checkpoint: str) -> None:
    """Put a final checkpoint's adapter weights and Trainer state in place without training (see
    :func:`checkpoint_is_final`): what ``trainer.train`` would have left at its last step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState
    weights = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(trainer.model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise RuntimeError(f"{checkpoint}: adapter weights do not fit the model ({unexpected[:3]})")
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


# Trainer log keys -> MLflow metric names. The Trainer's end-of-training summary has its own "train_loss" (the mean
# over all steps); it must not land on the per-step curve as if it were the last step's loss.
MLFLOW_NAMES = {"loss": "train_loss", "grad_norm": "train_grad_norm", "train_loss": "train_loss_mean"}


class MetricsCallback(TrainerCallback):
    """Writes every log to ``metrics.jsonl`` and the tracker, and prints a readable line per log (``echo=None``: no
    lines, for notebooks, where the progress bar shows the latest loss instead)."""

    def __init__(self, run_dir: Path, tracker, echo, bar=None):
        self.path, self.tracker, self.echo, self.bar = run_dir / "metrics.jsonl", tracker, echo, bar

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log_metrics({MLFLOW_NAMES.get(k, k): v for k, v in logs.items()}, step=state.global_step)
        if self.bar is not None and ("loss" in logs or "eval_loss" in logs):
            self.bar.show({k: logs[k] for k in ("loss", "eval_loss") if k in logs})
        if self.echo is None:
            return
        if "loss" in logs:
            self.echo(f"step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:.4f}  "
                      f"lr {logs.get('learning_rate', 0):.2e}  grad_norm {logs.get('grad_norm', float('nan')):.3f}")
        elif "eval_loss" in logs:
            self.echo(f"step {state.global_step:>4}/{state.max_steps}  eval_loss {logs['eval_loss']:.4f}")


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps whose lines never tear the bar (prints go through ``tqdm.write``)."""

    def __init__(self):
        self.bar, self.postfix = None, {}
        self.started = None          # time.perf_counter() at the start of training (or of its resumption)
        self.first_step_s = None     # seconds from then to the end of the first optimizer step (kernels compiled)

    def write(self, text: str) -> None:
        from tqdm.auto import tqdm
        (tqdm.write if self.bar is not None else print)(text)

    # On a GPU the first step compiles the kernels (Triton's and torch.compile's, for the shapes it meets), which
    # can take a minute before the bar moves; the bar says so. Both cache the kernels on disk. A second run on torch
    # 2.11 still waited 52-55 s, nearly all in inductor's per-process CPU probe for one C++ kernel that
    # inference.model.compiled.compile_dynamic now avoids; run.json's first_step_s records the wait.
    FIRST_STEP_ON_GPU = "training (first step: compiling GPU kernels, cached on disk for later runs)"

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm
        gpu = not args.use_cpu and torch.cuda.is_available()
        self.started, self.first_step_s = time.perf_counter(), None
        self.bar = tqdm(total=state.max_steps, initial=state.global_step,
                        desc=self.FIRST_STEP_ON_GPU if gpu else "training", unit="step", dynamic_ncols=True)

    def show(self, values: dict) -> None:
        """Keep the latest loss (and eval loss) on the bar itself."""
        self.postfix |= {k: f"{v:.4f}" for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None and self.started is not None:
            self.first_step_s = round(time.perf_counter() - self.started, 2)
        if self.bar is not None:
            if self.bar.desc != "training":
                self.bar.set_description("training", refresh=False)
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def keep_freed_memory_on_cpu() -> bool:
    """Ask glibc to serve large blocks from the heap and keep them, instead of mmap/munmap per allocation.

    A CPU step allocates several 100 MB logits-sized buffers; with glibc's defaults each is a fresh mmap whose pages
    the kernel zero-fills again on every step (measured: 40% of the step on the tiny model). Process-wide and
    harmless elsewhere; a no-op where glibc is absent.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    one_gib = 1 << 30  # blocks below this come from the heap, and up to this much freed heap is kept
    return bool(libc.mallopt(m_mmap_threshold, one_gib) and libc.mallopt(m_trim_threshold, one_gib))


def build_trainer(recipe: Recipe, model, tokenizer, train, evals, run_dir: Path, device: torch.device, tracker,
                  log_lines: bool = True, offload: bool = False):
    """An SFTTrainer configured from the recipe; checkpoints go to ``run_dir/checkpoints``. ``log_lines=False``
    prints no line per log (the bar shows the loss). ``offload``: the estimate's resolved
    ``train.offload_activations``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig

    t = recipe.train
    if device.type == "cpu":
        keep_freed_memory_on_cpu()
    train_rows = to_dataset(train, recipe.data.max_length if recipe.data.packing else None)
    steps_per_epoch = math.ceil(len(train_rows) / (t.batch_size * t.grad_accum))
    bf16 = device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, optim=OPTIMIZERS[t.optimizer],
        seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy=("no" if not evals else "steps" if t.eval_steps else "epoch"),
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "epoch", save_steps=t.save_steps or steps_per_epoch,
        # rotation is finetune.train.checkpoints' (after a checkpoint is marked complete), never the Trainer's
        save_total_limit=None, save_only_model=False,
        activation_checkpointing=t.gradient_checkpointing,
        # our path keeps the expert matmuls' and attention's outputs instead of recomputing them; offload moves
        # each checkpointed layer's input to host memory (transformers' own option)
        activation_checkpointing_kwargs=fastpath.checkpoint_kwargs(model, offload),
        use_cpu=device.type == "cpu", bf16=bf16,
        report_to="none", disable_tqdm=True, remove_unused_columns=False, prediction_loss_only=True,
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, packing=False,
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
        # The router is frozen (LoRA does not target it) and our loss has no MoE balancing term; 0 also keeps TRL
        # from switching on output_router_logits, which would break generation with a KV cache afterwards.
        router_aux_loss_coef=0.0,
    )
    trainer = _trainer_class()(
        model=model, args=args, data_collator=collate, train_dataset=train_rows,
        eval_dataset=to_dataset(evals) if evals else None, processing_class=tokenizer,
        callbacks=[])
    if is_quantized(model):
        trainer.loss_chunk = QUANTIZED_CHUNK_ROWS
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    bar = trainer.progress = ProgressBar()      # the pipeline reads trainer.progress.first_step_s
    trainer.add_callback(bar)
    trainer.add_callback(MetricsCallback(run_dir, tracker, bar.write if log_lines else None, bar))
    trainer.add_callback(CompleteCheckpoints(trainer, t.save_total_limit))
    return trainer
