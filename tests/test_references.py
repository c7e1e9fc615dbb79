"""Tests of domino_ray.references: sources, every input error with file:line, truncation, dedup, hashing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domino_ray.config import ReferencesConfig
from domino_ray.references import ReferenceError, load_references, read_reference_texts, reference_sha256
from domino_ray.storage import Storage

SAMPLES = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n", "class Stack:\n    pass\n"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from domino_ray.backbone import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def write_jsonl(path: Path, rows: list, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: r, "id": i}) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: rows}), path)
    return path


def refs_cfg(source, **kw) -> ReferencesConfig:
    return ReferencesConfig(source=str(source), **kw)


# ------------------------------------------------------------------------------------ happy paths
def test_jsonl_tokens_end_with_eos_and_have_no_bos(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "refs.jsonl", SAMPLES)
    refs = load_references(refs_cfg(src), tokenizer)
    assert refs.texts == SAMPLES
    assert refs.origins == ["refs.jsonl:1", "refs.jsonl:2", "refs.jsonl:3"]
    for text, ids in zip(refs.texts, refs.token_ids):
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert refs.stats["read"] == 3 and refs.stats["samples"] == 3
    assert refs.stats["tokens_total"] == sum(map(len, refs.token_ids))


def test_text_field_selects_key(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "refs.jsonl", SAMPLES, field="problem")
    assert load_references(refs_cfg(src, text_field="problem"), tokenizer).texts == SAMPLES


def test_blank_lines_and_utf8_bom_are_accepted(tmp_path):
    src = tmp_path / "refs.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a = 1"}\n\n{"text": "b = 2"}\n\n')
    assert read_reference_texts(str(src)) == [("a = 1", "refs.jsonl:1"), ("b = 2", "refs.jsonl:3")]


def test_folder_of_mixed_jsonl_and_parquet_is_read_sorted_and_recursive(tmp_path):
    write_parquet(tmp_path / "b.parquet", ["p1", "p2"])
    write_jsonl(tmp_path / "a.jsonl", ["j1"])
    write_jsonl(tmp_path / "sub" / "c.jsonl", ["nested"])
    (tmp_path / "README.md").write_text("not data")
    write_jsonl(tmp_path / "_tmp" / "skip.jsonl", ["tool marker folder"])
    write_jsonl(tmp_path / ".hidden.jsonl", ["hidden"])
    pairs = read_reference_texts(str(tmp_path))
    assert pairs == [("j1", "a.jsonl:1"), ("p1", "b.parquet:1"), ("p2", "b.parquet:2"), ("nested", "sub/c.jsonl:1")]


def test_humaneval_slice_gives_prompts(tokenizer):
    from domino_ray.evaluate.benchmarks import load_benchmark

    refs = load_references(refs_cfg("humaneval:2:5"), tokenizer)
    problems = load_benchmark("humaneval:2:5")
    assert refs.texts == [p.prompt for p in problems]
    assert refs.origins == ["HumanEval/2", "HumanEval/3", "HumanEval/4"]


def test_bad_benchmark_slice_is_a_reference_error():
    with pytest.raises(ReferenceError, match="humaneval:x:y"):
        read_reference_texts("humaneval:x:y")


def test_s3_source_matches_local(tmp_path, tokenizer, s3_server, s3_bucket):
    write_jsonl(tmp_path / "refs" / "a.jsonl", SAMPLES[:2])
    write_parquet(tmp_path / "refs" / "b.parquet", SAMPLES[2:])
    storage = Storage(s3_server)
    storage.upload_dir(tmp_path / "refs", f"s3://{s3_bucket}/refs")
    remote = load_references(refs_cfg(f"s3://{s3_bucket}/refs"), tokenizer, storage)
    local = load_references(refs_cfg(tmp_path / "refs"), tokenizer)
    assert remote.texts == local.texts == SAMPLES
    assert remote.origins == local.origins == ["a.jsonl:1", "a.jsonl:2", "b.parquet:1"]
    assert remote.sha256 == local.sha256
    single = read_reference_texts(f"s3://{s3_bucket}/refs/a.jsonl", storage=storage)
    assert single == [(SAMPLES[0], "a.jsonl:1"), (SAMPLES[1], "a.jsonl:2")]


# ----------------------------------------------------------------------------- errors: file:line
def _jsonl_bytes(tmp_path: Path, lines: list[bytes]) -> Path:
    src = tmp_path / "refs.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    return src


GOOD = b'{"text": "x = 1"}'


@pytest.mark.parametrize(
    "lines, where, what",
    [
        ([GOOD, b'{"body": "x", "id": 3}'], ":2", r"missing field 'text' \(keys: body, id\)"),
        ([GOOD, GOOD, b'{"text": "caf\xe9"}'], ":3", "not valid UTF-8"),
        ([GOOD, b'{"text": "x"'], ":2", "invalid JSON"),
        ([b'{"text": ""}'], ":1", "empty or whitespace only"),
        ([GOOD, b'{"text": "  \\n\\t "}'], ":2", "empty or whitespace only"),
        ([GOOD, b'{"text": 42}'], ":2", "is int .* not a string"),
        ([b'{"text": null}'], ":1", "is NoneType .* not a string"),
        ([b'["text"]'], ":1", "expected a JSON object"),
    ],
    ids=["missing-field", "non-utf8", "invalid-json", "empty-text", "whitespace-text", "int-text", "null-text", "not-object"],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, where, what):
    src = _jsonl_bytes(tmp_path, lines)
    with pytest.raises(ReferenceError, match=what) as err:
        read_reference_texts(str(src))
    assert f"{src}{where}:" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_empty_jsonl_file_is_an_error(tmp_path, content):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(content)
    with pytest.raises(ReferenceError, match=re.escape(f"{src}: empty input: the file has no records")):
        read_reference_texts(str(src))


def test_empty_file_inside_a_folder_is_named(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["ok"])
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(ReferenceError, match=re.escape(f"{tmp_path / 'b.jsonl'}: empty input")):
        read_reference_texts(str(tmp_path))


def test_folder_without_data_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReferenceError, match=r"empty input: the folder has no \.jsonl or \.parquet files \(1 other"):
        read_reference_texts(str(tmp_path))


def test_missing_source_and_unsupported_type(tmp_path):
    with pytest.raises(ReferenceError, match="no such file or folder"):
        read_reference_texts(str(tmp_path / "nope.jsonl"))
    (tmp_path / "refs.csv").write_text("text\nx\n")
    with pytest.raises(ReferenceError, match=r"refs.csv: unsupported reference file type"):
        read_reference_texts(str(tmp_path / "refs.csv"))


def test_parquet_errors_name_file_and_row(tmp_path):
    missing = write_parquet(tmp_path / "m.parquet", ["a"], field="body")
    with pytest.raises(ReferenceError, match=re.escape(f"{missing}: missing column 'text' (columns: body)")):
        read_reference_texts(str(missing))
    nulls = write_parquet(tmp_path / "n.parquet", ["a", None])
    with pytest.raises(ReferenceError, match=re.escape(f"{nulls}:2: field 'text' is NoneType")):
        read_reference_texts(str(nulls))
    numbers = write_parquet(tmp_path / "i.parquet", [1, 2])
    with pytest.raises(ReferenceError, match=re.escape(f"{numbers}:1: field 'text' is int")):
        read_reference_texts(str(numbers))
    blank = write_parquet(tmp_path / "b.parquet", ["a", "b", "   "])
    with pytest.raises(ReferenceError, match=re.escape(f"{blank}:3: field 'text' is empty")):
        read_reference_texts(str(blank))
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(ReferenceError, match=re.escape(f"{empty}: empty input")):
        read_reference_texts(str(empty))
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    with pytest.raises(ReferenceError, match=re.escape(f"{corrupt}: cannot read as Parquet")):
        read_reference_texts(str(corrupt))


# ------------------------------------------------------------------- overlong, duplicates, hashing
def test_overlong_samples_are_truncated_and_counted(tmp_path, tokenizer):
    long_text = "value = [" + ", ".join(str(i) for i in range(200)) + "]\n"
    src = write_jsonl(tmp_path / "refs.jsonl", [SAMPLES[0], long_text, long_text + "# 2\n"])
    cfg = refs_cfg(src, max_tokens=16)
    refs = load_references(cfg, tokenizer)
    eos = tokenizer.eos_token_id
    full = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert refs.stats["truncated"] == 2
    assert all(len(ids) <= 16 and ids[-1] == eos for ids in refs.token_ids)
    assert refs.token_ids[1] == full[:15] + [eos]
    assert refs.texts[1] == long_text  # the text is kept whole; only the tokens are cut


def test_overlong_samples_rejected_name_file_line_and_length(tmp_path, tokenizer):
    long_text = "value = [" + ", ".join(str(i) for i in range(200)) + "]\n"
    src = write_jsonl(tmp_path / "refs.jsonl", [SAMPLES[0], long_text])
    n = len(tokenizer(long_text, add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(ReferenceError, match=rf"refs.jsonl:2: sample is {n} tokens \(EOS included\), over references.max_tokens=16"):
        load_references(refs_cfg(src, max_tokens=16, overlong="reject"), tokenizer)


def test_sample_of_exactly_max_tokens_is_kept_whole(tmp_path, tokenizer):
    n = len(tokenizer(SAMPLES[0], add_special_tokens=False)["input_ids"]) + 1
    src = write_jsonl(tmp_path / "refs.jsonl", [SAMPLES[0]])
    refs = load_references(refs_cfg(src, max_tokens=max(8, n), overlong="reject"), tokenizer)
    assert refs.stats["truncated"] == 0 and len(refs.token_ids[0]) == n


def test_exact_duplicates_are_counted_and_first_kept(tmp_path, tokenizer, caplog):
    write_jsonl(tmp_path / "a.jsonl", [SAMPLES[0], SAMPLES[1], SAMPLES[0]])
    write_jsonl(tmp_path / "b.jsonl", [SAMPLES[1], SAMPLES[2]])
    with caplog.at_level("WARNING", logger="domino_ray.references"):
        refs = load_references(refs_cfg(tmp_path), tokenizer)
    assert refs.texts == SAMPLES
    assert refs.origins == ["a.jsonl:1", "a.jsonl:2", "b.jsonl:2"]
    assert refs.stats["read"] == 5 and refs.stats["duplicates_dropped"] == 2
    assert "a.jsonl:3 = a.jsonl:1" in caplog.text and "b.jsonl:1 = a.jsonl:2" in caplog.text


def test_hash_is_stable_and_order_sensitive(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "refs.jsonl", SAMPLES)
    first = load_references(refs_cfg(src), tokenizer).sha256
    assert first == load_references(refs_cfg(src), tokenizer).sha256 == reference_sha256(SAMPLES)
    rev = write_jsonl(tmp_path / "rev.jsonl", SAMPLES[::-1])
    assert load_references(refs_cfg(rev), tokenizer).sha256 != first
    assert reference_sha256(["ab", "c"]) != reference_sha256(["a", "bc"])  # boundaries count
    assert len(first) == 64


def test_reference_error_is_a_value_error():
    assert issubclass(ReferenceError, ValueError)
