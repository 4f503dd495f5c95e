import pytest
import torch
from torch import nn

from epts.hilora import ElasticLinear
from epts.importance import kept_per_row, row_ranks


def elastic_layer(groups=4, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(40, 24)
    layer = ElasticLinear(base, row_ranks(base.weight.abs()), [3, 2, 4, 3][:groups])
    with torch.no_grad():
        for b in layer.B:
            b.normal_()  # B starts at zero; give every group a live update
    return base, layer


def test_initialisation_follows_lora():
    base = nn.Linear(40, 24)
    layer = ElasticLinear(base, row_ranks(base.weight.abs()), [8, 8])
    assert all(torch.count_nonzero(b) == 0 for b in layer.B)
    assert all(a.abs().max() > 0 and a.shape == (8, 40) for a in layer.A)
    # Only the adapters train: the base weight is a buffer shared with the wrapped layer, not copied.
    assert set(dict(layer.named_parameters())) == {f"{ab}.{k}" for ab in "AB" for k in range(2)}
    assert layer.weight.data_ptr() == base.weight.data_ptr()


@pytest.mark.parametrize("group", [0, 1, 2, 3])
def test_group_k_uses_adapters_up_to_k_and_its_gradients_reach_only_those(group):
    _, layer = elastic_layer()
    layer.set_state(0.5, group)
    layer(torch.randn(5, 40)).pow(2).sum().backward()
    for j in range(layer.num_groups):
        grads = [layer.A[j].grad, layer.B[j].grad]
        if j <= group:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), j
        else:
            assert all(g is None for g in grads), j


def test_inheritance_sums_lower_groups():
    base, layer = elastic_layer()
    layer.set_state(0.0, 2)
    expected = base.weight + sum(layer.B[j] @ layer.A[j] for j in range(3))
    torch.testing.assert_close(layer.effective_weight(), expected)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_merge_has_exact_sparsity_and_equals_the_wrapped_forward(sparsity):
    base, layer = elastic_layer()
    layer.set_state(sparsity, 3)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    zeros_per_row = (merged.weight == 0).sum(1)
    assert torch.all(zeros_per_row == 40 - kept_per_row(40, sparsity))
    x = torch.randn(7, 40)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-6, atol=1e-6)
    # The mask is the importance mask: pruned positions are the lowest-ranked ones.
    assert torch.equal(merged.weight != 0, row_ranks(base.weight.abs()) < kept_per_row(40, sparsity))


def test_adapters_off_is_the_masked_base_weight():
    base, layer = elastic_layer()
    layer.set_state(0.4, 0, group1_adapter=False)
    torch.testing.assert_close(layer.effective_weight(), base.weight * (layer.ranks < kept_per_row(40, 0.4)))
