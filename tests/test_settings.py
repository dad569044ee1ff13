"""Round settings have one source: pyproject.toml's [tool.flwr.app.config]."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import tomllib
from flwr.cli.build import build_fab_from_disk

from server.launch import stage_app
from server.settings import APP_DIR, RoundSettings
from shared.errors import InvalidArgument
from tests.badinput import assert_clean_error

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_pyproject_values():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    settings = RoundSettings.from_config({})
    assert settings.run_config() == {**config, "base": str(Path(config["base"]))}
    changed = RoundSettings.from_config({"timeout": 5, "retrain": True})
    assert (changed.timeout, changed.retrain, changed.wait) == (5.0, True, settings.wait)


BAD = [({"timeout": float("nan")}, "timeout"), ({"min-clients": 0}, "min_clients"), ({"steps": 1.5}, "steps"),
       ({"retrain": "yes"}, "retrain"), ({"wait": -1}, "wait"), ({"colour": 3}, "colour")]


@pytest.mark.parametrize("given, argument", BAD)
def test_bad_settings_name_their_argument(given, argument):
    with pytest.raises(InvalidArgument) as info:
        RoundSettings.from_config(given)
    assert info.value.argument == argument


def test_round_flags_are_checked_before_anything_starts(tmp_path, monkeypatch, capsys):
    (tmp_path / "store").mkdir()
    assert_clean_error(["round", "--superlink", "127.0.0.1:1", "--store", f"file://{tmp_path}/store", "--base",
                        tmp_path, "--insecure", "--timeout", "nan"], tmp_path, "--timeout: nan is not finite",
                       monkeypatch, capsys)


def fab_files(folder: Path) -> dict[str, bytes]:
    bundle = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(folder)))
    return {name: bundle.read(name) for name in bundle.namelist()}


def test_the_staged_app_is_the_same_bundle_without_the_walk(tmp_path):
    """`mixshow round` hands `flwr run` a copy of what Flower would pack: the same bundle, byte for byte, for
    the project itself and for a folder with an ignored tree, caches, a symlink and nested includes."""
    app = tmp_path / "app"
    for rel, text in {"pyproject.toml": (APP_DIR / "pyproject.toml").read_text(), ".gitignore": "big/\n*.log\n",
                      "a.py": "A = 1\n", "sub/b.json": "{}\n", "sub/deep/c.md": "# c\n", "sub/note.log": "x\n",
                      "big/d.py": "D = 1\n", "__pycache__/e.py": "E = 1\n", "sub/__pycache__/f.py": "",
                      ".venv/lib/g.py": "", "weights.safetensors": "xx"}.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    (tmp_path / "outside.py").write_text("O = 1\n")
    (app / "linked.py").symlink_to(tmp_path / "outside.py")
    (app / "linked-dir").symlink_to(app / "sub", target_is_directory=True)
    staged = [stage_app(source, tmp_path / f"staged-{k}") for k, source in enumerate((app, APP_DIR))]
    for source, copy in zip((app, APP_DIR), staged):
        assert fab_files(copy) == fab_files(source)
    packed = sorted(name for name in fab_files(staged[0]) if not name.startswith(".info/"))
    assert packed == ["a.py", "pyproject.toml", "sub/b.json", "sub/deep/c.md"]
    assert not any((staged[0] / d).exists() for d in ("big", ".venv", "__pycache__", "linked-dir"))  # not walked
    assert not (staged[1] / ".venv").exists()
    assert {"server/app.py", "client/app.py", "shared/fusion.py"} <= set(fab_files(staged[1]))
