"""Fused versions in object storage: publish atomically, list, pull with every sha256 verified.

    fused/<version>/<files of the FUSED folder>
    fused/<version>/manifest.pb      FusedManifest (protos): every file with size and sha256; written last
    fused/LATEST                     the newest complete version's name; written after the manifest

A version without a manifest is incomplete and invisible; LATEST only moves after the
manifest is stored and read back.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from google.protobuf.message import DecodeError

from protos import mixshow_pb2 as pb
from shared.atomic import check_fresh_output, staged_dir
from shared.download import check_download_url, download_verified, http_stream, inside, relative_key
from shared.errors import UnsafeManifest, UserError
from shared.fused_model import CONCEPTS_FILE, LORA_FILE, read_concepts
from shared.registry_client import fetch_manifest
from shared.storage import Store

MANIFEST, LATEST = "manifest.pb", "fused/LATEST"
VERSION = re.compile(r"^v(\d{4,9})$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def versions(store: Store) -> list[str]:
    """Complete versions (with a manifest), oldest first."""
    names = {key.split("/")[1] for key in store.list("fused/") if key.endswith(f"/{MANIFEST}")}
    return sorted((n for n in names if VERSION.match(n)), key=lambda n: int(n[1:]))


def check_version_name(name: str, where: str) -> str:
    if not isinstance(name, str) or not VERSION.match(name):
        raise UnsafeManifest(f"{where} names version {name[:40]!r}; versions are v0001, v0002, ...")
    return name


def latest(store: Store) -> str | None:
    if store.info(LATEST) is None:
        return None
    text = store.get_bytes(LATEST).decode("ascii", "replace").strip()
    return check_version_name(text, f"{store.url}/{LATEST}")


def next_version(store: Store) -> str:
    """One past every version ever started (complete or not), so a failed publish never reuses a name."""
    started = {key.split("/")[1] for key in store.list("fused/") if key.count("/") >= 2}
    numbers = [int(m.group(1)) for n in started if (m := VERSION.match(n))]
    return f"v{max(numbers, default=0) + 1:04d}"


def publish(store: Store, folder: Path, round_id: str = "", version: str | None = None) -> pb.FusedManifest:
    """Upload every file of a FUSED folder, then its manifest, then move LATEST to it."""
    folder = Path(folder)
    info = read_concepts(folder)
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


def decode_manifest(data: bytes, where: str) -> pb.FusedManifest:
    try:
        return pb.FusedManifest.FromString(data)
    except DecodeError as exc:
        raise UserError(f"{where} is not a fused-version manifest (protobuf does not decode: {exc})") from exc


def get_manifest(store: Store, version: str = "latest") -> pb.FusedManifest:
    """The manifest of `version` (or of LATEST); a clear error for unknown versions."""
    name = latest(store) if version == "latest" else check_version_name(version, "the request")
    if name is None:
        raise UserError(f"{store.url} has no published fused version yet")
    key = f"fused/{name}/{MANIFEST}"
    if store.info(key) is None:
        known = ", ".join(versions(store)) or "none"
        raise UserError(f"version {name!r} does not exist in {store.url} (complete versions: {known})")
    manifest = decode_manifest(store.get_bytes(key), f"{store.url}/{key}")
    if manifest.version != name:
        raise UnsafeManifest(f"{store.url}/{key} describes version {manifest.version[:40]!r}, not {name}")
    return manifest


def planned_files(manifest: pb.FusedManifest, version: str, lora_only: bool, where: str
                  ) -> list[tuple[pb.FileEntry, str]]:
    """(entry, relative path) of every file to download, each checked before anything is written.

    A version is refused whole when any entry names a path outside `fused/<version>/`, repeats a
    path, or lacks a size or sha256; it must hold concepts.json.
    """
    check_version_name(manifest.version, where)
    if version != "latest" and manifest.version != version:
        raise UnsafeManifest(f"{where} answered version {manifest.version} for {version}")
    prefix = f"fused/{manifest.version}/"
    planned, seen = [], set()
    for entry in manifest.files:
        rel = relative_key(entry.key, prefix)
        if rel in seen or rel == MANIFEST:
            raise UnsafeManifest(f"{where}: {entry.key!r} is listed twice (or shadows the manifest)")
        if not SHA256.match(entry.sha256):
            raise UnsafeManifest(f"{where}: {entry.key!r} has no valid sha256")
        seen.add(rel)
        if not lora_only or rel in (LORA_FILE, CONCEPTS_FILE):
            planned.append((entry, rel))
    if CONCEPTS_FILE not in seen:
        raise UnsafeManifest(f"{where}: version {manifest.version} lists no {CONCEPTS_FILE}")
    return planned


def pull(store: Store, out: Path, version: str = "latest", lora_only: bool = False) -> pb.FusedManifest:
    """Download a version into `out` (atomically), verifying every file against the manifest."""
    check_fresh_output(Path(out), "out")
    manifest = get_manifest(store, version)
    files = planned_files(manifest, version, lora_only, store.url)
    with staged_dir(Path(out)) as stage:
        for entry, rel in files:
            store.get_file(entry.key, inside(stage, rel), entry.sha256, entry.size)
        (stage / MANIFEST).write_bytes(manifest.SerializeToString())
    return manifest


def pull_from_registry(address: str, out: Path, version: str = "latest", lora_only: bool = False
                       ) -> pb.FusedManifest:
    """Download a version through a registry's presigned URLs, verifying every file.

    Every key and URL of the registry's answer is checked before the first byte is fetched.
    """
    check_fresh_output(Path(out), "out")
    manifest = fetch_manifest(address, version)
    where = f"registry {address}"
    files = planned_files(manifest, version, lora_only, where)
    for entry, _ in files:
        if not entry.url:
            raise UserError(f"{where} gives no download URLs (a file:// store): pull with store= instead")
        check_download_url(entry.url, f"{where}: {entry.key}")
    with staged_dir(Path(out)) as stage:
        for entry, rel in files:
            download_verified(lambda e=entry: http_stream(e.url), inside(stage, rel), entry.sha256, entry.size,
                              f"{entry.key} from {where}")
        (stage / MANIFEST).write_bytes(manifest.SerializeToString())
    return manifest
