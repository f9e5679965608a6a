import pytest
import torch
import torch.nn.functional as F

from longctx.kernels import causal_conv1d
from tests.conftest import rel_err


def torch_conv(x, w, b):
    """nn.Conv1d with left padding, as mamba_ssm's non-fused path computes it."""
    return F.conv1d(x.transpose(1, 2), w, b, padding=w.shape[-1] - 1, groups=w.shape[0])[..., : x.shape[1]].transpose(1, 2)


@pytest.mark.parametrize("K", [2, 4])
def test_matches_torch_conv1d(K):
    x, w, b = torch.randn(2, 17, 6, dtype=torch.float64), torch.randn(6, 1, K, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    out, tail = causal_conv1d(x, w, b)
    assert rel_err(out, torch_conv(x, w, b)) <= 1e-12
    assert torch.equal(tail, x[:, -(K - 1):])


def test_tail_carries_across_calls():
    x, w, b = torch.randn(2, 20, 5, dtype=torch.float64), torch.randn(5, 1, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    whole, _ = causal_conv1d(x, w, b)
    first, tail = causal_conv1d(x[:, :2], w, b)   # shorter than the kernel: tail mixes zeros and rows
    second, tail = causal_conv1d(x[:, 2:9], w, b, tail=tail)
    third, _ = causal_conv1d(x[:, 9:], w, b, tail=tail)
    assert rel_err(torch.cat([first, second, third], 1), whole) <= 1e-12


def test_document_boundary_sees_zeros_before_it():
    x, w = torch.randn(1, 12, 3, dtype=torch.float64), torch.randn(3, 1, 4, dtype=torch.float64)
    seq = torch.tensor([[0] * 5 + [1] * 7])
    out, _ = causal_conv1d(x, w, None, seq_idx=seq)
    alone = torch.cat([torch_conv(x[:, :5], w, None), torch_conv(x[:, 5:], w, None)], 1)
    assert rel_err(out, alone) <= 1e-12


def test_bad_tail_shape_is_an_error():
    with pytest.raises(ValueError, match="conv tail must be"):
        causal_conv1d(torch.randn(1, 4, 3), torch.randn(3, 1, 4), tail=torch.zeros(1, 2, 3))
