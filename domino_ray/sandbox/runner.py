"""Run one untrusted program in a fresh child process with every isolation layer, and say what
happened: `run_program(code, cfg, stdin) -> ExecResult`.

Statuses (schema.EXEC_STATUSES):
    passed   exit code 0
    failed   it ran and its tests said no: AssertionError, or a non-zero exit without a traceback
    error    it crashed: any other uncaught exception (SyntaxError, NameError, ...) or a fatal signal
    timeout  the wall-clock limit passed (the whole process group is killed), or a TimeoutError
    limit    a resource limit stopped it: memory (MemoryError, or the run's cgroup OOM-killed it),
             CPU (SIGXCPU), file size, a full work dir (bytes or files), open files, processes
             (fork failing with EAGAIN), or output beyond max_output_bytes

The exit status is exact: the reporter inside the sandbox (isolation.py) gives the program's raw
wait status, so `sys.exit(137)` is exit code 137 and not SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import selectors
import shutil
import signal as _signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from domino_ray.config import SandboxConfig
from domino_ray.sandbox import kernel
from domino_ray.sandbox.cgroups import join_prefix
from domino_ray.sandbox.isolation import IsolationPlan, LaunchFds, build_command, ensure_isolation, host_env
from domino_ray.sandbox.seccomp import filter_fd

__all__ = ["ExecResult", "run_program", "classify_exit", "last_exception_line", "launch", "Outcome"]

_MIB = 1024 * 1024

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
    if "Cannot allocate memory" in msg or "[Errno 12]" in msg:
        return f"memory limit reached ({cfg.memory_mb} MiB per process, {cfg.memory_total_mb} MiB per run): {name}: {msg}"
    if "Resource temporarily unavailable" in msg or "[Errno 11]" in msg:
        return f"process limit of {cfg.max_processes} (RLIMIT_NPROC) reached: {name}: {msg}"
    if "Too many open files" in msg:
        return f"open-file limit of {cfg.max_open_files} (RLIMIT_NOFILE) reached"
    if "File too large" in msg or "[Errno 27]" in msg:
        return f"file size limit of {cfg.file_size_mb} MiB (RLIMIT_FSIZE) reached: {msg}"
    if "No space left on device" in msg or "[Errno 28]" in msg:
        return f"work dir full (its tmpfs holds {cfg.workdir_mb} MiB and {cfg.workdir_inodes} files): {msg}"
    return None


def classify_exit(exit_code: Optional[int], sig: Optional[int], stderr: str, cfg: SandboxConfig,
                  timed_out: bool = False, timeout_s: float = 0.0, overflow: Optional[str] = None,
                  oom_killed: bool = False) -> tuple[str, str]:
    """(status, detail) of a finished execution. Pure: tested on hand-made inputs. `oom_killed`:
    the kernel OOM-killed a process of the run's cgroup."""
    if timed_out:
        return "timeout", f"wall-clock limit of {timeout_s:g} s exceeded; process group killed"
    if overflow:
        return "limit", f"{overflow} exceeded {cfg.max_output_bytes} bytes; program killed"
    if oom_killed and not (exit_code == 0 and sig is None):
        return "limit", f"memory limit of the run ({cfg.memory_total_mb} MiB, cgroup) reached: OOM-killed"
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


# ------------------------------------------------------------------------------------- launching
def _in_launcher_thread(plan: IsolationPlan, uid: Optional[int], fn):
    """Call fn() in a thread of its own that first empties the slot uid's keyrings and joins a
    fresh session keyring (kernel credentials are per thread, so no other thread of this process is
    touched); the child started by fn inherits that new, empty keyring. The thread lives until fn
    has reaped the child: bwrap's --die-with-parent is PR_SET_PDEATHSIG, which fires when the
    parent THREAD exits, so a thread that ended right after the spawn would kill the run."""
    if not plan.has("session_keyring"):
        return fn()
    box: dict = {}

    def target() -> None:
        try:
            if uid is not None and plan.as_root:
                kernel.clear_user_keyrings(uid)
            kernel.join_fresh_session_keyring()
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="domino-sandbox-launch")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _read_all(fd: Optional[int]) -> bytes:
    if fd is None:
        return b""
    os.set_blocking(fd, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Outcome:
    """What one launch observed, before classification."""
    stdout: bytes
    stderr: bytes
    returncode: int  # of the launcher (bwrap, unshare, or the program itself under backend none)
    wait_status: Optional[int]  # the program's raw wait status when known exactly, else None
    started: Optional[bool]  # bwrap's --json-status-fd: whether its setup finished and it exec'd; None = not bwrap
    timed_out: bool
    overflow: Optional[str]
    oom_kills: int
    duration_s: float


def launch(plan: IsolationPlan, cfg: SandboxConfig, code: str, stdin: Optional[str], uid: Optional[int],
           timeout: float) -> Outcome:
    """Run `code` once with every layer of `plan`: a fresh run dir (prog/ read-only, work/ the
    capped tmpfs), a fresh cgroup, the seccomp memfd and status pipes; all removed afterwards."""
    run_dir = tempfile.mkdtemp(prefix="domino-sbx-")
    work = os.path.join(run_dir, "work")
    mounted, cgroup, parent_fds, child_fds = False, None, [], []
    try:
        prog = Path(run_dir, "prog")
        prog.mkdir()
        Path(prog, "main.py").write_text(code, encoding="utf-8")
        os.chmod(Path(prog, "main.py"), 0o644)
        os.chmod(prog, 0o755)
        os.chmod(run_dir, 0o755)
        os.mkdir(work, 0o700)
        if stdin is not None:
            Path(run_dir, "stdin").write_text(stdin, encoding="utf-8")  # root-only: reaches the program as a fd
        owner = uid if uid is not None else os.getuid()
        if plan.has("tmpfs_inode_cap"):
            kernel.mount_tmpfs(work, cfg.workdir_mb * _MIB, cfg.workdir_inodes, owner, owner)
            mounted = True
        elif plan.backend != "bwrap" and uid is not None:
            os.chown(work, uid, uid)  # without the capped tmpfs the work dir is a plain host dir
        if plan.cgroups is not None:
            # +4: the launcher's own processes (bwrap, its init, the reporter) count in pids.max
            cgroup = plan.cgroups.create(cfg.memory_total_mb * _MIB, cfg.max_processes + 4, cfg.cpu_cores)
        seccomp_fd = filter_fd() if plan.has("seccomp") and (plan.backend == "bwrap" or plan.guarded) else None
        json_r = json_w = status_r = status_w = None
        if plan.backend == "bwrap":
            json_r, json_w = os.pipe()
        if plan.has("exit_status") and plan.backend != "none" and "perl" in plan.tools:
            status_r, status_w = os.pipe()
        child_fds = [fd for fd in (seccomp_fd, json_w, status_w) if fd is not None]
        parent_fds = [fd for fd in (json_r, status_r) if fd is not None]
        fds = LaunchFds(seccomp_fd, json_w, status_w)
        cmd = join_prefix(cgroup) + build_command(plan, cfg, run_dir, uid, fds)
        cwd = work if plan.backend != "bwrap" else run_dir
        start = time.monotonic()

        def run_child():
            nonlocal child_fds
            stdin_file = open(Path(run_dir, "stdin"), "rb") if stdin is not None else subprocess.DEVNULL
            inside = (cgroup.thread_inside(plan.cgroups.parents) if cgroup is not None and cgroup.version == 1
                      else contextlib.nullcontext())
            try:
                with inside:
                    proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                            env=host_env(), start_new_session=True, close_fds=True, pass_fds=tuple(child_fds))
            finally:
                if stdin is not None:
                    stdin_file.close()
                for fd in child_fds:
                    os.close(fd)
                child_fds = []
            try:
                return proc, _collect(proc, timeout, cfg.max_output_bytes)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                proc.stdout.close()
                proc.stderr.close()

        proc, (out, err, timed_out, overflow) = _in_launcher_thread(plan, uid, run_child)
        duration = time.monotonic() - start
        started = None
        if json_r is not None:
            docs = [json.loads(line) for line in _read_all(json_r).decode(errors="replace").splitlines() if line.strip().startswith("{")]
            started = any("exit-code" in d for d in docs)
        wait_status = None
        if status_r is not None:
            text = _read_all(status_r).decode(errors="replace").strip()
            wait_status = int(text) if text.isdigit() else None
        elif plan.backend == "none":  # the program is our own child: Popen saw its real status
            rc = proc.returncode
            wait_status = -rc if rc < 0 else rc << 8
        oom = cgroup.oom_kills() if cgroup is not None else 0
        return Outcome(out, err, proc.returncode, wait_status, started, timed_out, overflow, oom, duration)
    finally:
        for fd in child_fds + parent_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if cgroup is not None:
            cgroup.remove()
        if mounted:
            with contextlib.suppress(OSError):
                kernel.unmount(work)
        shutil.rmtree(run_dir, ignore_errors=True)


def _exit_status(returncode: int, wait_status: Optional[int], exact: bool) -> tuple[Optional[int], Optional[int]]:
    """(exit code, signal) of the program. With its raw wait status both are exact. Without it
    (no reporter) bwrap and unshare report a signal N as 128+N, which an exit code above 128 looks
    like too: then such a code is taken for a signal, the old ambiguity, and the layer is reported
    missing."""
    if wait_status is not None:
        if os.WIFSIGNALED(wait_status):
            return None, os.WTERMSIG(wait_status)
        return os.WEXITSTATUS(wait_status), None
    if returncode < 0:
        return None, -returncode
    if not exact and returncode > 128 and (returncode - 128) in {s.value for s in _signal.Signals}:
        return None, returncode - 128
    return returncode, None


def run_program(code: str, cfg: SandboxConfig, stdin: Optional[str] = None, timeout_s: Optional[float] = None) -> ExecResult:
    """Run `code` as a Python program in a fresh sandboxed child process (never in this process).

    A `timeout_s` above `cfg.timeout_s` (a benchmark with many tests, say) also raises the CPU limit
    to match, so that RLIMIT_CPU does not cut a run the caller allowed to take longer.

    Raises SandboxError only when the sandbox itself cannot run (strict with a missing layer, no
    filesystem isolation without allow_no_filesystem_isolation, no usable interpreter); everything
    the program does is reported in the result."""
    plan = ensure_isolation(cfg)
    timeout = float(timeout_s or cfg.timeout_s)
    if timeout > cfg.cpu_s and timeout > cfg.timeout_s:
        cfg = cfg.model_copy(update={"cpu_s": math.ceil(timeout)})
    with _uid_slot(cfg, plan) as uid:
        out = launch(plan, cfg, code, stdin, uid, timeout)
    stderr = out.stderr.decode("utf-8", errors="replace")
    if out.timed_out or out.overflow:
        exit_code, sig = None, _signal.SIGKILL
    elif out.started is False:  # bwrap never exec'd: its own setup failed (the reason is on stderr)
        tail = stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"exit status {out.returncode}"
        return ExecResult("error", None, None, "", stderr, round(out.duration_s, 4), f"sandbox failed to start: {tail}")
    else:
        exit_code, sig = _exit_status(out.returncode, out.wait_status, exact=plan.backend == "none")
    status, detail = classify_exit(exit_code, sig, stderr, cfg, out.timed_out, timeout, out.overflow,
                                   oom_killed=out.oom_kills > 0)
    return ExecResult(status, exit_code, sig, out.stdout.decode("utf-8", errors="replace"), stderr,
                      round(out.duration_s, 4), detail)
