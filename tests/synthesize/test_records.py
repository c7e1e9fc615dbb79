"""Rows from Ray Data batches -> the record schemas; whole-object Parquet writes."""

import math

import numpy as np
import pyarrow as pa
import pytest

from domino_ray import schema
from domino_ray.storage import Storage
from domino_ray.synthesize.records import batch_to_rows, read_table, rows_to_batch, rows_to_table, utc_now, write_table


def test_numpy_batches_round_trip_with_nulls():
    batch = {"seed_index": np.array([0, 1]), "draft": np.array(["a", None], dtype=object),
             "draft_tokens": np.array([3.0, math.nan]), "syntax_ok": np.array([True, None], dtype=object)}
    rows = batch_to_rows(batch)
    assert rows == [{"seed_index": 0, "draft": "a", "draft_tokens": 3.0, "syntax_ok": True},
                    {"seed_index": 1, "draft": None, "draft_tokens": None, "syntax_ok": None}]
    assert type(rows[0]["seed_index"]) is int
    back = rows_to_batch(rows, ["seed_index", "draft"])
    assert back["draft"].dtype == object and back["draft"].tolist() == ["a", None]


def test_rows_to_table_matches_the_record_schema_exactly():
    rows = [dict(schema.empty_record("r", 0), draft="x", draft_tokens=4.0, judge_score=np.float64(7),
                 accepted=np.bool_(True), created_at=utc_now()),
            dict(schema.empty_record("r", 1), draft_tokens=math.nan, unknown_extra="ignored")]
    table = rows_to_table(rows, schema.RECORD_SCHEMA)
    assert table.schema.equals(schema.RECORD_SCHEMA)
    assert table.column("draft_tokens").to_pylist() == [4, None]
    assert table.column("id").to_pylist() == [schema.sample_id("r", 0), schema.sample_id("r", 1)]
    schema.validate_records(table)


def test_rows_to_table_names_the_bad_column():
    with pytest.raises(ValueError, match="draft_tokens"):
        rows_to_table([dict(schema.empty_record("r", 0), draft_tokens="many")], schema.RECORD_SCHEMA)


def test_unknown_reject_reason_is_refused():
    row = dict(schema.empty_record("r", 0), reject_reason="bad_vibes")
    with pytest.raises(ValueError, match="bad_vibes"):
        schema.validate_records(rows_to_table([row], schema.RECORD_SCHEMA))


def test_work_schema_extends_the_record_schema():
    assert schema.SYNTH_WORK_SCHEMA.names[:len(schema.RECORD_SCHEMA)] == schema.RECORD_SCHEMA.names
    assert "minhash" in schema.SYNTH_WORK_SCHEMA.names and "block" in schema.SYNTH_WORK_SCHEMA.names


def test_write_table_local_is_atomic_and_readable(tmp_path):
    storage = Storage()
    table = rows_to_table([schema.empty_record("r", i) for i in range(3)], schema.RECORD_SCHEMA)
    uri = str(tmp_path / "a" / "part-000000.parquet")
    write_table(storage, uri, table)
    assert read_table(storage, uri).equals(table)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["part-000000.parquet"]  # no temp file left


def test_write_table_s3(s3_server, s3_bucket):
    storage = Storage(s3_server)
    table = rows_to_table([schema.empty_record("r", 0)], schema.RECORD_SCHEMA)
    uri = f"s3://{s3_bucket}/x/part-000000.parquet"
    write_table(storage, uri, table)
    assert read_table(storage, uri, columns=["seed_index"]).column(0).to_pylist() == [0]
    assert pa.types.is_string(read_table(storage, uri).schema.field("id").type)
