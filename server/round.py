"""One fusion round on the server: hand out uploads, collect manifests, verify, fuse, publish.

A round builds on the store's latest version (server.membership): it adds the concepts of new clients,
replaces a client's concept when it uploads a new package, keeps every other concept without asking for it
again, and removes the concepts of clients that withdrew (and those the operator removes). A client's
package is accepted only if every file matches its manifest (size, sha256) and passes the same checks as
`mixshow fuse` (base fingerprint, LoRA shapes, Grams). Fewer than `min_clients` valid replies: the round
fails and nothing is published (LATEST unchanged).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flwr.serverapp import Grid
from rich.console import Console
from rich.table import Table

from protos import mixshow_pb2 as pb
from server.membership import Changes, Previous, record_operator_removals
from server.preservation import read_prompt_file
from server.round_lock import check_round_id_unused, round_lock
from server.settings import RoundSettings
from shared.base import load_base
from shared.checkpoints import publish
from shared.errors import UserError
from shared.package import PACKAGE_FILES
from shared.round_messages import read_manifest_reply, round_message
from shared.signing import load_signing_key
from shared.storage import FileStore, open_store

console = Console(stderr=True)


@dataclass
class RoundOutcome:
    round_id: str
    published: str | None = None
    clients: dict[str, str] = field(default_factory=dict)  # node id -> outcome text
    seconds: dict[str, float] = field(default_factory=dict)  # the server's own work: verify, fuse, publish


def wait_for_nodes(grid: Grid, wanted: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def round_config(store, settings: RoundSettings, round_id: str, node: int, fingerprint: str,
                 known: dict[str, str] | None = None) -> pb.RoundConfig:
    """A node's RoundConfig: where to upload, what to train, and (`known`) the sha256 of its concept's files in
    the latest version, so an unchanged client uploads nothing."""
    prefix = f"rounds/{round_id}/{node}/"
    config = pb.RoundConfig(round_id=round_id, base_fingerprint=fingerprint, prefix=prefix, steps=settings.steps,
                            resolution=settings.resolution, stats_samples=settings.stats_samples,
                            retrain=settings.retrain, known_sha256=known or {})
    if isinstance(store, FileStore):
        config.store_url = store.url
    else:
        for name in PACKAGE_FILES:
            config.upload_urls[name] = store.presigned_put(prefix + name, expires=settings.upload_expiry)
    return config


def run_round(grid: Grid, settings: RoundSettings) -> RoundOutcome:
    """Run one round end to end; raises UserError (after logging) when it fails."""
    store = open_store(settings.store)
    base = load_base(settings.base, sdxl=True)
    round_id = settings.round_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    check_round_id_unused(store, round_id)
    # the lock outlives a round that is killed by at most an hour past its own time limits
    with round_lock(store, round_id, settings.wait + settings.timeout + 3600):
        check_round_id_unused(store, round_id)  # a round with the same id may have finished while we waited
        return _locked_round(grid, settings, store, base, round_id)


def _locked_round(grid: Grid, settings: RoundSettings, store, base, round_id: str) -> RoundOutcome:
    outcome = RoundOutcome(round_id)
    key = load_signing_key(settings.signing_key) if settings.signing_key else None
    work = Path(tempfile.mkdtemp(prefix=f"mixshow-round-{round_id}-"))
    try:
        previous = Previous.pull(store, work / "previous", key.public_key() if key else None, base.fingerprint)
        nodes = wait_for_nodes(grid, settings.min_clients, settings.wait)
        if len(nodes) < settings.min_clients:
            raise UserError(f"round {round_id}: only {len(nodes)} of {settings.min_clients} clients connected")
        messages, by_id = [], {}
        for node in nodes:
            own = previous.owned_by(str(node))
            config = round_config(store, settings, round_id, node, base.fingerprint, own["sha256"] if own else None)
            messages.append(round_message(config, node))
            outcome.clients[str(node)] = "no reply (timeout)"
        replies = list(grid.send_and_receive(messages, timeout=settings.timeout))
        for msg in messages:
            by_id[msg.metadata.message_id] = msg.metadata.dst_node_id
        changes = Changes(previous)
        for name in settings.remove:
            changes.remove_by_operator(name)
        valid, started = 0, time.monotonic()
        for reply in replies:
            node = str(by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))
            if reply.has_error():
                outcome.clients[node] = f"failed: {(reply.error.reason or str(reply.error.code))[:200]}"
                continue
            try:
                outcome.clients[node] = changes.take(node, read_manifest_reply(reply), store, round_id, base,
                                                     work / "uploads" / node, settings.max_upload_mb * 1e6)
                valid += 1
            except UserError as exc:
                outcome.clients[node] = f"rejected: {exc}"
        outcome.seconds["verify"] = round(time.monotonic() - started, 3)
        log(outcome, valid)
        if valid < settings.min_clients:
            raise UserError(f"round {round_id} failed: {valid} valid replies, {settings.min_clients} needed; "
                            "nothing published")
        if not changes.any():
            console.print(f"round {round_id}: nothing changed; {previous.version} stays the latest version")
            return outcome
        started = time.monotonic()
        prompts = read_prompt_file(settings.preserve_prompts) if settings.preserve_prompts else None
        folder = changes.fuse(settings.base, store, work, prompts)
        record_operator_removals(folder, changes.barred)
        outcome.seconds["fuse"], started = round(time.monotonic() - started, 3), time.monotonic()
        manifest = publish(store, folder, round_id, signing_key=key, lineage=changes.lineage())
        outcome.seconds["publish"] = round(time.monotonic() - started, 3)
        outcome.published = manifest.version
        console.print(f"round {round_id}: published fused version {manifest.version} with "
                      f"{', '.join(manifest.concepts)} (parent {manifest.parent or 'none'}; added "
                      f"{', '.join(manifest.added) or 'none'}; replaced {', '.join(manifest.replaced) or 'none'}; "
                      f"removed {', '.join(manifest.removed) or 'none'})")
        return outcome
    finally:
        shutil.rmtree(work, ignore_errors=True)


def log(outcome: RoundOutcome, valid: int) -> None:
    table = Table(title=f"round {outcome.round_id}: {valid} valid package(s)")
    table.add_column("node")
    table.add_column("outcome")
    for node, text in outcome.clients.items():
        table.add_row(node, text)
    console.print(table)
