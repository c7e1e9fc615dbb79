"""The hardening layers, each attacked by a hostile program (keyrings, seccomp, the per-run cgroup,
the capped tmpfs, the dedicated uid, exit status, namespaces, capabilities), checked from the host,
with a clean run afterwards; where the layer can be left off (sandbox.skip_layers) the same attack
is shown to succeed without it, so each test is known to detect the hole it guards. Strict refuses
without each layer.
"""

from __future__ import annotations

import ctypes
import os
import platform
import pwd
import threading

import pytest

from domino_ray.config import SandboxConfig
from domino_ray.sandbox import SandboxError, ensure_isolation, isolation_report, run_program
from domino_ray.sandbox.isolation import OPTIONAL_LAYERS

CFG = SandboxConfig(timeout_s=8, cpu_s=8, memory_mb=512, memory_total_mb=192)
X86 = platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not X86, reason="the hardening layers need root on x86_64 here")

_NR = {"keyctl": 250, "add_key": 248, "request_key": 249, "unshare": 272, "mount": 165, "bpf": 321,
       "perf_event_open": 298, "io_uring_setup": 425, "userfaultfd": 323, "ptrace": 101, "setns": 308}
KEYCTL_READ, KEYCTL_DESCRIBE = 11, 6
KEY_SPEC_SESSION, KEY_SPEC_USER = -3, -4


def clean_run(cfg: SandboxConfig = CFG) -> None:
    result = run_program("print(sum(range(10)))", cfg)
    assert (result.status, result.stdout) == ("passed", "45\n"), result


def test_every_layer_is_active_here():
    report = isolation_report(CFG)
    assert report["usable"] and report["missing"] == [], report["notes"]
    assert report["cgroup"].startswith("v")


@pytest.mark.parametrize("layer", OPTIONAL_LAYERS)
def test_strict_refuses_without_each_layer(layer):
    cfg = CFG.model_copy(update={"strict": True, "skip_layers": [layer]})
    with pytest.raises(SandboxError, match=layer):
        ensure_isolation(cfg)
    ensure_isolation(CFG.model_copy(update={"strict": True}))  # all layers: no refusal


# ------------------------------------------------------------------------------------- keyrings
_KEY_PROGRAM = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(*args):
    r = libc.syscall(*args)
    return r if r >= 0 else "err:" + os.strerror(ctypes.get_errno())
buf = ctypes.create_string_buffer(4096)
print("uid", os.getuid())
print("read-planted", call(250, 11, {key_id}, buf, 4096), buf.value)
print("describe-planted", call(250, 6, {key_id}, buf, 4096), buf.value)
print("session-list", call(250, 11, -3, buf, 4096))
print("search", call(249, b"user", b"domino-canary", None, 0))
print("user-keyring-list", call(250, 11, -4, buf, 4096))
print("add-session", call(248, b"user", b"domino-left-session", b"x", 1, -3))
print("add-user", call(248, b"user", b"domino-left-user", b"x", 1, -4))
"""


def _with_planted_key(fn):
    """Run fn(key_id, secret) in a thread whose session keyring holds a planted key (the thread's
    own credentials; the test process is not touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    secret = os.urandom(8).hex().encode()
    box: dict = {}

    def target():
        try:
            assert libc.syscall(250, 1, b"domino-test-session", 0, 0, 0) >= 0  # JOIN_SESSION_KEYRING
            key_id = libc.syscall(248, b"user", b"domino-canary", secret, len(secret), KEY_SPEC_SESSION)
            assert key_id > 0, os.strerror(ctypes.get_errno())
            box["value"] = fn(key_id, secret)
            buf = ctypes.create_string_buffer(4096)
            n = libc.syscall(250, KEYCTL_READ, KEY_SPEC_SESSION, buf, 4096)
            box["parent_session_keys"] = n // 4  # key ids in the parent's session keyring afterwards
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box


def _lines(stdout: str) -> dict[str, str]:
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in stdout.splitlines() if " " in line}


def test_planted_key_is_unreachable_and_nothing_persists_without_seccomp():
    """The session-keyring layer alone (seccomp off, so keyctl itself is allowed)."""
    cfg = CFG.model_copy(update={"skip_layers": ["seccomp"]})

    def attack(key_id, secret):
        first = run_program(_KEY_PROGRAM.format(key_id=key_id), cfg)
        second = run_program(_KEY_PROGRAM.format(key_id=key_id), cfg)
        return first, second, secret

    box = _with_planted_key(attack)
    first, second, secret = box["value"]
    assert first.status == second.status == "passed", (first, second)
    out1, out2 = _lines(first.stdout), _lines(second.stdout)
    assert secret.decode() not in first.stdout + second.stdout
    assert out1["read-planted"].startswith("err:") and out1["describe-planted"].startswith("err:")
    assert out1["session-list"].startswith("0") and out1["search"].startswith("err:")  # a fresh, empty keyring
    assert out1["add-user"].split()[0].isdigit()  # without seccomp it could write its uid's keyring...
    assert out1["uid"] == out2["uid"]  # ... and the next run has the same uid ...
    assert out2["user-keyring-list"].startswith("0") and out2["session-list"].startswith("0")  # ... but finds it empty
    assert box["parent_session_keys"] == 1  # only the planted key: nothing written back


def test_without_the_keyring_layer_the_planted_key_leaks():
    """Control: the attack above works when the layer is off, so that test detects the hole."""
    cfg = CFG.model_copy(update={"skip_layers": ["seccomp", "session_keyring"]})
    box = _with_planted_key(lambda key_id, secret: (run_program(_KEY_PROGRAM.format(key_id=key_id), cfg), secret))
    result, secret = box["value"]
    assert secret.decode() in result.stdout, result


def test_seccomp_refuses_keyrings_namespaces_mounts_and_kernel_surface():
    code = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n" + "".join(
        f"print({name!r}, libc.syscall({nr}, 0x10000000 if {name!r} == 'unshare' else 0, 0, 0, 0, 0), ctypes.get_errno())\n"
        for name, nr in _NR.items())
    code += "import subprocess\nr = subprocess.run(['unshare', '--user', '--map-root-user', 'id', '-u'], capture_output=True, text=True)\nprint('unshare-cli', r.returncode, r.stdout.strip())\n"
    result = run_program(code, CFG)
    assert result.status == "passed", result
    got = {line.split()[0].strip("'"): line.split()[1:] for line in result.stdout.splitlines()}
    for name in _NR:
        assert got[name] == ["-1", "1"], (name, got[name])  # -1 with errno EPERM, the process alive
    assert got["unshare-cli"][0] != "0"
    clean_run()


def test_without_seccomp_a_user_namespace_can_be_made():
    """Control for the test above: the filter is what stops it."""
    code = "import subprocess\nr = subprocess.run(['unshare', '--user', '--map-root-user', 'id', '-u'], capture_output=True, text=True)\nprint(r.returncode, r.stdout.strip())"
    result = run_program(code, CFG.model_copy(update={"skip_layers": ["seccomp"]}))
    assert result.stdout.split() == ["0", "0"], result


@pytest.mark.parametrize("cfg", [CFG, CFG.model_copy(update={"skip_layers": ["exit_status"]})], ids=["reporter", "setpriv"])
def test_namespaces_capabilities_and_uid_as_the_readme_says(cfg):
    """The uid switch and rlimits are done by the reporter's child, or by setpriv + prlimit where
    there is no reporter: both give the same process."""
    code = """
import os
print("ns", *[os.readlink(f"/proc/self/ns/{n}") for n in ("ipc", "net", "pid", "uts", "mnt")])
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print("caps", *[status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NoNewPrivs", "Seccomp")])
print("uid", os.getuid(), os.getgid(), *os.getresuid(), *os.getresgid(), len(os.getgroups()))
import resource
print("rlimits", *[f"{s}:{h}" for s, h in (resource.getrlimit(getattr(resource, "RLIMIT_" + n)) for n in ("AS", "CPU", "FSIZE", "NOFILE", "NPROC", "CORE"))])
"""
    result = run_program(code, cfg)
    assert result.status == "passed", result
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    ours = [os.readlink(f"/proc/self/ns/{n}") for n in ("ipc", "net", "pid", "uts", "mnt")]
    assert all(a != b for a, b in zip(lines["ns"], ours)), (lines["ns"], ours)
    assert lines["caps"] == ["0000000000000000"] * 5 + ["1", "2"]  # no capability anywhere, no_new_privs, seccomp filter
    uid = int(lines["uid"][0])
    assert CFG.uid - CFG.uid_slots < uid <= CFG.uid and lines["uid"] == [str(uid)] * 8 + ["0"]  # real, effective, saved; no groups
    mib = 1 << 20
    assert lines["rlimits"] == [f"{CFG.memory_mb * mib}:{CFG.memory_mb * mib}", f"{CFG.cpu_s}:{CFG.cpu_s + 1}",
                                f"{CFG.file_size_mb * mib}:{CFG.file_size_mb * mib}", f"{CFG.max_open_files}:{CFG.max_open_files}",
                                f"{CFG.max_processes}:{CFG.max_processes}", "0:0"]
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)  # an account-free uid: RLIMIT_NPROC counts only sandbox processes


# --------------------------------------------------------------------------------------- cgroup
def test_memfd_memory_bomb_is_stopped_by_the_run_cgroup():
    # memfd pages are not address space: RLIMIT_AS (512 MiB here) never sees them; several memfds
    # of 15 MiB each stay under RLIMIT_FSIZE (16 MiB) and RLIMIT_NOFILE (64) and reach 750 MiB
    code = ("import os\nfds = []\nfor i in range(50):\n    fds.append(os.memfd_create('bomb'))\n"
            "    os.write(fds[-1], b'x' * (15 << 20))\n    print(i, flush=True)\nprint('survived')")
    result = run_program(code, CFG)
    assert result.status == "limit" and "cgroup" in result.detail, result
    assert "survived" not in result.stdout
    clean_run()


def test_forked_children_share_one_memory_limit():
    # each child stays under RLIMIT_AS (512 MiB) with 120 MiB; four of them exceed the run's 192 MiB
    code = """
import os, sys, time
pids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(120 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(1)
        os._exit(0)
    pids.append(pid)
codes = [os.waitpid(p, 0)[1] for p in pids]
print(codes)
sys.exit(0 if all(c == 0 for c in codes) else 1)
"""
    result = run_program(code, CFG)
    assert result.status == "limit" and "OOM" in result.detail, result
    clean_run()


def test_tmpfs_pages_count_in_the_run_cgroup():
    # a work dir larger than the memory limit: filling it hits the memory limit, not the size cap
    cfg = CFG.model_copy(update={"workdir_mb": 512, "file_size_mb": 512})
    code = "with open('fill', 'wb') as f:\n    for i in range(400):\n        f.write(b'x' * (1 << 20))\nprint('survived')"
    result = run_program(code, cfg)
    assert result.status == "limit" and "memory limit" in result.detail, result
    assert "survived" not in result.stdout
    clean_run(cfg)


def test_cpu_burner_is_held_to_the_cpu_quota():
    """Two busy processes for 1.5 s of wall time under a 0.2-core quota: the CPU time they get
    (measured by the kernel, reported by the program) stays near 0.3 s; uncapped it would be ~3 s
    on an idle 2-core host. An upper bound only, so load from elsewhere cannot fail it."""
    cfg = CFG.model_copy(update={"cpu_cores": 0.2})
    code = """
import os, time
start = time.monotonic()
def burn():
    while time.monotonic() - start < 1.5:
        pass
pids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        burn()
        os._exit(0)
    pids.append(pid)
for p in pids:
    os.waitpid(p, 0)
t = os.times()
print(t.children_user + t.children_system, time.monotonic() - start)
"""
    result = run_program(code, cfg)
    assert result.status == "passed", result
    cpu, wall = map(float, result.stdout.split())
    assert cpu <= 0.2 * wall + 0.35, (cpu, wall)
    clean_run()


# ---------------------------------------------------------------------------------- exit status
@pytest.mark.parametrize("code, status, exit_code, sig", [
    ("import os; os._exit(137)", "failed", 137, None),     # an exit code, not SIGKILL
    ("import sys; sys.exit(152)", "failed", 152, None),    # not SIGXCPU, so not a limit
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "error", None, 9),
])
def test_exit_codes_above_128_are_not_signals(code, status, exit_code, sig):
    result = run_program(code, CFG)
    assert (result.status, result.exit_code, result.signal) == (status, exit_code, sig), result


def test_without_the_reporter_exit_137_is_taken_for_a_signal():
    """Control: bwrap alone (its exit status and --json-status-fd) reports both as 137."""
    result = run_program("import os; os._exit(137)", CFG.model_copy(update={"skip_layers": ["exit_status"]}))
    assert (result.exit_code, result.signal) == (None, 9), result
