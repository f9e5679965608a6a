"""Argument handling shared by every SSD backend.

Each backend (step-by-step reference, chunked PyTorch, Triton) must see the same
processed `dt`, the same per-head scales and the same document ids, so those
transformations live here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

Scale = Union[None, float, int, torch.Tensor, Sequence[float]]


@dataclass(frozen=True)
class StateNorm:
    """State normalization (docs/ARCHITECTURE.md §4, mitigation 2).

    After the update at position t with (offset + t + 1) % every == 0, the state of
    each (batch, head) is rescaled to at most `threshold` in Frobenius norm; y_t reads
    the state before the rescaling. `threshold` is a float or one value per head.
    `offset` is how many tokens of the sequence earlier calls consumed (0: positions
    count from the start of this call), so chunked prefill and decoding normalize at
    the same positions as one call over the whole sequence.
    """

    every: int
    threshold: Union[float, torch.Tensor]
    offset: int = 0

    def __post_init__(self):
        if int(self.every) <= 0:
            raise ValueError(f"StateNorm.every must be a positive integer, got {self.every!r}")
        if int(self.offset) < 0:
            raise ValueError(f"StateNorm.offset must be >= 0, got {self.offset!r}")

    def is_norm_position(self, t: int) -> bool:
        """Whether the state is rescaled after position t of this call."""
        return (self.offset + t + 1) % self.every == 0

    def thresholds(self, nheads: int, dtype, device) -> torch.Tensor:
        tau = per_head(self.threshold, nheads, dtype, device, "StateNorm.threshold")
        if not tau.is_cuda and not bool((tau > 0).all()):
            raise ValueError(f"StateNorm.threshold must be positive, got {tau.tolist()}")
        return tau

    def scale(self, state: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """min(1, tau / ||state||_F) per (batch, head), safe to differentiate at state = 0."""
        norm = state.square().sum(dim=(-2, -1)).clamp_min(1e-30).sqrt()       # (b, h)
        return tau / torch.where(norm > tau, norm, tau.expand_as(norm))


def check_window(window) -> Optional[int]:
    if window is None:
        return None
    if int(window) != window or window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")
    return int(window)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 inputs are computed in fp64 (reference checks); everything else in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_shapes(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None):
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, heads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"B must be (batch, length, groups, d_state) = ({b}, {l}, g, n), got {tuple(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    if h % g != 0:
        raise ValueError(f"number of heads ({h}) must be a multiple of the number of groups ({g})")
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be (batch, length, heads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (heads,) = ({h},), got {tuple(A.shape)}")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"D must be (heads,) or (heads, headdim), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (h,):
        raise ValueError(f"dt_bias must be (heads,) = ({h},), got {tuple(dt_bias.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, n):
        raise ValueError(
            f"initial_states must be (batch, heads, headdim, d_state) = {(b, h, p, n)}, "
            f"got {tuple(initial_states.shape)}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"seq_idx must be (batch, length) = {(b, l)}, got {tuple(seq_idx.shape)}")


def process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    """dt_t = clamp(softplus(dt_raw + dt_bias), dt_limit), in `dtype`.

    As in mamba_ssm, the clamp is skipped for the default limit (0, inf) so that a
    raw (non-softplus) dt is passed through untouched.
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20, like mamba_ssm
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if (lo, hi) != (0.0, math.inf):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def per_head(value: Scale, nheads: int, dtype, device, name: str) -> Optional[torch.Tensor]:
    """A scalar or per-head mitigation scale as a (heads,) tensor, or None when absent."""
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=dtype, device=device) if not torch.is_tensor(value) else value.to(dtype)
    if t.dim() == 0:
        t = t.expand(nheads)
    if t.shape != (nheads,):
        raise ValueError(f"{name} must be a scalar or one value per head ({nheads}), got shape {tuple(t.shape)}")
    return t


def log_decay_scale(decay_scale: Scale, nheads, dtype, device) -> Optional[torch.Tensor]:
    """log(λ_α) per head; λ_α must lie in (0, 1] (forgetting more, never less)."""
    t = per_head(decay_scale, nheads, dtype, device, "decay_scale")
    if t is None:
        return None
    if not t.is_cuda and not ((t > 0) & (t <= 1)).all():
        raise ValueError(f"decay_scale must lie in (0, 1], got {t.tolist()}")
    return torch.log(t)


def log_decays(dt, A, dt_bias, dt_softplus, dt_limit, decay_scale, dtype):
    """(processed dt, log a_t = dt_t * A + log λ_α) per position and head, in `dtype`.

    The one definition of the per-step decay: every backend and the sequence-parallel
    state pass (pipeline/parallel.py) must agree on it exactly."""
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    log_a = dtp * A.to(dtype)
    log_decay = log_decay_scale(decay_scale, A.shape[0], dtype, dt.device)
    return dtp, (log_a if log_decay is None else log_a + log_decay)


def document_ids(seq_idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Turn seq_idx into ids that change exactly where seq_idx changes.

    Two positions then share an id iff no boundary lies between them, even when a
    caller reuses seq_idx values (0, 1, 0, ...).
    """
    if seq_idx is None:
        return None
    changed = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return torch.cat([torch.zeros_like(changed[:, :1]), changed.cumsum(dim=1)], dim=1)


def heads_of_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., g, n) -> (..., h, n): head i reads group i // (h / g), as in mamba_ssm."""
    g = t.shape[-2]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=-2)


def finish_output(y, x, D, z):
    """y + D * x, then the optional silu(z) gate; all in y's (compute) dtype."""
    if D is not None:
        Dc = D.to(y.dtype)
        y = y + (Dc[:, None] if Dc.dim() == 1 else Dc) * x.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y
