"""`longctx prepare`: raw text (local or s3://) -> MDS shards, tokenized by Ray tasks.

Flow: expand the input globs -> work items (jsonl byte ranges, other files whole) ->
one Ray task per item writes its documents into two MDS parts, `train/part-<id>/` and
`heldout/part-<id>/` (zstd; columns tokens, source, doc; the split by the text's hash,
data/splits.py), then `parts/part-<id>.json` (its counts) last: the item is complete
(on S3 that object is uploaded last) -> one merged index per split -> `manifest.json`
-> `DONE`.

A part's id hashes everything that decides its content (input identity, byte range,
tokenizer, settings), so a re-run skips finished parts, new inputs add only their parts,
and a run killed midway finishes with exactly the shards a clean run writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np

from . import storage
from .config import DataConfig, S3Config, TokenizerConfig
from .records import SPLITTABLE, WorkItem, count_records, detect_format, iter_records
from .splits import DONE, FORMAT_VERSION, LENGTHS, MANIFEST, PARTS, SHARD_HASH, SPLITS, is_heldout
from .streaming_core import streaming_module
from .synthetic import write_jsonl
from .tokenizer import identity, load_tokenizer, token_dtype

EXAMPLES_PER_REASON = 5
SYNTHETIC = "_synthetic"        # where prepare writes the documents of data.prepare.synthetic, in the staging


class PrepareError(ValueError):
    """Bad inputs or outputs found before (or while) doing the work; the message says what to fix."""


@dataclass(frozen=True)
class Settings:
    """Everything a task needs; part ids hash the fields that decide a part's content."""

    tokenizer: TokenizerConfig
    tokenizer_sha256: str
    text_field: str
    heldout_fraction: float
    min_doc_tokens: int
    max_doc_tokens: int
    max_line_bytes: int
    shard_bytes: int
    batch_records: int
    staging: str            # local directory that holds the parts
    remote: Optional[str]   # s3:// output, or None when the output is local (== staging)

    def part_id(self, item: WorkItem, legacy: bool = False) -> str:
        """An input is known by its path, size and version (mtime or ETag), except the documents prepare
        generates inside the output (`data.prepare.synthetic`): their file name says their content (the
        settings' hash), so their parts keep their ids wherever the output lies (moved, copied, or reached by
        another path). `legacy`: the id an older longctx gave those too (by absolute path and mtime)."""
        name, version = item.url, item.version
        generated = self.generated_name(item.url)
        if generated and not legacy:
            name, version = generated, ""
        key = [FORMAT_VERSION, name, item.size, version, item.fmt, item.start, item.end,
               self.tokenizer_sha256, self.text_field, self.min_doc_tokens, self.max_doc_tokens,
               self.max_line_bytes, self.heldout_fraction]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]

    def generated_name(self, url: str) -> Optional[str]:
        """`_synthetic/<file>` for a file prepare generated in this output's staging, else None."""
        if storage.is_s3(url) or os.path.dirname(url) != os.path.abspath(os.path.join(self.staging, SYNTHETIC)):
            return None
        return f"{SYNTHETIC}/{os.path.basename(url)}"


def _empty_stats() -> dict:
    return {"records": 0, "documents": 0, "tokens": 0, "rejected": {}, "examples": {}, "max_token_id": -1,
            "splits": {s: {"documents": 0, "tokens": 0} for s in SPLITS}}


def part_marker(staging: str, pid: str) -> str:
    return os.path.join(staging, PARTS, f"part-{pid}.json")


def _meta_only(marker: str) -> bool:
    """A marker copied from the remote output by another machine's run: this staging has the part's indexes
    and counts, not its shards."""
    with open(marker) as f:
        return bool(json.load(f).get("meta_only"))


def _reject(stats: dict, reason: str, location: str) -> None:
    stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1
    examples = stats["examples"].setdefault(reason, [])
    if len(examples) < EXAMPLES_PER_REASON:
        examples.append(location)


def process_item(item: WorkItem, settings: Settings, pid: str) -> dict:
    """Tokenize one work item into its two MDS parts, `part-<pid>`. Runs inside a Ray task."""
    marker = part_marker(settings.staging, pid)
    if not os.path.exists(marker) or _meta_only(marker):     # meta only: the remote part is gone, make it again
        _write_part(item, settings, pid, marker)
    if settings.remote:
        for split in SPLITS:
            local = os.path.join(settings.staging, split, f"part-{pid}")
            storage.upload_dir_files(local, storage.join(settings.remote, split, f"part-{pid}"),
                                     sorted(os.listdir(local)))
        with open(marker) as f:      # last: marks the remote part complete
            storage.write_text(storage.join(settings.remote, PARTS, f"part-{pid}.json"), f.read())
    with open(marker) as f:
        return json.load(f)


def _write_part(item: WorkItem, settings: Settings, pid: str, marker: str) -> None:
    MDSWriter = streaming_module("base.format.mds.writer").MDSWriter

    t0 = time.perf_counter()
    tok = load_tokenizer(settings.tokenizer)
    tmp = os.path.join(settings.staging, PARTS, f"part-{pid}.tmp-{uuid.uuid4().hex[:8]}")
    stats = {**_empty_stats(), "url": item.url, "start": item.start, "end": item.end,
             "lengths": {s: [] for s in SPLITS}}      # tokens of each document, in shard order (data/splits.py)
    columns = {"tokens": token_dtype(tok.vocab_size), "source": "str", "doc": "int"}
    scratch = tempfile.mkdtemp(prefix="longctx-prepare-")
    try:
        with MDSWriter(out=os.path.join(tmp, "train"), columns=columns, compression="zstd", hashes=[SHARD_HASH],
                       size_limit=settings.shard_bytes) as train, \
             MDSWriter(out=os.path.join(tmp, "heldout"), columns=columns, compression="zstd", hashes=[SHARD_HASH],
                       size_limit=settings.shard_bytes) as heldout:
            batch = []

            def flush():
                for rec, ids in zip(batch, tok.encode_batch([r.text for r in batch])):
                    if len(ids) < max(1, settings.min_doc_tokens):
                        _reject(stats, "too_short", rec.location)
                        continue
                    split = "heldout" if is_heldout(rec.text, settings.heldout_fraction) else "train"
                    writer = heldout if split == "heldout" else train
                    step = settings.max_doc_tokens or len(ids)
                    for piece in range(0, len(ids), step):     # every piece of a document in its one split
                        writer.write({"tokens": ids[piece:piece + step], "source": item.url, "doc": rec.index})
                        stats["lengths"][split].append(len(ids[piece:piece + step]))
                        stats["documents"] += 1
                        stats["splits"][split]["documents"] += 1
                    stats["tokens"] += len(ids)
                    stats["splits"][split]["tokens"] += len(ids)
                    stats["max_token_id"] = max(stats["max_token_id"], int(ids.max()))
                batch.clear()

            for rec in iter_records(item, settings.text_field, settings.max_line_bytes, scratch):
                stats["records"] += 1
                if rec.reason is not None:
                    _reject(stats, rec.reason, rec.location)
                    continue
                batch.append(rec)
                if len(batch) >= settings.batch_records:
                    flush()
            flush()
        stats["seconds"] = time.perf_counter() - t0      # worker time, for throughput reports
        stats["node"] = _node_address()
        if os.path.exists(marker) and not _meta_only(marker):
            return                 # another run (or a retried task) finished the same part first
        for split in SPLITS:       # a killed run may have left a split's part without its marker: replace it
            final = os.path.join(settings.staging, split, f"part-{pid}")
            shutil.rmtree(final, ignore_errors=True)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                os.replace(os.path.join(tmp, split), final)
            except OSError:        # another writer of the same part got there between the check and here
                if os.path.exists(marker) and not _meta_only(marker):
                    return
                raise
        storage.write_text(marker, json.dumps(stats))      # atomic, and last: the part is complete
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _node_address() -> str:
    """The Ray node this task runs on (the manifest shows where the work went)."""
    import ray
    return ray.util.get_node_ip_address() if ray.is_initialized() else "local"


# ----------------------------------------------------------------------------- planning

def plan_items(files: List[storage.FileInfo], chunk_bytes: int) -> List[WorkItem]:
    items = []
    for f in files:
        fmt = detect_format(f.url)
        if fmt in SPLITTABLE and f.size > chunk_bytes:
            items += [WorkItem(f.url, f.size, f.version, fmt, s, min(s + chunk_bytes, f.size))
                      for s in range(0, f.size, chunk_bytes)]
        else:
            items.append(WorkItem(f.url, f.size, f.version, fmt, 0, max(f.size, 1) if fmt in SPLITTABLE else 0))
    return items


def _sha256(url: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(url) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _default_staging(output: str) -> str:
    return os.path.join(os.path.expanduser("~/.cache/longctx/prepare"), hashlib.sha1(output.encode()).hexdigest()[:12])


def _remote_done_parts(remote: str) -> set:
    return {key[len("part-"):-len(".json")] for key in storage.list_prefix(storage.join(remote, PARTS))
            if key.startswith("part-") and key.endswith(".json") and "/" not in key}


def _fetch_remote_part_meta(remote: str, staging: str, pid: str) -> None:
    """Parts finished by an earlier run elsewhere: bring their indexes and counts for the merge."""
    marker = part_marker(staging, pid)
    if os.path.exists(marker):
        return
    for split in SPLITS:
        text = storage.read_text(storage.join(remote, split, f"part-{pid}", "index.json"))
        if text is None:
            raise PrepareError(f"{remote}/{split}/part-{pid}: marked complete ({PARTS}/part-{pid}.json) but its "
                               "index.json is missing; delete that marker and re-run")
        storage.write_text(os.path.join(staging, split, f"part-{pid}", "index.json"), text)
    stats = json.loads(storage.read_text(storage.join(remote, PARTS, f"part-{pid}.json")))
    storage.write_text(marker, json.dumps({**stats, "meta_only": True}))


# ----------------------------------------------------------------------------- Ray

def ray_auth_as_ray_start() -> None:
    """`ray start --head` turns token authentication on when a token exists (~/.ray/auth_token or
    RAY_AUTH_TOKEN[_PATH]), but a client given an explicit address does not, and is refused. Do as `ray start`
    does, unless RAY_AUTH_MODE says otherwise. Call before Ray is imported: it reads the mode once."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def _ray_init(address: str, num_workers: int):
    if address:
        ray_auth_as_ray_start()            # before Ray is imported: it reads the mode once
    import ray
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAYON_NUM_THREADS", "1")          # one core per task: tokenizers must not oversubscribe
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1",
                                                             "TOKENIZERS_PARALLELISM": "false"}}, **kw)
    else:
        # "local": always a fresh local instance, never a stale `ray start` cluster recorded in /tmp/ray
        ray.init(address="local", num_cpus=num_workers or None, **kw)
    return True


def _item_bytes(item: WorkItem) -> int:
    return (item.end - item.start) if item.fmt in SPLITTABLE else item.size


class Progress:
    """Records, tokens, input bytes, rejected records, rates and ETA: a live line on a TTY, a log line every
    few seconds otherwise (also when the tasks run on a Ray cluster: the driver counts finished items)."""

    def __init__(self, total_bytes: int, total_items: int, stream=None, every_s: float = 5.0):
        stream = stream or sys.stderr
        self.total_bytes, self.total_items = max(total_bytes, 1), total_items
        self.stream, self.every_s = stream, every_s
        self.t0 = self.last = time.time()
        self.bytes = self.items = self.records = self.tokens = self.rejected = 0
        self.tty = stream.isatty()

    def update(self, item: WorkItem, stats: dict) -> None:
        self.items += 1
        self.bytes += _item_bytes(item)
        self.records += stats["records"]
        self.tokens += stats["tokens"]
        self.rejected += sum(stats["rejected"].values())
        now = time.time()
        if self.tty or now - self.last >= self.every_s or self.items == self.total_items:
            self.last = now
            dt = max(now - self.t0, 1e-6)
            eta = (self.total_bytes - self.bytes) / max(self.bytes / dt, 1e-9)
            line = (f"prepare: {self.items}/{self.total_items} items, {self.records:,} records, "
                    f"{self.tokens:,} tokens, {self.bytes / 2**20:,.1f}/{self.total_bytes / 2**20:,.1f} MiB, "
                    f"{self.rejected:,} rejected; {self.records / dt:,.0f} records/s, "
                    f"{self.tokens / dt:,.0f} tokens/s, "
                    f"{self.bytes / 2**20 / dt:,.2f} MiB/s, ETA {eta:,.0f}s")
            self.stream.write(("\r" + line) if self.tty else line + "\n")
            if self.tty and self.items == self.total_items:
                self.stream.write("\n")
            self.stream.flush()


def _in_task(limits: S3Config, fn, *args):
    storage.configure(limits)             # a Ray worker process has the defaults until told
    return fn(*args)


def _run_tasks(fn, args_list, num_workers, limits: S3Config, progress=None, items=None):
    """Run `fn` as Ray tasks with at most num_workers in flight; results in input order. SPREAD: on a
    cluster every node takes work from the start (Ray would otherwise fill the driver's node first)."""
    import ray
    task = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(_in_task)
    limit = num_workers if num_workers > 0 else max(1, int(ray.available_resources().get("CPU", 1)))
    results, pending, next_i = [None] * len(args_list), {}, 0
    while next_i < len(args_list) or pending:
        while next_i < len(args_list) and len(pending) < limit:
            pending[task.remote(limits, fn, *args_list[next_i])] = next_i
            next_i += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except Exception as e:  # RayTaskError wraps the worker's exception
                cause = getattr(e, "cause", None) or e
                where = items[i].url if items else f"task {i}"
                raise PrepareError(f"{where}: {type(cause).__name__}: {cause}") from None
            if progress is not None:
                progress.update(items[i], results[i])
    return results


# ----------------------------------------------------------------------------- driver

def prepare(data: DataConfig, tokenizer: TokenizerConfig, log=print) -> dict:
    """Run (or finish) the preparation; returns the manifest."""
    p = data.prepare
    if not p.output:
        raise PrepareError("data.prepare.output is empty: give a local directory or s3://bucket/prefix")
    if not p.inputs and p.synthetic.documents <= 0:
        raise PrepareError("data.prepare.inputs is empty (and no data.prepare.synthetic documents): nothing to do")
    if p.min_doc_tokens < 0 or p.max_doc_tokens < 0:
        raise PrepareError("data.prepare.min_doc_tokens and max_doc_tokens must be >= 0")
    if not 0.0 <= p.heldout_fraction < 1.0:
        raise PrepareError(f"data.prepare.heldout_fraction must lie in [0, 1), got {p.heldout_fraction}")
    t0 = time.time()
    storage.configure(data.s3)
    tok = load_tokenizer(tokenizer)                                   # a bad tokenizer fails before any work
    remote = p.output.rstrip("/") if storage.is_s3(p.output) else None
    staging = (p.staging or _default_staging(p.output)) if remote else p.output
    storage.check_writable(p.output)
    os.makedirs(staging, exist_ok=True)

    files = []
    for pattern in p.inputs:
        files += storage.expand(pattern)
    if p.synthetic.documents > 0:
        files += storage.expand(write_jsonl(p.synthetic, os.path.join(staging, SYNTHETIC)))
    files = sorted({f.url: f for f in files}.values(), key=lambda f: f.url)
    for f in files:
        detect_format(f.url)                                          # unsupported suffix: error before work
    items = plan_items(files, p.chunk_bytes)
    settings = Settings(tokenizer=tokenizer, tokenizer_sha256=tok.sha256, text_field=p.text_field,
                        heldout_fraction=p.heldout_fraction, min_doc_tokens=p.min_doc_tokens,
                        max_doc_tokens=p.max_doc_tokens,
                        max_line_bytes=p.max_line_bytes, shard_bytes=p.shard_bytes,
                        batch_records=p.batch_records, staging=staging, remote=remote)

    previous = json.loads(storage.read_text(storage.join(p.output, MANIFEST)) or "{}")
    if previous and previous.get("format") != f"longctx-mds-v{FORMAT_VERSION}":
        raise PrepareError(f"data.prepare.output {p.output} holds shards of an older longctx ({previous.get('format')},"
                           " without the train/heldout splits); prepare into a new output, or delete this one first")
    known_sha = {(i["path"], i["size"], i.get("version")): i["sha256"] for i in previous.get("inputs", [])}
    remote_done = _remote_done_parts(remote) if remote else set()
    ids = [_known_id(settings, it, staging) for it in items]
    for pid in ids:
        if pid in remote_done:
            _fetch_remote_part_meta(remote, staging, pid)
    todo = [i for i, pid in enumerate(ids)
            if not (os.path.exists(part_marker(staging, pid)) and (not remote or pid in remote_done))]
    need_sha = [f for f in files if (f.url, f.size, f.version) not in known_sha]

    started = False
    parts = [f"part-{pid}" for pid in ids]
    if todo or previous.get("parts") != parts:
        # the output is incomplete until this run finishes: a run killed while merging another set of parts
        # leaves no DONE behind, so the next one merges again instead of trusting the files it finds
        storage.remove(storage.join(p.output, DONE))
    work_bytes = 0
    if todo or need_sha:
        started = _ray_init(p.ray_address, p.num_workers)
        try:
            # record indices: jsonl ranges need the number of records in the ranges before them
            by_file: Dict[str, List[int]] = {}
            for i, it in enumerate(items):
                by_file.setdefault(it.url, []).append(i)
            count_idx = [i for url, idx in by_file.items() if any(j in todo for j in idx) and len(idx) > 1
                         for i in idx]
            counts = dict(zip(count_idx, _run_tasks(count_records, [(items[i],) for i in count_idx], p.num_workers,
                                                    data.s3)))
            for url, idx in by_file.items():
                first = 0
                for i in idx:
                    items[i] = WorkItem(**{**asdict(items[i]), "first_record": first})
                    first += counts.get(i, 0)
            log(f"prepare: {len(items)} work items over {len(files)} files; {len(todo)} to do, "
                f"{len(items) - len(todo)} already done")
            work_bytes = sum(_item_bytes(items[i]) for i in todo)
            progress = Progress(work_bytes, len(todo))
            _run_tasks(process_item, [(items[i], settings, ids[i]) for i in todo], p.num_workers, data.s3, progress,
                       [items[i] for i in todo])
            shas = _run_tasks(_sha256, [(f.url,) for f in need_sha], p.num_workers, data.s3)
            known_sha.update({(f.url, f.size, f.version): s for f, s in zip(need_sha, shas)})
        finally:
            if started:
                import ray
                ray.shutdown()
    else:
        log(f"prepare: all {len(items)} work items already done; nothing to tokenize")
        if _complete_as_recorded(p.output, previous, parts, tok):
            log(f"prepare: {p.output} is complete and made of exactly these parts; nothing rewritten")
            return {**previous, "run": {"wall_seconds": round(time.time() - t0, 3), "parts_tokenized": 0,
                                        "input_bytes": 0, "unchanged": True}}

    return _finish(p.output, staging, remote, items, ids, files, known_sha, tok, settings, log,
                   {"todo": [ids[i] for i in todo], "bytes": work_bytes, "t0": t0})


def _known_id(settings: Settings, item: WorkItem, staging: str) -> str:
    """The item's part id; a generated input's part made by an older longctx (named by its absolute path) is kept
    under that id where this output holds it, so its runs still find the shards they started on."""
    pid = settings.part_id(item)
    if settings.generated_name(item.url) and not os.path.exists(part_marker(staging, pid)):
        legacy = settings.part_id(item, legacy=True)
        if os.path.exists(part_marker(staging, legacy)):
            return legacy
    return pid


def _complete_as_recorded(output: str, manifest: dict, parts: List[str], tok) -> bool:
    """Whether a finished output (DONE) was merged from exactly these parts, records this tokenizer (its
    name and end-of-text id are not in the part ids: the tokens do not depend on them, the manifest does)
    and still has every file the merge writes: merging again would write the same files. Skipping it
    spares every `longctx run` of prepared data the merge."""
    if (manifest.get("parts") != parts or manifest.get("tokenizer") != identity(tok)
            or not storage.exists(storage.join(output, DONE))):
        return False
    return all(storage.exists(storage.join(output, split, name))
               for split in SPLITS for name in ("index.json", LENGTHS))


def _finish_splits(staging: str, ids: List[str], part_stats: List[dict]) -> None:
    """Each split's index over its parts and its lengths.npy, each file replaced whole under a temporary
    name of its own: two runs may re-check one complete output at once, and a run training on these
    shards reads lengths.npy memory-mapped (a file rewritten in place would change under it)."""
    for split in SPLITS:
        _merge_split(staging, split, ids)
        lengths = np.asarray([n for st in part_stats for n in st["lengths"][split]], dtype=np.int32)
        tmp = os.path.join(staging, split, f"{LENGTHS}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy")
        np.save(tmp, lengths)
        os.replace(tmp, os.path.join(staging, split, LENGTHS))


def _merge_split(staging: str, split: str, ids: List[str]) -> None:
    """One index over the split's parts (paths `part-<id>/...` relative to the split's directory)."""
    merge_index = streaming_module("base.util").merge_index

    root = os.path.join(staging, split)
    merged = tempfile.mkdtemp(prefix="longctx-index-")
    try:   # merge_index refuses to overwrite: merge aside, then replace atomically
        merge_index([os.path.join(root, f"part-{pid}", "index.json") for pid in ids], merged)
        tmp = os.path.join(root, f"index.json.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        shutil.copyfile(os.path.join(merged, "index.json"), tmp)
        os.replace(tmp, os.path.join(root, "index.json"))
    finally:
        shutil.rmtree(merged, ignore_errors=True)


def _add_counts(target: dict, st: dict) -> None:
    for k in ("records", "documents", "tokens"):
        target[k] += st[k]
    target["max_token_id"] = max(target["max_token_id"], st["max_token_id"])
    for split in SPLITS:
        for k in ("documents", "tokens"):
            target["splits"][split][k] += st["splits"][split][k]
    for reason, n in st["rejected"].items():
        target["rejected"][reason] = target["rejected"].get(reason, 0) + n
    for reason, locs in st["examples"].items():
        ex = target["examples"].setdefault(reason, [])
        ex += locs[:EXAMPLES_PER_REASON - len(ex)]


def _finish(output, staging, remote, items, ids, files, known_sha, tok, settings, log, run) -> dict:
    part_stats = []
    for pid in ids:
        with open(part_marker(staging, pid)) as f:
            part_stats.append(json.load(f))
    total = _empty_stats()
    per_input: Dict[str, dict] = {}
    for st in part_stats:
        _add_counts(total, st)
        _add_counts(per_input.setdefault(st["url"], _empty_stats()), st)
    if total["documents"] == 0:
        raise PrepareError(f"prepare: no document was produced from {len(files)} input file(s) "
                           f"({total['records']:,} records, rejected: {total['rejected'] or 'none'}; examples: "
                           f"{total['examples']}); check data.prepare.text_field ({settings.text_field!r}) and the "
                           "inputs. Nothing is marked DONE")
    _finish_splits(staging, ids, part_stats)
    seconds = time.time() - run["t0"]
    done_now = set(run["todo"])
    made_now = [st for pid, st in zip(ids, part_stats) if pid in done_now]
    manifest = {
        "format": f"longctx-mds-v{FORMAT_VERSION}",
        "documents": total["documents"],
        "tokens": total["tokens"],
        "records": total["records"],
        "splits": total["splits"],                   # train: what training reads; heldout: never trained on
        "heldout_fraction": settings.heldout_fraction,
        "rejected": dict(sorted(total["rejected"].items())),
        "rejected_examples": dict(sorted(total["examples"].items())),
        "tokenizer": identity(tok),
        "max_token_id": total["max_token_id"],     # below the model's vocabulary, or the shards do not fit it
        "columns": {"tokens": token_dtype(tok.vocab_size), "source": "str", "doc": "int"},
        "text_field": settings.text_field,
        "min_doc_tokens": settings.min_doc_tokens,
        "max_doc_tokens": settings.max_doc_tokens,
        "inputs": [{"path": f.url, "size": f.size, "version": f.version,
                    "sha256": known_sha[(f.url, f.size, f.version)],
                    **{k: per_input.get(f.url, _empty_stats())[k] for k in ("records", "documents", "tokens",
                                                                             "rejected")}} for f in files],
        "parts": [f"part-{pid}" for pid in ids],
        "run": {                                     # this invocation (the rest describes the data)
            "wall_seconds": round(seconds, 3),
            "parts_tokenized": len(made_now),
            "input_bytes": run["bytes"],
            "tokens_per_second": round(sum(st["tokens"] for st in made_now) / max(seconds, 1e-9), 1),
            "mib_per_second": round(run["bytes"] / 2**20 / max(seconds, 1e-9), 3),
            "tokenized_on": dict(sorted(Counter(st.get("node", "unknown") for st in part_stats).items())),
        },
    }
    text = json.dumps(manifest, indent=2)
    storage.write_text(os.path.join(staging, MANIFEST), text)
    if remote:
        for split in SPLITS:
            storage.upload_dir_files(os.path.join(staging, split), storage.join(remote, split),
                                     ["index.json", LENGTHS])
        storage.write_text(storage.join(remote, MANIFEST), text)
        storage.write_text(storage.join(remote, DONE), "")
    else:
        storage.write_text(os.path.join(output, DONE), "")
    rejected = sum(total["rejected"].values())
    log(f"prepare: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens written to {output} "
        f"(train {total['splits']['train']['documents']:,} documents, held out "
        f"{total['splits']['heldout']['documents']:,}); {rejected:,} records rejected"
        + (f" {manifest['rejected']}" if rejected else "") + f"; {seconds:,.1f}s")
    return manifest
