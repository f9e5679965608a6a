"""`longctx bench kernels`: SSD forward+backward time per backend over a grid of lengths.

Every backend in a row is timed in the same process on the same inputs, so the ratio
column (reference time / backend time) is the figure to quote: absolute times on
shared machines drift, ratios measured side by side do not.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import ssd, ssd_naive


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


def _inputs(length, heads, headdim, d_state, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    return dict(x=rnd(1, length, heads, headdim), dt=rnd(1, length, heads, scale=0.5),
                A=(-torch.rand(heads, generator=g) - 0.5).to(device).requires_grad_(),
                B=rnd(1, length, 1, d_state, scale=0.3), C=rnd(1, length, 1, d_state, scale=0.3),
                D=rnd(heads), dt_bias=rnd(heads, scale=0.1))


def _time_fwd_bwd(fn: Callable, inputs: Dict[str, torch.Tensor], repeats: int) -> tuple:
    """Median ms of forward + backward, and the last output (for the error column)."""
    def once():
        for t in inputs.values():
            t.grad = None
        y = fn(**inputs)
        y.float().square().mean().backward()
        return y

    once()  # warm-up (allocator, lazy init)
    times, y = [], None
    for _ in range(repeats):
        if inputs["x"].is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = once()
        if inputs["x"].is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), y.detach()


def run_kernel_bench(lengths: Sequence[int] = (512, 1024, 2048, 4096), heads: int = 8, headdim: int = 64,
                     d_state: int = 64, chunk_size: int = 256, repeats: int = 3, naive_max_len: int = 8192,
                     include_cuda: bool = True) -> List[KernelRow]:
    rows: List[KernelRow] = []
    devices = ["cpu"] + (["cuda"] if include_cuda and torch.cuda.is_available() else [])
    for device in devices:
        dtype = torch.float32
        for length in lengths:
            inputs = _inputs(length, heads, headdim, d_state, device, dtype)
            kw = dict(dt_softplus=True, chunk_size=chunk_size)
            naive_ms, y_ref = (None, None)
            if length <= naive_max_len:
                naive_ms, y_ref = _time_fwd_bwd(lambda **a: ssd_naive(**a, **kw), inputs, max(1, repeats // 2))
                rows.append(KernelRow(device, "naive", length, heads, headdim, d_state, str(dtype)[6:],
                                      naive_ms, 1.0, 0.0))
            ms, y = _time_fwd_bwd(lambda **a: ssd(**a, backend="torch", **kw), inputs, repeats)
            err = None if y_ref is None else float((y - y_ref).abs().max() / y_ref.abs().max())
            rows.append(KernelRow(device, "torch", length, heads, headdim, d_state, str(dtype)[6:], ms,
                                  None if naive_ms is None else naive_ms / ms, err))
    return rows


def print_and_save(rows: List[KernelRow], out: Optional[Path]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        table = Table(title="SSD forward+backward (median ms; speedup = naive / backend, same run)")
        for col in ("device", "backend", "length", "h×p×n", "dtype", "fwd+bwd ms", "speedup", "max rel err"):
            table.add_column(col)
        for r in rows:
            table.add_row(r.device, r.backend, str(r.length), f"{r.heads}×{r.headdim}×{r.d_state}", r.dtype,
                          f"{r.fwd_bwd_ms:.1f}", "-" if r.speedup_vs_naive is None else f"{r.speedup_vs_naive:.1f}×",
                          "-" if r.max_rel_err_vs_naive is None else f"{r.max_rel_err_vs_naive:.1e}")
        Console().print(table)
    except ImportError:
        for r in rows:
            print(asdict(r))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bench": "kernels", "torch": torch.__version__,
                                   "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                   "rows": [asdict(r) for r in rows]}, indent=2))
        tmp.replace(out)
        print(f"wrote {out}")
