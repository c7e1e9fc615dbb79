"""Rows <-> Arrow tables of the record schemas, and whole-object Parquet writes. No Ray.

Ray Data hands batches over as numpy arrays: integers with nulls arrive as float NaN, strings as
object arrays. `rows_to_table` turns such rows back into the exact types of `schema.RECORD_SCHEMA` /
`schema.SYNTH_WORK_SCHEMA`, so every block file has the same schema whatever its nulls.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from domino_ray.storage import Storage

__all__ = ["batch_to_rows", "rows_to_batch", "rows_to_table", "table_to_parquet_bytes", "write_table",
           "read_table", "utc_now"]


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN -> None (Ray Data's null for numeric columns)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def batch_to_rows(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data numpy batch as a list of row dicts with plain Python values."""
    names = list(batch)
    if not names:
        return []
    n = len(batch[names[0]])
    cols = {k: batch[k].tolist() if isinstance(batch[k], np.ndarray) else list(batch[k]) for k in names}
    return [{k: _plain(cols[k][i]) for k in names} for i in range(n)]


def rows_to_batch(rows: Sequence[Mapping[str, Any]], columns: Iterable[str]) -> dict[str, np.ndarray]:
    """Row dicts as a numpy batch; every column an object array so None survives unchanged."""
    out = {}
    for name in columns:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r.get(name) for r in rows]
        out[name] = arr
    return out


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table of exactly `schema` (missing keys are null; extra keys are ignored)."""
    arrays = []
    for field in schema:
        values = [_plain(r.get(field.name)) for r in rows]
        try:
            if pa.types.is_integer(field.type):
                values = [None if v is None else int(v) for v in values]
            elif pa.types.is_boolean(field.type):
                values = [None if v is None else bool(v) for v in values]
            elif pa.types.is_floating(field.type):
                values = [None if v is None else float(v) for v in values]
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            raise ValueError(f"column {field.name!r}: cannot store {values[:3]!r}... as {field.type} ({e})") from e
    return pa.Table.from_arrays(arrays, schema=schema)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_table(storage: Storage, uri: str, table: pa.Table) -> None:
    """One whole object: local temp file + rename, S3 one upload; a reader never sees half a file."""
    storage.write_bytes(uri, table_to_parquet_bytes(table))


def read_table(storage: Storage, uri: str, columns: Sequence[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=list(columns) if columns else None)
