"""run_program statuses on ordinary programs, limits and the pure exit classification."""

from __future__ import annotations

import signal

import pytest

from domino_ray.config import SandboxConfig
from domino_ray.sandbox import classify_exit, run_program
from domino_ray.sandbox.runner import last_exception_line

CFG = SandboxConfig(timeout_s=5, cpu_s=5, memory_mb=512, max_output_bytes=4096)


@pytest.mark.parametrize(
    "code, status, detail",
    [
        ("print('hello')", "passed", ""),
        ("assert sorted([3, 1]) == [3, 1], 'not sorted'", "failed", "AssertionError: not sorted"),
        ("import sys; sys.exit(3)", "failed", "exit code 3"),
        ("1 / 0", "error", "ZeroDivisionError: division by zero"),
        ("def f(:\n    pass", "error", "SyntaxError"),
        ("import numpy_that_does_not_exist", "error", "ModuleNotFoundError"),
        ("raise TimeoutError('slow')", "timeout", "TimeoutError: slow"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "error", "killed by SIGSEGV"),
    ],
)
def test_statuses_of_ordinary_programs(code, status, detail):
    result = run_program(code, CFG)
    assert result.status == status, result
    assert result.detail.startswith(detail), result.detail
    assert result.duration_s > 0


def test_stdout_stderr_exit_code_and_stdin_are_captured():
    code = "import sys\ndata = sys.stdin.read()\nprint(data.upper(), end='')\nprint('warn', file=sys.stderr)"
    result = run_program(code, CFG, stdin="abc\ndef\n")
    assert (result.status, result.exit_code, result.signal) == ("passed", 0, None)
    assert result.stdout == "ABC\nDEF\n"
    assert result.stderr == "warn\n"


def test_wall_timeout_kills_the_program():
    result = run_program("while True:\n    pass", CFG, timeout_s=1.0)
    assert result.status == "timeout"
    assert result.exit_code is None and result.signal == signal.SIGKILL
    assert 1.0 <= result.duration_s < 4.0


def test_sleeping_program_times_out_without_using_cpu():
    result = run_program("import time\ntime.sleep(60)", CFG, timeout_s=1.0)
    assert result.status == "timeout" and result.duration_s < 4.0


def test_cpu_limit_is_a_limit_not_a_timeout():
    cfg = CFG.model_copy(update={"cpu_s": 1, "timeout_s": 8})
    result = run_program("while True:\n    pass", cfg)
    assert result.status == "limit", result
    assert result.signal == signal.SIGXCPU and "CPU time limit" in result.detail


def test_memory_limit():
    result = run_program("x = bytearray(3 * 1024 ** 3)", CFG)
    assert result.status == "limit" and "memory limit of 512 MiB" in result.detail


def test_file_size_limit():
    cfg = CFG.model_copy(update={"file_size_mb": 1})
    result = run_program("open('big', 'wb').write(b'x' * (2 * 1024 * 1024))", cfg)
    assert result.status == "limit" and "file size limit" in result.detail


def test_open_files_limit():
    code = "import tempfile\nkeep = [tempfile.TemporaryFile() for _ in range(500)]"
    result = run_program(code, CFG.model_copy(update={"max_open_files": 16}))
    assert result.status == "limit" and "open-file limit of 16" in result.detail


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped_and_the_program_killed(stream):
    code = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 10000)"
    result = run_program(code, CFG)
    assert result.status == "limit" and result.detail.startswith(f"{stream} exceeded 4096 bytes")
    assert len(getattr(result, stream)) == 4096
    assert result.duration_s < 4.0


def test_classify_exit_on_hand_made_outcomes():
    tb = 'Traceback (most recent call last):\n  File "main.py", line 1, in <module>\n    raise X\n'
    assert classify_exit(0, None, "", CFG) == ("passed", "")
    assert classify_exit(1, None, tb + "AssertionError\n", CFG) == ("failed", "AssertionError")
    assert classify_exit(1, None, tb + "MemoryError\n", CFG)[0] == "limit"
    assert classify_exit(1, None, tb + "BlockingIOError: [Errno 11] Resource temporarily unavailable\n", CFG)[0] == "limit"
    assert classify_exit(1, None, tb + "OSError: [Errno 27] File too large\n", CFG)[0] == "limit"
    assert classify_exit(1, None, tb + "KeyError: 'a'\n", CFG) == ("error", "KeyError: 'a'")
    assert classify_exit(None, 9, "", CFG, timed_out=True, timeout_s=2)[0] == "timeout"
    assert classify_exit(None, 9, "", CFG, overflow="stdout")[0] == "limit"
    assert classify_exit(152, 24, "", CFG)[0] == "limit"  # SIGXCPU
    assert classify_exit(139, 11, "", CFG) == ("error", "killed by SIGSEGV")
    assert classify_exit(2, None, "usage: bad flag\n", CFG) == ("failed", "exit code 2: usage: bad flag")


def test_last_exception_line_survives_interleaved_tracebacks():
    stderr = ("Traceback (most recent call last):\nBlockingIOError: [Errno 11] Resource temporarily unavailable\n"
              "Traceback (most recent call last):\n  File \"main.py\", line 2, in <module>\n    os.fork()\n")
    assert last_exception_line(stderr) == ("BlockingIOError", "[Errno 11] Resource temporarily unavailable")
    assert last_exception_line("all good\n") is None


def test_site_packages_only_when_asked():
    code = "import sys\nprint(any('site-packages' in p for p in sys.path))"
    assert run_program(code, CFG).stdout == "False\n"  # standard library only
    assert run_program(code, CFG.model_copy(update={"site_packages": True})).stdout == "True\n"


def test_longer_row_timeout_raises_the_cpu_limit_with_it():
    cfg = CFG.model_copy(update={"cpu_s": 1, "timeout_s": 1})
    result = run_program("while True:\n    pass", cfg, timeout_s=2.5)
    assert result.status == "timeout", result  # not cut at 1 s of CPU by RLIMIT_CPU
