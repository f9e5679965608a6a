"""`longctx run`'s console: what the DeepSpeed launcher and its ranks write, relayed to this process's stdout and
stderr. Each stream is read to its end on a thread of its own and written on line by line, in its order,
without the known third-party noise (launch/noise.py) unless --verbose; on a terminal, rank 0's live progress
lines (pipeline/training/progress.py) become one line rewritten in place.

Only `longctx run` relays, being the only command that owns the console it writes to. `longctx node` (SLURM,
a hostfile) becomes the launcher itself (exec), so that the scheduler's signals reach it with no process in
between, and its output is a log an operator reads whole; there the ranks print plain step lines at
`run.log_every`."""
from __future__ import annotations

import shutil
import threading
import time
from typing import BinaryIO, Callable, List, Optional, TextIO

from longctx.pipeline.training.progress import LIVE_PREFIX

from .noise import NoiseFilter

ERASE_TO_END = "\x1b[K"   # VT100: clears what a longer earlier live line left to the right of the cursor


class Console:
    """Where the relayed lines go. One lock for both streams: on a terminal stdout and stderr are one screen, and
    a line must not land inside the live line, so any other line first ends the live line (it stays on screen:
    the step a warning or an error came at is worth keeping) and the next update starts a new one."""

    def __init__(self, out: TextIO, err: TextIO, live: bool,
                 columns: Callable[[], int] = lambda: shutil.get_terminal_size().columns):
        self.streams = {False: out, True: err}
        self.live = live              # stdout is a terminal: draw the live line
        self.columns = columns
        self.shown = False            # a live line is on screen, the cursor at its end
        self.broken = set()           # streams whose reader went away (`longctx run | head`)
        self.lock = threading.RLock()

    def line(self, text: str, to_err: bool = False) -> None:
        """One line of the launcher's or a rank's output, without its line end."""
        with self.lock:
            if text.startswith(LIVE_PREFIX) and not to_err:
                body = text[len(LIVE_PREFIX):]
                if not self.live:          # not expected (only a live console asks the rank for these)
                    if body:
                        self._write(False, body + "\n")
                elif body:
                    # cut to the terminal's width: a line that wraps can no longer be rewritten in place
                    self._write(False, "\r" + body[:max(20, self.columns() - 1)] + ERASE_TO_END)
                    self.shown = True
                else:
                    self.end_live()
                return
            self.end_live()
            self._write(to_err, text + "\n")

    def end_live(self) -> None:
        """Leave the live line on screen as it is and move below it."""
        with self.lock:
            if self.shown:
                self.shown = False
                self._write(False, "\n")

    def _write(self, to_err: bool, text: str) -> None:
        if to_err in self.broken:
            return
        stream = self.streams[to_err]
        try:
            try:
                stream.write(text)
            except UnicodeEncodeError:           # a console that cannot show every character: shown replaced
                encoding = stream.encoding or "ascii"
                stream.write(text.encode(encoding, "replace").decode(encoding))
            stream.flush()
        except (OSError, ValueError):    # closed, or its terminal gone: keep reading, or the ranks would block
            self.broken.add(to_err)


def pump(source: BinaryIO, keep: Callable[[str], bool], write: Callable[[str], None]) -> None:
    """Every line of `source` to its end, in order: `write(line)` for those `keep(line)` accepts. A line is
    written once whole (the filter needs it whole); the last one also without a line end."""
    pending = b""
    while True:
        chunk = source.read1(1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            _relay(raw, keep, write)
    if pending:
        _relay(pending, keep, write)


def _relay(raw: bytes, keep: Callable[[str], bool], write: Callable[[str], None]) -> None:
    # decoded whole: a character split over two reads is whole in its line; bytes that are no UTF-8 still show
    text = raw.decode("utf-8", errors="replace")
    if keep(text):
        write(text)


class Relay:
    """The launcher's stdout and stderr pumped through the console until both reach their end."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO, console: Console, verbose: bool = False):
        self.console = console
        self.sources = (stdout, stderr)
        # daemon threads: a process that outlives the launcher and keeps a pipe open must not keep this one alive
        self.threads: List[threading.Thread] = [
            threading.Thread(target=pump, name=f"longctx-relay-{name}", daemon=True,
                             args=(source, NoiseFilter(verbose).keep,
                                   lambda text, to_err=to_err: console.line(text, to_err)))
            for source, name, to_err in ((stdout, "stdout", False), (stderr, "stderr", True))]
        for t in self.threads:
            t.start()

    def finish(self, timeout: Optional[float]) -> bool:
        """Wait for both streams' end (every line written), at most `timeout` seconds in all; whether they ended.
        Once the launcher has exited its ranks have too, and the pipes end at once: only a process it could
        not stop still holds them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        ended = not any(t.is_alive() for t in self.threads)
        if ended:
            for source in self.sources:
                source.close()
        self.console.end_live()
        return ended
