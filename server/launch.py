"""Launch a fusion round on a SuperLink with `flwr run` and follow it to its end.

`flwr run` exits 0 even when the run failed, so the outcome is read from the SuperLink's run list (as
`flwr ls` reads it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from server.settings import APP_DIR
from shared.errors import InvalidArgument, UserError

CONNECTION = "mixshow"


def flwr_env(superlink: str, root_cert: Path | None, insecure: bool) -> dict[str, str]:
    """Environment for the flwr CLI with a connection named `mixshow` to `superlink`."""
    home = Path(os.environ.get("FLWR_HOME") or tempfile.mkdtemp(prefix="mixshow-flwr-"))
    home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{CONNECTION}]", f'address = "{superlink}"']
    lines.append("insecure = true" if insecure else f'root-certificates = "{Path(root_cert).resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def check_superlink(superlink: str, root_cert: Path | None, insecure: bool, timeout: float = 5.0) -> None:
    """GET /health on the SuperLink, or a UserError saying it cannot be reached."""
    scheme = "http" if insecure else "https"
    context = None
    if not insecure:
        import ssl

        if root_cert is None:
            raise InvalidArgument("root_cert", "a CA certificate is required unless the connection is insecure")
        context = ssl.create_default_context(cafile=str(root_cert))
    try:
        with urllib.request.urlopen(f"{scheme}://{superlink}/health", timeout=timeout, context=context) as r:
            if r.status != 200:
                raise UserError(f"SuperLink {superlink} is not healthy (HTTP {r.status})")
    except OSError as exc:
        raise UserError(f"SuperLink {superlink} is unreachable ({exc}); is it running?") from exc


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy into `dest` the files of `app_dir` that Flower packs into the app bundle (FAB), and nothing else.

    `flwr run` lists every file under the app folder before it filters them, the project's virtual
    environment included (about 57,000 files: 3.5 s a round on a 2-core machine). Here ignored folders are
    skipped as they are found, with Flower's own patterns and the app's .gitignore, so Flower builds the same
    bundle from `dest` in milliseconds."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS, APP_PUBLISH_INCLUDE_PATTERNS

    gitignore = app_dir / ".gitignore"
    skip = build_pathspec([*APP_PUBLISH_EXCLUDE_PATTERNS,
                           *(load_gitignore_patterns(gitignore) if gitignore.is_file() else [])])
    take = build_pathspec(APP_PUBLISH_INCLUDE_PATTERNS)
    for folder, subfolders, files in os.walk(app_dir):
        relative = Path(folder).relative_to(app_dir)
        subfolders[:] = [d for d in subfolders if not skip.match_file(f"{(relative / d).as_posix()}/")
                         and not (Path(folder) / d).is_symlink()]
        for name in files:
            rel = (relative / name).as_posix()
            source = Path(folder) / name
            if take.match_file(rel) and not skip.match_file(rel) and not source.is_symlink():
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest / rel)
    return dest


def launch_round(superlink: str, run_config: dict, root_cert: Path | None = None, insecure: bool = False,
                 poll: float = 1.0, timeout: float = 3600.0, log=print) -> dict:
    """Start the round, wait for it to finish; return the run's status record (UserError when it failed)."""
    check_superlink(superlink, root_cert, insecure)
    env = flwr_env(superlink, root_cert, insecure)
    flwr = shutil.which("flwr", path=env["PATH"]) or "flwr"
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    with tempfile.TemporaryDirectory(prefix="mixshow-app-") as staged:
        command = [flwr, "run", str(stage_app(APP_DIR, Path(staged))), CONNECTION, "--format", "json"]
        if overrides:
            command += ["--run-config", overrides]
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    try:
        answer = json.loads(started.stdout)
    except json.JSONDecodeError:
        answer = {}
    if not isinstance(answer, dict) or not answer.get("success") or not str(answer.get("run-id", "")).isdigit():
        detail = answer.get("error-message") if isinstance(answer, dict) else None
        raise UserError(f"flwr run failed: {(detail or started.stderr or started.stdout).strip()[-400:]}")
    run_id = int(answer["run-id"])
    log(f"run {run_id} started on {superlink}")
    deadline = time.monotonic() + timeout
    with control_client(superlink, root_cert, insecure) as client:
        while time.monotonic() < deadline:
            status, details = run_status(client, run_id)
            if status.startswith("finished"):
                if status != "finished:completed":
                    raise UserError(f"round run {run_id} ended {status}: {details}")
                return {"run-id": run_id, "status": status, "status-details": details}
            time.sleep(poll)
    raise UserError(f"round run {run_id} did not finish within {timeout:.0f} s")


@contextmanager
def control_client(superlink: str, root_cert: Path | None, insecure: bool) -> Iterator:
    """Flower's HTTP client of the SuperLink's Control API, in this process: polling a run through `flwr ls`
    cost a Python start-up (about a CPU-second) every poll."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    connection = SuperLinkConnection(CONNECTION, address=superlink, insecure=insecure,
                                     root_certificates=None if insecure else str(Path(root_cert).resolve()))
    with redirect_stdout(io.StringIO()):  # it announces the connection on stdout
        client = init_http_client_from_connection(connection)
    try:
        yield client
    finally:
        client.close()


def run_status(client, run_id: int) -> tuple[str, str]:
    """("status:sub-status", details) of one run, as `flwr ls` prints them; ("unknown", reason) when the
    SuperLink does not answer this time (the caller polls again)."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

    try:
        answer = client.ListRuns(ListRunsRequest(run_id=run_id))
        run = run_from_proto(answer.run_dict[run_id])
    except Exception as exc:  # noqa: BLE001 - a transient HTTP failure or a run not listed yet
        return "unknown", str(exc)
    status = run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else "")
    return status, run.status.details or ""
