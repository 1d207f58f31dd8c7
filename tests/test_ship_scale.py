"""Exports at any size, shown on the tiny model: the layer-streamed forwards (ours and transformers' + PEFT's) give
what the whole-model ones give, and so does the reference computed layer by layer; teacher-forced, each layer fed
the reference's input, they give each layer's own output; bf16 pass criteria derived from bf16's error, measured in
the same run, pass a correct export and fail a broken merge, free-running and layer by layer; the plan predicts
what lands on disk and refuses a disk too small; an MXFP4 merge that rounds a small adapter away is refused with what
to ship instead, leaving nothing behind; the real-scale benchmark measures an export in a process of its own."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_fp32_close, float64, make_adapter
from safetensors.torch import load_file, save_file

import finetune
from finetune.ship import ExportFailed, parity
from finetune.ship import plan as planning
from finetune.ship.merge import merge
from inference.errors import UserError
from inference.model import streamed

CPU32 = parity.Where(torch.device("cpu"), torch.float32, 1 << 62)      # loads anything whole
CPU32_STREAMED = parity.Where(torch.device("cpu"), torch.float32, 0)    # loads nothing whole: layer by layer
CPU16 = parity.Where(torch.device("cpu"), torch.bfloat16, 1 << 62)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("ship") / "adapter", seed=3)


@pytest.fixture(scope="module")
def probes():
    """Two of the export's probes: a short prompt, and the one longer than the sliding window."""
    everything = parity.probe_prompts()
    return [everything[0], everything[-1]]


def test_streamed_runtime_is_the_whole_model_forward(tiny_model_dir, adapter, probes):
    """Layer by layer gives the whole model's logits in the same padded batches, bit for bit; and a batch (the short
    probe padded to the long one's length) gives each sequence's own forward within fp32 rounding (measured against
    float64)."""
    from inference.engine import Engine
    sequences = [p.ids for p in probes]
    assert len({len(s) for s in sequences}) == 2 and len(streamed.batches([len(s) for s in sequences])) == 1
    out = streamed.logits(tiny_model_dir, sequences, {"a": adapter, None: None})
    model = Engine.load(tiny_model_dir, adapters={"a": adapter}, dtype=torch.float32, device="cpu").model
    exact = Engine.load(tiny_model_dir, adapters={"a": adapter}, dtype=torch.float64, device="cpu").model
    for name in ("a", None):
        whole = streamed.model_logits(model, sequences, name)
        for p, got, want in zip(probes, out[name], whole):
            assert torch.equal(got, want), (name, p.source)   # the same operations, one layer at a time
        with torch.no_grad():
            for p, batched, ref64 in zip(probes, whole, streamed.model_logits(exact, sequences, name)):
                alone = model.logits(model(torch.tensor([p.ids]), adapter=name), name)[0]
                assert_fp32_close(batched, alone, ref64, f"{p.source}, adapter {name}")


def test_streamed_transformers_with_peft_is_from_pretrained(tiny_model_dir, adapter, probes):
    from peft import PeftModel

    from inference.model.checkpoint import load_model
    whole = parity.transformers_logits(tiny_model_dir, probes, adapter, CPU32, progress=False)
    layered = parity.transformers_logits(tiny_model_dir, probes, adapter, CPU32_STREAMED, progress=False)
    exact_model = float64(PeftModel.from_pretrained(load_model(tiny_model_dir), str(adapter)))
    with torch.no_grad():
        for p, w, s in zip(probes, whole, layered):
            exact = exact_model(input_ids=torch.tensor([p.ids])).logits[0]
            assert_fp32_close(s, w, exact, p.source)        # padding the batch changes only fp32 summation order


def test_bf16_criteria_come_from_bf16s_measured_error_and_catch_broken_merges(tiny_model_dir, adapter, tmp_path):
    # On the export's own probes, as an export derives them. (They bound our runtime's bf16 error; another
    # implementation's can be larger: on two of these probes alone transformers + PEFT in bf16 is 1.98 away where
    # the bound is 0.38. One reason the checks compute in float32 unless asked.)
    ref = parity.Reference(tiny_model_dir, adapter, parity.probe_prompts(), CPU16, progress=False)
    p = ref.precision
    assert p is not None and p.max_abs > 0 and p.kl > 0        # bf16 has an error, and it was measured
    same = parity.criteria("same", p)
    k = 2 * parity.MARGIN
    assert same["max_abs"] == max(parity.IDENTICAL["max_abs"], k * p.max_abs)
    assert same["max_kl"] == k * k * p.kl and same["min_top1"] == max(0.0, 1 - k * (1 - p.top1))

    # a correct export passes at these thresholds (transformers + PEFT, read from the adapter's files)
    good = parity.compare(parity.transformers_logits(tiny_model_dir, ref.probes, adapter, CPU16, progress=False),
                          ref.trained, ref.base)
    assert parity.Check("transformers + PEFT", "trained", good, same).passed, good.line()

    # the adapter dropped: the base alone
    dropped = parity.Check("dropped", "trained", parity.compare(ref.base, ref.trained, ref.base), same)
    assert not dropped.passed and any("effect kept" in f for f in dropped.failures)

    # one expert's LoRA zeroed in one layer, then merged
    merge(tiny_model_dir, one_expert_zeroed(tiny_model_dir, adapter, tmp_path / "broken-adapter"),
          tmp_path / "broken", "bf16", progress=False)
    bad = parity.Check("broken merge", "trained", parity.compare(parity.runtime_logits(
        tmp_path / "broken", ref.probes, CPU16, progress=False), ref.trained, ref.base), same)
    assert not bad.passed, bad.line()


def one_expert_zeroed(model_dir: Path, adapter: Path, out: Path, layer: int = 0) -> Path:
    """A copy of ``adapter`` with expert 0's LoRA zeroed in decoder layer ``layer`` (a merge that lost one expert)."""
    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    E = json.loads((model_dir / "config.json").read_text())["num_local_experts"]
    zeroed = 0
    for key, t in tensors.items():
        if f"layers.{layer}.mlp.experts" in key and "lora_B" in key:   # B (out, r * E): column k * E + e is expert e's
            t[:, 0::E] = 0
            zeroed += 1
    assert zeroed == 2
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_teacher_forced_layers_are_the_forwards_own(tiny_model_dir, adapter, probes):
    """Layer by layer, teacher-forced: the entry followed runs free (its logits are the free forward's, bit for bit;
    each layer's output is the next one's input); fed those inputs back, our runtime gives the same outputs bit for
    bit, and transformers + PEFT (loaded whole or layer-streamed, its own modules hooked) gives them within float32
    noise, though it pads all probes into one batch where ours groups them."""
    sequences = [p.ids for p in probes]
    free = streamed.logits(tiny_model_dir, sequences, {"a": adapter, None: None})
    run = streamed.layers(tiny_model_dir, sequences, {"a": adapter, None: None}, follow="a")
    assert all(torch.equal(x, y) for x, y in zip(run.logits["a"], free["a"]))
    layers = len(run.inputs)
    assert layers == 2 and all(torch.equal(x, y) for i in range(layers - 1)
                               for x, y in zip(run.outputs["a"][i], run.inputs[i + 1]))
    assert [x.shape for x in run.inputs[0]] == [(len(s), x.shape[-1]) for s, x in zip(sequences, run.inputs[0])]
    # the base fed the adapter's inputs differs from the base running free after the first layer
    assert not torch.equal(run.logits[None][0], free[None][0])
    # every entry was held to the followed entry's experts: (T, k) per layer and sequence, its own top-k
    k = json.loads((tiny_model_dir / "config.json").read_text())["num_experts_per_tok"]
    assert [[tuple(r.shape) for r in layer] for layer in run.routing] == [[(len(s), k) for s in sequences]] * layers
    fed = streamed.layers(tiny_model_dir, sequences, {"a": adapter, None: None}, inputs=run.inputs,
                          routing=run.routing)
    for name in ("a", None):
        assert all(torch.equal(x, y) for i in range(layers) for x, y in zip(fed.outputs[name][i],
                                                                            run.outputs[name][i]))
    for where in (CPU32, CPU32_STREAMED):
        outputs, logits = parity.transformers_layers(tiny_model_dir, probes, run.inputs, adapter, where, False,
                                                     run.routing)
        for i in range(layers):
            for x, y, h in zip(outputs[i], run.outputs["a"][i], run.inputs[i], strict=True):
                assert float((x - y).norm() / (y - h).norm()) < parity.FLOAT32_LAYER["max_rel_err"]
        assert parity.compare(logits, run.logits["a"]).max_abs < parity.IDENTICAL["max_abs"]


def test_held_routing_sends_tokens_to_the_given_experts_in_both_runtimes(tiny_model_dir, adapter, probes):
    """Routing held fixed is real and the same in our runtime and in transformers' (a hook on its router): a model
    held to its own top-k choice is the model routing itself, bit for bit; held to other experts (each token's
    shifted by one) every layer's output changes, and transformers held to them agrees with ours within float32
    noise."""
    sequences = [p.ids for p in probes]
    own = streamed.layers(tiny_model_dir, sequences, {"a": adapter}, follow="a")
    free = streamed.layers(tiny_model_dir, sequences, {"a": adapter}, inputs=own.inputs)
    held = streamed.layers(tiny_model_dir, sequences, {"a": adapter}, inputs=own.inputs, routing=own.routing)
    E = json.loads((tiny_model_dir / "config.json").read_text())["num_local_experts"]
    moved = [[(r + 1) % E for r in layer] for layer in own.routing]
    other = streamed.layers(tiny_model_dir, sequences, {"a": adapter}, inputs=own.inputs, routing=moved)
    for i in range(len(own.inputs)):
        for x, y, z in zip(free.outputs["a"][i], held.outputs["a"][i], other.outputs["a"][i], strict=True):
            assert torch.equal(x, y) and not torch.allclose(x, z)
    outputs, _ = parity.transformers_layers(tiny_model_dir, probes, own.inputs, adapter, CPU32, False, moved)
    for i in range(len(own.inputs)):
        for x, y, h in zip(outputs[i], other.outputs["a"][i], own.inputs[i], strict=True):
            assert float((x - y).norm() / (y - h).norm()) < parity.FLOAT32_LAYER["max_rel_err"]


def test_layer_wise_check_passes_a_bf16_merge_and_fails_a_lost_adapter(tiny_model_dir, adapter, probes, tmp_path):
    """The layer-wise bounds come from the trained model's own bf16 error on the same inputs, measured in the same
    run: a correct bf16 merge passes them (our runtime and transformers); the adapter dropped (the base alone)
    fails every layer; one expert's LoRA zeroed in layer 0 and merged fails at layer 0, and only there."""
    ref = parity.Reference(tiny_model_dir, adapter, probes, CPU32, progress=False)
    layers = ref.layers(progress=False)
    budget = layers.bf16
    assert budget.worst_rel_err[0] > 1e-3 and budget.worst_kept_err > 0     # bf16 has an error, and it was measured
    criteria = parity.layer_criteria("bf16-merge", budget)
    k = 2 * parity.MARGIN
    assert criteria["max_rel_err"] == k * budget.worst_rel_err[0]
    assert criteria["max_kept_err"] == k * budget.worst_kept_err

    def check(model_dir: Path, transformers: bool = False) -> parity.LayerCheck:
        run = parity.transformers_layers if transformers else parity.runtime_layers
        outputs = run(model_dir, ref.probes, layers.inputs, where=CPU32, progress=False, routing=layers.routing)
        return parity.LayerCheck(model_dir.name, "trained", parity.compare_layers(*outputs, layers), criteria)

    merge(tiny_model_dir, adapter, tmp_path / "merged", "bf16", progress=False)
    for transformers in (False, True):
        good = check(tmp_path / "merged", transformers)
        assert good.passed, good.line()
        assert 0 < good.comparison.worst_rel_err[0] and "layer by layer" in good.line()

    dropped = check(tiny_model_dir)
    assert not dropped.passed and dropped.comparison.kept == [0.0, 0.0], dropped.line()
    assert any("adapter effect kept 0 off 1 by more than" in f and "in 2 of 2 layers" in f for f in dropped.failures)

    merge(tiny_model_dir, one_expert_zeroed(tiny_model_dir, adapter, tmp_path / "broken-adapter"),
          tmp_path / "broken", "bf16", progress=False)
    broken = check(tmp_path / "broken")
    assert not broken.passed, broken.line()
    assert broken.failures == [f"relative error {broken.comparison.rel_err[0]:.4g} > {criteria['max_rel_err']:.4g} "
                               "in 1 of 2 layers (worst: layer 0)",
                               f"adapter effect kept {broken.comparison.kept[0]:.4g} off 1 by more than "
                               f"{criteria['max_kept_err']:.4g} in 1 of 2 layers (worst: layer 0)"]


@pytest.mark.parametrize("experts", ["bf16", "mxfp4"])
def test_weights_read_back_pass_a_merge_and_name_the_expert_a_merge_lost(tiny_model_dir, adapter, tmp_path, experts):
    """Every adapted tensor of a merged export, read back, is the format's nearest encoding of the exact merge but
    for rounding ties (a handful of values); a merge that lost expert 0's LoRA in layer 0 fails on exactly the two
    tensors of that layer and names expert 0, whose update kept in weight space is 0 (routing plays no part)."""
    from finetune.ship import weights
    merge(tiny_model_dir, adapter, tmp_path / "merged", experts, progress=False)
    good = weights.check(tiny_model_dir, adapter, tmp_path / "merged", experts, progress=False)
    assert good.passed, good.line()
    summary = good.summary()
    assert summary["tensors"] == 12 and summary["wrong"] == 0 and summary["differ"] < 1e-3 * summary["values"]
    assert 0.5 < summary["min_expert_kept"] <= 1.0001 and "-> PASS" in good.line()

    merge(tiny_model_dir, one_expert_zeroed(tiny_model_dir, adapter, tmp_path / "broken-adapter"),
          tmp_path / "broken", experts, progress=False)
    broken = weights.check(tiny_model_dir, adapter, tmp_path / "broken", experts, progress=False)
    assert not broken.passed
    bad = {t.name: t for t in broken.tensors if t.wrong}
    assert sorted(bad) == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    assert all(t.wrong_experts == [0] and t.min_expert == 0 and abs(t.min_expert_kept) < 1e-6 for t in bad.values())
    assert len(broken.failures) == 2 and all("(experts 0) are not a rounding of the merge" in f
                                             for f in broken.failures), broken.failures


@pytest.mark.parametrize("experts", ["bf16", "mxfp4"])
def test_weights_read_back_catch_one_value_one_step_off(tiny_model_dir, adapter, tmp_path, experts):
    """One value of one expert moved to the neighbouring grid value (bf16: one ulp; MXFP4: the adjacent e2m1 code)
    where the exact merge is not near a tie: the check finds exactly that one value (or group) and that expert."""
    from finetune.ship import weights
    out = tmp_path / "merged"
    merge(tiny_model_dir, adapter, out, experts, progress=False)
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(str(shard))
    name, expert = "model.layers.1.mlp.experts.gate_up_proj", 2
    if experts == "bf16":
        t = tensors[name]                                          # (E, in, out) bf16: one ulp up, as integer bits
        bits = t[expert, 5, 7:8].view(torch.int16)
        t[expert, 5, 7:8] = (bits + 1).view(torch.bfloat16)
    else:
        blocks = tensors[name + "_blocks"]                         # (E, out, G, 16): the low nibble's magnitude +-1
        byte = int(blocks[expert, 5, 0, 0])
        mag = byte & 0x7
        blocks[expert, 5, 0, 0] = (byte & 0xF8) | (mag + 1 if mag < 7 else mag - 1)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    check = weights.check(tiny_model_dir, adapter, out, experts, progress=False)
    bad = [t for t in check.tensors if t.wrong]
    assert not check.passed and [(t.name, t.wrong, t.wrong_experts) for t in bad] == [(name, 1, [expert])]


def test_weights_read_back_refuse_a_missing_misshapen_changed_or_extra_tensor(tiny_model_dir, adapter, tmp_path):
    """A tensor the adapter changes that the export lacks, or holds in another dtype or shape, is a failure naming
    it, not a crash; so is an untouched tensor that is not the base's (the embedding: the layer checks never see it)
    and one the base does not have."""
    from finetune.ship import weights
    merge(tiny_model_dir, adapter, tmp_path / "merged", "bf16", progress=False)
    shard = next((tmp_path / "merged").glob("*.safetensors"))
    tensors = load_file(str(shard))
    q, e = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.experts.down_proj"
    assert q in tensors and e in tensors, "the tiny merge fits one shard"
    tensors[q] = tensors[q].float()
    del tensors[e]
    tensors["model.embed_tokens.weight"][3, 5] += 1
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    index = tmp_path / "merged" / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].pop(e)
        data["weight_map"]["model.extra.weight"] = shard.name
        index.write_text(json.dumps(data))
    check = weights.check(tiny_model_dir, adapter, tmp_path / "merged", "bf16", progress=False)
    assert not check.passed
    assert sorted(check.failures) == sorted([f"{e}: {e} missing from the export",
                                      "model.embed_tokens.weight: not the base's, though the adapter does not "
                                      "change it",
                                      "model.extra.weight: in the export, not in the base",
                                      f"{q}: written as F32 {tuple(tensors[q].shape)}, expected BF16 "
                                      f"{tuple(tensors[q].shape)}"])
    assert check.untouched == 25 and "25 untouched tensors" in check.line()          # the embedding among them


@pytest.fixture
def small_run(tiny_model_dir, adapter, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    (run / "run.json").write_text(json.dumps({"model_dir": str(tiny_model_dir)}))
    return run


def test_merge_a_chunk_of_experts_at_a_time_is_the_merge_at_once(tiny_model_dir, adapter, tmp_path):
    """At real size experts are merged a chunk at a time (gpt-oss-20b: 16 of 32 experts per 1 GiB chunk); the tiny
    model fits one chunk, so here each chunk is one expert: the merged files are the same, byte for byte."""
    from finetune.ship.merge import expert_chunks
    from inference.model.checkpoint import TensorFiles
    with TensorFiles(tiny_model_dir) as files:
        key = next(k for k in files.names() if k.endswith("gate_up_proj_blocks"))
        experts = files.shapes[key][0]
        assert expert_chunks(files, key.removesuffix("_blocks")) == [slice(0, experts)]
        assert len(expert_chunks(files, key.removesuffix("_blocks"), 1)) == experts > 1
    for fmt in ("bf16", "mxfp4"):
        once = merge(tiny_model_dir, adapter, tmp_path / f"{fmt}-once", fmt, progress=False)
        chunked = merge(tiny_model_dir, adapter, tmp_path / f"{fmt}-chunked", fmt, progress=False,
                        expert_chunk_bytes=1)
        # the share kept is summed in float64 chunk by chunk: the same up to float64 summation order
        assert [t.delta_kept for t in chunked.tensors] == pytest.approx([t.delta_kept for t in once.tensors],
                                                                        rel=1e-12)
        with TensorFiles(once.out_dir) as a, TensorFiles(chunked.out_dir) as b:
            assert a.names() == b.names() and any(".mlp.experts." in n for n in a.names())
            for name in a.names():
                assert torch.equal(a[name], b[name]), (fmt, name)


def test_plan_predicts_sizes_and_refuses_a_disk_too_small(small_run, tiny_model_dir, tmp_path):
    dests = {"peft": tmp_path / "p", "merged-bf16": tmp_path / "b", "merged-mxfp4": tmp_path / "m"}
    where = parity.Where.pick("cpu")
    plan = planning.make(tiny_model_dir, small_run / "adapter", dests, where)
    text = "\n".join(plan.lines())
    assert "plan: peft" in text and "merged-bf16" in text and "disk at" in text and "expected time" in text
    # the layer-by-layer checks' passes (the trained model once, merged-bf16's budget and two consumers, our runtime
    # on the one MXFP4 merge) are in the time, and a peft export makes none
    assert plan.layer_passes == 5 and "5 layer-by-layer passes" in text
    alone = {f: planning.make(tiny_model_dir, small_run / "adapter", {f: dests[f]}, where) for f in dests}
    assert [alone[f].layer_passes for f in dests] == [0, 4, 2]
    rate, bf16 = planning.RATES["cpu"], alone["merged-bf16"]
    # ... and so is reading the merged export back (finetune.ship.weights), once per merge
    assert bf16.seconds == pytest.approx(rate["fixed"] + 5 * bf16.model_bytes / rate["reference"]
                                         + bf16.sizes["merged-bf16"] / rate["merge"]
                                         + bf16.sizes["merged-bf16"] / rate["read_back"])
    # a GGUF LoRA export reads base.gguf and adapter.gguf back: their bytes and one header (the vocabulary's)
    lora = planning.make(tiny_model_dir, small_run / "adapter", {"gguf-lora": tmp_path / "g"}, where)
    assert lora.seconds == pytest.approx(rate["fixed"] + lora.model_bytes / rate["reference"]
                                         + lora.sizes["gguf-lora"] / rate["gguf"]
                                         + lora.sizes["gguf-lora"] / rate["gguf_read_back"] + rate["gguf_header"])
    plan.check_disk()                                     # this disk holds a tiny export
    for fmt in ("merged-bf16", "merged-mxfp4"):
        merge(tiny_model_dir, small_run / "adapter", dests[fmt], fmt.removeprefix("merged-"), progress=False)
        actual = sum(f.stat().st_size for f in dests[fmt].rglob("*") if f.is_file())
        assert abs(plan.sizes[fmt] - actual) <= 0.01 * actual, (fmt, plan.sizes[fmt], actual)
    (mount,) = plan.need
    plan.free[mount] = plan.need[mount] - 1               # one byte short
    with pytest.raises(UserError, match="not enough disk at .* for the export: it needs"):
        plan.check_disk()


def test_mxfp4_merge_that_rounds_a_small_adapter_away_is_refused(small_run, tmp_path):
    # a short fine-tune's update: lora_B 25x smaller than the test adapter's, ~1% of a weight
    weights = small_run / "adapter" / "adapter_model.safetensors"
    tensors = {k: (v * 0.04 if "lora_B" in k else v) for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    out = tmp_path / "exports" / "merged-mxfp4"
    with pytest.raises(ExportFailed) as failed:
        finetune.export(small_run, "merged-mxfp4", out=out, echo=lambda *_: None, progress=False)
    msg = str(failed.value)
    assert "expert updates kept 0.0000 < 0.8 in weight space" in msg and "ship it as peft" in msg
    assert "nothing was written" in msg
    summary = failed.value.result.report["tensors"]["summary"]
    assert summary["mean_delta_kept"] < 0.8                # measured in weight space: the update rounded away
    assert not out.exists() and list(out.parent.iterdir()) == []   # no partial directory either


def test_reference_layer_streamed_is_the_whole_model_reference(tiny_model_dir, adapter, probes):
    """A model too big for its memory budget (as gpt-oss-20b in float32 on a 16 GB card): the reference's greedy
    continuations and logits, computed one layer at a time, are the whole model's."""
    whole = parity.Reference(tiny_model_dir, adapter, probes, CPU32, progress=False)
    layered = parity.Reference(tiny_model_dir, adapter, probes, CPU32_STREAMED, progress=False)
    assert whole.engine is not None and layered.engine is None and layered.streamed
    assert [p.ids for p in layered.probes] == [p.ids for p in whole.probes]
    assert any(len(p.ids) > p.prompt_len for p in whole.probes)           # the continuations are there
    for got, want in zip(layered.trained + layered.base, whole.trained + whole.base):
        assert torch.equal(got, want)


def test_export_scale_benchmark_measures_an_export(tiny_model_dir, tmp_path):
    """benchmarks/export_scale.py's two halves on the tiny model: the adapter of the 20b recipe's shape, and one
    format exported and measured in a process of its own (times, peak memory, size, checks)."""
    from conftest import run

    from benchmarks.export_scale import write_adapter
    out = tmp_path / "export_scale.json"
    adapter = write_adapter(tiny_model_dir, tmp_path / "run" / "adapter")      # what the parent process does first
    assert adapter["r"] == 8 and adapter["lora_B_std"] == 0.002                # the 20b QLoRA recipe's shape
    (tmp_path / "run" / "run.json").write_text(json.dumps({"model_dir": str(tiny_model_dir)}))
    proc = run([sys.executable, str(REPO / "benchmarks" / "export_scale.py"), "--child", "peft", "--run",
                str(tmp_path / "run"), "--out", str(tmp_path / "peft"), "--result", str(out)], cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checks run on: CPU, float32, whole" in proc.stdout and "expected time" in proc.stdout
    peft = json.loads(out.read_text())
    assert peft["passed"] and peft["reference"] == "CPU, float32, whole" and len(peft["checks"]) == 2
    assert peft["process_seconds"] >= peft["export_seconds"] >= peft["reference_seconds"] > 0
    assert peft["peak_host_anon_GiB"] > 0 and peft["output_bytes"] > adapter["bytes"]
