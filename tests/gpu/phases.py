"""The GPU check's phases; tests/gpu/run.sh runs each in its own process under its own time limit.

  python -m tests.gpu.phases PHASE --out DIR [--tiny]

writes DIR/PHASE.json: {phase, status, seconds, checks: [{name, ok, detail}], tables: [{title, columns, rows}],
data, notes, not_run}, rewritten after every check, so a phase stopped by its time limit still shows how far it
got; exits 1 when a check failed or the phase raised. tests/gpu/report.py merges the fragments.

  env          device, versions (torch, triton, CUDA, mamba_ssm as vendored from its sdist), precision, NCCL note
  correctness  Triton vs torch backends at 370M shapes (h=32, p=64, n=128, chunk 256), l = 4K and 16K, fp32 and
               bf16, every option but state norm, without and with a window: outputs, final states, every gradient
  long         256K tokens, batch 2, x a view into an in_proj-wide buffer (offsets past 2^31 elements): Triton
               against the torch backend chained piece by piece through initial_states; gradients on the last piece
  long_peer    mamba_ssm's mamba_chunk_scan_combined on the same input: right, wrong or crashes (each dtype in a
               child process, so that a crash is recorded as the peer's outcome)
  speed        forward+backward ms of Triton, mamba_ssm and torch at 8K..64K in bf16, with `longctx bench kernels`'
               inputs and timing
  model        Mamba2LM at configs/mamba2-370m-256k.yaml's shape, bf16, its activation checkpointing: forward +
               backward tokens/s and peak memory at 8K and 64K, Triton and torch backends

--tiny runs the same code at tiny shapes in fp32: on CPU under TRITON_INTERPRET=1 that is `run.sh --rehearse`
(tests/test_gpu_plan.py). Bounds (max |Δ| / max |reference|, tests.conftest.rel_err): fp32 1e-5 with 3xTF32
(torch's TF32 switch off, so the kernels' fp32 dots are tf32x3 and torch's matmuls full fp32); bf16 3e-2 for
outputs and final states, 6e-2 for gradients: the kernels round some intermediates (scores, states, dy) to bf16
before a tensor-core product (unit roundoff 2^-8 = 3.9e-3), the torch backend computes in fp32 from the same bf16
inputs, both round y to bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import torch

from longctx.kernels import ssd
from tests.conftest import rel_err
from tests.gpu import offline

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = Path(os.environ.get("GPU_CHECK_OFFLINE", offline.OFFLINE))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL_CONFIG = ROOT / "configs" / "mamba2-370m-256k.yaml"

# fp32 matmuls and dots in full fp32 accuracy: torch's TF32 off, which the Triton kernels read as "use 3xTF32"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

TOL = {"float32": dict(out=1e-5, grad=1e-5), "bfloat16": dict(out=3e-2, grad=6e-2)}


@dataclass(frozen=True)
class Plan:
    h: int
    p: int
    n: int
    chunk: int
    batch: int
    lengths: Tuple[int, ...]          # correctness
    window: int
    dtypes: Tuple[str, ...]           # correctness, long, long_peer
    long_len: int
    long_piece: int
    speed_lengths: Tuple[int, ...]
    speed_dtype: str
    repeats: int
    model_lengths: Tuple[int, ...]
    model_dtype: str
    model_repeats: int
    model_shrink: Optional[Tuple[Tuple[str, int], ...]] = None     # tiny: these Mamba2Config fields replaced


FULL = Plan(h=32, p=64, n=128, chunk=256, batch=2, lengths=(4096, 16384), window=1000, dtypes=("float32", "bfloat16"),
            long_len=262144, long_piece=16384, speed_lengths=(8192, 16384, 32768, 65536), speed_dtype="bfloat16",
            repeats=5, model_lengths=(8192, 65536), model_dtype="bfloat16", model_repeats=3)
TINY = Plan(h=2, p=16, n=16, chunk=16, batch=2, lengths=(40,), window=20, dtypes=("float32",), long_len=96,
            long_piece=32, speed_lengths=(48,), speed_dtype="float32", repeats=1, model_lengths=(32,),
            model_dtype="float32", model_repeats=1,
            model_shrink=(("d_model", 32), ("n_layer", 1), ("vocab_size", 64), ("headdim", 16), ("d_state", 16),
                          ("chunk_size", 16), ("pad_vocab_size_multiple", 8)))

EVERY_OPTION = ("D", "z", "dt_bias", "dt_limit", "init", "seq", "decay", "input")   # all but state norm (and window)
LONG_OPTIONS = ("D", "z", "dt_bias", "init")                                        # what mamba_ssm takes as well
PARTS = ("z", "x", "B", "C", "dt")                                                  # the in_proj buffer's views


# ----------------------------------------------------------------------------- the phase's record

def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class Fragment:
    """One phase's JSON, rewritten after every change."""

    def __init__(self, phase: str, out: Path, tiny: bool):
        self.path = out / f"{phase}.json"
        self.t0 = time.perf_counter()
        self.d = dict(phase=phase, mode="tiny" if tiny else "full", device=DEVICE, status="running", seconds=0.0,
                      checks=[], tables=[], data={}, notes=[], not_run=[])
        self.save()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.d["checks"].append(dict(name=name, ok=bool(ok), detail=detail))
        self.save()
        return bool(ok)

    def table(self, title: str, columns) -> list:
        t = dict(title=title, columns=list(columns), rows=[])
        self.d["tables"].append(t)
        return t["rows"]

    def save(self):
        self.d["seconds"] = round(time.perf_counter() - self.t0, 2)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_clean(self.d), indent=1, default=str))
        tmp.replace(self.path)


def progress(frag: Fragment, what: str):
    """A line in the phase's log with the seconds since the phase began: where a timed-out phase spent them."""
    print(f"[{time.perf_counter() - frag.t0:6.1f} s] {what}", flush=True)


def fmt(v, spec=".1e"):
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) and math.isfinite(v) else str(v)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# ----------------------------------------------------------------------------- inputs in the model's layout

@dataclass
class Inputs:
    """The (b, l, 2hp + 2n + h) in_proj-wide buffer the model hands the scan (z, x, B, C, dt are views into it),
    the per-head and per-sequence tensors of the options, and the non-tensor arguments."""
    buf: torch.Tensor
    params: Dict[str, torch.Tensor]
    const: dict
    plan: Plan
    with_z: bool

    def views(self, buf=None) -> dict:
        buf = self.buf if buf is None else buf
        h, p, n = self.plan.h, self.plan.p, self.plan.n
        hp = h * p
        v = dict(z=buf[..., :hp].unflatten(-1, (h, p)), x=buf[..., hp:2 * hp].unflatten(-1, (h, p)),
                 B=buf[..., 2 * hp:2 * hp + n].unflatten(-1, (1, n)),
                 C=buf[..., 2 * hp + n:2 * hp + 2 * n].unflatten(-1, (1, n)), dt=buf[..., 2 * hp + 2 * n:])
        if not self.with_z:
            v.pop("z")
        return v

    def slice(self, start: int, stop: int, initial_states=None) -> "Inputs":
        """Positions [start, stop) entering with `initial_states` (None: none)."""
        params = {k: v for k, v in self.params.items() if k != "initial_states"}
        if initial_states is not None:
            params["initial_states"] = initial_states
        const = dict(self.const)
        if "seq_idx" in const:
            const["seq_idx"] = const["seq_idx"][:, start:stop]
        return Inputs(self.buf[:, start:stop], params, const, self.plan, self.with_z)


def make_inputs(plan: Plan, b: int, l: int, dtype: str, options, seed: int = 0) -> Inputs:
    h, p, n = plan.h, plan.p, plan.n
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=DEVICE, generator=g)

    def rand(*shape):
        return torch.rand(*shape, device=DEVICE, generator=g)

    buf = randn(b, l, 2 * h * p + 2 * n + h)
    buf[..., 2 * h * p:2 * h * p + 2 * n] *= 0.3
    buf[..., -h:] = buf[..., -h:] * 0.5 - 1.0
    buf = buf.to(getattr(torch, dtype))
    params = dict(A=-torch.linspace(0.5, 8.0, h, device=DEVICE))
    if "D" in options:
        params["D"] = randn(h)
    if "dt_bias" in options:
        params["dt_bias"] = randn(h) * 0.5 - 3.0
    if "init" in options:
        params["initial_states"] = randn(b, h, p, n) * 0.1
    if "decay" in options:
        params["decay_scale"] = rand(h) * 0.3 + 0.7
    if "input" in options:
        params["input_scale"] = rand(h) + 0.2
    const = dict(dt_softplus=True)
    if "dt_limit" in options:
        const["dt_limit"] = (0.004, 0.04)
    if "seq" in options:
        seq = torch.zeros(b, l, dtype=torch.int32, device=DEVICE)
        seq[:, l // 3:] = 1
        seq[:, l // 3 + l // 4:] = 2
        seq[-1] = 0                                          # the last row is one document
        const["seq_idx"] = seq
    return Inputs(buf, params, const, plan, "z" in options)


def _weights(shape, seed):
    return torch.randn(shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(seed))


def fwd_bwd(inp: Inputs, backend: str, last: Optional[int] = None, clone: bool = True, on_forward=None, **extra):
    """y, final states and the gradient of every input, for loss = <w_y, y> + <w_s, final states>, with w_y on
    the last `last` positions only when given (so a run over those positions alone has the same loss).
    Leaves: the buffer (whose views are the scan's strided x, B, C, z, dt; a copy unless clone=False, which
    saves its memory at 256K) and a copy of each parameter. on_forward(y, s) runs before the backward."""
    buf = (inp.buf.detach().clone() if clone else inp.buf.detach()).requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in inp.params.items()}
    y, s = ssd(**inp.views(buf), **params, **inp.const, chunk_size=inp.plan.chunk, return_final_states=True,
               backend=backend, **extra)
    if on_forward is not None:
        on_forward(y.detach(), s.detach())
    yl = y if last is None else y[:, -last:]
    ((yl.float() * _weights(yl.shape, 1)).sum() + (s.float() * _weights(s.shape, 2)).sum()).backward()
    grads = {k: v for k, v in inp.views(buf.grad).items()}
    grads.update({k: v.grad for k, v in params.items()})
    return y.detach(), s.detach(), grads


def chained_torch(inp: Inputs, piece: int):
    """The torch backend over consecutive pieces, each entering with the previous one's final state (exact, and
    each piece small): (y over the whole sequence in fp32, final states, the state entering the last piece)."""
    l = inp.buf.shape[1]
    state, entering, ys = inp.params.get("initial_states"), None, []
    with torch.no_grad():
        for start in range(0, l, piece):
            part = inp.slice(start, min(start + piece, l), state)
            entering = state
            y, state = ssd(**part.views(), **part.params, **part.const, chunk_size=inp.plan.chunk,
                           return_final_states=True, backend="torch")
            ys.append(y.float())
    return torch.cat(ys, 1), state, entering


def errors(ref, got) -> dict:
    (y0, s0, g0), (y1, s1, g1) = ref, got
    errs = dict(y=rel_err(y1.float(), y0.float()), final_states=rel_err(s1, s0))
    for k in g0:
        errs[f"d{k}"] = rel_err(g1[k].float(), g0[k].float())
    return errs


def within(errs: dict, dtype: str) -> bool:
    tol = TOL[dtype]
    return all(math.isfinite(v) and v <= (tol["grad"] if k.startswith("d") else tol["out"]) for k, v in errs.items())


def worst(errs: dict, grads: bool) -> Tuple[str, float]:
    items = [(k, v) for k, v in errs.items() if k.startswith("d") == grads]
    bad = [kv for kv in items if not math.isfinite(kv[1])]
    return bad[0] if bad else max(items, key=lambda kv: kv[1])


# ----------------------------------------------------------------------------- phases

def phase_env(frag: Fragment, plan: Plan, tiny: bool):
    import triton

    from longctx.kernels.triton import interpreting
    from longctx.kernels.triton.ssd import _prec
    rows = frag.table("Machine and versions", ["what", "value"])
    info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                device_count=torch.cuda.device_count() if DEVICE == "cuda" else 0,
                fp32_dot_precision=_prec(torch.empty(1, device=DEVICE)), triton_interpreter=interpreting())
    if DEVICE == "cuda":
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    site = os.environ.get("GPU_CHECK_SITE")
    for mod in ("numpy", "einops", "packaging", "yaml", "omegaconf", "pytest"):
        try:
            m = __import__(mod)
            where = "offline wheel" if site and str(Path(m.__file__).resolve()).startswith(str(Path(site).resolve())) \
                else "machine"
            info[mod] = f"{getattr(m, '__version__', '?')} ({where})"
            frag.check(f"{mod} importable", True, info[mod])
        except Exception as e:
            info[mod] = f"missing: {short(e)}"
            frag.check(f"{mod} importable", False, info[mod])
    try:
        _, version = load_peer()
        manifest = offline.peer_manifest(OFFLINE) or {}
        info["mamba_ssm"] = f"{version} (Triton SSD from {manifest.get('sdist')}, sha256 {manifest.get('sha256')})"
        frag.check("mamba_ssm's Triton SSD importable, version recorded", version == manifest.get("version"),
                   info["mamba_ssm"])
    except Exception as e:
        info["mamba_ssm"] = f"not importable: {short(e)}"
        frag.check("mamba_ssm's Triton SSD importable, version recorded", False, info["mamba_ssm"])
    if tiny:
        frag.check("rehearsal: Triton kernels run (interpreter on CPU)", DEVICE == "cuda" or interpreting())
    else:
        frag.check("a CUDA device is visible", DEVICE == "cuda", info["device"])
        frag.check("fp32 dots run as 3xTF32", info["fp32_dot_precision"] == "tf32x3", info["fp32_dot_precision"])
    n = info["device_count"]
    nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    if DEVICE == "cuda" and nccl:
        v = torch.cuda.nccl.version()
        info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    frag.d["not_run"].append(
        f"2-process NCCL check: not possible on one GPU ({n} visible), not run"
        if n < 2 else f"2-process NCCL check: not part of this single-GPU check ({n} GPUs visible), not run")
    for k, v in info.items():
        rows.append([k, str(v)])
    frag.d["data"] = info


def phase_correctness(frag: Fragment, plan: Plan, tiny: bool):
    rows = frag.table(f"Triton vs torch backend at h={plan.h}, p={plan.p}, n={plan.n}, chunk {plan.chunk}, batch "
                      f"{plan.batch}: max |Δ| / max |torch|", ["case", "l", "dtype", "y", "final states",
                                                                "worst gradient", "bound out / grad", "ok"])
    expect = set(PARTS) | {"A", "D", "dt_bias", "initial_states", "decay_scale", "input_scale"}
    for l in plan.lengths:
        for dtype in plan.dtypes:
            inp = make_inputs(plan, plan.batch, l, dtype, EVERY_OPTION)
            for case, extra in (("every option", {}), (f"every option, window {plan.window}", dict(window=plan.window))):
                name = f"{case}, l={l}, {dtype}"
                try:
                    ref = fwd_bwd(inp, "torch", **extra)
                    got = fwd_bwd(inp, "triton", **extra)
                    sync()
                except Exception as e:       # one case's failure is its row; the other cases still run
                    traceback.print_exc()
                    rows.append([case, l, dtype, "failed", "-", short(e), "-", "NO"])
                    frag.check(name, False, short(e))
                    free()
                    continue
                progress(frag, name)
                errs = errors(ref, got)
                del ref, got
                frag.d["data"][name] = errs
                ok = within(errs, dtype) and {k[1:] for k in errs if k.startswith("d")} == expect
                g, gv = worst(errs, grads=True)
                tol = TOL[dtype]
                rows.append([case, l, dtype, fmt(errs["y"]), fmt(errs["final_states"]), f"{g} {fmt(gv)}",
                             f"{tol['out']:.0e} / {tol['grad']:.0e}", "yes" if ok else "NO"])
                frag.check(name, ok, json.dumps(_clean(errs)))
                free()
            del inp
            free()


def phase_long(frag: Fragment, plan: Plan, tiny: bool):
    b, l, piece = plan.batch, plan.long_len, plan.long_piece
    width = 2 * plan.h * plan.p + 2 * plan.n + plan.h
    past = b * l * width > 2**31
    frag.d["data"]["buffer_elements"] = b * l * width
    if not tiny:
        frag.check("the buffer's element offsets pass 2^31", past, f"{b} x {l} x {width} = {b * l * width}")
    rows = frag.table(f"{l} tokens, batch {b} (element offsets {'past' if past else 'within'} 2^31): Triton vs the "
                      f"torch backend chained over {l // piece} pieces",
                      ["dtype", "y", "final states", "y, row 2, last piece", "worst gradient, last piece", "ok"])
    for dtype in plan.dtypes:
        inp = make_inputs(plan, b, l, dtype, LONG_OPTIONS)
        y_ref, s_ref, entering = chained_torch(inp, piece)
        progress(frag, f"{dtype}: the chained torch reference")
        ref, errs = dict(y=y_ref), {}
        del y_ref

        def compare(y, s):          # before the backward, which then runs without the reference's memory
            errs.update(y=rel_err(y.float(), ref["y"]), final_states=rel_err(s, s_ref),
                        y_row2_last_piece=rel_err(y[-1, -piece:].float(), ref["y"][-1, -piece:]))
            ref.clear()

        _, _, grads = fwd_bwd(inp, "triton", last=piece, clone=False, on_forward=compare)
        sync()
        progress(frag, f"{dtype}: Triton forward and backward")
        last = {k: grads[k][:, -piece:].clone() for k in PARTS}     # not views holding the whole gradient
        del grads
        free()
        # the last piece alone in torch, entering with the (exact) state: the same loss, so the same gradients
        _, _, g_ref = fwd_bwd(inp.slice(l - piece, l, entering), "torch", last=piece)
        errs.update({f"d{k}_last_piece": rel_err(last[k].float(), g_ref[k].float()) for k in PARTS})
        del last, g_ref, inp
        free()
        ok = within(errs, dtype)
        g, gv = worst(errs, grads=True)
        rows.append([dtype, fmt(errs["y"]), fmt(errs["final_states"]), fmt(errs["y_row2_last_piece"]),
                     f"{g} {fmt(gv)}", "yes" if ok else "NO"])
        frag.d["data"][dtype] = errs
        frag.check(f"{l} tokens, {dtype}", ok, json.dumps(_clean(errs)))


def phase_long_peer(frag: Fragment, plan: Plan, tiny: bool):
    """Each dtype in a child process (`peer_at`): a crash there, a CUDA fault included, is the peer's outcome."""
    b, l = plan.batch, plan.long_len
    rows = frag.table(f"mamba_ssm's mamba_chunk_scan_combined, {l} tokens, batch {b}, on the long phase's input, "
                      "against the chained torch backend (forward)",
                      ["dtype", "outcome", "y", "final states", "y, row 2, last piece", "detail"])
    out = frag.path.parent
    for dtype in plan.dtypes:
        res = out / f"peer_at_{dtype}.json"
        res.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "tests.gpu.phases", "peer_at", "--dtype", dtype, "--out", str(out)]
        r = subprocess.run(cmd + (["--tiny"] if tiny else []), capture_output=True, text=True)
        print(f"peer_at {dtype}: exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
        if res.is_file():
            got = json.loads(res.read_text())
        else:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            got = dict(outcome="crashes", detail=f"process died (exit {r.returncode}): {' | '.join(tail)}"[:400])
        errs = got.get("errors", {})
        rows.append([dtype, got["outcome"], fmt(errs.get("y")), fmt(errs.get("final_states")),
                     fmt(errs.get("y_row2_last_piece")), got.get("detail", "")])
        frag.d["data"][dtype] = got
        frag.d["data"]["mamba_ssm"] = got.get("version")
        frag.save()
    frag.d["notes"].append("mamba_ssm's outcome is recorded, not judged: right = within the dtype's bound of the "
                           "chained torch backend, wrong = past it (or not finite), crashes = raised or died")


def peer_at(out: Path, plan: Plan, dtype: str):
    """One dtype of long_peer, in this (child) process; writes out/peer_at_<dtype>.json."""
    b, l, piece = plan.batch, plan.long_len, plan.long_piece
    mamba, version = load_peer()
    inp = make_inputs(plan, b, l, dtype, LONG_OPTIONS)
    y_ref, s_ref, _ = chained_torch(inp, piece)
    res = dict(version=version, outcome="crashes", detail="")
    try:
        v = inp.views()
        with torch.no_grad():
            y, s = mamba(v["x"], v["dt"], inp.params["A"], v["B"], v["C"], plan.chunk, D=inp.params["D"], z=v["z"],
                         dt_bias=inp.params["dt_bias"], initial_states=inp.params["initial_states"],
                         dt_softplus=True, return_final_states=True)
            sync()
        errs = dict(y=rel_err(y.float(), y_ref), final_states=rel_err(s.float(), s_ref),
                    y_row2_last_piece=rel_err(y[-1, -piece:].float(), y_ref[-1, -piece:]))
        ok = within(errs, dtype)
        res.update(errors=errs, outcome="right" if ok else "wrong",
                   detail=f"within the {dtype} bound {TOL[dtype]['out']:.0e}" if ok else
                   f"past the {dtype} bound {TOL[dtype]['out']:.0e}")
    except Exception as e:
        res["detail"] = short(e)
    (out / f"peer_at_{dtype}.json").write_text(json.dumps(_clean(res), indent=1))


def phase_speed(frag: Fragment, plan: Plan, tiny: bool):
    from longctx.pipeline.bench import kernels as bench
    mamba, version = load_peer()
    dtype = getattr(torch, plan.speed_dtype)
    kw = dict(dt_softplus=True, chunk_size=plan.chunk)
    fns = dict(triton=lambda **a: ssd(**a, backend="triton", **kw), mamba_ssm=lambda **a: mamba(**a, **kw),
               torch=lambda **a: ssd(**a, backend="torch", **kw))
    rows = frag.table(f"SSD forward+backward, median ms of {plan.repeats} after a warm-up (`longctx bench kernels` "
                      f"inputs: batch 1, h={plan.h}, p={plan.p}, n={plan.n}, chunk {plan.chunk}, {plan.speed_dtype}); "
                      f"mamba_ssm {version}", ["l", "Triton ms", "mamba_ssm ms", "Triton / mamba_ssm",
                                               "torch ms", "Triton vs torch", "mamba_ssm vs torch"])
    for l in plan.speed_lengths:
        inputs = bench._inputs(l, plan.h, plan.p, plan.n, DEVICE, dtype)
        ms, ys, err = {}, {}, {}
        for name, fn in fns.items():
            try:
                ms[name], ys[name] = bench._time_fwd_bwd(fn, inputs, plan.repeats)
            except Exception as e:       # mamba_ssm past its limits, out of memory: the row says so
                err[name] = short(e)
                free()
            progress(frag, f"l={l} {name}: {fmt(ms.get(name), '.2f')} ms {err.get(name, '')}")
        rel = {k: (bench._rel(ys[k], ys["torch"]) if k in ys and "torch" in ys else None) for k in ("triton", "mamba_ssm")}
        ratio = ms["triton"] / ms["mamba_ssm"] if "triton" in ms and "mamba_ssm" in ms else None
        peer = "crashes" if "mamba_ssm" in err else "unknown (no torch output)" if rel["mamba_ssm"] is None \
            else "right" if within({"y": rel["mamba_ssm"]}, plan.speed_dtype) else "wrong"
        rows.append([l, fmt(ms.get("triton"), ".2f"), fmt(ms.get("mamba_ssm"), ".2f") if "mamba_ssm" in ms
                     else f"failed: {err['mamba_ssm']}", fmt(ratio, ".2f"), fmt(ms.get("torch"), ".2f"),
                     fmt(rel["triton"]), f"{fmt(rel['mamba_ssm'])} ({peer})"])
        frag.d["data"][str(l)] = dict(ms=ms, errors=err, rel_err_vs_torch=rel, triton_over_mamba_ssm=ratio,
                                      mamba_ssm_outcome=peer)
        frag.check(f"l={l}: Triton and torch ran", "triton" in ms and "torch" in ms, json.dumps(err))
        frag.check(f"l={l}: Triton within the {plan.speed_dtype} bound of torch", rel["triton"] is not None and
                   within({"y": rel["triton"]}, plan.speed_dtype), fmt(rel["triton"]))
        del inputs, ys
        free()
    frag.d["notes"].append("Triton / mamba_ssm < 1: Triton is faster. mamba_ssm's failures are recorded in its "
                           "column, not judged.")


class BackendOps:
    """The model's local ops (pipeline/model/ops.py LocalOps) with the scan's backend named rather than "auto"."""

    def __init__(self, backend: str):
        from longctx.pipeline.model.ops import LOCAL
        self.backend, self.conv = backend, LOCAL.conv

    def scan(self, x, dt, A, B, C, z, seq_idx, arguments):
        return ssd(x, dt, A, B, C, z=z, seq_idx=seq_idx, backend=self.backend, **arguments(0))


def _median_s(step, repeats: int):
    """Median seconds of `step` over `repeats` runs after one warm-up, and the last result."""
    out = step()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def phase_model(frag: Fragment, plan: Plan, tiny: bool):
    from longctx.pipeline.bench.train import PEAK_TFLOPS, model_flops_per_token
    from longctx.pipeline.config import load_config, model_config
    from longctx.pipeline.model import Mamba2LM
    from longctx.pipeline.training.loss import lm_loss
    cfg = load_config(MODEL_CONFIG)
    mc = model_config(cfg)
    shape = (mc.nheads, mc.headdim, mc.d_state, mc.chunk_size)
    frag.check("the config's scan shape is the kernel phases' 370M shape", shape == (FULL.h, FULL.p, FULL.n, FULL.chunk),
               f"h, p, n, chunk = {shape}")
    ckpt = bool(cfg.train.activation_checkpointing)
    if plan.model_shrink:
        mc = replace(mc, **dict(plan.model_shrink))
    dtype = getattr(torch, plan.model_dtype)
    torch.manual_seed(0)
    with torch.device(DEVICE):                   # initialised where it runs: seconds, not a minute, at 370M
        model = Mamba2LM(mc).to(dtype=dtype).train()
    model.enable_gradient_checkpointing(ckpt)
    params = sum(p.numel() for p in model.parameters())
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None) \
        if DEVICE == "cuda" else None
    rows = frag.table(f"{MODEL_CONFIG.name} model ({params:,} parameters{', shrunk' if tiny else ''}), "
                      f"{plan.model_dtype}, activation checkpointing {'on' if ckpt else 'off'}, batch 1: forward + "
                      f"backward, median of {plan.model_repeats} after a warm-up",
                      ["backend", "l", "tokens/s", "step s", "peak GiB", "MFU (6N)", "loss"])
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for l in plan.model_lengths:
        ids = torch.randint(0, mc.vocab_size, (1, l + 1), device=DEVICE, generator=g)
        for backend in ("triton", "torch"):
            for layer in model.backbone.layers:
                layer.mixer.ops = BackendOps(backend)

            def step():
                model.zero_grad(set_to_none=True)
                loss = lm_loss(model(ids[:, :-1]).logits, ids[:, 1:])
                loss.backward()
                return loss.detach()

            model.zero_grad(set_to_none=True)
            free()
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            name = f"{backend}, l={l}"
            try:
                s, loss = _median_s(step, plan.model_repeats)
                progress(frag, f"{name}: {s:.3f} s a step")
            except Exception as e:
                rows.append([backend, l, "failed", "-", "-", "-", short(e)])
                frag.check(name, False, short(e))
                free()
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
            tps = l / s
            mfu = None if peak_tflops is None else model_flops_per_token(model) * tps / (peak_tflops * 1e12)
            rows.append([backend, l, f"{tps:,.0f}", f"{s:.3f}", fmt(peak, ".1f"), fmt(mfu, ".1%"), f"{float(loss):.3f}"])
            frag.d["data"][name] = dict(tokens_per_s=tps, step_s=s, peak_gib=peak, mfu=mfu, loss=float(loss))
            frag.check(name, math.isfinite(float(loss)), f"loss {float(loss):.3f}")


PHASES = dict(env=phase_env, correctness=phase_correctness, long=phase_long, long_peer=phase_long_peer,
              speed=phase_speed, model=phase_model)


# ----------------------------------------------------------------------------- the peer

def _cpu_shims():
    """mamba_ssm's host code assumes CUDA (`torch.cuda.device(x.device.index)`, the SM count) and autotunes
    over several configs (which needs a GPU to time them). On CPU under TRITON_INTERPRET=1 (run.sh --rehearse)
    these stand in; never where CUDA is available."""
    os.environ.setdefault("MAMBA_DETERMINISTIC", "1")     # mamba_ssm then keeps one config per kernel
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda *a, **k: SimpleNamespace(multi_processor_count=2)


def load_peer():
    """(mamba_chunk_scan_combined, version) from the offline folder's peer/, never an installed mamba_ssm."""
    peer = OFFLINE / "peer"
    if not (peer / "mamba_ssm" / "__init__.py").is_file():
        raise RuntimeError(f"no vendored mamba_ssm in {peer}: run tests/gpu/fetch.sh on a machine with network")
    if str(peer) not in sys.path:
        sys.path.insert(0, str(peer))
    if DEVICE == "cpu":
        _cpu_shims()
    import mamba_ssm
    if not Path(mamba_ssm.__file__).resolve().is_relative_to(peer.resolve()):
        raise RuntimeError(f"mamba_ssm was imported from {mamba_ssm.__file__}, not from {peer}")
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined, mamba_ssm.__version__


# ----------------------------------------------------------------------------- entry point

def run_phase(phase: str, out: Path, tiny: bool) -> dict:
    """Run one phase in this process; its fragment (also written to out/PHASE.json)."""
    plan = TINY if tiny else FULL
    out.mkdir(parents=True, exist_ok=True)
    frag = Fragment(phase, out, tiny)
    try:
        if phase != "env" and DEVICE != "cuda" and not (tiny and _interpreting()):
            raise RuntimeError("needs a CUDA device, or --tiny with TRITON_INTERPRET=1 set (run.sh --rehearse)")
        PHASES[phase](frag, plan, tiny)
        frag.d["status"] = "ok" if all(c["ok"] for c in frag.d["checks"]) else "failed"
    except Exception as e:
        frag.d["status"] = "error"
        frag.d["error"] = short(e)
        frag.d["traceback"] = traceback.format_exc()[-3000:]
        traceback.print_exc()
    frag.save()
    return frag.d


def _interpreting() -> bool:
    try:
        from longctx.kernels.triton import interpreting
    except ImportError:
        return False
    return interpreting()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=[*PHASES, "peer_at"])
    ap.add_argument("--out", type=Path, required=True, help="folder for PHASE.json")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, fp32 (the CPU rehearsal)")
    ap.add_argument("--dtype", default="float32", help="peer_at only")
    a = ap.parse_args(argv)
    if a.phase == "peer_at":
        peer_at(a.out, TINY if a.tiny else FULL, a.dtype)
        return 0
    d = run_phase(a.phase, a.out, a.tiny)
    for c in d["checks"]:
        print(f"{'ok ' if c['ok'] else 'FAIL'} {c['name']}" + ("" if c["ok"] else f": {c['detail']}"))
    print(f"{a.phase}: {d['status']} in {d['seconds']:.1f} s")
    return 0 if d["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
