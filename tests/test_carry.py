"""Training from a carried state (pipeline/model/carry.py): a sequence read in two calls, the second entered
with the first one's final state, gives the logits and gradients of one call over the whole sequence."""
import pytest
import torch

from tests.conftest import rel_err
from tests.test_model import small_model


def halves(model, ids, seq_idx=None, rows=None):
    """Logits of ids read as two halves, the second entered with the first's final state."""
    half = ids.shape[1] // 2
    model.enter_carried(None)
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
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    changed = [n for n, p in model.named_parameters() if rel_err(p.grad, g_whole_first_half_free[n]) > 1e-9]
    assert changed, "a detached carried state must change the gradient (no path back into the first half)"
    # the detached semantics, in float64: the first half read by a frozen copy (no path back into it can
    # exist), the second half by the model from that copy's final state; every gradient must equal it
    import copy
    frozen = copy.deepcopy(model).requires_grad_(False)
    frozen.enter_carried(None)
    frozen(ids[:, :32], seq_idx=seq_idx[:, :32])
    model.zero_grad()
    model.set_carried(frozen.carried_final().entering(None))
    model(ids[:, 32:], seq_idx=seq_idx[:, 32:] - seq_idx[:, 32:33]).logits.sum().backward()
    model.set_carried(None)
    for n, p in model.named_parameters():
        assert p.grad is not None and got[n] is not None, n
        assert rel_err(got[n], p.grad) < 1e-12, n


def test_a_document_starting_near_the_cut_reads_nothing_of_the_one_before_it():
    """A row per offset o in -(d_conv-1) .. d_conv-1: a document starts o tokens after the cut. Each row takes the
    carried state only where its second half's first document began before the cut (the trainer's `continues`),
    and the two halves give the whole row's logits in one call: a document that starts in the first half's last
    d_conv-1 tokens continues into the second half without the conv tail bringing in the document before it."""
    torch.manual_seed(2)
    model = small_model().double()
    K, half = model.config.d_conv, 16
    offsets = range(-(K - 1), K)
    ids = torch.randint(0, 50, (len(offsets), 2 * half))
    seq_idx = torch.zeros(len(offsets), 2 * half, dtype=torch.int32)
    for row, offset in enumerate(offsets):
        seq_idx[row, half + offset:] = 1
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx).logits
        first, second = halves(model, ids, seq_idx, rows=seq_idx[:, half] == seq_idx[:, half - 1])
    got = torch.cat([first, second], 1)
    errors = {offset: rel_err(got[row], whole[row]) for row, offset in enumerate(offsets)}
    assert max(errors.values()) < 1e-12, f"error by the document's offset from the cut: {errors}"


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


def _last_rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from longctx.pipeline.model.carry import CarriedStates
    from longctx.pipeline.parallel import Groups
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sp = Groups(world, rank).get(world)
        calls = []
        real = sp.broadcast_from_last
        sp.broadcast_from_last = lambda t: calls.append(t.numel()) or real(t)
        g = torch.Generator().manual_seed(rank)
        # the trainer's layout and dtypes under bf16: tails in the model's dtype, states fp32
        mine = CarriedStates(torch.randn(2, 3, 3, 40, generator=g).to(torch.bfloat16),
                             torch.randn(2, 3, 4, 8, 16, generator=g))
        before = {k: v.clone() for k, v in mine.state_dict().items()}
        got = mine.from_last_rank(sp)
        torch.save({"mine": before, "got": got.state_dict(), "calls": calls}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_every_rank_gets_the_last_ranks_carried_state_exactly_in_one_broadcast(tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_last_rank_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in range(2))
    for got in (r0["got"], r1["got"]):
        for key in ("tails", "states"):
            assert got[key].dtype == r1["mine"][key].dtype and torch.equal(got[key], r1["mine"][key])
    assert not torch.equal(r0["mine"]["states"], r1["mine"]["states"])       # rank 0 really took rank 1's
    # a collective costs milliseconds on gloo: one per micro-step, not one per tensor
    assert r0["calls"] == r1["calls"] == [2 * 3 * 3 * 40 + 2 * 3 * 4 * 8 * 16]
