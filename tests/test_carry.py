"""Training from a carried state (pipeline/model/carry.py): a sequence read in two calls, the second entered
with the first one's final state, gives the logits and gradients of one call over the whole sequence."""
import pytest
import torch

from longctx.pipeline.model.carry import LayerCarry
from tests.conftest import rel_err
from tests.test_model import small_model


def halves(model, ids, seq_idx=None, rows=None):
    """Logits of ids read as two halves, the second entered with the first's final state."""
    half = ids.shape[1] // 2
    model.set_carried([LayerCarry() for _ in model.backbone.layers])
    first = model(ids[:, :half], seq_idx=None if seq_idx is None else seq_idx[:, :half]).logits
    model.set_carried(model.carried_final().entering(rows))
    second_idx = None if seq_idx is None else seq_idx[:, half:] - seq_idx[:, half:half + 1]
    second = model(ids[:, half:], seq_idx=second_idx).logits
    model.set_carried(None)
    return first, second


@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_halves_with_the_carried_state_equal_the_whole_sequence(checkpointing):
    torch.manual_seed(0)
    model = small_model().double().train()
    model.enable_gradient_checkpointing(checkpointing)
    ids = torch.randint(0, 50, (2, 64))
    seq_idx = torch.zeros(2, 64, dtype=torch.int32)
    seq_idx[0, 20:] = 1                  # row 0: a document ends in the first half, the next crosses the cut
    seq_idx[1, 40:] = 1                  # row 1: one document crosses the cut, another starts after it
    whole = model(ids, seq_idx=seq_idx).logits
    first, second = halves(model, ids, seq_idx)
    assert rel_err(torch.cat([first, second], 1), whole) < 1e-12
    # gradients stop at the carried state: the second half's gradient is its own, from the entering state
    model.zero_grad()
    whole[:, 32:].sum().backward()
    g_whole_first_half_free = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    first, second = halves(model, ids, seq_idx)
    second.sum().backward()
    changed = [n for n, p in model.named_parameters() if rel_err(p.grad, g_whole_first_half_free[n]) > 1e-9]
    assert changed, "a detached carried state must change the gradient (no path back into the first half)"


def test_a_row_that_does_not_take_the_carried_state_starts_from_zeros():
    torch.manual_seed(1)
    model = small_model().double()
    ids = torch.randint(0, 50, (2, 48))
    _, second = halves(model, ids, rows=torch.tensor([True, False]))
    fresh = model(ids[:, 24:]).logits
    assert rel_err(second[1], fresh[1]) < 1e-12
    assert rel_err(second[0], fresh[0]) > 1e-3


def test_carried_final_before_a_carried_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="set_carried"):
        small_model().carried_final()
