"""`longctx bench data`: tokenization throughput of `prepare` against raw `tokenizers` encode_batch on the
same cores, packing-loader tokens/s from the local cache, and the loader's tokens/s per rank when R ranks
share each step (one row each): reading only its row against packing the whole batch and slicing (what
every rank did before). Ratios are measured in one process run."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from longctx.data.config import DataConfig, PrepareConfig, TokenizerConfig
from longctx.data.synthetic import make_document


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    rng, written = random.Random(seed), 0
    with open(path, "w") as f:
        while written < megabytes * 1e6:
            line = json.dumps({"text": make_document(rng, rng.randint(2000, 20000))}) + "\n"
            f.write(line)
            written += len(line)
    return written


def train_tokenizer(corpus: Path, out: Path, vocab_size: int = 8192) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    with open(corpus) as f:
        sample = [json.loads(next(f))["text"] for _ in range(50)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "<|endoftext|>"])
    tok.train_from_iterator(sample, trainer)
    tok.save(str(out))
    return out


def raw_encode_batch(corpus: Path, tokenizer: Path, batch: int = 512) -> tuple:
    """tokens/s of tokenizers' own encode_batch (all cores through its thread pool)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer))
    t0, tokens, texts = time.perf_counter(), 0, []
    with open(corpus) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == batch:
                tokens += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
                texts = []
    if texts:
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return tokens, time.perf_counter() - t0


def per_rank_loader(source, eos_id: int, ranks: int, seq_len: int, steps: int) -> dict:
    """Tokens/s of rank 0's rows when `ranks` ranks share each step, one row each: its own rows only
    (`keep`) against the whole batch packed and sliced. Both loaders start at the same position."""
    from longctx.data.stream import PackedStream
    out = {}
    for name, keep in (("whole_batch", None), ("own_rows", range(0, 1))):
        ps = PackedStream(source, eos_id=eos_id, seed=1)
        ps.next_batch(1, seq_len)                                # open the shards
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = ps.next_batch(ranks, seq_len, keep=keep)
            rows = batch.rows(0, 1)
        out[name] = steps * rows.input_ids.size / (time.perf_counter() - t0)
    return {f"loader_tokens_per_s_per_rank_{ranks}_ranks_whole_batch": out["whole_batch"],
            f"loader_tokens_per_s_per_rank_{ranks}_ranks_own_rows": out["own_rows"],
            f"loader_per_rank_speedup_{ranks}_ranks": out["own_rows"] / out["whole_batch"]}


def run_data_bench(megabytes: float = 100, workers: int = 2, tokenizer: Optional[str] = None,
                   loader_tokens: int = 20_000_000, seq_len: int = 8192, ranks=(8, 64)) -> dict:
    from longctx.data.prepare import part_marker, prepare
    from longctx.data.splits import split_url
    from longctx.data.stream import DocumentSource, PackedStream
    work = Path(tempfile.mkdtemp(prefix="longctx-bench-data-"))
    corpus = work / "corpus.jsonl"
    size = write_corpus(corpus, megabytes)
    tok_path = Path(tokenizer) if tokenizer else train_tokenizer(corpus, work / "tokenizer.json")
    os.environ["RAYON_NUM_THREADS"] = str(workers)            # raw baseline gets the same cores
    raw_tokens, raw_s = raw_encode_batch(corpus, tok_path)
    os.environ["RAYON_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    progress_rates = []
    manifest = prepare(DataConfig(prepare=PrepareConfig(inputs=[str(corpus)], output=str(work / "mds"),
                                                        num_workers=workers, chunk_bytes=8 << 20)),
                       TokenizerConfig(kind="hf", path=str(tok_path)), log=progress_rates.append)
    prep_s = time.perf_counter() - t0
    assert manifest["tokens"] == raw_tokens, "prepare and encode_batch disagree on the token count"

    worker_s = sum(json.loads(Path(part_marker(str(work / "mds"), part[len("part-"):])).read_text())["seconds"]
                   for part in manifest["parts"])
    ps = PackedStream(DocumentSource(split_url(str(work / "mds"), "train")), eos_id=manifest["tokenizer"]["eos_id"])
    ps.next_batch(1, seq_len)                                   # open the shards
    t0, read = time.perf_counter(), 0
    while read < loader_tokens:
        read += ps.next_batch(8, seq_len).input_ids.size
    loader_s = time.perf_counter() - t0
    per_rank = {}
    for r in ranks:
        per_rank.update(per_rank_loader(ps.source, manifest["tokenizer"]["eos_id"], r, seq_len,
                                        steps=max(2, loader_tokens // (r * seq_len))))
    shutil.rmtree(work, ignore_errors=True)
    return {"bench": "data", "corpus_bytes": size, "workers": workers, "tokens": raw_tokens,
            "raw_encode_batch_tokens_per_s": raw_tokens / raw_s,
            "prepare_tokens_per_s_end_to_end": raw_tokens / prep_s,
            "prepare_vs_raw_ratio": (raw_tokens / prep_s) / (raw_tokens / raw_s),
            # workers busy tokenizing and writing shards, without Ray start-up and worker imports
            "prepare_tokens_per_s_workers": raw_tokens / (worker_s / workers),
            "prepare_workers_vs_raw_ratio": (raw_tokens / (worker_s / workers)) / (raw_tokens / raw_s),
            "loader_tokens_per_s": read / loader_s, **per_rank}
