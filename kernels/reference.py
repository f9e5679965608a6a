"""The SSD recurrence step by step: the ground truth every fast path is checked against.

Per batch element and head, with state h of shape (headdim, d_state):

    a_t = decay_scale * exp(dt_t * A)
    h_t = a_t * h_{t-1} + input_scale * dt_t * outer(x_t, B_t)
    y_t = h_t @ C_t + D * x_t           (then * silu(z_t) when z is given)

Mitigations (docs/ARCHITECTURE.md §4):
  state_norm  after position t with (offset+t+1) % every == 0: h_t *= min(1, tau / ||h_t||_F),
              y_t having read h_t before the rescaling;
  window r    y_t reads only what the last r inputs (and, while t < r, the initial state)
              contribute to h_t. Here that is literal: every input's contribution is kept
              in a ring of r slots, decayed and rescaled exactly as h is, and summed.

`ssd_step` is one position of the plain recurrence.
"""
from __future__ import annotations

import math

import torch

from .common import (
    check_shapes,
    check_window,
    compute_dtype,
    document_ids,
    finish_output,
    heads_of_groups,
    log_decay_scale,
    per_head,
    process_dt,
)


def ssd_step(state, x, dt, A, B, C, *, log_decay=None, input_scale=None):
    """Advance the state by one position and read it out.

    state (b,h,p,n) compute dtype; x (b,h,p); dt (b,h) already processed; A (h,);
    B, C (b,h,n) already expanded to heads. Returns (y (b,h,p) without D/z, new state).
    """
    log_a = dt * A
    if log_decay is not None:
        log_a = log_a + log_decay
    written = dt if input_scale is None else dt * input_scale
    state = torch.exp(log_a)[:, :, None, None] * state + (written[:, :, None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y, state


def ssd_naive(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
              dt_limit=(0.0, math.inf), initial_states=None, seq_idx=None, return_final_states=False,
              decay_scale=None, input_scale=None, state_norm=None, window=None, backend="auto"):
    """Reference SSD; same arguments as `kernels.ssd` (chunk_size and backend are ignored)."""
    check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    window = check_window(window)
    b, l, h, p = x.shape
    n = B.shape[-1]
    cdt = compute_dtype(x)
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    Ac = A.to(cdt)
    log_decay = log_decay_scale(decay_scale, h, cdt, x.device)
    scale_in = per_head(input_scale, h, cdt, x.device, "input_scale")
    tau = None if state_norm is None else state_norm.thresholds(h, cdt, x.device)
    Bh, Ch = heads_of_groups(B.to(cdt), h), heads_of_groups(C.to(cdt), h)
    xc = x.to(cdt)
    doc = document_ids(seq_idx)

    state = (initial_states.to(cdt) if initial_states is not None
             else torch.zeros(b, h, p, n, dtype=cdt, device=x.device))
    if window is not None:
        ring = torch.zeros(b, window, h, p, n, dtype=cdt, device=x.device)  # contribution of each recent input
        from_initial = state                                                  # what the initial state became
    ys = []
    for t in range(l):
        if doc is not None and t > 0:
            keep = (doc[:, t] == doc[:, t - 1]).to(cdt)[:, None, None, None]
            state = state * keep
            if window is not None:
                ring, from_initial = ring * keep[:, None], from_initial * keep
        if window is None:
            y_t, state = ssd_step(state, xc[:, t], dtp[:, t], Ac, Bh[:, t], Ch[:, t],
                                  log_decay=log_decay, input_scale=scale_in)
        else:
            zero_state = torch.zeros_like(state)
            _, written = ssd_step(zero_state, xc[:, t], dtp[:, t], Ac, Bh[:, t], Ch[:, t],
                                  log_decay=log_decay, input_scale=scale_in)
            _, state = ssd_step(state, xc[:, t], dtp[:, t], Ac, Bh[:, t], Ch[:, t],
                                log_decay=log_decay, input_scale=scale_in)
            a_t = torch.exp(dtp[:, t] * Ac + (0 if log_decay is None else log_decay))[:, None, :, None, None]
            slot = torch.arange(window, device=x.device) == t % window          # input t - window leaves
            ring = torch.where(slot[None, :, None, None, None], written[:, None], ring * a_t)
            from_initial = from_initial * a_t[:, 0]
            windowed = ring.sum(dim=1) + (from_initial if t < window else 0)
            y_t = torch.einsum("bhpn,bhn->bhp", windowed, Ch[:, t])
        ys.append(y_t)
        if state_norm is not None and state_norm.is_norm_position(t):
            s = state_norm.scale(state, tau)[:, :, None, None]
            state = state * s
            if window is not None:
                ring, from_initial = ring * s[:, None], from_initial * s
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros(b, 0, h, p)
    y = finish_output(y, x, D, z).to(x.dtype)
    return (y, state) if return_final_states else y
