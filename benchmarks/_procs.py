"""Per-process CPU and memory of a benchmark run, sampled from a process of its own (`ProcSampler`).

A sampling thread in the benchmark would take the GIL from what is being timed (the bare loops'
engine frontend), so a spawned process reads every process's CPU time and memory every `period`
seconds and appends one JSON line per sample: [time, {pid: [title, cpu_s, rss, anon, shmem]}].
Memory comes from /proc/<pid>/status: `RssAnon` is the process's own heap (what a task allocated),
`RssShmem` the shared pages it maps (Ray's object store: a zero-copy read maps the object, and the
same pages count in every reader's RSS). Afterwards `cores` tells which process groups used how much
CPU in a time window, and `peaks` the largest memory per process title.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Callable, Optional

_STATUS_FIELDS = {"VmRSS:": 0, "RssAnon:": 1, "RssShmem:": 2}


def _memory(pid: int) -> tuple[int, int, int]:
    """(rss, anon, shmem) bytes of `pid` from /proc (zeros where the kernel does not say)."""
    out = [0, 0, 0]
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k = _STATUS_FIELDS.get(line.split(None, 1)[0])
            if k is not None:
                out[k] = int(line.split()[1]) * 1024  # kB
    return out[0], out[1], out[2]


def _sample(path: str, period: float, stop, root: Optional[int]) -> None:
    import psutil

    me = os.getpid()
    with open(path, "w") as f:
        while not stop.is_set():
            now, seen = time.time(), {}
            procs = psutil.Process(root).children(recursive=True) if root else psutil.process_iter()
            for p in procs:
                try:
                    if p.pid != me:
                        t = p.cpu_times()
                        title = " ".join((p.cmdline() or [p.name() or "?"])[:1])
                        seen[p.pid] = [title, t.user + t.system, *_memory(p.pid)]
                except Exception:  # noqa: BLE001 - a process that ended while it was read
                    pass
            f.write(json.dumps([now, seen]) + "\n")
            f.flush()
            stop.wait(period)


class ProcSampler:
    """`with ProcSampler() as s: ...`, then `s.cores(t0, t1, group)` and `s.peaks(keep)`. Every
    process on the machine is sampled, or only the descendants of `root` (a pid)."""

    def __init__(self, period: float = 0.5, root: Optional[int] = None):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        fd, self.path = tempfile.mkstemp(suffix=".procs.jsonl")
        os.close(fd)
        self._stop = ctx.Event()
        self._read, self._offset = [], 0  # samples parsed so far, and the bytes of the file they came from
        self.proc = ctx.Process(target=_sample, args=(self.path, period, self._stop, root), daemon=True)

    def __enter__(self) -> "ProcSampler":
        self.proc.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.proc.join(timeout=30)

    def _samples(self) -> list:
        """Every complete sample so far; only what the sampler appended since the last call is read."""
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            new = f.read()
        done = new.rfind(b"\n") + 1  # the last line may still be being written
        self._read += [json.loads(line) for line in new[:done].splitlines()]
        self._offset += done
        return self._read

    def cores(self, start: float, end: float, group: Callable[[int, str], str]) -> dict[str, float]:
        """Cores used between the samples nearest `start` and `end`, by `group(pid, title)`. A process
        is counted up to its last sample in the window (an engine core exits with its actor, right at
        the end); one that started inside the window, from zero."""
        samples = self._samples()
        a = min(range(len(samples)), key=lambda i: abs(samples[i][0] - start))
        b = min(range(len(samples)), key=lambda i: abs(samples[i][0] - end))
        last: dict[str, list] = {}
        for _, seen in samples[a:b + 1]:
            last.update(seen)
        span = max(samples[b][0] - samples[a][0], 1e-9)
        out: dict[str, float] = {}
        for pid, (title, cpu, *_) in last.items():
            before = samples[a][1].get(pid, (title, 0.0))[1]
            key = group(int(pid), title)
            out[key] = out.get(key, 0.0) + (cpu - before) / span
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.005}

    def peaks(self, keep: Optional[Callable[[str], bool]] = None, start: float = 0.0,
              end: float = float("inf")) -> dict[str, tuple[int, int, int]]:
        """Peak (RSS, anon, shmem) MB per process title among the samples in [start, end] (`keep`
        filters titles). A Ray worker is reused by later tasks and keeps its heap, and its title says
        what it runs at the moment it is sampled, so memory is booked to that."""
        out: dict[str, tuple[int, int, int]] = {}
        for t, seen in self._samples():
            if not start <= t <= end:
                continue
            for title, _, *mem in seen.values():
                if keep is None or keep(title):
                    old = out.get(title, (0, 0, 0))
                    out[title] = tuple(max(o, round(m / 2**20)) for o, m in zip(old, mem))
        return out
