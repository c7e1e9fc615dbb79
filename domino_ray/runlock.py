"""The run-root lock: one job at a time holds a run root (DESIGN.md section 2).

A job creates `<run>/.lock` (`RunLayout.lock`) before it writes anything and deletes it when it ends,
normally or not. Creation is exclusive: on S3 a conditional PUT (`If-None-Match: *`, refused with
412 when the object exists), on local disk `O_CREAT | O_EXCL`. The body names the holder (the
`ray job submit` submission id, else host and pid), when it started, and a lease: a background
thread renews `expires_at` every `lease_s / 5` seconds, so a job that died without cleaning up
(SIGKILL, a lost node) stops holding the root `lease_s` after its last heartbeat, and the next job
takes the lock over. Until then a second job is refused with `RunRootLocked`, which names the
holder and the two ways out: wait for the lease to expire, or `--break-lock` when you know the
holder is gone.

Every change after creation is conditional on the version the job last saw (S3: `If-Match` on
the ETag; local: the file's sha256 compared under an flock of the run-root folder), so of two jobs
that both find the same expired lock exactly one takes it over, a heartbeat notices when its lock
was broken, and a release never deletes another job's lock.

`hold_run_root` is what the command line wraps every job in, and `holds_run_root` what every stage
entry point (run_learn, run_synthesize, run_finetune, run_evaluate, score_samples, run_pipeline,
run_study) is decorated with, so library callers are held too; holds nest in one thread. It also
refuses a local run root on a cluster of more than one node, where every node would write its own
disk (`local_root_problem`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from domino_ray.layout import RunLayout
from domino_ray.storage import Storage, StorageError, is_s3, split_s3

__all__ = ["RunLock", "RunRootLocked", "SharedRunRootError", "hold_run_root", "holds_run_root", "job_identity",
           "local_root_problem", "LEASE_S"]

log = logging.getLogger(__name__)

T = TypeVar("T")

LEASE_S = 300.0  # a holder that stops renewing loses the run root this long after its last heartbeat
_TAKEOVER_TRIES = 5  # create/read/replace rounds before giving up under heavy contention


class RunRootLocked(StorageError):
    """Another job holds the run root; the message names it and how to break a stale lock."""


class SharedRunRootError(StorageError):
    """A local run root on a multi-node cluster: every node would write its own disk."""


def job_identity(env: Optional[dict[str, str]] = None) -> str:
    """`ray-job:<submission id>` under `ray job submit`, else `<host>:pid<pid>`."""
    env = os.environ if env is None else env
    raw = env.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the entrypoint
    if raw:
        try:
            sid = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
        except (ValueError, AttributeError):
            sid = None
        if sid:
            return f"ray-job:{sid}"
    return f"{socket.gethostname()}:pid{os.getpid()}"


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------- backends
# Each backend stores one small object and offers compare-and-swap on an opaque version string:
# create (only if absent), read (body, version), replace (only if still at version), delete (same).
class _S3Backend:
    def __init__(self, storage: Storage, uri: str):
        self.client = storage.boto3_client
        self.bucket, self.key = split_s3(uri)

    @staticmethod
    def _code(e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    @staticmethod
    def _lost_race(code: str) -> bool:
        # 412: the condition failed; 409 ConditionalRequestConflict: a concurrent conditional write won
        return code in ("412", "PreconditionFailed", "409", "ConditionalRequestConflict")

    def create(self, body: bytes) -> Optional[str]:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")["ETag"]
        except ClientError as e:
            if self._lost_race(self._code(e)):
                return None
            raise

    def read(self) -> Optional[tuple[bytes, str]]:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def replace(self, body: bytes, version: str) -> Optional[str]:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, IfMatch=version)["ETag"]
        except ClientError as e:
            if self._lost_race(self._code(e)) or self._code(e) in ("NoSuchKey", "404"):
                return None
            raise

    def delete(self, version: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except ClientError as e:
            code = self._code(e)
            if self._lost_race(code):
                return False
            if code in ("NoSuchKey", "404"):
                return True
            if code not in ("NotImplemented", "501", "InvalidArgument"):
                raise
        # a store without conditional deletes: compare, then delete (a small window, logged)
        cur = self.read()
        if cur is None or cur[1] != version:
            return cur is None
        log.debug("runlock: %s/%s: conditional delete unsupported, deleting after a version check",
                  self.bucket, self.key)
        self.client.delete_object(Bucket=self.bucket, Key=self.key)
        return True


class _LocalBackend:
    """`O_CREAT | O_EXCL` creates; later changes compare the sha256 under an flock of the run-root
    folder (a local run root is single-node, see `local_root_problem`), then replace by rename."""

    def __init__(self, path: str):
        self.path = Path(path)

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    @staticmethod
    def _version(body: bytes) -> str:
        return hashlib.sha256(body).hexdigest()

    def _fsync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def create(self, body: bytes) -> Optional[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._mutex():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._fsync_dir()
        return self._version(body)

    def _read(self) -> Optional[tuple[bytes, str]]:
        try:
            body = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return body, self._version(body)

    def read(self) -> Optional[tuple[bytes, str]]:
        with self._mutex():
            return self._read()

    def replace(self, body: bytes, version: str) -> Optional[str]:
        with self._mutex():
            cur = self._read()
            if cur is None or cur[1] != version:
                return None
            tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._fsync_dir()
        return self._version(body)

    def delete(self, version: str) -> bool:
        with self._mutex():
            cur = self._read()
            if cur is None:
                return True
            if cur[1] != version:
                return False
            self.path.unlink()
            self._fsync_dir()
        return True


# --------------------------------------------------------------------------------------- lock
class RunLock:
    """The lock of one run root. `acquire()`, then `release()` (or use it as a context manager).

    `lease_s` is how long the lock outlives its last heartbeat; `clock` is injectable for tests of
    expiry (it must be comparable across jobs: wall-clock seconds).
    """

    def __init__(self, storage: Storage, run_root: str, job_id: Optional[str] = None, lease_s: float = LEASE_S,
                 clock: Callable[[], float] = time.time):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.run_root = run_root
        self.uri = RunLayout(run_root).lock
        self.job_id = job_id or job_identity()
        self.lease_s = float(lease_s)
        self.clock = clock
        self.token = uuid.uuid4().hex  # tells this holder from a later one with the same job id
        self.started_at = clock()
        self.took_over: Optional[dict[str, Any]] = None  # the stale holder this lock replaced, if any
        self.lost: Optional[str] = None  # why this job no longer holds the lock, once it does not
        self._backend = _S3Backend(storage, self.uri) if is_s3(self.uri) else _LocalBackend(self.uri)
        self._version: Optional[str] = None
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the body --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        now = self.clock()
        return (json.dumps({
            "job_id": self.job_id, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
            "run_root": self.run_root, "started_at": _iso(self.started_at), "heartbeat_at": now,
            "expires_at": now + self.lease_s, "lease_s": self.lease_s,
        }, indent=2) + "\n").encode("utf-8")

    @staticmethod
    def _parse(raw: bytes) -> Optional[dict[str, Any]]:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        return body if isinstance(body, dict) and isinstance(body.get("expires_at"), (int, float)) else None

    def holder(self) -> Optional[dict[str, Any]]:
        """The lock's current body (None when nobody holds the root; `{}` when it is unreadable)."""
        cur = self._backend.read()
        return None if cur is None else (self._parse(cur[0]) or {})

    @property
    def held(self) -> bool:
        return self._version is not None and self.lost is None

    def _refusal(self, holder: Optional[dict[str, Any]]) -> RunRootLocked:
        if holder is None:
            who, when = "a lock this version cannot read", "it never expires by itself"
        else:
            left = holder["expires_at"] - self.clock()
            who = (f"job {holder.get('job_id')} (host {holder.get('host')}, pid {holder.get('pid')}, "
                   f"started {holder.get('started_at')})")
            when = f"its lease expires at {_iso(holder['expires_at'])} (in {max(0.0, left):.0f} s) unless it renews it"
        return RunRootLocked(
            f"{self.run_root} is held by {who}: {when}. Two jobs on one run root would overwrite each other. "
            f"Wait for it to finish, use another run.output, or, if that job is gone (killed, node lost), "
            f"re-run with --break-lock (or delete {self.uri}).")

    # -- acquire / renew / release ---------------------------------------------------------------
    def acquire(self, break_lock: bool = False) -> "RunLock":
        """Take the lock; raises RunRootLocked while another job holds a live lease (unless break_lock)."""
        for _ in range(_TAKEOVER_TRIES):
            version = self._backend.create(self._body())
            if version is not None:
                self._version = version
                log.info("runlock: %s held by %s", self.uri, self.job_id)
                return self
            cur = self._backend.read()
            if cur is None:
                continue  # released between our create and our read
            raw, seen = cur
            holder = self._parse(raw)
            expired = holder is not None and holder["expires_at"] <= self.clock()
            if not (break_lock or expired):
                raise self._refusal(holder)
            version = self._backend.replace(self._body(), seen)
            if version is not None:
                self._version, self.took_over = version, holder or {}
                log.warning("runlock: %s: took over the lock of %s (%s)", self.uri,
                            (holder or {}).get("job_id", "an unreadable holder"),
                            "--break-lock" if break_lock and not expired else "its lease had expired")
                return self
            # another job changed the lock between our read and our replace: look again
        raise RunRootLocked(f"{self.run_root}: could not take {self.uri} after {_TAKEOVER_TRIES} tries; other jobs "
                            f"keep changing it (holder now: {self.holder()})")

    def renew(self) -> None:
        """Push the lease forward; raises RunRootLocked when the lock was broken or taken over."""
        with self._mu:
            if self._version is None or self.lost:
                raise RunRootLocked(f"{self.uri}: not held by this job ({self.lost or 'never acquired'})")
            version = self._backend.replace(self._body(), self._version)
            if version is None:
                holder = self.holder()
                self.lost = (f"the lock was broken or taken over (now held by "
                             f"{(holder or {}).get('job_id', 'nobody')})")
                raise RunRootLocked(f"{self.uri}: {self.lost}; this job's writes may collide with that job's")
            self._version = version

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still this job's (never another's)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._mu:
            if self._version is None:
                return
            if self.lost is None and not self._backend.delete(self._version):
                log.warning("runlock: %s now belongs to another job; left in place", self.uri)
            elif self.lost is None:
                log.info("runlock: %s released by %s", self.uri, self.job_id)
            self._version = None

    # -- heartbeat -------------------------------------------------------------------------------
    def start_heartbeat(self, every_s: Optional[float] = None) -> None:
        """Renew the lease every `every_s` (default lease_s / 5) in a daemon thread until release."""
        every = every_s if every_s is not None else self.lease_s / 5

        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    self.renew()
                except RunRootLocked as e:
                    log.error("runlock: %s", e)
                    return
                except Exception as e:  # a storage hiccup: the lease has room for several missed beats
                    log.warning("runlock: %s: heartbeat failed (%s: %s); retrying in %.0f s", self.uri,
                                type(e).__name__, e, every)

        self._thread = threading.Thread(target=beat, name="domino-runlock", daemon=True)
        self._thread.start()

    def __enter__(self) -> "RunLock":
        if self._version is None:
            self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ------------------------------------------------------------------------------- cluster check
def local_root_problem(run_root: str, nodes: list[dict[str, Any]]) -> Optional[str]:
    """Why a run root cannot be used on a cluster with these `ray.nodes()` (None when it can)."""
    if is_s3(run_root):
        return None
    alive = [n for n in nodes if n.get("Alive", n.get("alive", False))]
    if len(alive) <= 1:
        return None
    where = ", ".join(sorted(str(n.get("NodeManagerAddress", "?")) for n in alive))
    return (f"run.output {run_root!r} is a local path, but the Ray cluster has {len(alive)} alive nodes ({where}): "
            f"each node would write its part of the run to its own disk and no node would see the whole run. "
            f"Use an s3:// run.output that every node can reach (e.g. s3://BUCKET/runs/NAME, with storage.s3 "
            f"settings for the endpoint).")


def _check_cluster(run_root: str) -> None:
    """Refuse a local run root when this job runs on (or joins) a multi-node Ray cluster.

    A job that starts its own local Ray (no RAY_ADDRESS) has one node, so there is nothing to ask."""
    if is_s3(run_root):
        return
    import ray

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return
        from domino_ray.runtime import ensure_ray

        ensure_ray()  # the stages would join the same cluster next
    problem = local_root_problem(run_root, ray.nodes())
    if problem:
        raise SharedRunRootError(problem)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """`ray job stop` sends SIGTERM: turn it into SystemExit so the lock is released on the way out."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is on_term:  # leave a handler someone set meanwhile (Ray's) alone
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


# Run roots this process holds: key -> (thread that took it, its lock). A stage called inside a held
# block of the same thread (the pipeline's stages, the study's arms, the command line's job) re-enters.
_HELD: dict[str, tuple[int, RunLock]] = {}
_HELD_GUARD = threading.Lock()


def _root_key(run_root: str) -> str:
    return run_root.rstrip("/") if is_s3(run_root) else str(Path(run_root).expanduser().absolute())


@contextlib.contextmanager
def hold_run_root(run_root: str, storage: Storage, break_lock: bool = False, job_id: Optional[str] = None,
                  lease_s: float = LEASE_S) -> Iterator[RunLock]:
    """Check the run root suits the cluster, hold its lock (with a heartbeat) for the block, release it.

    Re-entrant in one thread: inside a block that holds the root, a nested `hold_run_root` of the same
    root yields the lock already held. Another thread of this process is refused, like another job."""
    key = _root_key(run_root)
    with _HELD_GUARD:
        held = _HELD.get(key)
    if held is not None and held[0] == threading.get_ident():
        yield held[1]
        return
    _check_cluster(run_root)
    local = None if is_s3(run_root) else Path(run_root).expanduser()
    created = local is not None and not local.exists()
    storage.check_writable_root(run_root)
    try:
        lock = RunLock(storage, run_root, job_id=job_id, lease_s=lease_s).acquire(break_lock=break_lock)
        with _HELD_GUARD:
            _HELD[key] = (threading.get_ident(), lock)
        try:
            lock.start_heartbeat()
            with _sigterm_as_exit():
                yield lock
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            lock.release()
        if lock.lost:  # the work finished, but another job may have written the same root meanwhile
            raise RunRootLocked(f"{run_root}: this job lost the run-root lock while it ran ({lock.lost}); "
                                f"check that job's output before trusting this run's")
    finally:
        if created:  # a job that failed before writing anything leaves no empty run root behind
            with contextlib.suppress(OSError):
                local.rmdir()


def holds_run_root(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a stage entry point `fn(cfg, ...)` so that the call holds `cfg.run.output`: a library
    caller (a notebook, a script) is refused while another job holds the root, as the command line
    is. Inside a held block (the command line, `run_pipeline`) it re-enters; to take a stale lock
    from Python, wrap the call in `hold_run_root(root, storage, break_lock=True)`."""

    @functools.wraps(fn)
    def held(cfg: Any, *args: Any, **kwargs: Any) -> T:
        with hold_run_root(cfg.run.output, Storage(cfg.storage.s3)):
            return fn(cfg, *args, **kwargs)

    return held
