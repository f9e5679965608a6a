"""mosaicml-streaming's shared memory, given back when a reader is done with it.

Every StreamingDataset registers a numbered prefix in /dev/shm (`000000_locals`, `000000_barrier`, ...) and, to
find a free number, first attaches to every registration already there. Streaming keeps each of those
attachments, and its own registration, open until the interpreter exits (it hands them to `atexit`; mosaicml
streaming issue #457). A process that opens readers one after another (evaluating many checkpoints, the test
suite) therefore holds ~9 descriptors per reader for every reader registered before it: quadratic growth, until
`OSError: [Errno 24] Too many open files`. `open_dataset` records the shared memory a dataset's construction
created or attached to, closes the attachments to other registrations at once, and the release it returns gives
the rest back: descriptors and mappings closed, the registration's names and (when no other rank of the host
shares it) its file locks removed, so the next reader finds the number free.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import threading
from typing import Callable, List, Tuple

_constructing = threading.Lock()     # the recorder stands in for a module attribute: one construction at a time

# Streaming picks its number by scanning for the first free one, then registers it (every rank scans, the host's
# leader registers, the others attach): two jobs doing so at once on one host pick the same number, and one fails
# (`FileExistsError: '/000000_locals'`, or a rank attaching to the other job's registration). Two runs on one
# machine, or two SLURM jobs sharing a node, start at the same moment often enough. The jobs of a host therefore
# register one at a time, under this file lock: beside the registrations (one per host whatever TMPDIR a job
# has), readable and lockable by every user (they share streaming's numbers too).
_SHM = "/dev/shm"
HOST_REGISTRY_LOCK = os.path.join(_SHM if os.path.isdir(_SHM) else tempfile.gettempdir(),
                                  "longctx-streaming-registry.lock")
RETRY_S = (0.05, 0.5)     # a job that got some of its hosts' locks but not all gives them back and retries

_host_lock = threading.RLock()     # the thread of this process that holds the host's lock may take it again
_host_lock_depth = 0


def _open_lock_file() -> int:
    """A descriptor on the lock file (flock needs no write access: another user's file serves as well)."""
    try:
        return os.open(HOST_REGISTRY_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        fd = os.open(HOST_REGISTRY_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
        with contextlib.suppress(PermissionError):    # created meanwhile by another user: theirs, and readable
            os.fchmod(fd, 0o666)                       # whatever this process's umask
        return fd


@contextlib.contextmanager
def host_registry_lock(wait: bool = True):
    """The host's lock on streaming's registrations, held by this process (released at exit too); yields whether
    it is held (always, when `wait`). Re-entrant within a thread: a holder may open readers, which take it too."""
    import fcntl
    global _host_lock_depth
    with _host_lock:
        if _host_lock_depth:
            _host_lock_depth += 1
            try:
                yield True
            finally:
                _host_lock_depth -= 1
            return
        fd = _open_lock_file()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            _host_lock_depth = 1
            try:
                yield True
            finally:
                _host_lock_depth = 0
        finally:
            os.close(fd)                         # releases the lock


@contextlib.contextmanager
def registering_alone(leader: bool):
    """Held around a dataset's construction by every rank of a job: the leader of each of the job's hosts holds
    that host's lock from before any rank scans for a number until every rank has attached. A job on several hosts
    takes its hosts' locks all or none (each leader tries, the job agrees, and on a refusal anywhere the leaders
    that got theirs give them back and all try again a moment later): two such jobs on the same hosts would
    otherwise each hold one host and wait for the other forever. Collectives when torch.distributed is up."""
    import random
    import time

    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        with host_registry_lock():
            yield
        return
    while True:
        with host_registry_lock(wait=False) if leader else contextlib.nullcontext(True) as got:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, bool(got))    # also the barrier: no rank scans before the locks are held
            if all(every):
                yield
                dist.barrier()                           # every rank has attached before another job scans
                return
        time.sleep(random.uniform(*RETRY_S))


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


def _release(cleanups: List[Callable], locks: List[str]) -> None:
    for cleanup in cleanups:
        atexit.unregister(cleanup)       # nothing keeps the closed wrappers alive until exit
        # FileNotFoundError: another process of the same registration removed the names first
        with contextlib.suppress(FileNotFoundError):
            try:
                cleanup()
            except BufferError:          # an array over the buffer is still alive: its mapping stays, not the name
                for shm in cleanup.__self__.created_shms:
                    shm.unlink()
    for lock in locks:                   # left in place, a lock keeps the number taken (streaming skips it)
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
    cleanups.clear()
    locks.clear()


def open_dataset(**kwargs) -> Tuple[object, Callable[[], None]]:
    """(StreamingDataset(**kwargs), release): after release() the dataset must not be read again. Datasets are
    opened here one at a time; one constructed meanwhile in another thread without it would be recorded too."""
    from .streaming_core import streaming_module
    StreamingDataset = streaming_module("base.dataset").StreamingDataset
    constant, memory = streaming_module("base.constant"), streaming_module("base.shared.memory")
    World = streaming_module("base.world").World

    recorder = _AtexitRecorder()
    # the host's lock before this process's: a thread holding the host's lock may open a reader
    with registering_alone(World.detect().is_local_leader), _constructing:
        saved, memory.atexit = memory.atexit, recorder
        try:
            dataset = StreamingDataset(**kwargs)
        except BaseException:
            _release(recorder.cleanups, [])
            raise
        finally:
            memory.atexit = saved
    # the attachments to other registrations served only to find a free number: closed now, or a killed run's
    # registration would look live (mapped) for as long as this dataset is
    own = f"{dataset._shm_prefix_int:06}_"
    ours = [c for c in recorder.cleanups if c.__self__.shm.name.lstrip("/").startswith(own)]
    _release([c for c in recorder.cleanups if c not in ours], [])
    # its file locks, unless other ranks of this host share the registration (and may hold them)
    locks = ([os.path.join(tempfile.gettempdir(), own + what)
              for what in (constant.BARRIER_FILELOCK, constant.CACHE_FILELOCK)]
             if dataset._unique_rank_world.ranks_per_node == 1 else [])
    return dataset, lambda: _release(ours, locks)
