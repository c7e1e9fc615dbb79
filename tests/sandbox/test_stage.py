"""SandboxStage as a plain callable (no cluster): columns in and out, expected stdout, skipped rows,
hostile rows that leave the actor and the following rows unharmed, strict refusal at construction."""

from __future__ import annotations

import os

import numpy as np
import pytest

from domino_ray.config import SandboxConfig
from domino_ray.sandbox import OUTPUT_COLUMNS, SandboxError, SandboxStage, stdout_matches

CFG = SandboxConfig(timeout_s=3, cpu_s=3, memory_mb=512, max_output_bytes=4096)


def make_batch(**columns) -> dict[str, np.ndarray]:
    return {name: np.array(values, dtype=object) for name, values in columns.items()}


def test_stage_adds_its_columns_and_keeps_the_others():
    stage = SandboxStage(CFG.model_dump())
    batch = make_batch(
        program=["print(int(input()) * 2)", "print(int(input()) * 2)", "assert False", None, "import time; time.sleep(30)"],
        stdin=["21", "21", None, None, None],
        expected_stdout=["42", "41", None, None, None],
        timeout_s=[None, None, None, None, 1.0],
        task_id=["a", "b", "c", "d", "e"],
    )
    out = stage(batch)
    assert list(out["task_id"]) == ["a", "b", "c", "d", "e"]
    assert list(out["exec_status"]) == ["passed", "failed", "failed", "skipped", "timeout"]
    assert out["exec_detail"][1].startswith("wrong output")
    assert out["exec_exit_code"].dtype == np.int64 and list(out["exec_exit_code"][:3]) == [0, 0, 1]
    assert out["exec_exit_code"][4] == -1  # killed: no exit code of its own
    assert out["exec_duration_s"].dtype == np.float64 and out["exec_duration_s"][4] >= 1.0
    assert set(OUTPUT_COLUMNS) <= set(out)


def test_hostile_rows_do_not_affect_the_actor_or_later_rows(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("keep")
    canary.chmod(0o666)
    tmp_path.chmod(0o777)
    stage = SandboxStage(CFG.model_dump())
    actor_pid = os.getpid()
    hostile = [
        "import os\nwhile True:\n    os.fork()",
        "x = bytearray(2 * 1024 ** 3)",
        "while True:\n    print('y' * 10000)",
        f"import os, signal\nos.kill({actor_pid}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)",
        f"import os\nos.remove({str(canary)!r})",
    ]
    out = stage(make_batch(program=hostile + ["print('still fine')"], expected_stdout=[None] * 5 + ["still fine"]))
    assert list(out["exec_status"][:3]) == ["limit", "limit", "limit"]
    assert out["exec_status"][-1] == "passed"
    assert out["exec_status"][4] == "error" and canary.read_text() == "keep"
    again = stage(make_batch(program=["print(2 + 2)"], expected_stdout=["4"]))
    assert list(again["exec_status"]) == ["passed"]


def test_missing_program_column_names_stage_and_columns():
    stage = SandboxStage(CFG.model_dump())
    with pytest.raises(KeyError, match=r"SandboxStage: required input column 'program'.*\['code'\]"):
        stage(make_batch(code=["print(1)"]))


def test_strict_stage_refuses_at_construction_when_a_layer_is_missing():
    cfg = CFG.model_copy(update={"strict": True, "backend": "unshare", "python": "/usr/bin/python3",
                                 "allow_no_filesystem_isolation": True})
    with pytest.raises(SandboxError, match="strict"):
        SandboxStage(cfg.model_dump())


@pytest.mark.parametrize(
    "actual, expected, same",
    [
        ("1 2 3\n", "1 2 3", True),
        ("  1 2 3  \n\n", "1 2 3\n", True),
        ("0.50\n", "0.5", True),
        ("1e3\n", "1000", True),
        ("1 2\n", "1 3", False),
        ("1\n2\n", "1\n2\n3", False),
        ("yes", "Yes", False),
    ],
)
def test_stdout_matches(actual, expected, same):
    assert stdout_matches(actual, expected) is same
