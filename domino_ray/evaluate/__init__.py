"""Pass@k evaluation (DESIGN.md sections 2 and 5): benchmarks, prompts and code extraction, test
programs, the unbiased pass@k estimator, and `run_evaluate`, the Ray Data plan that generates
completions with LLM actors and runs them in the sandbox actor pool.

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
from domino_ray.evaluate.run import execute_solutions, result_name, results_table, run_evaluate, summarize

__all__ = [
    "KNOWN_BENCHMARKS",
    "BenchmarkError",
    "Problem",
    "build_program",
    "chat_prompt",
    "completion_prompt",
    "execute_solutions",
    "extract_code",
    "load_benchmark",
    "pass_at_k",
    "pass_at_k_table",
    "reference_solution",
    "result_name",
    "results_table",
    "run_evaluate",
    "solution_from_completion",
    "stop_strings",
    "summarize",
]
