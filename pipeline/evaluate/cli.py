"""`longctx eval passkey|length|states CKPT`: any checkpoint (ours, mamba_ssm or Hugging Face)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..export import find_checkpoint, load_any
from ..mitigations import MitigationsConfig, calibrate_state_norm, merge_overrides, resolve
from .passkey import build_prompt
from .run import comparison_table, run_eval, tokenizer_for

DEFAULT_LENGTHS = {"passkey": [1024, 4096], "length": [16384], "states": [16384]}


def _floats(text, cast=float):
    return [cast(v) for v in text.split(",") if v.strip()]


def training_length(source: Path):
    """The sequence length the checkpoint was trained at (our checkpoints), else None."""
    found = find_checkpoint(source)
    if found is None:
        return None
    root, tag = found
    return json.loads((root / tag / "trainer_state.json").read_text()).get("seq_len")


def eval_command(args) -> int:
    source = Path(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_any(source).to(device).eval()
    tok = tokenizer_for(source, args.tokenizer, model.config.padded_vocab_size)
    train_length = training_length(source)
    lengths = _floats(args.lengths, int) if args.lengths else DEFAULT_LENGTHS[args.kind]
    depths = _floats(args.depths) if args.depths else [0.0, 0.5, 1.0]

    variants = None
    if args.mitigations or args.compare:
        overrides = OmegaConf.to_container(OmegaConf.from_dotlist(list(args.mitigations)))
        mit = merge_overrides(MitigationsConfig(), overrides, "--mitigations")
        calibrated = None
        if mit.state_norm.every and not mit.state_norm.thresholds:
            L = args.calibration_length or train_length or 2048
            prompt = torch.as_tensor(build_prompt(tok, L, 0.5, "12345")[None], device=device)
            calibrated = calibrate_state_norm(model, prompt, mit.state_norm.multiplier, chunk_len=args.prefill_chunk)
        layers = resolve(mit, model.config.n_layer, model.config.nheads, calibrated=calibrated)
        variants = {"with mitigations": layers}
        if args.compare:
            variants = {"without": None, "with mitigations": layers}
    out = Path(args.out or f"eval-{args.kind}")
    results = run_eval(args.kind, model, tok, out, lengths=lengths, depths=depths,
                       samples=args.samples or 2, seed=args.seed, prefill_chunk=args.prefill_chunk,
                       buckets=args.buckets, margin=args.margin, min_position=args.min_position,
                       train_length=train_length,
                       variants=variants, stream=_stream(args, tok))
    print(comparison_table(args.kind, results))
    print(f"wrote {out}")
    return 0


def _stream(args, tok):
    if not args.data or args.kind == "passkey":
        return None
    from data.stream import DocumentSource, PackedStream
    return PackedStream(DocumentSource(args.data, str(Path(args.out or ".") / ".cache")), tok.eos_id, seed=args.seed)
