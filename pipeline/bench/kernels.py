"""`longctx bench kernels`: SSD forward+backward time per backend over a grid of lengths.

Every backend in a row is timed in the same process on the same inputs, so the ratio
columns are the figures to quote: absolute times on shared machines drift, ratios
measured side by side do not. On CUDA the rows are: naive (up to naive_max_len), torch,
triton (ours), and mamba_ssm's `mamba_chunk_scan_combined` when it can be imported;
`vs_mamba_ssm` = mamba_ssm time / backend time (> 1: faster than mamba_ssm), and
`max_rel_err_vs_torch` compares outputs with the torch backend (mamba_ssm failing or
going wrong past ~61K tokens shows up there, or as `error`).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from longctx.kernels import ssd, ssd_naive


@dataclass
class KernelRow:
    device: str
    backend: str
    length: int
    heads: int
    headdim: int
    d_state: int
    dtype: str
    fwd_bwd_ms: float
    speedup_vs_naive: Optional[float]
    max_rel_err_vs_naive: Optional[float]
    vs_mamba_ssm: Optional[float] = None
    max_rel_err_vs_torch: Optional[float] = None
    error: Optional[str] = None


def _inputs(length, heads, headdim, d_state, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_()

    return dict(x=rnd(1, length, heads, headdim), dt=rnd(1, length, heads, scale=0.5),
                A=(-torch.rand(heads, generator=g) - 0.5).to(device).requires_grad_(),
                B=rnd(1, length, 1, d_state, scale=0.3), C=rnd(1, length, 1, d_state, scale=0.3),
                D=rnd(heads, dt=torch.float32), dt_bias=rnd(heads, scale=0.1, dt=torch.float32))  # fp32 parameters


def _fwd_bwd(fn: Callable, inputs: Dict[str, torch.Tensor]):
    for t in inputs.values():
        t.grad = None
    y = fn(**inputs)
    y.float().square().mean().backward()
    return y


def _timed(fn: Callable, inputs: Dict[str, torch.Tensor]) -> tuple:
    """(ms of one forward + backward, its output)."""
    if inputs["x"].is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = _fwd_bwd(fn, inputs)
    if inputs["x"].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, y


def _time_fwd_bwd(fn: Callable, inputs: Dict[str, torch.Tensor], repeats: int) -> tuple:
    """Median ms of forward + backward, and the last output (for the error column)."""
    return _time_interleaved([fn], inputs, repeats)[0]


def _time_interleaved(fns: Sequence[Callable], inputs, repeats: int) -> List[tuple]:
    """(median ms, last output) of each function, timed in turn (A B A B ...) after one warm-up of each, so
    that a machine whose speed drifts during the run slows every function alike and their ratios hold.
    `inputs`: the arguments every function takes (a dict), or a list with each function's own."""
    each = inputs if isinstance(inputs, list) else [inputs] * len(fns)
    for fn, args in zip(fns, each):
        _fwd_bwd(fn, args)              # warm-up (allocator, lazy init)
    times: List[List[float]] = [[] for _ in fns]
    outputs = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            ms, outputs[i] = _timed(fn, each[i])
            times[i].append(ms)
    return [(statistics.median(t), y.detach()) for t, y in zip(times, outputs)]


def _mamba_ssm():
    """mamba_ssm's combined chunked scan, or None when it cannot be imported."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:   # not installed, or built for another torch/CUDA
        return None
    return mamba_chunk_scan_combined


def _rel(y, ref):
    return None if ref is None else float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def run_kernel_bench(lengths: Sequence[int] = (512, 1024, 2048, 4096), heads: int = 8, headdim: int = 64,
                     d_state: int = 64, chunk_size: int = 256, repeats: int = 3, naive_max_len: int = 8192,
                     include_cuda: bool = True, dtypes: Sequence[str] = ("float32",),
                     devices: Sequence[str] = ("cpu", "cuda")) -> List[KernelRow]:
    rows: List[KernelRow] = []
    cuda = include_cuda and torch.cuda.is_available()
    run_on = [d for d in devices if d == "cpu" or (d == "cuda" and cuda)]
    mamba = _mamba_ssm() if cuda else None
    for device in run_on:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for length in lengths:
                rows.extend(_bench_length(device, dtype, length, heads, headdim, d_state, chunk_size, repeats,
                                          naive_max_len, mamba))
    return rows


def _bench_length(device, dtype, length, heads, headdim, d_state, chunk_size, repeats, naive_max_len, mamba):
    inputs = _inputs(length, heads, headdim, d_state, device, dtype)
    kw = dict(dt_softplus=True, chunk_size=chunk_size)
    shape = (length, heads, headdim, d_state, str(dtype)[6:])
    rows, timed = [], {}

    def add(backend, fn, reps, ref_y=None, ref_ms=None):
        try:
            ms, y = _time_fwd_bwd(fn, inputs, reps)
        except Exception as e:   # e.g. mamba_ssm past its 32-bit offsets, or out of memory
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(KernelRow(device, backend, *shape, float("nan"), None, None, error=repr(e)[:300]))
            return None
        timed[backend] = (ms, y)
        rows.append(KernelRow(device, backend, *shape, ms, None if ref_ms is None else ref_ms / ms,
                              _rel(y, ref_y)))
        return y

    y_naive = None
    if length <= naive_max_len:
        y_naive = add("naive", lambda **a: ssd_naive(**a, **kw), max(1, repeats // 2))
        if y_naive is not None:
            rows[-1].speedup_vs_naive, rows[-1].max_rel_err_vs_naive = 1.0, 0.0
    naive_ms = timed.get("naive", (None,))[0]
    y_torch = add("torch", lambda **a: ssd(**a, backend="torch", **kw), repeats, y_naive, naive_ms)
    if device == "cuda":
        add("triton", lambda **a: ssd(**a, backend="triton", **kw), repeats, y_naive, naive_ms)
        if mamba is not None:
            add("mamba_ssm", lambda **a: mamba(**a, **kw), repeats, y_naive, naive_ms)
    mamba_ms = timed.get("mamba_ssm", (None,))[0]
    for row in rows:
        if row.backend in timed:
            row.max_rel_err_vs_torch = None if y_torch is None else _rel(timed[row.backend][1], y_torch)
            row.vs_mamba_ssm = None if mamba_ms is None else mamba_ms / timed[row.backend][0]
    return rows


def print_and_save(rows: List[KernelRow], out: Optional[Path]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(title="SSD forward+backward (median ms; speedup = naive / backend, "
                            "vs mamba_ssm = mamba_ssm / backend, same run)")
        for col in ("device", "backend", "length", "h×p×n", "dtype", "fwd+bwd ms", "speedup", "max rel err",
                    "vs mamba_ssm", "rel err vs torch"):
            table.add_column(col)

        def fmt(v, spec):
            return "-" if v is None else format(v, spec)
        for r in rows:
            table.add_row(r.device, r.backend, str(r.length), f"{r.heads}×{r.headdim}×{r.d_state}", r.dtype,
                          f"{r.fwd_bwd_ms:.1f}" if r.error is None else "failed",
                          "-" if r.speedup_vs_naive is None else f"{r.speedup_vs_naive:.1f}×",
                          fmt(r.max_rel_err_vs_naive, ".1e"),
                          "-" if r.vs_mamba_ssm is None else f"{r.vs_mamba_ssm:.2f}×",
                          fmt(r.max_rel_err_vs_torch, ".1e"))
        Console().print(table)
    except ImportError:
        for r in rows:
            print(asdict(r))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bench": "kernels", "torch": torch.__version__, "triton": _version("triton"),
                                   "mamba_ssm": _version("mamba_ssm"),
                                   "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                   "rows": [asdict(r) for r in rows]}, indent=2))
        tmp.replace(out)
        print(f"wrote {out}")


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None
