"""State norm and sliding window in kernels.ssd, against the reference (float64) and the §4 definitions."""
import pytest
import torch

from longctx.kernels import StateNorm, ssd, ssd_naive
from tests.conftest import rel_err
from tests.test_ssd import CASES, make_inputs, run

F64 = torch.float64

MITIGATIONS = {
    "window_1": dict(window=1),
    "window_inside_chunk": dict(window=5),
    "window_across_chunks": dict(window=19),
    "state_norm": dict(state_norm=StateNorm(every=8, threshold=0.4)),
    "state_norm_per_head_offset": dict(state_norm=StateNorm(every=6, threshold="per_head", offset=5)),
    "all_combined": dict(window=11, state_norm=StateNorm(every=8, threshold=0.3)),
}


def resolve(extra, h):
    sn = extra.get("state_norm")
    if sn is not None and sn.threshold == "per_head":
        extra = dict(extra, state_norm=StateNorm(sn.every, torch.linspace(0.2, 0.6, h, dtype=F64), sn.offset))
    return extra


@pytest.mark.parametrize("case", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(MITIGATIONS))
def test_matches_reference_outputs_states_gradients(case, name):
    c = CASES[case]
    args, kw = make_inputs(c)
    extra = resolve(MITIGATIONS[name], c["h"])
    y0, s0, g0 = run(ssd_naive, args, kw, **extra)
    y1, s1, g1 = run(ssd, args, kw, chunk_size=8, **extra)
    assert rel_err(y1, y0) <= 1e-10
    assert rel_err(s1, s0) <= 1e-10
    for k in g0:
        assert rel_err(g1[k], g0[k]) <= 1e-10, k
    # the mitigation really acted: outputs differ from the unmitigated scan
    y_plain, _, _ = run(ssd_naive, args, kw)
    assert rel_err(y0, y_plain) > 1e-6


def test_threshold_gradient_flows():
    args, kw = make_inputs(CASES[2])
    tau = torch.full((CASES[2]["h"],), 0.3, dtype=F64, requires_grad=True)
    for fn in (ssd_naive, lambda **a: ssd(**a, chunk_size=8)):
        tau.grad = None
        fn(**args, **kw, state_norm=StateNorm(8, tau)).sum().backward()
        assert tau.grad is not None and tau.grad.abs().sum() > 0


def plain_recurrence(x, dt, A, B, C, h0=None):
    """States h_t of the unmitigated recurrence (b,l,h,p,n) and decays a_t, for the §4 definitions."""
    b, l, h, p = x.shape
    a = torch.exp(dt * A)
    state = torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype) if h0 is None else h0
    hs = []
    for t in range(l):
        state = a[:, t, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, 0, None, None, :]
        hs.append(state)
    return torch.stack(hs, 1), a


def test_window_equals_state_difference_definition():
    """w_t = h_t - (a_{t-r+1}...a_t) h_{t-r} for t >= r, h_t for t < r (docs/ARCHITECTURE.md §4), in float64."""
    g = torch.Generator().manual_seed(5)
    b, l, h, p, n, r = 1, 30, 2, 3, 4, 7
    x, B, C = (torch.randn(*s, generator=g, dtype=F64) for s in ((b, l, h, p), (b, l, 1, n), (b, l, 1, n)))
    dt, A, h0 = torch.rand(b, l, h, generator=g, dtype=F64), -torch.rand(h, generator=g, dtype=F64), \
        torch.randn(b, h, p, n, generator=g, dtype=F64)
    hs, a = plain_recurrence(x, dt, A, B, C, h0)
    expect = []
    for t in range(l):
        w = hs[:, t]
        if t >= r:
            w = w - torch.prod(a[:, t - r + 1:t + 1], dim=1)[:, :, None, None] * hs[:, t - r]
        expect.append(torch.einsum("bhpn,bn->bhp", w, C[:, t, 0]))
    expect = torch.stack(expect, 1)
    for fn in (ssd_naive, lambda **k: ssd(**k, chunk_size=4)):
        assert rel_err(fn(x=x, dt=dt, A=A, B=B, C=C, initial_states=h0, window=r), expect) <= 1e-10


@pytest.mark.parametrize("window", [40, 41, 1000])
def test_window_not_shorter_than_the_sequence_is_no_window(window):
    args, kw = make_inputs(CASES[4])   # l = 41, with initial state and document boundaries
    plain = ssd(**args, **kw, chunk_size=8)
    windowed = ssd(**args, **kw, chunk_size=8, window=window)
    if window >= 41:
        assert rel_err(windowed, plain) <= 1e-12
    else:
        assert rel_err(windowed, plain) > 0  # the initial state drops out at t = 40


def test_state_norm_never_exceeds_threshold_at_norm_positions():
    g = torch.Generator().manual_seed(2)
    b, l, h, p, n, every, tau = 2, 64, 3, 4, 4, 8, 0.5
    x = torch.randn(b, l, h, p, generator=g, dtype=F64) + 2.0     # biased input: the state grows
    B = torch.randn(b, l, 1, n, generator=g, dtype=F64) + 1.0
    dt = torch.rand(b, l, h, generator=g, dtype=F64)
    A = -0.01 * torch.ones(h, dtype=F64)
    C = torch.randn(b, l, 1, n, generator=g, dtype=F64)
    for stop in range(every, l + 1, every):   # the final state after a norm position is the rescaled state
        _, s = ssd(x[:, :stop], dt[:, :stop], A, B[:, :stop], C[:, :stop], chunk_size=8,
                   state_norm=StateNorm(every, tau), return_final_states=True)
        norms = s.square().sum((-2, -1)).sqrt()
        assert (norms <= tau * (1 + 1e-12)).all()
    _, unnormalized = ssd(x, dt, A, B, C, return_final_states=True)
    assert unnormalized.square().sum((-2, -1)).sqrt().min() > 10 * tau


def test_state_norm_positions_follow_the_offset_across_calls():
    """Two calls chained through final/initial states with offset equal one call."""
    args, kw = make_inputs(CASES[2])
    kw.pop("dt_limit", None)
    sn = StateNorm(every=12, threshold=0.3)
    y, s = ssd(**args, **kw, chunk_size=8, state_norm=sn, return_final_states=True)
    cut = 17
    a1 = {k: (v if k == "A" else v[:, :cut]) for k, v in args.items()}
    a2 = {k: (v if k == "A" else v[:, cut:]) for k, v in args.items()}
    y1, s1 = ssd(**a1, **kw, chunk_size=8, state_norm=sn, return_final_states=True)
    y2, s2 = ssd(**a2, **kw, chunk_size=8, initial_states=s1, return_final_states=True,
                 state_norm=StateNorm(12, 0.3, offset=cut))
    assert rel_err(torch.cat([y1, y2], 1), y) <= 1e-12 and rel_err(s2, s) <= 1e-12


def test_window_is_exact_over_20k_steps_with_decay_near_one_in_fp32():
    """Collapse regime: a within 1e-4 of 1, a huge state, a short window; fp32 vs a float64 reference."""
    g = torch.Generator().manual_seed(7)
    b, l, h, p, n, r = 1, 20000, 2, 2, 2, 256
    x = torch.rand(b, l, h, p, generator=g, dtype=F64) + 0.5     # positive inputs: the full state grows ~ l
    B = torch.rand(b, l, 1, n, generator=g, dtype=F64) + 0.5
    C = torch.rand(b, l, 1, n, generator=g, dtype=F64) + 0.5
    dt = torch.full((b, l, h), 0.5, dtype=F64)
    A = torch.tensor([-2e-4, -1e-5], dtype=F64)                   # a = exp(dt A) in [1 - 1e-4, 1)
    ref = ssd_naive(x, dt, A, B, C, window=r)
    got = ssd(x.float(), dt.float(), A.float(), B.float(), C.float(), chunk_size=64, window=r)
    full = ssd(x.float(), dt.float(), A.float(), B.float(), C.float(), chunk_size=64)
    assert full.abs().max() > 20 * ref.abs().max()               # the state dwarfs the windowed part
    assert rel_err(got.double(), ref) <= 1e-4


def test_bad_mitigation_arguments():
    args, _ = make_inputs(CASES[0])
    with pytest.raises(ValueError, match="window must be a positive"):
        ssd(**args, window=0)
    with pytest.raises(ValueError, match="StateNorm.every"):
        StateNorm(every=0, threshold=1.0)
    with pytest.raises(ValueError, match="threshold must be positive"):
        ssd(**args, state_norm=StateNorm(4, -1.0))
