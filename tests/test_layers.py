"""The bottom layer imports nothing above it (a grep-level check beside import-linter's contracts)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("cli", "client", "server", "sample", "fixtures")
IMPORT = re.compile(r"^\s*(?:from|import)\s+(" + "|".join(UPPER) + r")\b", re.M)


def test_shared_and_protos_import_no_upper_layer():
    offenders = [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for folder in ("shared", "protos")
                 for path in sorted((ROOT / folder).glob("*.py")) for m in IMPORT.finditer(path.read_text())]
    assert not offenders, offenders


def test_roles_import_no_other_role():
    offenders = []
    for role in ("client", "server", "sample", "fixtures"):
        others = [r for r in ("client", "server", "sample", "fixtures", "cli") if r != role]
        pattern = re.compile(r"^\s*(?:from|import)\s+(" + "|".join(others) + r")\b", re.M)
        offenders += [f"{p.relative_to(ROOT)}" for p in sorted((ROOT / role).glob("*.py"))
                      if pattern.search(p.read_text())]
    assert not offenders, offenders


def test_import_linter_contracts_hold():
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "3 kept, 0 broken" in result.stdout, result.stdout[-2000:]
