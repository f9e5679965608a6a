"""`longctx calibrate CKPT --length L --data PREPARED --param decay|A [--per-head] --out DIR`.

One scale per layer (or per layer x head), fitted to minimize the held-out loss of sequences of L tokens read
without state resets (the collapse setting): on the decay (MambaExtend's idea, our decay_scale λ in (0, 1]) or on
A (Mamba Modulation's, a_scale s > 0: a_t = exp(s·Δ_t·A)). Decision: the fit is by gradient on the scales alone,
the model frozen: Adam on an unconstrained parameter (λ = exp(-w²), s = exp(w)), starting at the identity, on
`samples` held-out sequences in mini-batches; the loss is differentiable in the scales through the scan, and a
few dozen steps on 16 sequences suffice for a handful of numbers (zeroth-order search would need as many
forwards per step as there are scales). A fitted scale multiplies the model's own (a model calibrated twice keeps
both fits; the decay's product stays in (0, 1]). The loss is reported before (the model as loaded, its own
scales included) and after (the model as saved) on the next `samples` sequences of the held-out stream, which
the fit never reads: an out-of-sample figure. The output is a model directory (mamba_ssm layout,
longctx_mitigations.json beside it) that loads with its scales; they apply in the parallel forward, chunked
prefill and recurrent decoding alike (Mamba2Mixer.forward scales A before choosing the path; decay_scale goes
to every scan), and calibration.json records the fit.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from longctx.data.splits import heldout_of
from longctx.data.stream import DocumentSource, PackedStream

from ..model.load import load_any
from ..model.mitigations import LayerMitigations
from ..training.loss import lm_loss
from .run import tokenizer_for

PARAMS = {"decay": "decay_scale", "A": "a_scale"}
# Where the reported losses come from: never the sequences the scales were fitted to.
SPLIT = "on {n} held-out sequences not fitted on (the {n} after the fit's {n} in the held-out stream)"


def _scales(param: str, w: torch.Tensor) -> torch.Tensor:
    """λ = exp(-w²) in (0, 1]; s = exp(w) > 0. Adam moves w by about lr a step whatever the gradient's size,
    so these maps make a step a similar change of log λ (or log s) near the identity as far from it."""
    return torch.exp(-w.square()) if param == "decay" else torch.exp(w)


def _identity(param: str, shape) -> torch.Tensor:
    """w next to no change: λ = exp(-0.001) (w = 0 would be a stationary point), s = 1."""
    return torch.full(shape, math.sqrt(1e-3) if param == "decay" else 0.0)


def _with_scale(base, i: int, param: str, scale: torch.Tensor) -> LayerMitigations:
    """Layer i's mitigations as the model came (`base`: model.mitigations, or None) with `param`'s scale
    multiplied by `scale` (nheads values): a model calibrated before keeps that calibration's effect, and the
    fit looks for the change on top of it."""
    m = base[i] if base is not None and base[i] is not None else LayerMitigations()
    own = getattr(m, PARAMS[param])
    return replace(m, **{PARAMS[param]: scale if own is None else scale * scale.new_tensor(own)})


def _install(model, base, param: str, scales: torch.Tensor) -> None:
    """Each Mamba layer's scan gets its scales (tensors: the loss is differentiable in them) on top of `base`;
    an attention layer has no scan (its row of scales gets no gradient and stays the identity)."""
    for i, layer in enumerate(model.backbone.layers):
        if i not in model.config.attention_layers:
            layer.mixer.mitigation = _with_scale(base, i, param, scales[i].expand(model.config.nheads))


def _fit_and_test_rows(stream, samples: int, length: int, device):
    """The next 2 x `samples` sequences of the held-out stream: the first half to fit on, the second to report
    on. Read one after the other within one epoch of the split, they share no token; a split too small for
    both is an error (its second epoch would read the fit's documents again)."""
    rows = stream.next_batch(2 * samples, length)
    if stream.epoch > 0:
        raise ValueError(f"--data's held-out split holds fewer than 2 x --samples = {2 * samples} sequences of "
                         f"{length} tokens (half to fit on, half to report on): the report would repeat the fit's "
                         "documents. Lower --samples or --length, or prepare with a larger "
                         "data.prepare.heldout_fraction")
    ids, labels = torch.as_tensor(rows.input_ids, device=device), torch.as_tensor(rows.labels, device=device)
    return (ids[:samples], labels[:samples]), (ids[samples:], labels[samples:])


def calibrate(checkpoint, *, length: int, data: str, out, param: str = "decay", per_head: bool = False,
              samples: int = 16, batch: int = 4, steps: int = 40, lr: float = 0.05, seed: int = 0,
              tokenizer: Optional[str] = None, log=print) -> dict:
    if param not in PARAMS:
        raise ValueError(f"--param must be one of {', '.join(PARAMS)}, got {param!r}")
    if samples < 1 or batch < 1 or steps < 1:
        raise ValueError("--samples, --batch and --steps must be >= 1")
    source, out = Path(checkpoint), Path(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_any(source).to(device).float().eval()
    if not model.mamba_mixers():
        raise ValueError(f"{source}: every layer is attention (model.attn_layer_idx), and the scales calibrate fits "
                         "act on the Mamba layers' scans only")
    for p in model.parameters():
        p.requires_grad_(False)
    tok = tokenizer_for(source, tokenizer, model.config.vocab_size)
    stream = PackedStream(DocumentSource(heldout_of(data), str(out / ".cache")), tok.eos_id, seed=seed)
    (ids, labels), (test_ids, test_labels) = _fit_and_test_rows(stream, samples, length, device)
    base = model.mitigations
    heads = model.config.nheads if per_head else 1
    w = _identity(param, (model.config.n_layer, heads)).to(device).requires_grad_()
    opt = torch.optim.Adam([w], lr=lr)

    def loss_at(scales, start, stop):
        _install(model, base, param, scales)
        return lm_loss(model(ids[start:stop]).logits, labels[start:stop])   # no seq_idx: no state resets

    def test_loss():
        """The installed model's mean loss on the report's sequences (not the fit's)."""
        with torch.no_grad():
            return sum(float(lm_loss(model(test_ids[s:s + batch]).logits, test_labels[s:s + batch]))
                       * len(test_ids[s:s + batch]) for s in range(0, samples, batch)) / samples

    model.set_mitigations(base)
    before = test_loss()                            # the model as loaded, its own scales included
    t0, history = time.perf_counter(), []
    for step in range(steps):
        start = (step * batch) % samples
        loss = loss_at(_scales(param, w), start, start + batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            log(f"calibrate: step {step + 1}/{steps}  fit loss {history[-1]:.4f}  {PARAMS[param]} x "
                f"{[round(v, 4) for v in _scales(param, w).detach().mean(1).tolist()]}")
    scales = _scales(param, w).detach()
    fitted = [LayerMitigations() if i in model.config.attention_layers else
              _with_scale(base, i, param, scales[i].expand(model.config.nheads)) for i in range(model.config.n_layer)]
    key = PARAMS[param]
    fitted = [m if getattr(m, key) is None else replace(m, **{key: getattr(m, key).tolist()}) for m in fitted]
    model.set_mitigations(fitted)
    after = test_loss()                             # the model as saved
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    record = dict(checkpoint=str(source), param=param, key=PARAMS[param], per_head=per_head, length=length,
                  data=heldout_of(data), samples=samples, batch=batch, steps=steps, lr=lr, seed=seed,
                  split=SPLIT.format(n=samples), heldout_loss_before=before, heldout_loss_after=after,
                  seconds=round(time.perf_counter() - t0, 1), loss_history=history,
                  scales=scales.tolist(),                  # the fitted factors
                  layers=[asdict(m) for m in fitted])      # the model's scales now: its own x the factors
    (out / "calibration.json").write_text(json.dumps(record, indent=1))
    log(f"calibrate: held-out loss at {length} tokens, {SPLIT.format(n=samples)}: {before:.4f} as loaded -> "
        f"{after:.4f} calibrated; wrote {out}")
    return record
