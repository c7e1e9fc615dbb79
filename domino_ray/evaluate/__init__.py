"""Pass@k evaluation (DESIGN.md sections 2, 5 and 6): benchmarks, prompts and code extraction, test
programs, verdicts decided outside the sandbox (`judge_solution`), the unbiased pass@k estimator,
`run_evaluate` (the Ray Data plan that generates completions with LLM actors and judges them in the
sandbox actor pool) and `score_samples` (the same for a samples file made elsewhere).

Importing this package does not import Ray or any engine.
"""

from domino_ray.evaluate.benchmarks import KNOWN_BENCHMARKS, BenchmarkError, Problem, load_benchmark
from domino_ray.evaluate.passk import pass_at_k, pass_at_k_table
from domino_ray.evaluate.programs import (
    build_program,
    chat_prompt,
    completion_prompt,
    extract_code,
    reference_solution,
    solution_from_completion,
    stop_strings,
)
from domino_ray.evaluate.run import (
    execute_solutions,
    result_name,
    results_table,
    run_evaluate,
    score_samples,
    summarize,
)
from domino_ray.evaluate.samples import SamplesError, read_samples
from domino_ray.evaluate.verdict import Verdict, judge_code_and_tests, judge_solution

__all__ = [
    "KNOWN_BENCHMARKS",
    "BenchmarkError",
    "Problem",
    "SamplesError",
    "Verdict",
    "build_program",
    "chat_prompt",
    "completion_prompt",
    "execute_solutions",
    "extract_code",
    "judge_code_and_tests",
    "judge_solution",
    "load_benchmark",
    "pass_at_k",
    "pass_at_k_table",
    "read_samples",
    "reference_solution",
    "result_name",
    "results_table",
    "run_evaluate",
    "score_samples",
    "solution_from_completion",
    "stop_strings",
    "summarize",
]
