"""Run one untrusted program in a fresh child process with every isolation layer, and say what
happened: `run_program(code, cfg, stdin) -> ExecResult`.

Statuses (schema.EXEC_STATUSES):
    passed   exit code 0
    failed   it ran and its tests said no: AssertionError, or a non-zero exit without a traceback
    error    it crashed: any other uncaught exception (SyntaxError, NameError, ...) or a fatal signal
    timeout  the wall-clock limit passed (the whole process group is killed), or a TimeoutError
    limit    a resource limit stopped it: memory (MemoryError), CPU (SIGXCPU), file size, open
             files, processes (fork failing with EAGAIN), or output beyond max_output_bytes
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import selectors
import shutil
import signal as _signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from domino_ray.config import SandboxConfig
from domino_ray.sandbox.isolation import IsolationPlan, build_command, ensure_isolation, host_env

__all__ = ["ExecResult", "run_program", "classify_exit", "last_exception_line"]

_GRACE_S = 0.2  # after the program exits, how long leftover pipe holders get before we stop reading
_READ_CHUNK = 65536
_EXC_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)(?::\s?(.*))?$")
_EXC_SUFFIXES = ("Error", "Exception", "Exit", "Interrupt", "Iteration", "Warning")


@dataclass
class ExecResult:
    status: str  # passed | failed | error | timeout | limit (schema.EXEC_STATUSES)
    exit_code: Optional[int]  # None when it never exited on its own (killed by us)
    signal: Optional[int]  # the signal that ended it, if any
    stdout: str
    stderr: str
    duration_s: float
    detail: str = ""  # one line: why it did not pass (exception line, limit, signal)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- classification
def last_exception_line(stderr: str) -> Optional[tuple[str, str]]:
    """(exception name, message) of the last traceback's final line in stderr, if any. Searched from
    the end among unindented lines, because processes that share stderr (a fork bomb's children)
    interleave their tracebacks, whose source and `File` lines are indented."""
    for line in reversed(stderr.rstrip().splitlines()[-200:]):
        if not line.strip() or line[0].isspace():
            continue
        m = _EXC_LINE.match(line.rstrip())
        if m and (m.group(1).endswith(_EXC_SUFFIXES) or m.group(1) in ("KeyboardInterrupt", "StopIteration")):
            return m.group(1), (m.group(2) or "").strip()
    return None


def _signal_name(sig: int) -> str:
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _limit_from_exception(name: str, msg: str, cfg: SandboxConfig) -> Optional[str]:
    if name == "MemoryError":
        return f"memory limit of {cfg.memory_mb} MiB (RLIMIT_AS) reached"
    if "Resource temporarily unavailable" in msg or "[Errno 11]" in msg:
        return f"process limit of {cfg.max_processes} (RLIMIT_NPROC) reached: {name}: {msg}"
    if "Too many open files" in msg:
        return f"open-file limit of {cfg.max_open_files} (RLIMIT_NOFILE) reached"
    if "File too large" in msg or "No space left on device" in msg:
        return f"file size limit reached ({cfg.file_size_mb} MiB per file, {cfg.workdir_mb} MiB in total): {msg}"
    return None


def classify_exit(exit_code: Optional[int], sig: Optional[int], stderr: str, cfg: SandboxConfig,
                  timed_out: bool = False, timeout_s: float = 0.0, overflow: Optional[str] = None) -> tuple[str, str]:
    """(status, detail) of a finished execution. Pure: tested on hand-made inputs."""
    if timed_out:
        return "timeout", f"wall-clock limit of {timeout_s:g} s exceeded; process group killed"
    if overflow:
        return "limit", f"{overflow} exceeded {cfg.max_output_bytes} bytes; program killed"
    if sig == _signal.SIGXCPU:
        return "limit", f"CPU time limit of {cfg.cpu_s} s (RLIMIT_CPU) reached (SIGXCPU)"
    if sig == _signal.SIGXFSZ:
        return "limit", f"file size limit of {cfg.file_size_mb} MiB (RLIMIT_FSIZE) reached (SIGXFSZ)"
    if exit_code == 0 and sig is None:
        return "passed", ""
    exc = last_exception_line(stderr)
    if exc:
        name, msg = exc
        limit = _limit_from_exception(name, msg, cfg)
        line = f"{name}: {msg}" if msg else name
        if limit:
            return "limit", limit
        if name == "AssertionError":
            return "failed", line
        if name == "TimeoutError":
            return "timeout", line
        return "error", line
    if sig is not None:
        return "error", f"killed by {_signal_name(sig)}"
    tail = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
    return "failed", f"exit code {exit_code}" + (f": {tail}" if tail else "")


# ----------------------------------------------------------------------------------- uid slots
@contextlib.contextmanager
def _uid_slot(cfg: SandboxConfig, plan: IsolationPlan) -> Iterator[Optional[int]]:
    """Hold one of `uid_slots` uids for the duration of a run (a flock per slot, node-wide), so
    concurrent runs never share a uid and so never share an RLIMIT_NPROC count."""
    if not plan.switches_uid:
        yield None
        return
    slots = [s for s in range(cfg.uid_slots) if cfg.uid - s >= 1]
    lock_dir = Path(tempfile.gettempdir(), f"domino-sandbox-slots-{os.geteuid()}")
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    start = os.getpid() % len(slots)
    order = slots[start:] + slots[:start]
    fd = None
    try:
        for i, slot in enumerate(order + [order[0]]):
            fd = os.open(lock_dir / f"uid-{cfg.uid - slot}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            last_try = i == len(order)  # every slot busy: wait for our preferred one
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if last_try else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                continue
            yield cfg.uid - slot
            return
    finally:
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def _run_dir(code: str, stdin: Optional[str], uid: Optional[int], plan: IsolationPlan) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="domino-sbx-")
    try:
        Path(path, "main.py").write_text(code, encoding="utf-8")
        if stdin is not None:
            Path(path, "stdin").write_text(stdin, encoding="utf-8")
        os.chmod(Path(path, "main.py"), 0o644)
        os.chmod(path, 0o755)
        if plan.backend != "bwrap" and uid is not None:
            os.chown(path, uid, uid)  # without a private tmpfs the run dir is the writable place
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------- running
def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, _signal.SIGKILL)


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether the program has exited, without reaping it: while it is an unreaped zombie its pid
    (= the process group id) cannot be reused, so killing the group can never hit a stranger."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _collect(proc: subprocess.Popen, timeout_s: float, cap: int) -> tuple[bytes, bytes, bool, Optional[str]]:
    """Read stdout/stderr until both close, the deadline passes or a stream exceeds `cap`.
    Returns (stdout, stderr, timed_out, overflowing stream name)."""
    deadline = time.monotonic() + timeout_s
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    timed_out, overflow, exited_at = False, None, None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and _has_exited(proc):
                exited_at = now
                _kill_group(proc.pid)  # leftover children in the group go with the program
            if exited_at is not None and now - exited_at > _GRACE_S:
                break  # something outside the group still holds the pipes; stop reading
            for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += chunk
                if len(bufs[key.fd]) > cap:
                    overflow = names[key.fd]
                    break
            if overflow:
                break
    finally:
        sel.close()
        _kill_group(proc.pid)
    return bytes(bufs[proc.stdout.fileno()][:cap]), bytes(bufs[proc.stderr.fileno()][:cap]), timed_out, overflow


def _exit_status(returncode: int, plan: IsolationPlan) -> tuple[Optional[int], Optional[int]]:
    """(exit code, signal). bwrap and unshare report a child killed by signal N as exit 128+N."""
    if returncode < 0:
        return None, -returncode
    if plan.backend != "none" and returncode > 128 and (returncode - 128) in {s.value for s in _signal.Signals}:
        return returncode, returncode - 128
    return returncode, None


def run_program(code: str, cfg: SandboxConfig, stdin: Optional[str] = None, timeout_s: Optional[float] = None) -> ExecResult:
    """Run `code` as a Python program in a fresh sandboxed child process (never in this process).

    A `timeout_s` above `cfg.timeout_s` (a benchmark with many tests, say) also raises the CPU limit
    to match, so that RLIMIT_CPU does not cut a run the caller allowed to take longer.

    Raises SandboxError only when the sandbox itself cannot run (strict with a missing layer, no
    usable interpreter); everything the program does is reported in the result."""
    plan = ensure_isolation(cfg)
    timeout = float(timeout_s or cfg.timeout_s)
    if timeout > cfg.cpu_s and timeout > cfg.timeout_s:
        cfg = cfg.model_copy(update={"cpu_s": math.ceil(timeout)})
    with _uid_slot(cfg, plan) as uid, _run_dir(code, stdin, uid, plan) as run_dir:
        cmd = build_command(plan, cfg, run_dir, uid)
        stdin_file = open(Path(run_dir, "stdin"), "rb") if stdin is not None else subprocess.DEVNULL
        start = time.monotonic()
        try:
            proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=run_dir, env=host_env(), start_new_session=True, close_fds=True)
        finally:
            if stdin is not None:
                stdin_file.close()
        try:
            out, err, timed_out, overflow = _collect(proc, timeout, cfg.max_output_bytes)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        duration = time.monotonic() - start
    exit_code, sig = _exit_status(proc.returncode, plan)
    if timed_out or overflow:
        exit_code, sig = None, _signal.SIGKILL
    stderr = err.decode("utf-8", errors="replace")
    status, detail = classify_exit(exit_code, sig, stderr, cfg, timed_out, timeout, overflow)
    return ExecResult(status, exit_code, sig, out.decode("utf-8", errors="replace"), stderr, round(duration, 4), detail)
