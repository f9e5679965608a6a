"""An independent, literal transcription of mamba_ssm's MambaLMHeadModel forward (Mamba2 layers).

It works from a raw mamba_ssm state dict and config.json dict, not from our modules,
so the model's key names, splits and norms are checked against mamba_ssm's own
definitions: Mamba2.forward (non-fused path), RMSNormGated (rms_norm_ref), GatedMLP,
Block and MixerModel.
"""
import math

import torch
import torch.nn.functional as F

from longctx.kernels import ssd_naive

MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1, D_has_hdim=False,
                       rmsnorm=True, norm_before_gate=False, dt_limit=(0.0, math.inf), chunk_size=256)


def rms_norm_ref(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    dtype = x.dtype
    x, weight = x.float(), weight.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    if group_size is None:
        out = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight
    else:
        xg = x.reshape(*x.shape[:-1], -1, group_size)
        out = (xg * torch.rsqrt(xg.square().mean(-1, keepdim=True) + eps)).reshape(x.shape) * weight
    if bias is not None:
        out = out + bias
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(dtype)


def dims(cfg):
    """Mamba2.__init__'s sizes from a MambaConfig dict."""
    ssm = {**MAMBA2_DEFAULTS, **{k: v for k, v in cfg["ssm_cfg"].items() if k != "layer"}}
    d_model = cfg["d_model"]
    d_inner = ssm["expand"] * d_model
    d_ssm = d_inner if ssm["d_ssm"] is None else ssm["d_ssm"]
    return ssm, d_model, d_inner, d_ssm, ssm["ngroups"], ssm["d_state"], ssm["headdim"], d_ssm // ssm["headdim"]


def mamba2_mixer(sd, pre, cfg, u):
    ssm, d_model, d_inner, d_ssm, ng, N, P, H = dims(cfg)
    batch, seqlen, _ = u.shape
    zxbcdt = u @ sd[pre + "in_proj.weight"].T
    A = -torch.exp(sd[pre + "A_log"].float())
    d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * ng * N - H) // 2
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, d_ssm, d_ssm + 2 * ng * N, H], dim=-1)
    w = sd[pre + "conv1d.weight"]
    conv = F.conv1d(xBC.transpose(1, 2), w, sd.get(pre + "conv1d.bias"), padding=w.shape[-1] - 1,
                    groups=w.shape[0])
    xBC = F.silu(conv[..., :seqlen].transpose(1, 2))
    x, B, C = torch.split(xBC, [d_ssm, ng * N, ng * N], dim=-1)
    D = sd[pre + "D"]
    y = ssd_naive(x.reshape(batch, seqlen, H, P), dt, A, B.reshape(batch, seqlen, ng, N),
                  C.reshape(batch, seqlen, ng, N), D=D.reshape(H, P) if ssm["D_has_hdim"] else D,
                  z=None if ssm["rmsnorm"] else z.reshape(batch, seqlen, H, P), dt_bias=sd[pre + "dt_bias"],
                  dt_softplus=True, dt_limit=tuple(ssm["dt_limit"]))
    y = y.reshape(batch, seqlen, d_ssm)
    if ssm["rmsnorm"]:
        y = rms_norm_ref(y, sd[pre + "norm.weight"], z=z, eps=1e-5, group_size=d_ssm // ng,
                         norm_before_gate=ssm["norm_before_gate"])
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return y @ sd[pre + "out_proj.weight"].T


def block_norm(sd, key, x, cfg):
    if cfg.get("rms_norm", True):
        return rms_norm_ref(x, sd[key + ".weight"], eps=1e-5)
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps=1e-5)


def forward(sd, cfg, input_ids):
    """Logits of MambaLMHeadModel for a mamba_ssm state dict (residual_in_fp32 as configured)."""
    hidden = F.embedding(input_ids, sd["backbone.embedding.weight"])
    residual = None
    fp32 = cfg.get("residual_in_fp32", False)
    for i in range(cfg["n_layer"]):
        pre = f"backbone.layers.{i}."
        residual = hidden if residual is None else hidden + residual
        hidden = block_norm(sd, pre + "norm", residual, cfg)
        if fp32:
            residual = residual.float()
        hidden = mamba2_mixer(sd, pre + "mixer.", cfg, hidden)
        if cfg.get("d_intermediate", 0) > 0:
            residual = hidden + residual
            hidden = block_norm(sd, pre + "norm2", residual, cfg)
            y, gate = (hidden @ sd[pre + "mlp.fc1.weight"].T).chunk(2, dim=-1)
            hidden = (y * F.silu(gate)) @ sd[pre + "mlp.fc2.weight"].T
    residual = hidden + residual
    hidden = block_norm(sd, "backbone.norm_f", residual, cfg)
    head = sd.get("lm_head.weight", sd["backbone.embedding.weight"])
    return hidden @ head.T


def random_state_dict(cfg, seed=0):
    """Random weights in the exact mamba_ssm layout, shapes from mamba_ssm's formulas."""
    g = torch.Generator().manual_seed(seed)
    ssm, d_model, d_inner, d_ssm, ng, N, P, H = dims(cfg)
    mult = cfg.get("pad_vocab_size_multiple", 8)
    vocab = (cfg["vocab_size"] + mult - 1) // mult * mult
    conv_dim = d_ssm + 2 * ng * N

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"backbone.embedding.weight": r(vocab, d_model, scale=0.5)}
    for i in range(cfg["n_layer"]):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = 1 + r(d_model, scale=0.1)
        if not cfg.get("rms_norm", True):
            sd[p + "norm.bias"] = r(d_model, scale=0.1)
        sd[p + "mixer.in_proj.weight"] = r(2 * d_inner + 2 * ng * N + H, d_model)
        sd[p + "mixer.conv1d.weight"] = r(conv_dim, 1, ssm["d_conv"], scale=0.5)
        sd[p + "mixer.conv1d.bias"] = r(conv_dim, scale=0.1)
        sd[p + "mixer.dt_bias"] = r(H, scale=0.5) - 2.0
        sd[p + "mixer.A_log"] = torch.log(torch.rand(H, generator=g) * 4 + 1)
        sd[p + "mixer.D"] = 1 + r(d_ssm if ssm["D_has_hdim"] else H, scale=0.3)
        if ssm["rmsnorm"]:
            sd[p + "mixer.norm.weight"] = 1 + r(d_ssm, scale=0.1)
        sd[p + "mixer.out_proj.weight"] = r(d_model, d_inner)
        if cfg.get("d_intermediate", 0) > 0:
            hidden = (cfg["d_intermediate"] + 127) // 128 * 128
            sd[p + "norm2.weight"] = 1 + r(d_model, scale=0.1)
            if not cfg.get("rms_norm", True):
                sd[p + "norm2.bias"] = r(d_model, scale=0.1)
            sd[p + "mlp.fc1.weight"] = r(2 * hidden, d_model)
            sd[p + "mlp.fc2.weight"] = r(d_model, hidden)
    sd["backbone.norm_f.weight"] = 1 + r(d_model, scale=0.1)
    if not cfg.get("rms_norm", True):
        sd["backbone.norm_f.bias"] = r(d_model, scale=0.1)
    if cfg.get("tie_embeddings", True):
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # mamba_ssm saves the tied head too
    else:
        sd["lm_head.weight"] = r(vocab, d_model, scale=0.5)
    return sd
