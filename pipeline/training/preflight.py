"""Checks that the shards, the tokenizer and the model belong together, run before DeepSpeed starts
(by the trainer, and by `longctx run` before it launches anything): a mismatch found here costs
seconds; found after days of training, or never, it costs the run.

- the shards are complete (their DONE marker), of this longctx's format (train/ and heldout/ splits),
  hold at least one held-out document (every evaluation reads only those), and were tokenized by this
  run's tokenizer;
- no token id in them reaches past the model's vocabulary (`max_token_id` of the manifest);
- `model.from_pretrained`: the directory is whole and the one the config pins, trained with this run's
  tokenizer (pretrained.py); the `model:` fields set in the config agree with it, and the byte tokenizer
  is used only with a model whose vocabulary is the byte vocabulary.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields, is_dataclass, replace

from longctx.data import storage
from longctx.data.splits import DONE, FORMAT_VERSION, MANIFEST
from longctx.data.tokenizer import ByteTokenizer, identity, load_tokenizer

from ..config import (
    VARIANT_KINDS,
    Config,
    ConfigError,
    evaluation_settings,
    evaluation_variants,
    model_config,
    validate_architecture,
)
from ..model.config import Mamba2Config
from .pretrained import check_base, describe_tokenizer


def check_pretrained(cfg: Config, where: str, tokenizer_identity: dict) -> Mamba2Config:
    """The architecture of `model.from_pretrained` after pretrained.check_base (there, pinned sha256, shapes,
    its tokenizer); refuses `model:` fields that contradict it and the byte tokenizer for a model with another
    vocabulary."""
    path = cfg.model.from_pretrained
    saved = check_base(cfg, where, tokenizer_identity)
    defaults = Mamba2Config()
    # tuples and lists compare alike; attn_cfg as its dict
    norm = lambda v: json.loads(json.dumps(asdict(v) if is_dataclass(v) else v))
    for f in fields(Mamba2Config):
        given = getattr(cfg.model, f.name)
        if norm(given) != norm(getattr(defaults, f.name)) and norm(given) != norm(getattr(saved, f.name)):
            raise ConfigError(f"{where}: model.{f.name}: {given!r} contradicts {path}, which has "
                              f"{getattr(saved, f.name)!r}; remove it from the model section (the checkpoint "
                              "decides the architecture)")
    if cfg.tokenizer.kind == "byte" and saved.vocab_size != ByteTokenizer.vocab_size:
        raise ConfigError(f"{where}: tokenizer.kind=byte, but {path} has a vocabulary of {saved.vocab_size:,} "
                          f"ids, not the byte vocabulary ({ByteTokenizer.vocab_size}): give the model's own "
                          "tokenizer (tokenizer.kind=hf, tokenizer.path=.../tokenizer.json)")
    for _, ev in evaluation_settings(cfg.eval):    # the run against the checkpoint's layers (config.py's checks)
        validate_architecture(replace(cfg, eval=ev), saved, where)
    return saved


def check_shards(shards: str, tokenizer_identity: dict, vocab_size: int, where: str) -> dict:
    """The manifest of complete shards made by this tokenizer, whose token ids fit the vocabulary."""
    if not storage.exists(storage.join(shards, DONE)):
        raise ConfigError(f"{where}: data.shards {shards}: no {DONE} marker, so `longctx prepare` did not finish "
                          "there; run it again (it continues where it stopped)")
    text = storage.read_text(storage.join(shards, MANIFEST))
    if text is None:
        raise ConfigError(f"{where}: data.shards {shards}: no {MANIFEST}; these are not shards `longctx prepare` made")
    manifest = json.loads(text)
    if manifest.get("format") != f"longctx-mds-v{FORMAT_VERSION}":
        raise ConfigError(f"{where}: data.shards {shards} were prepared by an older longctx ({manifest.get('format')}),"
                          " without a held-out split: evaluations would read training documents. Prepare them again "
                          "into a new output (`longctx prepare CONFIG data.prepare.output=NEW`, then data.shards=NEW)")
    made_by = manifest.get("tokenizer")
    if made_by != tokenizer_identity:
        raise ConfigError(f"{where}: data.shards {shards} were tokenized with {describe_tokenizer(made_by or {})}, "
                          f"this run's tokenizer is {describe_tokenizer(tokenizer_identity)}: set the tokenizer "
                          "section to the one the shards were made with, or prepare them again with this one")
    max_id = manifest.get("max_token_id")
    if max_id is None:
        raise ConfigError(f"{where}: data.shards {shards}: {MANIFEST} records no max_token_id (an older longctx "
                          "made it); prepare the shards again")
    if max_id >= vocab_size:
        raise ConfigError(f"{where}: data.shards {shards} hold token id {max_id:,}, but the model's vocabulary has "
                          f"{vocab_size:,} ids (model.vocab_size): the embedding has no row for it")
    return manifest


def reads_heldout(cfg: Config) -> bool:
    """Whether the run reads held-out documents: evaluations at checkpoints that read documents (the last one's
    with eval.final), or a state norm calibrated on them (in any stage, or in a variant the checkpoints'
    evaluations compare: eval.compare_mitigations, eval.variants)."""
    from ..mitigations import merge_overrides
    stages = [merge_overrides(cfg.mitigations, s.mitigations, f"curriculum.stages[{i}]")
              for i, s in enumerate(cfg.curriculum.stages)]
    sections = [cfg.mitigations] + stages
    for _, ev in evaluation_settings(cfg.eval):
        if ev.every_checkpoint and {"heldout", "length", "states"} & set(ev.kinds):
            return True
        if ev.every_checkpoint and set(VARIANT_KINDS) & set(ev.kinds):
            sections += [merge_overrides(stage, overrides, f"eval.variants.{name}")
                         for stage in stages for name, overrides in evaluation_variants(ev).items()]
    return any(m.state_norm.every and not m.state_norm.thresholds for m in sections)


def check_model(cfg: Config, where: str) -> None:
    """The model checks alone, which need no shards: `longctx run` makes them before it prepares data."""
    if cfg.model.from_pretrained:
        check_pretrained(cfg, where, identity(load_tokenizer(cfg.tokenizer)))


def preflight(cfg: Config, where: str, tok=None) -> str:
    """Every check above, for this config (`tok`: its tokenizer, when already loaded). Returns the shards."""
    tok = tok or load_tokenizer(cfg.tokenizer)
    arch = check_pretrained(cfg, where, identity(tok)) if cfg.model.from_pretrained else model_config(cfg)
    shards = cfg.data.shards or cfg.data.prepare.output
    if not shards:
        raise ConfigError(f"{where}: data.shards (or data.prepare.output) is empty: where are the MDS shards?")
    manifest = check_shards(shards, identity(tok), arch.vocab_size, where)
    if manifest["splits"]["train"]["documents"] == 0:
        raise ConfigError(f"{where}: data.shards {shards} hold no training document: every one of the "
                          f"{manifest['documents']:,} documents is held out (heldout_fraction "
                          f"{manifest['heldout_fraction']}); lower data.prepare.heldout_fraction or add inputs")
    if manifest["splits"]["heldout"]["documents"] == 0 and reads_heldout(cfg):
        raise ConfigError(f"{where}: data.shards {shards} hold no held-out document (heldout_fraction "
                          f"{manifest['heldout_fraction']} of {manifest['documents']:,} documents), and every "
                          "evaluation and calibration reads only held-out documents: raise "
                          "data.prepare.heldout_fraction (or add inputs) and prepare again")
    return shards
