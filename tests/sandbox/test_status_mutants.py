"""The sandbox's status classification on hand-made outcomes, every branch and its exact detail line
(pure: no program runs; `make mutants` scores `sandbox_status` on these and the pure tests of
test_runner.py, since the real-program tests take seconds each)."""

from __future__ import annotations

import os
import signal

import pytest

from domino_ray.config import SandboxConfig
from domino_ray.sandbox.runner import _exit_status, _limit_from_exception, _signal_name, classify_exit, last_exception_line

CFG = SandboxConfig(timeout_s=5, cpu_s=7, memory_mb=512, memory_total_mb=900, max_output_bytes=4096,
                    max_open_files=16, max_processes=12, file_size_mb=3, workdir_mb=20, workdir_inodes=99)
TB = 'Traceback (most recent call last):\n  File "main.py", line 1, in <module>\n    f()\n'


# ------------------------------------------------------------------------------- exception line
@pytest.mark.parametrize("stderr, expected", [
    (TB + "ValueError: bad value\n", ("ValueError", "bad value")),
    (TB + "ValueError:bad\n", ("ValueError", "bad")),  # no space after the colon
    (TB + "json.decoder.JSONDecodeError: Expecting value\n", ("JSONDecodeError", "Expecting value")),
    (TB + "AssertionError\n", ("AssertionError", "")),
    (TB + "KeyboardInterrupt\n", ("KeyboardInterrupt", "")),
    (TB + "StopIteration\n", ("StopIteration", "")),
    (TB + "SystemExit: 2\n", ("SystemExit", "2")),
    (TB + "RuntimeWarning: careful\n", ("RuntimeWarning", "careful")),
    (TB + "MyException: mine\n\n\n", ("MyException", "mine")),  # trailing blank lines
    (TB + "ValueError: a\nsome output after it\n", ("ValueError", "a")),  # a plain line is skipped
    (TB + "ValueError: first\n" + TB + "KeyError: 'second'\n", ("KeyError", "'second'")),  # the last one
    (TB + "ValueError: x   \n", ("ValueError", "x")),
    ("Hello: world\n", None),  # not an exception name
    ("  IndentedError: inside a traceback\n", None),
    ("", None),
    (TB + "AssertionError  \nnoise\n", ("AssertionError", "")),  # trailing spaces on an inner line
    (TB + "ValueError: a\n\nmore\n", ("ValueError", "a")),  # an empty line in between
    (TB + "ValueError: a\nx\n", ("ValueError", "a")),  # a one-character line
    (TB + "ValueError: real\nNote: StopIteration\n", ("ValueError", "real")),  # a name in the message is not one
])
def test_last_exception_line(stderr, expected):
    assert last_exception_line(stderr) == expected


@pytest.mark.parametrize("word", ["keyboardinterrupt", "KEYBOARDINTERRUPT", "XXKeyboardInterruptXX", "stopiteration",
                                  "STOPITERATION", "XXStopIterationXX"])
def test_exception_names_are_case_sensitive_and_whole(word):
    assert last_exception_line(f"{word}\n") is None
    assert last_exception_line("KeyboardInterrupt\n") == ("KeyboardInterrupt", "")


def test_last_exception_line_looks_at_the_last_200_lines_only():
    old = TB + "ValueError: early\n"
    assert last_exception_line(old + "noise\n" * 199) == ("ValueError", "early")
    assert last_exception_line(old + "noise\n" * 200) is None


# ------------------------------------------------------------------------------------- signals
def test_signal_names():
    assert _signal_name(signal.SIGSEGV) == "SIGSEGV"
    assert _signal_name(9) == "SIGKILL"
    assert _signal_name(999) == "signal 999"


# ------------------------------------------------------------------------ limits from exceptions
@pytest.mark.parametrize("name, msg, expected", [
    ("MemoryError", "", "memory limit of 512 MiB (RLIMIT_AS) reached"),
    ("OSError", "[Errno 12] Cannot allocate memory",
     "memory limit reached (512 MiB per process, 900 MiB per run): OSError: [Errno 12] Cannot allocate memory"),
    ("OSError", "Cannot allocate memory", "memory limit reached (512 MiB per process, 900 MiB per run): "
                                          "OSError: Cannot allocate memory"),
    ("OSError", "[Errno 12] x", "memory limit reached (512 MiB per process, 900 MiB per run): OSError: [Errno 12] x"),
    ("BlockingIOError", "[Errno 11] Resource temporarily unavailable",
     "process limit of 12 (RLIMIT_NPROC) reached: BlockingIOError: [Errno 11] Resource temporarily unavailable"),
    ("BlockingIOError", "Resource temporarily unavailable",
     "process limit of 12 (RLIMIT_NPROC) reached: BlockingIOError: Resource temporarily unavailable"),
    ("BlockingIOError", "[Errno 11] y", "process limit of 12 (RLIMIT_NPROC) reached: BlockingIOError: [Errno 11] y"),
    ("OSError", "[Errno 24] Too many open files", "open-file limit of 16 (RLIMIT_NOFILE) reached"),
    ("OSError", "[Errno 27] File too large", "file size limit of 3 MiB (RLIMIT_FSIZE) reached: [Errno 27] File too large"),
    ("OSError", "File too large", "file size limit of 3 MiB (RLIMIT_FSIZE) reached: File too large"),
    ("OSError", "[Errno 27] z", "file size limit of 3 MiB (RLIMIT_FSIZE) reached: [Errno 27] z"),
    ("OSError", "[Errno 28] No space left on device",
     "work dir full (its tmpfs holds 20 MiB and 99 files): [Errno 28] No space left on device"),
    ("OSError", "No space left on device", "work dir full (its tmpfs holds 20 MiB and 99 files): No space left on device"),
    ("OSError", "[Errno 28] w", "work dir full (its tmpfs holds 20 MiB and 99 files): [Errno 28] w"),
    ("OSError", "[Errno 2] No such file or directory: 'x'", None),
    ("ValueError", "memory", None),
])
def test_limits_read_from_the_exception(name, msg, expected):
    assert _limit_from_exception(name, msg, CFG) == expected


# --------------------------------------------------------------------------------- classification
@pytest.mark.parametrize("args, kwargs, expected", [
    ((None, 9, ""), {"timed_out": True, "timeout_s": 2.5}, ("timeout", "wall-clock limit of 2.5 s exceeded; process group killed")),
    ((None, 9, ""), {"timed_out": True, "timeout_s": 2.0, "overflow": "stdout"},
     ("timeout", "wall-clock limit of 2 s exceeded; process group killed")),  # the timeout comes first
    ((None, 9, ""), {"overflow": "stderr"}, ("limit", "stderr exceeded 4096 bytes; program killed")),
    ((None, 9, ""), {"overflow": "stdout", "oom_killed": True}, ("limit", "stdout exceeded 4096 bytes; program killed")),
    ((None, 9, ""), {"oom_killed": True}, ("limit", "memory limit of the run (900 MiB, cgroup) reached: OOM-killed")),
    ((1, None, TB + "ValueError: x\n"), {"oom_killed": True},
     ("limit", "memory limit of the run (900 MiB, cgroup) reached: OOM-killed")),
    ((0, 9, ""), {"oom_killed": True}, ("limit", "memory limit of the run (900 MiB, cgroup) reached: OOM-killed")),
    ((0, None, ""), {"oom_killed": True}, ("passed", "")),  # a child was OOM-killed, the program coped
    ((None, signal.SIGXCPU, ""), {}, ("limit", "CPU time limit of 7 s (RLIMIT_CPU) reached (SIGXCPU)")),
    ((None, signal.SIGXFSZ, ""), {}, ("limit", "file size limit of 3 MiB (RLIMIT_FSIZE) reached (SIGXFSZ)")),
    ((0, None, "some warning on stderr\n"), {}, ("passed", "")),
    ((0, None, TB + "ValueError: printed but exited 0\n"), {}, ("passed", "")),
    ((1, None, TB + "MemoryError\n"), {}, ("limit", "memory limit of 512 MiB (RLIMIT_AS) reached")),
    ((1, None, TB + "AssertionError: wrong\n"), {}, ("failed", "AssertionError: wrong")),
    ((1, None, TB + "AssertionError\n"), {}, ("failed", "AssertionError")),
    ((1, None, TB + "TimeoutError: slow\n"), {}, ("timeout", "TimeoutError: slow")),
    ((1, None, TB + "KeyError: 'a'\n"), {}, ("error", "KeyError: 'a'")),
    ((1, None, TB + "KeyboardInterrupt\n"), {}, ("error", "KeyboardInterrupt")),
    ((None, signal.SIGSEGV, TB + "ZeroDivisionError: division by zero\n"), {},
     ("error", "ZeroDivisionError: division by zero")),  # the exception says more than the signal
    ((None, signal.SIGSEGV, ""), {}, ("error", "killed by SIGSEGV")),
    ((None, 77, "last words\n"), {}, ("error", "killed by signal 77")),
    ((3, None, ""), {}, ("failed", "exit code 3")),
    ((2, None, "first\nusage: bad flag  \n\n"), {}, ("failed", "exit code 2: usage: bad flag")),
    ((2, None, "x" * 400 + "\n"), {}, ("failed", "exit code 2: " + "x" * 300)),
    ((0, signal.SIGTERM, ""), {}, ("error", "killed by SIGTERM")),  # exit 0 but a signal: not a pass
])
def test_classify_exit(args, kwargs, expected):
    assert classify_exit(*args, CFG, **kwargs) == expected


def test_classify_exit_defaults():
    # no timeout, no overflow, no OOM unless given
    assert classify_exit(0, None, "", CFG) == ("passed", "")
    assert classify_exit(1, None, "", CFG) == ("failed", "exit code 1")
    assert classify_exit(None, 9, "", CFG, timed_out=True) == ("timeout", "wall-clock limit of 0 s exceeded; "
                                                                          "process group killed")


# ---------------------------------------------------------------------------------- exit status
def test_exit_status_from_the_wait_status():
    assert _exit_status(0, 5 << 8, exact=False) == (5, None)  # the wait status wins over the return code
    assert _exit_status(1, signal.SIGSEGV, exact=True) == (None, signal.SIGSEGV)
    assert os.WIFSIGNALED(signal.SIGSEGV) and not os.WIFSIGNALED(5 << 8)


@pytest.mark.parametrize("returncode, exact, expected", [
    (-9, False, (None, 9)),
    (-15, True, (None, 15)),
    (0, False, (0, None)),
    (128, False, (128, None)),  # 128 + 0: no signal 0
    (129, False, (None, 1)),  # 128 + SIGHUP
    (129, True, (129, None)),
    (128 + 64, False, (None, 64)),  # the highest real-time signal
    (128 + 65, False, (193, None)),  # not a signal number: an exit code
    (255, False, (255, None)),
])
def test_exit_status_without_the_wait_status(returncode, exact, expected):
    assert _exit_status(returncode, None, exact=exact) == expected
