"""Mamba-2 language model, exactly as mamba_ssm defines it, so published checkpoints load.

Reads top to bottom like the paper:
  embedding -> n_layer x [RMSNorm -> Mamba-2 mixer (+ RMSNorm -> gated MLP)] residual
  -> norm_f -> tied lm_head.
The layers `config.attn_layer_idx` names take an attention mixer instead (`attention.py`, mamba_ssm's MHA):
a hybrid, or with every layer a transformer.

The mixer: in_proj -> [z0, x0 (MLP branch), z, xBC, dt]; causal depthwise conv1d +
SiLU on xBC; split into x, B, C; SSD (kernels.ssd); gated RMSNorm norm(y * silu(z))
with group size d_ssm / ngroups; concat silu(z0) * x0 in front; out_proj.

State-dict keys follow mamba_ssm.models.mixer_seq_simple; `formats` converts the
Hugging Face layout. The mixer takes its two sequence-wide operations, the causal conv
and the scan, from one ops object (`ops.py`): whole sequences in this process, a
`longctx.pipeline.parallel.SequenceParallel` under sequence parallelism (nothing here
knows about process groups), or a decoding cache (`inference.py`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from longctx import kernels

from . import formats
from .attention import ALL_EARLIER_ROWS, AttentionMixer
from .carry import CarriedOps, CarriedStates, LayerCarry
from .config import Mamba2Config
from .inference import LayerCache, Mamba2Cache
from .mitigations import LayerMitigations
from .ops import LOCAL

# ----------------------------------------------------------------------------- norms

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(self.weight.dtype)


class GatedRMSNorm(nn.Module):
    """norm(y * silu(z)) with one RMS per group of `group_size` channels (norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        yf = y.float() * F.silu(z.float())
        groups = yf.unflatten(-1, (-1, self.group_size))
        groups = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)
        return (groups.flatten(-2) * self.weight.float()).to(y.dtype)


def block_norm(config: Mamba2Config) -> nn.Module:
    if config.rms_norm:
        return RMSNorm(config.d_model, eps=config.norm_epsilon)
    return nn.LayerNorm(config.d_model, eps=config.norm_epsilon)


@dataclass
class LMOutput:
    logits: torch.Tensor


# ----------------------------------------------------------------------------- mixer

class Mamba2Mixer(nn.Module):
    local_ops = LOCAL           # what set_sequence_parallel(None) puts back

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.d_ssm, self.nheads, self.headdim = c.ssm_dim, c.nheads, c.headdim
        self.ngroups, self.d_state = c.ngroups, c.d_state
        self.conv_dim = self.d_ssm + 2 * c.ngroups * c.d_state
        d_in_proj = 2 * c.d_inner + 2 * c.ngroups * c.d_state + self.nheads
        self.in_proj = nn.Linear(c.d_model, d_in_proj, bias=c.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=c.d_conv, groups=self.conv_dim,
                                padding=c.d_conv - 1, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.d_ssm if c.D_has_hdim else self.nheads))
        self.dt_bias._no_weight_decay = True
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        if c.rmsnorm:
            self.norm = GatedRMSNorm(self.d_ssm, group_size=self.d_ssm // c.ngroups, eps=1e-5)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)
        self.mitigation: Optional[LayerMitigations] = None   # set by Mamba2LM.set_mitigations
        self.ops = self.local_ops                             # the conv and the scan; set_sequence_parallel swaps them
        self.carry: Optional[LayerCarry] = None               # training from a carried state (set_carried)
        if not self.A_log.is_meta:                            # shapes only (`shapes_only`): no values to draw
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """mamba_ssm's init: dt log-uniform in [dt_min, dt_max] stored as softplus^-1; A uniform in A_init_range."""
        c = self.config
        dt = torch.exp(torch.rand(self.nheads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*c.A_init_range)))
        self.D.fill_(1.0)

    def ssd_arguments(self, offset: int = 0):
        """Per-layer SSD keyword arguments, mitigations included. `offset`: tokens read before
        this call, so state-norm positions count from the start of the sequence."""
        c, m = self.config, self.mitigation
        D = self.D.view(self.nheads, self.headdim) if c.D_has_hdim else self.D
        kw = dict(chunk_size=c.chunk_size, D=D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=c.dt_limit)
        if m is not None:
            kw.update(decay_scale=m.decay_scale, input_scale=m.input_scale, window=m.window or None)
            if m.state_norm_every:
                tau = torch.tensor(m.state_norm_threshold, dtype=torch.float32, device=D.device)
                kw["state_norm"] = kernels.StateNorm(m.state_norm_every, tau, offset=offset)
        return kw

    def forward(self, u, seq_idx=None, cache: Optional[LayerCache] = None):
        """u (b,l,d_model). With `cache`, continues from it and updates it in place."""
        ops = self.ops if cache is None else cache     # whole sequences (here or split over ranks), or decoding
        if self.carry is not None and cache is None:
            ops = CarriedOps(ops, self.carry)
        zxbcdt = self.in_proj(u)
        d_mlp = (zxbcdt.shape[-1] - 2 * self.d_ssm - 2 * self.ngroups * self.d_state - self.nheads) // 2
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

        xBC = F.silu(ops.conv(xBC, self.conv1d.weight, self.conv1d.bias, seq_idx))
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)

        A = -torch.exp(self.A_log.float())
        if self.mitigation is not None and self.mitigation.a_scale is not None:   # before any path: decoding too
            A = A * torch.as_tensor(self.mitigation.a_scale, dtype=A.dtype, device=A.device)
        gate_in_scan = not self.config.rmsnorm
        y = ops.scan(x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
                     B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
                     z.unflatten(-1, (self.nheads, self.headdim)) if gate_in_scan else None, seq_idx,
                     self.ssd_arguments)
        y = y.flatten(-2)
        if not gate_in_scan:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def init_cache(self, batch: int, device=None, dtype=None) -> LayerCache:
        w = self.in_proj.weight
        return LayerCache.zeros(batch, self.config.d_conv, self.conv_dim, (self.nheads, self.headdim, self.d_state),
                                device=device or w.device, dtype=dtype or w.dtype)


class GatedMLP(nn.Module):
    """fc2(y * silu(gate)) with [y, gate] = fc1(x); hidden rounded up to a multiple of 128 as in mamba_ssm."""

    def __init__(self, d_model: int, hidden: int, multiple_of: int = 128):
        super().__init__()
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


def compiler_failure(device) -> Optional[str]:
    """None if torch.compile builds and runs a forward and a backward on `device`, else the error's first line."""
    try:
        x = torch.ones(8, device=device, requires_grad=True)
        torch.compile(lambda t: (t * 2).sin().sum(), dynamic=False)(x).backward()
        return None
    except Exception as e:      # any failure of the toolchain: the caller runs eagerly and says why
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


class Block(nn.Module):
    """Pre-norm residual block; the residual stream is carried separately (fp32 if configured)."""

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = block_norm(config)
        mixer = AttentionMixer if layer_idx in config.attention_layers else Mamba2Mixer
        self.mixer = mixer(config, layer_idx)
        self.compiled_forward = None          # train.compile: set by compile_training_forward
        if config.d_intermediate > 0:
            self.norm2 = block_norm(config)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate)
        else:
            self.mlp = None

    def _residual(self, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return residual.float() if self.residual_in_fp32 else residual

    def compile_training_forward(self):
        """Run the training forward (no cache) through torch.compile; evaluation and decoding stay eager (their
        many prompt lengths and the step path would each cost a compile). A frame that fails to compile runs
        eagerly: torch's own fallback (dynamo's suppress_errors, set by Mamba2LM.compile_blocks), which also
        covers graphs after a break."""
        # static shapes: a stage keeps one shape, so each stage pays one compile; automatic dynamic shapes at
        # the second stage made every step slower than eager (the chunk loops over a symbolic length)
        self.compiled_forward = torch.compile(self._forward, dynamic=False)

    def forward(self, hidden, residual=None, seq_idx=None, cache=None):
        if cache is None and self.training and self.compiled_forward is not None:
            return self.compiled_forward(hidden, residual, seq_idx)
        return self._forward(hidden, residual, seq_idx, cache)

    def _forward(self, hidden, residual=None, seq_idx=None, cache=None):
        residual = self._residual(hidden, residual)
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)), seq_idx=seq_idx, cache=cache)
        if self.mlp is not None:
            residual = self._residual(hidden, residual)
            hidden = self.mlp(self.norm2(residual.to(self.norm2.weight.dtype)))
        return hidden, residual


# ----------------------------------------------------------------------------- language model

class _SkipLibraryInitialisation(TorchFunctionMode):
    """torch.nn's modules initialise themselves in their constructors (torch.nn.init): skipped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def shapes_only(config: Mamba2Config) -> "Mamba2LM":
    """The model `config` describes on the meta device: its modules and parameter shapes, no memory, nothing
    initialised. On meta an initialisation computes nothing, yet several of its ops run as torch's Python
    reference code, which imports torch._dynamo: ~1.5 s in a process that wants only shapes (the launcher)."""
    with torch.device("meta"), _SkipLibraryInitialisation():
        return Mamba2LM(config)


def parameter_count(config: Mamba2Config) -> Dict[str, int]:
    """Parameters of the model `config` describes, counted on the meta device (`shapes_only`): `total` (a tied
    head once), and the `mamba` and `attention` mixers' (each kind's layers together)."""
    model = shapes_only(config)
    by_kind = {"mamba": 0, "attention": 0}
    for i, layer in enumerate(model.backbone.layers):
        kind = "attention" if i in config.attention_layers else "mamba"
        by_kind[kind] += sum(p.numel() for p in layer.mixer.parameters())
    return {"total": sum(p.numel() for p in model.parameters()), **by_kind}


class Mamba2Backbone(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = block_norm(config)
        self.gradient_checkpointing = False

    def forward(self, input_ids, seq_idx=None, cache: Optional[Mamba2Cache] = None):
        hidden, residual = self.embedding(input_ids), None
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and layer_cache is None:
                hidden, residual = torch.utils.checkpoint.checkpoint(
                    _with_carry, layer, layer.mixer.carry, hidden, residual, seq_idx, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, seq_idx=seq_idx, cache=layer_cache)
        residual = hidden if residual is None else hidden + residual
        return self.norm_f(residual.to(self.norm_f.weight.dtype))


def _with_carry(layer, carry, hidden, residual, seq_idx):
    """A block's forward from the carried state it had when first run: a checkpointed block is run again in
    backward, when the model may already hold another carried state (or none)."""
    now, layer.mixer.carry = layer.mixer.carry, carry
    try:
        return layer(hidden, residual, seq_idx=seq_idx)
    finally:
        layer.mixer.carry = now


class Mamba2LM(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.config = config.validate()
        self.sequence_parallel = None
        self.backbone = Mamba2Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if not self.lm_head.weight.is_meta:                   # shapes only (`shapes_only`): no values to draw
            self._initialise()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def _initialise(self):
        self.apply(self._init_weights)
        self._rescale_residual_outputs()
        for mixer in self.mamba_mixers():
            mixer.reset_ssm_parameters()

    @staticmethod
    def _init_weights(module, initializer_range: float = 0.02):
        """mamba_ssm's _init_weights: N(0, 0.02) embeddings, zero linear biases."""
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=initializer_range)

    @torch.no_grad()
    def _rescale_residual_outputs(self):
        """out_proj and fc2 write into the residual stream: kaiming-uniform / sqrt(residuals * n_layer)."""
        per_layer = 2 if self.config.d_intermediate > 0 else 1
        for layer in self.backbone.layers:
            for linear in (layer.mixer.out_proj, None if layer.mlp is None else layer.mlp.fc2):
                if linear is not None:
                    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                    linear.weight /= math.sqrt(per_layer * self.config.n_layer)

    def mamba_mixers(self) -> List[Mamba2Mixer]:
        """The Mamba layers' mixers (not the attention layers'), in layer order."""
        return [layer.mixer for layer in self.backbone.layers if isinstance(layer.mixer, Mamba2Mixer)]

    # -- state-collapse mitigations (mitigations.py) ----------------------------
    @property
    def mitigations(self) -> Optional[List[LayerMitigations]]:
        layers = [layer.mixer.mitigation for layer in self.backbone.layers]
        return None if all(m is None for m in layers) else layers

    def set_mitigations(self, layers: Optional[List[LayerMitigations]]):
        """One LayerMitigations per layer (see mitigations.resolve), or None for the plain model."""
        if layers is not None and len(layers) != len(self.backbone.layers):
            raise ValueError(f"mitigations for {len(layers)} layers given, the model has {len(self.backbone.layers)}")
        for i, layer in enumerate(self.backbone.layers):
            m = None if layers is None else layers[i]
            if i in self.config.attention_layers:
                if m is not None and m.active:
                    raise ValueError(f"layer {i} is an attention layer: mitigations apply to the Mamba layers only "
                                     "(decay_scale, input_scale, a_scale, state_norm and window act on the scan)")
                continue
            if m is not None and m.state_norm_every and len(m.state_norm_threshold or []) != self.config.nheads:
                raise ValueError(f"layer {i}: state norm needs {self.config.nheads} thresholds (one per head)")
            layer.mixer.mitigation = m if (m is not None and m.active) else None

    # -- sequence parallelism (longctx.pipeline.parallel) ----------------------------------------
    def set_sequence_parallel(self, sp):
        """A pipeline.parallel.SequenceParallel: forward then takes this rank's contiguous segment
        of each sequence and returns its logits; None: whole sequences (decoding, evaluation).
        It is every layer's ops: a Mamba layer's conv and scan (state passing), an attention layer's conv, positions,
        documents and keys (those of the earlier ranks gathered). Under compiled blocks (compile_blocks, before or
        after this) its collectives run eagerly."""
        self.sequence_parallel = sp
        if sp is not None and any(layer.compiled_forward is not None for layer in self.backbone.layers):
            sp.keep_collectives_eager()
        for layer in self.backbone.layers:
            layer.mixer.ops = layer.mixer.local_ops if sp is None else sp

    # -- carried state (carry.py) ------------------------------------------------------------------
    def set_carried(self, layers: Optional[List[LayerCarry]]):
        """One LayerCarry per layer (CarriedStates.entering): each forward then starts from it and records
        the final state (`carried_final`); None: every forward starts from zeros."""
        if layers is not None and self.config.attn_layer_idx:
            raise ValueError(f"a carried state is not supported for models with attention layers (model.attn_layer_idx "
                             f"{list(self.config.attn_layer_idx)}): an attention layer has no fixed-size state to "
                             "carry (it would have to carry every key and value read); only the Mamba layers have one")
        if layers is not None and len(layers) != len(self.backbone.layers):
            raise ValueError(f"carried states for {len(layers)} layers given, "
                             f"the model has {len(self.backbone.layers)}")
        for i, layer in enumerate(self.backbone.layers):
            layer.mixer.carry = None if layers is None else layers[i]

    def enter_carried(self, carried: Optional[CarriedStates], rows: Optional[torch.Tensor] = None) -> List[LayerCarry]:
        """Each forward from now starts from `carried` (its `entering(rows)`), or from zeros where None; returns
        the layers' entering states, so the same can be entered again (a retaken step)."""
        layers = [LayerCarry() for _ in self.backbone.layers] if carried is None else carried.entering(rows)
        self.set_carried(layers)
        return layers

    def carried_final(self) -> CarriedStates:
        """The final state of every layer after the last forward under `set_carried`: the sequence's end, so under
        sequence parallelism the last rank's, on every rank of the group (a collective)."""
        carries = [layer.mixer.carry for layer in self.backbone.layers]
        if any(c is None or c.final_state is None for c in carries):
            raise RuntimeError("no carried state recorded: call set_carried(...) before the forward")
        final = CarriedStates.of(carries)
        return final if self.sequence_parallel is None else final.from_last_rank(self.sequence_parallel)

    def halo_width(self) -> int:
        """Rows before a segment that some layer reads: the conv's d_conv-1, a window's r-1; with attention layers
        every row (their queries read every earlier rank's keys, and so those keys' documents)."""
        if self.config.attn_layer_idx:
            return ALL_EARLIER_ROWS
        windows = [m.window for m in (self.mitigations or []) if m is not None and m.window]
        return max([self.config.d_conv - 1] + [w - 1 for w in windows])

    def enable_gradient_checkpointing(self, on: bool = True):
        self.backbone.gradient_checkpointing = on

    def compile_blocks(self) -> Optional[str]:
        """`train.compile`: each block's training forward through torch.compile (Block.compile_training_forward).
        Returns None, or why the blocks stay eager: a toolchain that cannot build kernels fails only at the first
        backward (compiled lazily, past torch's forward fallback), so it is tried first on a small function."""
        reason = compiler_failure(self.lm_head.weight.device)
        if reason is None:
            import torch._dynamo
            torch._dynamo.config.suppress_errors = True       # one process-wide switch, set once
            if self.sequence_parallel is not None:             # one set after this: set_sequence_parallel asks it
                self.sequence_parallel.keep_collectives_eager()
            for layer in self.backbone.layers:
                layer.compile_training_forward()
        return reason

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids, seq_idx=None, cache: Optional[Mamba2Cache] = None, num_last_tokens: int = 0):
        """Logits for every position (or the last `num_last_tokens`). With `cache`, the call
        continues from it and advances it: chunked prefill and decoding share this path."""
        if self.sequence_parallel is not None:
            if cache is not None:
                raise ValueError("a decoding cache cannot be used under sequence parallelism: "
                                 "call set_sequence_parallel(None) first")
            self.sequence_parallel.begin(seq_idx, self.halo_width())
        hidden = self.backbone(input_ids, seq_idx=seq_idx, cache=cache)
        if cache is not None:
            cache.seqlen += input_ids.shape[1]
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return LMOutput(logits=self.lm_head(hidden))

    # -- recurrent inference --------------------------------------------------------------
    def init_cache(self, batch: int, device=None, dtype=None) -> Mamba2Cache:
        """Every layer's empty decoding state: a Mamba layer's fixed-size state, an attention layer's key/value
        cache (which grows with the tokens read)."""
        return Mamba2Cache(layers=[layer.mixer.init_cache(batch, device, dtype) for layer in self.backbone.layers])

    @torch.no_grad()
    def step(self, token_ids, cache: Mamba2Cache):
        """One token per batch row (b,) or (b,1) -> logits (b, vocab); advances the cache."""
        if token_ids.dim() == 1:
            token_ids = token_ids[:, None]
        return self.forward(token_ids, cache=cache).logits[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids, cache: Mamba2Cache, chunk_len: int = 4096):
        """Read a prompt of any length in chunks; memory is bounded by chunk_len, not the prompt.
        Returns the logits of the last position (b, vocab)."""
        if input_ids.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        logits = None
        for start in range(0, input_ids.shape[1], chunk_len):
            logits = self.forward(input_ids[:, start:start + chunk_len], cache=cache, num_last_tokens=1).logits
        return logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, chunk_len: int = 4096, eos_id: Optional[int] = None):
        """Greedy decoding with the recurrent state (and the attention layers' key/value caches). Returns the new
        tokens (b, <= max_new_tokens)."""
        cache = self.init_cache(input_ids.shape[0])
        logits = self.prefill(input_ids, cache, chunk_len=chunk_len)
        out, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            token = logits[:, : self.config.vocab_size].argmax(-1)
            out.append(token)
            if eos_id is not None:
                done |= token == eos_id
                if bool(done.all()):
                    break
            logits = self.step(token, cache)
        return torch.stack(out, dim=1) if out else input_ids.new_zeros(input_ids.shape[0], 0)

    # -- checkpoints (formats live in formats.py) -------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Mamba2LM":
        return formats.load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, format: str = "mamba_ssm", safe_serialization: Optional[bool] = None):
        formats.save_pretrained(self, path, format=format, safe_serialization=safe_serialization)
