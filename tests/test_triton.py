"""kernels.ssd(backend="triton") against the torch backend, run on CPU by the Triton interpreter.

fp32, tiny shapes: the interpreter executes every program instance in Python.

Triton fixes its mode when it is imported (its library functions such as tl.sum are decorated
then), so TRITON_INTERPRET=1 must be set before the first `import triton`. On a CPU-only host
this module sets it when triton is not imported yet (nothing else in the suite launches Triton
kernels on CPU). Where that is not possible (triton already imported in compiled mode, or a
CUDA host whose GPU tests must not run interpreted) every test here is skipped in-process and
`test_rerun_in_interpreter_subprocess` runs this file in a fresh interpreter-mode process.
"""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from longctx.kernels import StateNorm, ssd  # noqa: E402
from longctx.kernels.triton import interpreting  # noqa: E402
from tests.conftest import rel_err  # noqa: E402
from tests.test_ssd import make_inputs, run  # noqa: E402

IN_PROCESS = interpreting()
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS, reason="triton was imported in compiled mode; test_rerun_in_interpreter_subprocess runs these")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

CASES = {
    # b, l, h, p, g, n, chunk, options (tests/test_ssd.py make_inputs)
    "plain_multi_chunk": dict(b=1, l=48, h=2, p=4, g=1, n=8, chunk=16, opts=set()),
    "doc_init_D_z_ragged": dict(b=2, l=37, h=2, p=4, g=1, n=8, chunk=16, opts={"D", "z", "init", "seq"}),
    "dt_processing_scales_groups": dict(b=1, l=40, h=2, p=3, g=2, n=5, chunk=16,
                                        opts={"dt_bias", "softplus", "limit", "decay", "input", "D_hp"}),
    "everything_per_head": dict(b=2, l=44, h=2, p=4, g=1, n=4, chunk=16,
                                opts={"D", "z", "init", "seq", "dt_bias", "softplus", "limit", "decay_h", "input_h"}),
    "odd_chunk": dict(b=1, l=23, h=2, p=3, g=1, n=4, chunk=7, opts={"init", "seq", "D_hp"}),
}
WINDOW_CASE = dict(b=2, l=48, h=2, p=3, g=1, n=4, chunk=8, opts={"D", "init", "seq", "decay_h", "dt_bias", "softplus"})


def fp32_inputs(c, seed=0):
    args, kw = make_inputs(c, seed)

    def f32(v):
        if not torch.is_tensor(v) or not v.is_floating_point():
            return v
        return v.detach().float().requires_grad_(v.requires_grad)
    return {k: f32(v) for k, v in args.items()}, {k: f32(v) for k, v in kw.items()}


def compare(args, kw, chunk, **extra):
    y0, s0, g0 = run(ssd, args, kw, chunk_size=chunk, backend="torch", **extra)
    y1, s1, g1 = run(ssd, args, kw, chunk_size=chunk, backend="triton", **extra)
    assert y1.dtype == torch.float32 and s1.dtype == torch.float32
    assert rel_err(y1, y0) <= TOL
    assert rel_err(s1, s0) <= TOL
    assert set(g1) == set(g0) and len(g0) >= 5
    for name in g0:
        assert rel_err(g1[name], g0[name]) <= TOL, name
    return g0


@needs_interpreter
@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_final_states_and_every_gradient_match_torch(name):
    c = CASES[name]
    args, kw = fp32_inputs(c)
    grads = compare(args, kw, c["chunk"])
    expect = {"x", "dt", "A", "B", "C"} | {k for k, v in kw.items() if torch.is_tensor(v) and v.requires_grad}
    assert set(grads) == expect


@needs_interpreter
@pytest.mark.parametrize("window", [1, 5, 8, 19, 100])
def test_window_matches_torch(window):
    """Inside one chunk (1, 5), exactly one chunk (8), whole chunks plus cut ones (19), longer than l (100)."""
    args, kw = fp32_inputs(WINDOW_CASE)
    compare(args, kw, WINDOW_CASE["chunk"], window=window)


@needs_interpreter
def test_state_norm_falls_back_to_torch_with_a_warning_and_matches():
    c = CASES["doc_init_D_z_ragged"]
    args, kw = fp32_inputs(c)
    with pytest.warns(UserWarning, match="state_norm"):
        compare(args, kw, 16, state_norm=StateNorm(every=16, threshold=0.5))


@needs_interpreter
def test_float64_falls_back_with_a_warning():
    args, kw = make_inputs(CASES["plain_multi_chunk"])
    with pytest.warns(UserWarning, match="float64"):
        y = ssd(**args, **kw, chunk_size=16, backend="triton")
    assert rel_err(y, ssd(**args, **kw, chunk_size=16, backend="torch")) == 0


@needs_interpreter
def test_half_precision_inputs_keep_dtype():
    args, kw = fp32_inputs(CASES["plain_multi_chunk"])
    half = {k: (v if k == "A" else v.detach().half()) for k, v in args.items()}
    y, s = ssd(**half, chunk_size=16, backend="triton", return_final_states=True)
    assert y.dtype == torch.float16 and s.dtype == torch.float32
    ref = ssd(**{k: v.float() for k, v in half.items()}, chunk_size=16, backend="torch")
    assert rel_err(y.float(), ref) <= 5e-3


@needs_interpreter
def test_chunk_longer_than_sequence_and_single_position():
    for c in (dict(b=1, l=5, h=1, p=2, g=1, n=3, chunk=256, opts={"init"}),
              dict(b=1, l=1, h=2, p=2, g=1, n=3, chunk=16, opts={"init", "D"})):
        args, kw = fp32_inputs(c)
        compare(args, kw, c["chunk"])


@needs_interpreter
def test_auto_means_torch_on_cpu_tensors():
    args, _ = fp32_inputs(CASES["plain_multi_chunk"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_auto = ssd(**args, chunk_size=16)
    assert rel_err(y_auto, ssd(**args, chunk_size=16, backend="torch")) == 0


def _python(script, interpret):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    out = _python("""
        import torch
        from longctx.kernels import ssd
        x = torch.randn(1, 8, 1, 2)
        try:
            ssd(x, torch.rand(1, 8, 1), -torch.ones(1), torch.randn(1, 8, 1, 2), torch.randn(1, 8, 1, 2),
                backend="triton")
        except RuntimeError as e:
            print("raised:", e)
    """, interpret=False)
    assert "raised:" in out.stdout and "needs CUDA tensors" in out.stdout and "TRITON_INTERPRET" in out.stdout, \
        (out.stdout, out.stderr[-2000:])


def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton's compiler (not the interpreter) accepts every kernel variant the host launches, with the
    370M tiles in bf16, down to a cubin: compiled-mode errors are caught on CPU-only machines."""
    out = _python("""
        from longctx.kernels.triton.compile_check import compile_all
        built = compile_all("bf16", 90)
        assert all(shared <= 227 * 1024 for _, shared in built), built
        print("compiled", len(built))
    """, interpret=False)
    if "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("no ptxas shipped with this triton")
    assert out.returncode == 0 and "compiled 14" in out.stdout, (out.stdout, out.stderr[-3000:])


@pytest.mark.skipif(IN_PROCESS, reason="the interpreter tests already ran in this process")
def test_rerun_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:]


def test_offsets_are_64_bit():
    """A real launch with x strided so that position · stride passes 2^31 elements (~10 GB of address space,
    only a few pages touched). int32 offsets would wrap and read outside the buffer; the run is in a
    subprocess so that a regression shows as a failed test, not a crashed session."""
    script = """
        import torch
        from longctx.kernels import ssd
        torch.manual_seed(0)
        l, h, p, n = 40, 1, 4, 4
        stride_l = 2**26                            # (l - 1) * stride_l > 2**31
        big = torch.empty((l - 1) * stride_l + h * p, dtype=torch.float32)
        x = big.as_strided((1, l, h, p), (0, stride_l, p, 1))
        x.copy_(torch.randn(1, l, h, p))
        x = x.detach().requires_grad_()
        dt = torch.rand(1, l, h) * 0.5 + 0.05
        A = -torch.rand(h) - 0.2
        B, C = torch.randn(1, l, 1, n), torch.randn(1, l, 1, n)
        xc = x.detach().contiguous().requires_grad_()
        y = ssd(x, dt, A, B, C, chunk_size=16, backend="triton")
        y.square().sum().backward()
        y0 = ssd(xc, dt, A, B, C, chunk_size=16, backend="torch")
        y0.square().sum().backward()
        err = max(float((y - y0).abs().max() / y0.abs().max()),
                  float((x.grad - xc.grad).abs().max() / xc.grad.abs().max()))
        assert err < 1e-4, err
        print("ok", err)
    """
    out = _python(script, interpret=True)
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stdout, out.stderr[-2000:])


def test_a_tuned_config_too_big_for_a_heavier_variant_falls_back_to_the_fastest_that_fits():
    """The autotuner keys on shapes, so the config it tuned on one variant of a kernel can exceed the GPU's
    shared memory on a heavier one (an H200 raised OutOfResources for fp32 with a window): the fastest
    config that fits is launched instead, and a variant that fits none still raises."""
    import triton
    from triton.runtime.errors import OutOfResources

    from longctx.kernels.triton.ssd import launch_first_fitting

    configs = [triton.Config(dict(BT=bt), num_warps=4, num_stages=2) for bt in (32, 64, 128)]
    launched = []

    class FakeJit:                       # shared memory grows with BT; the device holds up to BT 64
        def __getitem__(self, grid):
            def launch(*args, BT, **kw):
                launched.append(BT)
                if BT * 1000 > 64_000:
                    raise OutOfResources(BT * 1000, 64_000, "shared memory")
                return f"ran BT={BT}"
            return launch

    timings = {configs[0]: [3.0, 2.9, 3.1], configs[1]: [2.0, 1.9, 2.1], configs[2]: 1.0}   # 128 fastest, too big
    config, out = launch_first_fitting(FakeJit(), None, (), dict(HAS_WINDOW=True), configs, timings)
    assert (config.kwargs["BT"], out, launched) == (64, "ran BT=64", [128, 64])
    with pytest.raises(OutOfResources):
        launch_first_fitting(FakeJit(), None, (), {}, configs[2:], {})
