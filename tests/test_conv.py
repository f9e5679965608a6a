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


def plain_masked_conv(x, w, b, tail, seq_idx):
    """The definition, one masked product per tap, differentiated by autograd: the reference for the written-out
    backward."""
    from longctx.kernels.common import document_ids
    w = w[:, 0, :]
    K, (bsz, l, d) = w.shape[-1], x.shape
    full = torch.cat([tail, x], 1)
    doc = document_ids(seq_idx)
    doc_full = torch.cat([doc[:, :1].expand(bsz, K - 1), doc], 1)
    out = b.expand(bsz, l, d)
    for k in range(K):
        out = out + full[:, k:k + l] * (doc_full[:, k:k + l] == doc)[..., None] * w[:, k]
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("K", [2, 4])
def test_gradients_equal_autograd_of_the_plain_masked_conv(K):
    # documents of 1, 2 and more rows, a boundary right after the tail, and reused seq_idx values
    seq = torch.tensor([[0, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 1], [5] * 4 + [6] * 9])
    args = [torch.randn(2, 13, 3, dtype=torch.float64), torch.randn(3, 1, K, dtype=torch.float64),
            torch.randn(3, dtype=torch.float64), torch.randn(2, K - 1, 3, dtype=torch.float64)]
    ours = [a.clone().requires_grad_() for a in args]
    ref = [a.clone().requires_grad_() for a in args]
    out, _ = causal_conv1d(ours[0], ours[1], ours[2], tail=ours[3], seq_idx=seq)
    expected = plain_masked_conv(*ref, seq)
    assert rel_err(out, expected) <= 1e-12
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    for name, a, r in zip(("x", "weight", "bias", "tail"), ours, ref):
        assert rel_err(a.grad, r.grad) <= 1e-12, name


def documents_around(cut: int, K: int, length: int) -> torch.Tensor:
    """seq_idx with one row per offset o in -(K-1) .. K-1: a document starts at cut + o."""
    seq = torch.zeros(2 * K - 1, length, dtype=torch.int32)
    for row, offset in enumerate(range(-(K - 1), K)):
        seq[row, cut + offset:] = 1
    return seq


@pytest.mark.parametrize("K", [2, 4])
def test_a_carried_tail_enters_only_the_document_it_came_from(K):
    """A row read in two calls, the second entered with the first's tail as carried state enters it (carry.py:
    only where the second call's first document began before the cut), equals one call over the whole row with
    its documents, forward and gradients, for a document starting at each offset -(K-1) .. K-1 of the cut. A
    document that starts in the first call's last K-1 rows continues into the second call: the tail must not
    carry the rows of the document before it."""
    cut, length = 7, 13
    seq = documents_around(cut, K, length)
    b = seq.shape[0]
    args = [torch.randn(b, length, 3, dtype=torch.float64), torch.randn(3, 1, K, dtype=torch.float64),
            torch.randn(3, dtype=torch.float64)]
    ours = [a.clone().requires_grad_() for a in args]
    ref = [a.clone().requires_grad_() for a in args]
    x, w, bias = ours
    first, tail = causal_conv1d(x[:, :cut], w, bias, seq_idx=seq[:, :cut])
    continues = (seq[:, cut] == seq[:, cut - 1]).to(tail.dtype)          # CarriedStates.entering(rows)
    second, _ = causal_conv1d(x[:, cut:], w, bias, tail=tail * continues[:, None, None], seq_idx=seq[:, cut:])
    got = torch.cat([first, second], 1)
    expected, _ = causal_conv1d(*ref, seq_idx=seq)
    assert rel_err(expected, plain_masked_conv(*ref, torch.zeros(b, K - 1, 3, dtype=torch.float64), seq)) <= 1e-12
    errors = {offset: rel_err(got[row], expected[row]) for row, offset in enumerate(range(-(K - 1), K))}
    assert max(errors.values()) <= 1e-12, f"error by the document's offset from the cut: {errors}"
    g = torch.randn_like(got)
    got.backward(g)
    expected.backward(g)
    for name, a, r in zip(("x", "weight", "bias"), ours, ref):
        assert rel_err(a.grad, r.grad) <= 1e-12, name
