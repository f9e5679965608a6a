"""data/streaming_core.py: mosaicml-streaming's dataset and writer without the package's zoo (transformers,
torchvision), and the full package still there for code that asks for it. Each case in a fresh process:
what a process has imported cannot be undone in this one."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

WRITE_AND_READ = """
import json, sys
from longctx.data.streaming_core import streaming_module
merge_index = streaming_module("base.util").merge_index     # first: alone, it meets streaming's import cycle
MDSWriter = streaming_module("base.format.mds.writer").MDSWriter
with MDSWriter(out={out!r}, columns={{"tokens": "bytes"}}) as writer:
    for i in range(3):
        writer.write({{"tokens": bytes([i]) * 4}})
StreamingDataset = streaming_module("base.dataset").StreamingDataset
from longctx.data.streaming_shm import host_registry_lock
with host_registry_lock():      # as every reader on this host registers (pytest's other workers')
    ds = StreamingDataset(local={out!r}, shuffle=False, batch_size=1)
seen = [ds[i]["tokens"] for i in range(ds.num_samples)]
zoo = sorted(m for m in ("transformers", "torchvision", "streaming.text", "streaming.base.dataloader")
             if m in sys.modules)
"""


def _run(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_shards_are_written_and_read_without_the_packages_zoo_and_the_full_package_comes_on_demand(tmp_path):
    got = _run(WRITE_AND_READ.format(out=str(tmp_path / "mds")) + """
import streaming                             # code of a user's, later in the same process
full = {"same_class": streaming.StreamingDataset is StreamingDataset, "writer": streaming.MDSWriter is MDSWriter,
        "text": hasattr(streaming, "text"), "dataloader": streaming.base.StreamingDataLoader.__name__}
from streaming import LocalDataset           # a name only the package's __init__ imports
print(json.dumps({"seen": [s.hex() for s in seen], "zoo": zoo, "full": full}))
""")
    assert got["seen"] == ["00000000", "01010101", "02020202"]
    assert got["zoo"] == [], f"reading and writing shards imported {got['zoo']}"
    assert got["full"] == {"same_class": True, "writer": True, "text": True, "dataloader": "StreamingDataLoader"}


def test_first_uses_from_two_threads_and_probes_of_absent_names_import_no_zoo():
    """Two threads asking for modules at once (one of them the cycle's `base.util`) both get them; a probe of a
    name the package does not define (pickle scans every module for a function's home) imports nothing; a name
    its __init__ defines (`__version__`) runs it."""
    got = _run("""
import json, pickle, sys, threading
import numpy as np
from longctx.data.streaming_core import streaming_module
got, errors = {}, []
def use(name):
    try:
        got[name] = streaming_module(name).__name__
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=use, args=(n,)) for n in ("base.util", "base.dataset", "base.util")]
for t in threads: t.start()
for t in threads: t.join()
import streaming
probe = hasattr(streaming, "no_such_name")
pickle.dumps(np.add)                          # pickle.whichmodule looks for np.add in every module
zoo = sorted(m for m in ("transformers", "torchvision", "streaming.text") if m in sys.modules)
version = streaming.__version__
print(json.dumps({"got": sorted(got.values()), "errors": errors, "probe": probe, "zoo": zoo,
                  "version": bool(version), "full": "streaming.text" in sys.modules}))
""")
    assert got == {"got": ["streaming.base.dataset", "streaming.base.util"], "errors": [], "probe": False,
                   "zoo": [], "version": True, "full": True}


def test_a_process_that_imported_streaming_itself_keeps_it():
    got = _run("""
import json, sys
import streaming
from longctx.data.streaming_core import streaming_module
print(json.dumps({"same": sys.modules["streaming"] is streaming,
                  "class": streaming_module("base.dataset").StreamingDataset is streaming.StreamingDataset}))
""")
    assert got == {"same": True, "class": True}
