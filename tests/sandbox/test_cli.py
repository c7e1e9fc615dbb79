"""`domino sandbox exec` as users run it."""

from __future__ import annotations

import json

from domino_ray.cli import main


def test_exec_json_reports_result_and_isolation(tmp_path, capsys):
    prog = tmp_path / "prog.py"
    prog.write_text("import sys\nprint(sys.stdin.read().strip()[::-1])\n")
    stdin = tmp_path / "in.txt"
    stdin.write_text("olleh\n")
    assert main(["sandbox", "exec", "--file", str(prog), "--stdin", str(stdin), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "passed" and out["stdout"] == "hello\n" and out["exit_code"] == 0
    assert out["isolation"]["layers"]["network"] is True


def test_exec_timeout_flag_and_exit_status(tmp_path, capsys):
    prog = tmp_path / "loop.py"
    prog.write_text("while True:\n    pass\n")
    assert main(["sandbox", "exec", "--file", str(prog), "--timeout", "1"]) == 1
    assert "status: timeout" in capsys.readouterr().out


def test_exec_strict_refusal_uses_config(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("sandbox:\n  backend: unshare\n  python: /usr/bin/python3\n  allow_no_filesystem_isolation: true\n")
    prog = tmp_path / "p.py"
    prog.write_text("print(1)\n")
    assert main(["sandbox", "exec", "--file", str(prog), "--config", str(cfg), "--strict"]) == 2
    assert "filesystem" in capsys.readouterr().err
    assert main(["sandbox", "exec", "--file", str(prog), "--config", str(cfg)]) == 0


def test_exec_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["sandbox", "exec", "--file", str(tmp_path / "nope.py")]) == 2
    assert "nope.py" in capsys.readouterr().err


def test_terminal_control_characters_are_shown_escaped(tmp_path, capsys):
    prog = tmp_path / "ansi.py"
    prog.write_text("import sys\nprint('\\x1b[2J\\x1b]0;pwned\\x07clear\\rX\\u202egnp.exe')\nsys.stderr.write('\\x1b[31mred\\n')\n")
    assert main(["sandbox", "exec", "--file", str(prog)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert "\\x1b[2J\\x1b]0;pwned\\x07clear\\x0dX\\u202egnp.exe" in out and "\\x1b[31mred" in out
    assert main(["sandbox", "exec", "--file", str(prog), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stdout"].startswith("\x1b[2J")  # JSON carries the exact bytes
