"""run_program statuses on ordinary programs, limits and the pure exit classification."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from domino_ray.config import SandboxConfig
from domino_ray.sandbox import classify_exit, run_program
from domino_ray.sandbox.runner import _exit_status, last_exception_line

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


def _alive_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _gone(marker: str, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive_with(marker)


@pytest.mark.parametrize("body", ["while True:\n    pass", "import time\ntime.sleep(60)"], ids=["busy", "sleeping"])
def test_wall_timeout_kills_the_program_and_its_group(body):
    marker = f"domino-timeout-{uuid.uuid4().hex}"
    code = (f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)  # {marker}'])\n"
            f"print('started', flush=True)\n{body}")
    # 3 s, not 1: on a loaded machine a sandboxed interpreter can take over a second to start printing
    result = run_program(code, CFG, timeout_s=3.0)
    assert result.status == "timeout" and result.detail.startswith("wall-clock limit of 3 s"), result
    assert result.exit_code is None and result.signal == signal.SIGKILL
    assert result.stdout == "started\n"  # it did run; the deadline, not a crash, ended it
    assert _gone(marker), "a child of the timed-out program is still running"


def test_cpu_limit_is_a_limit_not_a_timeout():
    # a wall limit far above the CPU limit: under load CPU time accrues slower than wall time
    cfg = CFG.model_copy(update={"cpu_s": 1, "timeout_s": 60})
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
    assert result.exit_code is None and result.signal == signal.SIGKILL  # killed by us, not run to a timeout


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
    assert classify_exit(137, None, "", CFG) == ("failed", "exit code 137")  # an exit code, not SIGKILL
    assert classify_exit(None, 9, "", CFG, oom_killed=True)[0] == "limit"
    assert classify_exit(1, None, "", CFG, oom_killed=True)[0] == "limit"  # a child OOM-killed, the parent failed
    assert classify_exit(0, None, "", CFG, oom_killed=True) == ("passed", "")  # survived it
    assert classify_exit(1, None, tb + "OSError: [Errno 28] No space left on device\n", CFG)[1].startswith("work dir full")
    assert classify_exit(1, None, tb + "OSError: [Errno 12] Cannot allocate memory\n", CFG)[0] == "limit"


def test_exit_status_is_exact_with_the_wait_status():
    assert _exit_status(137, 137 << 8, exact=False) == (137, None)  # the reporter saw exit(137)
    assert _exit_status(137, signal.SIGKILL, exact=False) == (None, signal.SIGKILL)
    assert _exit_status(0, 0, exact=False) == (0, None)
    assert _exit_status(-11, None, exact=True) == (None, 11)  # our own child (backend none)
    assert _exit_status(137, None, exact=True) == (137, None)
    assert _exit_status(137, None, exact=False) == (None, 9)  # bwrap alone: 128+N is ambiguous
    assert _exit_status(3, None, exact=False) == (3, None)


def test_filling_the_work_dir_is_a_limit():
    cfg = CFG.model_copy(update={"workdir_mb": 2, "file_size_mb": 8})  # the tmpfs fills before RLIMIT_FSIZE
    code = "with open('fill', 'wb') as f:\n    for i in range(6):\n        f.write(b'x' * (1 << 20))\n        f.flush()\n        print(i, flush=True)"
    result = run_program(code, cfg)
    assert result.status == "limit" and result.detail.startswith("work dir full"), result
    assert "No space left on device" in result.detail
    assert len(result.stdout.split()) <= 2  # at most 2 MiB got in
    assert run_program("print(1)", cfg).status == "passed"  # the next run has an empty work dir


def test_inode_flood_is_bounded():
    cfg = CFG.model_copy(update={"workdir_inodes": 64})
    code = "import os\nn = 0\ntry:\n    while True:\n        open(f'f{n}', 'w').close()\n        n += 1\nfinally:\n    print(n, flush=True)"
    result = run_program(code, cfg)
    assert result.status == "limit" and result.detail.startswith("work dir full"), result
    assert 0 < int(result.stdout) <= 64
    assert run_program("print(1)", cfg).status == "passed"


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
