"""A round's settings. Their one source of defaults is the app's pyproject.toml, section
`[tool.flwr.app.config]` (which Flower also reads for `flwr run`); anything given (run config,
flags) overrides them and is checked here, so every entry point sees the same values."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from server.preservation import read_prompt_file
from shared.errors import InvalidArgument, UserError
from shared.signing import load_signing_key
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
    signing_key: Path | None = None  # signs each published version (shared.signing)
    max_upload_mb: float = 1024.0  # a client's file over this size is refused before it is downloaded
    remove: tuple[str, ...] = ()  # concepts the operator removes at this round
    preserve_prompts: Path | None = None  # a federation's first fusion keeps the base on these prompts

    @property
    def upload_expiry(self) -> timedelta:
        """How long a client's presigned upload URLs live: the round's reply timeout and 5 minutes for the last
        upload to finish, never more than S3's limit of 7 days; an URL cannot be used after its round."""
        return timedelta(seconds=min(self.timeout + 300, 7 * 86400))

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
                   retrain=retrain, round_id=str(cfg["round-id"]),
                   signing_key=checked_file(cfg["signing-key"], "signing_key", load_signing_key),
                   max_upload_mb=number("max_upload_mb", cfg["max-upload-mb"], 0, 10**7, low_open=True),
                   remove=names_list(cfg["remove"]),
                   preserve_prompts=checked_file(cfg["preserve-prompts"], "preserve_prompts", read_prompt_file))

    def run_config(self) -> dict:
        """The settings as `flwr run --run-config` values (kebab-case keys)."""
        return {"store": self.store, "base": str(self.base), "min-clients": self.min_clients, "timeout": self.timeout,
                "wait": self.wait, "steps": self.steps, "resolution": self.resolution,
                "stats-samples": self.stats_samples, "retrain": self.retrain, "round-id": self.round_id,
                "signing-key": str(self.signing_key or ""), "max-upload-mb": self.max_upload_mb,
                "remove": ",".join(self.remove), "preserve-prompts": str(self.preserve_prompts or "")}


def names_list(value: object) -> tuple[str, ...]:
    """The remove setting: concept names separated by commas ("" for none)."""
    if not isinstance(value, str):
        raise InvalidArgument("remove", f"{value!r} is not a comma-separated list of concept names")
    return tuple(n.strip() for n in value.split(",") if n.strip())


def checked_file(value: object, argument: str, check: Callable[[Path], object]) -> Path | None:
    """A file setting: "" for none, else a path that `check` reads without error (checked now, so a bad file
    fails before the round starts)."""
    if not isinstance(value, str):
        raise InvalidArgument(argument, f"{value!r} is not a path")
    if not value:
        return None
    check(Path(value))
    return Path(value).resolve()
