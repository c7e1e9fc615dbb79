"""The one storage module: every input and output is a URI, a local path or `s3://bucket/prefix`.

One `S3Config` builds one `pyarrow.fs.S3FileSystem` (pyarrow ignores AWS_ENDPOINT_URL, so the
endpoint is passed as `endpoint_override`) and one boto3 client (DESIGN.md section 7). Both read
credentials from the config, else the standard AWS variables or a profile. Unreachable endpoints,
missing buckets and bad credentials raise `StorageError` with the URI and the fix.

Writes are atomic: a file appears at its URI whole or not at all. `open_atomic` is the one writer:
on S3 it streams a multipart upload that is completed only when the block ends without an exception
and aborted otherwise (a plain PUT when the data fits one part), because pyarrow's S3 output stream
completes the upload on close even when an exception is unwinding, publishing a truncated object.
Locally it writes a hidden temp file beside the target, fsyncs it, renames it over the target and
fsyncs the folder, so a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from domino_ray.config import S3Config

__all__ = ["StorageError", "Storage", "is_s3", "split_s3", "join_uri"]

log = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024  # multipart part size of atomic S3 writes (S3's minimum is 5 MiB)


class StorageError(RuntimeError):
    """Storage that cannot be used; the message names the URI and what to check."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key.strip("/")


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or s3 URI."""
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://"):].rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(base, *parts))


# Substrings of pyarrow/AWS SDK error messages -> what the user should check.
_S3_HINTS = (
    (("NETWORK_CONNECTION", "Could not connect", "curlCode: 7", "Connection refused"),
     "cannot reach the S3 endpoint {where}; check storage.s3.endpoint_url and the network"),
    (("NO_SUCH_BUCKET", "NoSuchBucket"), "the bucket does not exist at {where}; create it first"),
    (("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden"),
     "S3 at {where} refused the credentials; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage.s3.profile"),
)


def _storage_error(uri: str, action: str, e: OSError, where: str) -> StorageError:
    """A StorageError for a failed pyarrow call, with the likely fix when the message tells it."""
    text = str(e)
    hint = next((h.format(where=where) for keys, h in _S3_HINTS if any(k in text for k in keys)), None)
    return StorageError(f"{uri}: cannot {action}: {hint} ({text})" if hint else f"{uri}: cannot {action} ({text})")


def _fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable (the folder's entry, not only the file's data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _S3Upload:
    """A write-only stream to one S3 key that becomes an object only on `complete()`.

    Bytes are buffered up to `part_size`; the first full part starts a multipart upload. `complete()`
    sends what is left (one PUT when no part was sent) and completes; `abort()` aborts the upload,
    so nothing appears at the key and no parts are left billed."""

    def __init__(self, client, bucket: str, key: str, part_size: int = PART_SIZE):
        self.client, self.bucket, self.key, self.part_size = client, bucket, key, part_size
        self.buf = bytearray()
        self.upload_id: Optional[str] = None
        self.parts: list[dict[str, Any]] = []
        self.written = 0
        self.closed = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        pass

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a finished S3 upload")
        view = memoryview(data).cast("B")
        n = len(view)
        self.written += n
        if self.buf:  # top up the pending part first
            take = min(self.part_size - len(self.buf), n)
            self.buf += view[:take]
            view = view[take:]
            if len(self.buf) == self.part_size:
                self._send(bytes(self.buf))
                self.buf = bytearray()
        while len(view) >= self.part_size:  # whole parts straight from the caller's buffer
            self._send(view[: self.part_size].tobytes())
            view = view[self.part_size:]
        self.buf += view
        return n

    def _send(self, chunk: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        etag = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number,
                                       Body=chunk)["ETag"]
        self.parts.append({"ETag": etag, "PartNumber": number})

    def complete(self) -> None:
        if self.upload_id is None:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf))
        else:
            if self.buf:
                self._send(bytes(self.buf))
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                  MultipartUpload={"Parts": self.parts})
        self.buf = bytearray()
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.buf = bytearray()
        if self.upload_id is None:
            return
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception as e:  # no object appeared; only the parts may linger (a bucket lifecycle rule ends them)
            log.warning("storage: s3://%s/%s: could not abort multipart upload %s (%s); no object was written",
                        self.bucket, self.key, self.upload_id, e)


class Storage:
    """Filesystem access for local paths and s3:// URIs through one S3 configuration."""

    def __init__(self, s3: Optional[S3Config] = None, part_size: int = PART_SIZE):
        self.s3 = s3 or S3Config()
        self.part_size = part_size

    def __getstate__(self) -> dict[str, Any]:
        # the cached clients stay behind (a boto3 client does not pickle); a copy builds its own
        return {"s3": self.s3, "part_size": self.part_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- construction of the two clients ---------------------------------------------------------
    def _credentials(self) -> dict[str, Optional[str]]:
        key, secret, token = self.s3.access_key_id, self.s3.secret_access_key, self.s3.session_token
        if key is None and self.s3.profile:
            import boto3

            creds = boto3.Session(profile_name=self.s3.profile).get_credentials()
            if creds is not None:
                frozen = creds.get_frozen_credentials()
                key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
        key = key or os.environ.get("AWS_ACCESS_KEY_ID")
        secret = secret or os.environ.get("AWS_SECRET_ACCESS_KEY")
        token = token or os.environ.get("AWS_SESSION_TOKEN")
        return {"access_key": key, "secret_key": secret, "session_token": token}

    @functools.cached_property
    def s3_filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {
            "region": self.s3.region,
            "connect_timeout": self.s3.connect_timeout_s,
            "request_timeout": max(30.0, self.s3.connect_timeout_s),
        }
        creds = self._credentials()
        if creds["access_key"] and creds["secret_key"]:
            kwargs.update({k: v for k, v in creds.items() if v})
        if self.s3.endpoint_url:
            scheme, _, host = self.s3.endpoint_url.partition("://")
            kwargs["endpoint_override"] = host or scheme
            kwargs["scheme"] = scheme if host else "https"
        return pafs.S3FileSystem(**kwargs)

    @functools.cached_property
    def boto3_client(self):
        import boto3
        from botocore.config import Config

        session = boto3.Session(profile_name=self.s3.profile) if self.s3.profile else boto3.Session()
        creds = self._credentials()
        return session.client(
            "s3",
            endpoint_url=self.s3.endpoint_url,
            region_name=self.s3.region,
            aws_access_key_id=creds["access_key"],
            aws_secret_access_key=creds["secret_key"],
            aws_session_token=creds["session_token"],
            config=Config(connect_timeout=self.s3.connect_timeout_s, retries={"max_attempts": 2}),
        )

    @property
    def _where(self) -> str:
        return self.s3.endpoint_url or "AWS S3"

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, path within it) for a URI; s3 paths are `bucket/key` (no scheme)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self.s3_filesystem, f"{bucket}/{key}".rstrip("/")
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())

    # -- checks ----------------------------------------------------------------------------------
    def check_writable_root(self, uri: str) -> None:
        """Fail early, with the fix, when an s3 run root cannot be used (endpoint, bucket, credentials)."""
        if not is_s3(uri):
            Path(uri).expanduser().mkdir(parents=True, exist_ok=True)
            return
        bucket, _ = split_s3(uri)
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.s3.endpoint_url or "AWS S3"
        try:
            self.boto3_client.head_bucket(Bucket=bucket)
        except EndpointConnectionError as e:
            raise StorageError(f"{uri}: cannot reach the S3 endpoint {where} ({e}); check storage.s3.endpoint_url and the network") from e
        except NoCredentialsError as e:
            raise StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or storage.s3.profile") from e
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(f"{uri}: bucket {bucket!r} does not exist at {where}; create it first") from e
            if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise StorageError(f"{uri}: S3 refused the credentials for bucket {bucket!r} at {where} ({code}); check the access key and secret") from e
            raise StorageError(f"{uri}: S3 error {code} at {where}: {e}") from e
        except Exception as e:  # urllib3/botocore connection errors come in several types
            raise StorageError(f"{uri}: cannot reach the S3 endpoint {where} ({type(e).__name__}: {e}); check storage.s3.endpoint_url") from e

    # -- file operations -------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        try:
            return fs.get_file_info(path).type != pafs.FileType.NotFound
        except OSError as e:
            raise _storage_error(uri, "check existence", e, self._where) from e

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError as e:
            where = " (no such key, or no such bucket)" if is_s3(uri) else ""
            raise StorageError(f"{uri}: file not found{where}") from e
        except OSError as e:
            raise _storage_error(uri, "read", e, self._where) from e

    @contextlib.contextmanager
    def open_atomic(self, uri: str) -> Iterator[BinaryIO]:
        """A binary stream whose bytes appear at `uri` only if the block ends without an exception.

            with storage.open_atomic("s3://bucket/run/x.jsonl") as f:
                for line in lines:
                    f.write(line)          # an exception here leaves no object (and no temp file)

        Pyarrow writers take it as a sink (`pq.write_table(table, f)`)."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            upload = _S3Upload(self.boto3_client, bucket, key, self.part_size)
            try:
                yield upload  # type: ignore[misc]
                upload.complete()
            except BaseException as e:
                upload.abort()
                if isinstance(e, Exception) and type(e).__module__.startswith(("botocore", "boto3")):
                    raise self._client_error(uri, "write", e) from e
                raise
            return
        path = Path(self.filesystem(uri)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        f = open(tmp, "wb")
        try:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise

    def _client_error(self, uri: str, action: str, e: Exception) -> StorageError:
        """A StorageError for a failed boto3 call, with the likely fix when the error tells it."""
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        text = f"{code} {e}" if code else f"{type(e).__name__}: {e}"
        hint = next((h.format(where=self._where) for keys, h in _S3_HINTS if any(k in text for k in keys)), None)
        return StorageError(f"{uri}: cannot {action}: {hint} ({text})" if hint else f"{uri}: cannot {action} ({text})")

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object atomically (`open_atomic`): the old one or the new one, never a torn one."""
        with self.open_atomic(uri) as f:
            f.write(data)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_text(uri))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def list_files(self, uri: str, suffix: str = "") -> list[str]:
        """URIs of the files under a prefix (recursive), sorted; empty when the prefix is absent."""
        fs, path = self.filesystem(uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError as e:
            raise _storage_error(uri, "list", e, self._where) from e
        out = []
        for info in infos:
            if info.type == pafs.FileType.File and info.path.endswith(suffix):
                rel = info.path[len(path):].lstrip("/")
                out.append(join_uri(uri, rel))
        return sorted(out)

    def delete(self, uri: str) -> None:
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    def upload_dir(self, local_dir: str | Path, uri: str) -> None:
        """Copy a local folder to a URI (no-op copy when the URI is that folder)."""
        local_dir = Path(local_dir)
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                dest = join_uri(uri, f.relative_to(local_dir).as_posix())
                if not is_s3(uri) and Path(dest).resolve() == f.resolve():
                    continue
                with open(f, "rb") as src, self.open_atomic(dest) as out:  # part by part: model files are GBs
                    shutil.copyfileobj(src, out, self.part_size)

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Copy everything under a URI to a local folder; returns the folder."""
        local_dir = Path(local_dir)
        for src in self.list_files(uri):
            rel = src[len(uri.rstrip("/")):].lstrip("/")
            dest = local_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.read_bytes(src))
        return local_dir

    def localize(self, uri: str, cache_root: Optional[str] = None) -> str:
        """A local folder holding what `uri` names: itself when local, else a node-local copy.

        Engines and transformers read models and adapters from local folders only, so a fine-tuned
        model under an s3:// run root is downloaded once per node (file lock + completion marker:
        several actors on one node share one download) into $DOMINO_CACHE or ~/.cache/domino-ray.
        """
        if not is_s3(uri):
            return uri
        import fcntl
        import hashlib

        root = Path(cache_root or os.environ.get("DOMINO_CACHE") or Path.home() / ".cache" / "domino-ray")
        dest = root / "s3" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
        done = dest / ".domino-complete"
        dest.mkdir(parents=True, exist_ok=True)
        with open(dest.parent / f"{dest.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                if not self.list_files(uri):
                    raise StorageError(f"{uri}: nothing stored under this prefix (expected a model or adapter folder)")
                self.download_dir(uri, dest)
                done.write_text(uri)
        return str(dest)

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        yield from self.read_bytes(uri).splitlines()

    def arrow_table(self, uri: str) -> pa.Table:
        import pyarrow.parquet as pq

        fs, path = self.filesystem(uri)
        return pq.read_table(path, filesystem=fs)
