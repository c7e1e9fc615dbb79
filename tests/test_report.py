"""`domino report`: embeddings on the real tiny backbone, reports built from run folders in the formats
the jobs write (constructed here with known answers, local and on loopback S3), a comparison of two
runs, and the HTML opened in headless Chromium to check that its plots decode and its tables render."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domino_ray.config import config_from_dict
from domino_ray.schema import EVAL_RESULT_SCHEMA, RECORD_SCHEMA, empty_record

# ------------------------------------------------------------------------------------ constructed runs
_NAMES = ["add", "scale", "clamp", "mean", "median", "count_vowels", "is_palindrome", "fizzbuzz",
          "flatten", "chunk", "transpose", "running_sum"]
_HELDOUT_NAMES = ["rotate", "dedupe", "interleave", "histogram", "argmax"]
_NOVEL_NAMES = ["merge_intervals", "parse_csv_line", "gcd", "word_lengths", "title_case", "is_prime"]


def _function(name: str, i: int) -> str:
    """A distinct small Python function per (name, i): realistic references with little shared text."""
    return (f"def {name}(values, limit={i + 2}):\n"
            f'    """Return the {name.replace("_", " ")} of values, stopping after {i + 2} items."""\n'
            f"    result_{i} = []\n"
            f"    for position_{i}, item in enumerate(values[:limit]):\n"
            f"        result_{i}.append(item * {i + 3} - position_{i})\n"
            f"    return result_{i}\n")


def _references() -> list[str]:
    return [_function(n, i) for i, n in enumerate(_NAMES)]


def _heldout() -> list[str]:
    return [_function(n, 40 + i) for i, n in enumerate(_HELDOUT_NAMES)]


def _novel() -> list[str]:
    return [f"def {n}(text):\n    # {n} for task number {k}\n    pieces = text.split(',')\n"
            f"    return [p.strip().upper() * {k} for p in pieces if p]\n" for k, n in enumerate(_NOVEL_NAMES)]


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _records(run_name: str, drafts: list[tuple[str, bool, str | None]]) -> pa.Table:
    rows = []
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for i, (draft, accepted, reason) in enumerate(drafts):
        row = empty_record(run_name, i)
        row.update(draft=draft, response="```python\npass\n```", accepted=accepted, reject_reason=reason,
                   draft_tokens=len(draft.split()) * 2 if draft else 0, response_tokens=6, judge_score=7.0,
                   syntax_ok=True, exec_status="skipped", novel=reason != "not_novel", contaminated=False,
                   temperature=0.8, top_p=1.0, draft_seed=1000 + i, created_at=now)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def _learn_rows(lambda_: float) -> list[dict]:
    rows = []
    for step in range(12):
        decay = np.exp(-step / 5)
        rows.append({"step": step, "epoch": step // 4, "l1": 3 + 2 * decay, "l2": lambda_ * (0.8 + decay),
                     "loss": 3 + 2 * decay + lambda_ * (0.8 + decay), "m_diag": 3 + 1.5 * decay,
                     "m_offdiag": 3.2 + 1.5 * decay + lambda_ * step * 0.05, "lr": 1e-3 * (1 - step / 12)})
    return rows


def make_run(root: Path, refs_file: Path, model_dir: Path, lambda_: float = 1.0, copies: int = 3,
             report: dict | None = None, with_eval: bool = True, references: dict | None = None) -> Path:
    """A run folder as learn/synthesize/evaluate write it: 3 + 6 + 1 non-empty drafts, of which
    `copies` are verbatim references (rejected not_novel), one repeats a novel draft (duplicate), and one
    more row is an empty draft."""
    root.mkdir(parents=True)
    cfg = config_from_dict({"preset": "tiny", "run": {"name": root.name, "output": str(root)},
                            "backbone": {"model": str(model_dir)}, "references": {"source": str(refs_file), **(references or {})},
                            "learn": {"lambda": lambda_}, "report": report or {}})
    (root / "manifest.json").write_text(json.dumps({"config": cfg.to_dict(), "stages": {
        "learn": {"status": "completed"}, "synthesize": {"status": "completed"}}}))
    rep = root / "representation"
    rep.mkdir()
    (rep / "representation.json").write_text(json.dumps({
        "backbone": str(model_dir), "backbone_signature": "abc", "hidden_size": 256, "num_domain_tokens": 8,
        "sha256": "0" * 64, "prefix": ""}))
    (root / "learn").mkdir()
    (root / "learn" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _learn_rows(lambda_)))
    refs, novel = _references(), _novel()
    drafts = ([(refs[i], False, "not_novel") for i in range(copies)] + [(t, True, None) for t in novel]
              + [(novel[0], False, "duplicate"), ("", False, "empty_draft")])
    records = root / "synth" / "records"
    records.mkdir(parents=True)
    table = _records(root.name, drafts)
    # Two blocks, as the streaming writer produces.
    pq.write_table(table.slice(0, 5), records / "block-00000.parquet")
    pq.write_table(table.slice(5), records / "block-00001.parquet")
    (root / "synth" / "manifest.json").write_text(json.dumps({"num_samples": len(drafts)}))
    if with_eval:
        ev = root / "eval" / "base"
        ev.mkdir(parents=True)
        (ev / "summary.json").write_text(json.dumps({
            "benchmark": "humaneval:100:104", "model": str(model_dir), "n": 2, "k": [1, 2], "temperature": 0.8,
            "pass_at_k": {"pass@1": 0.25, "pass@2": 0.5}, "num_problems": 4}))
        res = [{"benchmark": "humaneval", "task_id": f"HumanEval/{100 + p}", "sample_index": s, "model": "m",
                "completion": "pass", "program": "pass", "status": "passed" if (p + s) % 4 == 0 else "failed",
                "passed": (p + s) % 4 == 0, "exit_code": 0, "detail": "", "duration_s": 0.1, "completion_tokens": 3}
               for p in range(4) for s in range(2)]
        pq.write_table(pa.Table.from_pylist(res, schema=EVAL_RESULT_SCHEMA), ev / "results.parquet")
    return root


@pytest.fixture
def refs_file(tmp_path) -> Path:
    path = tmp_path / "refs.jsonl"
    _write_jsonl(path, _references())
    return path


# ---------------------------------------------------------------------------------------- embeddings
def test_embed_texts_is_batch_invariant_and_deterministic(tiny_model_dir):
    from domino_ray.backbone import load_backbone
    from domino_ray.report import embed_texts

    model, tok = load_backbone(str(tiny_model_dir), device="cpu")
    texts = ["def f(x):\n    return x + 1\n", _references()[0], "def f(x):\n    return x + 1\n"]
    batch = embed_texts(texts, model, tok, batch_size=8)
    assert batch.shape == (3, model.config.hidden_size) and batch.dtype == np.float32
    assert np.allclose(batch[0], batch[2])  # identical texts, identical embeddings
    alone = embed_texts(texts[:1], model, tok)
    assert np.allclose(alone[0], batch[0], atol=1e-5)  # right padding: the short text ignores the pads
    assert not np.allclose(batch[0], batch[1])
    assert embed_texts([], model, tok).shape == (0, model.config.hidden_size)


# ------------------------------------------------------------------------------------ report content
def test_report_on_a_run_has_known_answers(tmp_path, refs_file, tiny_model_dir):
    from domino_ray.report import build_report

    heldout = tmp_path / "heldout.jsonl"
    _write_jsonl(heldout, _heldout())
    run = make_run(tmp_path / "lambda1", refs_file, tiny_model_dir, report={"heldout": str(heldout)})
    out = build_report(str(run))
    report_dir = run / "report"
    assert out == str(report_dir / "report.html")
    for name in ("report.html", "report.md", "metrics.json", "embedding_map.png", "funnel.png", "lengths.png",
                 "memorisation.png", "learn_curves.png"):
        assert (report_dir / name).stat().st_size > 0, name
    m = json.loads((report_dir / "metrics.json").read_text())
    col = m["columns"]["lambda1 (λ=1)"]
    assert m["fidelity_reference"] == "held-out"
    assert col["samples"] == 10  # non-empty drafts
    assert col["memorized_rate"] == pytest.approx(0.3)  # 3 verbatim references out of 10
    assert col["common_run_max"] >= 20
    assert col["near_duplicate_rate"] == pytest.approx(0.1)  # one repeated novel draft
    assert col["records"] == 11 and col["accepted"] == 6
    assert col["base pass@1"] == 0.25
    assert 0 <= col["precision"] <= 1 and 0 <= col["recall"] <= 1
    assert col["l1_last"] == pytest.approx(3 + 2 * np.exp(-11 / 5))
    funnel = m["funnels"]["lambda1 (λ=1)"]
    assert funnel["reasons"] == {"empty_draft": 1, "duplicate": 1, "not_novel": 3}
    assert [s["remaining"] for s in funnel["stages"]] == [10, 10, 10, 10, 6]
    # Baselines: references are distinct functions (no near-duplicates); held-out copies nothing.
    assert m["columns"]["references"]["near_duplicate_rate"] == 0.0
    assert m["columns"]["held-out"]["memorized_rate"] == 0.0
    md = (report_dir / "report.md").read_text()
    assert "![Embedding map](embedding_map.png)" in md and "| metric |" in md
    html_text = (report_dir / "report.html").read_text()
    assert html_text.count('src="data:image/png;base64,') == 5
    assert "pass@2" in html_text and "not_novel" in html_text


def test_copies_of_references_score_as_memorised_and_on_domain(tmp_path, refs_file, tiny_model_dir):
    """A run whose drafts are mostly verbatim references: memorisation near 1, precision 1 vs references."""
    from domino_ray.report import build_report

    run = make_run(tmp_path / "copycat", refs_file, tiny_model_dir, copies=12, with_eval=False)
    build_report(str(run))
    m = json.loads((run / "report" / "metrics.json").read_text())
    col = m["columns"]["copycat (λ=1)"]
    assert m["fidelity_reference"] == "references"
    assert col["memorized_rate"] == pytest.approx(12 / 19)
    assert col["ngram_overlap_p90"] == pytest.approx(1.0)
    # Every reference has a copy among the synthetic samples: all are recalled and covered.
    assert col["recall"] == 1.0 and col["coverage"] == 1.0


def test_a_holdout_split_is_the_real_set_and_memorisation_counts_only_training_references(tmp_path, refs_file,
                                                                                          tiny_model_dir):
    """references.holdout: 4 of the 12 references are held out (smallest sha256 of the text); the run
    copies all 12 verbatim, so only the 8 copies of training references are memorised; the fine-tuned
    model's held-out NLL shows up in the summary."""
    from domino_ray.report import build_report

    run = make_run(tmp_path / "split", refs_file, tiny_model_dir, copies=12, references={"holdout": 4})
    nll_dir = run / "eval" / "finetuned"
    nll_dir.mkdir(parents=True)
    (nll_dir / "heldout_nll.json").write_text(json.dumps({"nll": 2.5, "token_nll": 2.4, "num_samples": 4}))
    build_report(str(run))
    m = json.loads((run / "report" / "metrics.json").read_text())
    col = m["columns"]["split (λ=1)"]
    assert m["fidelity_reference"] == "held-out"
    assert m["columns"]["held-out"]["samples"] == 4 and m["columns"]["references"]["samples"] == 8
    assert col["memorized_rate"] == pytest.approx(8 / 19)  # copies of held-out samples are not memorisation
    assert col["finetuned held-out NLL"] == 2.5
    md = (run / "report" / "report.md").read_text()
    assert "finetuned held-out NLL (nats/token) ↓ | 2.500" in md


def test_comparison_report_puts_runs_side_by_side(tmp_path, refs_file, tiny_model_dir):
    from domino_ray.cli import main

    run1 = make_run(tmp_path / "lambda1", refs_file, tiny_model_dir, lambda_=1.0, copies=1)
    run0 = make_run(tmp_path / "lambda0", refs_file, tiny_model_dir, lambda_=0.0, copies=3)
    assert main(["report", "--run", str(run1), "--compare", str(run0)]) == 0
    m = json.loads((run1 / "report" / "metrics.json").read_text())
    assert [r["label"] for r in m["runs"]] == ["lambda1 (λ=1)", "lambda0 (λ=0)"]
    assert list(m["columns"]) == ["lambda1 (λ=1)", "lambda0 (λ=0)", "references"]
    assert m["columns"]["lambda1 (λ=1)"]["memorized_rate"] < m["columns"]["lambda0 (λ=0)"]["memorized_rate"]
    html_text = (run1 / "report" / "report.html").read_text()
    header = re.search(r"<h2>Summary</h2>.*?<thead><tr>(.*?)</tr>", html_text, re.S).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["metric", "lambda1 (λ=1)", "lambda0 (λ=0)", "references"]
    assert "DOMINO report: lambda1 (λ=1) vs lambda0 (λ=0)" in html_text


def test_partial_run_degrades_to_notes(tmp_path, refs_file, tiny_model_dir):
    """A run that has only learned: curves are shown, synthetic sections say what is missing."""
    from domino_ray.report import build_report

    run = make_run(tmp_path / "learnonly", refs_file, tiny_model_dir, with_eval=False)
    shutil.rmtree(run / "synth")
    build_report(str(run))
    report_dir = run / "report"
    assert (report_dir / "learn_curves.png").exists() and not (report_dir / "funnel.png").exists()
    html_text = (report_dir / "report.html").read_text()
    assert "no Parquet files under" in html_text and "no evaluation results" in html_text


def test_report_reads_and_writes_s3(tmp_path, refs_file, tiny_model_dir, s3_server, s3_bucket):
    import yaml

    from domino_ray.config import load_config
    from domino_ray.report import build_report
    from domino_ray.storage import Storage

    local = make_run(tmp_path / "s3run", refs_file, tiny_model_dir)
    storage = Storage(s3_server)
    uri = f"s3://{s3_bucket}/runs/s3run"
    storage.upload_dir(local, uri)
    cfg = tmp_path / "storage.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"s3": s3_server.model_dump()}, "report": {"max_samples": 50}}))
    out = build_report(uri, config_path=str(cfg))
    assert build_report(uri, config=load_config(cfg)) == out  # what `domino run` passes
    assert out == f"{uri}/report/report.html"
    assert "data:image/png;base64," in storage.read_text(out)
    assert storage.exists(f"{uri}/report/embedding_map.png")
    assert json.loads(storage.read_text(f"{uri}/report/metrics.json"))["columns"]["s3run (λ=1)"]["samples"] == 10


# ------------------------------------------------------------------------------------------ rendering
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render_in_chromium(html_file: Path, work: Path) -> tuple[str, Path]:
    """(DOM after scripts ran, screenshot PNG) from headless Chromium, offline and sandbox-free (root)."""
    exe = _chromium()
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, f"--user-data-dir={work / 'profile-dom'}", "--dump-dom", html_file.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = work / "screenshot.png"
    res = subprocess.run([*base, f"--user-data-dir={work / 'profile-shot'}", f"--screenshot={shot}",
                          "--window-size=1280,5200", "--hide-scrollbars", html_file.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    return dom.stdout, shot


def assert_rendered(dom: str, shot: Path, n_images: int) -> None:
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body))
    assert attrs.get("images-total") == str(n_images), body
    assert attrs.get("images-decoded") == str(n_images), body  # every embedded PNG decoded
    assert int(attrs.get("tables", 0)) >= 3
    assert f"{n_images} of {n_images} plots rendered" in dom
    assert dom.count("<tr>") > 10
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000  # a blank page is a few KB


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make system-deps installs it)")
def test_report_renders_in_headless_chromium(tmp_path, refs_file, tiny_model_dir):
    from domino_ray.report import build_report

    run1 = make_run(tmp_path / "lambda1", refs_file, tiny_model_dir, lambda_=1.0, copies=1)
    run0 = make_run(tmp_path / "lambda0", refs_file, tiny_model_dir, lambda_=0.0)
    html_file = Path(build_report(str(run1), compare=[str(run0)]))
    dom, shot = render_in_chromium(html_file, tmp_path)
    assert_rendered(dom, shot, n_images=5)


def test_report_of_a_missing_run_fails_naming_it(tmp_path):
    from domino_ray.cli import main
    from domino_ray.report import build_report

    with pytest.raises(FileNotFoundError, match="not a run root"):
        build_report(str(tmp_path / "nope"))
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------------------------- real tiny run
@pytest.fixture(scope="module")
def real_tiny_run(ray_cluster, tiny_model_dir, tmp_path_factory) -> Path:
    """learn (Ray Train, 1 worker) then synthesize (Ray Data, transformers drafts) on the tiny backbone."""
    from domino_ray.learn import run_learn
    from domino_ray.synthesize import run_synthesize

    base = tmp_path_factory.mktemp("real")
    refs = base / "refs.jsonl"
    _write_jsonl(refs, _references())
    heldout = base / "heldout.jsonl"
    _write_jsonl(heldout, _heldout())
    root = base / "tiny-l1"
    pool = {"min_actors": 1, "max_actors": 1, "num_cpus": 0.25, "batch_size": 4}
    cfg = config_from_dict({
        "preset": "tiny",
        "run": {"name": "tiny-l1", "output": str(root), "seed": 0},
        "backbone": {"model": str(tiny_model_dir), "device": "cpu"},
        "references": {"source": str(refs), "max_tokens": 96},
        # 12 references, batches of 4: 3 steps per epoch, one metrics row each
        "learn": {"num_domain_tokens": 4, "num_sample_tokens": 4, "batch_size": 4, "epochs": 3, "lr": 0.05,
                  "num_workers": 1, "log_every_steps": 1, "checkpoint_every_epochs": 3},
        "synthesize": {
            "num_samples": 8, "block_size": 4,
            "draft": {"engine": {"kind": "hf", "max_model_len": 256}, "pool": pool,
                      "sampling": {"max_tokens": 40, "temperature": 0.9}, "reject_truncated": False},
            "respond": {"enabled": False}, "judge": {"enabled": False},
            "filter": {"decontaminate": [], "syntax": False, "pool": pool},  # drafts are prose+code, no response
        },
        "report": {"heldout": str(heldout), "max_samples": 50},
    })
    run_learn(cfg)  # (tests/conftest.py shortens Ray Train's report polls)
    run_synthesize(cfg)
    return root


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make system-deps installs it)")
def test_report_of_a_real_tiny_run_renders_in_chromium(real_tiny_run, tmp_path):
    from domino_ray.report import build_report

    html_file = Path(build_report(str(real_tiny_run)))
    m = json.loads((html_file.parent / "metrics.json").read_text())
    col = m["columns"]["tiny-l1 (λ=1)"]
    assert col["records"] == 8 and col["l1_last"] is not None and m["fidelity_reference"] == "held-out"
    assert sum(m["funnels"]["tiny-l1 (λ=1)"]["reasons"].values()) + col["accepted"] == 8
    dom, shot = render_in_chromium(html_file, tmp_path)
    # Every plot whose inputs exist: a run without evaluations still has all five.
    n_plots = len(list(html_file.parent.glob("*.png")))
    assert n_plots == 5
    assert_rendered(dom, shot, n_images=n_plots)
    shutil.copy(shot, html_file.parent / "screenshot.png")  # kept next to the report for a human look


# ------------------------------------------------------------------------ embeddings off the driver
def test_report_embeddings_run_in_a_ray_worker_and_equal_the_in_process_ones(tiny_model_dir, ray_cluster):
    """On a Ray cluster the report's backbone loads in a Ray task, never in the driver (on KubeRay the
    driver sits on the CPU-only head: a 7B backbone there kills the cluster); the numbers are those of
    an in-process embedding of the same texts."""
    import os

    import numpy as np

    from domino_ray.config import BackboneConfig
    from domino_ray.report.compute import _embed_off_the_driver, embed_text_sets

    bb = BackboneConfig(model=str(tiny_model_dir))
    sets = [["def add(a, b):\n    return a + b\n", "x = 1"], [], ["print('hello')"]]
    remote = _embed_off_the_driver(str(tiny_model_dir), bb, sets, 2, 64)
    local = embed_text_sets(str(tiny_model_dir), bb.dtype, bb.device, bb.trust_remote_code, sets, 2, 64)
    assert remote["pid"] != os.getpid() and local["pid"] == os.getpid()
    assert [len(t) for t, _ in remote["sets"]] == [2, 0, 1]
    for (rt, re_), (lt, le) in zip(remote["sets"], local["sets"]):
        assert rt == lt
        assert re_.shape == le.shape and np.allclose(re_, le, atol=1e-5)
