"""The runtime on a CUDA GPU against transformers on the same GPU (run on the device machine: pytest tests/gpu).

fp32 must agree as on CPU; in bf16 both sides round, so ours is held to the error transformers itself makes
against the fp32 reference, not to a tolerance picked to pass.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import EPS32, float64, fp32_tolerance

from inference import harmony
from inference.engine import Engine
from inference.engine.batch import PAD_ID
from inference.engine.scheduler import Scheduler
from inference.model import adapters, runtime
from inference.model.checkpoint import load_model

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


def scheduler(model, graphs: bool, slots: int = 8) -> Scheduler:
    return Scheduler(model, tuple(model.adapters), slots, pages=128, max_len=2048, graphs=graphs)


def generate(s: Scheduler, prompt, n, stops=frozenset(), temperature=0.0, seed=None, adapter=0) -> list[int]:
    return list(s.submit(prompt, n, stops, temperature, 1.0, seed, adapter).tokens())


def test_greedy_generation_equals_transformers_generate_on_cuda(tiny_model_dir):
    hf = load_model(tiny_model_dir, torch.float32, CUDA)
    ours = runtime.load(tiny_model_dir, torch.float32, CUDA)
    stops = harmony.stop_token_ids()
    prompts = [harmony.render_prompt([{"role": "user", "content": q}], None, harmony.HarmonyOptions("low"))
               for q in ("Name the color of banana.", "What is 2 + 2?", "Tell me a long story about a lighthouse.")]
    engine = Engine(ours, "tiny")
    singles = []
    for p in prompts:
        ids = torch.tensor([p], device=CUDA)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=80, do_sample=False,
                              eos_token_id=stops, pad_token_id=PAD_ID)[0, len(p):].tolist()
        cut = next((i + 1 for i, t in enumerate(out) if t in stops), len(out))
        (mine,) = engine.generate([p], 80)
        assert mine == out[:cut]
        singles.append(mine)
    assert engine.generate(prompts, 80) == singles     # together, in one continuously batched run


def test_fused_mxfp4_matvec_equals_its_plain_twin():
    from inference.model import kernels, mxfp4
    assert kernels.available()
    g = torch.Generator().manual_seed(2)
    for E, N, K in ((4, 256, 128), (32, 5760, 2880), (32, 2880, 2880)):   # tiny, and gpt-oss-20b's two projections
        w = torch.randn(E, N, K, generator=g) * 0.02
        blocks, scales = (t.to(CUDA) for t in mxfp4.pack(w))
        experts = torch.tensor([3, 0, 3, 1, 2], device=CUDA)
        assert kernels.scales_fit_bf16(scales)
        for dtype, fast in itertools.product((torch.float32, torch.bfloat16), (False, True)):
            x = torch.randn(len(experts), K, generator=g).to(CUDA, dtype)
            fused = kernels.mxfp4_matvec(x, blocks, scales, experts, fast=fast).double()
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


def test_grouped_mxfp4_equals_its_plain_twin():
    """The batched decode step's expert kernel: up to 64 tokens, each routed to 4 distinct experts."""
    from inference.model import kernels, mxfp4
    g = torch.Generator().manual_seed(3)
    for E, N, K in ((4, 256, 128), (32, 5760, 2880), (32, 2880, 2880)):
        w = torch.randn(E, N, K, generator=g) * 0.02
        blocks, scales = (t.to(CUDA) for t in mxfp4.pack(w))
        for tokens in (1, 2, 5, 16, 64, 300):   # 300: a prefill chunk, an expert's rows in several blocks
            k = min(4, E)
            experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)]).flatten().to(CUDA)
            x = torch.randn(tokens * k, K, generator=g).to(CUDA, torch.bfloat16)
            fused = kernels.mxfp4_grouped(x, blocks, scales, experts, tokens).double()

            def reference(rows, codes):   # float64, a few rows at a time (a 20b expert decodes to 130 MB in fp64)
                return torch.cat([kernels.mxfp4_matvec_reference(rows[i:i + 4], codes, scales, experts[i:i + 4])
                                  for i in range(0, len(rows), 4)])

            exact = reference(x.double(), blocks)
            # bf16 inputs and decoded weights are exact; fp32 accumulation, then one rounding to bf16
            magnitudes = reference(x.double().abs(), blocks & 0x77)
            bound = K * EPS32 * magnitudes + torch.finfo(torch.bfloat16).eps * exact.abs()
            assert ((fused - exact).abs() <= bound).all(), (E, N, K, tokens)


def test_every_grouped_tile_equals_its_plain_twin():
    """Each way the grouped kernel can be tiled (per-group or per-weight scaling, weights as the dot's left operand,
    even/odd values as two dots, 16 or 64 rows per block) is exact to the same bound, an expert's rows in one block
    or several: the tiles benchmarks/mxfp4_kernels.py --sweep times are all right, whichever grouped_tile picks."""
    from inference.model import kernels, mxfp4
    g = torch.Generator().manual_seed(4)
    E, N, K, k = 8, 256, 512, 4
    blocks, scales = (t.to(CUDA) for t in mxfp4.pack(torch.randn(E, N, K, generator=g) * 0.02))
    tiles = [(m, True, n, 32, 4, s, swap, False) for m in (16, 64) for n in (64, 128) for s in (3, 5)
             for swap in (False, True)]
    tiles += [(m, False, n, kk, w, 3, swap, deint) for m in (16, 64) for n, kk, w in ((64, 64, 4), (128, 128, 8))
              for swap in (False, True) for deint in (False, True)]
    for tokens in (5, 64, 300):
        experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)]).flatten().to(CUDA)
        x = torch.randn(tokens * k, K, generator=g).to(CUDA, torch.bfloat16)
        exact = kernels.mxfp4_matvec_reference(x.double(), blocks, scales, experts)
        magnitudes = kernels.mxfp4_matvec_reference(x.double().abs(), blocks & 0x77, scales, experts)
        bound = K * EPS32 * magnitudes + torch.finfo(torch.bfloat16).eps * exact.abs()
        for tile in tiles:
            got = kernels.mxfp4_grouped(x, blocks, scales, experts, tokens, tile=tile).double()
            assert ((got - exact).abs() <= bound).all(), (tokens, tile)


def test_fast_decode_is_exact_for_every_code_and_scale_it_takes():
    """The matvec's fast decode (bf16 built from the packed bits, one packed multiply by 2^(s - 1)) on every fp4
    code and every scale byte up to FAST_MAX_SCALE, subnormal products included (byte 0 gives 0.5 * 2^-127); a
    weight with a larger byte is not fast, and the general decode still handles larger bytes (up to 200 here:
    6 * 2^73, no fp32 overflow)."""
    from inference.model import kernels
    g = torch.Generator().manual_seed(5)
    E, N, K, tokens, k = 8, 256, 512, 16, 4
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), generator=g, dtype=torch.uint8).to(CUDA)
    for top, fast in ((kernels.FAST_MAX_SCALE, True), (200, False)):
        scales = torch.randint(0, top + 1, (E, N, K // 32), generator=g, dtype=torch.uint8).to(CUDA)
        scales[0, 0, 0] = top
        assert kernels.scales_fit_bf16(scales) == fast
        experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)]).flatten().to(CUDA)
        x = (torch.randn(tokens * k, K, generator=g) * 2.0 ** -60 if not fast else
             torch.randn(tokens * k, K, generator=g)).to(CUDA, torch.bfloat16)   # no overflow at byte 200
        exact = kernels.mxfp4_matvec_reference(x.double(), blocks, scales, experts)
        magnitudes = kernels.mxfp4_matvec_reference(x.double().abs(), blocks & 0x77, scales, experts)
        bound = K * EPS32 * magnitudes + torch.finfo(torch.bfloat16).eps * exact.abs()
        got = kernels.mxfp4_matvec(x, blocks, scales, experts, fast=fast)
        assert ((got.double() - exact).abs() <= bound).all(), (top, fast)


def test_expert_rows_kernel_equals_its_plain_twin():
    """The grouped kernel's table of rows per expert: the Triton scan gives each expert the rows routed to it, in row
    order, and their count, as the PyTorch twin does (entries past a count are never read)."""
    from inference.model import kernels
    g = torch.Generator().manual_seed(4)
    for E, tokens, k in ((32, 1, 4), (4, 3, 2), (32, 64, 4), (32, 4096, 4), (128, 37, 4), (128, 300, 4)):
        experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)]).flatten().to(CUDA)
        table, counts = kernels.expert_rows(experts, E, tokens)
        ref_table, ref_counts = kernels.expert_rows_reference(experts, E, tokens)
        assert torch.equal(counts, ref_counts) and int(counts.sum()) == tokens * k
        for e in range(E):
            c = int(counts[e])
            assert torch.equal(table[e, :c], ref_table[e, :c]), (E, tokens, e)


def test_cuda_graph_decoding_equals_eager_decoding(tiny_model_dir, adapter_dir):
    """Batched decode steps replayed as CUDA graphs (bf16, the serving dtype: the grouped MXFP4 kernel) give exactly
    the eager steps' tokens, for the base, an adapter and seeded sampling in one batch."""
    ours = runtime.load(tiny_model_dir, torch.bfloat16, CUDA)
    adapters.attach(ours, "a", adapters.read_adapter(adapter_dir, ours))
    prompts = [harmony.render_prompt([{"role": "user", "content": q}], None, harmony.HarmonyOptions("low"))
               for q in ("Tell me about lighthouses.", "Two?", "A longer question about the sea and its tides.")]
    cases = [(p, adapter, t) for p in prompts for adapter, t in ((0, 0.0), (1, 0.0), (1, 1.0))]
    runs = []
    for graphs in (False, True):
        s = scheduler(ours, graphs, slots=16)
        requests = s.submit_many([(p, 100, frozenset(), t, 1.0, 7, a) for p, a, t in cases])   # one first step
        runs.append([list(r.tokens()) for r in requests])
        if graphs:
            assert s.stepper.graph_count > 0
    assert all(len(r) == 100 for r in runs[0]) and runs[0] == runs[1]


def test_concurrent_streams_with_cuda_graphs_match_one_at_a_time(tiny_model_dir):
    """The server's situation: threads stream at once into one batch (fp32, so that the batch's composition cannot
    move the tokens by rounding; graphs forced on, with few enough rows for the gathered expert path)."""
    import threading
    ours = runtime.load(tiny_model_dir, torch.float32, CUDA)
    s = scheduler(ours, True, slots=2)
    prompts = [harmony.render_prompt([{"role": "user", "content": q}], None, harmony.HarmonyOptions("low"))
               for q in ("One?", "Two, please.", "Three!")]
    alone = [generate(s, p, 60) for p in prompts]
    together: dict[int, list[int]] = {}

    def run(i):
        together[i] = generate(s, prompts[i], 60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together.get(i) for i in range(len(prompts))] == alone and len(alone[0]) == 60
    assert s.stepper.graph_count > 0
