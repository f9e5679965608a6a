"""The third-party lines `longctx run` keeps off the console unless --verbose (launch/console.py applies them
to what the DeepSpeed launcher and its ranks write; `quiet_in_process` to what the run logs itself).

Each is known by its exact form, never by a word it contains: a line of ours, an error, a traceback or a
warning of anyone's that is not listed here always reaches the console. A line listed here is harmless and
repeats on every run (per rank, per step for some), which is what buried the step lines and the messages
that matter. DeepSpeed's lines are dropped at its INFO level only; its warnings and errors stay."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional, Pattern


@dataclass(frozen=True)
class Noise:
    name: str
    line: Pattern[str]                   # matched from the start of the line
    then: Optional[Pattern[str]] = None  # the line right after it that belongs to it (the warning's source line)


NOISE = (
    # DeepSpeed's own log format at INFO: the launcher's (world info, the ranks spawned, "exits successfully")
    # and, on a GPU, the ranks' (accelerator detection, the engine's configuration)
    Noise("deepspeed info", re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] \[INFO\] \[[\w.]+:\d+:\w+\] ")),
    # DeepSpeed's CPU communication op, compiled or loaded once per rank
    Noise("deepspeed op built", re.compile(r"DeepSpeed [\w.]+ built successfully$")),
    # torch's C++-extension module on a machine without CUDA (the CPU demo), once per rank
    Noise("no cuda runtime", re.compile(r"W\d{4} [\d:.]+ +\d+ \S*torch/utils/cpp_extension\.py:\d+\] "
                                        r"No CUDA runtime is found, using CUDA_HOME=")),
    # torch's deprecation of the collective DeepSpeed's ZeRO calls, with the source line Python prints under it
    Noise("torch all_gather_into_tensor deprecation",
          re.compile(r"\S*torch/distributed/c10d_logger\.py:\d+: FutureWarning: "
                     r"`torch\.distributed\.all_gather_into_tensor` is deprecated\."),
          then=re.compile(r" {2}return func\(\*args, \*\*kwargs\)")),
    # mosaicml-streaming, for every dataset it opens (each stage, each evaluation's reader)
    Noise("streaming index folder",
          re.compile(r"(?:WARNING:root:)?A temporary folder .+ is created to store index files$")),
    # Ray's banner when `longctx run` prepares the data on a local Ray (the default there)
    Noise("ray token authentication banner",
          re.compile(r"Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled to opt "
                     r"out\.")),
)


def noise_of(line: str) -> Optional[Noise]:
    """The kind of third-party noise `line` (without its line end) is, or None."""
    for noise in NOISE:
        if noise.line.match(line):
            return noise
    return None


class NoiseFilter:
    """The filter of one stream, in its order: a warning's source line is noise only right after the warning
    in the same stream (Python writes both at once), anywhere else it is kept."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.then: Optional[Pattern[str]] = None

    def keep(self, line: str) -> bool:
        if self.verbose:
            return True
        then, self.then = self.then, None
        if then is not None and then.fullmatch(line):
            return False
        noise = noise_of(line)
        if noise is None:
            return True
        self.then = noise.then
        return False


# Two of them are also logged by `longctx run` itself, through Python's logging, not by a rank: Ray's banner
# from the process that starts the local cluster (the data prepared here: longctx.data.prepare), and
# streaming's, through the root logger (`logging.warning`), when the preflight opens the shards. A filter on
# each of those two loggers drops those records; their other records, and every other logger's, are untouched.
RAY_BANNER_LOGGER = "ray._private.authentication.authentication_token_setup"
IN_PROCESS_LOGGERS = (RAY_BANNER_LOGGER, "")      # "": the root logger


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return noise_of(record.getMessage()) is None


def quiet_in_process() -> None:
    """Keep the listed noise out of what this process logs through Python's logging."""
    for name in IN_PROCESS_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
