"""What `longctx run` shows while it runs: the third-party noise left out (launch/noise.py), the launcher's and
ranks' output relayed whole and in order (launch/console.py), rank 0's progress: a live line per stage on a
terminal, a step line every run.log_every steps in a log (pipeline/training/progress.py)."""
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from longctx.launch.console import ERASE_TO_END, Console, Relay, pump
from longctx.launch.noise import (
    IN_PROCESS_LOGGERS,
    NOISE,
    RAY_BANNER_LOGGER,
    NoiseFilter,
    noise_of,
    quiet_in_process,
)
from longctx.pipeline.training.curriculum import StagePlan
from longctx.pipeline.training.progress import LIVE_PREFIX, Progress, RecentRate, duration, tokens_left

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(30)     # each test's own mark, where it has one, comes first

# Each kind as a real run printed it (tests/training.py's config, `longctx run` before the filter, 2026-12-07)
NOISE_LINES = {
    "deepspeed info": [
        "[2026-12-07 03:16:01,540] [INFO] [launch.py:152:main] WORLD INFO DICT: {'localhost': [0, 1]}",
        "[2026-12-07 03:16:01,540] [INFO] [launch.py:174:main] Setting CUDA_VISIBLE_DEVICES=0,1",
        "[2026-12-07 03:16:01,542] [INFO] [launch.py:245:main] process 15516 spawned with command: "
        "['/usr/bin/python', '-u', '-m', 'longctx.launch.cli', 'train', 'tiny.yaml']",
        "[2026-12-07 03:16:21,656] [INFO] [launch.py:285:main] Process 15515 exits successfully.",
        "[2026-12-07 03:16:05,001] [INFO] [real_accelerator.py:254:get_accelerator] Setting ds_accelerator to cuda",
    ],
    "deepspeed op built": ["DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"],
    "no cuda runtime": [
        "W1207 03:16:06.856000 15516 site-packages/torch/utils/cpp_extension.py:183] No CUDA runtime is found, "
        "using CUDA_HOME='/usr/local'"],
    "torch all_gather_into_tensor deprecation": [
        "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/torch/distributed/c10d_logger.py:83: "
        "FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated. Please use "
        "`torch.distributed.all_gather_single` instead.",
        "  return func(*args, **kwargs)"],
    "streaming index folder": ["WARNING:root:A temporary folder /tmp/tmpo6cx9xn3 is created to store index files",
                               "A temporary folder /tmp/my dir/tmpab12 is created to store index files"],
    "ray token authentication banner": [
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. For more "
        "information, see https://docs.ray.io/en/latest/ray-security/token-auth.html"],
}

# Lines that must always come through: ours, errors, tracebacks, warnings (DeepSpeed's and torch's included)
KEPT = [
    "launch: /usr/bin/python -u -m deepspeed.launcher.launch --world_info=e30= --master_port=33027",
    "stage 0 'short': seq_len 64, 6 steps, micro 1 x accum 4 x DP 2 x SP 1",
    "[2026-12-07 03:16:21,656] [ERROR] [launch.py:325:sigkill_handler] ['python', '-u'] exits with return code = 1",
    "[2026-12-07 03:16:21,656] [WARNING] [launch.py:120:main] something DeepSpeed warns about",
    "Traceback (most recent call last):",
    '  File "/work/main/pipeline/training/trainer.py", line 510, in train',
    "    return func(*args, **kwargs)",
    "  return func(*args, **kwargs)",     # a source line not right after the deprecation warning
    "RuntimeError: 2 steps in a row had a non-finite loss or gradient",
    "/x/site-packages/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.reduce_scatter` "
    "is deprecated.",
    "/work/main/pipeline/training/trainer.py:12: UserWarning: ours",
    "WARNING:root:A temporary folder could not be created",
    "W1207 03:16:06.856000 15516 site-packages/torch/utils/cpp_extension.py:183] Some other torch warning",
    "No CUDA runtime is found",           # not torch's line: not taken for it
    "resource_tracker: There appear to be 2 leaked shared_memory objects to clean up at shutdown",
    "Token authentication is enabled but no token was found.",
    "longctx run: the run ended with status 1",
    "",
]


def test_every_noise_kind_has_canned_lines():
    assert set(NOISE_LINES) == {n.name for n in NOISE}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", sorted(NOISE_LINES))
def test_each_noise_kind_is_dropped(kind):
    f = NoiseFilter()
    assert [line for line in NOISE_LINES[kind] if f.keep(line)] == []


@pytest.mark.timeout(10)
def test_errors_tracebacks_and_warnings_are_kept_in_order_among_the_noise():
    noise = [line for lines in NOISE_LINES.values() for line in lines]
    stream = []
    for i, line in enumerate(KEPT):           # noise between every two lines of ours, in turn
        stream += NOISE_LINES[sorted(NOISE_LINES)[i % len(NOISE_LINES)]] + [line]
    f = NoiseFilter()
    assert [line for line in stream if f.keep(line)] == KEPT
    assert all(noise_of(line) is None for line in KEPT)
    assert all(not NoiseFilter().keep(line) for line in noise if not line.startswith("  return"))


@pytest.mark.timeout(10)
def test_verbose_keeps_everything():
    stream = [line for lines in NOISE_LINES.values() for line in lines] + KEPT
    f = NoiseFilter(verbose=True)
    assert [line for line in stream if f.keep(line)] == stream


@pytest.fixture
def quieted_loggers_put_back():
    saved = {name: list(logging.getLogger(name).filters) for name in IN_PROCESS_LOGGERS}
    yield
    for name, filters in saved.items():
        logging.getLogger(name).filters[:] = filters


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name,banner,other", [
    (RAY_BANNER_LOGGER, NOISE_LINES["ray token authentication banner"][0],
     "Token authentication is enabled but no token was found."),
    ("", NOISE_LINES["streaming index folder"][1], "A temporary folder could not be created"),
])
def test_noise_logged_by_longctx_run_itself_is_dropped_and_the_loggers_other_records_kept(
        quieted_loggers_put_back, name, banner, other):
    """Ray's banner (the data prepared in `longctx run`) and streaming's (logging.warning, in the preflight)."""
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(banner)
        assert seen == [banner]              # without the filter (--verbose)
        quiet_in_process()
        quiet_in_process()                   # once is enough
        logger.warning(banner)
        logger.warning(other)
        assert seen == [banner, other]
        assert sum(type(f).__name__ == "_DropNoise" for f in logger.filters) == 1
    finally:
        logger.removeHandler(handler)


# -- the relay ---------------------------------------------------------------------------------------------

class Trickle(io.RawIOBase):
    """A pipe that hands over a few bytes at a time: lines arrive cut anywhere, characters too."""

    def __init__(self, data: bytes, size: int = 7):
        self.data, self.size = data, size

    def readable(self):
        return True

    def read1(self, n=-1):
        chunk, self.data = self.data[:self.size], self.data[self.size:]
        return chunk


class Screen(io.StringIO):
    """A text stream that may say it is a closed pipe."""

    def __init__(self, broken=False):
        super().__init__()
        self.broken = broken

    def write(self, text):
        if self.broken:
            raise BrokenPipeError
        return super().write(text)


@pytest.mark.timeout(10)
def test_pump_reassembles_cut_lines_filters_them_and_keeps_a_last_line_without_its_end():
    ours = ["first line of ours", "zweite Zeile: überall", *KEPT[:5], "the last one without a line end"]
    data = "\n".join(NOISE_LINES["deepspeed info"] + ours[:4] + NOISE_LINES["no cuda runtime"] + ours[4:])
    got = []
    pump(Trickle(data.encode()), NoiseFilter().keep, got.append)
    assert got == ours


@pytest.mark.timeout(10)
def test_relay_keeps_stdout_and_stderr_apart_each_whole_and_in_order():
    out_lines = [f"line {i} of stdout" for i in range(3000)]
    err_lines = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "ValueError: bad"]
    stdout = Trickle("\n".join(NOISE_LINES["deepspeed op built"] + out_lines).encode() + b"\n", size=4093)
    stderr = Trickle("\n".join(NOISE_LINES["torch all_gather_into_tensor deprecation"] + err_lines).encode())
    out, err = Screen(), Screen()
    assert Relay(stdout, stderr, Console(out, err, live=False)).finish(timeout=10)
    assert out.getvalue().splitlines() == out_lines
    assert err.getvalue().splitlines() == err_lines


@pytest.mark.timeout(10)
def test_a_closed_console_does_not_stop_the_reading():
    """`longctx run | head`: the ranks must not block on a full pipe nobody reads."""
    out, err = Screen(broken=True), Screen()
    stdout = Trickle(b"x\n" * 100_000, size=1 << 16)
    assert Relay(stdout, Trickle(b"an error\n"), Console(out, err, live=False)).finish(timeout=10)
    assert stdout.data == b"" and err.getvalue() == "an error\n"


@pytest.mark.timeout(10)
def test_live_line_is_rewritten_in_place_and_other_lines_end_it_first():
    out = Screen()
    console = Console(out, out, live=True, columns=lambda: 40)
    for text, to_err in [("stage 0 'short': 6 steps", False), ("\rshort 1/6 loss 5.5", False),
                         ("\rshort 2/6 loss 5.4", False), ("a warning", True), ("\rshort 3/6 loss 5.3", False),
                         ("\r" + "x" * 100, False), ("\rshort 6/6 loss 5.0", False), ("\r", False),
                         ("stage 1 'long': 4 steps", False), ("\rlong 1/4", False)]:
        console.line(text, to_err)
    console.end_live()
    console.end_live()                     # nothing shown: nothing more
    assert out.getvalue() == ("stage 0 'short': 6 steps\n"
                              f"\rshort 1/6 loss 5.5{ERASE_TO_END}\rshort 2/6 loss 5.4{ERASE_TO_END}\n"
                              "a warning\n"
                              f"\rshort 3/6 loss 5.3{ERASE_TO_END}\r{'x' * 39}{ERASE_TO_END}"
                              f"\rshort 6/6 loss 5.0{ERASE_TO_END}\n"
                              "stage 1 'long': 4 steps\n"
                              f"\rlong 1/4{ERASE_TO_END}\n")


@pytest.mark.timeout(10)
def test_live_lines_reaching_a_console_that_is_no_terminal_are_plain_lines():
    out = Screen()
    console = Console(out, out, live=False)
    for text in ("\rshort 1/6", "\r", "ours"):
        console.line(text)
    assert out.getvalue() == "short 1/6\nours\n"


# -- what the rank prints ---------------------------------------------------------------------------------

def stage(index, name, steps, first, tokens_per_step):
    return StagePlan(index=index, name=name, seq_len=64 * (index + 1), steps=steps, first_step=first,
                     global_batch_tokens=tokens_per_step, sequences_per_step=1, seq_parallel=1, data_parallel=1,
                     micro_batch=1, grad_accum=1, lr=1e-3, warmup_steps=0, decay="constant", min_lr_ratio=0.1)


PLANS = [stage(0, "short", 7, 0, 512), stage(1, "long", 3, 7, 1024)]


def record(step, loss=5.0):
    index = 0 if step <= 7 else 1
    tokens = 512 * min(step, 7) + 1024 * max(0, step - 7)
    return {"step": step, "stage": index, "stage_name": PLANS[index].name, "loss": loss, "lr": 1e-3,
            "tokens": tokens, "tokens_per_s": 2000.0}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_duration():
    assert [duration(s) for s in (None, 0, 59.6, 61, 3600, 3 * 3600 + 62, 2 * 86400 + 3661)] == \
        ["?", "0:00", "1:00", "1:01", "1:00:00", "3:01:02", "2d 01:01:01"]


def test_tokens_left_in_the_stage_and_in_the_run():
    assert tokens_left(PLANS, 0, 3) == (4 * 512, 4 * 512 + 3 * 1024)
    assert tokens_left(PLANS, 0, 7) == (0, 3 * 1024)
    assert tokens_left(PLANS, 1, 9) == (1024, 1024)
    assert tokens_left(PLANS, 1, 10) == (0, 0)


def test_recent_rate_over_a_window_of_updates():
    rate = RecentRate(window=3)
    assert rate.per_second() is None
    rate.add(0.0, 0)
    assert rate.per_second() is None       # one point: no rate yet
    rate.add(1.0, 1000)
    assert rate.per_second() == 1000
    rate.add(2.0, 2000)
    rate.add(12.0, 3000)                   # a slow step (an evaluation): the window's average follows
    assert rate.per_second() == pytest.approx(2000 / 11)


@pytest.mark.timeout(10)
def test_progress_line_and_its_eta_on_a_fake_clock():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(PLANS, log_every=1, live=False, out=out, clock=clock)
    progress.show(record(1))               # first step: the step's own 2,000 tok/s stands in for the rate
    assert out.getvalue().splitlines()[-1] == ("short 1/7  loss 5.0000  2,000 tok/s  ETA 0:02 stage, 0:03 run  "
                                               "step 1/10  lr 1.00e-03")
    for step in (2, 3):                    # 512 tokens every 0.5 s: 1,024 tok/s by the clock
        clock.now += 0.5
        progress.show(record(step))
    # stage: 4 steps x 512 = 2,048 tokens -> 2 s; run: + 3 x 1,024 -> 5 s
    assert "  ETA 0:02 stage, 0:05 run  " in out.getvalue().splitlines()[-1]
    for step in range(4, 8):
        clock.now += 0.5
        progress.show(record(step))
    clock.now += 100                       # a long evaluation before step 8: the recent rate drops
    progress.show(record(8, loss=None))
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("long 1/3  loss skipped  ") and line.endswith("  step 8/10  lr 1.00e-03")
    rate = (512 * 6 + 1024) / 103.0        # the window holds every update since step 1
    assert f"  ETA {duration(2048 / rate)} stage, {duration(2048 / rate)} run  " in line


def shown_by(live: bool) -> str:
    """What Progress writes over the whole 10-step run, with run.log_every=3."""
    out = io.StringIO()
    progress = Progress(PLANS, log_every=3, live=live, out=out, clock=FakeClock())
    for step in range(1, 11):
        progress.show(record(step))
    return out.getvalue()


@pytest.mark.timeout(10)
def test_a_log_gets_a_step_line_every_log_every_steps_and_at_each_stages_last():
    text = shown_by(live=False)
    shown = [int(line.split("  step ")[1].split("/")[0]) for line in text.splitlines()]
    assert shown == [3, 6, 7, 9, 10]
    assert LIVE_PREFIX not in text


@pytest.mark.timeout(10)
def test_a_terminal_gets_every_step_as_the_live_line_ended_at_each_stages_last():
    lines = shown_by(live=True).split("\n")[:-1]
    assert [line for line in lines if line == LIVE_PREFIX] == [LIVE_PREFIX] * 2
    assert lines[7] == lines[-1] == LIVE_PREFIX          # after step 7 (stage 0's last) and step 10
    updates = [line for line in lines if line != LIVE_PREFIX]
    assert len(updates) == 10 and all(u.startswith(LIVE_PREFIX + ("short " if i < 7 else "long "))
                                      for i, u in enumerate(updates))
    screen = Screen()                      # as `longctx run` draws it: one line per stage left on screen
    console = Console(screen, screen, live=True, columns=lambda: 200)
    for line in lines:
        console.line(line)
    final = [s.rsplit("\r", 1)[-1].replace(ERASE_TO_END, "") for s in screen.getvalue().split("\n")[:-1]]
    assert [s.split("  loss")[0] for s in final] == ["short 7/7", "long 3/3"]
    assert [s.split("  step ")[1].split("  ")[0] for s in final] == ["7/10", "10/10"]


# -- `longctx run`'s launcher under the relay ---------------------------------------------------------------

FAKE_LAUNCHER = textwrap.dedent("""
    import signal, sys, time
    def stop(*_):
        print("rank 0: SIGTERM: checkpoint written", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("[2026-12-07 03:16:01,540] [INFO] [launch.py:152:main] WORLD INFO DICT: {}", flush=True)
    for i in range(2000):
        print(f"line {i}")
    sys.stdout.flush()
    print("/t/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` "
          "is deprecated. Please use x.\\n  return func(*args, **kwargs)", file=sys.stderr, flush=True)
    print("UserWarning: ours", file=sys.stderr, flush=True)
    if sys.argv[1] == "wait":
        print("waiting", flush=True)
        time.sleep(60)
    print("the end, without a line end", end="")
    sys.exit(int(sys.argv[1]) if sys.argv[1] != "wait" else 0)
""")

# run_relayed as run_local calls it: SIGTERM's handler prints and returns, the wait goes on
RUN = textwrap.dedent("""
    import signal, sys
    # Ctrl-C's default, as in a terminal: a suite run as a background job of a shell without job control (`pytest
    # &` in a script) inherits SIGINT ignored, and `longctx run` would then rightly ignore it too
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from longctx.launch.console import Console
    from longctx.launch.local import run_relayed
    console = Console(sys.stdout, sys.stderr, live=False)
    signal.signal(signal.SIGTERM, lambda *_: console.line("longctx run: SIGTERM; waiting"))
    rc = run_relayed([sys.executable, "-c", sys.argv[1], sys.argv[2]], None, console, sys.argv[3] == "verbose")
    print(f"status {rc}", flush=True)
    sys.exit(rc)
""")


def relayed(arg, verbose=False):
    return subprocess.Popen([sys.executable, "-c", RUN, FAKE_LAUNCHER, arg, "verbose" if verbose else "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)


def waiting():
    """The relayed launcher, once it has written all it writes before it waits."""
    proc = relayed("wait")
    deadline, line = time.time() + 30, ""
    while time.time() < deadline and line != "waiting\n":
        line = proc.stdout.readline()
    assert line == "waiting\n"
    return proc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", [0, 3])
def test_run_relayed_shows_every_line_of_ours_and_returns_the_launchers_status(status):
    proc = relayed(str(status))
    out, err = proc.communicate(timeout=50)
    assert proc.returncode == status, err
    assert out.splitlines() == [f"line {i}" for i in range(2000)] + ["the end, without a line end",
                                                                     f"status {status}"]
    assert err.splitlines() == ["UserWarning: ours"]


@pytest.mark.timeout(60)
def test_run_relayed_verbose_shows_the_noise_too():
    proc = relayed("0", verbose=True)
    out, err = proc.communicate(timeout=50)
    assert out.splitlines()[0].startswith("[2026-12-07 03:16:01,540] [INFO] [launch.py:152:main]")
    assert "FutureWarning" in err and "  return func(*args, **kwargs)" in err.splitlines()


@pytest.mark.timeout(60)
def test_sigterm_to_the_process_group_under_the_relay_waits_for_the_launchers_stop():
    proc = waiting()
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    lines = out.splitlines()      # both had the signal at once: either may write first
    assert sorted(lines[:-1]) == ["longctx run: SIGTERM; waiting", "rank 0: SIGTERM: checkpoint written"]
    assert lines[-1] == "status 143"


@pytest.mark.timeout(60)
def test_ctrl_c_kills_the_launcher_as_before():
    proc = waiting()
    os.kill(proc.pid, signal.SIGINT)        # this process only: the launcher is killed by it, not asked to stop
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert "rank 0: SIGTERM" not in out


# -- one real run ------------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_longctx_run_into_a_pipe_shows_no_noise_and_a_step_line_every_log_every(tmp_path):
    """The tiny 2-stage run (4 + 2 steps here, 2 ranks, the data prepared on a local Ray) with stdout a pipe,
    run.log_every=3: step lines at 3, 4 (stage 0's last) and 6 (the last), no line of the known noise on
    either stream, every step in metrics.jsonl."""
    from tests.training import run_cmd, write_config
    cfg = write_config(tmp_path, "console", every=0)
    t0 = time.time()
    r = subprocess.run(run_cmd(cfg, "run.log_every=3", "curriculum.stages.0.steps=4", "curriculum.stages.1.steps=2",
                               "eval.kinds=[heldout]", "data.prepare.num_workers=1"), capture_output=True, timeout=280)
    seconds = time.time() - t0
    out, err = r.stdout.decode(), r.stderr.decode()        # bytes: a carriage return would show as one
    assert r.returncode == 0, out[-3000:] + err[-3000:]
    lines = out.split("\n") + err.split("\n")
    assert [line for line in lines if noise_of(line)] == []
    assert not [line for line in lines if "[INFO]" in line or "FutureWarning" in line or "temporary folder" in line
                or "return func(" in line or "Token authentication" in line]
    steps = [int(line.split("  step ")[1].split("/")[0]) for line in out.split("\n") if "  step " in line]
    assert steps == [3, 4, 6], out
    assert "\r" not in out
    assert "launch: " in out and "stage 1 'long'" in out and "report: " in out
    recs = [json.loads(line) for line in (tmp_path / "console" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in recs] == list(range(1, 7))
    print(f"longctx run took {seconds:.0f} s\n--- stdout\n{out}--- stderr\n{err}")
