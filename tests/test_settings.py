"""Round settings have one source: pyproject.toml's [tool.flwr.app.config]."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from server.settings import RoundSettings
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
