"""The weighted loss: logits only where weights are non-zero, chunked for large batches, same numbers as the plain
computation over transformers' full logits."""

import copy

import torch
import torch.nn.functional as F
from conftest import assert_fp32_close, float64, fp32_tolerance

from finetune.kernels.loss import linear_cross_entropy, weighted_loss_sum


def test_chunked_linear_cross_entropy_matches_plain_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1000, 24, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    upstream = torch.randn(37, dtype=torch.float32)
    ours = linear_cross_entropy(hidden, weight, targets, chunk=8)  # 37 rows > 8: the chunked path
    (ours * upstream).sum().backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    # the plain computation with fp32 logits (as ours), and without rounding them (float64), for the tolerances
    results = []
    for cast in (torch.float32, torch.float64):
        hidden.grad = weight.grad = None
        plain = F.cross_entropy((hidden @ weight.T).to(cast), targets, reduction="none")
        (plain * upstream).sum().backward()
        results.append((plain.detach(), hidden.grad.clone(), weight.grad.clone()))
    (plain, plain_h, plain_w), (exact, exact_h, exact_w) = results
    assert_fp32_close(ours, plain, exact, "loss")
    assert_fp32_close(g_hidden, plain_h, exact_h, "d hidden")
    assert_fp32_close(g_weight, plain_w, exact_w, "d weight")


def test_chunked_path_with_a_frozen_head_has_the_plain_gradient():
    """Frozen output layer (LoRA): the row gradients are computed in the forward, then scaled by the upstream one."""
    torch.manual_seed(1)
    hidden = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64)  # frozen, like gpt-oss's lm_head under LoRA
    targets, upstream = torch.randint(0, 50, (9,)), torch.randn(9, dtype=torch.float64)
    (linear_cross_entropy(hidden, weight, targets, chunk=4) * upstream).sum().backward()
    assert weight.grad is None
    ours, hidden.grad = hidden.grad, None
    (F.cross_entropy(hidden @ weight.T, targets, reduction="none") * upstream).sum().backward()
    exact, hidden.grad = hidden.grad, None
    # logits are fp32 by design, as above: ours is as far from the float64 gradient as rounding them to fp32 takes
    (F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none") * upstream).sum().backward()
    assert (ours - exact).abs().max() <= fp32_tolerance(hidden.grad, exact)


def test_weighted_loss_equals_the_full_logits_reference(tiny_model):
    torch.manual_seed(1)
    ids = torch.randint(0, 199998, (3, 21))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0                                       # a padded row
    weights = torch.zeros(3, 21)
    weights[0, 5:12] = 1.0
    weights[1, 3:20] = 0.5
    weights[2, 10:15] = 2.0

    def reference(model):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits   # transformers' own head, every position
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none").view(3, 20)
        return (nll * weights[:, 1:].to(nll.dtype)).sum()

    exact = reference(float64(copy.deepcopy(tiny_model)))   # the same in float64, for the tolerance
    with torch.no_grad():
        total, weight_sum, count = weighted_loss_sum(tiny_model, ids, mask, weights)
    assert_fp32_close(total, reference(tiny_model), exact, "weighted loss")
    assert weight_sum.item() == weights[:, 1:].sum().item()
    assert int(count) == int((weights[:, 1:] > 0).sum())
