"""Isolation layers of the sandbox (DESIGN.md section 6): which tools this machine has, which layers
they give, and the command line that applies them to one program.

Every execution is a fresh child process started through, outermost first:

    bwrap   new network, pid, ipc, uts and cgroup namespaces; a new root holding only read-only
            /usr (+ the /bin, /lib symlinks), a few /etc files and the interpreter's install prefix;
            a size-capped tmpfs at /sandbox as the only writable place (/tmp points there);
            no /root, no /home, no host /tmp; empty environment; its own session.
    setpriv drop to an unprivileged uid/gid with no supplementary groups, no capabilities and
            no_new_privs (so setuid binaries cannot raise privileges back).
    prlimit RLIMIT_AS, CPU, FSIZE, NOFILE, NPROC and CORE=0 on the program only.
    python  the plain interpreter (never the project venv) with -I (isolated: no env vars, no user
            site), -B (no bytecode writes) and, unless sandbox.site_packages, -S (standard library
            only: no third-party packages and no .pth hooks of the host's site-packages).

Why not `bwrap --unshare-all` when running as root: it then also creates a user namespace in which
the sandbox uid maps back to root outside, and the kernel never applies RLIMIT_NPROC to root, so a
fork bomb would not be stopped. As root we unshare every namespace except the user one and switch
uid with setpriv inside; as an ordinary user (no setpriv needed) `--unshare-all` is right.

Where bubblewrap is missing or cannot create namespaces, `unshare` gives the network and pid
namespaces but no private filesystem view; where that fails too, only the uid and rlimits remain.
Each missing layer is logged once per process; `sandbox.strict: true` refuses to run instead.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from domino_ray.config import SandboxConfig

__all__ = [
    "LAYERS",
    "SandboxError",
    "IsolationPlan",
    "plan_isolation",
    "ensure_isolation",
    "isolation_report",
    "build_command",
    "SANDBOX_DIR",
]

log = logging.getLogger(__name__)

# Every layer DESIGN section 6 asks for. The last four are applied by the runner itself and cannot
# be missing; the others depend on the tools found here.
LAYERS = (
    "network",        # no network: a private network namespace with only a down loopback
    "filesystem",     # private root: read-only system dirs, one writable tmpfs, no /root or /home
    "pid_namespace",  # cannot see or signal host processes; every leftover child dies with the run
    "non_root_uid",   # a real unprivileged uid, so RLIMIT_NPROC holds and host files stay closed
    "rlimits",        # address space, CPU, file size, open files, processes
    "process_group",  # own session; the whole group is killed on timeout and after exit
    "empty_env",      # no credentials or settings leak in through the environment
    "temp_workdir",   # fresh per-run directory, removed afterwards
    "output_cap",     # stdout/stderr capped; a program printing more is killed
)

SANDBOX_DIR = "/sandbox"  # the program's working directory inside bubblewrap
_SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"  # where to look for the tools themselves
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives")
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_PROBE_CODE = "import os, sys; print(os.getuid(), os.getgid(), sys.flags.isolated)"

_warned: set[str] = set()  # layers already reported missing in this process


class SandboxError(RuntimeError):
    """The sandbox cannot run programs as configured (a missing layer under strict, an unusable
    interpreter, no working backend); the message names the layer or key and the fix."""


@dataclass(frozen=True)
class IsolationPlan:
    backend: str  # bwrap | unshare | none
    python: str  # real path of the interpreter programs run under
    python_prefix: str  # its install prefix (mounted read-only under bwrap)
    as_root: bool  # this process is root: uids are switched with setpriv
    tools: dict[str, str]  # tool name -> path
    layers: dict[str, bool]
    notes: dict[str, str] = field(default_factory=dict)  # layer or backend -> why it is missing

    @property
    def missing(self) -> list[str]:
        return [name for name in LAYERS if not self.layers.get(name)]

    @property
    def switches_uid(self) -> bool:
        """Whether each run picks its uid (root + setpriv); an ordinary user keeps its own."""
        return self.as_root and "setpriv" in self.tools


# ------------------------------------------------------------------------------------ discovery
def _which(name: str) -> Optional[str]:
    # Ray workers may run with a trimmed PATH; the tools live in the standard system dirs.
    return shutil.which(name) or shutil.which(name, path=_SYSTEM_PATH)


def find_tools() -> dict[str, str]:
    return {name: path for name in ("bwrap", "unshare", "setpriv", "prlimit") if (path := _which(name))}


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


def _bwrap_argv(plan: IsolationPlan, cfg: SandboxConfig, run_dir: str, uid: Optional[int]) -> list[str]:
    if plan.as_root and plan.switches_uid:
        namespaces = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    elif plan.as_root:  # root without setpriv: a user namespace at least drops real root
        namespaces = ["--unshare-all", "--uid", str(cfg.uid), "--gid", str(cfg.uid)]
    else:
        namespaces = ["--unshare-all"]
    return [
        plan.tools["bwrap"], *namespaces, "--die-with-parent", "--new-session",
        *_bwrap_mounts(plan),
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(cfg.workdir_mb * 1024 * 1024), "--perms", "1777", "--tmpfs", SANDBOX_DIR,
        "--symlink", SANDBOX_DIR, "/tmp",
        "--ro-bind", run_dir, f"{SANDBOX_DIR}/.run",  # main.py (read-only); stdin comes as a fd
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
    base = [plan.tools["unshare"], "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
    if not plan.as_root:
        base.insert(1, "--user")
        base.insert(2, "--map-current-user")
    return base + ["--"]


def build_command(plan: IsolationPlan, cfg: SandboxConfig, run_dir: str, uid: Optional[int], script: str = "main.py") -> list[str]:
    """argv that runs `run_dir/script` with every layer of `plan`. Under bwrap the run dir is mounted
    read-only at /sandbox/.run and the program runs in /sandbox; otherwise it runs in the run dir."""
    interpreter = [plan.python, "-I", "-B"] + ([] if cfg.site_packages else ["-S"])
    if plan.backend == "bwrap":
        return (_bwrap_argv(plan, cfg, run_dir, uid) + _setpriv_argv(plan, uid) + _limits_argv(plan, cfg)
                + interpreter + [f"{SANDBOX_DIR}/.run/{script}"])
    program = _limits_argv(plan, cfg) + interpreter + [os.path.join(run_dir, script)]
    if plan.backend == "unshare":
        # The first process of a pid namespace is its init, which the kernel shields from signals it
        # has no handler for (SIGXCPU included); a shell as init keeps the program an ordinary pid 2.
        return _unshare_argv(plan) + _setpriv_argv(plan, uid) + ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + program
    return _setpriv_argv(plan, uid) + program


def host_env() -> dict[str, str]:
    """Environment of the launcher processes: nothing from ours (credentials stay out even where
    bwrap's --clearenv is not in the chain)."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": SANDBOX_DIR}


# ------------------------------------------------------------------------------------- probing
def _layers_for(backend: str, as_root: bool, tools: dict[str, str]) -> tuple[dict[str, bool], dict[str, str]]:
    layers = {name: True for name in LAYERS}
    notes: dict[str, str] = {}
    if backend != "bwrap":
        layers["filesystem"] = False
        notes["filesystem"] = "bubblewrap unavailable: the program sees the host filesystem (only file permissions protect it)"
    if backend == "none":
        layers["network"] = layers["pid_namespace"] = False
        notes["network"] = "neither bubblewrap nor unshare could create a network namespace"
        notes["pid_namespace"] = "no pid namespace: detached children that leave the process group can outlive the run"
    if as_root and "setpriv" not in tools:
        layers["non_root_uid"] = False
        notes["non_root_uid"] = "running as root without setpriv (util-linux): RLIMIT_NPROC does not apply to root"
    if "prlimit" not in tools:
        layers["rlimits"] = False
        notes["rlimits"] = "prlimit (util-linux) not found: no memory, CPU, file-size, open-file or process limits"
    return layers, notes


def _probe(plan: IsolationPlan, cfg: SandboxConfig) -> Optional[str]:
    """Run a tiny program through `plan`; None when it works, else why not."""
    run_dir = tempfile.mkdtemp(prefix="domino-sbx-probe-")
    uid = cfg.uid if plan.switches_uid else None
    try:
        Path(run_dir, "main.py").write_text(_PROBE_CODE + "\n")
        os.chmod(run_dir, 0o755)
        os.chmod(Path(run_dir, "main.py"), 0o644)
        cmd = build_command(plan, cfg, run_dir, uid)
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=60, env=host_env(), cwd=run_dir, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"
        if proc.returncode != 0:
            return (proc.stderr.decode(errors="replace").strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        got = proc.stdout.decode().split()
        want_uid = str(uid if uid is not None else (cfg.uid if plan.as_root and plan.backend == "bwrap" else os.getuid()))
        if not got or got[0] != want_uid:
            return f"program ran as uid {got[:1]} instead of {want_uid}"
        return None
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@functools.lru_cache(maxsize=16)
def _plan_cached(backend: str, python: str, uid: int, workdir_mb: int) -> IsolationPlan:
    cfg = SandboxConfig(backend=backend, python=python, uid=uid, workdir_mb=workdir_mb)
    interpreter, prefix = resolve_python(python)
    tools = find_tools()
    as_root = os.geteuid() == 0
    wanted = ["bwrap", "unshare", "none"] if backend == "auto" else [backend]
    failures: dict[str, str] = {}
    for name in wanted:
        if name != "none" and name not in tools:
            failures[name] = f"{name} not found on PATH"
            continue
        layers, notes = _layers_for(name, as_root, tools)
        plan = IsolationPlan(name, interpreter, prefix, as_root, tools, layers, notes)
        why = _probe(plan, cfg)
        if why is None:
            notes.update({f"backend:{k}": v for k, v in failures.items()})
            return plan
        failures[name] = why
    detail = "; ".join(f"{k}: {v}" for k, v in failures.items())
    hint = ""
    if not _under_usr(prefix) and as_root:
        hint = f" The interpreter lives under {prefix}; without bubblewrap the sandbox uid must be able to read it: set sandbox.python to e.g. /usr/bin/python3."
    raise SandboxError(f"no sandbox backend works here (sandbox.backend={backend!r}, interpreter {interpreter}): {detail}.{hint}")


def plan_isolation(cfg: SandboxConfig) -> IsolationPlan:
    """The isolation this machine gives for `cfg` (probed once per process and setting)."""
    return _plan_cached(cfg.backend, cfg.python, cfg.uid, cfg.workdir_mb)


def ensure_isolation(cfg: SandboxConfig) -> IsolationPlan:
    """The plan, after enforcing `strict` (refuse when a layer is missing) or logging each missing
    layer once per process."""
    plan = plan_isolation(cfg)
    missing = plan.missing
    if missing and cfg.strict:
        reasons = "; ".join(f"{name}: {plan.notes.get(name, 'unavailable')}" for name in missing)
        raise SandboxError(
            f"sandbox.strict is true and {len(missing)} isolation layer(s) are unavailable here ({reasons}). "
            "Install bubblewrap and util-linux (setpriv, prlimit) or set sandbox.strict: false to run with reduced isolation."
        )
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
    return {
        "usable": True,
        "backend": plan.backend,
        "python": plan.python,
        "python_prefix": plan.python_prefix,
        "as_root": plan.as_root,
        "uid": (f"{cfg.uid - cfg.uid_slots + 1}..{cfg.uid}" if plan.switches_uid else os.getuid()),
        "layers": dict(plan.layers),
        "missing": plan.missing,
        "notes": dict(plan.notes),
        "tools": dict(plan.tools),
        "strict": cfg.strict,
    }
