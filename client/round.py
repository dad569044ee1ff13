"""A client's part in a fusion round: train (or reuse) its package, compute its Grams, upload, describe.

Only the small ConceptManifest goes back through Flower; the files go to object storage,
through presigned PUT URLs for exactly this client's keys (S3) or into a file:// store.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from client.config import TrainConfig, load_config
from protos import mixshow_pb2 as pb
from shared import storage
from shared.atomic import staged_dir
from shared.device import parse_device, parse_dtype
from shared.errors import InvalidArgument, UserError
from shared.names import MAX_SEED
from shared.package import PACKAGE_FILES, WEIGHTS_FILE, read_package
from shared.stats_file import STATS_FILE
from shared.storage import open_store, sha256_file

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_client_name(name: str) -> str:
    """A client's name becomes a folder and object-store key part: letters, digits, '.', '_', '-' only."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidArgument("name", f"{name!r} must be 1-100 letters, digits, '.', '_' or '-' (starting with a "
                              "letter or digit), e.g. 'alice-cat'")
    return name


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
    train_config: Path | None = None  # this client's own training settings (YAML); the round sets steps, size
    package: Path | None = None  # a ready package (e.g. from `mixshow import-lora`) to upload instead of training

    def __post_init__(self) -> None:
        check_client_name(self.name)
        if self.package is not None:
            return
        if not self.words:
            raise InvalidArgument("words", "is empty: give the concept's new words, e.g. '<cat1> <cat2>'")
        if not self.class_word.strip():
            raise InvalidArgument("class_word", "is empty: give a one-token class word such as 'cat'")

    @classmethod
    def from_node_config(cls, cfg: dict) -> NodeSettings:
        needed = ("name", "base") if cfg.get("package") else ("name", "data-dir", "words", "class-word", "base")
        missing = [k for k in needed if k not in cfg]
        if missing:
            raise UserError(f"node config lacks {', '.join(missing)} (set them with mixshow join)")
        return cls(str(cfg["name"]), Path(str(cfg.get("data-dir", ""))), str(cfg.get("words", "")).split(),
                   str(cfg.get("class-word", "")), Path(str(cfg["base"])),
                   Path(str(cfg.get("work-dir", Path.home() / ".mixshow" / "client"))),
                   str(cfg.get("device", "cpu")), str(cfg.get("dtype", "float32")),
                   Path(str(cfg["train-config"])) if cfg.get("train-config") else None,
                   Path(str(cfg["package"])) if cfg.get("package") else None)


def client_seed(name: str) -> int:
    """A client's training seed: sha256 of its whole name (so `client-1` and `client-2` differ), as 32 bits."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest(), "little") % (MAX_SEED + 1)


def round_train_config(config: pb.RoundConfig, name: str, own: Path | None = None) -> TrainConfig:
    """The training settings of a round: the client's own YAML (`own`, or the defaults), the round's steps
    and resolution, this client's seed, a checkpoint every tenth of the training (resumed if the client is
    killed), short previews."""
    cfg = load_config(own, {"steps": config.steps or None, "resolution": config.resolution or None,
                             "sample_steps": 4, "seed": client_seed(name)})
    return dataclasses.replace(cfg, checkpoint_every=max(1, cfg.steps // 10))


def _finished_package(pkg: Path, fingerprint: str) -> bool:
    """`pkg` is a readable package of the round's base (its stats may still be missing)."""
    try:
        meta, _ = read_package(pkg)
    except UserError:
        return False
    return meta.base_fingerprint == fingerprint


def package_for(config: pb.RoundConfig, node: NodeSettings) -> tuple[Path, bool]:
    """This node's package for the round's base: reused if already trained (unless told to retrain).

    The base is loaded once: training changes its own copy, the statistics are recorded on a pristine
    deep copy. Training checkpoints into `<pkg>.work/`; a client killed mid-training resumes from there
    in the next round (a checkpoint of other settings is discarded). A trained package whose statistics
    are missing only gets its statistics.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", config.base_fingerprint):
        raise UserError(f"the round's base fingerprint {config.base_fingerprint[:80]!r} is not a sha256")
    pkg = node.work_dir / config.base_fingerprint[:16] / node.name
    if node.package is not None:
        return ready_package(config, node, pkg)
    work = pkg.with_name(pkg.name + ".work")
    finished = _finished_package(pkg, config.base_fingerprint)
    if finished and (pkg / STATS_FILE).is_file() and not config.retrain:
        return pkg, True
    if config.retrain and pkg.exists():
        shutil.rmtree(work, ignore_errors=True)  # a retrain starts over
        finished = False
    if pkg.exists() and not finished:
        shutil.rmtree(pkg)
    # imported here, not at the top: a client reusing its package never loads diffusers (shared.package says why)
    from client.stats import compute_stats
    from client.train import train_concept
    from shared.base import load_base

    device, dtype = parse_device(node.device), parse_dtype(node.dtype)
    base = load_base(node.base, device, dtype, sdxl=True)
    if base.fingerprint != config.base_fingerprint:
        raise UserError(f"node {node.name}: its base {node.base} is {base.fingerprint[:12]}, the round's is "
                        f"{config.base_fingerprint[:12]}")
    if not finished:
        pristine = copy.deepcopy(base)
        cfg = round_train_config(config, node.name, node.train_config)
        train_concept(base, node.data_dir, node.words, node.class_word, pkg, cfg, name=node.name,
                      show_progress=False, restart_stale=True)
        base = pristine
    compute_stats(base, pkg, samples=config.stats_samples or None, show_progress=False)
    return pkg, False


def ready_package(config: pb.RoundConfig, node: NodeSettings, pkg: Path) -> tuple[Path, bool]:
    """A node's ready package (trained or imported elsewhere) for the round: checked against the round's base,
    copied into the work dir (once per version of its weights), its Grams recorded here if it has none."""
    meta, _ = read_package(node.package)
    if meta.base_fingerprint != config.base_fingerprint:
        raise UserError(f"node {node.name}: package {node.package} was made on base {meta.base_fingerprint[:12]}, "
                        f"the round's is {config.base_fingerprint[:12]}")
    weights = sha256_file(node.package / WEIGHTS_FILE)
    reused = (pkg / WEIGHTS_FILE).is_file() and sha256_file(pkg / WEIGHTS_FILE) == weights
    if not reused:
        shutil.rmtree(pkg, ignore_errors=True)
        with staged_dir(pkg) as stage:
            for name in PACKAGE_FILES:
                if (node.package / name).is_file():
                    shutil.copy2(node.package / name, stage / name)
    if not (pkg / STATS_FILE).is_file():
        from client.stats import compute_stats
        from shared.base import load_base

        base = load_base(node.base, parse_device(node.device), parse_dtype(node.dtype), sdxl=True)
        compute_stats(base, pkg, samples=config.stats_samples or None, show_progress=False)
    return pkg, reused


def put_with_retries(url: str, data: bytes, name: str) -> None:
    """PUT `data` to a presigned URL; an unreachable store or a 5xx answer is retried with growing pauses for
    up to OUTAGE_SECONDS (the object appears whole or not at all: S3 stores a PUT atomically)."""
    outage = storage.OUTAGE_SECONDS
    waits = storage.pauses(outage)
    while True:
        request = urllib.request.Request(url, data=data, method="PUT",
                                         headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                if response.status in (200, 204):
                    return
                problem = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise UserError(f"upload of {name} refused: HTTP {exc.code} (the round's upload URL may have "
                                "expired)") from exc
            problem = f"HTTP {exc.code}"
        except OSError as exc:
            problem = f"storage unreachable ({exc})"
        pause = next(waits, None)
        if pause is None:
            raise UserError(f"upload of {name} failed for {outage:.0f} s: {problem}")
        time.sleep(pause)


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
            put_with_retries(url, path.read_bytes(), name)
            entries.append(pb.FileEntry(key=key, size=path.stat().st_size, sha256=sha256_file(path)))
        else:
            stored = open_store(config.store_url).put_file(key, path)
            entries.append(pb.FileEntry(key=stored.key, size=stored.size, sha256=stored.sha256))
    return entries


def withdrawal_marker(work_dir: Path, name: str) -> Path:
    """The file whose presence tells this client's next rounds that it withdraws its concept."""
    return Path(work_dir) / "withdrawn" / check_client_name(name)


def take_part(config: pb.RoundConfig, node: NodeSettings) -> pb.ConceptManifest:
    """Everything a client does in a round; the returned manifest is all that goes back through Flower.

    A client that withdrew replies so and uploads nothing. A client whose package is the one the latest
    version already holds (the round says which sha256s it knows) replies `unchanged` and uploads nothing.
    """
    if withdrawal_marker(node.work_dir, node.name).is_file():
        return pb.ConceptManifest(round_id=config.round_id, client=node.name, concept_name=node.name, withdraw=True)
    pkg, reused = package_for(config, node)
    meta, _ = read_package(pkg)
    described = dict(round_id=config.round_id, client=node.name, concept_name=meta.name, words=meta.words,
                     class_word=meta.class_word, prompts=meta.prompts(), base_fingerprint=meta.base_fingerprint)
    hashes = {name: sha256_file(pkg / name) for name in PACKAGE_FILES}
    if config.known_sha256 and dict(config.known_sha256) == hashes:
        return pb.ConceptManifest(**described, unchanged=True, reused=reused)
    return pb.ConceptManifest(**described, files=upload(config, pkg), reused=reused)
