"""mosaicml-streaming's shared memory, given back when a reader is done with it.

Every StreamingDataset registers a numbered prefix in /dev/shm (`000000_locals`, `000000_barrier`, ...) and, to
find a free number, first attaches to every registration already there. Streaming keeps each of those
attachments, and its own registration, open until the interpreter exits (it hands them to `atexit`; mosaicml
streaming issue #457). A process that opens readers one after another (evaluating many checkpoints, the test
suite) therefore holds ~9 descriptors per reader for every reader registered before it: quadratic growth, until
`OSError: [Errno 24] Too many open files`. `open_dataset` records the shared memory a dataset's construction
created or attached to, closes the attachments to other registrations at once, and the release it returns gives
the rest back: descriptors and mappings closed, the registration's names removed, so the next reader finds the
number free.
"""
from __future__ import annotations

import atexit
import contextlib
import threading
from typing import Callable, List, Tuple

_constructing = threading.Lock()     # the recorder stands in for a module attribute: one construction at a time


class _AtexitRecorder:
    """What streaming's shared-memory module sees as `atexit` while a dataset is constructed: every clean-up it
    registers is recorded here (and still registered, so an unreleased dataset is cleaned at exit as before)."""

    def __init__(self):
        self.cleanups: List[Callable] = []

    def register(self, fn, *args, **kwargs):
        self.cleanups.append(fn)
        return atexit.register(fn, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(atexit, name)


def _release(cleanups: List[Callable]) -> None:
    for cleanup in cleanups:
        atexit.unregister(cleanup)       # nothing keeps the closed wrappers alive until exit
        # FileNotFoundError: another process of the same registration removed the names first; BufferError: an
        # array over the buffer is still alive (it keeps its mapping until it goes)
        with contextlib.suppress(FileNotFoundError, BufferError):
            cleanup()
    cleanups.clear()


def open_dataset(**kwargs) -> Tuple[object, Callable[[], None]]:
    """(StreamingDataset(**kwargs), release): after release() the dataset must not be read again."""
    from streaming import StreamingDataset
    from streaming.base.shared import memory

    recorder = _AtexitRecorder()
    with _constructing:
        saved, memory.atexit = memory.atexit, recorder
        try:
            dataset = StreamingDataset(**kwargs)
        except BaseException:
            _release(recorder.cleanups)
            raise
        finally:
            memory.atexit = saved
    # the attachments to other registrations served only to find a free number: closed now, or a killed run's
    # registration would look live (mapped) for as long as this dataset is
    own = f"{dataset._shm_prefix_int:06}_"
    ours = [c for c in recorder.cleanups if c.__self__.shm.name.lstrip("/").startswith(own)]
    _release([c for c in recorder.cleanups if c not in ours])
    return dataset, lambda: _release(ours)
