"""Fused versions in object storage: publish atomically, list, pull with every sha256 verified.

    fused/<version>/<files of the FUSED folder>
    fused/<version>/manifest.pb      FusedManifest (protos): every file with size and sha256; written last.
                                     The fusion state is listed apart (server_files): pulled only on request
    fused/LATEST                     the newest complete version's name; written after the manifest

A version without a manifest is incomplete and invisible; LATEST only moves after the
manifest is stored and read back.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError
from rich.table import Table

from protos import mixshow_pb2 as pb
from shared.atomic import check_fresh_output, staged_dir
from shared.download import check_download_url, download_verified, http_stream, inside, relative_key
from shared.errors import UnsafeManifest, UserError
from shared.fused_model import CONCEPTS_FILE, LORA_FILE, STATE_FILE, read_concepts
from shared.registry_client import RegistryAccess, fetch_manifest
from shared.signing import sign_manifest, verify_manifest
from shared.storage import Store

MANIFEST, LATEST = "manifest.pb", "fused/LATEST"
VERSION = re.compile(r"^v(\d{4,9})$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SERVER_FILES = (STATE_FILE,)  # published and covered by the manifest, but listed apart and pulled on request


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


def publish(store: Store, folder: Path, round_id: str = "", version: str | None = None,
            signing_key: Ed25519PrivateKey | None = None, lineage: dict | None = None) -> pb.FusedManifest:
    """Upload every file of a FUSED folder, then its manifest (signed with `signing_key` if given), then move
    LATEST to it. `lineage`: the version it builds on (`parent`) and the concepts `added`, `replaced` and
    `removed` since."""
    folder = Path(folder)
    info = read_concepts(folder)
    version = version or next_version(store)
    files, server_files = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        stored = store.put_file(f"fused/{version}/{rel}", path)
        (server_files if rel in SERVER_FILES else files).append(
            pb.FileEntry(key=stored.key, size=stored.size, sha256=stored.sha256))
    manifest = pb.FusedManifest(version=version, round_id=round_id, base_fingerprint=info["base_fingerprint"],
                                method=info["method"], concepts=[c["name"] for c in info["concepts"]], files=files,
                                server_files=server_files,
                                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    lineage = lineage or {}
    manifest.parent = lineage.get("parent", "")
    for kind in ("added", "replaced", "removed"):
        getattr(manifest, kind).extend(lineage.get(kind, []))
    if signing_key is not None:
        sign_manifest(manifest, signing_key)
    written = store.put_bytes(f"fused/{version}/{MANIFEST}", manifest.SerializeToString())
    if pb.FusedManifest.FromString(store.get_bytes(written.key, written.sha256)) != manifest:
        raise UserError(f"{store.url}: the manifest of {version} did not read back intact; LATEST not moved")
    store.put_bytes(LATEST, version.encode())
    return manifest


def lineage(store: Store) -> list[pb.VersionSummary]:
    """Every complete version, oldest first, with what each changed (for `mixshow registry --list`)."""
    out = []
    for name in versions(store):
        m = get_manifest(store, name)
        out.append(pb.VersionSummary(version=m.version, parent=m.parent, round_id=m.round_id, created=m.created,
                                     concepts=m.concepts, added=m.added, replaced=m.replaced, removed=m.removed,
                                     signed=bool(m.signature)))
    return out


def lineage_table(summaries: list[pb.VersionSummary], where: str) -> Table:
    """The lineage as a rich table, oldest version first."""
    table = Table(title=f"fused versions in {where}")
    for column in ("version", "parent", "round", "created", "concepts", "added", "replaced", "removed", "signed"):
        table.add_column(column)
    for v in summaries:
        table.add_row(v.version, v.parent or "-", v.round_id or "-", v.created, ", ".join(v.concepts),
                      ", ".join(v.added) or "-", ", ".join(v.replaced) or "-", ", ".join(v.removed) or "-",
                      "yes" if v.signed else "no")
    return table


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


def planned_files(manifest: pb.FusedManifest, version: str, lora_only: bool, where: str, with_state: bool = False,
                  model_only: bool = False) -> list[tuple[pb.FileEntry, str]]:
    """(entry, relative path) of every file to download, each checked before anything is written.

    A version is refused whole when any entry (of `files` or `server_files`) names a path outside
    `fused/<version>/`, repeats a path, or lacks a size or sha256; it must hold concepts.json. The fusion
    state is downloaded only `with_state` (and never with `lora_only`); `model_only` leaves out the fused LoRA
    (the folder alone is a complete model).
    """
    if lora_only and model_only:
        raise UserError("pull the LoRA only or the model only, not both")
    check_version_name(manifest.version, where)
    if version != "latest" and manifest.version != version:
        raise UnsafeManifest(f"{where} answered version {manifest.version} for {version}")
    prefix = f"fused/{manifest.version}/"
    planned, seen = [], set()
    for entry in [*manifest.files, *manifest.server_files]:
        rel = relative_key(entry.key, prefix)
        if rel in seen or rel == MANIFEST:
            raise UnsafeManifest(f"{where}: {entry.key!r} is listed twice (or shadows the manifest)")
        if not SHA256.match(entry.sha256):
            raise UnsafeManifest(f"{where}: {entry.key!r} has no valid sha256")
        seen.add(rel)
        if rel in SERVER_FILES:
            if with_state and not lora_only:
                planned.append((entry, rel))
        elif rel == LORA_FILE and model_only:
            continue
        elif not lora_only or rel in (LORA_FILE, CONCEPTS_FILE):
            planned.append((entry, rel))
    if CONCEPTS_FILE not in seen:
        raise UnsafeManifest(f"{where}: version {manifest.version} lists no {CONCEPTS_FILE}")
    return planned


def pull(store: Store, out: Path, version: str = "latest", lora_only: bool = False, with_state: bool = False,
         trust: Ed25519PublicKey | None = None, model_only: bool = False,
         manifest: pb.FusedManifest | None = None) -> pb.FusedManifest:
    """Download a version into `out` (atomically), verifying every file against the manifest and, with
    `trust`, the manifest's signature; the fusion state only `with_state`. `manifest`: the version's manifest
    when the caller has just read it (`get_manifest(store, version)`), not read again."""
    check_fresh_output(Path(out), "out")
    manifest = manifest or get_manifest(store, version)
    if trust is not None:
        verify_manifest(manifest, trust, store.url)
    files = planned_files(manifest, version, lora_only, store.url, with_state, model_only)
    with staged_dir(Path(out)) as stage:
        for entry, rel in files:
            store.get_file(entry.key, inside(stage, rel), entry.sha256, entry.size)
        (stage / MANIFEST).write_bytes(manifest.SerializeToString())
    return manifest


def pull_from_registry(address: str, out: Path, version: str = "latest", lora_only: bool = False,
                       with_state: bool = False, trust: Ed25519PublicKey | None = None,
                       access: RegistryAccess | None = None, model_only: bool = False) -> pb.FusedManifest:
    """Download a version through a registry's presigned URLs, verifying every file.

    Every key and URL of the registry's answer is checked before the first byte is fetched.
    """
    check_fresh_output(Path(out), "out")
    manifest = fetch_manifest(address, version, with_state=with_state, access=access)
    where = f"registry {address}"
    if trust is not None:
        verify_manifest(manifest, trust, where)
    files = planned_files(manifest, version, lora_only, where, with_state, model_only)
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
