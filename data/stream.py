"""Training data: MDS shards -> documents packed into sequences -> this rank's share.

The token stream is the documents in a seeded order, each followed by EOS. Sequence k
of a stage covers stream positions [k*L, k*L + L] (L+1 tokens: inputs are the first L,
labels the last L), so consecutive sequences share one token and no token is skipped.
`seq_idx` numbers the documents inside a sequence (the scan resets its state where it
changes); a label that belongs to the next document is masked (-100).

Every rank follows the same global stream, so the state (epoch, document, offset) is one
small dict identical on all ranks: resuming reproduces exactly the samples an
uninterrupted run would have seen, and a new stage with another seq_len continues from
the same document position. Each data-parallel rank reads only its rows of the global
batch (the other rows move the position by the documents' lengths alone, from the split's
lengths.npy), each sequence-parallel rank takes its contiguous segment of those rows.
"""
from __future__ import annotations

import copy
import hashlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

IGNORE = -100


@dataclass
class Batch:
    input_ids: np.ndarray   # (rows, L) int64
    labels: np.ndarray      # (rows, L) int64, IGNORE across document boundaries
    seq_idx: np.ndarray     # (rows, L) int32, document number within the row
    # row-stable streams only (PackedStream.next_lane_batch): (rows,) bool, the row starts inside a document
    # that the same lane's previous row began
    continues: Optional[np.ndarray] = None

    def rows(self, start: int, stop: int) -> "Batch":
        return Batch(self.input_ids[start:stop], self.labels[start:stop], self.seq_idx[start:stop],
                     None if self.continues is None else self.continues[start:stop])

    def segment(self, start: int, stop: int) -> "Batch":
        return Batch(self.input_ids[:, start:stop], self.labels[:, start:stop], self.seq_idx[:, start:stop],
                     self.continues)


def rank_share(batch: Batch, dp_rank: int, dp_size: int, sp_rank: int = 0, sp_size: int = 1) -> Batch:
    """Rows of this data-parallel rank, then the contiguous segment of this sequence-parallel rank."""
    n, L = batch.input_ids.shape
    if n % dp_size:
        raise ValueError(f"{n} sequences per step do not split over {dp_size} data-parallel ranks")
    if L % sp_size:
        raise ValueError(f"seq_len {L} does not split over {sp_size} sequence-parallel ranks")
    per, seg = n // dp_size, L // sp_size
    return batch.rows(dp_rank * per, (dp_rank + 1) * per).segment(sp_rank * seg, (sp_rank + 1) * seg)


class DamagedShard(ValueError):
    """A shard file whose bytes are not the ones `longctx prepare` wrote (its hash in the index differs)."""


class DocumentSource:
    """Documents of an MDS dataset by index (a StreamingDataset: remote + local cache, or local).

    Shard files are checked against the hashes in the index before a document of theirs is returned: the
    compressed file when it is fetched or decompressed (by mosaicml-streaming), the decompressed file the
    first time this process reads from it (damage after decompression, in a cache, is not seen otherwise).
    A damaged shard stops the reader with an error naming the file; it never yields a wrong document."""

    def __init__(self, shards: str, cache_dir: Optional[str] = None):
        from .splits import SHARD_HASH
        from .streaming_shm import open_dataset
        remote = shards if shards.startswith("s3://") else None
        local = cache_dir if remote else shards
        if remote and not cache_dir:
            raise ValueError("reading s3:// shards needs a local cache directory (data.cache_dir)")
        self.shards, self.remote = shards, remote
        self.ds, release = open_dataset(remote=remote, local=local, shuffle=False, batch_size=1,
                                        validate_hash=SHARD_HASH)
        # its shared memory goes when the source does (or close()), not only when the process exits
        self.close = weakref.finalize(self, release)
        self.index_path = Path(local) / "index.json"     # a remote dataset's index is downloaded there
        self._checked: set = set()
        self._lengths = None

    @property
    def identity(self) -> str:
        """Which shards these are: the hash of their MDS index (shard names, sizes, sample counts), so
        re-prepared data with other documents or another tokenizer reads as another dataset."""
        return f"{self.ds.num_samples}:{hashlib.sha256(self.index_path.read_bytes()).hexdigest()[:16]}"

    def __len__(self) -> int:
        return self.ds.num_samples       # all documents (len() of a distributed StreamingDataset is per rank)

    def length(self, index: int) -> int:
        """Tokens of a document, without reading it (the split's lengths.npy, written by prepare)."""
        if self._lengths is None:
            from . import storage
            from .splits import LENGTHS
            url = storage.join(self.shards, LENGTHS)
            path = storage.local_copy(url, str(self.index_path.parent / ".lengths")) if self.remote else url
            lengths = np.load(path, mmap_mode="r")
            if len(lengths) != len(self):
                raise DamagedShard(f"{url}: {len(lengths)} document lengths for {len(self)} documents in the index: "
                                   "the dataset was changed after it was prepared; prepare it again")
            self._lengths = lengths
        return int(self._lengths[index])

    def tokens(self, index: int) -> np.ndarray:
        shard_id, _ = self.ds.spanner[index]
        try:
            tokens = self.ds[index]["tokens"]
        except Exception as e:        # a compressed shard that fails its hash, or does not decompress
            raise DamagedShard(self._damage(shard_id, f"{type(e).__name__}: {e}")) from None
        if shard_id not in self._checked:
            self._check_decompressed(shard_id)
            self._checked.add(shard_id)
        return tokens

    def _shard_files(self, shard_id: int):
        reader = self.ds.shards[shard_id]
        raw, zipped = reader.file_pairs[0]
        folder = Path(reader.dirname) / (reader.split or "")
        return raw, folder / raw.basename, (folder / zipped.basename if zipped else None)

    def _check_decompressed(self, shard_id: int) -> None:
        from .splits import SHARD_HASH
        from .streaming_core import streaming_module
        get_hash = streaming_module("base.hashing").get_hash
        raw, path, _ = self._shard_files(shard_id)
        expected = raw.hashes.get(SHARD_HASH)
        if expected is not None and path.exists() and get_hash(SHARD_HASH, path.read_bytes()) != expected:
            raise DamagedShard(self._damage(shard_id, f"{path.name} does not match its {SHARD_HASH} hash in the index"))

    def _damage(self, shard_id: int, what: str) -> str:
        _, raw_path, zip_path = self._shard_files(shard_id)
        source = (f"the remote copy in {self.remote}" if self.remote
                  else f"{zip_path.name}, if that is intact" if zip_path else "nothing: prepare the data again")
        return (f"damaged shard {shard_id} of {self.shards} ({raw_path}): {what}. Delete {raw_path} (it is made "
                f"again from {source}), or prepare the data again; then resume")


def open_splits(shards: str, cache_dir: Optional[str] = None):
    """(training source, held-out source or None when the split is empty) of a `longctx prepare` output:
    what the trainer reads. Training reads only train/, every evaluation only heldout/ (longctx.data.splits)."""
    import json

    from . import storage
    from .splits import MANIFEST, split_url
    counts = json.loads(storage.read_text(storage.join(shards, MANIFEST)))["splits"]
    cache = (lambda split: str(Path(cache_dir) / split)) if cache_dir else (lambda split: None)
    return tuple(DocumentSource(split_url(shards, split), cache(split)) if counts[split]["documents"] else None
                 for split in ("train", "heldout"))


class PackedStream:
    """Deterministic packing of a DocumentSource; `state_dict` / `load_state_dict` resume exactly."""

    def __init__(self, source, eos_id: int, seed: int = 0, shuffle: bool = True):
        if len(source) == 0:
            raise ValueError("the dataset has no documents")
        self.source, self.eos_id, self.seed, self.shuffle = source, int(eos_id), int(seed), shuffle
        self.epoch, self.doc, self.offset = 0, 0, 0
        self.lanes: Optional[dict] = None      # row-stable streams in use (next_lane_batch), else None
        self._orders: "OrderedDict[int, np.ndarray]" = OrderedDict()   # the last two epochs' orders
        self._cache: "OrderedDict[tuple, np.ndarray]" = OrderedDict()    # recent documents (one per lane)
        self._cache_size = 2

    # -- position ----------------------------------------------------------------------------
    def _dataset(self) -> Optional[str]:
        return getattr(self.source, "identity", None)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "doc": self.doc, "offset": self.offset, "seed": self.seed,
                "dataset": self._dataset(), "lanes": copy.deepcopy(self.lanes)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        if state.get("dataset") != self._dataset():
            raise ValueError(f"loader state was saved on the dataset {state.get('dataset')}, the shards now are "
                             f"{self._dataset()}: the data was re-prepared or moved to other shards; its position "
                             "means nothing there. Use the original shards, or start a new run")
        self.epoch, self.doc, self.offset = int(state["epoch"]), int(state["doc"]), int(state["offset"])
        self.lanes = copy.deepcopy(state.get("lanes"))

    def _order_of(self, epoch: int) -> np.ndarray:
        """The epoch's document order. Two are kept: lanes (next_lane_batch) near an epoch's end read from
        both, and a permutation of every document per row would cost more than the row."""
        if epoch not in self._orders:
            n = len(self.source)
            self._orders[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                                   else np.arange(n))
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _length(self, epoch: int, doc: int) -> int:
        """Tokens of the doc-th document of the epoch's order, EOS included, without reading it."""
        if (epoch, doc) in self._cache:
            return len(self._cache[epoch, doc])
        length = getattr(self.source, "length", None)
        if length is None:                       # a source without lengths: read the document
            return len(self._document(epoch, doc))
        return length(int(self._order_of(epoch)[doc])) + 1

    def _document(self, epoch: int, doc: int) -> np.ndarray:
        """Tokens of the doc-th document of the epoch's order, with EOS appended."""
        key = (epoch, doc)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            toks = self.source.tokens(int(self._order_of(epoch)[doc]))
            self._cache[key] = np.concatenate([toks.astype(np.int64), [self.eos_id]])
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return self._cache[key]

    # -- packing -----------------------------------------------------------------------------
    def _take(self, n: int, advance: int, max_doc_tokens: int = 0, read: bool = True):
        """The next n stream tokens with their document numbers (counted from 0 within the call);
        the position moves forward by `advance` <= n tokens. With `max_doc_tokens`, documents longer
        than that (EOS included) are passed over (they come back in later epochs and stages).
        `read=False` moves the position exactly alike from the documents' lengths only, reading no
        token (another rank's rows) and returns None."""
        n_docs = len(self.source)
        got, (k, self.offset) = self._walk(self.epoch * n_docs + self.doc, self.offset, lambda k: divmod(k, n_docs),
                                           n, advance, max_doc_tokens, read)
        self.epoch, self.doc = divmod(k, n_docs)
        return got

    def _walk(self, k: int, offset: int, doc_of, n: int, advance: int, max_doc_tokens: int, read: bool):
        """`_take` along any sequence of documents: the k-th is doc_of(k) = (epoch, doc in that epoch's order).
        ((tokens, document numbers) or None, the position (k, offset) moved by `advance`)."""
        out, docs, got, counter, passed = [], [], 0, 0, 0
        moved = None
        while got < n:
            epoch, doc = doc_of(k)
            size = self._length(epoch, doc)
            if max_doc_tokens and offset == 0 and size > max_doc_tokens:
                passed += 1
                if passed > len(self.source):
                    raise ValueError(f"no document has at most {max_doc_tokens} tokens (EOS included): raise the "
                                     "stage's max_doc_tokens or set it to 0")
                k += 1
                if got <= advance:
                    moved = (k, 0)
                continue
            passed = 0
            toks = self._document(epoch, doc) if read else None
            if toks is not None and len(toks) != size:
                raise DamagedShard(f"document {int(self._order_of(epoch)[doc])} has {len(toks) - 1} tokens, but the "
                                   f"split's lengths.npy says {size - 1}: the dataset changed after it was prepared; "
                                   "prepare it again")
            if offset >= size:          # only a position from other data can point past a document's end
                raise ValueError(f"loader position (epoch {epoch}, document {doc}, offset {offset}) lies past the "
                                 f"end of that document ({size} tokens): the dataset is not the one the "
                                 "position was recorded in")
            if got <= advance < got + size - offset:
                moved = (k, offset + (advance - got))
            piece = min(size - offset, n - got)
            if read:
                out.append(toks[offset: offset + piece])
                docs.append(np.full(piece, counter, dtype=np.int32))
            got += piece
            offset += piece
            if offset == size:
                k, offset, counter = k + 1, 0, counter + 1
        return ((np.concatenate(out), np.concatenate(docs)) if read else None), moved

    def next_batch(self, rows: int, seq_len: int, max_doc_tokens: int = 0, keep: Optional[range] = None) -> Batch:
        """`rows` sequences of seq_len inputs (+1 token for the labels) from the current position;
        documents longer than `max_doc_tokens` (> 0) are passed over. With `keep` (a range of row
        numbers: this data-parallel rank's), only those rows are read and returned; the position moves
        over all `rows` exactly as without it, from the other rows' document lengths."""
        keep = _check_keep(keep, rows, "rows")
        self._leave_lanes()
        ids = np.empty((len(keep), seq_len), dtype=np.int64)
        labels = np.empty((len(keep), seq_len), dtype=np.int64)
        seq_idx = np.empty((len(keep), seq_len), dtype=np.int32)
        for r in range(rows):
            if r not in keep:
                self._take(seq_len + 1, advance=seq_len, max_doc_tokens=max_doc_tokens, read=False)
                continue
            toks, docs = self._take(seq_len + 1, advance=seq_len, max_doc_tokens=max_doc_tokens)
            i = r - keep.start
            ids[i], seq_idx[i] = toks[:-1], docs[:-1]
            labels[i] = np.where(docs[1:] == docs[:-1], toks[1:], IGNORE)
        return Batch(ids, labels, seq_idx)

    # -- row-stable streams (carry_state: document) -------------------------------------------------------
    def next_lane_batch(self, lanes: int, steps: int, seq_len: int, max_doc_tokens: int = 0,
                        keep: Optional[range] = None) -> Batch:
        """`steps` consecutive rows of each of `lanes` row-stable streams, so that a document longer than a row
        continues in the same lane's next row. Lane j reads documents base+j, base+j+lanes, base+j+2*lanes, ...
        of the stream's order (base: where the stream stood when these lanes began), each packed as in
        `next_batch`. Rows come step-major: row s*len(keep)+i is lane keep.start+i at step s. `continues`
        marks the rows that start inside a document the lane's previous row began. Only the kept lanes
        (a contiguous range: this data-parallel rank's) are read; the others move by their documents'
        lengths alone, so every rank holds the same position."""
        keep = _check_keep(keep, lanes, "lanes")
        self._enter_lanes(lanes)
        self._cache_size = max(self._cache_size, len(keep) + 2)
        n_docs, st = len(self.source), self.lanes
        out = len(keep) * steps
        ids = np.empty((out, seq_len), dtype=np.int64)
        labels = np.empty((out, seq_len), dtype=np.int64)
        seq_idx = np.empty((out, seq_len), dtype=np.int32)
        continues = np.zeros(out, dtype=bool)
        for s in range(steps):
            for j in range(lanes):
                k, offset = st["index"][j], st["offset"][j]

                def doc_of(i, j=j):
                    return divmod(st["base"] + j + i * lanes, n_docs)
                got, (st["index"][j], st["offset"][j]) = self._walk(k, offset, doc_of, seq_len + 1, seq_len,
                                                                    max_doc_tokens, read=j in keep)
                if got is None:
                    continue
                toks, docs = got
                r = s * len(keep) + (j - keep.start)
                ids[r], seq_idx[r], continues[r] = toks[:-1], docs[:-1], offset > 0
                labels[r] = np.where(docs[1:] == docs[:-1], toks[1:], IGNORE)
        return Batch(ids, labels, seq_idx, continues)

    def _enter_lanes(self, lanes: int) -> None:
        """Begin `lanes` row-stable streams at the stream's position (after a document it is inside), unless
        they are in use already."""
        if self.lanes is not None and self.lanes["count"] == lanes:
            return
        self._leave_lanes()
        base = self.epoch * len(self.source) + self.doc + (1 if self.offset else 0)
        self.lanes = {"count": lanes, "base": base, "index": [0] * lanes, "offset": [0] * lanes}

    def _leave_lanes(self) -> None:
        """Back to one stream: it continues after the furthest document any lane reached (documents that
        other lanes had not reached yet are passed over in this epoch)."""
        if self.lanes is None:
            return
        st, n = self.lanes, self.lanes["count"]
        reached = max(st["base"] + j + i * n + (1 if off else 0)
                      for j, (i, off) in enumerate(zip(st["index"], st["offset"])))
        self.epoch, self.doc = divmod(reached, len(self.source))
        self.offset, self.lanes = 0, None


def _check_keep(keep: Optional[range], total: int, what: str) -> range:
    keep = range(total) if keep is None else keep
    if keep.step != 1 or not 0 <= keep.start <= keep.stop <= total:
        raise ValueError(f"keep must be a contiguous range of {what} within {total}, got {keep}")
    return keep
