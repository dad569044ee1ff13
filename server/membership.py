"""Which concepts a round's version holds: the latest version's, plus new clients', minus withdrawn ones.

The latest version is pulled with its fusion state (and its signature checked when the server signs). Each
of its concepts records the node that contributed it (`client`) and where its package was uploaded
(`source`), so a later round can tell a client's new package from a new client, can honour a withdrawal
only from the node that contributed the concept, and can fetch a concept's own package again, verified by
the sha256s the version recorded, to take it out of the fusion state. The new version is an incremental
`fuse` of that state, which equals a fusion of the resulting set from scratch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protos import mixshow_pb2 as pb
from server.fuse import fuse, read_source
from shared.base import Base
from shared.checkpoints import get_manifest, latest, pull
from shared.errors import UserError
from shared.fused_model import (
    BARRED_KEY,
    CONCEPTS_FILE,
    operator_removals,  # noqa: F401 (the membership rules read it from here too)
    read_concepts,
)
from shared.package import META_FILE, PACKAGE_FILES
from shared.storage import Store


@dataclass
class Previous:
    """The latest version a round builds on (none for the first round)."""

    version: str = ""
    folder: Path | None = None
    records: list[dict] = field(default_factory=list)
    barred: list[dict] = field(default_factory=list)  # concepts the operator removed: {"name", "client"}

    @classmethod
    def pull(cls, store: Store, folder: Path, trust: Ed25519PublicKey | None, fingerprint: str) -> Previous:
        """The latest version with its state; none when there is none, or when it was fused on another base
        (a new base starts a new lineage: its clients train for it anew)."""
        name = latest(store)
        manifest = get_manifest(store, name) if name is not None else None
        if manifest is None or manifest.base_fingerprint != fingerprint:
            return cls()
        pull(store, folder, name, with_state=True, trust=trust, manifest=manifest)
        info = read_concepts(folder)  # checked there, the operator's removals too
        return cls(name, folder, list(info["concepts"]), info[BARRED_KEY])

    def owned_by(self, node: str) -> dict | None:
        return next((r for r in self.records if str(r.get("client", "")) == node), None)

    def named(self, name: str) -> dict | None:
        return next((r for r in self.records if r["name"] == name), None)


def record_operator_removals(folder: Path, barred: list[dict]) -> None:
    """Write the operator's removals into the new version's concepts.json (published and signed with it)."""
    path = folder / CONCEPTS_FILE
    info = json.loads(path.read_text())
    info[BARRED_KEY] = barred
    path.write_text(json.dumps(info, indent=2))


def verify(store, manifest: pb.ConceptManifest, prefix: str, base, folder: Path, max_bytes: float = float("inf")
           ) -> Path:
    """Download a client's files against its manifest and check the package like `mixshow fuse` does; a file
    larger than `max_bytes` (as the manifest says, or as the store says) is refused before any download."""
    names = {entry.key: entry for entry in manifest.files}
    entries = []
    for name in PACKAGE_FILES:
        entry = names.get(prefix + name)
        if entry is None:
            raise UserError(f"manifest lacks {name}")
        stored = store.info(entry.key)
        if stored is None:
            raise UserError(f"{name} was never uploaded ({entry.key} is not in the store)")
        size = max(stored.size, entry.size)
        if size > max_bytes:
            raise UserError(f"{name} is {size / 1e6:.1f} MB, over the round's upload limit of {max_bytes / 1e6:g} MB "
                            "(max-upload-mb); not downloaded")
        entries.append((name, entry))
    for name, entry in entries:
        store.get_file(entry.key, folder / name, entry.sha256, entry.size)
    read_source(folder, base, need_stats=True)
    return folder


class Changes:
    """What a round does to the previous version, built reply by reply."""

    def __init__(self, previous: Previous):
        self.previous = previous
        self.added: list[str] = []
        self.replaced: list[str] = []
        self.removed: list[str] = []
        self.packages: list[Path] = []
        self.origins: dict[str, dict] = {}
        self.barred: list[dict] = list(previous.barred)

    def any(self) -> bool:
        return bool(self.added or self.replaced or self.removed)

    def remove_by_operator(self, name: str) -> None:
        if name in self.removed:
            return
        record = self.previous.named(name)
        if record is None:
            have = ", ".join(r["name"] for r in self.previous.records) or "none"
            raise UserError(f"remove {name!r}: the latest version {self.previous.version or '(none)'} has no concept "
                            f"of that name (it has: {have})")
        self.removed.append(name)
        # barred from coming back: its node, still connected, would otherwise upload it again next round
        self.barred.append({"name": name, "client": str(record.get("client", ""))})

    def take(self, node: str, manifest: pb.ConceptManifest, store: Store, round_id: str, base: Base,
             folder: Path, max_bytes: float) -> str:
        """Account for one client's reply; returns the outcome line, raises UserError to reject it."""
        own = self.previous.owned_by(node)
        if manifest.withdraw:
            if own is None:  # withdrawn at an earlier round, or never contributed: nothing left to remove
                return f"withdrawn (no concept of this node in {self.previous.version or 'any version'})"
            if own["name"] not in self.removed:
                self.removed.append(own["name"])
            return f"withdrawn: {own['name']}"
        if manifest.unchanged:
            if own is None:
                raise UserError(f"says its package is unchanged, but {self.previous.version or 'no version'} holds "
                                "no concept of this node")
            return f"ok: {own['name']} (unchanged, kept)"
        prefix = f"rounds/{round_id}/{node}/"
        verify(store, manifest, prefix, base, folder, max_bytes)
        name = json.loads((folder / META_FILE).read_text())["name"]
        holder = self.previous.named(name)
        if holder is not None and holder is not own:
            raise UserError(f"concept name {name!r} belongs to another node's concept in {self.previous.version}; "
                            "choose another name")
        if name in self.origins:
            raise UserError(f"two clients sent a concept named {name!r} in this round; choose another name")
        if own is None and {"name": name, "client": node} in self.barred:
            return f"refused: {name} was removed by the operator; this node's concept is not taken again"
        if own is not None and own["name"] not in self.removed:
            self.removed.append(own["name"])
            (self.replaced if own["name"] == name else self.added).append(name)
        else:
            self.added.append(name)
        self.packages.append(folder)
        self.origins[name] = {"client": node, "source": prefix}
        return f"ok: {name}" + (" (reused)" if manifest.reused else "")

    def fuse(self, base_path: Path, store: Store, work: Path, preserve_prompts: list[str] | None = None) -> Path:
        """The new version's FUSED folder: an incremental fusion of the previous state (which keeps its own
        preservation prompts), or one from scratch, preserving the base on `preserve_prompts`."""
        out = work / "fused"
        if self.previous.folder is None:
            fuse(base_path, self.packages, out, show_progress=False, origins=self.origins,
                 preserve=len(preserve_prompts or []), preserve_prompts=preserve_prompts or None)
            return out
        left = [r["name"] for r in self.previous.records if r["name"] not in self.removed]
        if not left and not self.packages:
            raise UserError(f"every concept of {self.previous.version} would be removed and none added: nothing to "
                            f"publish ({self.previous.version} stays the latest version)")
        self._fetch_removed(store, work / "removed")
        fuse(base_path, self.packages, out, from_dir=self.previous.folder, remove=list(self.removed),
             show_progress=False, origins=self.origins)
        return out

    def _fetch_removed(self, store: Store, root: Path) -> None:
        """Download each removed concept's own package (verified against the sha256s its version recorded)
        and point the previous concepts.json at it: taking a concept out of the state needs its Grams."""
        info = json.loads((self.previous.folder / CONCEPTS_FILE).read_text())
        for record in info["concepts"]:
            if record["name"] not in self.removed:
                continue
            source = record.get("source")
            if not isinstance(source, str) or not source.startswith("rounds/"):
                raise UserError(f"concept {record['name']} of {self.previous.version} records no upload to fetch its "
                                "package from (it was not fused by a round); fuse its removal offline")
            for name in PACKAGE_FILES:
                store.get_file(source + name, root / record["name"] / name, record["sha256"].get(name))
            record["package"] = str((root / record["name"]).resolve())
        (self.previous.folder / CONCEPTS_FILE).write_text(json.dumps(info, indent=2))

    def lineage(self) -> dict:
        return {"parent": self.previous.version, "added": self.added, "replaced": self.replaced,
                "removed": [n for n in self.removed if n not in self.replaced]}
