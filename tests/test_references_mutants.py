"""references.py edges `make mutants` scores as `references`: the set's hash format, the held-out split
(hash order), the length fit, duplicates, text checks, origin names, marker files and the stats of a
loaded set. Local files in tmp_path; expected values by hand or from hashlib / the tokenizer directly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from domino_ray.config import ReferencesConfig
from domino_ray.references import (ReferenceError, _check_text, _drop_duplicates, _fit_length, _short_name,
                                   load_references, read_reference_split, read_reference_texts, reference_sha256,
                                   split_holdout)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# --------------------------------------------------------------------------------------- the hash
def test_set_hash_is_sha256_of_8_byte_little_endian_lengths_and_utf8_texts():
    texts = ["ab", "é", ""]
    h = hashlib.sha256()
    for t in texts:
        blob = t.encode("utf-8")
        h.update(len(blob).to_bytes(8, "little") + blob)
    assert reference_sha256(texts) == h.hexdigest()
    assert reference_sha256([]) == hashlib.sha256().hexdigest()


# --------------------------------------------------------------------------------------- holdout
def test_holdout_takes_the_smallest_text_hashes_and_keeps_input_order():
    pairs = [(t, f"f:{i}") for i, t in enumerate(["alpha", "beta", "gamma", "delta", "eps"], start=1)]
    by_hash = sorted(pairs, key=lambda p: _sha(p[0]))
    kept, held = split_holdout(pairs, 2)
    assert held == [p for p in pairs if p in by_hash[:2]]  # the two smallest hashes, in input order
    assert kept == [p for p in pairs if p not in by_hash[:2]]
    assert split_holdout(pairs, 0) == (pairs, []) and split_holdout(pairs, -1) == (pairs, [])
    assert len(split_holdout(pairs, 3)[0]) == 2  # two left for learn is enough


def test_holdout_must_leave_two_samples():
    pairs = [("a", "x:1"), ("b", "x:2"), ("c", "x:3")]
    with pytest.raises(ReferenceError) as err:
        split_holdout(pairs, 2, source="refs.jsonl")
    assert str(err.value) == ("references.holdout=2 leaves 1 of the 3 distinct samples of refs.jsonl for learn; at least "
                              "2 must stay: lower references.holdout or add references")
    with pytest.raises(ReferenceError, match=r"^references.holdout=9 leaves -6 of the 3 distinct samples of references "):
        split_holdout(pairs, 9)


def test_reference_split_deduplicates_then_holds_out(tmp_path):
    texts = ["one", "two", "one", "three", "four"]
    src = write_jsonl(tmp_path / "refs.jsonl", texts)
    distinct = ["one", "two", "three", "four"]
    smallest = min(distinct, key=_sha)
    train, held = read_reference_split(ReferencesConfig(source=str(src), holdout=1))
    assert held == [smallest] and train == [t for t in distinct if t != smallest]
    assert read_reference_split(ReferencesConfig(source=str(src))) == (distinct, [])
    other = write_jsonl(tmp_path / "other.jsonl", [json.dumps("x")])
    other.write_text(json.dumps({"body": "p"}) + "\n" + json.dumps({"body": "q"}) + "\n")
    assert read_reference_split(ReferencesConfig(source=str(other), text_field="body")) == (["p", "q"], [])


# ----------------------------------------------------------------------------------------- length
def test_fit_length_keeps_eos_last():
    cfg = ReferencesConfig(max_tokens=8)
    assert _fit_length([1] * 7, 0, "f:1", cfg) == ([1] * 7 + [0], False)  # 8 with EOS: fits exactly
    assert _fit_length(list(range(1, 9)), 0, "f:1", cfg) == ([1, 2, 3, 4, 5, 6, 7, 0], True)
    with pytest.raises(ReferenceError) as err:
        _fit_length([1] * 8, 0, "f:4", ReferencesConfig(max_tokens=8, overlong="reject"))
    assert str(err.value) == ("f:4: sample is 9 tokens (EOS included), over references.max_tokens=8; raise max_tokens, "
                              "shorten the sample, or set references.overlong: truncate")
    assert _fit_length([1] * 7, 0, "f:1", ReferencesConfig(max_tokens=8, overlong="reject")) == ([1] * 7 + [0], False)


# ------------------------------------------------------------------------------------ duplicates
def test_duplicates_keep_the_first_and_name_it():
    pairs = [("a", "x:1"), ("b", "x:2"), ("a", "x:3"), ("a", "y:1"), ("b", "y:2")]
    kept, notes = _drop_duplicates(pairs)
    assert kept == [("a", "x:1"), ("b", "x:2")]
    assert notes == ["x:3 = x:1", "y:1 = x:1", "y:2 = x:2"]


# ---------------------------------------------------------------------------------------- checks
def test_text_checks_name_the_location_and_field():
    assert _check_text(" x ", "f:1", "text") == " x "
    with pytest.raises(ReferenceError) as err:
        _check_text(list(range(30)), "f:2", "body")
    assert str(err.value) == ("f:2: field 'body' is list ('[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1'), not a string; "
                              "store the sample text as a string")
    with pytest.raises(ReferenceError) as err:
        _check_text(" \n\t", "f:3", "text")
    assert str(err.value) == "f:3: field 'text' is empty or whitespace only; remove the record"


def test_missing_field_lists_the_keys(tmp_path):
    src = tmp_path / "refs.jsonl"
    src.write_text(json.dumps({"b": 1, "a": 2}) + "\n")
    with pytest.raises(ReferenceError) as err:
        read_reference_texts(str(src))
    assert str(err.value) == f"{src}:1: missing field 'text' (keys: a, b); set references.text_field"
    src.write_text("{}\n")
    with pytest.raises(ReferenceError, match=r"missing field 'text' \(keys: none\)"):
        read_reference_texts(str(src))


# --------------------------------------------------------------------------------------- origins
def test_origin_names():
    assert _short_name("/data/refs/a.jsonl", "/data/refs/a.jsonl") == "a.jsonl"
    assert _short_name("/data/refs/sub/a.jsonl", "/data/refs") == "sub/a.jsonl"
    assert _short_name("s3://bucket/refs/sub/a.jsonl", "s3://bucket/refs/") == "sub/a.jsonl"
    assert _short_name("s3://bucket/refs/a.jsonl", "s3://bucket/refs") == "a.jsonl"
    assert _short_name("s3://bucket/refs/", "s3://bucket/refs/") == "refs"


def test_marker_files_and_folders_are_not_data(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["kept a"])
    write_jsonl(tmp_path / "sub" / "b.jsonl", ["kept b"])
    write_jsonl(tmp_path / ".hidden.jsonl", ["no"])
    write_jsonl(tmp_path / "_tmp.jsonl", ["no"])
    write_jsonl(tmp_path / ".ipynb_checkpoints" / "c.jsonl", ["no"])
    write_jsonl(tmp_path / "sub" / "_staging" / "d.jsonl", ["no"])
    (tmp_path / "_SUCCESS").write_text("")
    assert read_reference_texts(str(tmp_path)) == [("kept a", "a.jsonl:1"), ("kept b", "sub/b.jsonl:1")]


def test_a_folder_of_other_files_says_how_many(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(ReferenceError) as err:
        read_reference_texts(str(tmp_path))
    assert str(err.value) == (f"{tmp_path}: empty input: the folder has no .jsonl or .parquet files (2 other file(s)); "
                              f"point references.source at your reference files")
    with pytest.raises(ReferenceError) as err:
        read_reference_texts(str(tmp_path / "notes.txt"))
    assert str(err.value) == f"{tmp_path / 'notes.txt'}: unsupported reference file type; use one of .jsonl, .parquet"
    with pytest.raises(ReferenceError) as err:
        read_reference_texts(str(tmp_path / "nope"))
    assert str(err.value) == f"references.source {str(tmp_path / 'nope')!r}: no such file or folder"


# ------------------------------------------------------------------------------------- the stats
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from domino_ray.backbone import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_loaded_set_stats_by_hand(tmp_path, tokenizer):
    long = "value = [" + ", ".join(str(i) for i in range(100)) + "]\n"
    texts = ["def a():\n    return 1\n", "x = 2\n", "def a():\n    return 1\n", long, "y = [3]\n"]
    src = write_jsonl(tmp_path / "refs.jsonl", texts)
    cfg = ReferencesConfig(source=str(src), max_tokens=12, holdout=1)
    refs = load_references(cfg, tokenizer)
    distinct = [texts[0], texts[1], texts[3], texts[4]]
    held = min(distinct, key=_sha)
    kept = [t for t in distinct if t != held]
    eos = tokenizer.eos_token_id
    expected = [(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for t in kept]
    expected = [ids if len(ids) <= 12 else ids[:11] + [eos] for ids in expected]
    lengths = [len(ids) for ids in expected]
    assert refs.texts == kept and refs.token_ids == expected and len(refs) == 3
    assert refs.origins == [f"refs.jsonl:{texts.index(t) + 1}" for t in kept]
    assert refs.sha256 == reference_sha256(kept)
    assert refs.stats == {"source": str(src), "read": 5, "duplicates_dropped": 1, "held_out": 1,
                          "truncated": int(long in kept), "samples": 3, "tokens_total": sum(lengths),
                          "tokens_max": max(lengths), "tokens_mean": round(sum(lengths) / 3, 1), "max_tokens": 12}


def test_a_tokenizer_without_eos_is_refused(tmp_path, tiny_model_dir):
    from domino_ray.backbone import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))  # its own copy: the EOS is removed below
    tok.eos_token = None
    assert tok.eos_token_id is None
    src = write_jsonl(tmp_path / "refs.jsonl", ["a = 1\n"])
    with pytest.raises(ReferenceError) as err:
        load_references(ReferencesConfig(source=str(src)), tok)
    assert str(err.value) == "the backbone tokenizer has no EOS token; samples need one to learn where text ends"


def test_reference_split_names_its_source_when_the_holdout_is_too_large(tmp_path):
    src = write_jsonl(tmp_path / "refs.jsonl", ["a", "b", "c"])
    with pytest.raises(ReferenceError) as err:
        read_reference_split(ReferencesConfig(source=str(src), holdout=2))
    assert str(err.value) == (f"references.holdout=2 leaves 1 of the 3 distinct samples of {src} for learn; at least "
                              f"2 must stay: lower references.holdout or add references")


def test_reference_split_reads_through_the_given_storage(tmp_path, s3_server, s3_bucket):
    """An S3 source is read with the storage given (its endpoint), not a default one."""
    from domino_ray.storage import Storage

    write_jsonl(tmp_path / "refs" / "a.jsonl", ["one", "two", "one"])
    storage = Storage(s3_server)
    storage.upload_dir(tmp_path / "refs", f"s3://{s3_bucket}/refs")
    assert read_reference_split(ReferencesConfig(source=f"s3://{s3_bucket}/refs"), storage) == (["one", "two"], [])
