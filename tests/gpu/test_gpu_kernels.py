"""Triton SSD kernels on a GPU at the 370M model's shapes (h=32, p=64, n=128, chunk 256).

Run by tests/gpu/run.sh (or `pytest -m gpu tests/gpu`). References:
- moderate lengths: the torch backend on the same inputs, forward and every gradient;
- 256K tokens (past mamba_ssm's 32-bit offset limit, with x a view into an in_proj-wide buffer so
  batch offsets pass 2^31 elements): the torch backend run piece by piece, chained through
  initial_states (exact, and each piece small), for y and final states over the whole sequence;
  gradients on the last piece, which no later position depends on, against torch on that piece.
Errors are written to $GPU_RESULTS_DIR/gpu_tests.json when that is set.
"""
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from longctx.kernels import ssd
from tests.conftest import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run tests/gpu/run.sh)")]

H, P, N, CHUNK = 32, 64, 128, 256
D_IN_PROJ = 2 * H * P + 2 * N + H        # 370M in_proj width: z, xBC (x, B, C), dt
TOL = {torch.float32: dict(y=2e-3, grad=5e-3), torch.bfloat16: dict(y=3e-2, grad=6e-2)}
RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    out = os.environ.get("GPU_RESULTS_DIR")
    if out and RESULTS:
        Path(out).mkdir(parents=True, exist_ok=True)
        info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
        Path(out, "gpu_tests.json").write_text(json.dumps(dict(info, results=RESULTS), indent=2))


def _inputs(b, l, dtype, seed=0, opts=("D", "z", "dt_bias", "init", "seq")):
    """x, B, C (and z, dt) as views into one (b, l, D_IN_PROJ) buffer, the layout the model hands the scan."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    buf = torch.randn(b, l, D_IN_PROJ, device="cuda", generator=g, dtype=torch.float32)
    buf[..., 2 * H * P:2 * H * P + 2 * N] *= 0.3
    buf = buf.to(dtype)
    z, x = buf[..., :H * P].view(b, l, H, P), buf[..., H * P:2 * H * P].view(b, l, H, P)
    Bm = buf[..., 2 * H * P:2 * H * P + N].view(b, l, 1, N)
    Cm = buf[..., 2 * H * P + N:2 * H * P + 2 * N].view(b, l, 1, N)
    dt = buf[..., -H:] * 0.5 - 1.0
    args = dict(x=x, dt=dt, A=-torch.linspace(0.5, 8.0, H, device="cuda"), B=Bm, C=Cm)
    kw = dict(dt_softplus=True)
    if "D" in opts:
        kw["D"] = torch.randn(H, device="cuda", generator=g)
    if "z" in opts:
        kw["z"] = z
    if "dt_bias" in opts:
        kw["dt_bias"] = torch.randn(H, device="cuda", generator=g) * 0.5 - 3.0
    if "init" in opts:
        kw["initial_states"] = torch.randn(b, H, P, N, device="cuda", generator=g) * 0.1
    if "seq" in opts:
        seq = torch.zeros(b, l, dtype=torch.int32, device="cuda")
        seq[:, l // 3:] = 1
        seq[:, l // 3 + 1000:] = 2
        kw["seq_idx"] = seq
    return args, kw


def _leaves(args, kw):
    """Fresh leaf copies (contiguous strides differ from the views; both layouts get exercised)."""
    a = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in args.items()}
    k = {n: (v.detach().clone().requires_grad_(v.is_floating_point()) if torch.is_tensor(v) else v)
         for n, v in kw.items()}
    return a, k


def _fwd_bwd(args, kw, **extra):
    y, s = ssd(**args, **kw, chunk_size=CHUNK, return_final_states=True, **extra)
    g = torch.Generator(device="cuda").manual_seed(1)
    wy = torch.randn(y.shape, device="cuda", generator=g)
    ((y.float() * wy).sum() + s.sum()).backward()
    grads = {n: t.grad.float() for n, t in {**args, **kw}.items() if torch.is_tensor(t) and t.grad is not None}
    return y.detach().float(), s.detach(), grads


def _compare(name, dtype, args, kw, **extra):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    y1, s1, g1 = _fwd_bwd(*_leaves(args, kw), backend="triton", **extra)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    y0, s0, g0 = _fwd_bwd(*_leaves(args, kw), backend="torch", **extra)
    errs = dict(y=rel_err(y1, y0), final_states=rel_err(s1, s0), **{f"d{k}": rel_err(g1[k], g0[k]) for k in g0})
    RESULTS[name] = dict(errs, triton_first_call_ms=ms)
    tol = TOL[dtype]
    assert set(g1) == set(g0) and len(g0) >= 9
    assert errs["y"] <= tol["y"] and errs["final_states"] <= tol["y"], errs
    for k in g0:
        assert errs[f"d{k}"] <= tol["grad"], (k, errs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [4096, 16384 + 77])
def test_matches_torch_backend_every_option_and_gradient(length, dtype):
    args, kw = _inputs(2, length, dtype)
    _compare(f"torch_ref_l{length}_{str(dtype)[6:]}", dtype, args, kw)


@pytest.mark.parametrize("window", [100, 1000])
def test_window_matches_torch_backend(window):
    args, kw = _inputs(1, 8192, torch.float32)
    _compare(f"window{window}_l8192_fp32", torch.float32, args, kw, window=window)


def _chained_torch(args, kw, piece):
    """The torch backend over consecutive pieces, each starting from the previous final state."""
    l = args["x"].shape[1]
    state, ys, entering = kw.get("initial_states"), [], None
    for start in range(0, l, piece):
        sl = slice(start, min(start + piece, l))
        kw_p = dict(kw, initial_states=state)
        if "z" in kw:
            kw_p["z"] = kw["z"][:, sl]
        kw_p.pop("seq_idx", None)
        a = {k: (v if k == "A" else v[:, sl]) for k, v in args.items()}
        entering = state
        y, state = ssd(**a, **kw_p, chunk_size=CHUNK, return_final_states=True, backend="torch")
        ys.append(y.float())
    return torch.cat(ys, 1), state, entering


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_256k_tokens_past_32_bit_offsets(dtype):
    b, l, piece = 2, 262144, 16384
    args, kw = _inputs(b, l, dtype, opts=("D", "z", "dt_bias", "init"))
    assert (b - 1) * l * D_IN_PROJ + l * D_IN_PROJ > 2**31       # offsets of the second row pass int32
    with torch.no_grad():
        y_ref, s_ref, entering = _chained_torch(args, kw, piece)
    a1, k1 = _leaves(args, kw)
    a1["x"] = args["x"].detach().requires_grad_()                  # keep the wide-buffer strides for x
    y, s = ssd(**a1, **k1, chunk_size=CHUNK, return_final_states=True, backend="triton")
    wy = torch.zeros(y.shape, device="cuda")
    wy[:, -piece:] = torch.randn(b, piece, H, P, device="cuda")
    ((y.float() * wy).sum() + s.sum()).backward()
    tol = TOL[dtype]
    errs = dict(y=rel_err(y.float(), y_ref), final_states=rel_err(s, s_ref),
                y_second_row_tail=rel_err(y[1, -piece:].float(), y_ref[1, -piece:]))

    # gradients on the last piece: torch on that piece from the (exact) state entering it
    sl = slice(l - piece, l)
    a2 = {k: (v if k == "A" else v[:, sl]).detach().requires_grad_() for k, v in args.items()}
    k2 = dict(kw, initial_states=entering.detach().requires_grad_(), z=kw["z"][:, sl].detach().requires_grad_())
    y2, s2 = ssd(**a2, **k2, chunk_size=CHUNK, return_final_states=True, backend="torch")
    ((y2.float() * wy[:, -piece:]).sum() + s2.sum()).backward()
    for k in ("x", "dt", "B", "C"):
        errs[f"d{k}_last_piece"] = rel_err(a1[k].grad[:, sl].float(), a2[k].grad.float())
    errs["dz_last_piece"] = rel_err(k1["z"].grad[:, sl].float(), k2["z"].grad.float())
    RESULTS[f"l{l}_b{b}_{str(dtype)[6:]}"] = errs
    assert errs["y"] <= tol["y"] and errs["final_states"] <= tol["y"] and errs["y_second_row_tail"] <= tol["y"], errs
    for k, v in errs.items():
        assert math.isfinite(v) and (not k.startswith("d") or v <= tol["grad"]), (k, errs)
