"""benchmarks/_procs.py, the sampler behind the benchmarks' per-process CPU and memory figures: a
probe process with a known heap, a known block of shared memory and a known busy spell must read
back as such (the finalize memory conclusions rest on its heap / shared-pages split)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20

# heap: a 200 MB bytes object (written, so resident); shared: 120 MB of a mapped tmpfs file, written;
# then ~1.5 s of pure-Python busy loop; "up" is printed when the memory is in place
PROBE = r"""
import mmap, os, sys, time
heap = b"\x01" * (200 << 20)
path = sys.argv[1]  # a file on /dev/shm (tmpfs): its mapped pages are shared memory
with open(path, "w+b") as f:
    f.truncate(120 << 20)
    shm = mmap.mmap(f.fileno(), 120 << 20)
chunk = b"\x02" * (1 << 20)  # filled 1 MB at a time: no 120 MB temporary on the heap
for i in range(120):
    shm[i << 20:(i + 1) << 20] = chunk
print("up", flush=True)
time.sleep(1.0)
t = time.time()
while time.time() - t < 1.5:
    pass
print("busy", t, time.time(), flush=True)
time.sleep(1.0)
shm.close()
os.unlink(path)
"""


def test_the_sampler_tells_heap_from_shared_pages_and_counts_a_busy_core(monkeypatch):
    import os

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the spawned sampler imports _procs from there
    from _procs import ProcSampler

    with ProcSampler(period=0.1, root=os.getpid()) as sampler:
        shm_file = f"/dev/shm/domino-procs-probe-{os.getpid()}"
        probe = subprocess.Popen(["domino-procs-probe", "-c", PROBE, shm_file], executable=sys.executable,
                                 stdout=subprocess.PIPE, text=True)
        out, _ = probe.communicate(timeout=60)
        time.sleep(0.3)
    assert probe.returncode == 0, out
    busy_from, busy_to = (float(x) for x in out.split("busy", 1)[1].split())

    peaks = sampler.peaks(lambda title: title == "domino-procs-probe")
    assert list(peaks) == ["domino-procs-probe"]
    rss, anon, shmem = peaks["domino-procs-probe"]
    assert 195 <= anon <= 260, peaks        # the 200 MB heap and the interpreter, not the shared block
    assert 115 <= shmem <= 125, peaks       # the 120 MB shared block, nothing else
    assert rss >= anon + shmem - 2, peaks   # RSS = anon + shmem + file-backed pages

    def group(pid: int, title: str) -> str:
        return "probe" if title == "domino-procs-probe" else "other"

    cores = sampler.cores(busy_from + 0.2, busy_to - 0.2, group)
    assert 0.6 <= cores.get("probe", 0.0) <= 1.1, cores  # one thread spinning: about one core, never two
