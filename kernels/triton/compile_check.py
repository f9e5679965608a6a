"""Compile every SSD kernel for a CUDA target without a GPU (`python -m longctx.kernels.triton.compile_check`).

The interpreter runs the kernels' arithmetic on CPU, but not Triton's compiler: type rules,
constexpr branches, tile shapes and shared memory only meet it on a GPU. This builds each
kernel (every flag combination the host code launches) to a cubin with the ptxas that ships
with triton, so compiled-mode errors show up on CPU-only machines too. Must run in a process
where triton was imported without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import inspect
from typing import List, Tuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import kernels as K

TILES = dict(Q=256, BT=64, BS=64, BP=64, BN=128, BLOCK=256)     # 370M shapes: p=64, n=128, chunk 256
DATA_PTRS = {"x_ptr", "b_ptr", "c_ptr"}


def _signature(fn, dtype: str, constexprs: dict, ptr_types: dict):
    sig, consts = {}, {}
    for name, prm in inspect.signature(fn).parameters.items():
        if "constexpr" in str(prm.annotation):
            sig[name] = "constexpr"
            consts[name] = constexprs.get(name, TILES.get(name))
        elif name.endswith("_ptr"):
            t = ptr_types.get(name) or ("DATA" if name in DATA_PTRS else "*i32" if name == "doc_ptr" else "*fp32")
            sig[name] = f"*{dtype}" if t == "DATA" else t
        else:
            sig[name] = "i32"
    return sig, consts


def jobs():
    scan = dict(HAS_INTRA=True, HAS_STATE=True, HAS_DOC=True, HAS_EXTRA=False, HAS_WINDOW=False, KEY_OFF=0)
    window_block = dict(scan, HAS_STATE=False, HAS_EXTRA=True, HAS_WINDOW=True, KEY_OFF=1)
    key = {k: v for k, v in scan.items() if k not in ("HAS_INTRA", "HAS_STATE")}
    return [
        (K._outer_fwd, {}, {"y_ptr": "DATA"}),                      # chunk states: x ⊗ B
        (K._outer_fwd, {}, {"x_ptr": "*fp32", "y_ptr": "DATA"}),    # dH = Σ w^R dy ⊗ C: dy is fp32
        (K._outer_bwd, {}, {"y_ptr": "DATA"}),
        (K._pass_fwd, dict(HAS_INIT=True), {}),
        (K._pass_bwd, dict(HAS_DFINAL=True), {}),
        (K._window_states_fwd, {}, {}),
        (K._window_states_bwd, {}, {}),
        (K._scan_fwd, scan, {}),
        (K._scan_fwd, window_block, {}),
        (K._scan_fwd, dict(scan, HAS_INTRA=False, HAS_DOC=False), {}),   # initial-state read-out (window)
        (K._scan_bwd_query, scan, {"dy_ptr": "*fp32"}),
        (K._scan_bwd_query, window_block, {"dy_ptr": "*fp32"}),
        (K._scan_bwd_key, key, {"dy_ptr": "*fp32"}),
        (K._scan_bwd_key, dict(key, HAS_EXTRA=True, HAS_WINDOW=True, KEY_OFF=1), {"dy_ptr": "*fp32"}),
    ]


def compile_all(dtype: str = "bf16", arch: int = 90, prec: str = "ieee") -> List[Tuple[str, int]]:
    """(kernel name, shared memory bytes) per compiled variant; raises on the first failure."""
    target = GPUTarget("cuda", arch, 32)
    out = []
    for fn, constexprs, ptr_types in jobs():
        sig, consts = _signature(fn, dtype, dict(constexprs, PREC=prec), ptr_types)
        k = triton.compile(ASTSource(JITFunction(fn), sig, consts), target=target,
                           options=dict(num_warps=4, num_stages=2))
        out.append((fn.__name__, int(k.metadata.shared)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    for name, shared in compile_all(args.dtype, args.arch):
        print(f"{name:18s} ok  shared memory {shared} B")


if __name__ == "__main__":
    main()
