"""Per-run cgroups of the sandbox: one fresh cgroup per execution with a memory limit (which,
unlike RLIMIT_AS, counts memfd and tmpfs pages and every forked process together), a pids limit and
a CPU bandwidth cap, created before the run and removed after it.

cgroup v1 (separate memory, pids and cpu hierarchies, as on this project's hosts) or v2 (one
unified hierarchy, where the controllers are delegated to the cgroup this process runs in). Each
run cgroup is a child of this process's own cgroup in every hierarchy, so the limits of whatever
contains this process (a container, a Ray worker) still apply on top.

Every process of the run is inside it from its first instruction on: under v1 the launching
thread itself moves into the cgroup for the spawn and back right after it (v1 places threads, and a
child starts in its parent thread's cgroups); under v2, where a thread cannot leave its process's
cgroup, the launcher joins it before it execs bubblewrap (a `sh -c 'echo $$ > cgroup.procs'` prefix).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["CgroupHost", "RunCgroup", "detect_cgroups", "CgroupUnavailable"]

_CONTROLLERS = ("memory", "pids", "cpu")
_PERIOD_US = 100_000
_counter = itertools.count()


class CgroupUnavailable(RuntimeError):
    """No writable memory+pids+cpu cgroups here; the message says what is missing."""


@dataclass(frozen=True)
class CgroupHost:
    version: int  # 1 or 2
    parents: dict[str, str]  # controller -> directory under which run cgroups are made (v2: one dir for all)

    def create(self, memory_bytes: int, pids: int, cpu_cores: float) -> "RunCgroup":
        name = f"domino-sbx-{os.getpid()}-{next(_counter)}"
        dirs: dict[str, str] = {}
        try:
            if self.version == 1:
                for ctl in _CONTROLLERS:
                    path = os.path.join(self.parents[ctl], name)
                    os.mkdir(path)
                    dirs[ctl] = path
                _write(dirs["memory"], "memory.limit_in_bytes", memory_bytes)
                if os.path.exists(os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")):
                    _write(dirs["memory"], "memory.memsw.limit_in_bytes", memory_bytes)  # no swap beyond it
                _write(dirs["pids"], "pids.max", pids)
                _write(dirs["cpu"], "cpu.cfs_period_us", _PERIOD_US)
                _write(dirs["cpu"], "cpu.cfs_quota_us", max(1000, int(cpu_cores * _PERIOD_US)))
            else:
                path = os.path.join(self.parents["unified"], name)
                os.mkdir(path)
                dirs["unified"] = path
                _write(path, "memory.max", memory_bytes)
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    _write(path, "memory.swap.max", 0)
                _write(path, "pids.max", pids)
                _write(path, "cpu.max", f"{max(1000, int(cpu_cores * _PERIOD_US))} {_PERIOD_US}")
        except OSError:
            RunCgroup(self.version, dirs).remove()
            raise
        return RunCgroup(self.version, dirs)


@dataclass
class RunCgroup:
    version: int
    dirs: dict[str, str]

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def oom_kills(self) -> int:
        """Processes the kernel OOM-killed in this cgroup (its memory limit was reached)."""
        if self.version == 1:
            name, path = "memory.oom_control", self.dirs.get("memory")
        else:
            name, path = "memory.events", self.dirs.get("unified")
        if not path:
            return 0
        with contextlib.suppress(OSError):
            for line in Path(path, name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    @contextlib.contextmanager
    def thread_inside(self, parents: dict[str, str]):
        """v1: the calling thread in this cgroup (children it spawns meanwhile start inside),
        back in `parents` afterwards."""
        tid = str(threading.get_native_id())
        moved: list[str] = []
        try:
            for ctl, path in self.dirs.items():
                _write(path, "tasks", tid)
                moved.append(ctl)
            yield
        finally:
            for ctl in moved:
                _write(parents[ctl], "tasks", tid)

    def pids(self) -> list[int]:
        out: set[int] = set()
        for f in self.procs_files:
            with contextlib.suppress(OSError, ValueError):
                out.update(int(p) for p in Path(f).read_text().split())
        return sorted(out)

    def remove(self, deadline_s: float = 5.0) -> bool:
        """Kill whatever is still inside and remove the cgroup; False if it could not be removed."""
        end = time.monotonic() + deadline_s
        for path in list(self.dirs.values()):
            while True:
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY: killed processes are still leaving
                    if time.monotonic() > end:
                        return False
                    time.sleep(0.005)
        return True


def _write(directory: str, name: str, value) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(str(value))


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup mount."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
            out.append((fields[3], fields[4], rfields[0], set(rfields[2].split(","))))
    return out


def _own_dir(mount_root: str, mount_point: str, path: str) -> str:
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        path = path[len(mount_root):] or "/"
    return os.path.join(mount_point, path.lstrip("/"))


def detect_cgroups() -> CgroupHost:
    """The cgroup setup of this process, checked by creating and removing one run cgroup."""
    own: dict[str, str] = {}  # controller (or "" for v2) -> path of this process's cgroup
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctls, path = line.split(":", 2)
        for ctl in ctls.split(",") if ctls else [""]:
            own[ctl] = path
    mounts = _mounts()
    parents: dict[str, str] = {}
    for ctl in _CONTROLLERS:
        for root, point, fstype, opts in mounts:
            if fstype == "cgroup" and ctl in opts and ctl in own:
                parents[ctl] = _own_dir(root, point, own[ctl])
                break
    if len(parents) == len(_CONTROLLERS):
        host = CgroupHost(1, parents)
    else:
        unified = next(((root, point) for root, point, fstype, _ in mounts if fstype == "cgroup2"), None)
        if unified is None or "" not in own:
            missing = [c for c in _CONTROLLERS if c not in parents]
            raise CgroupUnavailable(f"no cgroup v1 hierarchy for {missing} and no cgroup v2 mount")
        parent = _own_dir(unified[0], unified[1], own[""])
        available = set(Path(parent, "cgroup.subtree_control").read_text().split()) if os.path.exists(
            os.path.join(parent, "cgroup.subtree_control")) else set()
        lacking = [c for c in _CONTROLLERS if c not in available]
        if lacking:
            v1_missing = [c for c in _CONTROLLERS if c not in parents]
            raise CgroupUnavailable(
                f"cgroup v1 lacks {v1_missing}; cgroup v2 at {parent} does not delegate {lacking} to its children "
                "(cgroup.subtree_control): run the worker in a delegated cgroup (systemd Delegate=yes)")
        host = CgroupHost(2, {"unified": parent})
    try:
        probe = host.create(64 * 1024 * 1024, 8, 0.5)
    except OSError as e:
        raise CgroupUnavailable(f"cannot create a cgroup under {sorted(set(host.parents.values()))}: {e}") from e
    probe.remove()
    return host


def join_prefix(cgroup: Optional[RunCgroup]) -> list[str]:
    """v2: argv prefix that moves the launcher into `cgroup` and then execs the rest of the argv
    (v1 needs none: see RunCgroup.thread_inside)."""
    if cgroup is None or cgroup.version == 1:
        return []
    script = 'for f in ' + " ".join(_sh_quote(p) for p in cgroup.procs_files) + '; do echo $$ > "$f" || exit 125; done; exec "$@"'
    return ["/bin/sh", "-c", script, "sh"]


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
