"""Every isolation layer checked by hostile programs, not assumed: each program below tries to do
harm, and the test checks from the host that nothing happened and that the next execution works.

The layers that need no filesystem view (network, environment, processes) are also checked on the
`unshare` fallback, run with the system interpreter because the sandbox uid cannot read /root.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from domino_ray.config import SandboxConfig
from domino_ray.sandbox import LAYERS, SandboxError, ensure_isolation, isolation_report, run_program
from domino_ray.sandbox import isolation as isolation_mod

BWRAP = SandboxConfig(timeout_s=5, cpu_s=5, memory_mb=512)
SYSTEM_PYTHON = "/usr/bin/python3"
BACKENDS = [pytest.param(BWRAP, id="bwrap")]
if os.path.exists(SYSTEM_PYTHON) and shutil.which("unshare"):
    BACKENDS.append(pytest.param(BWRAP.model_copy(update={"backend": "unshare", "python": SYSTEM_PYTHON,
                                                          "allow_no_filesystem_isolation": True}), id="unshare"))
UNSHARE = BWRAP.model_copy(update={"backend": "unshare", "python": SYSTEM_PYTHON, "allow_no_filesystem_isolation": True})


def assert_sandbox_still_works(cfg: SandboxConfig) -> None:
    """'None of them affects later executions.'"""
    result = run_program("print(sum(range(10)))", cfg)
    assert (result.status, result.stdout) == ("passed", "45\n"), result


def pids_where(predicate) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if predicate(int(entry)):
                out.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return -1


def wait_until_gone(predicate, seconds: float = 3.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := pids_where(predicate)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# ------------------------------------------------------------------------------------ reporting
def test_report_lists_every_layer_active_on_this_machine():
    report = isolation_report(BWRAP)
    assert report["usable"] and report["backend"] == "bwrap"
    assert set(report["layers"]) == set(LAYERS)
    assert report["missing"] == [], report["notes"]
    if sys.prefix != sys.base_prefix:  # running from a venv: the sandbox must not use it
        assert not report["python"].startswith(sys.prefix)


def test_strict_refuses_when_a_layer_is_missing():
    cfg = UNSHARE.model_copy(update={"strict": True})
    with pytest.raises(SandboxError, match="filesystem"):
        run_program("print(1)", cfg)


def test_missing_layer_is_reported_once(caplog):
    cfg = UNSHARE
    isolation_mod._warned.discard("filesystem")
    with caplog.at_level(logging.WARNING, logger="domino_ray.sandbox.isolation"):
        ensure_isolation(cfg)
        ensure_isolation(cfg)
        assert run_program("print(1)", cfg).status == "passed"
    warnings = [r for r in caplog.records if "'filesystem' unavailable" in r.getMessage()]
    assert len(warnings) == 1


def test_unreadable_interpreter_without_bwrap_names_the_fix():
    if not str(Path(sys.base_prefix).resolve()).startswith("/root"):
        pytest.skip("the interpreter is readable by the sandbox uid here")
    report = isolation_report(BWRAP.model_copy(update={"backend": "unshare"}))
    assert report["usable"] is False and "sandbox.python" in report["error"]


# ------------------------------------------------------------------------------ hostile programs
@pytest.mark.parametrize("cfg", BACKENDS)
def test_network_is_unreachable(cfg):
    # A connection the sandbox made would wait in the listen backlog, accepted or not, so one look
    # after the program has ended sees it: no listener thread, no fixed wait.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = f"""
import socket
reached = []
for host, port in [("127.0.0.1", {port}), ("8.8.8.8", 53), ("1.1.1.1", 443)]:
    try:
        socket.create_connection((host, port), timeout=1).sendall(b"leak")
        reached.append(host)
    except OSError as e:
        print(host, type(e).__name__)
try:
    socket.getaddrinfo("pypi.org", 443)
    reached.append("dns")
except OSError:
    pass
assert not reached, reached
"""
    try:
        result = run_program(code, cfg)
        server.settimeout(0.5)
        try:
            leaked = server.accept()
        except socket.timeout:
            leaked = None
    finally:
        server.close()
    assert result.status == "passed", result
    assert leaked is None, "the sandbox reached a host port"
    assert_sandbox_still_works(cfg)


def test_writes_outside_the_work_dir_do_not_reach_the_host(tmp_path):
    target = tmp_path / "open"
    target.mkdir()
    target.chmod(0o777)  # only the private filesystem view protects it, not permissions
    host_tmp = Path("/tmp") / f"domino-escape-{uuid.uuid4().hex}"
    code = f"""
import os
for path in [{str(target / "pwned")!r}, {str(host_tmp)!r}, "/usr/pwned", "/etc/pwned", "/pwned", "/dev/shm/pwned"]:
    try:
        with open(path, "w") as f:
            f.write("pwned")
        print("wrote", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
open("inside-workdir", "w").write("fine")
print(sorted(os.listdir(".")))
"""
    result = run_program(code, BWRAP)
    assert result.status == "passed", result
    assert not (target / "pwned").exists() and not host_tmp.exists()
    for host_path in ("/usr/pwned", "/etc/pwned", "/pwned", "/dev/shm/pwned"):
        assert not Path(host_path).exists(), host_path
    assert "refused /usr/pwned" in result.stdout
    assert "inside-workdir" in result.stdout
    assert_sandbox_still_works(BWRAP)


def test_files_under_root_and_home_are_not_readable():
    secret = f"domino-secret-{uuid.uuid4().hex}"
    canary = Path.home() / f".domino-sandbox-canary-{uuid.uuid4().hex[:8]}"
    canary.write_text(secret)
    canary.chmod(0o644)  # readable by anyone who can see it
    try:
        code = f"""
import os
for path in [{str(canary)!r}, os.path.expanduser("~root/.bashrc"), "/root/.bashrc", "/root/.pyenv/version",
             "/etc/shadow", "/etc/passwd", "/proc/1/environ"]:
    try:
        print(path, open(path).read())
    except OSError as e:
        print("refused", path, type(e).__name__)
for d in ["/root", "/home", "/work", {str(Path.home())!r}]:
    try:
        print(d, os.listdir(d))
    except OSError as e:
        print("refused", d, type(e).__name__)
"""
        result = run_program(code, BWRAP)
    finally:
        canary.unlink()
    assert result.status == "passed", result
    assert secret not in result.stdout + result.stderr
    assert f"refused {canary}" in result.stdout
    assert "refused /home" in result.stdout and "refused /work" in result.stdout
    assert_sandbox_still_works(BWRAP)


@pytest.mark.parametrize("cfg", BACKENDS)
def test_environment_credentials_do_not_leak(cfg, monkeypatch):
    secret = f"AKIA-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("DOMINO_CANARY", secret)
    code = f"""
import os
print(dict(os.environ))
for path in ["/proc/self/environ", "/proc/1/environ", "/proc/{os.getpid()}/environ", "/proc/{os.getppid()}/environ"]:
    try:
        print(path, open(path, "rb").read())
    except OSError as e:
        print("refused", path, type(e).__name__)
"""
    result = run_program(code, cfg)
    assert result.status == "passed", result
    assert secret not in result.stdout + result.stderr
    assert "AWS_" not in result.stdout.splitlines()[0]


@pytest.mark.parametrize("cfg", BACKENDS)
def test_fork_bomb_hits_the_process_limit(cfg):
    result = run_program("import os\nwhile True:\n    os.fork()", cfg)
    assert result.status == "limit" and "RLIMIT_NPROC" in result.detail, result
    assert_sandbox_still_works(cfg)


def test_persistent_fork_bomb_is_killed_with_its_whole_family():
    code = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = run_program(code, BWRAP, timeout_s=2)
    assert result.status == "timeout", result
    uid = int(result.stdout.split()[0])
    assert uid != 0
    assert wait_until_gone(lambda pid: real_uid(pid) == uid) == []
    assert_sandbox_still_works(BWRAP)


def test_memory_bomb_hits_the_memory_limit():
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))", BWRAP)
    assert result.status == "limit" and "memory limit" in result.detail, result
    assert_sandbox_still_works(BWRAP)


@pytest.mark.parametrize("cfg", BACKENDS)
def test_infinite_loop_times_out(cfg):
    code = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    pass"
    result = run_program(code, cfg, timeout_s=1.5)
    assert result.status == "timeout" and result.signal == 9, result
    uid = int(result.stdout.split()[0])
    assert uid != 0 and wait_until_gone(lambda pid: real_uid(pid) == uid) == []
    assert_sandbox_still_works(cfg)


@pytest.mark.parametrize("cfg", BACKENDS)
def test_sleeping_children_are_not_left_behind(cfg):
    marker = f"domino-leftover-{uuid.uuid4().hex}"
    code = f"""
import os, subprocess, sys
sleeper = [sys.executable, "-c", "import time; time.sleep(300)  # {marker}"]
subprocess.Popen(sleeper)                                   # plain child
subprocess.Popen(sleeper, start_new_session=True)           # escapes the process group
if os.fork() == 0:                                          # double-forked daemon
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, sleeper)
    os._exit(0)
print("spawned")
"""
    result = run_program(code, cfg)
    assert result.status == "passed", result  # leftover children holding the pipes would make it a timeout
    assert wait_until_gone(lambda pid: marker in cmdline(pid)) == []


@pytest.mark.parametrize("cfg", BACKENDS)
def test_killing_the_parent_and_others_is_contained(cfg):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        code = f"""
import os, signal
for pid in [os.getppid(), 1, {bystander.pid}, {os.getpid()}]:
    try:
        os.kill(pid, signal.SIGKILL)
        print("signalled", pid)
    except OSError as e:
        print("refused", pid, type(e).__name__)
try:
    os.kill(-1, signal.SIGKILL)  # every process this uid may signal (Linux spares the caller)
except OSError as e:
    print("refused -1", type(e).__name__)
os.killpg(0, signal.SIGKILL)     # its own group: this one dies
"""
        result = run_program(code, cfg)
        assert bystander.poll() is None, "a host process was killed"
    finally:
        bystander.kill()
        bystander.wait()
    assert result.status == "error" and "SIGKILL" in result.detail, result
    assert_sandbox_still_works(cfg)


def test_deleting_files_does_not_touch_the_host(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    victim.chmod(0o777)
    (victim / "data.txt").chmod(0o666)
    code = f"""
import os, shutil
for action in [lambda: os.remove({str(victim / "data.txt")!r}), lambda: shutil.rmtree({str(victim)!r}),
               lambda: os.remove("/usr/bin/env"), lambda: shutil.rmtree("/usr/share/doc")]:
    try:
        action()
        print("deleted")
    except OSError as e:
        print("refused", type(e).__name__)
"""
    result = run_program(code, BWRAP)
    assert result.status == "passed", result
    assert "deleted" not in result.stdout
    assert (victim / "data.txt").read_text() == "keep me"
    assert Path("/usr/bin/env").exists() and Path("/usr/share/doc").exists()
    assert_sandbox_still_works(BWRAP)


def test_work_dir_is_private_and_removed_afterwards(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run dirs are made here, nowhere else
    code = "import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())"
    first = run_program(code, BWRAP)
    second = run_program("import os\nprint(sorted(os.listdir('.')))", BWRAP)
    assert first.status == second.status == "passed"
    assert "left.txt" not in second.stdout  # each run starts empty
    assert list(tmp_path.glob("domino-sbx-*")) == []


# ------------------------------------------------------------------------------------ fallbacks
def test_fallback_is_refused_without_explicit_allowance():
    cfg = BWRAP.model_copy(update={"backend": "unshare", "python": SYSTEM_PYTHON})
    with pytest.raises(SandboxError, match="allow_no_filesystem_isolation"):
        run_program("print(1)", cfg)
    report = isolation_report(cfg)
    assert report["usable"] is False and "allow_no_filesystem_isolation" in report["error"]


def test_automatic_fallback_happens_only_when_allowed(monkeypatch):
    """A host without bubblewrap (its lookup answers 'not installed'): backend auto refuses, naming
    the reason and the key; allowed, it runs under unshare with the other layers."""
    real_which = isolation_mod._which
    monkeypatch.setattr(isolation_mod, "_which", lambda name: None if name == "bwrap" else real_which(name))
    isolation_mod._plan_cached.cache_clear()
    try:
        cfg = BWRAP.model_copy(update={"python": SYSTEM_PYTHON})
        with pytest.raises(SandboxError, match=r"bwrap not found.*allow_no_filesystem_isolation"):
            run_program("print(1)", cfg)
        allowed = cfg.model_copy(update={"allow_no_filesystem_isolation": True})
        report = isolation_report(allowed)
        assert report["backend"] == "unshare" and report["missing"] == ["filesystem"], report
        assert run_program("import os; print(os.getuid())", allowed).stdout.strip() != "0"
    finally:
        monkeypatch.undo()
        isolation_mod._plan_cached.cache_clear()


def _write_attempts(targets: list[str]) -> str:
    return f"""
import os
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("pwned")
        print("wrote", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
open("in-workdir", "w").write("fine")
print("workdir ok")
"""


def test_fallback_cannot_write_shared_world_writable_dirs():
    """Without bwrap's private root, Landlock keeps writes inside the run's work dir: not /tmp,
    /dev/shm, nor a world-writable folder such as Ray's session dirs (modelled by one in /tmp)."""
    root = Path("/tmp") / f"domino-ray-test-{uuid.uuid4().hex}"
    session = root / "session_latest"
    session.mkdir(parents=True)
    for d in (root, session):
        d.chmod(0o1777)
    targets = [str(session / "pwned"), f"/dev/shm/domino-pwned-{uuid.uuid4().hex}", f"/tmp/domino-pwned-{uuid.uuid4().hex}"]
    try:
        result = run_program(_write_attempts(targets), UNSHARE)
        assert result.status == "passed", result
        assert "workdir ok" in result.stdout and "wrote" not in result.stdout, result.stdout
        assert not any(Path(t).exists() for t in targets)
        # control: without the layer the same program writes into the world-writable dir
        loose = run_program(_write_attempts(targets[:1]), UNSHARE.model_copy(update={"skip_layers": ["write_confinement"]}))
        assert f"wrote {targets[0]}" in loose.stdout, loose
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for t in targets[1:]:
            Path(t).unlink(missing_ok=True)
    assert_sandbox_still_works(UNSHARE)
