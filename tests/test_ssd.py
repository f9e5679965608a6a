"""kernels.ssd (chunked torch) against the step-by-step reference, in float64."""
import math

import pytest
import torch

from longctx.kernels import auto_chunk_size, ssd, ssd_naive
from tests.conftest import rel_err

F64 = torch.float64

CASES = [
    # b, l, h, p, g, n, chunk, options
    dict(b=1, l=16, h=2, p=4, g=1, n=3, chunk=4, opts=set()),
    dict(b=2, l=37, h=4, p=3, g=2, n=5, chunk=8, opts={"D", "z", "init", "seq"}),
    dict(b=2, l=50, h=6, p=2, g=3, n=4, chunk=16, opts={"dt_bias", "softplus", "limit", "decay", "input"}),
    dict(b=1, l=23, h=4, p=3, g=4, n=2, chunk=64, opts={"D_hp", "z", "seq", "decay_h", "input_h", "init"}),
    dict(b=3, l=41, h=2, p=5, g=1, n=6, chunk=7,
         opts={"D", "z", "init", "seq", "dt_bias", "softplus", "limit", "decay_h", "input"}),
]


def make_inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, l, h, p, gr, n = c["b"], c["l"], c["h"], c["p"], c["g"], c["n"]
    o = c["opts"]

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=F64) * scale).requires_grad_()

    args = dict(x=r(b, l, h, p), dt=(torch.rand(b, l, h, generator=g, dtype=F64) * 0.5 + 0.05).requires_grad_(),
                A=(-torch.rand(h, generator=g, dtype=F64) - 0.2).requires_grad_(),
                B=r(b, l, gr, n, scale=0.5), C=r(b, l, gr, n, scale=0.5))
    kw = {}
    if "D" in o:
        kw["D"] = r(h)
    if "D_hp" in o:
        kw["D"] = r(h, p)
    if "z" in o:
        kw["z"] = r(b, l, h, p)
    if "init" in o:
        kw["initial_states"] = r(b, h, p, n)
    if "seq" in o:
        cuts = sorted(torch.randint(1, l, (3,), generator=g).tolist())
        seq = torch.zeros(b, l, dtype=torch.int32)
        for cut in cuts:
            seq[:, cut:] += 1
        seq[-1] = 0  # one row without boundaries
        kw["seq_idx"] = seq
    if "dt_bias" in o:
        kw["dt_bias"] = r(h, scale=0.3)
    if "softplus" in o:
        kw["dt_softplus"] = True
        args["dt"] = r(b, l, h)
    if "limit" in o:
        kw["dt_limit"] = (0.05, 0.9)
    if "decay" in o:
        kw["decay_scale"] = 0.93
    if "decay_h" in o:
        kw["decay_scale"] = (torch.rand(h, generator=g, dtype=F64) * 0.3 + 0.7).requires_grad_()
    if "input" in o:
        kw["input_scale"] = 0.6
    if "input_h" in o:
        kw["input_scale"] = (torch.rand(h, generator=g, dtype=F64) + 0.2).requires_grad_()
    return args, kw


def grads_of(tensors):
    return {k: v.grad.clone() for k, v in tensors.items() if torch.is_tensor(v) and v.requires_grad}


def run(fn, args, kw, **extra):
    tensors = {**args, **{k: v for k, v in kw.items() if torch.is_tensor(v)}}
    for t in tensors.values():
        if t.requires_grad:
            t.grad = None
    y, final = fn(**args, **kw, return_final_states=True, **extra)
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(y.shape, generator=g, dtype=F64)
    w_s = torch.randn(final.shape, generator=g, dtype=F64)
    ((y * w_y).sum() + (final * w_s).sum()).backward()
    return y.detach(), final.detach(), grads_of(tensors)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_chunked_matches_reference_outputs_states_and_every_gradient(case):
    c = CASES[case]
    args, kw = make_inputs(c)
    y0, s0, g0 = run(ssd_naive, args, kw)
    y1, s1, g1 = run(ssd, args, kw, chunk_size=c["chunk"], backend="torch")
    assert y1.dtype == F64 and s1.dtype == F64
    assert rel_err(y1, y0) <= 1e-10
    assert rel_err(s1, s0) <= 1e-10
    assert set(g0) == set(g1) and len(g0) >= 5
    for name in g0:
        assert rel_err(g1[name], g0[name]) <= 1e-10, name


def test_reference_is_the_literal_recurrence():
    """ssd_naive against a hand-written loop over batch, head and time (no vectorization)."""
    args, kw = make_inputs(dict(b=2, l=9, h=2, p=2, g=1, n=3, chunk=4, opts={"D", "init", "decay", "input"}))
    y, s = ssd_naive(**args, **kw, return_final_states=True)
    x, dt, A, B, C = (t.detach() for t in (args["x"], args["dt"], args["A"], args["B"], args["C"]))
    D, h0 = kw["D"].detach(), kw["initial_states"].detach()
    for bi in range(2):
        for hi in range(2):
            h = h0[bi, hi].clone()
            for t in range(9):
                a = 0.93 * math.exp(dt[bi, t, hi] * A[hi])
                h = a * h + 0.6 * dt[bi, t, hi] * torch.outer(x[bi, t, hi], B[bi, t, 0])
                expect = h @ C[bi, t, 0] + D[hi] * x[bi, t, hi]
                assert torch.allclose(y[bi, t, hi], expect, rtol=1e-12, atol=1e-12)
            assert torch.allclose(s[bi, hi], h, rtol=1e-12, atol=1e-12)


def test_two_halves_chained_through_initial_states_equal_the_whole():
    c = dict(b=2, l=64, h=4, p=3, g=2, n=4, chunk=16, opts={"D", "z", "dt_bias", "softplus", "decay", "init"})
    args, kw = make_inputs(c)
    y, s = ssd(**args, **kw, chunk_size=16, return_final_states=True)
    half = 27  # not a chunk boundary
    first = {k: v[:, :half] for k, v in args.items() if k not in ("A",)}
    second = {k: v[:, half:] for k, v in args.items() if k not in ("A",)}
    kw1 = dict(kw)
    z = kw1.pop("z")
    y1, s1 = ssd(**first, A=args["A"], z=z[:, :half], **kw1, chunk_size=16, return_final_states=True)
    kw2 = dict(kw1, initial_states=s1)
    y2, s2 = ssd(**second, A=args["A"], z=z[:, half:], **kw2, chunk_size=16, return_final_states=True)
    assert rel_err(torch.cat([y1, y2], 1), y) <= 1e-12
    assert rel_err(s2, s) <= 1e-12


def test_document_boundaries_equal_separate_calls():
    """seq_idx resets the state: a packed row equals each document run on its own."""
    c = dict(b=1, l=40, h=2, p=3, g=1, n=4, chunk=8, opts={"D"})
    args, kw = make_inputs(c)
    cut = 13
    seq = torch.zeros(1, 40, dtype=torch.int32)
    seq[:, cut:] = 7
    y = ssd(**args, **kw, seq_idx=seq, chunk_size=8)
    parts = []
    for sl in (slice(0, cut), slice(cut, 40)):
        parts.append(ssd(**{k: (v if k == "A" else v[:, sl]) for k, v in args.items()}, **kw, chunk_size=8))
    assert rel_err(y, torch.cat(parts, 1)) <= 1e-12


def test_reused_seq_idx_values_still_reset():
    args, kw = make_inputs(dict(b=1, l=20, h=2, p=2, g=1, n=2, chunk=4, opts=set()))
    a = torch.tensor([[0] * 5 + [1] * 5 + [0] * 10], dtype=torch.int32)
    b = torch.tensor([[0] * 5 + [1] * 5 + [2] * 10], dtype=torch.int32)
    assert rel_err(ssd(**args, seq_idx=a, chunk_size=4), ssd(**args, seq_idx=b, chunk_size=4)) == 0
    assert rel_err(ssd_naive(**args, seq_idx=a), ssd(**args, seq_idx=b, chunk_size=4)) <= 1e-12


@pytest.mark.parametrize("chunk", [1, 3, 16, 256])
def test_result_does_not_depend_on_chunk_size(chunk):
    args, kw = make_inputs(CASES[1])
    ref = ssd_naive(**args, **kw)
    assert rel_err(ssd(**args, **kw, chunk_size=chunk), ref) <= 1e-10


def test_float32_inputs_keep_dtype_and_fp32_final_states():
    args, _ = make_inputs(CASES[0])
    args = {k: v.detach().float() for k, v in args.items()}
    y, s = ssd(**args, return_final_states=True)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    y16 = ssd(**{k: (v if k == "A" else v.to(torch.bfloat16)) for k, v in args.items()})
    assert y16.dtype == torch.bfloat16


def test_no_quadratic_tensor_in_length():
    """Memory O(l * chunk): the largest intermediate is far below l * l."""
    l, chunk = 4096, 64
    x = torch.randn(1, l, 1, 2)
    peak = []

    def hook(t):
        peak.append(t.numel())
        return t

    # every saved-for-backward tensor passes through the pack hook
    with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
        ssd(x.requires_grad_(), torch.rand(1, l, 1), -torch.ones(1), torch.randn(1, l, 1, 2),
            torch.randn(1, l, 1, 2), chunk_size=chunk)
    assert max(peak) <= l * chunk * 4 < l * l


def test_backward_work_is_linear_in_the_number_of_chunks():
    """The chunk-to-chunk pass must not index the stacked chunk states one chunk at a time: each such
    index's backward writes a gradient as large as the whole stack (time quadratic in the chunks; 24x
    for 4x the length at 16K tokens before). Counted on the autograd graph, not timed."""
    l, chunk = 2048, 16
    args = dict(x=torch.randn(1, l, 2, 4, requires_grad=True), dt=torch.rand(1, l, 2), A=-torch.ones(2),
                B=torch.randn(1, l, 1, 4), C=torch.randn(1, l, 1, 4))
    y = ssd(**args, chunk_size=chunk)
    seen, todo, indexing = set(), [y.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        indexing += type(fn).__name__ in ("SelectBackward0", "SliceBackward0", "IndexBackward0")
        todo += [f for f, _ in fn.next_functions]
    assert indexing < l // chunk / 4, indexing


def test_auto_chunk_size_is_a_chunk_size_like_any_other():
    args, kw = make_inputs(CASES[1])
    assert rel_err(ssd(**args, **kw, chunk_size="auto"), ssd_naive(**args, **kw)) <= 1e-10
    assert auto_chunk_size(65536, "cpu") == 64 and auto_chunk_size(65536, "cuda") == 256


def test_bad_arguments_are_clear_errors():
    args, _ = make_inputs(CASES[0])
    with pytest.raises(ValueError, match="dt must be"):
        ssd(**{**args, "dt": args["dt"][:, :-1]})
    with pytest.raises(ValueError, match="backend must be one of"):
        ssd(**args, backend="cuda")
    with pytest.raises(ValueError, match="decay_scale must lie in"):
        ssd(**args, decay_scale=1.5)
    with pytest.raises(ValueError, match="input_scale must be a scalar or one value per head"):
        ssd(**args, input_scale=torch.ones(5))


@pytest.mark.parametrize("with_documents", [False, True])
def test_intra_chunk_backward_equals_autograd_of_the_plain_expression(with_documents):
    """kernels/intra_chunk.py's hand-written backward against autograd through the expression it replaces
    (float64; two groups of two heads, so the per-group C.B and its gradient summed over heads are checked;
    with documents, pairs across a boundary are masked and must get no gradient)."""
    from longctx.kernels.intra_chunk import intra_chunk
    g = torch.Generator().manual_seed(3)
    b, c, Q, gr, k, p, n = 2, 3, 5, 2, 2, 3, 4
    h = gr * k
    Cc, Bc = (torch.randn(b, c, Q, gr, n, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    cum = (-torch.rand(b, h, c, Q, generator=g, dtype=F64) * 3).cumsum(-1).requires_grad_()
    xu = torch.randn(b, c, Q, h, p, generator=g, dtype=F64).requires_grad_()
    mask = torch.ones(Q, Q, dtype=torch.bool).tril()
    if with_documents:
        doc = torch.tensor([0, 0, 1, 1, 1] * c).view(1, c, Q).expand(b, c, Q)
        mask = mask & (doc[:, :, :, None] == doc[:, :, None, :])[:, None]

    def plain(Cc, Bc, cum, xu):
        seg = cum[..., :, None] - cum[..., None, :]
        decay = torch.where(mask, torch.exp2(seg), torch.zeros_like(seg))
        CB = torch.einsum("bcthn,bcshn->bhcts", Cc.repeat_interleave(k, dim=3), Bc.repeat_interleave(k, dim=3))
        return torch.einsum("bhcts,bcshp->bcthp", CB * decay, xu)

    dy = torch.randn(b, c, Q, h, p, generator=g, dtype=F64)
    ours = intra_chunk(Cc, Bc, cum, xu, mask)
    grads = torch.autograd.grad(ours, (Cc, Bc, cum, xu), dy)
    want = plain(Cc, Bc, cum, xu)
    want_grads = torch.autograd.grad(want, (Cc, Bc, cum, xu), dy)
    assert rel_err(ours, want) < 1e-13
    for name, a, e in zip(("C", "B", "cum", "xu"), grads, want_grads):
        assert rel_err(a, e) < 1e-12, name


@pytest.mark.parametrize("case", range(len(CASES)))
def test_long_calls_run_by_segments_and_match_the_reference(monkeypatch, case):
    """Calls longer than SEGMENT_TOKENS run segment by segment, the state carried (kept within the caches):
    outputs, final states and every gradient still equal the step-by-step reference. Segments of 8 positions
    here, so every case but the one-chunk one runs in several."""
    from longctx.kernels import chunked
    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 8)
    passes = []
    one_pass = chunked._one_pass
    monkeypatch.setattr(chunked, "_one_pass", lambda *a, **k: passes.append(1) or one_pass(*a, **k))
    c = CASES[case]
    args, kw = make_inputs(c)
    y0, s0, g0 = run(ssd_naive, args, kw)
    y1, s1, g1 = run(ssd, args, kw, chunk_size=c["chunk"], backend="torch")
    assert len(passes) == (1 if c["chunk"] >= c["l"] else -(-c["l"] // max(c["chunk"], 8 // c["chunk"] * c["chunk"])))
    assert rel_err(y1, y0) <= 1e-10 and rel_err(s1, s0) <= 1e-10
    for name in g0:
        assert rel_err(g1[name], g0[name]) <= 1e-10, name


def test_a_document_starting_exactly_at_a_segment_start_takes_no_state(monkeypatch):
    from longctx.kernels import chunked
    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 8)
    c = dict(b=2, l=24, h=2, p=3, g=1, n=4, chunk=4, opts={"init", "D"})
    args, kw = make_inputs(c)
    seq = torch.zeros(2, 24, dtype=torch.int32)
    seq[0, 8:] = 1           # row 0: a new document at the second segment's first position
    seq[1, 5:] = 1           # row 1: one crossing it
    seq[1, 16:] = 7
    kw["seq_idx"] = seq
    y0, s0, g0 = run(ssd_naive, args, kw)
    y1, s1, g1 = run(ssd, args, kw, chunk_size=4, backend="torch")
    assert rel_err(y1, y0) <= 1e-10 and rel_err(s1, s0) <= 1e-10
    for name in g0:
        assert rel_err(g1[name], g0[name]) <= 1e-10, name
