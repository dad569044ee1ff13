"""A client's part in a fusion round: train (or reuse) its package, compute its Grams, upload, describe.

Only the small ConceptManifest goes back through Flower; the files go to object storage,
through presigned PUT URLs for exactly this client's keys (S3) or into a file:// store.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from client.config import load_config
from client.stats import compute_stats
from client.train import train_concept
from protos import mixshow_pb2 as pb
from shared.base import load_base
from shared.device import parse_device, parse_dtype
from shared.errors import UserError
from shared.package import META_FILE, PACKAGE_FILES, read_package
from shared.stats_file import STATS_FILE
from shared.storage import open_store, sha256_file


@dataclass
class NodeSettings:
    """A SuperNode's own settings (its node config): where its data is and what its concept is."""

    name: str
    data_dir: Path
    words: list[str]
    class_word: str
    base: Path
    work_dir: Path
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def from_node_config(cls, cfg: dict) -> NodeSettings:
        missing = [k for k in ("name", "data-dir", "words", "class-word", "base") if k not in cfg]
        if missing:
            raise UserError(f"node config lacks {', '.join(missing)} (set them with mixshow join)")
        return cls(str(cfg["name"]), Path(str(cfg["data-dir"])), str(cfg["words"]).split(), str(cfg["class-word"]),
                   Path(str(cfg["base"])), Path(str(cfg.get("work-dir", Path.home() / ".mixshow" / "client"))),
                   str(cfg.get("device", "cpu")), str(cfg.get("dtype", "float32")))


def package_for(config: pb.RoundConfig, node: NodeSettings) -> tuple[Path, bool]:
    """This node's package for the round's base: reused if already trained (unless told to retrain)."""
    pkg = node.work_dir / config.base_fingerprint[:16] / node.name
    if pkg.is_dir() and (pkg / STATS_FILE).is_file() and not config.retrain:
        meta, _ = read_package(pkg)
        if meta.base_fingerprint == config.base_fingerprint:
            return pkg, True
    if pkg.exists():
        import shutil

        shutil.rmtree(pkg)
    device, dtype = parse_device(node.device), parse_dtype(node.dtype)
    base = load_base(node.base, device, dtype)
    if base.fingerprint != config.base_fingerprint:
        raise UserError(f"node {node.name}: its base {node.base} is {base.fingerprint[:12]}, the round's is "
                        f"{config.base_fingerprint[:12]}")
    seed = int.from_bytes(node.name.encode()[:4].ljust(4, b"\0"), "little")  # independent clients, distinct seeds
    cfg = load_config(None, {"steps": config.steps or None, "resolution": config.resolution or None,
                             "checkpoint_every": 0, "sample_steps": 4, "seed": seed})
    train_concept(node.base, node.data_dir, node.words, node.class_word, pkg, cfg, device, dtype, name=node.name,
                  show_progress=False)
    compute_stats(load_base(node.base, device, dtype), pkg, samples=config.stats_samples or None,
                  show_progress=False)
    return pkg, False


def upload(config: pb.RoundConfig, pkg: Path) -> list[pb.FileEntry]:
    """Send the package files where the round says; return their entries (key, size, sha256)."""
    entries = []
    for name in PACKAGE_FILES:
        path = pkg / name
        key = f"{config.prefix}{name}"
        if config.upload_urls:
            url = config.upload_urls.get(name)
            if url is None:
                raise UserError(f"the round gave no upload URL for {name}")
            request = urllib.request.Request(url, data=path.read_bytes(), method="PUT",
                                             headers={"Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(request, timeout=300) as response:
                if response.status not in (200, 204):
                    raise UserError(f"upload of {name} failed: HTTP {response.status}")
            entries.append(pb.FileEntry(key=key, size=path.stat().st_size, sha256=sha256_file(path)))
        else:
            stored = open_store(config.store_url).put_file(key, path)
            entries.append(pb.FileEntry(key=stored.key, size=stored.size, sha256=stored.sha256))
    return entries


def take_part(config: pb.RoundConfig, node: NodeSettings) -> pb.ConceptManifest:
    """Everything a client does in a round; the returned manifest is all that goes back through Flower."""
    pkg, reused = package_for(config, node)
    meta = json.loads((pkg / META_FILE).read_text())
    files = upload(config, pkg)
    return pb.ConceptManifest(round_id=config.round_id, client=node.name, concept_name=meta["name"],
                              words=meta["words"], class_word=meta["class_word"],
                              prompts=[t.format(" ".join(meta["words"])) for t in meta["prompt_templates"]],
                              base_fingerprint=meta["base_fingerprint"], files=files, reused=reused)
