"""`domino export`: accepted records -> chat JSONL / alpaca, local and S3."""

import json

import pytest

from domino_ray.cli import main
from domino_ray.storage import Storage, join_uri
from domino_ray.synthesize.export import export_records
from tests.synthesize.test_finalize import make_rows, run, write_work


@pytest.fixture
def run_root(tmp_path, ray_cluster):  # the final pass runs on Ray
    storage, root = Storage(), str(tmp_path / "run")
    rows = make_rows()
    for r in rows:
        r["response"] = f"```python\ndef solve_{r['seed_index']}():\n    return {r['seed_index']}\n```"
    rows[6]["response"] = None  # accepted (respond off for this row) but nothing to pair with
    write_work(storage, join_uri(root, "synth", "work"), rows)
    run(storage, join_uri(root, "synth"))
    return root


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_chat_jsonl(run_root, tmp_path):
    out = tmp_path / "out" / "chat.jsonl"
    n = export_records(run_root, "chat-jsonl", str(out))
    lines = read_jsonl(out)
    assert n == len(lines) == 4  # accepted seeds 0, 2, 4, 7; seed 6 has no response
    assert lines[0]["messages"][0] == {"role": "user", "content": make_rows()[0]["draft"]}
    assert lines[0]["messages"][1]["role"] == "assistant"
    assert "def solve_0()" in lines[0]["messages"][1]["content"]
    assert [m["messages"][1]["content"].split("solve_")[1][0] for m in lines] == ["0", "2", "4", "7"]
    assert not list((tmp_path / "out").glob("*.tmp-*"))


def test_alpaca_through_the_cli(run_root, tmp_path, capsys):
    out = tmp_path / "alpaca.jsonl"
    assert main(["export", "--run", run_root, "--format", "alpaca", "--out", str(out)]) == 0
    lines = read_jsonl(out)
    assert set(lines[0]) == {"instruction", "input", "output"} and lines[0]["input"] == ""
    assert "wrote 4 accepted records" in capsys.readouterr().out


def test_export_to_s3(run_root, s3_server, s3_bucket, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    s3 = s3_server.model_dump()
    cfg.write_text(json.dumps({"storage": {"s3": s3}}))  # JSON is YAML
    n = export_records(run_root, "chat-jsonl", f"s3://{s3_bucket}/exports/chat.jsonl", config_path=str(cfg))
    body = Storage(s3_server).boto3_client.get_object(Bucket=s3_bucket, Key="exports/chat.jsonl")["Body"].read()
    assert n == 4 and len(body.decode().splitlines()) == 4


def test_errors(run_root, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        export_records(run_root, "sharegpt", str(tmp_path / "x.jsonl"))
    with pytest.raises(FileNotFoundError, match="domino synthesize"):
        export_records(str(tmp_path / "nothing"), "alpaca", str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()


def test_an_error_mid_export_to_s3_leaves_no_object(run_root, s3_server, s3_bucket, tmp_path, monkeypatch):
    import domino_ray.synthesize.export as export

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({"storage": {"s3": s3_server.model_dump()}}))
    real, calls = export.format_record, []

    def fail_on_the_third(row, fmt):  # two lines are already in the upload when this raises
        calls.append(row["seed_index"])
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(row, fmt)

    monkeypatch.setattr(export, "format_record", fail_on_the_third)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_records(run_root, "chat-jsonl", f"s3://{s3_bucket}/exports/chat.jsonl", config_path=str(cfg))
    client = Storage(s3_server).boto3_client
    assert len(calls) == 3
    assert client.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
