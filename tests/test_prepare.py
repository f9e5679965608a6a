"""`longctx prepare`: Ray tokenization into MDS shards, local and over a real S3 endpoint."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from longctx.data import storage
from longctx.data.config import DataConfig, PrepareConfig, TokenizerConfig
from longctx.data.prepare import prepare
from longctx.data.splits import SPLITS
from longctx.data.storage import StorageError
from tests.s3 import make_bucket
from tests.shared import longctx_here, plain_streaming_dataset

pytestmark = pytest.mark.usefixtures("local_ray")


def good_text(i):
    return f"document {i}: " + "lorem ipsum dolor sit amet, ünïcode ✓ " * (1 + i % 7)


def write_corpus(root, n_good=60):
    """Every input format and every bad-record kind; returns (good texts in order, expected rejections)."""
    os.makedirs(root, exist_ok=True)
    good, rejected = [], {}

    def bad(reason):
        rejected[reason] = rejected.get(reason, 0) + 1

    lines = []
    for i in range(n_good):
        t = good_text(i)
        lines.append(json.dumps({"text": t, "id": i}).encode())
        good.append(t)
        if i == 5:
            lines.append(b"{not json"); bad("invalid_json")
        if i == 9:
            lines.append(json.dumps({"body": "no text field"}).encode()); bad("missing_field")
        if i == 13:
            lines.append(b'{"text": "caf\xe9 latin-1"}'); bad("not_utf8")
        if i == 17:
            lines.append(json.dumps({"text": "   "}).encode()); bad("empty_text")
        if i == 21:
            lines.append(b'{"text": "' + b"x" * 200_000 + b'"}'); bad("line_too_long")
        if i == 25:
            lines.append(json.dumps({"text": 42}).encode()); bad("not_text")
        if i == 29:
            lines.append(b"[1, 2, 3]"); bad("not_an_object")
        if i == 33:
            lines.append(b""); bad("blank_line")
        if i == 37:
            lines.append(json.dumps({"text": "ab"}).encode()); bad("too_short")
    with open(os.path.join(root, "a.jsonl"), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    gz = [good_text(100 + i) for i in range(5)]
    with gzip.open(os.path.join(root, "b.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz)
    zs = [good_text(200 + i) for i in range(5)]
    with open(os.path.join(root, "c.jsonl.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in zs).encode()))
    pqt = [good_text(300 + i) for i in range(4)]
    pq.write_table(pa.table({"text": pqt + [None]}), os.path.join(root, "d.parquet"))
    bad("missing_field")
    txt = good_text(400) * 30
    with open(os.path.join(root, "e.txt"), "w") as f:
        f.write(txt)
    return good + gz + zs + pqt + [txt], rejected


def config(inputs, output, **kw):
    return DataConfig(prepare=PrepareConfig(inputs=inputs, output=output, num_workers=2, chunk_bytes=2048,
                                            max_line_bytes=100_000, min_doc_tokens=5, **kw))


def read_back(root, cache=None, splits=SPLITS):
    """The documents of the splits, each read with a plain StreamingDataset (remote + cache, or local)."""
    manifest = json.loads(storage.read_text(storage.join(root, "manifest.json")))
    out = []
    for split in splits:
        if manifest["splits"][split]["documents"] == 0:
            continue
        url = storage.join(root, split)
        kw = dict(remote=url, local=os.path.join(cache, split)) if cache else dict(local=url)
        ds = plain_streaming_dataset(shuffle=False, batch_size=1, **kw)
        out += [ds[i] for i in range(len(ds))]
    return out


def data_of(manifest):
    """The manifest without its `run` section (this invocation's wall time, rates, nodes)."""
    return {k: v for k, v in manifest.items() if k != "run"}


def test_local_every_format_bad_records_counted_tokens_exact(tmp_path, capsys):
    good, rejected = write_corpus(tmp_path / "in")
    manifest = prepare(config([str(tmp_path / "in" / "*")], str(tmp_path / "out")), TokenizerConfig())
    assert manifest["rejected"] == dict(sorted(rejected.items()))
    assert all(manifest["rejected_examples"][r] for r in rejected)
    assert manifest["rejected_examples"]["invalid_json"][0].endswith("a.jsonl:7")   # line 7 of a.jsonl
    # independent tokenization: the byte tokenizer is UTF-8
    expect = sorted(len(t.encode()) for t in good)
    samples = read_back(str(tmp_path / "out"))
    assert sorted(len(s["tokens"]) for s in samples) == expect
    assert manifest["tokens"] == sum(expect) and manifest["documents"] == len(good)
    assert all(s["tokens"].dtype == np.uint16 for s in samples)
    by_text = {bytes(s["tokens"].astype(np.uint8)).decode() for s in samples}
    assert by_text == set(good)
    first = [s for s in samples if s["source"].endswith("a.jsonl") and s["doc"] == 0]
    assert bytes(first[0]["tokens"].astype(np.uint8)).decode() == good[0]
    inputs = {os.path.basename(i["path"]): i for i in manifest["inputs"]}
    assert inputs["a.jsonl"]["size"] == os.path.getsize(tmp_path / "in" / "a.jsonl")
    assert len(inputs["a.jsonl"]["sha256"]) == 64
    assert manifest["tokenizer"]["kind"] == "byte" and len(manifest["tokenizer"]["sha256"]) == 64
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    assert (tmp_path / "out" / "DONE").exists()
    assert "records/s" in capsys.readouterr().err


def test_rerun_is_idempotent_and_new_inputs_add_only_their_work(tmp_path):
    write_corpus(tmp_path / "in")
    cfg = config([str(tmp_path / "in" / "*.jsonl")], str(tmp_path / "out"))
    logs = []
    first = prepare(cfg, TokenizerConfig(), log=logs.append)
    parts = sorted(os.listdir(tmp_path / "out" / "parts"))
    mtimes = {p: os.path.getmtime(tmp_path / "out" / "parts" / p) for p in parts}
    merged = [tmp_path / "out" / name for name in ("manifest.json", "train/index.json", "train/lengths.npy",
                                                   "heldout/index.json", "heldout/lengths.npy")]
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in merged}
    logs.clear()
    again = prepare(cfg, TokenizerConfig(), log=logs.append)
    assert data_of(again) == data_of(first) and again["run"]["parts_tokenized"] == 0
    assert any("nothing to tokenize" in line for line in logs)
    assert {p: os.path.getmtime(tmp_path / "out" / "parts" / p) for p in parts} == mtimes
    # complete and unchanged: the indexes, lengths and manifest are not merged and written again
    assert any("nothing rewritten" in line for line in logs)
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in merged} == stamps
    # a file the merge writes gone: merged again, the same as before
    index = (tmp_path / "out" / "heldout" / "index.json").read_text()
    (tmp_path / "out" / "heldout" / "index.json").unlink()
    logs.clear()
    assert data_of(prepare(cfg, TokenizerConfig(), log=logs.append)) == data_of(first)
    assert not any("nothing rewritten" in line for line in logs)
    assert (tmp_path / "out" / "heldout" / "index.json").read_text() == index

    with open(tmp_path / "in" / "z.jsonl", "w") as f:
        f.writelines(json.dumps({"text": good_text(900 + i)}) + "\n" for i in range(20))
    logs.clear()
    grown = prepare(cfg, TokenizerConfig(), log=logs.append)
    assert any(f"{len(grown['parts']) - len(parts)} to do, {len(parts)} already done" in line for line in logs)
    assert {p: os.path.getmtime(tmp_path / "out" / "parts" / p) for p in parts} == mtimes
    assert grown["documents"] == first["documents"] + 20


def test_generated_documents_keep_their_parts_wherever_the_output_lies(tmp_path, monkeypatch):
    """An output with data.prepare.synthetic, moved or copied (new mtimes) or reached by another path, is found
    complete: its parts were named by the generated file's absolute path and mtime, so it was prepared again as a
    new part and every run on it refused to resume ("data (the shards) changed"). A part an older longctx made
    that way is kept under its old id where the output still holds it."""
    import shutil

    from longctx.data.config import SyntheticConfig
    from longctx.data.prepare import Settings

    def synthetic(out):
        return DataConfig(prepare=PrepareConfig(output=str(out), num_workers=1, heldout_fraction=0.2,
                                                synthetic=SyntheticConfig(documents=40, min_tokens=50, max_tokens=300)))
    first = prepare(synthetic(tmp_path / "a"), TokenizerConfig())
    os.rename(tmp_path / "a", tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tmp_path / "copied", copy_function=shutil.copy)    # new mtimes
    for out in ("moved", "copied"):
        again = prepare(synthetic(tmp_path / out), TokenizerConfig())
        assert again["run"]["parts_tokenized"] == 0 and again["parts"] == first["parts"], out
    # an output an older longctx prepared: its part named by the absolute path (and mtime), kept as it is
    new_style = Settings.part_id
    monkeypatch.setattr(Settings, "part_id", lambda self, item, legacy=False: new_style(self, item, legacy=True))
    old = prepare(synthetic(tmp_path / "old"), TokenizerConfig())
    monkeypatch.setattr(Settings, "part_id", new_style)
    assert old["parts"] != first["parts"]
    again = prepare(synthetic(tmp_path / "old"), TokenizerConfig())
    assert again["run"]["parts_tokenized"] == 0 and again["parts"] == old["parts"]
    assert [again[k] for k in ("documents", "tokens", "splits")] == [first[k] for k in ("documents", "tokens", "splits")]


def test_runs_that_recheck_a_complete_output_at_once_neither_fail_nor_tear_its_files(tmp_path):
    """Two `longctx run`s of one config both re-check its complete shards (prepare finds nothing to do
    and rewrites the split indexes and lengths): each file is replaced whole under a name of its own,
    so neither fails, and a reader holding the old lengths file memory-mapped keeps a whole file."""
    import threading

    from longctx.data.prepare import _finish_splits
    write_corpus(tmp_path / "in")
    cfg = config([str(tmp_path / "in" / "*.jsonl")], str(tmp_path / "out"))
    first = prepare(cfg, TokenizerConfig())
    lengths = tmp_path / "out" / "train" / "lengths.npy"
    held = np.load(lengths, mmap_mode="r")
    before = np.array(held)
    ids = [p[len("part-"):-len(".json")] for p in sorted(os.listdir(tmp_path / "out" / "parts"))]
    stats = [json.loads((tmp_path / "out" / "parts" / f"part-{pid}.json").read_text()) for pid in ids]
    errors = []

    def recheck():
        try:
            for _ in range(15):
                _finish_splits(str(tmp_path / "out"), ids, stats)
        except Exception as e:       # noqa: BLE001 - any failure of a concurrent re-check is the bug
            errors.append(e)
    threads = [threading.Thread(target=recheck) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert np.array_equal(np.array(held), before)
    assert data_of(prepare(cfg, TokenizerConfig())) == data_of(first)


def test_hf_tokenizer_matches_tokenizers_library(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    good, _ = write_corpus(tmp_path / "in", n_good=20)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(good, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    manifest = prepare(config([str(tmp_path / "in" / "*.jsonl")], str(tmp_path / "out")),
                       TokenizerConfig(kind="hf", path=str(tmp_path / "tokenizer.json")))
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    expect = sorted(tuple(ref.encode(t, add_special_tokens=False).ids) for t in good[:20])
    got = sorted(tuple(int(x) for x in s["tokens"]) for s in read_back(str(tmp_path / "out")))
    assert got == [e for e in expect if len(e) >= 5]
    assert manifest["tokenizer"]["eos_id"] == ref.token_to_id("<|endoftext|>")
    # another end-of-text id: the same tokens and parts (documents are written without it), another identity,
    # which the manifest must record (training refuses shards whose manifest names another tokenizer)
    again = prepare(config([str(tmp_path / "in" / "*.jsonl")], str(tmp_path / "out")),
                    TokenizerConfig(kind="hf", path=str(tmp_path / "tokenizer.json"), eos_id=0))
    assert again["parts"] == manifest["parts"] and manifest["tokenizer"]["eos_id"] != 0
    assert again["tokenizer"]["eos_id"] == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tokenizer"]["eos_id"] == 0


def test_a_run_killed_while_merging_other_parts_leaves_no_done_and_the_next_merges_again(tmp_path, monkeypatch):
    """A config that drops an input tokenizes nothing but merges the indexes again; killed between the
    indexes and the manifest, the output must not look complete (the next run would trust indexes that
    the manifest does not describe)."""
    import longctx.data.prepare as module
    os.makedirs(tmp_path / "in")
    for name in ("a", "b"):
        with open(tmp_path / "in" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": f"{name} " + good_text(i)}) + "\n" for i in range(30))
    both = config([str(tmp_path / "in" / "*.jsonl")], str(tmp_path / "out"))
    first = prepare(both, TokenizerConfig())
    index = (tmp_path / "out" / "train" / "index.json").read_text()
    merge = module._finish_splits

    def killed(*args):
        merge(*args)
        raise RuntimeError("killed after merging the indexes")
    monkeypatch.setattr(module, "_finish_splits", killed)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(config([str(tmp_path / "in" / "a.jsonl")], str(tmp_path / "out")), TokenizerConfig())
    monkeypatch.undo()
    assert not (tmp_path / "out" / "DONE").exists()
    assert (tmp_path / "out" / "train" / "index.json").read_text() != index      # a's parts only
    assert data_of(prepare(both, TokenizerConfig())) == data_of(first)
    assert (tmp_path / "out" / "train" / "index.json").read_text() == index


def test_s3_to_s3_read_back_with_plain_streaming_dataset(tmp_path, s3_endpoint):
    good, rejected = write_corpus(tmp_path / "in")
    client = make_bucket("corpus")
    for name in os.listdir(tmp_path / "in"):
        client.upload_file(str(tmp_path / "in" / name), "corpus", f"raw/{name}")
    cfg = config(["s3://corpus/raw/*"], "s3://corpus/mds", staging=str(tmp_path / "staging"))
    manifest = prepare(cfg, TokenizerConfig())
    assert manifest["rejected"] == dict(sorted(rejected.items()))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="corpus", Prefix="mds/")["Contents"]}
    assert {"mds/train/index.json", "mds/heldout/index.json", "mds/manifest.json", "mds/DONE"} <= keys
    samples = read_back("s3://corpus/mds", cache=str(tmp_path / "cache"))
    assert sorted(len(s["tokens"]) for s in samples) == sorted(len(t.encode()) for t in good)
    assert all(s["source"].startswith("s3://corpus/raw/") for s in samples)
    # a second machine (empty staging) finds the remote parts done and does no work
    logs = []
    again = prepare(config(["s3://corpus/raw/*"], "s3://corpus/mds", staging=str(tmp_path / "staging2")),
                    TokenizerConfig(), log=logs.append)
    assert data_of(again) == data_of(manifest) and any("nothing to tokenize" in line for line in logs)


def test_errors_before_work(tmp_path, s3_endpoint):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.csv").write_text("a,b\n")
    with pytest.raises(StorageError, match="matches no files"):
        prepare(config([str(tmp_path / "missing" / "*.jsonl")], str(tmp_path / "out")), TokenizerConfig())
    with pytest.raises(ValueError, match="unsupported input format"):
        prepare(config([str(tmp_path / "in" / "*.csv")], str(tmp_path / "out")), TokenizerConfig())
    with pytest.raises(StorageError, match="bucket does not exist"):
        prepare(config(["s3://no-such-bucket/raw/*.jsonl"], str(tmp_path / "out")), TokenizerConfig())
    (tmp_path / "in" / "ok.jsonl").write_text('{"text": "hello there"}\n')
    with pytest.raises(StorageError, match="bucket 'nowhere' does not exist"):
        prepare(config([str(tmp_path / "in" / "*.jsonl")], "s3://nowhere/out"), TokenizerConfig())
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        prepare(config([str(tmp_path / "in" / "*.jsonl")], str(tmp_path / "out")),
                TokenizerConfig(kind="hf", path=str(tmp_path / "none.json")))
    assert not (tmp_path / "out" / "DONE").exists()


def test_killed_run_then_rerun_equals_clean_run(tmp_path):
    """A real SIGKILL of `longctx prepare` midway; the re-run completes to exactly a clean run's output."""
    inp = tmp_path / "in"
    inp.mkdir()
    with open(inp / "big.jsonl", "w") as f:
        f.writelines(json.dumps({"text": good_text(i) * 3}) + "\n" for i in range(800))
    yaml = tmp_path / "c.yaml"

    def write_cfg(out):
        yaml.write_text(f"data:\n  prepare:\n    inputs: ['{inp}/*.jsonl']\n    output: '{out}'\n"
                        f"    num_workers: 1\n    chunk_bytes: 20000\n")
    exe = [sys.executable, "-m", "longctx", "prepare", str(yaml)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    write_cfg(tmp_path / "killed")
    proc = subprocess.Popen(exe, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        marks = tmp_path / "killed" / "parts"
        parts = os.listdir(marks) if marks.exists() else []
        if sum(p.endswith(".json") and ".tmp" not in p for p in parts) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "the run finished before it could be killed"
    # the re-run and the clean run in this process, on the module's Ray (what is checked is the output the
    # killed run's parts lead to; the command line is the killed run's): no Ray started for each
    resumed, _ = (prepare(DataConfig(prepare=PrepareConfig(inputs=[f"{inp}/*.jsonl"], output=str(tmp_path / out),
                                                           num_workers=1, chunk_bytes=20000)), TokenizerConfig())
                  for out in ("killed", "clean"))
    assert resumed["run"]["parts_tokenized"] <= len(resumed["parts"]) - 3       # the killed run's parts kept
    killed, clean = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("killed", "clean"))
    assert data_of(killed) == data_of(clean)
    for split in SPLITS:
        assert (tmp_path / "killed" / split / "index.json").read_text() == \
            (tmp_path / "clean" / split / "index.json").read_text()
    a, b = read_back(str(tmp_path / "killed")), read_back(str(tmp_path / "clean"))
    assert len(a) == len(b) == 800
    assert all(np.array_equal(x["tokens"], y["tokens"]) and x["doc"] == y["doc"] for x, y in zip(a, b))


def _id_doc(i):
    return f"[[doc {i:04d}]] " + "filler words for a document of some length " * (1 + i % 5)


def _texts(samples):
    return {bytes(s["tokens"].astype(np.uint8)).decode() for s in samples}


def test_heldout_split_is_by_content_disjoint_stable_and_never_reaches_a_training_batch(tmp_path):
    import re

    from longctx.data.splits import is_heldout
    from longctx.data.stream import PackedStream, open_splits
    docs = [_id_doc(i) for i in range(300)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "in" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:40]))  # copies
    first = prepare(config([str(tmp_path / "in" / "*.jsonl")], str(tmp_path / "one"), heldout_fraction=0.25),
                    TokenizerConfig())
    train = _texts(read_back(str(tmp_path / "one"), splits=["train"]))
    held = _texts(read_back(str(tmp_path / "one"), splits=["heldout"]))
    assert not train & held and train | held == set(docs)          # disjoint by content; copies in one split
    assert held == {t for t in docs if is_heldout(t, 0.25)}
    assert 0.15 < len(held) / len(docs) < 0.35
    n_held_pieces = sum(1 + (t in docs[:40]) for t in held)
    assert first["splits"]["heldout"]["documents"] == n_held_pieces
    assert first["splits"]["train"]["documents"] + n_held_pieces == first["documents"] == 340

    # other work items, another worker count, an added input: no document changes its split
    (tmp_path / "in" / "c.jsonl").write_text("".join(json.dumps({"text": _id_doc(i)}) + "\n" for i in range(300, 360)))
    prepare(DataConfig(prepare=PrepareConfig(inputs=[str(tmp_path / "in" / "*.jsonl")], output=str(tmp_path / "two"),
                                             num_workers=1, chunk_bytes=50_000, heldout_fraction=0.25)),
            TokenizerConfig())
    held2 = _texts(read_back(str(tmp_path / "two"), splits=["heldout"]))
    assert held2 & set(docs) == held and held2 - set(docs) == {_id_doc(i) for i in range(300, 360)} & held2

    # what the trainer reads: two epochs of its training stream hold every training document, no held-out one
    source, _ = open_splits(str(tmp_path / "one"))
    stream = PackedStream(source, eos_id=256, seed=3)
    seen = set()
    while stream.epoch < 2:
        ids = stream.next_batch(4, 512).input_ids
        seen |= set(re.findall(rb"\[\[doc (\d{4})\]\]", bytes(ids[ids < 256].astype(np.uint8))))
    assert {int(x) for x in seen} == {int(t[6:10]) for t in train}


def longctx_prepare(cfg, capsys):
    """`longctx prepare CONFIG` as the command runs it (its exit status, stdout, stderr), in this process: the
    module's Ray is already up."""
    return longctx_here(capsys, "prepare", cfg)


def test_damaged_inputs_keep_what_is_readable_are_reported_and_set_the_exit_status(tmp_path, capsys):
    """A .jsonl.gz and a .jsonl.zst cut in the middle, a .parquet without its footer: the records before the
    damage are kept, each file is counted under `damaged_file` with its name, the other inputs finish, and
    `longctx prepare` exits 3 (complete, with rejections)."""
    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)            # incompressible enough for several zstd blocks (128 KiB each)
    docs = [_id_doc(i) + "".join(rng.choice(list("abcdefghij klmnop"), 600)) for i in range(1000)]
    payload = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    (root / "ok.jsonl").write_bytes(payload)
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(payload)[:len(gzip.compress(payload)) // 2])
    zs = zstandard.ZstdCompressor().compressobj()
    zdata = zs.compress(payload) + zs.flush()                      # streamed, like the zstd command
    (root / "cut.jsonl.zst").write_bytes(zdata[:len(zdata) // 2])
    pq.write_table(pa.table({"text": docs}), root / "cut.parquet")
    (root / "cut.parquet").write_bytes((root / "cut.parquet").read_bytes()[:-100])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{prepare: {{inputs: ['{root}/*'], output: '{tmp_path / 'out'}', num_workers: 2}}}}\n")
    r = longctx_prepare(cfg, capsys)
    assert r.returncode == 3, r.stdout + r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rejected"] == {"damaged_file": 3} and (tmp_path / "out" / "DONE").exists()
    examples = " ".join(manifest["rejected_examples"]["damaged_file"])
    assert all(name in examples for name in ("cut.jsonl.gz", "cut.jsonl.zst", "cut.parquet")), examples
    assert "truncated" in examples and "cannot be read as parquet" in examples
    per_input = {os.path.basename(i["path"]): i for i in manifest["inputs"]}
    assert per_input["ok.jsonl"]["documents"] == 1000 and per_input["cut.parquet"]["documents"] == 0
    texts = {}
    for s in read_back(str(tmp_path / "out")):
        texts.setdefault(os.path.basename(s["source"]), []).append((s["doc"], bytes(s["tokens"].astype(np.uint8))))
    for name in ("cut.jsonl.gz", "cut.jsonl.zst"):
        kept = sorted(texts[name])
        assert 0 < per_input[name]["documents"] == len(kept) < 1000
        assert [t.decode() for _, t in kept] == docs[:len(kept)]          # the records before the damage, intact
    assert "damaged_file" in r.stdout + r.stderr and "exit status 3" in r.stderr
    assert manifest["run"]["wall_seconds"] > 0 and manifest["run"]["tokens_per_second"] > 0
    assert "MiB/s" in r.stderr and "rejected" in r.stderr


def test_a_prepare_that_produces_no_document_fails_and_writes_no_done(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": _id_doc(i)}) + "\n" for i in range(20)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{prepare: {{inputs: ['{tmp_path}/a.jsonl'], output: '{tmp_path / 'out'}'}}}}\n")
    r = longctx_prepare(cfg, capsys)
    assert r.returncode == 1 and "no document was produced" in r.stderr and "text_field ('text')" in r.stderr
    assert "missing_field" in r.stderr and not (tmp_path / "out" / "DONE").exists()


def _objects(client, bucket, prefix):
    """{key below prefix: bytes} of the shards and indexes (not the per-run records: parts/*.json, manifest)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            key = o["Key"][len(prefix) + 1:]
            if key.split("/")[0] in SPLITS:
                out[key] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _markers(client, bucket, prefix):
    return client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/parts/").get("KeyCount", 0)


@pytest.mark.timeout(600)
def test_s3_outages_during_upload_are_retried_or_stop_cleanly_and_a_rerun_finishes_identically(tmp_path,
                                                                                               s3_endpoint):
    """A relay in front of the S3 server goes down while `longctx prepare` uploads: back within the retry window,
    the run finishes; down for good, it stops naming the endpoint and the object, and a re-run once the server
    is back finishes. Both outputs equal a clean run's, object for object."""
    from tests.s3 import Outage
    client = make_bucket("faults")
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(
        json.dumps({"text": _id_doc(i) + "".join(rng.choice(list("abcdefgh "), 2000))}) + "\n" for i in range(360)))
    relay = Outage(s3_endpoint)

    def run(prefix, endpoint, attempts, timeout_s):
        cfg = tmp_path / f"{prefix}.yaml"
        cfg.write_text(f"data:\n  prepare: {{inputs: ['{tmp_path}/in/*.jsonl'], output: 's3://faults/{prefix}', "
                       f"staging: '{tmp_path / prefix}', chunk_bytes: 80000, num_workers: 2, heldout_fraction: 0.1}}\n"
                       f"  s3: {{max_attempts: {attempts}, timeout_s: {timeout_s}}}\n")
        return subprocess.Popen([sys.executable, "-m", "longctx", "prepare", str(cfg)], text=True,
                                env={**os.environ, "S3_ENDPOINT_URL": endpoint},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def when_uploading(proc, prefix):
        deadline = time.time() + 180
        while _markers(client, "faults", prefix) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)

    prepare(DataConfig(prepare=PrepareConfig(inputs=[f"{tmp_path}/in/*.jsonl"], output="s3://faults/clean",
                                             staging=str(tmp_path / "clean"), chunk_bytes=80000, num_workers=2,
                                             heldout_fraction=0.1)), TokenizerConfig())
    expect = _objects(client, "faults", "clean")
    assert len([k for k in expect if k.endswith(".zstd")]) >= 8

    brief = run("brief", relay.url, 10, 2)
    when_uploading(brief, "brief")
    relay.down()
    time.sleep(3)
    relay.up()
    out, err = brief.communicate(timeout=300)
    assert brief.returncode == 0, err[-3000:]
    assert _objects(client, "faults", "brief") == expect

    lasting = run("lasting", relay.url, 3, 1)
    when_uploading(lasting, "lasting")
    relay.down()
    out, err = lasting.communicate(timeout=300)
    assert lasting.returncode == 1
    assert f"the S3 endpoint {relay.url} did not answer after 3 attempts" in err and "s3://faults/lasting/" in err
    assert not _objects(client, "faults", "lasting").keys() >= expect.keys()      # stopped before the end
    relay.up()
    again = run("lasting", relay.url, 3, 1)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert _objects(client, "faults", "lasting") == expect
    assert "already done" in out + err


def test_credentials_the_server_refuses_stop_before_any_work(tmp_path):
    """A second local S3 server that checks keys (moto's IAM auth: no user has the test's keys): both an
    s3:// output and s3:// inputs are refused as access denied before anything is read or written."""
    from tests.s3 import start_moto
    server, url = start_moto(env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    saved = os.environ.get("S3_ENDPOINT_URL")
    try:
        os.environ["S3_ENDPOINT_URL"] = url
        (tmp_path / "in.jsonl").write_text('{"text": "hello there"}\n')
        with pytest.raises(StorageError, match=r"s3://guarded/out: access denied .*AWS_ACCESS_KEY_ID"):
            prepare(config([str(tmp_path / "in.jsonl")], "s3://guarded/out", staging=str(tmp_path / "st")),
                    TokenizerConfig())
        with pytest.raises(StorageError, match=r"s3://guarded/raw/\*.jsonl: access denied"):
            prepare(config(["s3://guarded/raw/*.jsonl"], str(tmp_path / "out")), TokenizerConfig())
        assert not (tmp_path / "st").exists() and not (tmp_path / "out" / "DONE").exists()
    finally:
        if saved is None:
            os.environ.pop("S3_ENDPOINT_URL", None)
        else:
            os.environ["S3_ENDPOINT_URL"] = saved
        server.terminate()
        server.wait(10)


class _Chunks:
    """A raw stream that returns the given byte strings one per read: a frame ending exactly at a read."""

    def __init__(self, chunks):
        self.chunks = list(chunks)

    def read(self, n=-1):
        return self.chunks.pop(0) if self.chunks else b""


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_frames_ending_at_a_read_and_gzip_zero_padding_are_not_damage(fmt):
    import io

    from longctx.data.records import _Decompressed
    lines = [json.dumps({"text": _id_doc(i)}).encode() + b"\n" for i in range(6)]
    pack = gzip.compress if fmt == "jsonl.gz" else zstandard.ZstdCompressor().compress
    frames = [pack(b"".join(lines[:3])), pack(b"".join(lines[3:]))]
    chunks = frames + ([b"\0" * 512] if fmt == "jsonl.gz" else [])       # gzip accepts trailing zero padding
    f = io.BufferedReader(_Decompressed(_Chunks(chunks), fmt))
    assert f.read() == b"".join(lines)


def test_a_remote_part_lost_after_another_machine_saw_it_done_is_made_again(tmp_path, s3_endpoint):
    """Machine B found every part done in the bucket (it fetched their indexes, not their shards); when a part
    is then lost from the bucket, B's re-run tokenizes it again instead of uploading an index without shards."""
    write_corpus(tmp_path / "in")
    client = make_bucket("lost")
    first = prepare(config([str(tmp_path / "in" / "*.jsonl")], "s3://lost/mds", staging=str(tmp_path / "a")),
                    TokenizerConfig())
    expect = _objects(client, "lost", "mds")
    prepare(config([str(tmp_path / "in" / "*.jsonl")], "s3://lost/mds", staging=str(tmp_path / "b")),
            TokenizerConfig())
    part = first["parts"][0]
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="lost", Prefix="mds/"):
        for o in page.get("Contents", []):
            if f"/{part}/" in o["Key"] or o["Key"].endswith(f"{part}.json"):
                client.delete_object(Bucket="lost", Key=o["Key"])
    assert _objects(client, "lost", "mds") != expect
    again = prepare(config([str(tmp_path / "in" / "*.jsonl")], "s3://lost/mds", staging=str(tmp_path / "b")),
                    TokenizerConfig())
    assert again["run"]["parts_tokenized"] == 1 and _objects(client, "lost", "mds") == expect
