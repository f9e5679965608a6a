"""Evaluate any checkpoint (ours, mamba_ssm or Hugging Face): what `longctx eval passkey|niah|length|states CKPT`
runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf

from longctx.data.splits import heldout_of
from longctx.data.stream import DocumentSource, PackedStream

from ..mitigations import MitigationsConfig, merge_overrides, on_top, resolve
from ..model.attention import with_rotary_scaling
from ..model.load import find_checkpoint, load_any
from ..model.mitigations import calibrate_state_norm
from .niah import TASKS as NIAH_TASKS
from .niah import check_tasks
from .passkey import build_prompt
from .run import KINDS, comparison_table, run_eval, tokenizer_for
from .variants import parse_variants

DEFAULT_LENGTHS = {"passkey": [1024, 4096], "niah": [1024, 4096], "length": [16384], "states": [16384]}


def training_length(source: Path):
    """The sequence length the checkpoint was trained at (our checkpoints), else None."""
    found = find_checkpoint(source)
    if found is None:
        return None
    root, tag = found
    return json.loads((root / tag / "trainer_state.json").read_text()).get("seq_len")


def evaluate_checkpoint(kind: str, checkpoint, *, lengths: Optional[Sequence[int]] = None,
                        depths: Optional[Sequence[float]] = None, samples: int = 2, out=None,
                        tokenizer: Optional[str] = None, mitigations: Sequence[str] = (), compare: bool = False,
                        data: Optional[str] = None, buckets: int = 16, margin: float = 0.5, min_position: int = 64,
                        prefill_chunk: int = 4096, calibration_length: Optional[int] = None, seed: int = 0,
                        variant_specs: Sequence[str] = (), tasks: Sequence[str] = (), sequences: int = 1) -> dict:
    """One evaluation (passkey | niah | length | states) of any checkpoint (niah: `tasks`, by default every
    one; its depths spread evenly over the samples; length: `sequences` consecutive rows of held-out text, their
    loss averaged position by position); with `mitigations` (KEY=VAL, the
    mitigations section's keys) the model runs with them, with `compare` also as loaded; `variant_specs`
    (NAME=KEY=VAL[,...], variants.py) name any number of variants side by side instead. Mitigations go on top
    of the model's own (saved with it, or its training stage's): a key given replaces the model's value for
    that key, the others keep theirs. Writes its files into `out` (default eval-KIND/), prints the comparison
    table, returns the results."""
    if tasks and kind != "niah":
        raise ValueError(f"--tasks names niah's tasks; {kind} has none")
    if sequences < 1:
        raise ValueError(f"--sequences must be >= 1 (rows of text averaged), got {sequences}")
    if sequences != 1 and kind != "length":
        raise ValueError(f"--sequences names the rows loss against position averages; {kind} has none")
    if kind == "niah" and depths:
        raise ValueError("niah spreads its needle depths evenly over --samples (0, 1/(n-1), ..., 1): give "
                         "--samples, not --depths")
    if kind == "niah":
        tasks = list(tasks) or list(NIAH_TASKS)
        check_tasks(tasks)            # before the model loads
    source = Path(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_any(source).to(device).eval()
    tok = tokenizer_for(source, tokenizer, model.config.vocab_size)
    train_length = training_length(source)
    lengths = list(lengths) if lengths else DEFAULT_LENGTHS[kind]
    depths = list(depths) if depths else [0.0, 0.5, 1.0]

    def with_mitigations(m, overrides: dict, where: str):
        mit = merge_overrides(MitigationsConfig(), overrides, where)
        calibrated = None
        if mit.state_norm.every and not mit.state_norm.thresholds:
            L = calibration_length or train_length or 2048
            prompt = torch.as_tensor(build_prompt(tok, L, 0.5, "12345")[None], device=device)
            calibrated = calibrate_state_norm(m, prompt, mit.state_norm.multiplier, chunk_len=prefill_chunk)
        return on_top(m.mitigations, resolve(mit, m.config.n_layer, m.config.nheads, calibrated=calibrated,
                                             attention=m.config.attn_layer_idx), overrides)

    variants, models = None, {}
    if variant_specs and (mitigations or compare):
        raise ValueError("--variants names every variant itself: give it without --mitigations / --compare")
    if mitigations or compare:
        layers = with_mitigations(model, OmegaConf.to_container(OmegaConf.from_dotlist(list(mitigations))),
                                  "--mitigations")
        variants = {"with mitigations": layers}
        if compare:      # "without" the given mitigations: the model as loaded, its own scales kept
            variants = {"without": "as is", "with mitigations": layers}
    if variant_specs:
        variants, loaded = {}, {}
        for spec in parse_variants(list(variant_specs)):
            m = model
            if spec.checkpoint:
                if spec.checkpoint not in loaded:
                    loaded[spec.checkpoint] = load_any(Path(spec.checkpoint)).to(device).eval()
                m = loaded[spec.checkpoint]
                if m.config.vocab_size != model.config.vocab_size:
                    raise ValueError(f"--variants {spec.name!r}: {spec.checkpoint} has a vocabulary of "
                                     f"{m.config.vocab_size} ids, {source} of {model.config.vocab_size}: the same "
                                     "prompts would be other text for it")
                models[spec.name] = m
            if spec.rotary_scaling is not None:
                try:
                    models[spec.name] = m = with_rotary_scaling(m, spec.rotary_scaling)
                except ValueError as e:
                    raise ValueError(f"--variants {spec.name!r}: {e}") from None
            variants[spec.name] = (with_mitigations(m, spec.mitigations, f"--variants {spec.name}")
                                   if spec.mitigations else "as is")
    stream = None
    if data and KINDS[kind].reads_text:
        stream = PackedStream(DocumentSource(heldout_of(data), str(Path(out or ".") / ".cache")), tok.eos_id,
                              seed=seed)
    out = Path(out or f"eval-{kind}")
    results = run_eval(kind, model, tok, out, lengths=lengths, depths=depths, samples=samples, seed=seed,
                       prefill_chunk=prefill_chunk, buckets=buckets, margin=margin, min_position=min_position,
                       sequences=sequences, train_length=train_length, variants=variants, models=models, stream=stream,
                       tasks=tasks)
    print(comparison_table(kind, results))
    print(f"wrote {out}")
    return results
