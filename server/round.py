"""One fusion round on the server: hand out uploads, collect manifests, verify, fuse, publish.

A client's package is accepted only if every file matches its manifest (size, sha256) and
passes the same checks as `mixshow fuse` (base fingerprint, LoRA shapes, Grams). Fewer than
`min_clients` valid packages: the round fails and nothing is published (LATEST unchanged).
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
from server.fuse import fuse, read_source
from server.settings import RoundSettings
from shared.base import load_base
from shared.checkpoints import publish
from shared.errors import UserError
from shared.package import PACKAGE_FILES
from shared.round_messages import read_manifest_reply, round_message
from shared.storage import FileStore, open_store

console = Console(stderr=True)


@dataclass
class RoundOutcome:
    round_id: str
    published: str | None = None
    clients: dict[str, str] = field(default_factory=dict)  # node id -> outcome text


def wait_for_nodes(grid: Grid, wanted: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def round_config(store, settings: RoundSettings, round_id: str, node: int, fingerprint: str) -> pb.RoundConfig:
    prefix = f"rounds/{round_id}/{node}/"
    config = pb.RoundConfig(round_id=round_id, base_fingerprint=fingerprint, prefix=prefix, steps=settings.steps,
                            resolution=settings.resolution, stats_samples=settings.stats_samples,
                            retrain=settings.retrain)
    if isinstance(store, FileStore):
        config.store_url = store.url
    else:
        for name in PACKAGE_FILES:
            config.upload_urls[name] = store.presigned_put(prefix + name)
    return config


def verify(store, manifest: pb.ConceptManifest, prefix: str, base, folder: Path) -> Path:
    """Download a client's files against its manifest and check the package like `mixshow fuse` does."""
    names = {entry.key: entry for entry in manifest.files}
    for name in PACKAGE_FILES:
        entry = names.get(prefix + name)
        if entry is None:
            raise UserError(f"manifest lacks {name}")
        store.get_file(entry.key, folder / name, entry.sha256, entry.size)
    read_source(folder, base, need_stats=True)
    return folder


def run_round(grid: Grid, settings: RoundSettings) -> RoundOutcome:
    """Run one round end to end; raises UserError (after logging) when it fails."""
    store = open_store(settings.store)
    base = load_base(settings.base)
    round_id = settings.round_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    outcome = RoundOutcome(round_id)
    nodes = wait_for_nodes(grid, settings.min_clients, settings.wait)
    if len(nodes) < settings.min_clients:
        raise UserError(f"round {round_id}: only {len(nodes)} of {settings.min_clients} clients connected")
    messages, by_id = [], {}
    for node in nodes:
        messages.append(round_message(round_config(store, settings, round_id, node, base.fingerprint), node))
        outcome.clients[str(node)] = "no reply (timeout)"
    replies = list(grid.send_and_receive(messages, timeout=settings.timeout))
    for msg in messages:
        by_id[msg.metadata.message_id] = msg.metadata.dst_node_id
    work = Path(tempfile.mkdtemp(prefix=f"mixshow-round-{round_id}-"))
    valid = []
    try:
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                outcome.clients[str(node)] = f"failed: {(reply.error.reason or str(reply.error.code))[:200]}"
                continue
            try:
                manifest = read_manifest_reply(reply)
                verify(store, manifest, f"rounds/{round_id}/{node}/", base, work / str(node))
            except UserError as exc:
                outcome.clients[str(node)] = f"rejected: {exc}"
                continue
            valid.append(work / str(node))
            outcome.clients[str(node)] = f"ok: {manifest.concept_name}" + (" (reused)" if manifest.reused else "")
        log(outcome, len(valid))
        if len(valid) < settings.min_clients:
            raise UserError(f"round {round_id} failed: {len(valid)} valid packages, {settings.min_clients} needed; "
                            "nothing published")
        fuse(settings.base, valid, work / "fused", show_progress=False)
        manifest = publish(store, work / "fused", round_id)
        outcome.published = manifest.version
        console.print(f"round {round_id}: published fused version {manifest.version} with "
                      f"{', '.join(manifest.concepts)}")
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
