"""Chunked SSD on Triton kernels: the same math as `kernels/chunked.py`, with the O(l·Q·p·n) parts
(chunk states, state passing, chunk scan and all their gradients) in `kernels.py`.

What stays in torch, and why: the O(l·h) elementwise preprocessing (dt processing, the
chunk cumsum of log a, the per-position decay weights exp(cum_end - cum_s)·u_s and
exp(cum_t), document masks on them) and the output finish (D·x, silu(z) gate). Autograd
differentiates those, so dt_bias / softplus / dt_limit / decay_scale / input_scale / D / z
need no hand-written gradient: the kernels return d/dcum, d/du and d/dweights and torch
chains them back. Each kernel group is its own autograd.Function:

  written  = _ChunkOuter(x, B, w^W)                W_c = Σ_s w^W_s x_s ⊗ B_s
  carried, final = _PassStates(written, g, init)   H_{c+1} = g_c H_c + W_c
  y        = _ChunkScan(x, B, C, cum, u, H, w^R)   intra-chunk band + w^R_t H_c C_t

Sliding window (kernels/chunked.py docstring, same decomposition): the band inside the
chunk (mask in the scan kernel), blocks of earlier chunks cut by the window edge (scan
kernel with a key-chunk offset), whole chunks inside the window through their written
states (`_WindowStates`: a sum of decayed positive terms, O(l/Q · r/Q · h·p·n), read out
like the carried state), and the initial state while t < r (scan kernel read-out of the
initial state). Only the per-chunk log-decay coefficients (O(l/Q · r/Q · h)) are torch.

Falls back to the torch backend, with a warning naming the reason: state_norm (its rescale
depends on the state's norm at chunk ends, not implemented in the kernels) and float64
inputs (no fp64 tensor-core path; fp64 is for reference checks).
"""
from __future__ import annotations

import math
import warnings

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..common import check_shapes, check_window, finish_output, log_decays, per_head
from ..layout import Chunks, documents, window_key_chunks
from . import kernels as K

_INTERP_BLOCK = 16     # fixed tiles in the interpreter (no autotune there); tl.dot needs >= 16
_PASS_BLOCK = 256


def interpreting() -> bool:
    """Whether triton runs in interpreter mode in this process.

    triton.jit picks the mode when a function is decorated, and triton's own library functions
    (tl.sum, tl.cdiv, ...) are decorated when triton is imported: TRITON_INTERPRET=1 must be in the
    environment before the first `import triton`. That import-time mode is what counts here."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.sum, InterpretedFunction)


def _configs(*rows, names):
    """triton.Configs from rows of meta-parameter values, the last two being num_warps and num_stages.

    A handful per kernel, not a grid: every config is compiled on the first call (fp32 variants take
    seconds each), and configs that do not fit in shared memory are dropped by the autotuner."""
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


class _Kernel:
    """One kernel, built on first use like @triton.jit would (interpreter or JIT, by the process's mode),
    and autotuned over `configs` (keyed on the shape arguments) only when compiled: the interpreter
    gets the fixed tiles of `interp_meta`, so no benchmarking runs there."""

    def __init__(self, fn, configs=None, key=()):
        self.fn, self.configs, self.key = fn, configs, list(key)
        self._kernel = self._jit = None
        self._fitting = {}       # constexpr arguments -> the config that fits them, where the tuned one did not

    def __call__(self, grid, *args, interp_meta=None, **kwargs):
        if self._kernel is None:
            if interpreting():   # not triton.jit: that reads the environment now, not the import-time mode
                from triton.runtime.interpreter import InterpretedFunction
                kernel = InterpretedFunction(self.fn)
            else:
                from triton.runtime.jit import JITFunction
                kernel = JITFunction(self.fn)
            self._jit = kernel
            if self.configs and not interpreting():
                kernel = triton.autotune(configs=self.configs, key=self.key)(kernel)
            self._kernel = kernel
        if not self.configs or interpreting():
            return self._kernel[grid](*args, **kwargs, **(interp_meta or {}))
        variant = tuple(sorted(kwargs.items()))      # the keyword arguments are the constexpr flags and tiles
        if variant in self._fitting:
            return self._jit[grid](*args, **kwargs, **self._fitting[variant].all_kwargs())
        try:
            return self._kernel[grid](*args, **kwargs)
        except OutOfResources:
            # The autotuner keys on shapes (p, n, Q), not on the flags: the config it tuned on one variant of
            # the kernel (say, without the window's extra inputs) can need more shared memory than the GPU has
            # for a heavier variant (fp32 with a window on an H200: 246528 > 232448 bytes). Then the fastest
            # config that fits this variant, remembered for it.
            config, out = launch_first_fitting(self._jit, grid, args, kwargs, self.configs,
                                               getattr(self._kernel, "configs_timings", None) or {})
            self._fitting[variant] = config
            return out


def launch_first_fitting(jit, grid, args, kwargs, configs, timings):
    """Launch `jit` with the first of `configs` (fastest first by `timings`, {config: ms or [ms, ...]}) whose
    resources fit the device; (that config, the launch's result). Raises the last OutOfResources if none fits."""
    def ms(config):
        t = timings.get(config, math.inf)
        return t[0] if isinstance(t, (list, tuple)) else t

    error = None
    for config in sorted(configs, key=ms):
        try:
            return config, jit[grid](*args, **kwargs, **config.all_kwargs())
        except OutOfResources as e:
            error = e
    raise error


_SHAPE_KEY = ["p", "n", "Q"]
_outer_fwd = _Kernel(K._outer_fwd, _configs((64, 64, 64, 4, 2), (32, 64, 128, 4, 2), (64, 32, 128, 4, 2),
                                            (64, 64, 128, 8, 2), names=("BS", "BP", "BN")), _SHAPE_KEY)
_outer_bwd = _Kernel(K._outer_bwd, _configs((32, 4, 2), (64, 4, 2), (64, 8, 2), names=("BS",)), _SHAPE_KEY)
_pass_fwd = _Kernel(K._pass_fwd)
_pass_bwd = _Kernel(K._pass_bwd)
_window_states_fwd = _Kernel(K._window_states_fwd)
_window_states_bwd = _Kernel(K._window_states_bwd)
_scan_fwd = _Kernel(K._scan_fwd, _configs((64, 64, 64, 4, 2), (64, 32, 64, 4, 2), (64, 64, 32, 4, 2),
                                          (128, 64, 64, 8, 2), names=("BT", "BS", "BP")), _SHAPE_KEY)
_BWD_CONFIGS = _configs((32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 1),
                        names=("BT", "BS"))
_scan_bwd_query = _Kernel(K._scan_bwd_query, _BWD_CONFIGS, _SHAPE_KEY)
_scan_bwd_key = _Kernel(K._scan_bwd_key, _BWD_CONFIGS, _SHAPE_KEY)


def _pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(int(v)))


def _prec(t: torch.Tensor) -> str:
    """fp32 dot precision follows torch's switch for fp32 matmuls: plain TF32 only when torch allows it,
    otherwise 3xTF32 (fp32-accurate on tensor cores; "ieee" would leave them idle). The interpreter
    computes in numpy, exactly."""
    if t.dtype == torch.float32 and t.is_cuda and not interpreting():
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    return "ieee"


def _grid_t(Q, nc, bh, tile="BT", per_p=None):
    def grid(meta):
        g0 = triton.cdiv(Q, meta[tile])
        if per_p is not None:
            g0 *= triton.cdiv(per_p, meta["BP"])
        return (g0, nc, bh)
    return grid


def _sum_groups(t: torch.Tensor, g: int) -> torch.Tensor:
    """(b, l, h, n) per-head gradients -> (b, l, g, n): heads of a group share B and C."""
    b, l, h, n = t.shape
    return t if g == h else t.view(b, l, g, h // g, n).sum(3)


class _ChunkOuter(torch.autograd.Function):
    """W_c = Σ_{s in chunk c} w_s X_s ⊗ Y_s  -> (b, nc, h, p, n) fp32."""

    @staticmethod
    def forward(ctx, X, Y, w, Q):
        b, l, h, p = X.shape
        g, n = Y.shape[2], Y.shape[3]
        L = w.shape[-1]
        nc = L // Q
        out = torch.empty(b, nc, h, p, n, device=X.device, dtype=torch.float32)
        grid = lambda m: (triton.cdiv(p, m["BP"]) * triton.cdiv(n, m["BN"]), nc, b * h)  # noqa: E731
        _outer_fwd(grid, X, Y, w, out, l, L, h, h // g, p, n, *X.stride(), *Y.stride(), *out.stride(),
                   Q=Q, PREC=_prec(X), interp_meta=dict(BS=_INTERP_BLOCK, BP=_pow2(p), BN=_pow2(n)))
        ctx.save_for_backward(X, Y, w)
        ctx.Q = Q
        return out

    @staticmethod
    def backward(ctx, dout):
        X, Y, w = ctx.saved_tensors
        Q = ctx.Q
        b, l, h, p = X.shape
        g, n = Y.shape[2], Y.shape[3]
        L = w.shape[-1]
        nc = L // Q
        dX = torch.empty(b, l, h, p, device=X.device, dtype=torch.float32)
        dYh = torch.empty(b, l, h, n, device=X.device, dtype=torch.float32)
        dw = torch.zeros_like(w)
        _outer_bwd(_grid_t(Q, nc, b * h, "BS"), X, Y, w, dout, dX, dYh, dw, l, L, h, h // g, p, n,
                   *X.stride(), *Y.stride(), *dout.stride(), Q=Q, PREC=_prec(X),
                   interp_meta=dict(BS=_INTERP_BLOCK), BP=_pow2(p), BN=_pow2(n))
        return dX.to(X.dtype), _sum_groups(dYh, g).to(Y.dtype), dw, None


class _PassStates(torch.autograd.Function):
    """carried[c] = H_c (state entering chunk c), final = H_nc; H_0 = init (zeros when None)."""

    @staticmethod
    def forward(ctx, W, g, init):
        b, nc, h, p, n = W.shape
        carried = torch.empty_like(W)
        final = torch.empty(b, h, p, n, device=W.device, dtype=torch.float32)
        init_c = init.contiguous() if init is not None else final
        _pass_fwd((triton.cdiv(p * n, _PASS_BLOCK), b * h), W, g, init_c, carried, final, nc, h, p * n,
                  HAS_INIT=init is not None, BLOCK=_PASS_BLOCK)
        ctx.save_for_backward(g, carried)
        ctx.has_init, ctx.init_dtype = init is not None, None if init is None else init.dtype
        return carried, final

    @staticmethod
    def backward(ctx, dcarried, dfinal):
        g, carried = ctx.saved_tensors
        b, nc, h, p, n = carried.shape
        if dcarried is None:
            dcarried = torch.zeros_like(carried)
        dcarried = dcarried.contiguous()
        nblocks = triton.cdiv(p * n, _PASS_BLOCK)
        dW = torch.empty_like(carried)
        dg = torch.empty(b, h, nc, nblocks, device=g.device, dtype=torch.float32)
        dinit = torch.empty(b, h, p, n, device=g.device, dtype=torch.float32)
        dfin = dfinal.contiguous() if dfinal is not None else dinit
        _pass_bwd((nblocks, b * h), dcarried, g, carried, dfin, dW, dg, dinit, nc, h, p * n, nblocks,
                  HAS_DFINAL=dfinal is not None, BLOCK=_PASS_BLOCK)
        return dW, dg.sum(-1), (dinit.to(ctx.init_dtype) if ctx.has_init else None)


class _WindowStates(torch.autograd.Function):
    """F_c = Σ_{d=1..ND} coef[b, h, c, d-1] W_{c-d}  (coef zero where c < d or a document boundary lies between)."""

    @staticmethod
    def forward(ctx, W, coef):
        b, nc, h, p, n = W.shape
        nd = coef.shape[-1]
        F = torch.empty_like(W)
        _window_states_fwd((triton.cdiv(p * n, _PASS_BLOCK), nc, b * h), W, coef, F, nc, h, p * n, nd,
                           BLOCK=_PASS_BLOCK)
        ctx.save_for_backward(W, coef)
        return F

    @staticmethod
    def backward(ctx, dF):
        W, coef = ctx.saved_tensors
        b, nc, h, p, n = W.shape
        nd = coef.shape[-1]
        nblocks = triton.cdiv(p * n, _PASS_BLOCK)
        dW = torch.empty_like(W)
        dcoef = torch.zeros(b, h, nc, nd, nblocks, device=W.device, dtype=torch.float32)
        _window_states_bwd((nblocks, nc, b * h), W, coef, dF.contiguous(), dW, dcoef, nc, h, p * n, nd, nblocks,
                           BLOCK=_PASS_BLOCK)
        return dW, dcoef.sum(-1)


class _ChunkScan(torch.autograd.Function):
    """y (b, l, h, p) fp32 = read-out w^R_t H_c C_t (when H given) + the scored block between query
    chunk c and key chunk c - key_off (when intra): see kernels._scan_fwd."""

    @staticmethod
    def forward(ctx, x, B, C, cum, u, H, wR, extra, doc, Q, key_off, window, intra):
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        L = cum.shape[-1]
        nc = L // Q
        y = torch.empty(b, l, h, p, device=x.device, dtype=torch.float32)
        dummy = cum
        Hs = H if H is not None else x.new_zeros(1, 1, 1, 1, 1)
        flags = dict(Q=Q, KEY_OFF=key_off, HAS_INTRA=intra, HAS_STATE=H is not None, HAS_DOC=doc is not None,
                     HAS_EXTRA=extra is not None, HAS_WINDOW=window is not None, PREC=_prec(x))
        _scan_fwd(_grid_t(Q, nc, b * h, "BT", per_p=p), x, B, C, cum, u,
                  doc if doc is not None else dummy, Hs, wR if wR is not None else dummy,
                  extra if extra is not None else dummy, y,
                  l, L, nc, h, h // g, p, n, window or 0,
                  *x.stride(), *B.stride(), *C.stride(), *Hs.stride(), **flags,
                  interp_meta=dict(BT=_INTERP_BLOCK, BS=_INTERP_BLOCK, BP=_pow2(p)), BN=_pow2(n))
        ctx.save_for_backward(x, B, C, cum, u, H, wR, extra, doc)
        ctx.cfg = (Q, key_off, window, intra)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, B, C, cum, u, H, wR, extra, doc = ctx.saved_tensors
        Q, key_off, window, intra = ctx.cfg
        b, l, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        L = cum.shape[-1]
        nc = L // Q
        dummy = cum
        Hs = H if H is not None else x.new_zeros(1, 1, 1, 1, 1)
        flags = dict(Q=Q, KEY_OFF=key_off, HAS_DOC=doc is not None, HAS_EXTRA=extra is not None,
                     HAS_WINDOW=window is not None, PREC=_prec(x))
        common = dict(interp_meta=dict(BT=_INTERP_BLOCK, BS=_INTERP_BLOCK), BP=_pow2(p), BN=_pow2(n))
        dCh = torch.empty(b, l, h, n, device=x.device, dtype=torch.float32)
        dwR = torch.zeros_like(cum) if H is not None else None
        dcq = torch.zeros_like(cum) if intra else None
        _scan_bwd_query(_grid_t(Q, nc, b * h, "BT"), x, B, C, cum, u,
                        doc if doc is not None else dummy, Hs, wR if wR is not None else dummy,
                        extra if extra is not None else dummy, dy, dCh,
                        dwR if dwR is not None else dummy, dcq if dcq is not None else dummy,
                        l, L, nc, h, h // g, p, n, window or 0,
                        *x.stride(), *B.stride(), *C.stride(), *Hs.stride(), *dy.stride(),
                        HAS_INTRA=intra, HAS_STATE=H is not None, **flags, **common)
        dC = _sum_groups(dCh, g)
        dx = dB = dcum = du = dextra = dH = None
        if H is not None:
            # dH_c = Σ_t w^R_t dy_t ⊗ C_t: the chunk-state kernel with (dy, C, w^R)
            dH = torch.empty(b, nc, h, p, n, device=x.device, dtype=torch.float32)
            grid = lambda m: (triton.cdiv(p, m["BP"]) * triton.cdiv(n, m["BN"]), nc, b * h)  # noqa: E731
            _outer_fwd(grid, dy, C, wR, dH, l, L, h, h // g, p, n, *dy.stride(), *C.stride(), *dH.stride(),
                       Q=Q, PREC=_prec(x), interp_meta=dict(BS=_INTERP_BLOCK, BP=_pow2(p), BN=_pow2(n)))
        if intra:
            dx = torch.empty(b, l, h, p, device=x.device, dtype=torch.float32)
            dBh = torch.empty(b, l, h, n, device=x.device, dtype=torch.float32)
            du = torch.zeros_like(cum)
            dck = torch.zeros_like(cum)
            _scan_bwd_key(_grid_t(Q, nc, b * h, "BS"), x, B, C, cum, u,
                          doc if doc is not None else dummy, extra if extra is not None else dummy, dy,
                          dx, dBh, du, dck, l, L, nc, h, h // g, p, n, window or 0,
                          *x.stride(), *B.stride(), *C.stride(), *dy.stride(), **flags, **common)
            dx, dB = dx.to(x.dtype), _sum_groups(dBh, g).to(B.dtype)
            dcum = dcq + dck
            if extra is not None:
                dextra = dcq.view(b, h, nc, Q).sum(-1)   # extra_c enters every query of chunk c once
        return (dx, dB, dC.to(C.dtype), dcum, du, dH, dwR, dextra, None, None, None, None, None)


def ssd_triton(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None, return_final_states=False,
               decay_scale=None, input_scale=None, state_norm=None, window=None):
    check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    window = check_window(window)
    kw = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
              initial_states=initial_states, seq_idx=seq_idx, return_final_states=return_final_states,
              decay_scale=decay_scale, input_scale=input_scale, state_norm=state_norm, window=window)
    fallback = None
    if state_norm is not None:
        fallback = "state_norm (the rescale at chunk ends is not implemented in the Triton kernels)"
    elif x.dtype == torch.float64:
        fallback = "float64 inputs (the Triton kernels compute in fp32)"
    if fallback is not None:
        from ..chunked import ssd_chunked
        warnings.warn(f"ssd(backend='triton'): falling back to the torch backend for {fallback}", stacklevel=3)
        return ssd_chunked(x, dt, A, B, C, **kw)
    if not x.is_cuda and not interpreting():
        raise RuntimeError("ssd(backend='triton') needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                           "imported to run the kernels on CPU for tests; use backend='torch' or 'auto' on CPU")

    b, l, h, p = x.shape
    cdt = torch.float32
    chunks = Chunks(b, h, l, max(1, min(int(chunk_size), l)))
    Q, L = chunks.Q, chunks.L
    if B.dtype != x.dtype or C.dtype != x.dtype:   # the kernels multiply x, B and C tiles together
        B, C = B.to(x.dtype), C.to(x.dtype)

    # O(l·h) preprocessing in torch (autograd takes care of dt_bias/softplus/limit/scales)
    dtp, log_a = log_decays(dt, A, dt_bias, dt_softplus, dt_limit, decay_scale, cdt)
    scale_in = per_head(input_scale, h, cdt, x.device, "input_scale")
    u = dtp if scale_in is None else dtp * scale_in

    cum = torch.cumsum(chunks.heads_first(log_a).contiguous(), dim=-1)         # (b,h,c,Q)
    u4 = chunks.heads_first(u).contiguous()
    total = cum[..., -1]                                                        # (b,h,c)

    docs = documents(seq_idx, chunks)
    doc_k = None
    w_end = torch.exp(total[..., None] - cum) * u4                              # weight into the chunk-end state
    w_start = torch.exp(cum)                                                    # weight of the carried state
    g_chunk = torch.exp(total)
    if docs is not None:
        w_end = w_end * docs.writes_to_end(cdt)
        w_start = w_start * docs.reads_entering(cdt)
        g_chunk = g_chunk * docs.passes_state(cdt)
        doc_k = docs.ids.to(torch.int32).contiguous()

    cum_f, u_f = cum.reshape(b, h, L), u4.reshape(b, h, L)
    written = _ChunkOuter.apply(x, B, w_end.reshape(b, h, L), Q)
    init = initial_states.to(cdt) if initial_states is not None else None
    carried, final = _PassStates.apply(written, g_chunk.contiguous(), init)

    if window is None:
        y = _ChunkScan.apply(x, B, C, cum_f, u_f, carried, w_start.reshape(b, h, L), None, doc_k, Q, 0, None, True)
    else:
        y = _window(x, B, C, cum, cum_f, u_f, written, w_start, init, docs, doc_k, window, Q)

    y = finish_output(y, x, D, z).to(x.dtype)
    return (y, final) if return_final_states else y


def _window(x, B, C, cum, cum_f, u_f, written, w_start, init, docs, doc_k, r, Q):
    """Windowed read-out (kernels/chunked.py `_window_band`, without state norm): never a difference of states."""
    b, h, nc, _ = cum.shape
    L = nc * Q
    cdt = cum.dtype
    total = cum[..., -1]
    y = None
    between = torch.zeros_like(total)          # Λ_d[c]: log decay from the end of chunk c-d to the start of chunk c
    coefs = []                                 # per whole key chunk d: exp(Λ_d[c]) (b, h, nc), zero for c < d
    for d, whole in window_key_chunks(nc, Q, r):
        if whole:                              # key chunk c-d wholly inside the window: its written state
            coef = torch.exp(between[..., d:])
            if docs is not None:
                coef = coef * docs.reaches(d, cdt)
            coefs.append(torch.cat([torch.zeros_like(total[..., :d]), coef], dim=-1))
        else:                                  # chunk cut by the window edge: masked block in the scan kernel
            extra = torch.cat([torch.zeros_like(total[..., :d]), between[..., d:] + total[..., :-d]], dim=-1)
            part = _ChunkScan.apply(x, B, C, cum_f, u_f, None, None, extra.contiguous(), doc_k, Q, d, r, True)
            y = part if y is None else y + part
        between = torch.cat([between[..., :d + 1], between[..., d + 1:] + total[..., 1:nc - d]], dim=-1)
    # whole key chunks are always d = 1..len(coefs) (window_key_chunks yields them first)
    full_states = (_WindowStates.apply(written, torch.stack(coefs, dim=-1).contiguous()) if coefs
                   else torch.zeros_like(written))
    band = _ChunkScan.apply(x, B, C, cum_f, u_f, full_states, w_start.reshape(b, h, L), None, doc_k, Q, 0, r, True)
    y = band if y is None else y + band
    if init is not None:                       # positions t < r still see the (decayed) initial state
        to_chunk = torch.cumsum(torch.cat([torch.zeros_like(total[..., :1]), total[..., :-1]], -1), -1)
        gain = torch.exp(cum + to_chunk[..., None])
        gain = gain * (torch.arange(L, device=x.device).view(nc, Q) < r).to(cdt)
        if docs is not None:
            gain = gain * docs.in_first_document(cdt)
        H0 = init[:, None].expand(b, nc, *init.shape[1:])
        y = y + _ChunkScan.apply(x, B, C, cum_f, u_f, H0, gain.reshape(b, h, L), None, doc_k, Q, 0, None, False)
    return y
