"""The one verified-download path: every byte that comes from a store, a registry URL or a client
goes through `download_verified`, which streams to a temporary file beside the target, hashes
while it writes, stops at the expected size, and renames only when size and sha256 match.

`relative_key` and `inside` are the checks made on every name a manifest or a registry gives,
before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from shared.errors import IntegrityError, UnsafeManifest

CHUNK = 1 << 20
SAFE_PART = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._ +@=-]*$")


def relative_key(key: str, prefix: str) -> str:
    """The part of `key` below `prefix`, as a relative '/'-separated path that cannot leave it.

    Refused: keys outside the prefix, absolute paths, backslashes, empty, '.' or '..' parts, and
    characters outside a conservative set (no control characters, no ':').
    """
    if not isinstance(key, str) or not key.startswith(prefix):
        raise UnsafeManifest(f"file {key!r} is not inside {prefix!r}")
    rel = key[len(prefix):]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts) or \
            not all(SAFE_PART.match(p) for p in parts):
        raise UnsafeManifest(f"file {key!r} is not a plain relative path below {prefix!r}")
    return rel


def inside(root: Path, rel: str) -> Path:
    """root / rel, refused unless it resolves to a path strictly inside `root` (symlinks followed)."""
    root = Path(root).resolve()
    target = (root / rel).resolve()
    if root not in target.parents:
        raise UnsafeManifest(f"{rel!r} resolves outside {root}")
    return target


def check_download_url(url: str, what: str) -> str:
    """Only http(s) URLs with a host are fetched; anything else (file:, data:, ftp:, ...) is refused."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UnsafeManifest(f"{what}: download URL {url[:80]!r} is not http(s)")
    return url


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download_verified(open_stream: Callable[[], contextlib.AbstractContextManager[BinaryIO]], dest: Path,
                      sha256: str, size: int | None, where: str) -> tuple[int, str]:
    """Stream `open_stream()` into `dest` (atomically); refuse it unless its size and sha256 are the expected.

    Reading stops one byte past `size`, so an object larger than announced never fills the disk.
    Returns (size, sha256) of what was written.
    """
    if not sha256:
        raise IntegrityError(f"{where}: no sha256 to verify against; refusing to download it")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    h, written = hashlib.sha256(), 0
    try:
        with open_stream() as stream, open(tmp, "wb") as out:
            limit = None if size is None else size + 1
            while True:
                want = CHUNK if limit is None else min(CHUNK, limit - written)
                if want <= 0:
                    break
                block = stream.read(want)
                if not block:
                    break
                h.update(block)
                out.write(block)
                written += len(block)
        digest = h.hexdigest()
        if size is not None and written != size:
            raise IntegrityError(f"{where}: {'more than ' if written > size else ''}{written} bytes, "
                                 f"the manifest says {size}")
        if digest != sha256:
            raise IntegrityError(f"{where}: its bytes hash to {digest[:12]}, expected {sha256[:12]}; "
                                 "the copy is corrupt or was swapped")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return written, digest


def read_verified(open_stream: Callable[[], contextlib.AbstractContextManager[BinaryIO]], sha256: str | None,
                  limit: int, where: str) -> bytes:
    """A small object (a manifest, a pointer) read whole, at most `limit` bytes, checked against `sha256`."""
    with open_stream() as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise IntegrityError(f"{where} is larger than {limit} bytes; it is not a mixshow manifest")
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"{where}: its bytes hash to {hashlib.sha256(data).hexdigest()[:12]}, recorded "
                             f"{sha256[:12]}; the copy is corrupt or was swapped")
    return data


@contextlib.contextmanager
def http_stream(url: str, timeout: float = 300.0) -> Iterator[BinaryIO]:
    """An http(s) response body as a stream (the URL is checked first)."""
    import urllib.request

    check_download_url(url, "download")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked above)
        yield response
