"""benchmarks/make_checkpoint.py: a real-shape gpt-oss checkpoint on disk in the shipped layout. Here on CPU with the
tiny shape split into several shards (the layout code is the same for 20b/120b, which are written on the GPU
machine); the 20b/120b configs are checked against the published parameter counts."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import REPO, run

sys.path.insert(0, str(REPO / "benchmarks"))
import make_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny-sharded"
    proc = run([sys.executable, str(REPO / "benchmarks/make_checkpoint.py"), "--shape", "tiny", "--shard-gib", "0.05",
                "--json", str(out.parent / "result.json"), str(out)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out.parent / "result.json").read_text())


def test_sharded_layout_with_index_and_mxfp4_experts(written):
    from safetensors import safe_open
    out, result = written
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert result["shards"] == len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum((out / s).stat().st_size for s in shards)
    dtypes = {}
    for shard in shards:
        assert (out / shard).stat().st_size <= 0.05 * 2**30 + 2**20   # the limit, plus the safetensors header
        with safe_open(str(out / shard), "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                dtypes[name] = f.get_slice(name).get_dtype()
    assert dtypes["model.layers.1.mlp.experts.gate_up_proj_blocks"] == "U8"
    assert dtypes["model.layers.1.mlp.experts.down_proj_scales"] == "U8"
    assert {d for n, d in dtypes.items() if not n.endswith(("_blocks", "_scales"))} == {"BF16"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", make_checkpoint.MARKER):
        assert (out / name).is_file(), name
    import os
    umask = os.umask(0)
    os.umask(umask)   # readable as the umask allows, not owner-only as safetensors and mkdtemp create them
    assert (out / shards[0]).stat().st_mode & 0o777 == 0o666 & ~umask and out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_loads_in_transformers_and_our_runtime_with_the_stated_spread(written):
    from inference.engine import Engine
    from inference.model import mxfp4
    from inference.model.checkpoint import TensorFiles, load_model
    out, _ = written
    model = load_model(out)          # transformers' GptOssForCausalLM, every tensor present with its shape
    assert model.config.num_hidden_layers == 2
    with TensorFiles(out) as files:
        decoded = mxfp4.unpack(files["model.layers.0.mlp.experts.down_proj_blocks"],
                               files["model.layers.0.mlp.experts.down_proj_scales"])
        q = files["model.layers.0.self_attn.q_proj.weight"].float()
    # a sample's std is within 5 standard errors (1/sqrt(2N) relative) of the drawn 0.02; rounding to MXFP4 moves the
    # RMS by at most the rounding's own RMS error (triangle inequality), measured 0.115 relative on Gaussian data
    # (tests/test_mxfp4.py): 0.2 bounds it here
    for t, rounding in ((q, 0.0), (decoded, 0.2)):
        se = 5 / math.sqrt(2 * t.numel())
        assert abs(t.std().item() / make_checkpoint.STD - 1) <= se + rounding, t.std().item()
    reply = Engine.load(out).chat([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4)
    assert reply.completion_tokens == 4


def test_refuses_to_overwrite_what_it_did_not_write(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = run([sys.executable, str(REPO / "benchmarks/make_checkpoint.py"), "--shape", "tiny", "--force",
                str(tmp_path)], cwd=REPO)
    assert proc.returncode != 0 and "exists and is not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("shape, total, active", [("20b", 20.91e9, 3.61e9), ("120b", 116.83e9, 5.13e9)])
def test_real_shapes_have_the_published_parameter_counts(shape, total, active):
    """gpt-oss's model card: 20.91B parameters (3.61B active per token), 120b 116.83B (5.13B active); the counts are
    published to 0.01B, so ours must round to them."""
    from transformers import GptOssConfig, GptOssForCausalLM
    cfg = GptOssConfig.from_dict(make_checkpoint.config_dict(shape))
    with torch.device("meta"):
        model = GptOssForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    # active: everything but the experts, plus 4 of E experts; the model card counts the embedding once
    embed = cfg.vocab_size * cfg.hidden_size
    n_active = n - experts + experts * cfg.num_experts_per_tok / cfg.num_local_experts - embed
    assert round(n / 1e7) == round(total / 1e7), n
    assert round(n_active / 1e7) == round(active / 1e7), n_active
