"""The weighted loss: logits only where weights are non-zero, chunked for large batches, same numbers as the plain
computation over transformers' full logits."""

import torch
import torch.nn.functional as F

from inference.loss import linear_cross_entropy, weighted_loss_sum


def test_chunked_linear_cross_entropy_matches_plain_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1000, 24, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    upstream = torch.randn(37, dtype=torch.float32)
    ours = linear_cross_entropy(hidden, weight, targets, chunk=8)  # 37 rows > 8: the chunked path
    (ours * upstream).sum().backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")
    (plain * upstream).sum().backward()
    assert torch.allclose(ours, plain, atol=1e-5, rtol=0)
    assert torch.allclose(g_hidden, hidden.grad, atol=1e-5, rtol=0)
    assert torch.allclose(g_weight, weight.grad, atol=1e-5, rtol=0)


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
    assert torch.allclose(ours, hidden.grad, atol=1e-5, rtol=0)   # logits are fp32 by design, as above


def test_weighted_loss_equals_the_full_logits_reference(tiny_model):
    torch.manual_seed(1)
    ids = torch.randint(0, 199998, (3, 21))
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0                                       # a padded row
    weights = torch.zeros(3, 21)
    weights[0, 5:12] = 1.0
    weights[1, 3:20] = 0.5
    weights[2, 10:15] = 2.0
    with torch.no_grad():
        total, weight_sum, count = weighted_loss_sum(tiny_model, ids, mask, weights)
        logits = tiny_model(input_ids=ids, attention_mask=mask).logits   # transformers' own head, every position
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                          reduction="none").view(3, 20)
    reference = (nll * weights[:, 1:]).sum()
    assert torch.allclose(total, reference, rtol=1e-5, atol=1e-4)
    assert weight_sum.item() == weights[:, 1:].sum().item()
    assert int(count) == int((weights[:, 1:] > 0).sum())
