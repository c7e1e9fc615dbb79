"""Isolation layers of the sandbox (DESIGN.md section 6): which tools and kernel features this
machine has, which layers they give, and the command line that applies them to one program.

Every execution is a fresh child process started through, outermost first (as root, the normal case):

    (the run's own cgroup: memory incl. memfd and tmpfs, pids, CPU quota; joined before the spawn)
    bwrap   new network, pid, ipc, uts and cgroup namespaces; a new root holding only read-only
            /usr (+ the /bin, /lib symlinks), a few /etc files and the interpreter's install prefix;
            the run's tmpfs (size- and inode-capped) at /sandbox as the only writable place (/tmp
            points there); no /root, no /home, no host /tmp; empty environment; its own session;
            the seccomp filter of seccomp.py loaded right before the next exec
    perl    the exit-status reporter and the namespace's init (root, so the program cannot signal
            it; when it exits every process left in the namespace dies): waits for the program
            and writes its raw wait status to a pipe, so a signal is told apart from an exit code
            above 128 (bwrap reports both as 128+N, its --json-status-fd too)
    setpriv drop to a dedicated unprivileged uid/gid (not in /etc/passwd) with no supplementary
            groups, no capabilities and no_new_privs (so setuid binaries cannot raise privileges)
    prlimit RLIMIT_AS, CPU, FSIZE, NOFILE, NPROC and CORE=0 on the program only.
            (With the reporter as root, these two steps are done by the reporter's child itself,
            with the same calls, before it execs python: two execs fewer per run.)
    python  the plain interpreter (never the project venv) with -I (isolated: no env vars, no user
            site), -B (no bytecode writes) and, unless sandbox.site_packages, -S (standard library
            only: no third-party packages and no .pth hooks of the host's site-packages).

Before the spawn, the launching thread joins a fresh empty session keyring (inherited by the run;
the parent's keyring is never possessed by the program) and empties the slot uid's user keyrings.

Why not `bwrap --unshare-all` when running as root: it then also creates a user namespace in which
the sandbox uid maps back to root outside, and the kernel never applies RLIMIT_NPROC to root, so a
fork bomb would not be stopped. As root we unshare every namespace except the user one and switch
uid with setpriv inside; as an ordinary user (no setpriv needed) `--unshare-all` is right.

Without bubblewrap there is no private filesystem view, and the sandbox refuses to run unless
`sandbox.allow_no_filesystem_isolation` says so. Then `unshare` gives the network, pid and ipc
namespaces, or nothing does (backend none), and a small Python guard in the sandbox uid applies
Landlock (writes only beneath the run's work dir: not /tmp, /dev/shm or Ray's session folders)
and the same seccomp filter before it execs the program. Each missing layer is logged once per
process; `sandbox.strict: true` refuses to run instead.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import pwd
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from domino_ray.config import SandboxConfig
from domino_ray.placement import explain_isolation_failure
from domino_ray.sandbox import kernel
from domino_ray.sandbox.cgroups import CgroupHost, CgroupUnavailable, detect_cgroups
from domino_ray.sandbox.seccomp import SeccompUnavailable, filter_bytes

__all__ = [
    "LAYERS",
    "OPTIONAL_LAYERS",
    "SandboxError",
    "IsolationPlan",
    "LaunchFds",
    "plan_isolation",
    "ensure_isolation",
    "isolation_report",
    "build_command",
    "SANDBOX_DIR",
]

log = logging.getLogger(__name__)

# Every layer DESIGN section 6 asks for. The last four are applied by the runner itself and cannot
# be missing; the others depend on the tools and kernel features found here.
LAYERS = (
    "network",            # no network: a private network namespace with only a down loopback
    "filesystem",         # private root: read-only system dirs, one writable tmpfs, no /root or /home
    "pid_namespace",      # cannot see or signal host processes; every leftover child dies with the run
    "ipc_namespace",      # no SysV IPC / POSIX message queues shared with the host
    "non_root_uid",       # a real unprivileged uid with no capabilities, so host files stay closed
    "dedicated_uid",      # that uid belongs to no account, so RLIMIT_NPROC counts only this run's processes
    "rlimits",            # address space, CPU, file size, open files, processes (per process)
    "cgroup",             # per-run cgroup: memory (memfd, tmpfs, all forks together), pids, CPU quota
    "seccomp",            # keyrings, namespaces, mount, bpf, perf, io_uring, ptrace, userfaultfd refused
    "session_keyring",    # a fresh empty session keyring per run; the slot uid's keyrings emptied
    "tmpfs_inode_cap",    # the writable tmpfs caps the number of files, not only their bytes
    "write_confinement",  # writable only the run's work dir (bwrap: read-only root; fallback: Landlock)
    "exit_status",        # a signal is told apart from an exit code above 128
    "process_group",      # own session; the whole group is killed on timeout and after exit
    "empty_env",          # no credentials or settings leak in through the environment
    "temp_workdir",       # fresh per-run directory, removed afterwards
    "output_cap",         # stdout/stderr capped; a program printing more is killed
)
# layers `sandbox.skip_layers` may leave off (the rest come with the backend or cannot be missing)
OPTIONAL_LAYERS = ("cgroup", "seccomp", "session_keyring", "tmpfs_inode_cap", "exit_status", "write_confinement")

SANDBOX_DIR = "/sandbox"  # the program's working directory inside bubblewrap
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"  # where to look for the tools themselves
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives")
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_PROBE_CODE = "import os, sys; print(os.getuid(), os.getgid(), sys.flags.isolated)"

# The exit-status reporter (perl: ~5 ms to start, on every Debian/Ubuntu as perl-base). Runs as
# root inside the namespaces; the program, a child of it in the sandbox uid, cannot signal it, and
# never holds the status pipe (closed before the exec).
_REPORTER = (
    'my $n = shift @ARGV; open(my $s, ">&=", $n) or exit 126; my $p = fork; exit 126 unless defined $p; '
    'if (!$p) { close $s; exec { $ARGV[0] } @ARGV; exit 127 } '
    'waitpid($p, 0) == $p or exit 126; my $w = $?; syswrite($s, "$w\\n"); '
    'exit(($w & 127) ? 128 + ($w & 127) : $w >> 8);'
)

# The fallback guard (backends unshare and none): runs in the sandbox uid with the sandbox's own
# interpreter (-I -S: no imports from anywhere but the standard library), applies Landlock and the
# seccomp filter to itself, then execs the program; both are inherited and cannot be undone.
# argv: <seccomp fd or -1> <writable dir or ""> <landlock abi> <program argv...>
_GUARD = r'''
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
sfd, wdir, abi, argv = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
def die(what):
    e = ctypes.get_errno(); os.write(2, ("sandbox guard: %s: %s\n" % (what, os.strerror(e))).encode()); os._exit(125)
if libc.prctl(38, 1, 0, 0, 0) != 0: die("no_new_privs")
if wdir:
    handled = 2 | 16 | 32 | 64 | 128 | 256 | 512 | 1024 | 2048 | 4096 | (8192 if abi >= 2 else 0) | (16384 if abi >= 3 else 0)
    attr = struct.pack("QQQ", handled, 0, 3) if abi >= 6 else struct.pack("Q", handled)
    rs = libc.syscall(444, attr, len(attr), 0)
    if rs < 0: die("landlock_create_ruleset")
    for path, access in ((wdir, handled), ("/dev/null", 2 | (16384 if abi >= 3 else 0))):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        if libc.syscall(445, rs, 1, struct.pack("=Qi", access, fd), 0) != 0: die("landlock_add_rule " + path)
        os.close(fd)
    if libc.syscall(446, rs, 0) != 0: die("landlock_restrict_self")
    os.close(rs)
if sfd >= 0:
    data = b""
    while True:
        chunk = os.read(sfd, 65536)
        if not chunk: break
        data += chunk
    os.close(sfd)
    buf = ctypes.create_string_buffer(data, len(data))
    class Prog(ctypes.Structure): _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = Prog(len(data) // 8, ctypes.addressof(buf))
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0: die("seccomp")
os.execv(argv[0], argv)
'''

# Under bubblewrap as root the reporter also does setpriv's and prlimit's work in the child it forks
# (rlimits, no_new_privs, an empty bounding set, no groups, the uid/gid, no capabilities left), so
# the program is exec'd straight from it: two execs fewer per run, which is most of the layers' cost
# on a loaded host. Raw syscalls (perl's `syscall`): numbers per architecture below.
_REPORTER_SWITCH = (  # @NAME@ fields are filled in by _switching_reporter_argv
    'my $n = shift @ARGV; open(my $s, ">&=", $n) or exit 126; my $p = fork; exit 126 unless defined $p; '
    'if (!$p) { close $s; '
    'sub fail { syswrite(STDERR, "sandbox reporter: $_[0]: $!\\n"); exit 125 } '
    'for my $l (@LIMITS@) { my $r = pack("QQ", $l->[1], $l->[2]); syscall(@setrlimit@, $l->[0], $r) == 0 or fail("setrlimit $l->[0]") } '
    'syscall(@prctl@, 38, 1, 0, 0, 0) == 0 or fail("no_new_privs"); '
    'for my $c (0..@CAP_LAST@) { syscall(@prctl@, 24, $c, 0, 0, 0) == 0 or fail("capbset_drop $c") } '
    'syscall(@setgroups@, 0, 0) == 0 or fail("setgroups"); '
    'syscall(@setresgid@, @UID@, @UID@, @UID@) == 0 or fail("setresgid"); '
    'syscall(@setresuid@, @UID@, @UID@, @UID@) == 0 or fail("setresuid"); '
    'my $h = pack("LL", 0x20080522, 0); my $d = pack("L6", 0, 0, 0, 0, 0, 0); '
    'syscall(@capset@, $h, $d) == 0 or fail("capset"); '
    'exec { $ARGV[0] } @ARGV; exit 127 } '
    'waitpid($p, 0) == $p or exit 126; my $w = $?; syswrite($s, "$w\\n"); '
    'exit(($w & 127) ? 128 + ($w & 127) : $w >> 8);'
)
_SWITCH_SYSCALLS = {
    "x86_64": {"setrlimit": 160, "prctl": 157, "setgroups": 116, "setresgid": 119, "setresuid": 117, "capset": 126},
    "aarch64": {"setrlimit": 164, "prctl": 167, "setgroups": 159, "setresgid": 149, "setresuid": 147, "capset": 91},
}
# RLIMIT_* numbers (the same on x86_64 and aarch64)
_RLIMIT = {"cpu": 0, "fsize": 1, "nproc": 6, "nofile": 7, "as": 9, "core": 4}

_warned: set[str] = set()  # layers already reported missing in this process


class SandboxError(RuntimeError):
    """The sandbox cannot run programs as configured (a missing layer under strict, no filesystem
    isolation without allow_no_filesystem_isolation, an unusable interpreter, no working backend);
    the message names the layer or key and the fix."""


@dataclass(frozen=True)
class IsolationPlan:
    backend: str  # bwrap | unshare | none
    python: str  # real path of the interpreter programs run under
    python_prefix: str  # its install prefix (mounted read-only under bwrap)
    as_root: bool  # this process is root: uids are switched with setpriv
    tools: dict[str, str]  # tool name -> path
    layers: dict[str, bool]
    notes: dict[str, str] = field(default_factory=dict)  # layer or backend -> why it is missing
    cgroups: Optional[CgroupHost] = None
    landlock_abi: int = 0

    @property
    def missing(self) -> list[str]:
        return [name for name in LAYERS if not self.layers.get(name)]

    @property
    def switches_uid(self) -> bool:
        """Whether each run picks its uid (root + setpriv); an ordinary user keeps its own."""
        return self.as_root and "setpriv" in self.tools

    def has(self, layer: str) -> bool:
        return bool(self.layers.get(layer))

    @property
    def guarded(self) -> bool:
        """Fallback backends apply seccomp and Landlock through the Python guard."""
        return self.backend != "bwrap" and (self.has("seccomp") or self.has("write_confinement"))


@dataclass(frozen=True)
class LaunchFds:
    """Descriptors handed to one run's launcher (numbers as in this process; pass_fds keeps them)."""
    seccomp: Optional[int] = None  # memfd with the BPF program (bwrap --seccomp, or the guard)
    json_status: Optional[int] = None  # write end: bwrap --json-status-fd
    exit_status: Optional[int] = None  # write end: the reporter's raw wait status


# ------------------------------------------------------------------------------------ discovery
def _which(name: str) -> Optional[str]:
    # Ray workers may run with a trimmed PATH; the tools live in the standard system dirs.
    return shutil.which(name) or shutil.which(name, path=_SYSTEM_PATH)


def resolve_python(spec: str) -> tuple[str, str]:
    """(interpreter, install prefix) for `sandbox.python`. `auto` is the interpreter this Python
    was built from (sys.base_prefix), so a venv's packages never leak into the sandbox."""
    if spec == "auto":
        prefix = Path(sys.base_prefix).resolve()
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = [prefix / "bin" / version, prefix / "bin" / "python3"]
        for cand in candidates:
            if cand.exists():
                return str(cand.resolve()), str(prefix)
        found = _which("python3")
        if not found:
            raise SandboxError("sandbox.python: auto found no interpreter under sys.base_prefix or on PATH; set sandbox.python to a python3 path")
        real = Path(found).resolve()
        return str(real), str(real.parent.parent)
    real = Path(spec).expanduser()
    if not real.exists() or not os.access(real, os.X_OK):
        raise SandboxError(f"sandbox.python: {spec!r} is not an executable file; set it to a python3 interpreter such as /usr/bin/python3")
    real = real.resolve()
    return str(real), str(real.parent.parent)


def _under_usr(path: str) -> bool:
    return path == "/usr" or path.startswith("/usr/")


# -------------------------------------------------------------------------------- command lines
def _limits_argv(plan: IsolationPlan, cfg: SandboxConfig) -> list[str]:
    if "prlimit" not in plan.tools:
        return []
    mib = 1024 * 1024
    return [
        plan.tools["prlimit"],
        f"--as={cfg.memory_mb * mib}",
        # soft limit sends SIGXCPU (reported as a limit); the hard limit one second later is a backstop
        f"--cpu={cfg.cpu_s}:{cfg.cpu_s + 1}",
        f"--fsize={cfg.file_size_mb * mib}",
        f"--nofile={cfg.max_open_files}",
        f"--nproc={cfg.max_processes}",
        "--core=0",
        "--",
    ]


def _setpriv_argv(plan: IsolationPlan, uid: Optional[int]) -> list[str]:
    if not plan.switches_uid or uid is None:
        return []
    return [
        plan.tools["setpriv"], f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
    ]


def _reporter_argv(plan: IsolationPlan, fds: LaunchFds) -> list[str]:
    if fds.exit_status is None or "perl" not in plan.tools:
        return []
    return [plan.tools["perl"], "-e", _REPORTER, "--", str(fds.exit_status)]


@functools.lru_cache(maxsize=1)
def _cap_last() -> Optional[int]:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return None


def _switching_reporter_argv(plan: IsolationPlan, cfg: SandboxConfig, fds: LaunchFds, uid: Optional[int]) -> list[str]:
    """The reporter that also drops to `uid` with the rlimits (bwrap as root); [] where it cannot."""
    numbers = _SWITCH_SYSCALLS.get(platform.machine())
    if (fds.exit_status is None or "perl" not in plan.tools or uid is None or not plan.switches_uid
            or numbers is None or _cap_last() is None or "prlimit" not in plan.tools):
        return []
    mib = 1024 * 1024
    limits = [(_RLIMIT["as"], cfg.memory_mb * mib, cfg.memory_mb * mib), (_RLIMIT["cpu"], cfg.cpu_s, cfg.cpu_s + 1),
              (_RLIMIT["fsize"], cfg.file_size_mb * mib, cfg.file_size_mb * mib),
              (_RLIMIT["nofile"], cfg.max_open_files, cfg.max_open_files),
              (_RLIMIT["nproc"], cfg.max_processes, cfg.max_processes), (_RLIMIT["core"], 0, 0)]
    fields = {"LIMITS": ", ".join(f"[{r}, {soft}, {hard}]" for r, soft, hard in limits),
              "CAP_LAST": str(_cap_last()), "UID": str(int(uid)), **{k: str(v) for k, v in numbers.items()}}
    code = _REPORTER_SWITCH
    for name, value in fields.items():
        code = code.replace(f"@{name}@", value)
    return [plan.tools["perl"], "-e", code, "--", str(fds.exit_status)]


def _guard_argv(plan: IsolationPlan, fds: LaunchFds, work_dir: str) -> list[str]:
    if not plan.guarded:
        return []
    sfd = fds.seccomp if (plan.has("seccomp") and fds.seccomp is not None) else -1
    wdir = work_dir if plan.has("write_confinement") else ""
    return [plan.python, "-I", "-S", "-B", "-c", _GUARD, str(sfd), wdir, str(plan.landlock_abi)]


def _bwrap_mounts(plan: IsolationPlan) -> list[str]:
    argv = ["--ro-bind", "/usr", "/usr"]
    for name in _ROOT_LINKS:
        host = f"/{name}"
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            argv += ["--ro-bind", host, host]
    for name in _ETC_FILES:
        if os.path.exists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    prefix = plan.python_prefix
    if not _under_usr(prefix):
        # Only the prefix itself is mounted. Its parents are created empty and traversable (bwrap
        # makes them 0700 by default), so e.g. /root/.pyenv/versions/3.11 is visible while every
        # other file under /root stays absent.
        parts = Path(prefix).parts[1:-1]
        for i in range(len(parts)):
            argv += ["--perms", "0755", "--dir", "/" + "/".join(parts[: i + 1])]
        argv += ["--ro-bind", prefix, prefix]
    return argv


def _bwrap_argv(plan: IsolationPlan, cfg: SandboxConfig, run_dir: str, uid: Optional[int], fds: LaunchFds) -> list[str]:
    if plan.as_root and plan.switches_uid:
        namespaces = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if fds.exit_status is not None and "perl" in plan.tools:
            namespaces.append("--as-pid-1")  # the reporter is the namespace's init: one fork less
    elif plan.as_root:  # root without setpriv: a user namespace at least drops real root
        namespaces = ["--unshare-all", "--uid", str(cfg.uid), "--gid", str(cfg.uid)]
    else:
        namespaces = ["--unshare-all"]
    extra: list[str] = []
    if plan.has("seccomp") and fds.seccomp is not None:
        extra += ["--seccomp", str(fds.seccomp)]
    if fds.json_status is not None:
        extra += ["--json-status-fd", str(fds.json_status)]
    if plan.has("tmpfs_inode_cap"):
        # the run's own tmpfs (mounted by the launcher with size= and nr_inodes=, owned by the uid)
        workdir = ["--bind", os.path.join(run_dir, "work"), SANDBOX_DIR]
    else:
        workdir = ["--size", str(cfg.workdir_mb * 1024 * 1024), "--perms", "1777", "--tmpfs", SANDBOX_DIR]
    return [
        plan.tools["bwrap"], *namespaces, "--die-with-parent", "--new-session", *extra,
        *_bwrap_mounts(plan),
        "--proc", "/proc", "--dev", "/dev",
        *workdir,
        "--symlink", SANDBOX_DIR, "/tmp",
        "--ro-bind", os.path.join(run_dir, "prog"), f"{SANDBOX_DIR}/.run",  # main.py (read-only); stdin comes as a fd
        "--chdir", SANDBOX_DIR,
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", SANDBOX_DIR,
        "--setenv", "TMPDIR", SANDBOX_DIR,
        "--setenv", "LANG", "C.UTF-8",
        "--",
    ]


def _unshare_argv(plan: IsolationPlan) -> list[str]:
    # --kill-child: the namespace's init gets SIGKILL when unshare dies, taking every process in
    # the pid namespace with it (leftover children included).
    base = [plan.tools["unshare"], "--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
    if not plan.as_root:
        base.insert(1, "--user")
        base.insert(2, "--map-current-user")
    return base + ["--"]


def build_command(plan: IsolationPlan, cfg: SandboxConfig, run_dir: str, uid: Optional[int],
                  fds: LaunchFds = LaunchFds(), script: str = "main.py") -> list[str]:
    """argv that runs `run_dir/prog/script` with every layer of `plan` in the work dir
    `run_dir/work` (under bwrap: /sandbox, with the program at /sandbox/.run/script). The cgroup
    join is the launcher's prefix (runner), not part of this argv."""
    interpreter = [plan.python, "-I", "-B"] + ([] if cfg.site_packages else ["-S"])
    reporter = _reporter_argv(plan, fds)
    if plan.backend == "bwrap":
        program = interpreter + [f"{SANDBOX_DIR}/.run/{script}"]
        if switching := _switching_reporter_argv(plan, cfg, fds, uid):
            return _bwrap_argv(plan, cfg, run_dir, uid, fds) + switching + program
        return _bwrap_argv(plan, cfg, run_dir, uid, fds) + reporter + _setpriv_argv(plan, uid) + _limits_argv(plan, cfg) + program
    work_dir = os.path.join(run_dir, "work")
    program = (_setpriv_argv(plan, uid) + _guard_argv(plan, fds, work_dir) + _limits_argv(plan, cfg)
               + interpreter + [os.path.join(run_dir, "prog", script)])
    if plan.backend == "unshare":
        # The first process of a pid namespace is its init, which the kernel shields from signals it
        # has no handler for (SIGXCPU included): the reporter (or a shell) is init, the program pid 2.
        return _unshare_argv(plan) + (reporter or ["/bin/sh", "-c", '"$@"; exit $?', "sh"]) + program
    return program


def host_env() -> dict[str, str]:
    """Environment of the launcher processes: nothing from ours (credentials stay out even where
    bwrap's --clearenv is not in the chain)."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": SANDBOX_DIR}


# ------------------------------------------------------------------------------------- probing
def _in_thread(fn) -> Optional[str]:
    """Run fn in a throwaway thread (kernel calls that change only that thread's credentials);
    None when it worked, else why not."""
    box: list[str] = []

    def target():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported as the layer's note
            box.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=target, name="domino-sandbox-probe")
    t.start()
    t.join()
    return box[0] if box else None


def _probe_mount() -> Optional[str]:
    target = tempfile.mkdtemp(prefix="domino-sbx-mount-probe-")
    try:
        kernel.mount_tmpfs(target, 1024 * 1024, 64, os.getuid(), os.getgid())
        kernel.unmount(target)
        return None
    except OSError as e:
        return str(e)
    finally:
        os.rmdir(target)


def _landlock_abi() -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, int(libc.syscall(444, None, 0, 1)))  # LANDLOCK_CREATE_RULESET_VERSION


def _account_in_range(cfg: SandboxConfig) -> Optional[str]:
    for uid in range(cfg.uid - cfg.uid_slots + 1, cfg.uid + 1):
        try:
            return f"uid {uid} is account {pwd.getpwuid(uid).pw_name!r}"
        except KeyError:
            continue
    return None


def _layers_for(backend: str, as_root: bool, tools: dict[str, str], cfg: SandboxConfig) -> tuple[dict[str, bool], dict[str, str], Optional[CgroupHost], int]:
    layers = {name: True for name in LAYERS}
    notes: dict[str, str] = {}

    def lose(name: str, why: str) -> None:
        layers[name] = False
        notes[name] = why

    if backend != "bwrap":
        lose("filesystem", "bubblewrap unavailable: the program sees the host filesystem (only file permissions and Landlock protect it)")
    if backend == "none":
        lose("network", "neither bubblewrap nor unshare could create a network namespace")
        lose("pid_namespace", "no pid namespace: detached children that leave the process group can outlive the run")
        lose("ipc_namespace", "no ipc namespace: SysV IPC and POSIX message queues are shared with the host")
    switches = as_root and "setpriv" in tools
    if as_root and not switches:
        lose("non_root_uid", "running as root without setpriv (util-linux): RLIMIT_NPROC does not apply to root")
    if not switches:
        lose("dedicated_uid", "programs run as this process's own uid (not root: no uid switch), which is an account")
    elif (taken := _account_in_range(cfg)) is not None:
        lose("dedicated_uid", f"{taken} (sandbox.uid {cfg.uid}, uid_slots {cfg.uid_slots}): choose a range no account uses")
    if "prlimit" not in tools:
        lose("rlimits", "prlimit (util-linux) not found: no memory, CPU, file-size, open-file or process limits")

    cgroups = None
    try:
        cgroups = detect_cgroups()
    except (CgroupUnavailable, OSError) as e:
        lose("cgroup", f"no per-run cgroup: {e}")
    try:
        filter_bytes()
    except (SeccompUnavailable, OSError) as e:
        lose("seccomp", str(e))
    if (why := _in_thread(kernel.join_fresh_session_keyring)) is not None:
        lose("session_keyring", f"cannot join a fresh session keyring: {why}")
    if not as_root:
        lose("tmpfs_inode_cap", "mounting the capped tmpfs needs root (bubblewrap's own tmpfs has a size cap only)")
    elif (why := _probe_mount()) is not None:
        lose("tmpfs_inode_cap", f"cannot mount a tmpfs with nr_inodes: {why}")
    if backend != "none":
        if "perl" not in tools:
            lose("exit_status", "perl not found: an exit code above 128 cannot be told apart from a signal (install perl-base)")
        elif not as_root:
            lose("exit_status", "not root: the status reporter would run as the program's own uid, which could kill it")
    landlock = 0
    if backend != "bwrap":
        landlock = _landlock_abi()
        if not landlock:
            lose("write_confinement", "the kernel has no Landlock: the program can write every world-writable host dir (/tmp, /dev/shm, Ray's session folders)")
        elif not switches:
            lose("write_confinement", "Landlock needs the uid switch and no_new_privs of setpriv here")
    for name in cfg.skip_layers:
        lose(name, "left off by sandbox.skip_layers")
    return layers, notes, (cgroups if layers["cgroup"] else None), landlock


def _probe(plan: IsolationPlan, cfg: SandboxConfig) -> Optional[str]:
    """Run a tiny program through `plan` with every layer it claims; None when it works, else why not."""
    from domino_ray.sandbox.runner import _uid_slot, launch  # the runner imports this module

    try:
        with _uid_slot(cfg, plan) as uid:  # a slot like any run: no other run shares its uid meanwhile
            out = launch(plan, cfg, _PROBE_CODE + "\n", None, uid, 60.0)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    code = os.waitstatus_to_exitcode(out.wait_status) if out.wait_status is not None else out.returncode
    if code != 0:
        err = out.stderr.decode(errors="replace").strip().splitlines()
        return err[-1] if err else f"exit status {out.returncode}"
    got = out.stdout.decode().split()
    low = cfg.uid - cfg.uid_slots + 1
    if plan.switches_uid:
        ok = bool(got) and got[0].isdigit() and low <= int(got[0]) <= cfg.uid
        return None if ok else f"program ran as uid {got[:1]} instead of one in {low}..{cfg.uid}"
    want_uid = str(cfg.uid if plan.as_root and plan.backend == "bwrap" else os.getuid())
    if not got or got[0] != want_uid:
        return f"program ran as uid {got[:1]} instead of {want_uid}"
    return None


def find_tools() -> dict[str, str]:
    return {name: path for name in ("bwrap", "unshare", "setpriv", "prlimit", "perl") if (path := _which(name))}


@functools.lru_cache(maxsize=16)
def _plan_cached(key: str) -> IsolationPlan:
    cfg = SandboxConfig.model_validate_json(key)
    interpreter, prefix = resolve_python(cfg.python)
    tools = find_tools()
    as_root = os.geteuid() == 0
    wanted = ["bwrap", "unshare", "none"] if cfg.backend == "auto" else [cfg.backend]
    failures: dict[str, str] = {}
    for name in wanted:
        if name != "none" and name not in tools:
            failures[name] = f"{name} not found on PATH"
            continue
        layers, notes, cgroups, landlock = _layers_for(name, as_root, tools, cfg)
        plan = IsolationPlan(name, interpreter, prefix, as_root, tools, layers, notes, cgroups, landlock)
        why = _probe(plan, cfg)
        if why is None:
            notes.update({f"backend:{k}": v for k, v in failures.items()})
            return plan
        if name == "bwrap" and (missing := explain_isolation_failure(why)):
            why = f"{why} ({missing})"  # e.g. a pod granted SYS_ADMIN but not NET_ADMIN
        failures[name] = why
    detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
    hint = ""
    if not _under_usr(prefix) and as_root:
        hint = f" The interpreter lives under {prefix}; without bubblewrap the sandbox uid must be able to read it: set sandbox.python to e.g. /usr/bin/python3."
    raise SandboxError(f"no sandbox backend works here (sandbox.backend={cfg.backend!r}, interpreter {interpreter}): {detail}.{hint}")


def _plan_key(cfg: SandboxConfig) -> str:
    # only what the probe depends on; the per-run limits are taken from the caller's config
    keep = {"backend", "python", "uid", "uid_slots", "workdir_mb", "workdir_inodes", "skip_layers", "site_packages"}
    return SandboxConfig(**{k: getattr(cfg, k) for k in keep}).model_dump_json()


def plan_isolation(cfg: SandboxConfig) -> IsolationPlan:
    """The isolation this machine gives for `cfg` (probed once per process and setting)."""
    return _plan_cached(_plan_key(cfg))


def ensure_isolation(cfg: SandboxConfig) -> IsolationPlan:
    """The plan, after refusing a backend without filesystem isolation (unless
    allow_no_filesystem_isolation), enforcing `strict` (refuse when a layer is missing) and logging
    each missing layer once per process."""
    plan = plan_isolation(cfg)
    if plan.backend != "bwrap" and not cfg.allow_no_filesystem_isolation:
        why = plan.notes.get("backend:bwrap") or (f"sandbox.backend is {cfg.backend!r}" if cfg.backend != "auto" else "unavailable")
        raise SandboxError(
            f"sandbox: no filesystem isolation (bubblewrap: {why}); the fallback {plan.backend!r} would show the program "
            "the host filesystem. Fix bubblewrap (it needs to create namespaces here), or set "
            "sandbox.allow_no_filesystem_isolation: true to run with writes confined by Landlock only.")
    missing = plan.missing
    if missing and cfg.strict:
        reasons = "; ".join(f"{name}: {plan.notes.get(name, 'unavailable')}" for name in missing)
        raise SandboxError(
            f"sandbox.strict is true and {len(missing)} isolation layer(s) are unavailable here ({reasons}). "
            "Install bubblewrap, util-linux (setpriv, prlimit), perl-base and libseccomp2, run as root with writable cgroups, "
            "or set sandbox.strict: false to run with reduced isolation.")
    for name in missing:
        if name not in _warned:
            _warned.add(name)
            log.warning("sandbox: isolation layer %r unavailable (%s); programs run without it", name, plan.notes.get(name, "unavailable"))
    return plan


def isolation_report(cfg: SandboxConfig) -> dict:
    """Which layers are active here, with the backend, interpreter and tools; never raises (an
    unusable sandbox is reported with `usable: false` and the reason)."""
    try:
        plan = plan_isolation(cfg)
    except SandboxError as e:
        return {"usable": False, "error": str(e), "layers": {name: False for name in LAYERS}, "missing": list(LAYERS)}
    refused = None
    if plan.backend != "bwrap" and not cfg.allow_no_filesystem_isolation:
        refused = "no filesystem isolation and sandbox.allow_no_filesystem_isolation is false"
    elif plan.missing and cfg.strict:
        refused = f"sandbox.strict and missing {plan.missing}"
    return {
        "usable": refused is None,
        **({"error": refused} if refused else {}),
        "backend": plan.backend,
        "python": plan.python,
        "python_prefix": plan.python_prefix,
        "as_root": plan.as_root,
        "uid": (f"{cfg.uid - cfg.uid_slots + 1}..{cfg.uid}" if plan.switches_uid else os.getuid()),
        "cgroup": (f"v{plan.cgroups.version} under {sorted(set(plan.cgroups.parents.values()))}" if plan.cgroups else None),
        "landlock_abi": plan.landlock_abi or None,
        "layers": dict(plan.layers),
        "missing": plan.missing,
        "notes": dict(plan.notes),
        "tools": dict(plan.tools),
        "strict": cfg.strict,
    }
