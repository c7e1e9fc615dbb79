"""`domino sandbox exec --file F [--stdin F] [--timeout S] [--strict] [--json] [--config CFG]`:
run one program in the sandbox by hand. Exit status: 0 passed, 1 ran but did not pass, 2 refused
(strict with a missing layer, unusable sandbox, unreadable file)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from domino_ray.config import SandboxConfig
from domino_ray.sandbox.isolation import SandboxError, isolation_report
from domino_ray.sandbox.runner import run_program

__all__ = ["cli_exec", "printable"]

# C0 controls but tab and newline, DEL, C1 controls, and the Unicode bidi overrides and isolates:
# the program's output must not move the cursor, rewrite the terminal title, clear the screen or
# reorder what the reader sees. They are shown escaped (\x1b) instead.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every terminal control character replaced by a visible escape."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def _sandbox_config(args) -> SandboxConfig:
    if getattr(args, "config", None):
        from domino_ray.config import load_config

        cfg = load_config(args.config).sandbox
    else:
        cfg = SandboxConfig()
    if getattr(args, "strict", False):
        cfg = cfg.model_copy(update={"strict": True})
    return cfg


def cli_exec(args) -> int:
    cfg = _sandbox_config(args)
    code = Path(args.file).read_text(encoding="utf-8")
    stdin = Path(args.stdin).read_text(encoding="utf-8") if args.stdin else None
    try:
        result = run_program(code, cfg, stdin=stdin, timeout_s=args.timeout)
    except SandboxError as e:
        print(f"domino sandbox exec: refused: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.to_dict(), "isolation": isolation_report(cfg)}, indent=2))
    else:
        print(f"status: {result.status}  exit_code: {result.exit_code}  signal: {result.signal}  "
              f"duration: {result.duration_s:.3f}s" + (f"\ndetail: {printable(result.detail)}" if result.detail else ""))
        if result.stdout:
            print("--- stdout\n" + printable(result.stdout.rstrip("\n")))
        if result.stderr:
            print("--- stderr\n" + printable(result.stderr.rstrip("\n")))
    return 0 if result.passed else 1
