"""The two splits of a prepared dataset: `train` (what training reads) and `heldout` (what every evaluation
reads, never trained on). A document's split is a pure function of its text and the held-out fraction, so
re-runs, added inputs and other machines never move a document between splits, and copies of one text
always land in the same split.

Layout of a `longctx prepare` output (format v3; its names are defined here, for `prepare`, which writes it,
and for every reader):
    manifest.json, DONE
    train/index.json      train/part-<id>/...     (MDS; a plain StreamingDataset reads train/)
    train/lengths.npy     tokens of every document, in the index's order (int32): readers that skip
                          documents (the rows of other ranks) need only these
    heldout/index.json    heldout/part-<id>/...   heldout/lengths.npy
    parts/part-<id>.json  one work item's counts, written last: the item is complete
"""
from __future__ import annotations

import hashlib

from . import storage

SPLITS = ("train", "heldout")
PARTS = "parts"
LENGTHS = "lengths.npy"
MANIFEST = "manifest.json"
DONE = "DONE"
FORMAT_VERSION = 3          # 2: manifest.max_token_id; 3: train/ and heldout/ splits
SHARD_HASH = "xxh64"        # recorded for every shard file in the MDS index; checked where shards are read


def is_heldout(text: str, fraction: float) -> bool:
    """The text's hash, read as a number in [0, 1), falls below the fraction."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2.0 ** 64 < fraction


def split_url(shards: str, split: str) -> str:
    """The MDS dataset of one split of a prepared output."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return storage.join(shards, split)


def heldout_of(shards: str) -> str:
    """The held-out split of a `longctx prepare` output, for evaluations given the output's root."""
    import json

    text = storage.read_text(storage.join(shards, MANIFEST))
    if text is None:
        raise ValueError(f"{shards}: no {MANIFEST}; give the directory `longctx prepare` wrote (data.prepare.output):"
                         " evaluations read its held-out split")
    manifest = json.loads(text)
    if manifest.get("format") != f"longctx-mds-v{FORMAT_VERSION}":
        raise ValueError(f"{shards} was prepared by an older longctx ({manifest.get('format')}) without a held-out "
                         "split; prepare it again into a new output")
    if manifest["splits"]["heldout"]["documents"] == 0:
        raise ValueError(f"{shards} holds no held-out document (heldout_fraction {manifest['heldout_fraction']}); "
                         "raise data.prepare.heldout_fraction and prepare again")
    return split_url(shards, "heldout")
