"""The whole run configuration: dataclasses per section, loaded from YAML with omegaconf.

Every command takes `CONFIG [key=value ...]`. Unknown keys and ill-typed values are
errors naming the key and the file; nothing is silently ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from longctx.data.config import DataConfig, TokenizerConfig

from .mitigations import MitigationsConfig, check_scales, merge_overrides, resolve
from .model.config import Mamba2Config
from .schedule import DECAYS

PRECISIONS = ("fp32", "bf16", "fp16")
EVAL_KINDS = ("heldout", "passkey", "niah", "length", "states")   # training.evaluator runs them, in this order
# eval.kinds' default: what every run evaluated before niah existed (runs that do not ask for niah are unchanged)
DEFAULT_EVAL_KINDS = ("heldout", "passkey", "length", "states")
# RULER's needle-in-a-haystack tasks (evaluate/niah.py defines them, in this order)
NIAH_TASKS = ("single_1", "single_2", "single_3", "multikey_1", "multikey_2", "multikey_3", "multivalue",
              "multiquery", "vt")

# DeepSpeed keys the run plans itself (from the stage plan and `train`): setting them under
# train.deepspeed would silently change what the plan says, or be ignored. Each names the key to set
# instead. A key is refused in any form: itself, anything under it, or a value that replaces the section
# holding it (`zero_optimization: false` replaces `{stage: N}`: DeepSpeed reads it as stage 0).
PLANNED_DEEPSPEED_KEYS = {
    "train_batch_size": "curriculum.stages[].global_batch_tokens",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "curriculum.stages[].global_batch_tokens",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision", "fp16.enabled": "train.precision", "amp": "train.precision",
    "torch_autocast": "train.precision",
    # grad_accum_dtype swaps DeepSpeed's ZeRO optimizer for another (BF16_Optimizer) the trainer does not drive
    "data_types": "train.precision (and train.zero_stage: ZeRO 1-3 accumulate gradients in fp32)",
    "gradient_clipping": "train.grad_clip",
    # the trainer passes its own AdamW and sets each step's LR from the curriculum
    "optimizer": "train.weight_decay, train.betas and curriculum.stages[].lr",
    "scheduler": "curriculum.stages[].lr, warmup_steps, decay and min_lr_ratio",
}


def planned_deepspeed_key(key: str, value) -> Optional[str]:
    """The planned key that setting `key` (dotted) to `value` under train.deepspeed would override, or None."""
    for planned in PLANNED_DEEPSPEED_KEYS:
        if key == planned or key.startswith(planned + "."):
            return planned
        if planned.startswith(key + ".") and not isinstance(value, dict):
            return planned
    return None


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file and the key."""


@dataclass
class RunConfig:
    name: str = "run"               # names the run directory by default
    dir: str = "runs/${run.name}"   # run directory: metrics, checkpoints, eval, report
    seed: int = 0                   # model init, data order, evaluation prompts
    resume: str = "auto"            # auto | never | path to a checkpoint directory
    # steps between step lines when the output is a log, not a terminal (a terminal shows one live line per
    # stage); each stage's last step is printed too, and metrics.jsonl and TensorBoard keep every step
    log_every: int = 10


@dataclass
class ModelConfig(Mamba2Config):
    from_pretrained: str = ""       # a mamba_ssm or Hugging Face Mamba2 directory; fields above must agree with it
    # the sha256 of its weights file (model.safetensors / pytorch_model.bin), checked before any work ("": not checked)
    from_pretrained_sha256: str = ""
    # the command that makes (or downloads) that directory, named when it is missing or does not match
    from_pretrained_recipe: str = ""


@dataclass
class TrainConfig:
    micro_batch_size: int = 1       # sequences per rank per micro-step, the same in every stage
    precision: str = "fp32"         # fp32 | bf16 | fp16 (DeepSpeed mixed precision)
    zero_stage: int = 0             # DeepSpeed ZeRO stage 0-3
    grad_clip: float = 1.0          # global gradient-norm clipping
    weight_decay: float = 0.1       # AdamW, not on norms, biases, A_log, D, dt_bias
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])   # AdamW betas
    activation_checkpointing: bool = False   # recompute each block in backward (long sequences)
    # torch.compile each block's training forward (inductor; the first steps of each shape pay the compile).
    # A block that fails to compile runs eagerly. Evaluation and decoding stay eager
    compile: bool = False
    max_bad_steps: int = 10         # stop after this many steps in a row with a non-finite loss or gradient (>= 1)
    collective_timeout_s: int = 900  # a collective waiting longer fails the run (a rank lost on another node)
    # reset the scan state at document starts (seq_idx); false: packed documents flow into each other,
    # as in mamba_ssm's pretraining, and the model must learn to forget at EOS by itself
    document_resets: bool = True
    deepspeed: Dict[str, Any] = field(default_factory=dict)   # raw DeepSpeed config, merged last


@dataclass
class StageConfig:
    name: str = MISSING             # shown in logs, the plan and the report
    seq_len: int = MISSING          # tokens per sequence; a multiple of seq_parallel x chunk_size
    steps: Optional[int] = None     # give steps or tokens
    tokens: Optional[int] = None    # the stage's length in tokens (steps = tokens / global_batch_tokens, rounded up)
    global_batch_tokens: int = MISSING   # tokens per optimizer step
    seq_parallel: int = 1           # ranks sharing one sequence (Mamba: state passing; attention: keys gathered)
    lr: float = 3e-4                # peak learning rate of the stage
    warmup_steps: int = 0           # linear warmup from the previous stage's final LR
    decay: str = "cosine"           # cosine | linear | wsd | constant
    min_lr_ratio: float = 0.1       # the decay ends at lr x this
    mitigations: Dict[str, Any] = field(default_factory=dict)   # overrides of the top-level section
    max_doc_tokens: int = 0         # > 0: documents longer than this are left out of this stage's sequences
    # none | batch (each row starts from the detached final state of the same row at the previous micro-step:
    # State Passing) | document (a document longer than a row continues in the same row at the next
    # micro-step, its state carried: truncated BPTT). docs/guides/research.md, "Carried state"
    carry_state: str = "none"


@dataclass
class CurriculumConfig:
    stages: List[StageConfig] = field(default_factory=list)   # the context-length stages, in order (below)


@dataclass
class EvalConfig:
    every_checkpoint: bool = True   # evaluate at every checkpoint during training
    # any of heldout passkey niah length states (niah is not in the default: docs/guides/research.md, Evaluation)
    kinds: List[str] = field(default_factory=lambda: list(DEFAULT_EVAL_KINDS))
    collapse_margin: float = 0.5    # nats above the running minimum that mark the collapse point
    heldout_sequences: int = 4      # sequences of the stage's length for the held-out loss
    passkey_lengths: List[int] = field(default_factory=lambda: [1024, 4096])   # prompt lengths in tokens
    passkey_depths: List[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])   # needle depth in the filler
    passkey_samples: int = 2        # keys per (length, depth)
    # RULER-style tasks for kind niah: one of each kind of difficulty (noise, distractors, several values, several
    # keys asked, a chain of assignments); any of single_1-3, multikey_1-3, multivalue, multiquery, vt
    niah_tasks: List[str] = field(default_factory=lambda: ["single_1", "multikey_1", "multivalue", "multiquery", "vt"])
    niah_lengths: List[int] = field(default_factory=lambda: [1024, 4096])   # niah prompt lengths in tokens
    niah_samples: int = 2           # prompts per (task, length), their needle depths spread evenly over [0, 1]
    length_max: int = 16384         # loss-vs-position and state norms read this many tokens
    length_buckets: int = 16        # log-spaced position buckets
    # loss vs position: consecutive held-out rows of length_max tokens, each read on its own, their loss averaged
    # position by position (one row's buckets mostly show where its documents start); each costs length_max tokens
    length_sequences: int = 1
    prefill_chunk: int = 4096       # tokens per forward when reading prompts recurrently
    # each evaluation's figures (eval/<step>/*.png and TensorBoard images; the numbers are written either way):
    # ~0.3-0.5 s each on the first rank, a few per evaluation. `figures: false` with `final: {figures: true}`
    # draws them once, at the run's last checkpoint
    figures: bool = True
    # mitigations put on top of the stage's for a second loss-vs-position curve (with vs without)
    compare_mitigations: Dict[str, Any] = field(default_factory=dict)
    # more named variants, each mitigations on top of the stage's, evaluated beside "as trained" on the same
    # prompts (passkey, niah, loss against position): {name: {decay_scale: 0.9}, ...}
    variants: Dict[str, Any] = field(default_factory=dict)
    # overrides of the keys above for the run's last checkpoint only (more prompts, longer lengths): the thorough
    # evaluation once, at the end, while every other checkpoint's stays light (the plan prices it on its own line)
    final: Dict[str, Any] = field(default_factory=dict)


FINAL_FIXED = ("every_checkpoint", "final")     # eval.final cannot change these


@dataclass
class CheckpointConfig:
    every_steps: int = 0            # 0: only at stage ends
    keep_last: int = 2              # older checkpoints are deleted; 0 keeps every checkpoint


@dataclass
class LaunchConfig:
    local_procs: int = 1            # `longctx run` without --nproc: processes on this machine
    nodes: int = 1                  # `longctx launch` defaults for --nodes, --gpus-per-node, ...
    gpus_per_node: int = 1          # ranks per node
    partition: str = ""             # SLURM partition
    time: str = "24:00:00"          # SLURM time limit
    cpus_per_task: int = 16         # SLURM --cpus-per-task (one task per node: the node's launcher and its ranks)
    mem: str = ""                   # SLURM --mem per node, e.g. 480G ("": the partition's default)
    stop_seconds: int = 300         # SLURM sends USR1 this long before the time limit: checkpoint, requeue
    account: str = ""               # SLURM account
    master_port: int = 29500        # rendezvous port of the launched job


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mitigations: MitigationsConfig = field(default_factory=MitigationsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + `key=value` overrides -> validated Config."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_describe(e)}") from None
        except Exception as e:  # YAML syntax
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.micro_batch_size=2)")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value ({e})") from None
        try:   # update() walks list indices too: curriculum.stages.1.seq_len=2048
            OmegaConf.update(merged, key.strip(), value, merge=True)
        except (OmegaConfBaseException, IndexError, KeyError, ValueError) as e:
            msg = _describe(e) if isinstance(e, OmegaConfBaseException) else str(e)
            raise ConfigError(f"override {item!r}: {msg}") from None
    where = str(path) if path is not None else "<defaults>"
    try:
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None
    validate(cfg, where)
    return cfg


def validate(cfg: Config, where: str = "<config>") -> None:
    """Checks that need no other component (the stage plan against the world size is `training.curriculum.plan`).
    The first error found is the one reported: the checks run in this order."""
    def fail(key, msg):
        raise ConfigError(f"{where}: {key}: {msg}")

    _validate_precision(cfg.train, fail)
    _validate_tokenizer(cfg.tokenizer, fail)
    _validate_deepspeed(cfg.train.deepspeed, fail)
    _validate_ranges(cfg, fail)
    _validate_eval(cfg.eval, fail)
    _validate_timeouts(cfg, fail)
    _validate_checkpoint(cfg.checkpoint, fail)
    _validate_pretrained(cfg.model, fail)
    stage_mitigations = _validate_mitigations(cfg, where)
    if not cfg.model.from_pretrained:
        _validate_model(cfg, stage_mitigations, where, fail)
    _validate_curriculum(cfg.curriculum, fail)
    if cfg.eval.final:                 # the last checkpoint's settings pass every check above too
        try:
            final = final_eval(cfg.eval)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        validate(replace(cfg, eval=final), f"{where} (eval.final on top of eval)")


def _validate_precision(train: TrainConfig, fail) -> None:
    if train.precision not in PRECISIONS:
        fail("train.precision", f"must be one of {PRECISIONS}, got {train.precision!r}")
    if train.precision == "bf16" and train.zero_stage == 0:
        fail("train.precision", "bf16 with train.zero_stage=0: DeepSpeed then accumulates and all-reduces the "
             "gradients in bf16 (measured here: the loss 1.8% above fp32 after 20 steps, where ZeRO 1-3 stay within "
             "0.1%); set train.zero_stage=1 or more (fp32 gradient accumulation)")


def _validate_tokenizer(tokenizer: TokenizerConfig, fail) -> None:
    if tokenizer.kind not in ("byte", "hf"):
        fail("tokenizer.kind", f"must be 'byte' or 'hf', got {tokenizer.kind!r}")
    if tokenizer.kind == "hf" and not tokenizer.path:
        fail("tokenizer.path", "tokenizer.kind=hf needs the path of a tokenizer.json")


def _validate_deepspeed(deepspeed: Dict[str, Any], fail) -> None:
    """train.deepspeed: none of the keys the run plans itself (PLANNED_DEEPSPEED_KEYS)."""
    for key, value in flatten(deepspeed).items():
        planned = planned_deepspeed_key(key, value)
        if planned:
            what = "" if planned == key else (f" (part of {planned})" if key.startswith(planned) else
                                              f" (a {type(value).__name__} in place of {planned})")
            fail(f"train.deepspeed.{key}", f"the run plans this itself{what}; set {PLANNED_DEEPSPEED_KEYS[planned]} "
                                           "instead")


def _validate_timeouts(cfg: Config, fail) -> None:
    """How long a collective may wait, and how long before SLURM's time limit a run stops at a checkpoint."""
    if cfg.train.collective_timeout_s < 1:
        fail("train.collective_timeout_s", f"must be >= 1, got {cfg.train.collective_timeout_s}")
    if cfg.launch.stop_seconds < 30:
        fail("launch.stop_seconds", f"must be >= 30 (a training step and a checkpoint), got {cfg.launch.stop_seconds}")


def _validate_checkpoint(checkpoint: CheckpointConfig, fail) -> None:
    if checkpoint.every_steps < 0:
        fail("checkpoint.every_steps", f"must be >= 0 (0: only at stage ends), got {checkpoint.every_steps}")
    if checkpoint.keep_last < 0:
        fail("checkpoint.keep_last", f"must be >= 0 (0 keeps every checkpoint), got {checkpoint.keep_last}")


def _validate_pretrained(model: ModelConfig, fail) -> None:
    digest = model.from_pretrained_sha256
    if digest and not re.fullmatch(r"[0-9a-f]{64}", digest):
        fail("model.from_pretrained_sha256", f"must be 64 lowercase hex digits (sha256sum's output), got {digest!r}")
    for key in ("from_pretrained_sha256", "from_pretrained_recipe"):
        if getattr(model, key) and not model.from_pretrained:
            fail(f"model.{key}", "is set, but model.from_pretrained is empty: it describes the pretrained model to "
                 "load; set model.from_pretrained or remove it")


def _validate_mitigations(cfg: Config, where: str) -> List[MitigationsConfig]:
    """The scales of the mitigations section, of each stage's (merged onto it) and of the evaluation's
    comparison and variants; returns each stage's merged section, for `_validate_model`."""
    try:
        check_scales(cfg.mitigations, "mitigations")
        stage_mitigations = []
        for i, stage in enumerate(cfg.curriculum.stages):
            key = f"curriculum.stages[{i}] ({stage.name})"
            stage_mitigations.append(merge_overrides(cfg.mitigations, stage.mitigations, key))
            check_scales(stage_mitigations[-1], f"{key}.mitigations")
        if cfg.eval.compare_mitigations:
            check_scales(merge_overrides(cfg.mitigations, cfg.eval.compare_mitigations, "eval.compare_mitigations"),
                         "eval.compare_mitigations")
        for name, overrides in cfg.eval.variants.items():
            if name in ("as trained", "with mitigations"):
                raise ValueError(f"eval.variants.{name}: the name is taken (the model as trained, "
                                 "eval.compare_mitigations); choose another")
            check_scales(merge_overrides(cfg.mitigations, overrides, f"eval.variants.{name}"), f"eval.variants.{name}")
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return stage_mitigations


def _validate_model(cfg: Config, stage_mitigations: List[MitigationsConfig], where: str, fail) -> None:
    """The architecture of the model section, and the run against it (`validate_architecture`). Not for
    `model.from_pretrained`: the architecture is then the checkpoint's, checked by the preflight."""
    try:
        arch = model_config(cfg).validate()
    except ValueError as e:
        fail("model", str(e))
    validate_architecture(cfg, arch, where, stage_mitigations)


# What the Mamba layers alone implement: a carried state (their fixed-size state passes between micro-batches).
# Sequence parallelism is both kinds' (attention gathers the earlier ranks' keys and values).
ATTENTION_UNSUPPORTED = {
    "carry_state": "an attention layer has no fixed-size state to carry (it would have to carry every key and "
                   "value read): carry_state for models with attention layers is not supported; use carry_state: "
                   "none",
}


def validate_architecture(cfg: Config, arch: Mamba2Config, where: str,
                          stage_mitigations: Optional[List[MitigationsConfig]] = None) -> None:
    """The run against the architecture it trains (the model section's, or `model.from_pretrained`'s): the
    run's, each stage's and each of eval's variants' mitigations fit its shapes and name no attention layer
    (thresholds may be calibrated later), and no stage asks the attention layers for what only the Mamba layers
    do (ATTENTION_UNSUPPORTED). eval.final's variants: call it again with that eval section."""
    import torch
    stages = [f"curriculum.stages[{i}] ({st.name}).mitigations" for i, st in enumerate(cfg.curriculum.stages)]
    try:
        if stage_mitigations is None:
            stage_mitigations = [merge_overrides(cfg.mitigations, st.mitigations, key)
                                 for key, st in zip(stages, cfg.curriculum.stages)]
        bases = [("mitigations", cfg.mitigations)] + list(zip(stages, stage_mitigations))
        sections = bases + [(f"eval.variants.{name} (on top of {key})",
                             merge_overrides(base, overrides, f"eval.variants.{name}"))
                            for key, base in bases for name, overrides in evaluation_variants(cfg.eval).items()]
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    for key, mitigations in sections:
        try:
            resolve(mitigations, arch.n_layer, arch.nheads, calibrated=torch.ones(arch.n_layer, arch.nheads),
                    attention=arch.attn_layer_idx)
        except ValueError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    if not arch.attn_layer_idx:
        return
    for i, stage in enumerate(cfg.curriculum.stages):
        asked = {"carry_state": stage.carry_state != "none"}
        for key, unsupported in asked.items():
            if unsupported:
                raise ConfigError(f"{where}: curriculum.stages[{i}] ({stage.name}).{key}: {getattr(stage, key)} with "
                                  f"attention layers (model.attn_layer_idx {list(arch.attn_layer_idx)}): "
                                  f"{ATTENTION_UNSUPPORTED[key]}")


def _validate_curriculum(curriculum: CurriculumConfig, fail) -> None:
    for i, stage in enumerate(curriculum.stages):
        key = f"curriculum.stages[{i}] ({stage.name})"
        if (stage.steps is None) == (stage.tokens is None):
            fail(key, "give exactly one of steps or tokens")
        if stage.decay not in DECAYS:
            fail(f"{key}.decay", f"must be one of {tuple(DECAYS)}, got {stage.decay!r}")
        if stage.seq_len <= 0 or stage.global_batch_tokens % stage.seq_len:
            fail(f"{key}.global_batch_tokens",
                 f"{stage.global_batch_tokens} must be a positive multiple of seq_len {stage.seq_len}")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict as {dotted key: leaf value}; dicts and lists of dicts are walked (list items by index)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            for i, e in enumerate(v):
                out.update(flatten(e, f"{prefix}{k}.{i}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# (key, smallest value allowed, what the bound means): checked at load, before any work (a zero here crashed
# at the first checkpoint, after a whole stage of training, or reported NaN)
RANGES = (
    ("run.log_every", 1, "steps between step lines in a log"),
    ("eval.prefill_chunk", 1, "tokens per forward"), ("eval.passkey_samples", 1, "keys per length and depth"),
    ("eval.niah_samples", 1, "prompts per task and length"),
    ("eval.length_buckets", 1, "position buckets"), ("eval.length_max", 2, "tokens read"),
    ("eval.length_sequences", 1, "rows of eval.length_max tokens averaged"),
    ("eval.collapse_margin", 0, "nats above the running minimum"),
    ("train.max_bad_steps", 1, "1: stop at the first bad step"), ("train.grad_clip", 0, "0: no clipping"),
    ("train.weight_decay", 0, ""),
    ("launch.master_port", 1, "a TCP port"), ("launch.local_procs", 1, ""), ("launch.nodes", 1, ""),
    ("launch.gpus_per_node", 1, ""), ("launch.cpus_per_task", 1, ""),
)
STRICTLY_ABOVE = {"eval.collapse_margin"}


def _validate_ranges(cfg: Config, fail) -> None:
    for key, low, meaning in RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < low or (key in STRICTLY_ABOVE and value <= low):
            bound = f"> {low}" if key in STRICTLY_ABOVE else f">= {low}"
            fail(key, f"must be {bound}{f' ({meaning})' if meaning else ''}, got {value}")
    if cfg.launch.master_port > 65535:
        fail("launch.master_port", f"must be a TCP port (1-65535), got {cfg.launch.master_port}")
    if not all(0 <= b < 1 for b in cfg.train.betas) or len(cfg.train.betas) != 2:
        fail("train.betas", f"must be two numbers in [0, 1), got {list(cfg.train.betas)}")
    if cfg.eval.every_checkpoint and "passkey" in cfg.eval.kinds:
        if not cfg.eval.passkey_lengths:
            fail("eval.passkey_lengths", "is empty while eval.kinds has passkey: give at least one length, or leave "
                                         "passkey out of eval.kinds")
        if not cfg.eval.passkey_depths:
            fail("eval.passkey_depths", "is empty while eval.kinds has passkey: give at least one depth in [0, 1]")
    if cfg.eval.every_checkpoint and "niah" in cfg.eval.kinds:
        for key in ("niah_tasks", "niah_lengths"):
            if not getattr(cfg.eval, key):
                fail(f"eval.{key}", "is empty while eval.kinds has niah: give at least one, or leave niah out of "
                                    "eval.kinds")
    for key in ("passkey_lengths", "niah_lengths"):
        for length in getattr(cfg.eval, key):
            if length < 1:
                fail(f"eval.{key}", f"{length} is not a prompt length (>= 1 token)")


def _validate_eval(ev: EvalConfig, fail) -> None:
    unknown = [k for k in ev.kinds if k not in EVAL_KINDS]
    if unknown:
        fail("eval.kinds", f"unknown evaluation {unknown[0]!r}: choose from {', '.join(EVAL_KINDS)}")
    unknown = [t for t in ev.niah_tasks if t not in NIAH_TASKS]
    if unknown:
        fail("eval.niah_tasks", f"unknown task {unknown[0]!r}: choose from {', '.join(NIAH_TASKS)}")
    for d in ev.passkey_depths:
        if not 0 <= d <= 1:
            fail("eval.passkey_depths", f"{d} is outside [0, 1] (0: needle at the start of the filler, 1: at its end)")
    if ev.heldout_sequences < 1:
        fail("eval.heldout_sequences", f"must be >= 1, got {ev.heldout_sequences}")


def final_eval(ev: EvalConfig) -> EvalConfig:
    """The evaluation settings of the run's last checkpoint: eval.final merged onto the eval section."""
    if not ev.final:
        return ev
    for key in ev.final:
        if key in FINAL_FIXED:
            raise ConfigError(f"eval.final.{key}: cannot differ at the last checkpoint; set eval.{key} itself")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ev), ev.final)
    except OmegaConfBaseException as e:
        key = f".{e.full_key}" if getattr(e, "full_key", None) else ""
        raise ConfigError(f"eval.final{key}: {getattr(e, 'msg', e)}".splitlines()[0]) from None
    out = OmegaConf.to_object(merged)
    out.final = {}
    return out


def evaluation_settings(ev: EvalConfig) -> List[Tuple[str, EvalConfig]]:
    """Every distinct evaluation a run makes, by the key that sets it: the checkpoints' (eval), and the last
    one's when eval.final changes it."""
    return [("eval", ev)] + ([("eval.final", final_eval(ev))] if ev.final else [])


def evaluation_variants(ev: EvalConfig) -> Dict[str, Any]:
    """The mitigation overrides evaluated beside the model as trained, by name: eval.compare_mitigations
    ("with mitigations") and eval.variants. The passkey, niah and loss-against-position evaluations run them."""
    return dict({"with mitigations": ev.compare_mitigations} if ev.compare_mitigations else {}, **ev.variants)


VARIANT_KINDS = ("passkey", "niah", "length")       # the evaluations that run evaluation_variants


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def model_config(cfg: Config) -> Mamba2Config:
    """The architecture part of the `model` section."""
    return Mamba2Config(**{f.name: getattr(cfg.model, f.name) for f in fields(Mamba2Config)})


def planning_architecture(cfg: Config) -> Tuple[Mamba2Config, str]:
    """The architecture to plan with, and a note when it is not the checkpoint's: a cluster recipe planned or
    rendered (`run --plan`, `launch`) on a machine without its checkpoint uses the model section's (training
    reads the checkpoint's, and its preflight refuses a checkpoint that is missing)."""
    if cfg.model.from_pretrained and not (Path(cfg.model.from_pretrained) / "config.json").exists():
        arch = model_config(cfg)
        return arch, (f"note: {cfg.model.from_pretrained} is not here; planned with the model section's "
                      f"architecture, chunk_size {arch.chunk_size} (training reads it from the checkpoint)")
    if cfg.model.from_pretrained:
        from .model.formats import read_config
        return read_config(cfg.model.from_pretrained), ""
    return model_config(cfg), ""


def planning_chunk_size(cfg: Config) -> Tuple[int, str]:
    """The scan chunk to plan with (`planning_architecture`'s), and its note."""
    arch, note = planning_architecture(cfg)
    return arch.chunk_size, note


def model_chunk_size(cfg: Config) -> int:
    """The scan chunk of the model to be trained (read from `model.from_pretrained` when set),
    which every stage's seq_len must respect; no weights are loaded."""
    if cfg.model.from_pretrained:
        from .model.formats import read_config
        return read_config(cfg.model.from_pretrained).chunk_size
    return model_config(cfg).chunk_size
