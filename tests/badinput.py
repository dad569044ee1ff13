"""The one assertion every bad-input case makes: running `mixshow ARGS` in-process gives exit code 2,
exactly one `error:` line (containing the expected text), no traceback, nothing left in the output
folder and no file created or changed anywhere in the sandbox (temporary files included)."""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

from cli.main import main


def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` with a hash of its bytes (symlinks by target)."""
    files = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_symlink():
            files[str(path)] = f"-> {path.readlink()}"
        elif path.is_file():
            files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir() and not any(path.iterdir()):
            files[str(path)] = "empty dir"
    return files


def run_mixshow(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mixshow", *[str(a) for a in args]])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(args: list, sandbox: Path, expect: str, monkeypatch, capsys,
                       out: Path | None = None) -> str:
    """Run the CLI on a bad input inside `sandbox` and check everything a clean refusal promises."""
    sandbox = Path(sandbox)
    scratch = sandbox / "tmp"
    scratch.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = snapshot(sandbox)
    code, stdout, stderr = run_mixshow(args, monkeypatch, capsys)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr + stdout, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expect.lower() in lines[0].lower(), f"{expect!r} not in {lines[0]!r}"
    after = snapshot(sandbox)
    created = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    assert not created and not changed, f"created {created[:5]}, changed {changed[:5]}"
    if out is not None:
        out = Path(out)
        assert not out.exists() or (out.is_dir() and not any(out.iterdir())), f"{out} left behind"
    return lines[0]
