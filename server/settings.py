"""A round's settings. Their one source of defaults is the app's pyproject.toml, section
`[tool.flwr.app.config]` (which Flower also reads for `flwr run`); anything given (run config,
flags) overrides them and is checked here, so every entry point sees the same values."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidArgument, UserError
from shared.validate import number

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (Python 3.10: flwr depends on tomli)
    import tomli as tomllib

APP_DIR = Path(__file__).resolve().parents[1]


def app_config(app_dir: Path = APP_DIR) -> dict:
    """`[tool.flwr.app.config]` of the app's pyproject.toml: every round setting with its default."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return dict(data["tool"]["flwr"]["app"]["config"])
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"the app's settings are unreadable ({path}: {exc}); reinstall mixshow from its "
                        "project folder") from exc


@dataclass(frozen=True)
class RoundSettings:
    """Everything one fusion round needs; build it with `from_config`."""

    store: str
    base: Path
    min_clients: int
    timeout: float  # seconds to wait for the clients' replies
    wait: float  # seconds to wait for min_clients nodes to connect
    steps: int  # 0: the clients' defaults
    resolution: int
    stats_samples: int
    retrain: bool
    round_id: str

    @classmethod
    def from_config(cls, given: Mapping) -> RoundSettings:
        """The pyproject defaults overridden by `given` (kebab-case keys, as in the run config), all checked."""
        defaults = app_config()
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise InvalidArgument(unknown[0].replace("-", "_"), f"is not a round setting (known: "
                                                                f"{', '.join(sorted(defaults))})")
        cfg = {**defaults, **given}
        retrain = cfg["retrain"]
        if not isinstance(retrain, bool):
            raise InvalidArgument("retrain", f"{retrain!r} is not true or false")
        return cls(store=str(cfg["store"]), base=Path(str(cfg["base"])),
                   min_clients=number("min_clients", cfg["min-clients"], 1, 100_000, integer=True),
                   timeout=number("timeout", cfg["timeout"], 0, 7 * 86400, low_open=True),
                   wait=number("wait", cfg["wait"], 0, 7 * 86400),
                   steps=number("steps", cfg["steps"], 0, 10_000_000, integer=True),
                   resolution=number("resolution", cfg["resolution"], 0, 8192, integer=True),
                   stats_samples=number("stats_samples", cfg["stats-samples"], 0, 100_000, integer=True),
                   retrain=retrain, round_id=str(cfg["round-id"]))

    def run_config(self) -> dict:
        """The settings as `flwr run --run-config` values (kebab-case keys)."""
        return {"store": self.store, "base": str(self.base), "min-clients": self.min_clients, "timeout": self.timeout,
                "wait": self.wait, "steps": self.steps, "resolution": self.resolution,
                "stats-samples": self.stats_samples, "retrain": self.retrain, "round-id": self.round_id}
