"""Packing loader over real MDS shards: exact stream, boundaries, resume, rank slicing."""
import json
from pathlib import Path

import numpy as np
import pytest

from longctx.data.config import DataConfig, PrepareConfig, TokenizerConfig
from longctx.data.prepare import prepare
from longctx.data.splits import split_url
from longctx.data.stream import IGNORE, Batch, DocumentSource, PackedStream, rank_share
from longctx.data.streaming_shm import host_registry_lock
from tests.shared import plain_streaming_dataset, shards_once

EOS = 256


def _prepared(tmp_path_factory, name, texts):
    """The train split of `texts` prepared into MDS shards (no held-out documents), once for the session's
    workers (`shards_once`), each prepare with a Ray of its own (no Ray idles beside the module's many reading
    tests)."""
    def make(root):
        with open(root / "docs.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        prepare(DataConfig(prepare=PrepareConfig(inputs=[str(root / "docs.jsonl")], output=str(root / "mds"),
                                                 chunk_bytes=1500, num_workers=2, heldout_fraction=0)),
                TokenizerConfig())
    return split_url(str(shards_once(tmp_path_factory, name, make) / "mds"), "train")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(1)
    return _prepared(tmp_path_factory, "stream", [f"doc{i} " + "x" * int(rng.integers(1, 120)) for i in range(40)])


@pytest.fixture(scope="module")
def varied_shards(tmp_path_factory):
    """Documents of random letters: a token skipped or repeated anywhere shows (runs of one letter hide it)."""
    rng = np.random.default_rng(2)
    return _prepared(tmp_path_factory, "varied",
                     ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(5, 90))) for _ in range(40)])


def independent_stream(shards):
    """Documents in shard order, each + EOS, read with a plain StreamingDataset."""
    ds = plain_streaming_dataset(local=shards, shuffle=False, batch_size=1)
    return np.concatenate([np.append(ds[i]["tokens"].astype(np.int64), EOS) for i in range(len(ds))]), len(ds)


def test_sequences_tile_the_document_stream_exactly(shards):
    stream, n_docs = independent_stream(shards)
    ps = PackedStream(DocumentSource(shards), EOS, shuffle=False)
    L = 64
    batches = [ps.next_batch(3, L) for _ in range(len(stream) // (3 * L) + 2)]   # past one epoch
    ids = np.concatenate([b.input_ids.reshape(-1) for b in batches])
    assert np.array_equal(ids[:len(stream)], stream)
    assert np.array_equal(ids[len(stream):], np.tile(stream, 2)[:len(ids) - len(stream)])   # epoch 2 continues
    for b in batches:
        for r in range(3):
            # label = next input token, except across a document boundary
            nxt = np.append(b.input_ids[r, 1:], -1)
            keep = b.labels[r] != IGNORE
            assert np.array_equal(b.labels[r, :-1][keep[:-1]], nxt[:-1][keep[:-1]])
            boundary = np.flatnonzero(np.diff(b.seq_idx[r]))
            assert np.all(b.input_ids[r, boundary] == EOS)                # a document ends with EOS
            assert np.all(b.labels[r, boundary] == IGNORE)                 # no prediction across it
            assert b.seq_idx[r, 0] == 0 and np.all(np.diff(b.seq_idx[r]) >= 0)


def flat(batches):
    """The rows of `batches` in order, as one stream: (inputs, labels)."""
    return (np.concatenate([b.input_ids.reshape(-1) for b in batches]),
            np.concatenate([b.labels.reshape(-1) for b in batches]))


def assert_continuous(ids, labels, documents):
    """`ids` is one stream of whole documents, each + EOS: every label is the next input (IGNORE only after an
    EOS), and the tokens between two EOS are a document."""
    predicted = labels[:-1] != IGNORE
    assert np.array_equal(labels[:-1][predicted], ids[1:][predicted]), "a label is not the next input"
    assert np.all(ids[:-1][~predicted] == EOS), "a prediction left out inside a document"
    ends = np.flatnonzero(ids == EOS)
    known = {tuple(d) for d in documents}
    for a, b in zip(ends[:-1], ends[1:]):
        assert tuple(ids[a + 1:b]) in known, f"tokens {a + 1}..{b} are not a whole document"


def test_resume_and_stage_change_are_exact(varied_shards):
    shards = varied_shards
    a = PackedStream(DocumentSource(shards), EOS, seed=7)
    states, batches = [], []
    for step in range(6):
        states.append(a.state_dict())
        batches.append(a.next_batch(2, 32 if step < 3 else 96))          # stage change at step 3
    b = PackedStream(DocumentSource(shards), EOS, seed=7)
    b.load_state_dict(json.loads(json.dumps(states[2])))                  # as stored in a checkpoint
    for step in range(2, 6):
        got = b.next_batch(2, 32 if step < 3 else 96)
        assert np.array_equal(got.input_ids, batches[step].input_ids)
        assert np.array_equal(got.labels, batches[step].labels)
    # the new stage starts where the old one stopped: its first input is the old one's last label (the token
    # after its last input), and nothing is skipped or repeated across the change
    assert batches[2].labels[1, -1] == IGNORE or batches[3].input_ids[0, 0] == batches[2].labels[1, -1]
    ds = plain_streaming_dataset(local=shards, shuffle=False, batch_size=1)
    documents = [ds[i]["tokens"].astype(np.int64) for i in range(len(ds))]
    ids, labels = flat(batches)
    assert_continuous(ids, labels, documents)
    change = sum(b.input_ids.size for b in batches[:3])
    with pytest.raises(AssertionError):      # what a loader that skipped a token at the stage change gives
        assert_continuous(np.delete(ids, change), np.delete(labels, change), documents)
    with pytest.raises(ValueError, match="seed 7"):
        PackedStream(DocumentSource(shards), EOS, seed=8).load_state_dict(states[0])


def test_shuffled_epochs_differ_but_are_seeded(shards):
    x = PackedStream(DocumentSource(shards), EOS, seed=1).next_batch(2, 64).input_ids
    y = PackedStream(DocumentSource(shards), EOS, seed=1).next_batch(2, 64).input_ids
    z = PackedStream(DocumentSource(shards), EOS, seed=2).next_batch(2, 64).input_ids
    assert np.array_equal(x, y) and not np.array_equal(x, z)


@pytest.mark.parametrize("dp,sp", [(1, 1), (2, 1), (1, 4), (2, 2), (4, 2)])
def test_rank_slices_cover_every_token_exactly_once(shards, dp, sp):
    batch = PackedStream(DocumentSource(shards), EOS).next_batch(4, 64)
    owner = np.full(batch.input_ids.shape, -1)
    rows, cols = np.indices(batch.input_ids.shape)
    for d in range(dp):
        for s in range(sp):
            share = rank_share(batch, d, dp, s, sp)
            assert share.input_ids.shape == (4 // dp, 64 // sp)
            r = rank_share(Batch(rows, cols, batch.seq_idx), d, dp, s, sp)
            assert np.all(owner[r.input_ids, r.labels] == -1)
            owner[r.input_ids, r.labels] = d * sp + s
            assert np.array_equal(share.input_ids, batch.input_ids[r.input_ids, r.labels])
    assert np.all(owner >= 0)
    with pytest.raises(ValueError, match="do not split over 3"):
        rank_share(batch, 0, 3)


def test_max_doc_tokens_passes_over_long_documents_exactly_and_resumes(shards):
    stream, _ = independent_stream(shards)
    docs = np.split(stream, np.flatnonzero(stream == EOS) + 1)[:-1]        # each document + EOS, in order
    limit = 60
    short = np.concatenate([d for d in docs if len(d) <= limit])
    assert 0 < len(short) < len(stream)
    ps = PackedStream(DocumentSource(shards), EOS, shuffle=False)
    states, batches = [], []
    for _ in range(len(short) // 64 + 1):
        states.append(ps.state_dict())
        batches.append(ps.next_batch(1, 63, max_doc_tokens=limit))
    ids = np.concatenate([b.input_ids.reshape(-1) for b in batches])
    assert np.array_equal(ids[:len(short)], short)                         # exactly the short documents, in order
    again = PackedStream(DocumentSource(shards), EOS, shuffle=False)
    again.load_state_dict(states[2])
    assert np.array_equal(again.next_batch(1, 63, max_doc_tokens=limit).input_ids, batches[2].input_ids)
    with pytest.raises(ValueError, match="no document has at most 3 tokens"):
        PackedStream(DocumentSource(shards), EOS).next_batch(1, 16, max_doc_tokens=3)


def test_a_position_from_re_prepared_shards_is_refused_not_looped_on(shards, tmp_path):
    """Re-preparing the data (here: other documents) under a run's checkpoint: its loader position names
    the old shards; resuming on the new ones stops with a message instead of looping in next_batch."""
    ps = PackedStream(DocumentSource(shards), EOS, seed=2)
    ps.next_batch(2, 50)
    state = json.loads(json.dumps(ps.state_dict()))
    assert state["dataset"] == DocumentSource(shards).identity
    with open(tmp_path / "other.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"other {i}"}) + "\n")          # every document shorter than before
    prepare(DataConfig(prepare=PrepareConfig(inputs=[str(tmp_path / "other.jsonl")], output=str(tmp_path / "mds"),
                                             num_workers=2, heldout_fraction=0)), TokenizerConfig())
    other = PackedStream(DocumentSource(split_url(str(tmp_path / "mds"), "train")), EOS, seed=2)
    with pytest.raises(ValueError, match="loader state was saved on the dataset .* re-prepared"):
        other.load_state_dict(state)
    # an offset past the document's end (what a changed dataset gives) is an error, never an endless loop
    other.epoch, other.doc, other.offset = state["epoch"], state["doc"], 10_000
    with pytest.raises(ValueError, match="lies past the end of that document"):
        other.next_batch(1, 16)


@pytest.mark.parametrize("damage", ["flip a byte of a decompressed shard", "truncate a decompressed shard",
                                    "flip a byte of a compressed shard", "truncate a compressed shard"])
def test_a_damaged_shard_stops_the_reader_naming_it_and_never_yields_a_wrong_document(tmp_path, shards, damage):
    import shutil

    from longctx.data.stream import DamagedShard
    root = tmp_path / "copy"
    shutil.copytree(Path(shards).parent, root)
    train = root / "train"
    clean = DocumentSource(str(train))
    expect = [clean.tokens(i) for i in range(len(clean))]
    # reading decompressed every shard next to its .zstd; damage one of them, in a new process's view
    raw = sorted(train.glob("part-*/shard.*.mds"))[-1]
    target = raw if "decompressed" in damage else raw.with_name(raw.name + ".zstd")
    if "decompressed" not in damage:
        raw.unlink()                          # so that the compressed file is read (and decompressed) again
    data = bytearray(target.read_bytes())
    if damage.startswith("flip"):
        data[len(data) - 3] ^= 0x55
    else:
        data = data[: len(data) * 2 // 3]
    target.write_bytes(bytes(data))
    source = DocumentSource(str(train))
    got = []
    with pytest.raises(DamagedShard, match=rf"damaged shard \d+ of {train}.*{raw.parent.name}/{raw.name}.*Delete"):
        for i in range(len(source)):
            got.append(source.tokens(i))
    assert all(np.array_equal(a, b) for a, b in zip(got, expect))   # nothing wrong came out before the error
    assert len(got) < len(expect)


@pytest.mark.parametrize("dp,max_doc_tokens", [(2, 0), (4, 0), (4, 40)])
def test_each_rank_reads_only_its_rows_exactly_as_the_whole_batch_and_resumes_alike(shards, dp, max_doc_tokens):
    """Rows of other ranks are passed over by document lengths alone: every rank gets exactly its rows of
    the whole batch, its position after each step equals the one-process loader's, and no token of another
    rank's rows is read."""
    whole = PackedStream(DocumentSource(shards), EOS, seed=5)
    ranks = [PackedStream(DocumentSource(shards), EOS, seed=5) for _ in range(dp)]
    read = []
    for r in [whole, *ranks]:             # count the documents each loader reads
        tokens = r.source.tokens
        r.source.tokens = lambda i, tokens=tokens, r=r: (read.append((id(r), i)), tokens(i))[1]
    rows, per = 8, 8 // dp
    for step in range(12):
        ref = whole.next_batch(rows, 48, max_doc_tokens)
        for k, r in enumerate(ranks):
            got = r.next_batch(rows, 48, max_doc_tokens, keep=range(k * per, (k + 1) * per))
            part = ref.rows(k * per, (k + 1) * per)
            assert all(np.array_equal(a, b) for a, b in ((got.input_ids, part.input_ids),
                                                          (got.labels, part.labels), (got.seq_idx, part.seq_idx)))
            assert r.state_dict() == whole.state_dict()
    reads = {id(r): sum(who == id(r) for who, _ in read) for r in [whole, *ranks]}
    # its share, plus at most the document it resumes in at each step (the one-process loader has it cached)
    assert max(reads[id(r)] for r in ranks) <= reads[id(whole)] / dp + 2 * 12 < reads[id(whole)], reads
    resumed = PackedStream(DocumentSource(shards), EOS, seed=5)
    resumed.load_state_dict(ranks[-1].state_dict())
    nxt = whole.next_batch(rows, 48, max_doc_tokens)
    assert np.array_equal(resumed.next_batch(rows, 48, max_doc_tokens, keep=range(0, per)).input_ids,
                          nxt.rows(0, per).input_ids)


def test_lengths_that_do_not_match_the_index_are_refused(tmp_path, shards):
    import shutil

    from longctx.data.stream import DamagedShard
    shutil.copytree(shards, tmp_path / "train")
    np.save(tmp_path / "train" / "lengths.npy", np.load(tmp_path / "train" / "lengths.npy")[:-1])
    with pytest.raises(DamagedShard, match="lengths.npy: .* document lengths for .* documents"):
        DocumentSource(str(tmp_path / "train")).length(0)


def test_a_length_that_disagrees_with_its_document_is_refused(tmp_path, shards):
    import shutil

    from longctx.data.stream import DamagedShard
    shutil.copytree(shards, tmp_path / "train")
    lengths = np.load(tmp_path / "train" / "lengths.npy")
    lengths[:] = lengths[::-1]                       # the same count, other values
    np.save(tmp_path / "train" / "lengths.npy", lengths)
    with pytest.raises(DamagedShard, match="lengths.npy says"):
        PackedStream(DocumentSource(str(tmp_path / "train")), EOS, shuffle=False).next_batch(4, 64)


def _docs_in_order(shards):
    """Each document's tokens + EOS, in shard order (shuffle off), read with a plain StreamingDataset."""
    ds = plain_streaming_dataset(local=shards, shuffle=False, batch_size=1)
    return [np.append(ds[i]["tokens"].astype(np.int64), EOS) for i in range(len(ds))]


@pytest.mark.parametrize("max_doc_tokens", [0, 60])
def test_lanes_are_row_stable_document_streams_exact_per_rank_and_resumable(shards, max_doc_tokens):
    """carry_state: document. Lane j's rows, joined (they overlap by one token), are documents j, j+4, j+8, ...
    (long ones passed over), each whole, so a document longer than a row continues in that lane's next row;
    `continues` marks exactly those rows; two ranks reading their own lanes get the whole batch's rows and
    the same position; a stream resumed from a state_dict continues identically; going back to one stream
    continues after the furthest document a lane reached."""
    docs = _docs_in_order(shards)
    lanes, steps, L = 4, 3, 24
    whole = PackedStream(DocumentSource(shards), EOS, shuffle=False)
    whole.next_batch(1, L)                                   # the stream inside document 0: lanes begin after it
    base = 1
    batches = [whole.next_lane_batch(lanes, steps, L, max_doc_tokens) for _ in range(4)]
    for j in range(lanes):
        rows = [b.rows(s * lanes + j, s * lanes + j + 1) for b in batches for s in range(steps)]
        joined = np.concatenate([r.input_ids[0] for r in rows])
        mine = [d for d in (docs * 3)[base + j::lanes] if not max_doc_tokens or len(d) <= max_doc_tokens]  # epochs
        expect = np.concatenate(mine)[:len(joined)]
        assert np.array_equal(joined, expect), j
        starts = np.cumsum([0] + [len(d) for d in mine])
        assert [bool(r.continues[0]) for r in rows] == [not np.isin(i * L, starts) for i in range(len(rows))], j
    # two data-parallel ranks, lanes 0-1 and 2-3
    parts = [PackedStream(DocumentSource(shards), EOS, shuffle=False) for _ in range(2)]
    for ps in parts:
        ps.next_batch(1, L)
    for b in batches:
        got = [ps.next_lane_batch(lanes, steps, L, max_doc_tokens, keep=range(2 * d, 2 * d + 2))
               for d, ps in enumerate(parts)]
        for s in range(steps):
            for d in range(2):
                assert np.array_equal(got[d].input_ids[2 * s:2 * s + 2], b.input_ids[s * 4 + 2 * d:s * 4 + 2 * d + 2])
                assert np.array_equal(got[d].continues[2 * s:2 * s + 2], b.continues[s * 4 + 2 * d:s * 4 + 2 * d + 2])
    assert parts[0].state_dict() == parts[1].state_dict() == whole.state_dict()
    # resume
    resumed = PackedStream(DocumentSource(shards), EOS, shuffle=False)
    resumed.load_state_dict(json.loads(json.dumps(whole.state_dict())))
    nxt, again = whole.next_lane_batch(lanes, steps, L, max_doc_tokens), resumed.next_lane_batch(lanes, steps, L,
                                                                                                 max_doc_tokens)
    assert np.array_equal(nxt.input_ids, again.input_ids) and np.array_equal(nxt.continues, again.continues)
    # back to one stream: after the furthest document any lane began
    st = whole.state_dict()["lanes"]
    furthest = max(base + j + i * lanes + (1 if off else 0) for j, (i, off) in enumerate(zip(st["index"], st["offset"])))
    after = whole.next_batch(1, L)
    assert np.array_equal(after.input_ids[0], np.concatenate([docs[k % len(docs)] for k in range(furthest, furthest + L)])[:L])
    assert whole.state_dict()["lanes"] is None


def _registration(prefix: int) -> list:
    """mosaicml-streaming's files of one registration number: shared memory, and file locks that hold it."""
    import glob
    import tempfile
    return sorted(glob.glob(f"/dev/shm/{prefix:06}_*") + glob.glob(f"{tempfile.gettempdir()}/{prefix:06}_*_filelock"))


def test_readers_opened_one_after_another_give_their_shared_memory_back(shards):
    """Streaming keeps every reader's registration, and an attachment to every registration it looked past,
    until the process exits: a process opening readers in turn (evaluating checkpoints, this suite) ran out of
    file descriptors. A reader gone is a registration gone, descriptors and file locks included."""
    import os
    import tempfile
    keep = DocumentSource(shards)          # one stays open: every later reader looks past its registration
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        source = DocumentSource(shards)
        prefix = source.ds._shm_prefix_int
        assert source.tokens(0).size and _registration(prefix)
        # what decompressing or downloading a shard leaves: streaming's file lock, which outlives its use
        open(os.path.join(tempfile.gettempdir(), f"{prefix:06}_cache_filelock"), "a").close()
        with host_registry_lock():     # no other job on the host takes the number before it is looked at
            del source
            assert _registration(prefix) == []
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    closed = DocumentSource(shards)
    prefix = closed.ds._shm_prefix_int
    with host_registry_lock():
        closed.close()
        assert _registration(prefix) == []
    assert keep.tokens(1).size and _registration(keep.ds._shm_prefix_int)


def test_a_killed_readers_registration_is_removed_past_a_gap_live_ones_kept_and_its_cache_reusable(shards, tmp_path):
    """A SIGKILLed reader leaves its registration; with a remote, its local cache stays refused ("Reused local
    directory", when it was killed before its first download) until the registration is removed. release_stale_streaming_shm removes it and its file lock although a free
    number lies below it (where streaming's own clean-up stops), and keeps the registrations of live readers
    (which streaming's own clean-up removes)."""
    import contextlib
    import os
    import select
    import signal
    import subprocess
    import sys
    import tempfile

    from longctx.data.streaming_shm import open_dataset
    from longctx.pipeline.parallel.shm import release_stale_streaming_shm
    live = DocumentSource(shards)
    cache = tmp_path / "cache"
    reader = ("import sys, time\nfrom longctx.data.streaming_shm import open_dataset\n"
              f"ds, _ = open_dataset(remote={shards!r}, local={str(cache)!r}, shuffle=False, batch_size=1)\n"
              "print(ds._shm_prefix_int, flush=True)\ntime.sleep(600)\n")    # killed before it downloads
    # `gap`, opened before the killed reader, holds a lower number (streaming takes the lowest free one) unless
    # another worker's reader closed below it in between (seen in the suite: 29, then 17): that attempt's killed
    # registration is released and the set-up made again
    for attempt in range(5):
        gap = DocumentSource(shards)
        # its own process group, killed whole (as a job is): Python's resource tracker, a child, dies with it
        proc = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        registry = contextlib.ExitStack()
        try:
            assert select.select([proc.stdout], [], [], 120)[0], "the reader did not open within 120 s"
            killed = int(proc.stdout.readline())
            # from here on no other job on the host registers a reader or removes a killed one's registration
            # (another run's start-up would): the numbers below are this test's to look at
            registry.enter_context(host_registry_lock())
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if gap.ds._shm_prefix_int < killed:
            break
        release_stale_streaming_shm()
        gap.close()
        registry.close()
    else:
        pytest.fail("five attempts: each time another worker's reader closed below this test's between its opens")
    with registry:
        leaked = _registration(killed)
        assert leaked
        # streaming looks for an earlier reader of this cache up to the first free number only; the lock keeps
        # other jobs from registering, not from closing their readers: one closed below `killed` meanwhile (the
        # suite's other workers) hides the leaked registration from that scan, and from it only
        if all(os.path.exists(f"/dev/shm/{n:06}_locals") for n in range(killed)):
            with pytest.raises(ValueError, match="Reused local directory"):
                open_dataset(remote=shards, local=str(cache), shuffle=False, batch_size=1)
        later = DocumentSource(shards)     # opened after the kill: it looked past the leaked registration
        gap_prefix = gap.ds._shm_prefix_int
        gap.close()
        assert gap_prefix < killed and _registration(gap_prefix) == []
        lock = os.path.join(tempfile.gettempdir(), f"{killed:06}_cache_filelock")
        open(lock, "a").close()     # what a killed reader of compressed or remote shards leaves (its number stays taken)

        removed = release_stale_streaming_shm()
        assert set(leaked) | {lock} <= set(removed)
        assert _registration(killed) == [] and not os.path.exists(lock)
        for reader in (live, later):
            assert _registration(reader.ds._shm_prefix_int) and reader.tokens(0).size
    again, release = open_dataset(remote=shards, local=str(cache), shuffle=False, batch_size=1)
    assert again[0]["tokens"].size
    release()


def _job_rank(index, shards, caches, ports, start, rounds):
    """One rank of one of two 2-rank jobs (their own process groups) that open a reader at the same moment,
    `rounds` times: what two `longctx run`s started together on one machine do."""
    import os

    import torch.distributed as dist

    from longctx.data.streaming_shm import open_dataset
    job, rank = divmod(index, 2)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[job]))
    dist.init_process_group("gloo")
    try:
        for _ in range(rounds):
            start.wait(timeout=120)
            ds, release = open_dataset(remote=shards, local=caches[job], shuffle=False, batch_size=1)
            assert ds[0]["tokens"].size
            release()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_jobs_on_one_host_open_their_readers_at_the_same_moment(shards, tmp_path):
    """Streaming picks its registration number by scanning for the first free one: two jobs scanning at once
    took the same one (`FileExistsError: '/000000_locals'`, or a rank attaching to the other job's number and
    failing). The host's jobs register one at a time (data/streaming_shm.py), so every round opens in both."""
    import multiprocessing

    import torch.multiprocessing as mp

    from longctx.launch.local import free_port
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    caches = [str(tmp_path / "cache-a"), str(tmp_path / "cache-b")]
    mp.start_processes(_job_rank, args=(shards, caches, [free_port(), free_port()], start, 6), nprocs=4,
                       start_method="spawn")
