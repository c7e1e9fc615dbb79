"""The run summary's extras: learn-curve numbers, the acceptance funnel and accepted examples."""

import pytest

from domino_ray.summary import format_examples, format_funnel, format_learn, learn_curve


def test_learn_curve_averages_three_steps_at_each_end():
    rows = [{"step": i, "l1": float(i), "l2": 10.0 - i, "loss": 0.0, "m_diag": 1.0, "m_offdiag": 1.0 + i / 10}
            for i in range(1, 8)]
    curve = learn_curve(rows)
    assert curve["steps"] == 7
    assert curve["l1"] == pytest.approx([2.0, 6.0])  # mean(1,2,3), mean(5,6,7)
    assert curve["l2"] == pytest.approx([8.0, 4.0])
    assert curve["gap"] == pytest.approx([0.2, 0.6])
    assert format_learn(curve) == ["  learn              7 steps; first -> last 3 steps: L1 2.000 -> 6.000, "
                                   "L2 8.000 -> 4.000, gap(M off-diag - diag) 0.200 -> 0.600"]
    assert learn_curve([]) is None and format_learn(None) == []


def test_funnel_subtracts_reasons_in_check_order():
    reasons = {"not_novel": 1, "draft_truncated": 5, "exec_failed": 7, "judge_below_threshold": 2, "duplicate": 0}
    assert format_funnel(24, 9, reasons) == [
        "  acceptance funnel  24 drafts",
        "    - 5    draft_truncated          -> 19",
        "    - 2    judge_below_threshold    -> 17",
        "    - 7    exec_failed              -> 10",
        "    - 1    not_novel                -> 9",
        "    = 9 accepted",
    ]
    assert format_funnel(None, None, None) == []


def test_examples_show_problem_and_solution_clipped():
    ex = {"seed_index": 4, "draft": "def f(x):\n    \"\"\"Double x.\"\"\"\n", "response": "\n".join(f"l{i}" for i in range(5)),
          "judge_score": 2.5, "exec_status": "passed"}
    out = format_examples([ex], max_lines=3)
    assert out[0] == "  --- accepted pair 1 (seed 4, judge 2.500, tests passed) ---"
    assert out[1:4] == ["  problem:", "    def f(x):", '        """Double x."""']
    assert out[4:] == ["  solution:", "    l0", "    l1", "    l2", "    ... (2 more lines)"]


def test_run_summary_prints_pass_at_k_per_model_nll_and_pairs():
    from domino_ray.pipeline import format_summary

    result = {"run": "/r", "seconds": 600.0, "stages": {}, "benchmark": "humaneval:100:108", "num_problems": 8,
              "synthesize": {"rows": 24, "accepted": 3, "reject_reasons": {"exec_failed": 21}},
              "finetune": {}, "pass_at_1": {"base": 0.1, "finetuned": 0.2, "delta": 0.1},
              "pass_at_k": {"base": {"pass@1": 0.1, "pass@5": 0.25}, "finetuned": {"pass@1": 0.2, "pass@5": 0.375}},
              "heldout_nll": {"base": 1.5, "finetuned": 1.25, "delta": -0.25, "num_samples": 6, "tokens": 700},
              "examples": [{"seed_index": 0, "draft": "P", "response": "S", "judge_score": 3.0, "exec_status": "passed"}]}
    text = format_summary(result)
    assert "    pass@1           base 0.100  fine-tuned 0.200  delta +0.100" in text
    assert "    pass@5           base 0.250  fine-tuned 0.375  delta +0.125" in text
    assert "held-out NLL (6 samples, 700 tokens): base 1.500  fine-tuned 1.250  delta -0.250" in text
    assert "    - 21   exec_failed              -> 3" in text and "accepted pair 1 (seed 0" in text
