"""Set-ups made once per session, whichever pytest-xdist worker needs them first (tests/README.md)."""
import contextlib
import fcntl
import os
import shutil
import sys


@contextlib.contextmanager
def shared_once(tmp_path_factory, name):
    """A directory made once for the whole session and shared by its pytest-xdist workers (under `-n 0`, this
    process's own): yields (path, made), `made` false when it is already there, complete. The first worker to
    come makes it (fills the directory inside the `with`) while the others wait on the file lock; a failed
    attempt's leftovers are removed and the next user makes it again. Its users only read it."""
    base = tmp_path_factory.getbasetemp()
    # a worker's base is the session's, + popen-gwN (pytest-xdist); a pytest this session starts inherits the
    # variable but has a base of its own
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = (base.parent if worker and base.name == f"popen-{worker}" else base) / f"shared-{name}"
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # released when the file is closed
        done = path.parent / f"{path.name}.done"
        if done.exists():
            yield path, False
            return
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        yield path, True
        done.touch()


def decompress(mds) -> None:
    """Every shard of a prepared output (`longctx prepare`) decompressed beside its .zstd, as its first reader would
    leave it: the readers of both workers then write nothing there (two jobs decompressing one shard at once would
    share mosaicml-streaming's `.tmp` file for it)."""
    from longctx.data.stream import open_splits
    for source in open_splits(str(mds)):
        if source is not None:
            for i in range(len(source)):
                source.tokens(i)
            source.close()


def shards_once(tmp_path_factory, name, make):
    """Shards made once for the session's workers (`shared_once`): `make(root)` prepares them into root/mds on
    the first worker to come; they are then decompressed there, as their first reader would leave them, so that
    the readers of every worker write nothing beside them. Returns root."""
    with shared_once(tmp_path_factory, name) as (root, first):
        if first:
            make(root)
            decompress(root / "mds")
    return root


def plain_streaming_dataset(**kwargs):
    """A StreamingDataset made directly (reading back what longctx wrote without longctx's reader), registered
    under the host's lock as longctx's readers are: mosaicml-streaming picks its shared-memory number by a scan
    that two readers starting at once on one host can both win (`FileExistsError: /000032_locals`), and pytest's
    workers are such readers (data/streaming_shm.py)."""
    from streaming import StreamingDataset

    from longctx.data.streaming_shm import host_registry_lock
    with host_registry_lock():
        return StreamingDataset(**kwargs)


def longctx_here(capsys, *args, cwd=None):
    """`longctx ARGS` through the command's entry point (`launch.cli.main`) in this process: its exit status,
    stdout and stderr as `subprocess.run` gives them, without a new interpreter's imports (3-5 CPU-s each, and
    the suite is CPU-bound). For commands whose contract is their output and status (`--plan`, eval, export,
    calibrate); the console script itself, a fresh process, is tested in test_cli.py. `cwd`: where the command
    runs (configs name files relative to the checkout)."""
    import logging
    from types import SimpleNamespace

    from longctx.launch.cli import main
    capsys.readouterr()
    here = os.getcwd()
    # a command quiets third-party loggers for its process (launch/noise.py): for this one, not the tests after
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    filters = [(logger, list(logger.filters)) for logger in loggers]
    try:
        if cwd is not None:
            os.chdir(cwd)
        rc = main([str(a) for a in args])
    except SystemExit as e:              # as the interpreter ends on it: a message goes to stderr, status 1
        rc = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    finally:
        os.chdir(here)
        for logger, kept in filters:
            logger.filters[:] = kept
        known = {id(logger) for logger in loggers}
        for logger in logging.Logger.manager.loggerDict.values():   # loggers the command created: ours go
            if isinstance(logger, logging.Logger) and id(logger) not in known:
                logger.filters[:] = [f for f in logger.filters if type(f).__module__ != "longctx.launch.noise"]
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)
