"""The `tokenizer` and `data` sections of the run config (data owns its own schema)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .synthetic import SyntheticConfig


@dataclass
class TokenizerConfig:
    kind: str = "byte"              # "byte" (built in) or "hf" (a tokenizer.json at `path`)
    path: str = ""                  # tokenizer.json of a Hugging Face tokenizer (kind: hf)
    eos_id: Optional[int] = None    # None: the tokenizer's own end-of-text id


@dataclass
class PrepareConfig:
    """`longctx prepare`: raw text (local or s3://) -> MDS shards."""

    inputs: List[str] = field(default_factory=list)   # globs: local paths or s3://bucket/prefix/*.jsonl
    text_field: str = "text"                           # the jsonl/parquet field holding the text
    output: str = ""                                   # local dir or s3://bucket/prefix
    heldout_fraction: float = 0.02                     # documents held out from training, by their text's hash
    min_doc_tokens: int = 1                            # shorter documents are rejected (too_short)
    max_doc_tokens: int = 0                            # 0: never split long documents
    ray_address: str = ""                              # empty: local ray.init()
    num_workers: int = 0                               # 0: one per available CPU
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)   # generated inputs (demo, tests)
    chunk_bytes: int = 64 << 20                        # jsonl files are split into work items of this size
    shard_bytes: int = 64 << 20                        # MDS shard size limit
    max_line_bytes: int = 64 << 20                     # longer lines are rejected (line_too_long) unread
    batch_records: int = 512                           # records tokenized per encode_batch call
    staging: str = ""                                  # local dir for parts before upload (s3 output);
                                                       # empty: ~/.cache/longctx/prepare/<hash of output>


@dataclass
class S3Config:
    """Limits of every S3 request (`longctx prepare` and its Ray tasks): the standard AWS retry mode."""

    max_attempts: int = 8             # attempts per request, with exponential backoff (at most 20 s apart)
    timeout_s: float = 30.0           # connect and read timeout of one attempt


@dataclass
class DataConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    shards: str = ""          # a `longctx prepare` output (train/ and heldout/ under it); empty: prepare.output
    cache_dir: str = ""       # local cache of StreamingDataset; empty: inside the run directory
    s3: S3Config = field(default_factory=S3Config)
