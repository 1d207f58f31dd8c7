"""The runtime on a CUDA GPU against transformers on the same GPU (run on the device machine: pytest tests/gpu).

fp32 must agree as on CPU; in bf16 both sides round, so ours is held to the error transformers itself makes
against the fp32 reference, not to a tolerance picked to pass.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EPS32, float64, fp32_tolerance

from inference import adapters, harmony, runtime
from inference.checkpoint import load_model
from inference.generate import PAD_ID, greedy_batch, stream_tokens

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 199_000, (2, 160), generator=g).to(CUDA)  # longer than the sliding window (64)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_fp32_logits_match_transformers_on_cuda(tiny_model_dir, adapter_dir, ids):
    from peft import PeftModel
    ours = runtime.load(tiny_model_dir, torch.float32, CUDA)
    adapters.attach(ours, "a", adapters.read_adapter(adapter_dir, ours))
    with torch.no_grad():
        ref = load_model(tiny_model_dir, torch.float32, CUDA)(input_ids=ids).logits
        base = ours.logits(ours(ids))
        ref_a = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32, CUDA), adapter_dir)(
            input_ids=ids).logits
        with_a = ours.logits(ours(ids, adapter="a"), "a")
        # the references in float64: their fp32 runs' distance from these (x margin) is what ours may differ by
        exact = float64(load_model(tiny_model_dir, torch.float32, CUDA))(input_ids=ids).logits
        exact_a = float64(PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32, CUDA), adapter_dir))(
            input_ids=ids).logits
    assert (base - ref).abs().max().item() <= fp32_tolerance(ref, exact)
    assert (with_a - ref_a).abs().max().item() <= fp32_tolerance(ref_a, exact_a)
    assert (ref_a - ref).abs().max().item() > 0.1      # the adapter really changes the output


def test_bf16_error_is_no_worse_than_transformers_bf16(tiny_model_dir, ids):
    with torch.no_grad():
        exact = load_model(tiny_model_dir, torch.float32, CUDA)(input_ids=ids).logits
        theirs = load_model(tiny_model_dir, torch.bfloat16, CUDA)(input_ids=ids).logits.float()
        ours_model = runtime.load(tiny_model_dir, torch.bfloat16, CUDA)
        ours = ours_model.logits(ours_model(ids))
    err_theirs = (theirs - exact).abs().mean().item()
    err_ours = (ours - exact).abs().mean().item()
    assert err_ours <= 1.5 * err_theirs, (err_ours, err_theirs)


def test_greedy_generation_equals_transformers_generate_on_cuda(tiny_model_dir):
    hf = load_model(tiny_model_dir, torch.float32, CUDA)
    ours = runtime.load(tiny_model_dir, torch.float32, CUDA)
    stops = harmony.stop_token_ids()
    prompts = [harmony.render_prompt([{"role": "user", "content": q}], None, harmony.HarmonyOptions("low"))
               for q in ("Name the color of banana.", "What is 2 + 2?", "Tell me a long story about a lighthouse.")]
    singles = []
    for p in prompts:
        ids = torch.tensor([p], device=CUDA)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=80, do_sample=False,
                              eos_token_id=stops, pad_token_id=PAD_ID)[0, len(p):].tolist()
        cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
        mine = list(stream_tokens(ours, p, 80, set(stops)))
        assert mine == out[:cut]
        singles.append(mine)
    assert greedy_batch(ours, prompts, 80, set(stops)) == singles


def test_fused_mxfp4_matvec_equals_its_plain_twin():
    from inference import kernels, mxfp4
    assert kernels.available()
    g = torch.Generator().manual_seed(2)
    for E, N, K in ((4, 256, 128), (32, 5760, 2880), (32, 2880, 2880)):   # tiny, and gpt-oss-20b's two projections
        w = torch.randn(E, N, K, generator=g) * 0.02
        blocks, scales = (t.to(CUDA) for t in mxfp4.pack(w))
        experts = torch.tensor([3, 0, 3, 1, 2], device=CUDA)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(len(experts), K, generator=g).to(CUDA, dtype)
            fused = kernels.mxfp4_matvec(x, blocks, scales, experts).double()
            exact = kernels.mxfp4_matvec_reference(x.double(), blocks, scales, experts)
            plain = kernels.mxfp4_matvec_reference(x, blocks, scales, experts).double()
            # fp32 accumulation of K products (inputs exact): within K * eps32 * sum |x_k w_k| of the exact value
            # (|W| decoded from the blocks with each code's sign bit cleared), then one rounding to `dtype`
            magnitudes = kernels.mxfp4_matvec_reference(x.double().abs(), blocks & 0x77, scales, experts)
            bound = K * EPS32 * magnitudes + torch.finfo(dtype).eps * exact.abs()
            assert ((fused - exact).abs() <= bound).all()
            # no less accurate than decoding to memory (both round the output to `dtype` once): 1.5x its error,
            # at least one fp32 ulp of the largest value
            scale = exact.abs().max().item()
            assert (fused - exact).abs().max().item() <= 1.5 * (plain - exact).abs().max().item() + EPS32 * scale


def test_cuda_graph_decoding_equals_eager_decoding(tiny_model_dir, adapter_dir):
    ours = runtime.load(tiny_model_dir, torch.float32, CUDA)
    adapters.attach(ours, "a", adapters.read_adapter(adapter_dir, ours))
    prompt = harmony.render_prompt([{"role": "user", "content": "Tell me about lighthouses."}], None,
                                   harmony.HarmonyOptions("low"))
    for adapter, temperature in ((None, 0.0), ("a", 0.0), ("a", 1.0)):
        runs = [list(stream_tokens(ours, prompt, 100, set(), temperature, seed=7, adapter=adapter, cuda_graph=graph))
                for graph in (False, True)]
        assert len(runs[0]) == 100 and runs[0] == runs[1], (adapter, temperature)


def test_concurrent_streams_with_cuda_graphs_match_one_at_a_time(tiny_model_dir):
    """The server's situation: threads stream at once, each capturing its own graph under one shared lock."""
    import threading
    ours = runtime.load(tiny_model_dir, torch.float32, CUDA)
    lock = threading.Lock()
    prompts = [harmony.render_prompt([{"role": "user", "content": q}], None, harmony.HarmonyOptions("low"))
               for q in ("One?", "Two, please.", "Three!")]
    alone = [list(stream_tokens(ours, p, 60, set(), lock=lock)) for p in prompts]
    together: dict[int, list[int]] = {}

    def run(i):
        together[i] = list(stream_tokens(ours, prompts[i], 60, set(), lock=lock))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together.get(i) for i in range(len(prompts))] == alone and len(alone[0]) == 60
