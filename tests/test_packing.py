"""Packing (``data.packing``): sequences share rows, and the loss and LoRA gradients are those of the same sequences
unpacked (fp32 on CPU, the tiny model, float64 as the measure of rounding), on transformers' eager path and on ours.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random

import pytest
import torch
from conftest import assert_fp32_close, float64

from finetune.data.packing import pack, plan
from finetune.kernels.attention import Packed, sink_attention
from finetune.kernels.loss import weighted_loss_sum
from finetune.model import fastpath
from finetune.train.trainer import PACKED_KEYS, collate, packed_inputs
from tests.test_end_to_end import losses, short_recipe
from tests.test_fastpath import _peft_tiny


def test_plan_is_best_fit_decreasing_and_keeps_every_sequence_once():
    lengths = [7, 3, 5, 2, 9, 1, 4]
    rows = plan(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    # 31 tokens need at least 4 rows of 10; best fit reaches that bound here: 9+1, 7+3, 5+4 (tightest), 2
    assert len(rows) == 4 and rows[0] == [4, 5]
    assert plan(lengths, 10) == rows                                    # deterministic
    r = random.Random(0)
    many = [r.randint(20, 500) for _ in range(2000)]
    packed = plan(many, 512)
    assert len(packed) <= 1.05 * sum(many) / 512 + 1                    # within 5% of the lower bound
    with pytest.raises(ValueError, match="more than a row's 10"):
        plan([11], 10)


class _Example:
    def __init__(self, ids, weights):
        self.ids, self.weights, self.targets = ids, weights, [t + 1 for t in ids]


def test_pack_concatenates_and_zeroes_each_sequences_first_weight():
    a, b = _Example([1, 2, 3], [0.5, 1.0, 1.0]), _Example([4, 5], [0.0, 2.0])
    (row,) = pack([a, b], 8)
    assert row.ids == [1, 2, 3, 4, 5] and row.lengths == [3, 2] and row.targets == [2, 3, 4, 5, 6]
    assert row.weights == [0.0, 1.0, 1.0, 0.0, 2.0]       # a first token is never predicted (from another sequence)


def test_packed_inputs_restart_positions_and_give_every_sequence_and_padding_its_offsets():
    got = packed_inputs([[3, 2], [4]], 6)
    assert got["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert got["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12] and got["cu_seq_lens_q"].dtype == torch.int32
    assert got["max_length_q"] == got["max_length_k"] == 4
    batch = collate([{"input_ids": [1, 2, 3, 4, 5], "loss_weights": [0, 1, 1, 0, 1], "targets": [1, 2, 3, 4, 5],
                      "seq_lengths": [3, 2]}])
    assert set(PACKED_KEYS) <= batch.keys() and batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


@pytest.mark.parametrize("window", [None, 3])
def test_packed_attention_is_each_sequences_own_attention(window):
    """The plain twin with packed rows equals attention over each sequence alone: values and every gradient."""
    g = torch.Generator().manual_seed(0)
    rows, Hq, Hkv, D = [[5, 7, 2], [6, 8]], 4, 2, 8            # the first row ends in 2 tokens of padding
    width = 16
    packed_args = packed_inputs(rows, width)
    packed = Packed(packed_args["cu_seq_lens_q"], packed_args["max_length_q"])
    q, k, v = (torch.randn(len(rows), width, h, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    sinks = torch.randn(Hq, generator=g, dtype=torch.float64)
    grad = torch.randn(len(rows), width, Hq, D, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = sink_attention(*leaves, 0.4, window, packed)
    out.backward(grad)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref_out = torch.zeros_like(out)
    cu = packed.cu_seqlens.tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        b, s = divmod(start, width)
        part = slice(s, s + end - start)
        o = sink_attention(*(t[b:b + 1, part] for t in ref_leaves[:3]), ref_leaves[3], 0.4, window)
        o.backward(grad[b:b + 1, part])
        ref_out[b, part] = o[0].detach()
    for name, a, b in zip(["out", "dq", "dk", "dv", "dsinks"], [out] + [t.grad for t in leaves],
                          [ref_out] + [t.grad for t in ref_leaves]):
        assert b.abs().max() > 1e-3, name
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12, msg=name)


def _sequences(n=7, seed=3):
    """Sequences of different lengths (some past the tiny model's 64-token window), with random loss weights."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in torch.randint(20, 100, (n,), generator=g).tolist():
        ids = torch.randint(0, 199_000, (length,), generator=g).tolist()
        weights = (torch.rand(length, generator=g) * (torch.rand(length, generator=g) > 0.3)).tolist()
        weights[0] = 0.0
        out.append(_Example(ids, weights))
    return out


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    packed = {k: batch[k] for k in PACKED_KEYS if k in batch} or None
    total, weight, _ = weighted_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["loss_weights"],
                                         targets=batch["labels"].clamp(min=0), packed=packed)
    total.backward()
    return total.detach(), weight, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _rows(examples, packed: bool):
    if packed:
        return collate([{"input_ids": r.ids, "loss_weights": r.weights, "targets": r.targets, "seq_lengths": r.lengths}
                        for r in pack(examples, 160)])
    return collate([{"input_ids": e.ids, "loss_weights": e.weights, "targets": e.targets} for e in examples])


@pytest.mark.parametrize("fast", [False, True])
def test_packed_rows_give_the_loss_and_gradients_of_the_sequences_unpacked(tiny_model, tmp_path, fast):
    model = _peft_tiny(tiny_model, tmp_path)
    examples = _sequences()
    unpacked, packed = _rows(examples, False), _rows(examples, True)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]       # fewer rows: the point of packing
    exact_model = float64(copy.deepcopy(model))
    with fastpath.patched(model) if fast else contextlib.nullcontext():
        ref, ref_w, ref_grads = _loss_and_grads(model, unpacked)
        got, got_w, grads = _loss_and_grads(model, packed)
    exact, _, exact_grads = _loss_and_grads(exact_model, unpacked)
    assert got_w == ref_w                                                      # the same trained tokens
    assert_fp32_close(got, ref, exact, "loss")
    for name in grads:
        assert ref_grads[name].abs().max() > 0, name
        assert_fp32_close(grads[name], ref_grads[name], exact_grads[name], name)


def test_a_run_with_packing_trains_on_packed_rows(tmp_path):
    import finetune
    run = finetune.run(short_recipe(tmp_path, **{"data.packing": "true", "data.max_length": "512",
                                                 "train.max_steps": "2", "train.kernels": "fast",
                                                 "train.gradient_checkpointing": "true"}))
    info = json.loads((run.run_dir / "run.json").read_text())
    stats = info["data"]
    assert stats["packed_rows"] < stats["train_examples"] and 0.5 < stats["packed_fill"] <= 1
    assert sorted(losses(run.run_dir)) == [1, 2] and all(v > 0 for v in losses(run.run_dir).values())
