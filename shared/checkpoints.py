"""Fused versions in object storage: publish atomically, list, pull with every sha256 verified.

    fused/<version>/<files of the FUSED folder>
    fused/<version>/manifest.pb      FusedManifest (protos): every file with size and sha256; written last
    fused/LATEST                     the newest complete version's name; written after the manifest

A version without a manifest is incomplete and invisible; LATEST only moves after the
manifest is stored and read back.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

from protos import mixshow_pb2 as pb
from shared.atomic import check_fresh_output, staged_dir
from shared.errors import UserError
from shared.fused_model import CONCEPTS_FILE, LORA_FILE
from shared.storage import Store

MANIFEST, LATEST = "manifest.pb", "fused/LATEST"
VERSION = re.compile(r"^v(\d{4,})$")


def versions(store: Store) -> list[str]:
    """Complete versions (with a manifest), oldest first."""
    names = {key.split("/")[1] for key in store.list("fused/") if key.endswith(f"/{MANIFEST}")}
    return sorted((n for n in names if VERSION.match(n)), key=lambda n: int(n[1:]))


def latest(store: Store) -> str | None:
    info = store.info(LATEST)
    return store.get_bytes(LATEST).decode().strip() if info else None


def next_version(store: Store) -> str:
    """One past every version ever started (complete or not), so a failed publish never reuses a name."""
    started = {key.split("/")[1] for key in store.list("fused/") if key.count("/") >= 2}
    numbers = [int(m.group(1)) for n in started if (m := VERSION.match(n))]
    return f"v{max(numbers, default=0) + 1:04d}"


def publish(store: Store, folder: Path, round_id: str = "", version: str | None = None) -> pb.FusedManifest:
    """Upload every file of a FUSED folder, then its manifest, then move LATEST to it."""
    folder = Path(folder)
    info = json.loads((folder / CONCEPTS_FILE).read_text())
    version = version or next_version(store)
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        stored = store.put_file(f"fused/{version}/{rel}", path)
        files.append(pb.FileEntry(key=stored.key, size=stored.size, sha256=stored.sha256))
    manifest = pb.FusedManifest(version=version, round_id=round_id, base_fingerprint=info["base_fingerprint"],
                                method=info["method"], concepts=[c["name"] for c in info["concepts"]], files=files,
                                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    written = store.put_bytes(f"fused/{version}/{MANIFEST}", manifest.SerializeToString())
    if pb.FusedManifest.FromString(store.get_bytes(written.key, written.sha256)) != manifest:
        raise UserError(f"{store.url}: the manifest of {version} did not read back intact; LATEST not moved")
    store.put_bytes(LATEST, version.encode())
    return manifest


def get_manifest(store: Store, version: str = "latest") -> pb.FusedManifest:
    """The manifest of `version` (or of LATEST); a clear error for unknown versions."""
    name = latest(store) if version == "latest" else version
    if name is None:
        raise UserError(f"{store.url} has no published fused version yet")
    if store.info(f"fused/{name}/{MANIFEST}") is None:
        known = ", ".join(versions(store)) or "none"
        raise UserError(f"version {name!r} does not exist in {store.url} (complete versions: {known})")
    return pb.FusedManifest.FromString(store.get_bytes(f"fused/{name}/{MANIFEST}"))


def pull(store: Store, out: Path, version: str = "latest", lora_only: bool = False) -> pb.FusedManifest:
    """Download a version into `out` (atomically), verifying every file against the manifest."""
    check_fresh_output(Path(out), "--out")
    manifest = get_manifest(store, version)
    prefix = f"fused/{manifest.version}/"
    wanted = [f for f in manifest.files if not lora_only or f.key[len(prefix):] in (LORA_FILE, CONCEPTS_FILE)]
    with staged_dir(Path(out)) as stage:
        for entry in wanted:
            got = store.get_file(entry.key, stage / entry.key[len(prefix):], entry.sha256)
            if got.size != entry.size:
                raise UserError(f"{entry.key} has {got.size} bytes, the manifest says {entry.size}")
        (stage / MANIFEST).write_bytes(manifest.SerializeToString())
    return manifest


def pull_from_registry(address: str, out: Path, version: str = "latest", lora_only: bool = False
                       ) -> pb.FusedManifest:
    """Download a version through a registry's presigned URLs, verifying every file."""
    import hashlib
    import urllib.request

    from server.registry import fetch_manifest

    check_fresh_output(Path(out), "--out")
    manifest = fetch_manifest(address, version)
    prefix = f"fused/{manifest.version}/"
    with staged_dir(Path(out)) as stage:
        for entry in manifest.files:
            rel = entry.key[len(prefix):]
            if lora_only and rel not in (LORA_FILE, CONCEPTS_FILE):
                continue
            if not entry.url:
                raise UserError(f"registry {address} gives no download URLs (a file:// store): use --store")
            with urllib.request.urlopen(entry.url, timeout=300) as response:
                data = response.read()
            if hashlib.sha256(data).hexdigest() != entry.sha256 or len(data) != entry.size:
                raise UserError(f"{entry.key} from {address} does not match the manifest (sha256/size)")
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_bytes(data)
        (stage / MANIFEST).write_bytes(manifest.SerializeToString())
    return manifest
