"""Triton kernels of the chunked SSD (forward and backward). Host-side glue lives in `ssd.py`.

Layouts (strides are always passed, so views of the caller's tensors need no copy):
  x, dy, dx          (b, l, h, p)        B, C (b, l, g, n): head i reads group i // hpg
  cum, u, w*, doc    (b, h, L) / (b, L)  fp32 / int32, L = nc * Q (padded on the host, O(l·h))
  states             (b, nc, h, p, n)    fp32
Programs: axis 0 tiles positions (and headdim), axis 1 is the chunk, axis 2 is batch·head.

Every offset that scales with the sequence, the batch or the chunk index is built in int64
(`.to(tl.int64)` on program ids and positions before they meet a stride): with l·h·p past
2^31 an int32 product wraps and reads another batch's memory (the mamba_ssm failure past
~61K tokens at 370M shapes).
"""
from __future__ import annotations

import triton.language as tl

# ----------------------------------------------------------------------------------------------
# written[c] = Σ_{s in chunk c} w_s · X_s ⊗ Y_s          (chunk states; also dH in the backward)

def _outer_fwd(x_ptr, y_ptr, w_ptr, out_ptr,
               l, L, nheads, hpg, p, n,
               sxb, sxl, sxh, sxp, syb, syl, syg, syn,
               sob, soc, soh, sop, son,
               Q: tl.constexpr, PREC: tl.constexpr,
               BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    n_nb = tl.cdiv(n, BN)
    pb, nb = pid // n_nb, pid % n_nb
    bi, hi = bh // nheads, bh % nheads
    gi = hi // hpg
    offs_p = pb * BP + tl.arange(0, BP)
    offs_n = nb * BN + tl.arange(0, BN)
    p_ok, n_ok = offs_p < p, offs_n < n
    x_base = x_ptr + bi * sxb + hi * sxh
    y_base = y_ptr + bi * syb + gi * syg
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for s0 in range(0, Q, BS):
        s_loc = s0 + tl.arange(0, BS)
        s = c * Q + s_loc
        s_ok = (s_loc < Q) & (s < l)
        xt = tl.load(x_base + s[None, :] * sxl + offs_p[:, None] * sxp, mask=p_ok[:, None] & s_ok[None, :], other=0.0)
        ys = tl.load(y_base + s[:, None] * syl + offs_n[None, :] * syn, mask=s_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptr + bh * L + s, mask=s_loc < Q, other=0.0)
        acc += tl.dot((xt.to(tl.float32) * w[None, :]).to(ys.dtype), ys, input_precision=PREC)
    out = out_ptr + bi * sob + c * soc + hi * soh
    tl.store(out + offs_p[:, None] * sop + offs_n[None, :] * son, acc, mask=p_ok[:, None] & n_ok[None, :])


def _outer_bwd(x_ptr, y_ptr, w_ptr, do_ptr, dx_ptr, dy_ptr, dw_ptr,
               l, L, nheads, hpg, p, n,
               sxb, sxl, sxh, sxp, syb, syl, syg, syn,
               sob, soc, soh, sop, son,
               Q: tl.constexpr, PREC: tl.constexpr,
               BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """dX_s = w_s dO Y_s, dY_s = w_s dOᵀ X_s (per head; the host sums heads of a group), dw_s = X_sᵀ dO Y_s."""
    sb = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    bi, hi = bh // nheads, bh % nheads
    gi = hi // hpg
    s_loc = sb * BS + tl.arange(0, BS)
    s = c * Q + s_loc
    s_ok = (s_loc < Q) & (s < l)
    offs_p, offs_n = tl.arange(0, BP), tl.arange(0, BN)
    p_ok, n_ok = offs_p < p, offs_n < n
    xs = tl.load(x_ptr + bi * sxb + hi * sxh + s[:, None] * sxl + offs_p[None, :] * sxp,
                 mask=s_ok[:, None] & p_ok[None, :], other=0.0)
    ys = tl.load(y_ptr + bi * syb + gi * syg + s[:, None] * syl + offs_n[None, :] * syn,
                 mask=s_ok[:, None] & n_ok[None, :], other=0.0)
    w = tl.load(w_ptr + bh * L + s, mask=s_loc < Q, other=0.0)
    do = tl.load(do_ptr + bi * sob + c * soc + hi * soh + offs_p[:, None] * sop + offs_n[None, :] * son,
                 mask=p_ok[:, None] & n_ok[None, :], other=0.0)
    x_do = tl.dot(xs, do.to(xs.dtype), input_precision=PREC)                      # (BS, BN)
    y_dot = tl.dot(ys, tl.trans(do).to(ys.dtype), input_precision=PREC)          # (BS, BP)
    dw = tl.sum(x_do * ys.to(tl.float32), axis=1)
    row = bi * l * nheads + hi                                                    # dx, dy: (b, l, h, *) contiguous
    tl.store(dx_ptr + (row + s[:, None] * nheads) * p + offs_p[None, :], y_dot * w[:, None],
             mask=s_ok[:, None] & p_ok[None, :])
    tl.store(dy_ptr + (row + s[:, None] * nheads) * n + offs_n[None, :], x_do * w[:, None],
             mask=s_ok[:, None] & n_ok[None, :])
    tl.store(dw_ptr + bh * L + s, dw, mask=s_loc < Q)


# ----------------------------------------------------------------------------------------------
# state passing: H_0 = initial, H_{c+1} = g_c H_c + W_c (sequential over chunks, fp32)

def _pass_fwd(w_ptr, g_ptr, init_ptr, carried_ptr, final_ptr, nc, nheads, pn,
              HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bi, hi = bh // nheads, bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < pn
    if HAS_INIT:
        state = tl.load(init_ptr + bh * pn + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(nc):
        at = ((bi * nc + c) * nheads + hi) * pn + offs
        tl.store(carried_ptr + at, state, mask=ok)
        gc = tl.load(g_ptr + bh * nc + c)
        state = gc * state + tl.load(w_ptr + at, mask=ok, other=0.0)
    tl.store(final_ptr + bh * pn + offs, state, mask=ok)


def _pass_bwd(dh_ptr, g_ptr, carried_ptr, dfinal_ptr, dw_ptr, dg_ptr, dinit_ptr, nc, nheads, pn, nblocks,
              HAS_DFINAL: tl.constexpr, BLOCK: tl.constexpr):
    """Reverse pass: dW_c = dS_{c+1}; dS_c = G_c + g_c dS_{c+1}; dg_c = <dS_{c+1}, H_c> (partial per block)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    bi, hi = bh // nheads, bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < pn
    if HAS_DFINAL:
        run = tl.load(dfinal_ptr + bh * pn + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        run = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nc):
        c = nc - 1 - i
        at = ((bi * nc + c) * nheads + hi) * pn + offs
        tl.store(dw_ptr + at, run, mask=ok)
        hc = tl.load(carried_ptr + at, mask=ok, other=0.0)
        tl.store(dg_ptr + (bh * nc + c) * nblocks + pid, tl.sum(run * hc, axis=0))
        gc = tl.load(g_ptr + bh * nc + c)
        run = gc * run + tl.load(dh_ptr + at, mask=ok, other=0.0)
    tl.store(dinit_ptr + bh * pn + offs, run, mask=ok)


# ----------------------------------------------------------------------------------------------
# chunk scan: y_t = w^R_t H_c C_t + Σ_s [s ~ t] (C_t·B_s) exp(cum_t - cum_s + extra_c) u_s x_s
#
# Queries in chunk c, keys in chunk c - KEY_OFF. KEY_OFF = 0 is the causal intra-chunk block;
# KEY_OFF > 0 (window only) is a block of an earlier chunk cut by the window edge, with
# extra_c the log decay from the key chunk's end to the query chunk's start.
# [s ~ t]: causal (KEY_OFF = 0), inside the window, same document.

def _scan_fwd(x_ptr, b_ptr, c_ptr, cum_ptr, u_ptr, doc_ptr, st_ptr, wr_ptr, ex_ptr, y_ptr,
              l, L, nc, nheads, hpg, p, n, window,
              sxb, sxl, sxh, sxp, sbb, sbl, sbg, sbn, scb, scl, scg, scn,
              ssb, ssc, ssh, ssp, ssn,
              Q: tl.constexpr, KEY_OFF: tl.constexpr, HAS_INTRA: tl.constexpr, HAS_STATE: tl.constexpr,
              HAS_DOC: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
              BT: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    n_pb = tl.cdiv(p, BP)
    tb, pb = pid // n_pb, pid % n_pb
    bi, hi = bh // nheads, bh % nheads
    gi = hi // hpg
    t_loc = tb * BT + tl.arange(0, BT)
    t = c * Q + t_loc
    t_ok = (t_loc < Q) & (t < l)
    offs_p, offs_n = pb * BP + tl.arange(0, BP), tl.arange(0, BN)
    p_ok, n_ok = offs_p < p, offs_n < n
    ct = tl.load(c_ptr + bi * scb + gi * scg + t[:, None] * scl + offs_n[None, :] * scn,
                 mask=t_ok[:, None] & n_ok[None, :], other=0.0)
    acc = tl.zeros((BT, BP), dtype=tl.float32)
    if HAS_STATE:
        ht = tl.load(st_ptr + bi * ssb + c * ssc + hi * ssh + offs_n[:, None] * ssn + offs_p[None, :] * ssp,
                     mask=n_ok[:, None] & p_ok[None, :], other=0.0)
        wr = tl.load(wr_ptr + bh * L + t, mask=t_loc < Q, other=0.0)
        acc += tl.dot(ct, ht.to(ct.dtype), input_precision=PREC) * wr[:, None]
    if HAS_INTRA:
        if c >= KEY_OFF:
            kc = c - KEY_OFF
            cum_t = tl.load(cum_ptr + bh * L + t, mask=t_loc < Q, other=0.0)
            if HAS_EXTRA:
                cum_t += tl.load(ex_ptr + bh * nc + c)
            if HAS_DOC:
                doc_t = tl.load(doc_ptr + bi * L + t, mask=t_loc < Q, other=-1)
            lo = 0
            hi_s = Q
            if KEY_OFF == 0:
                hi_s = tl.minimum((tb + 1) * BT, Q)
            if HAS_WINDOW:   # keys with t_loc + KEY_OFF·Q - s_loc < window for some t of this block
                lo = tl.maximum(tb * BT + KEY_OFF * Q - window + 1, 0) // BS * BS
            for s0 in range(lo, hi_s, BS):
                s_loc = s0 + tl.arange(0, BS)
                s = kc * Q + s_loc
                s_ok = (s_loc < Q) & (s < l)
                bs = tl.load(b_ptr + bi * sbb + gi * sbg + s[None, :] * sbl + offs_n[:, None] * sbn,
                             mask=n_ok[:, None] & s_ok[None, :], other=0.0)          # (BN, BS)
                cum_s = tl.load(cum_ptr + bh * L + s, mask=s_loc < Q, other=0.0)
                u_s = tl.load(u_ptr + bh * L + s, mask=s_loc < Q, other=0.0)
                keep = s_ok[None, :] & t_ok[:, None]
                if KEY_OFF == 0:
                    keep &= s_loc[None, :] <= t_loc[:, None]
                if HAS_WINDOW:
                    keep &= (t_loc[:, None] + KEY_OFF * Q - s_loc[None, :]) < window
                if HAS_DOC:
                    doc_s = tl.load(doc_ptr + bi * L + s, mask=s_loc < Q, other=-2)
                    keep &= doc_t[:, None] == doc_s[None, :]
                # masked entries go to exp(-inf) = 0 before the exp: s > t would overflow
                dec = tl.exp(tl.where(keep, cum_t[:, None] - cum_s[None, :], float("-inf")))
                sc = tl.dot(ct, bs, input_precision=PREC) * dec * u_s[None, :]
                xs = tl.load(x_ptr + bi * sxb + hi * sxh + s[:, None] * sxl + offs_p[None, :] * sxp,
                             mask=s_ok[:, None] & p_ok[None, :], other=0.0)
                acc += tl.dot(sc.to(xs.dtype), xs, input_precision=PREC)
    row = bi * l * nheads + hi                                                    # y: (b, l, h, p) contiguous
    tl.store(y_ptr + (row + t[:, None] * nheads) * p + offs_p[None, :], acc, mask=t_ok[:, None] & p_ok[None, :])


def _scan_bwd_query(x_ptr, b_ptr, c_ptr, cum_ptr, u_ptr, doc_ptr, st_ptr, wr_ptr, ex_ptr, dy_ptr,
                    dc_ptr, dwr_ptr, dcq_ptr,
                    l, L, nc, nheads, hpg, p, n, window,
                    sxb, sxl, sxh, sxp, sbb, sbl, sbg, sbn, scb, scl, scg, scn,
                    ssb, ssc, ssh, ssp, ssn, sdb, sdl, sdh, sdp,
                    Q: tl.constexpr, KEY_OFF: tl.constexpr, HAS_INTRA: tl.constexpr, HAS_STATE: tl.constexpr,
                    HAS_DOC: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    PREC: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Per query block: dC_t (per head), dw^R_t, and the query side of dcum (Σ_s dS_ts S_ts)."""
    tb = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    bi, hi = bh // nheads, bh % nheads
    gi = hi // hpg
    t_loc = tb * BT + tl.arange(0, BT)
    t = c * Q + t_loc
    t_ok = (t_loc < Q) & (t < l)
    offs_p, offs_n = tl.arange(0, BP), tl.arange(0, BN)
    p_ok, n_ok = offs_p < p, offs_n < n
    ct = tl.load(c_ptr + bi * scb + gi * scg + t[:, None] * scl + offs_n[None, :] * scn,
                 mask=t_ok[:, None] & n_ok[None, :], other=0.0)
    dyt = tl.load(dy_ptr + bi * sdb + hi * sdh + t[:, None] * sdl + offs_p[None, :] * sdp,
                  mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(x_ptr.dtype.element_ty)
    dc = tl.zeros((BT, BN), dtype=tl.float32)
    if HAS_STATE:
        hc = tl.load(st_ptr + bi * ssb + c * ssc + hi * ssh + offs_p[:, None] * ssp + offs_n[None, :] * ssn,
                     mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        dyh = tl.dot(dyt, hc.to(dyt.dtype), input_precision=PREC)                 # (BT, BN)
        wr = tl.load(wr_ptr + bh * L + t, mask=t_loc < Q, other=0.0)
        dc += dyh * wr[:, None]
        tl.store(dwr_ptr + bh * L + t, tl.sum(dyh * ct.to(tl.float32), axis=1), mask=t_loc < Q)
    if HAS_INTRA:
        dcq = tl.zeros((BT,), dtype=tl.float32)
        if c >= KEY_OFF:
            kc = c - KEY_OFF
            cum_t = tl.load(cum_ptr + bh * L + t, mask=t_loc < Q, other=0.0)
            if HAS_EXTRA:
                cum_t += tl.load(ex_ptr + bh * nc + c)
            if HAS_DOC:
                doc_t = tl.load(doc_ptr + bi * L + t, mask=t_loc < Q, other=-1)
            lo = 0
            hi_s = Q
            if KEY_OFF == 0:
                hi_s = tl.minimum((tb + 1) * BT, Q)
            if HAS_WINDOW:
                lo = tl.maximum(tb * BT + KEY_OFF * Q - window + 1, 0) // BS * BS
            for s0 in range(lo, hi_s, BS):
                s_loc = s0 + tl.arange(0, BS)
                s = kc * Q + s_loc
                s_ok = (s_loc < Q) & (s < l)
                bs = tl.load(b_ptr + bi * sbb + gi * sbg + s[:, None] * sbl + offs_n[None, :] * sbn,
                             mask=s_ok[:, None] & n_ok[None, :], other=0.0)          # (BS, BN)
                xs = tl.load(x_ptr + bi * sxb + hi * sxh + s[:, None] * sxl + offs_p[None, :] * sxp,
                             mask=s_ok[:, None] & p_ok[None, :], other=0.0)          # (BS, BP)
                cum_s = tl.load(cum_ptr + bh * L + s, mask=s_loc < Q, other=0.0)
                u_s = tl.load(u_ptr + bh * L + s, mask=s_loc < Q, other=0.0)
                keep = s_ok[None, :] & t_ok[:, None]
                if KEY_OFF == 0:
                    keep &= s_loc[None, :] <= t_loc[:, None]
                if HAS_WINDOW:
                    keep &= (t_loc[:, None] + KEY_OFF * Q - s_loc[None, :]) < window
                if HAS_DOC:
                    doc_s = tl.load(doc_ptr + bi * L + s, mask=s_loc < Q, other=-2)
                    keep &= doc_t[:, None] == doc_s[None, :]
                dec = tl.exp(tl.where(keep, cum_t[:, None] - cum_s[None, :], float("-inf"))) * u_s[None, :]
                cb = tl.dot(ct, tl.trans(bs), input_precision=PREC)
                ds = tl.dot(dyt, tl.trans(xs).to(dyt.dtype), input_precision=PREC)
                dp = ds * dec
                dc += tl.dot(dp.to(bs.dtype), bs, input_precision=PREC)
                dcq += tl.sum(dp * cb, axis=1)
        tl.store(dcq_ptr + bh * L + t, dcq, mask=t_loc < Q)
    row = bi * l * nheads + hi
    tl.store(dc_ptr + (row + t[:, None] * nheads) * n + offs_n[None, :], dc, mask=t_ok[:, None] & n_ok[None, :])


def _scan_bwd_key(x_ptr, b_ptr, c_ptr, cum_ptr, u_ptr, doc_ptr, ex_ptr, dy_ptr,
                  dx_ptr, db_ptr, du_ptr, dck_ptr,
                  l, L, nc, nheads, hpg, p, n, window,
                  sxb, sxl, sxh, sxp, sbb, sbl, sbg, sbn, scb, scl, scg, scn,
                  sdb, sdl, sdh, sdp,
                  Q: tl.constexpr, KEY_OFF: tl.constexpr,
                  HAS_DOC: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  PREC: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Per key block (chunk kc, queries in chunk kc + KEY_OFF): dx_s, dB_s (per head), du_s and the key
    side of dcum (-Σ_t dS_ts S_ts). Blocks with no query chunk write zeros."""
    sb = tl.program_id(0)
    kc = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    bi, hi = bh // nheads, bh % nheads
    gi = hi // hpg
    s_loc = sb * BS + tl.arange(0, BS)
    s = kc * Q + s_loc
    s_ok = (s_loc < Q) & (s < l)
    offs_p, offs_n = tl.arange(0, BP), tl.arange(0, BN)
    p_ok, n_ok = offs_p < p, offs_n < n
    bs = tl.load(b_ptr + bi * sbb + gi * sbg + s[:, None] * sbl + offs_n[None, :] * sbn,
                 mask=s_ok[:, None] & n_ok[None, :], other=0.0)                      # (BS, BN)
    xs = tl.load(x_ptr + bi * sxb + hi * sxh + s[:, None] * sxl + offs_p[None, :] * sxp,
                 mask=s_ok[:, None] & p_ok[None, :], other=0.0)                      # (BS, BP)
    cum_s = tl.load(cum_ptr + bh * L + s, mask=s_loc < Q, other=0.0)
    u_s = tl.load(u_ptr + bh * L + s, mask=s_loc < Q, other=0.0)
    dx = tl.zeros((BS, BP), dtype=tl.float32)
    db = tl.zeros((BS, BN), dtype=tl.float32)
    du = tl.zeros((BS,), dtype=tl.float32)
    dck = tl.zeros((BS,), dtype=tl.float32)
    qc = kc + KEY_OFF
    if qc < nc:
        if HAS_DOC:
            doc_s = tl.load(doc_ptr + bi * L + s, mask=s_loc < Q, other=-2)
        extra = 0.0
        if HAS_EXTRA:
            extra = tl.load(ex_ptr + bh * nc + qc)
        lo = 0
        hi_t = Q
        if KEY_OFF == 0:
            lo = sb * BS // BT * BT
        if HAS_WINDOW:   # queries with t_loc < s_loc + window - KEY_OFF·Q for some s of this block
            hi_t = tl.minimum(tl.maximum(sb * BS + BS - 1 + window - KEY_OFF * Q, 0), Q)
        for t0 in range(lo, hi_t, BT):
            t_loc = t0 + tl.arange(0, BT)
            t = qc * Q + t_loc
            t_ok = (t_loc < Q) & (t < l)
            ct = tl.load(c_ptr + bi * scb + gi * scg + t[:, None] * scl + offs_n[None, :] * scn,
                         mask=t_ok[:, None] & n_ok[None, :], other=0.0)              # (BT, BN)
            dyt = tl.load(dy_ptr + bi * sdb + hi * sdh + t[:, None] * sdl + offs_p[None, :] * sdp,
                          mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(xs.dtype)  # (BT, BP)
            cum_t = tl.load(cum_ptr + bh * L + t, mask=t_loc < Q, other=0.0) + extra
            keep = s_ok[:, None] & t_ok[None, :]
            if KEY_OFF == 0:
                keep &= s_loc[:, None] <= t_loc[None, :]
            if HAS_WINDOW:
                keep &= (t_loc[None, :] + KEY_OFF * Q - s_loc[:, None]) < window
            if HAS_DOC:
                doc_t = tl.load(doc_ptr + bi * L + t, mask=t_loc < Q, other=-1)
                keep &= doc_s[:, None] == doc_t[None, :]
            dec = tl.exp(tl.where(keep, cum_t[None, :] - cum_s[:, None], float("-inf")))   # (BS, BT)
            cb = tl.dot(bs, tl.trans(ct), input_precision=PREC)
            ds = tl.dot(xs, tl.trans(dyt), input_precision=PREC)
            sct = cb * dec * u_s[:, None]
            dx += tl.dot(sct.to(dyt.dtype), dyt, input_precision=PREC)
            db += tl.dot((ds * dec * u_s[:, None]).to(ct.dtype), ct, input_precision=PREC)
            gu = ds * cb * dec
            du += tl.sum(gu, axis=1)
            dck -= tl.sum(gu * u_s[:, None], axis=1)
    row = bi * l * nheads + hi
    tl.store(dx_ptr + (row + s[:, None] * nheads) * p + offs_p[None, :], dx, mask=s_ok[:, None] & p_ok[None, :])
    tl.store(db_ptr + (row + s[:, None] * nheads) * n + offs_n[None, :], db, mask=s_ok[:, None] & n_ok[None, :])
    tl.store(du_ptr + bh * L + s, du, mask=s_loc < Q)
    tl.store(dck_ptr + bh * L + s, dck, mask=s_loc < Q)


# ----------------------------------------------------------------------------------------------
# window: F_c = Σ_{d=1..ND} coef[c, d] W_{c-d}, the key chunks wholly inside the window read through
# their written states (a sum of decayed positive terms, never a difference of two states)

def _window_states_fwd(w_ptr, coef_ptr, f_ptr, nc, nheads, pn, ND,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    bi, hi = bh // nheads, bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < pn
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for d in range(1, ND + 1):
        if c >= d:
            k = tl.load(coef_ptr + (bh * nc + c) * ND + d - 1)
            acc += k * tl.load(w_ptr + ((bi * nc + c - d) * nheads + hi) * pn + offs, mask=ok, other=0.0)
    tl.store(f_ptr + ((bi * nc + c) * nheads + hi) * pn + offs, acc, mask=ok)


def _window_states_bwd(w_ptr, coef_ptr, df_ptr, dw_ptr, dcoef_ptr, nc, nheads, pn, ND, nblocks,
                       BLOCK: tl.constexpr):
    """dW_c = Σ_d coef[c+d, d] dF_{c+d}; dcoef[c+d, d] = <dF_{c+d}, W_c> (partial per block)."""
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2).to(tl.int64)
    bi, hi = bh // nheads, bh % nheads
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < pn
    w = tl.load(w_ptr + ((bi * nc + c) * nheads + hi) * pn + offs, mask=ok, other=0.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for d in range(1, ND + 1):
        if c + d < nc:
            df = tl.load(df_ptr + ((bi * nc + c + d) * nheads + hi) * pn + offs, mask=ok, other=0.0)
            k = tl.load(coef_ptr + (bh * nc + c + d) * ND + d - 1)
            acc += k * df
            tl.store(dcoef_ptr + ((bh * nc + c + d) * ND + d - 1) * nblocks + pid, tl.sum(df * w, axis=0))
    tl.store(dw_ptr + ((bi * nc + c) * nheads + hi) * pn + offs, acc, mask=ok)
