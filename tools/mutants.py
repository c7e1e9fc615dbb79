"""Mutation testing of the core modules with mutmut (`make mutants`; not part of CI).

Each module is mutated in its own scratch copy of the repository (never in the checkout: other
people's tests must not import a mutant), against the fast tests that cover it, so a full run takes
minutes rather than hours. The score of a module is killed / (mutants - skipped), timeouts counted
as killed; a mutant no selected test reaches counts as a survivor. Survivors listed in
`tools/mutants_equivalent.toml` (an equivalent mutant: no input can tell it from the original) are
shown with the reason and scored separately.

    make mutants                                   # every module, on the committed tree (HEAD)
    .venv/bin/python tools/mutants.py filters passk --worktree --show   # uncommitted tests too; diffs

Options: `--worktree` copies the working tree (tracked and untracked, not ignored) instead of HEAD;
`--show` prints the diff of every survivor; `--jobs N` runs N mutants at once (default 1: the
development machine has 2 shared cores); `--workdir` holds the scratch copies (default
/tmp/domino-mutants). Run it under `nice -n 10` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = REPO / "tools" / "mutants_equivalent.toml"


@dataclass(frozen=True)
class Target:
    path: str  # file to mutate
    tests: tuple[str, ...]  # pytest selection (paths, -k, -m) of the fast tests that cover it
    functions: tuple[str, ...] = ("*",)  # fnmatch patterns on mutmut's function key; default all
    forkserver: bool = False  # torch is not fork-safe once used: fork workers from a clean server
    also_copy: tuple[str, ...] = field(default=())


def _fn(*names: str) -> tuple[str, ...]:
    """Patterns for top-level functions and methods (`x_name__mutmut_*`, `xǁClassǁname__mutmut_*`)."""
    pats = []
    for n in names:
        if "." in n:
            cls, meth = n.split(".", 1)
            pats.append(f"*.xǁ{cls}ǁ{meth}__mutmut_*")
        else:
            pats.append(f"*.x_{n}__mutmut_*")
    return tuple(pats)


TARGETS: dict[str, Target] = {
    # The objective's math on hand-made tensors (seconds per mutant). Its model plumbing (KV-cache
    # sharing, chunking, the full-sequence reference) is `objective_model`: every mutant there runs the
    # tiny-model tests, hours for the ~900 mutants, so it is not in the default set.
    "objective": Target("domino_ray/objective.py",
                        tuple(f"tests/test_objective.py::{t}" for t in (
                            "test_l2_paper_2x2_closed_form", "test_l2_variants_match_hand_computation",
                            "test_l2_released_2x2_literal", "test_infonce_is_softmax_cross_entropy_and_above_paper",
                            "test_l2_refuses_a_single_sample_and_unknown_variants",
                            "test_make_batches_covers_every_sample_once_with_two_or_more",
                            "test_make_batches_fixed_count_and_refusals", "test_init_soft_tokens_vocab_and_normal",
                            "test_pad_texts_masks_padding")) + ("tests/test_objective_mutants.py",),
                        functions=_fn("ObjectiveSpec.from_config", "pad_texts", "batch_sizes", "make_batches",
                                      "init_soft_tokens", "_check_square", "l2_paper", "l2_infonce", "l2_released",
                                      "contrastive_loss", "LossOutput.metrics", "_combine", "normalizers",
                                      "_check_inputs", "_token_nll"),
                        forkserver=True),
    "objective_model": Target("domino_ray/objective.py",
                              ("tests/test_objective.py", "tests/test_objective_mutants.py"), forkserver=True),
    "passk": Target("domino_ray/evaluate/passk.py", ("tests/evaluate/test_passk.py", "tests/evaluate/test_passk_mutants.py")),
    # Without test_finalize.py: it needs a Ray cluster per mutant run (mutmut stopped in its clean run)
    # and runs the dedup steps inside Ray Data tasks, out of mutmut's reach; test_dedup_steps.py tests
    # those steps in-process.
    "verdicts": Target("domino_ray/synthesize/verdicts.py",
                       ("tests/synthesize/test_verdicts.py", "tests/synthesize/test_verdicts_mutants.py")),
    "filters": Target("domino_ray/synthesize/filters.py",
                      ("tests/synthesize/test_filters.py", "tests/synthesize/test_dedup_steps.py",
                       "tests/synthesize/test_row_filter.py")),
    "judge": Target("domino_ray/synthesize/judge.py", ("tests/synthesize/test_judge.py", "tests/synthesize/test_judge_mutants.py")),
    # Request building without generation; test_base.py's engine builds (a vLLM start-up each) are left out.
    "engine_requests": Target("domino_ray/engines/base.py",
                              tuple(f"tests/engines/test_base.py::{t}" for t in (
                                  "test_bad_sampling_parameters", "test_sampling_from_config_dump",
                                  "test_derived_seeds_are_stable_and_distinct"))
                              + ("tests/engines/test_requests_mutants.py",),
                              functions=_fn("SamplingParams.__post_init__", "SamplingParams.from_dict", "derive_seed",
                                            "Engine.check_soft_prefix", "Engine.encode_request",
                                            "Engine._apply_chat_template", "Engine.prepare", "Engine.embed_prompt",
                                            "PreparedRequest.prompt_len"),
                              forkserver=True),
    # Without the S3 test (a moto server per mutant); S3 paths of _short_name are tested directly.
    "references": Target("domino_ray/references.py",
                         ("tests/test_references.py", "tests/test_references_mutants.py", "-k", "not s3_source"),
                         forkserver=True),
    # The in-process tests only: the Ray Train / Ray Data ones run the code in other processes.
    "finetune_masking": Target("domino_ray/finetune.py",
                               tuple(f"tests/test_finetune.py::{t}" for t in (
                                   "test_chat_format_masks_every_prompt_token",
                                   "test_plain_format_ends_with_eos_and_truncates_response_only",
                                   "test_packing_keeps_targets_and_respects_max_length",
                                   "test_tokenize_records_masks_like_format_example_and_drops_unaccepted_rows",
                                   "test_build_sequences_counts")) + ("tests/test_finetune_mutants.py",),
                               functions=_fn("format_example", "_render", "pack_examples", "collate", "collate_arrays"),
                               forkserver=True),
    # The pure tests only: the real-program tests of test_runner.py take seconds each per mutant.
    "sandbox_status": Target("domino_ray/sandbox/runner.py",
                             tuple(f"tests/sandbox/test_runner.py::{t}" for t in (
                                 "test_classify_exit_on_hand_made_outcomes",
                                 "test_exit_status_is_exact_with_the_wait_status",
                                 "test_last_exception_line_survives_interleaved_tracebacks"))
                             + ("tests/sandbox/test_status_mutants.py",),
                             functions=_fn("classify_exit", "_limit_from_exception", "last_exception_line",
                                           "_exit_status", "_signal_name")),
}


DEFAULT = [m for m in TARGETS if m != "objective_model"]


# ----------------------------------------------------------------------------------------- copy
def _files(worktree: bool) -> list[str]:
    args = ["ls-files", "-co", "--exclude-standard"] if worktree else ["ls-tree", "-r", "--name-only", "HEAD"]
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if p.split("/", 1)[0] in ("domino_ray", "tests", "examples")
            or p in ("pyproject.toml",)]


def _populate(dest: Path, worktree: bool) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if worktree:
        for rel in _files(True):
            src = REPO / rel
            if src.is_file():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)
    else:
        archive = subprocess.run(["git", "archive", "HEAD", "domino_ray", "tests", "examples", "pyproject.toml"],
                                 cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def _toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _write_config(dest: Path, target: Target) -> None:
    tests, prev = [], ""
    for t in target.tests:  # options and their values stay; test files not written yet are left out
        if t.startswith("-") or prev in ("-k", "-m") or (dest / t.split("::")[0]).exists():
            tests.append(t)
        prev = t
    lines = ["", "[tool.mutmut]",
             'source_paths = ["domino_ray"]',
             f"only_mutate = {_toml_list([target.path])}",
             f"pytest_add_cli_args_test_selection = {_toml_list(tests)}",
             'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-p", "no:randomly"]',
             "use_git_change_detection = false",
             f'process_isolation = "{"forkserver" if target.forkserver else "fork"}"']
    with open(dest / "pyproject.toml", "a") as f:
        f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ run
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("DOMINO_TEST_CACHE", str(REPO / ".cache"))  # the tiny model, built once for the checkout
    return env


def _mutmut(dest: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=dest, env=_env(), capture_output=True,
                          text=True, check=check)


def _results(dest: Path, target: Target) -> dict[str, str]:
    meta = json.loads((dest / "mutants" / (target.path + ".meta")).read_text())
    return {name: STATUS.get(code, "suspicious") for name, code in meta["exit_code_by_key"].items()
            if any(fnmatch(name, p) for p in target.functions)}


def _equivalents() -> list[dict]:
    if not EQUIVALENT_FILE.exists():
        return []
    return tomllib.loads(EQUIVALENT_FILE.read_text()).get("mutant", [])


def _diff(dest: Path, name: str) -> str:
    out = _mutmut(dest, "show", name, check=False).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


def _changed_lines(diff: str) -> tuple[str, str]:
    minus = " ".join(line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---"))
    plus = " ".join(line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    return minus, plus


def _line_before(diff: str) -> str:
    """The unchanged line just above the first changed one (tells apart two identical edits in one function)."""
    lines = [line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@"))]
    for i, line in enumerate(lines):
        if line.startswith(("-", "+")):
            return lines[i - 1][1:].strip() if i else ""
    return ""


def _explained(module: str, name: str, diff: str, equivalents: list[dict]) -> dict | None:
    minus, plus = _changed_lines(diff)
    func = name.rsplit(".", 1)[-1].split("__mutmut_")[0]
    for e in equivalents:
        if e["module"] == module and e["function"] == func and e["original"] == minus and e["mutant"] == plus \
                and e.get("after", _line_before(diff)) == _line_before(diff):
            return e
    return None


def run_target(module: str, target: Target, args) -> dict:
    dest = Path(args.workdir) / module
    _populate(dest, args.worktree)
    _write_config(dest, target)
    t0 = time.time()
    if args.functions:  # e.g. --functions normalizers pad_texts: only those functions' mutants
        target = Target(target.path, target.tests, _fn(*args.functions), target.forkserver)
    patterns = [] if target.functions == ("*",) else list(target.functions)
    proc = _mutmut(dest, "run", "--max-children", str(args.jobs), *patterns, check=False)
    seconds = time.time() - t0
    if not (dest / "mutants" / (target.path + ".meta")).exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"mutmut run failed for {module} (exit {proc.returncode}):\n{tail}")
    results = _results(dest, target)
    counts: dict[str, int] = {}
    for status in results.values():
        counts[status] = counts.get(status, 0) + 1
    equivalents = _equivalents()
    survivors, explained = [], []
    for name, status in sorted(results.items()):
        if status in ("survived", "no tests", "suspicious", "not checked"):
            diff = _diff(dest, name)
            e = _explained(module, name, diff, equivalents)
            (explained if e else survivors).append((name, status, diff, e))
    total = len(results) - counts.get("skipped", 0)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    return {"module": module, "path": target.path, "total": total, "killed": killed, "counts": counts,
            "score": killed / total if total else float("nan"),
            "score_equiv": killed / (total - len(explained)) if total - len(explained) else float("nan"),
            "survivors": survivors, "explained": explained, "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"default: {', '.join(DEFAULT)}; also: objective_model (hours)")
    ap.add_argument("--worktree", action="store_true", help="mutate the working tree, not HEAD")
    ap.add_argument("--show", action="store_true", help="print the diff of every survivor")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/domino-mutants")
    ap.add_argument("--json", help="also write the scores to this file")
    ap.add_argument("--functions", nargs="+", help="mutate only these functions (Class.method for methods)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        ap.error(f"unknown modules {unknown}; known: {list(TARGETS)}")
    rows = []
    for module in args.modules or DEFAULT:
        print(f"== {module}: mutating {TARGETS[module].path}", flush=True)
        r = run_target(module, TARGETS[module], args)
        rows.append(r)
        for name, status, diff, _ in r["survivors"]:
            print(f"  {status}: {name}")
            if args.show:
                print("    " + diff.replace("\n", "\n    "))
        for name, _, diff, e in r["explained"]:
            print(f"  equivalent: {name}: {e['why']}")
        print(f"   {r['killed']}/{r['total']} killed ({100 * r['score']:.1f}%), {len(r['explained'])} explained "
              f"equivalent, {len(r['survivors'])} unexplained survivors, {r['seconds']:.0f} s", flush=True)
    print("\nmodule              killed/total  score  score w/o equivalents  unexplained survivors")
    for r in rows:
        print(f"{r['module']:<20}{r['killed']:>5}/{r['total']:<7}{100 * r['score']:>6.1f}%{100 * r['score_equiv']:>14.1f}%"
              f"{len(r['survivors']):>20}")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k not in ("survivors", "explained")}
                                               | {"survivors": [s[0] for s in r["survivors"]],
                                                  "explained": [s[0] for s in r["explained"]]} for r in rows],
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
