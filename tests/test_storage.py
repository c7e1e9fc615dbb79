"""Tests of domino_ray.storage on local paths and a real S3 endpoint on loopback, errors included.

The shared `s3_server` (moto, in-process) accepts any access key, so wrong credentials are tested
against a separate `moto_server` process started with INITIAL_NO_AUTH_ACTION_COUNT, which makes moto
check keys and signatures against its IAM users like real S3 does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from domino_ray.config import S3Config
from domino_ray.storage import Storage, StorageError, is_s3, join_uri, split_s3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ URIs
def test_uri_helpers():
    assert is_s3("s3://b/k") and not is_s3("/tmp/x")
    assert split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    assert split_s3("s3://bucket") == ("bucket", "")
    assert join_uri("s3://b/runs/", "r1", "/x.json") == "s3://b/runs/r1/x.json"
    assert join_uri("/tmp/runs", "r1", "x.json") == "/tmp/runs/r1/x.json"
    with pytest.raises(StorageError, match="no bucket"):
        split_s3("s3:///key")
    with pytest.raises(StorageError, match="not an s3:// URI"):
        split_s3("/local")


# --------------------------------------------------------------------------- same ops, both kinds
def test_read_write_exists_list_delete(store_root):
    storage, base = store_root
    storage.check_writable_root(base)
    a, b, c = join_uri(base, "a.txt"), join_uri(base, "sub", "b.json"), join_uri(base, "sub", "deep", "c.bin")
    assert not storage.exists(a)
    storage.write_text(a, "héllo\n")
    storage.write_json(b, {"x": [1, 2]})
    storage.write_bytes(c, bytes(range(256)))
    assert storage.exists(a) and storage.exists(join_uri(base, "sub"))
    assert storage.read_text(a) == "héllo\n"
    assert storage.read_json(b) == {"x": [1, 2]}
    assert storage.read_bytes(c) == bytes(range(256))
    assert list(storage.iter_lines(a)) == ["héllo".encode()]
    assert storage.list_files(base) == sorted([a, b, c])
    assert storage.list_files(base, suffix=".json") == [b]
    assert storage.list_files(join_uri(base, "absent")) == []
    storage.write_text(a, "replaced")  # overwrite in place
    assert storage.read_text(a) == "replaced"
    storage.delete(a)
    assert not storage.exists(a) and storage.list_files(base) == sorted([b, c])
    with pytest.raises(StorageError, match="file not found"):
        storage.read_bytes(a)


def test_upload_and_download_dir(store_root, tmp_path):
    storage, base = store_root
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "one.txt").write_text("1")
    (src / "nested" / "two.bin").write_bytes(b"\x00\x02")
    storage.upload_dir(src, join_uri(base, "copy"))
    assert storage.list_files(join_uri(base, "copy")) == [join_uri(base, "copy", "nested", "two.bin"),
                                                         join_uri(base, "copy", "one.txt")]
    out = storage.download_dir(join_uri(base, "copy"), tmp_path / "back")
    assert (out / "one.txt").read_text() == "1" and (out / "nested" / "two.bin").read_bytes() == b"\x00\x02"


def test_arrow_table_round_trip(store_root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage, base = store_root
    table = pa.table({"text": ["a", "b"], "n": [1, 2]})
    local = tmp_path / "t.parquet"
    pq.write_table(table, local)
    storage.write_bytes(join_uri(base, "t.parquet"), local.read_bytes())
    assert storage.arrow_table(join_uri(base, "t.parquet")).equals(table)


def test_local_write_leaves_no_temp_files(tmp_path):
    storage = Storage()
    storage.write_text(str(tmp_path / "d" / "f.txt"), "x")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.txt"]


def test_upload_dir_onto_itself_is_a_no_op(tmp_path):
    (tmp_path / "f.txt").write_text("keep")
    Storage().upload_dir(tmp_path, str(tmp_path))
    assert (tmp_path / "f.txt").read_text() == "keep"


# ---------------------------------------------------------------------------------------- errors
def test_unreachable_endpoint_is_a_clear_error():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = Storage(S3Config(endpoint_url=endpoint, access_key_id="k", secret_access_key="s", connect_timeout_s=1))
    with pytest.raises(StorageError, match=rf"s3://bkt/run: cannot reach the S3 endpoint {endpoint}.*storage.s3.endpoint_url"):
        storage.check_writable_root("s3://bkt/run")
    with pytest.raises(StorageError, match=rf"s3://bkt/x: cannot read: cannot reach the S3 endpoint {endpoint}"):
        storage.read_bytes("s3://bkt/x")
    with pytest.raises(StorageError, match=rf"cannot check existence: cannot reach the S3 endpoint {endpoint}"):
        storage.exists("s3://bkt/x")


@pytest.fixture
def hang_up_endpoint():
    """A loopback TCP server that accepts each connection and closes it at once, counting them: an
    endpoint that is there but never answers, where every attempt of a client can be counted."""
    server = socket.create_server(("127.0.0.1", 0))
    attempts = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            attempts.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", attempts
    server.close()


def test_an_endpoint_that_hangs_up_is_a_clear_error_after_few_attempts(hang_up_endpoint):
    # Fail fast: a few retries, not botocore's default of 5 (or a retry loop): each call below gives up
    # after at most 3 connections and names the endpoint.
    endpoint, attempts = hang_up_endpoint
    storage = Storage(S3Config(endpoint_url=endpoint, access_key_id="k", secret_access_key="s", connect_timeout_s=1))
    for call, what in ((lambda: storage.check_writable_root("s3://bkt/run"), "s3://bkt/run: cannot reach"),
                       (lambda: storage.read_bytes("s3://bkt/x"), "s3://bkt/x: cannot read: cannot reach"),
                       (lambda: storage.exists("s3://bkt/x"), "cannot check existence: cannot reach")):
        attempts.clear()
        with pytest.raises(StorageError, match=rf"{what} the S3 endpoint {endpoint}"):
            call()
        assert 1 <= len(attempts) <= 3, len(attempts)


def test_missing_bucket_is_a_clear_error(s3_server):
    storage = Storage(s3_server)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1:.*create it first"):
        storage.check_writable_root("s3://no-such-bucket/run")
    with pytest.raises(StorageError, match="cannot write: the bucket does not exist at http://127.0.0.1:.*create it first"):
        storage.write_text("s3://no-such-bucket/run/x.txt", "x")
    with pytest.raises(StorageError, match="file not found"):
        storage.read_bytes("s3://no-such-bucket/run/x.txt")


@pytest.fixture(scope="module")
def authenticating_s3():
    """A moto_server process that checks credentials; yields (endpoint, key id, secret) of its one user."""
    port = free_port()
    # The first 3 requests (IAM setup below) are let through; every later one is authenticated.
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        import boto3

        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="domino")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="domino", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="domino")["AccessKey"]
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wrong_credentials_are_a_clear_error(authenticating_s3):
    endpoint, key_id, secret = authenticating_s3
    good = Storage(S3Config(endpoint_url=endpoint, access_key_id=key_id, secret_access_key=secret))
    good.boto3_client.create_bucket(Bucket="secured")
    good.write_text("s3://secured/run/ok.txt", "ok")  # the right key works, so the refusals below are about keys
    assert good.read_text("s3://secured/run/ok.txt") == "ok"
    for bad_id, bad_secret in (("AKIAWRONGKEY", "wrong"), (key_id, "wrong-secret")):
        bad = Storage(S3Config(endpoint_url=endpoint, access_key_id=bad_id, secret_access_key=bad_secret))
        with pytest.raises(StorageError, match="S3 refused the credentials for bucket 'secured'.*check the access key"):
            bad.check_writable_root("s3://secured/run")
        with pytest.raises(StorageError, match="cannot read: S3 at .* refused the credentials"):
            bad.read_bytes("s3://secured/run/ok.txt")


def test_a_named_profile_from_the_aws_files_is_used_by_both_clients(authenticating_s3, tmp_path, monkeypatch):
    """storage.s3.profile: keys come from a real ~/.aws/credentials profile (in a temp HOME), for boto3
    and for pyarrow alike, against a server that checks them; a profile with a wrong secret is refused."""
    endpoint, key_id, secret = authenticating_s3
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[domino-test]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n\n"
        f"[domino-wrong]\naws_access_key_id = {key_id}\naws_secret_access_key = not-the-secret\n")
    (home / ".aws" / "config").write_text("[profile domino-test]\nregion = us-east-1\n")
    monkeypatch.setenv("HOME", str(home))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)

    storage = Storage(S3Config(endpoint_url=endpoint, profile="domino-test"))
    storage.boto3_client.create_bucket(Bucket="profiled")
    storage.check_writable_root("s3://profiled/run")
    storage.write_text("s3://profiled/run/a.txt", "through pyarrow")  # pyarrow gets the profile's keys
    assert storage.boto3_client.get_object(Bucket="profiled", Key="run/a.txt")["Body"].read() == b"through pyarrow"
    assert storage.read_text("s3://profiled/run/a.txt") == "through pyarrow"

    wrong = Storage(S3Config(endpoint_url=endpoint, profile="domino-wrong"))
    with pytest.raises(StorageError, match="S3 refused the credentials for bucket 'profiled'"):
        wrong.check_writable_root("s3://profiled/run")
    with pytest.raises(StorageError, match="cannot read: S3 at .* refused the credentials"):
        wrong.read_bytes("s3://profiled/run/a.txt")


# ------------------------------------------------------------------------------- atomic writes
def _objects(storage: Storage, bucket: str) -> list[str]:
    return [o["Key"] for o in storage.boto3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.parametrize("size_mib", [1, 11])  # one plain PUT; a multipart upload of three 5 MiB parts
def test_an_exception_mid_write_leaves_no_s3_object_and_no_upload(s3_server, s3_bucket, size_mib):
    storage = Storage(s3_server, part_size=5 * 1024 * 1024)
    uri = f"s3://{s3_bucket}/runs/r/export.jsonl"
    chunk = b"x" * (1024 * 1024)
    with pytest.raises(RuntimeError, match="mid-write"):
        with storage.open_atomic(uri) as f:
            for _ in range(size_mib):
                f.write(chunk)
            raise RuntimeError("mid-write")
    assert _objects(storage, s3_bucket) == []
    assert not storage.boto3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    # the same writes without the exception publish every byte, in order
    with storage.open_atomic(uri) as f:
        for i in range(size_mib):
            f.write(bytes([65 + i]) * (1024 * 1024))
        f.write(b"end")
    body = storage.read_bytes(uri)
    assert len(body) == size_mib * 1024 * 1024 + 3 and body.endswith(b"end")
    assert body[:1] == b"A" and body[-(1024 * 1024) - 3:-(1024 * 1024) - 2] == bytes([65 + size_mib - 1])


def test_writes_of_any_size_land_in_order_across_parts(s3_server, s3_bucket):
    import hashlib

    storage = Storage(s3_server, part_size=5 * 1024 * 1024)
    uri = f"s3://{s3_bucket}/runs/r/model.safetensors"
    pieces = [os.urandom(n) for n in (3, 1024 * 1024, 11 * 1024 * 1024 + 7, 0, 4 * 1024 * 1024, 5)]
    with storage.open_atomic(uri) as f:
        for p in pieces:
            f.write(p)
    expected = b"".join(pieces)
    body = storage.read_bytes(uri)
    assert len(body) == len(expected) and hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()


def test_a_failed_s3_write_keeps_the_old_object(s3_server, s3_bucket):
    storage = Storage(s3_server)
    uri = f"s3://{s3_bucket}/runs/r/manifest.json"
    storage.write_bytes(uri, b"old")
    with pytest.raises(ValueError):
        with storage.open_atomic(uri) as f:
            f.write(b"new but")
            raise ValueError("half")
    assert storage.read_bytes(uri) == b"old"


def test_parquet_streams_into_an_atomic_s3_upload(s3_server, s3_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    storage = Storage(s3_server)
    uri = f"s3://{s3_bucket}/runs/r/eval/base/results.parquet"
    table = pa.table({"a": list(range(100)), "b": [str(i) for i in range(100)]})
    with storage.open_atomic(uri) as f:
        pq.write_table(table, f)
    assert storage.arrow_table(uri).equals(table)


def test_a_failed_local_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    storage = Storage()
    target = tmp_path / "run" / "manifest.json"
    storage.write_bytes(str(target), b"old")
    with pytest.raises(KeyboardInterrupt):
        with storage.open_atomic(str(target)) as f:
            f.write(b"new but")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]


def test_a_local_write_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    # What a crash could lose cannot be observed here, so this pins the order of the durable steps.
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b))[1])
    Storage().write_bytes(str(tmp_path / "a" / "x.bin"), b"data")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"data"


def test_storage_pickles_after_its_clients_were_built(s3_server, s3_bucket):
    import pickle

    storage = Storage(s3_server, part_size=6 * 1024 * 1024)
    storage.write_bytes(f"s3://{s3_bucket}/k", b"v")  # builds the boto3 client, which does not pickle
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.part_size == 6 * 1024 * 1024 and copy.read_bytes(f"s3://{s3_bucket}/k") == b"v"
