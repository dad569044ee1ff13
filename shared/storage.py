"""Object storage: one interface, two backends chosen by URL.

    s3://bucket/prefix   any S3 endpoint (MinIO, AWS, ...) through the `minio` client
    file:///path         a local folder (the embedded default)

Every object's sha256 is recorded when it is written (S3 user metadata `sha256`; a
`<key>.sha256` sidecar on disk) and verified on every read. Writes go to a temporary key
and are then copied/renamed, so a reader never sees half an object.

S3 settings come from the environment (never from code): MIXSHOW_S3_ENDPOINT (host:port),
MIXSHOW_S3_ACCESS_KEY, MIXSHOW_S3_SECRET_KEY, MIXSHOW_S3_SECURE (1/0, default 1),
MIXSHOW_S3_REGION, MIXSHOW_S3_CA_BUNDLE (a CA file for TLS).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from shared.download import download_verified, read_verified, sha256_file
from shared.errors import IntegrityError, InvalidArgument, UserError

PART_SIZE = 16 * 1024 * 1024
S3_RETRIES = 5  # minio's own default policy, with its backoff
OUTAGE_SECONDS = 120.0  # beyond minio's retries: how long an unreachable endpoint is waited for, per request
SMALL_LIMIT = 16 * 1024 * 1024  # get_bytes is for manifests and pointers, never for model files
__all__ = ["FileStore", "IntegrityError", "ObjectInfo", "S3Store", "Store", "open_store", "sha256_file"]


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


class Store:
    """The storage interface; keys are '/'-separated paths below the store's root."""

    url: str

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        raise NotImplementedError

    def open(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """The object's bytes as a stream (unverified: callers go through get_file / get_bytes)."""
        raise NotImplementedError

    def info(self, key: str) -> ObjectInfo | None:
        """Size and recorded sha256 of `key`, or None if it does not exist."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def presigned_put(self, key: str, expires: timedelta = timedelta(hours=2)) -> str | None:
        """A URL to upload exactly `key` without credentials (None for backends without URLs)."""
        return None

    def presigned_get(self, key: str, expires: timedelta = timedelta(hours=2)) -> str | None:
        return None

    def _known(self, key: str, sha256: str | None) -> ObjectInfo:
        meta = self.info(key)
        if meta is None:
            raise UserError(f"{self.url}/{key} does not exist")
        if sha256 and meta.sha256 and meta.sha256 != sha256:
            raise IntegrityError(f"{self.url}/{key} does not match the manifest: recorded sha256 "
                                 f"{meta.sha256[:12]}, expected {sha256[:12]}")
        return meta

    def get_file(self, key: str, dest: Path, sha256: str | None = None, size: int | None = None) -> ObjectInfo:
        """Stream `key` to `dest` (atomically) through the one verified-download path: its recorded sha256
        and, if given, the expected sha256 and size must all agree."""
        meta = self._known(key, sha256)
        if size is not None and meta.size != size:
            raise IntegrityError(f"{self.url}/{key} has {meta.size} bytes, the manifest says {size}")
        download_verified(lambda: self.open(key), dest, sha256 or meta.sha256, meta.size, f"{self.url}/{key}")
        return meta

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        """A small object (manifest, pointer), verified against its recorded and the expected sha256."""
        meta = self._known(key, sha256)
        if not meta.sha256 and not sha256:
            raise IntegrityError(f"{self.url}/{key} has no recorded sha256; it was not written by mixshow")
        return read_verified(lambda: self.open(key), sha256 or meta.sha256, SMALL_LIMIT, f"{self.url}/{key}")


class FileStore(Store):
    """Objects as files under a root folder, each with a `.sha256` sidecar."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents and path != self.root.resolve():
            raise UserError(f"key {key!r} escapes the store {self.url}")
        return path

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        tmp = self._temp(key)
        shutil.copyfile(path, tmp)
        return self._commit(key, tmp, sha256_file(tmp))

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        tmp = self._temp(key)
        tmp.write_bytes(data)
        return self._commit(key, tmp, hashlib.sha256(data).hexdigest())

    def _temp(self, key: str) -> Path:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")

    def _commit(self, key: str, tmp: Path, digest: str) -> ObjectInfo:
        """The sidecar first, then the object by rename: a visible object always has its hash."""
        target = self._path(key)
        Path(f"{target}.sha256").write_text(digest)
        os.replace(tmp, target)
        return ObjectInfo(key, target.stat().st_size, digest)

    def info(self, key: str) -> ObjectInfo | None:
        target = self._path(key)
        if not target.is_file():
            return None
        side = Path(f"{target}.sha256")
        recorded = side.read_bytes()[:128].decode("ascii", "replace").strip() if side.is_file() else ""
        return ObjectInfo(key, target.stat().st_size, recorded)

    def open(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return open(self._path(key), "rb")  # noqa: SIM115 (the caller closes it)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return []
        files = [base] if base.is_file() else base.rglob("*")
        keys = [str(p.relative_to(self.root)) for p in files if p.is_file() and not p.name.endswith(".sha256")
                and not p.name.endswith(".tmp")]
        return sorted(keys)

    def delete(self, key: str) -> None:
        for path in (self._path(key), Path(f"{self._path(key)}.sha256")):
            path.unlink(missing_ok=True)


def s3_http_client(ca_bundle: str | None = None):
    """minio's own default HTTP client (5-minute timeouts, 5 retries with backoff on 5xx and connection
    errors), with `ca_bundle` as the trusted CA when given. Retrying is left to it alone."""
    import certifi
    import urllib3
    from urllib3.util import Retry, Timeout

    seconds = timedelta(minutes=5).seconds
    return urllib3.PoolManager(timeout=Timeout(connect=seconds, read=seconds), maxsize=10,
                               cert_reqs="CERT_REQUIRED",
                               ca_certs=ca_bundle or os.environ.get("SSL_CERT_FILE") or certifi.where(),
                               retries=Retry(total=S3_RETRIES, backoff_factor=0.2,
                                             status_forcelist=[500, 502, 503, 504]))


def pauses(seconds: float) -> Iterator[float]:
    """Growing pauses between retries (1, 2, 4, 8, 8, ... s), as long as each still ends within `seconds`."""
    deadline, pause = time.monotonic() + seconds, 1.0
    while time.monotonic() + pause <= deadline:
        yield pause
        pause = min(pause * 2, 8.0)


class _Unreachable(Exception):
    """The S3 endpoint did not answer (the cause is the connection error)."""


class S3Store(Store):
    """Objects in an S3 bucket below a prefix, through the minio client."""

    def __init__(self, bucket: str, prefix: str, client=None):
        from minio import Minio

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        if client is None:
            endpoint = os.environ.get("MIXSHOW_S3_ENDPOINT")
            if not endpoint:
                raise UserError(f"{self.url}: set MIXSHOW_S3_ENDPOINT (host:port) and the credentials "
                                "MIXSHOW_S3_ACCESS_KEY / MIXSHOW_S3_SECRET_KEY")
            ca = os.environ.get("MIXSHOW_S3_CA_BUNDLE")
            if ca and not Path(ca).is_file():
                raise UserError(f"MIXSHOW_S3_CA_BUNDLE={ca} is not a file")
            try:
                client = Minio(endpoint, access_key=os.environ.get("MIXSHOW_S3_ACCESS_KEY"),
                               secret_key=os.environ.get("MIXSHOW_S3_SECRET_KEY"),
                               secure=os.environ.get("MIXSHOW_S3_SECURE", "1") not in ("0", "false", "no"),
                               region=os.environ.get("MIXSHOW_S3_REGION"), http_client=s3_http_client(ca))
            except ValueError as exc:
                raise UserError(f"MIXSHOW_S3_ENDPOINT={endpoint!r} is not usable: {exc}") from exc
        self.client = client
        self._call(lambda: self._check_bucket(), "open the bucket")

    def _check_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            raise UserError(f"bucket {self.bucket!r} does not exist at the S3 endpoint; create it first")

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, action, what: str, rewind=None):
        """Run `action` and turn what fails into a UserError. minio retries transient failures itself for a few
        seconds; an endpoint that stays unreachable is retried here with growing pauses for up to
        OUTAGE_SECONDS (`rewind` resets an upload's stream before each new attempt)."""
        waits = pauses(OUTAGE_SECONDS)
        while True:
            try:
                return self._call_once(action, what)
            except _Unreachable as exc:
                pause = next(waits, None)
                if pause is None:
                    raise UserError(f"{self.url}: cannot {what}: S3 endpoint unreachable for "
                                    f"{OUTAGE_SECONDS:.0f} s ({exc.__cause__})") from exc.__cause__
                time.sleep(pause)
                if rewind is not None:
                    rewind()

    def _call_once(self, action, what: str):
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return action()
        except S3Error as exc:
            if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise UserError(f"{self.url}: cannot {what}: {exc.code} (check the S3 credentials)") from exc
            if exc.code == "NoSuchBucket":
                raise UserError(f"bucket {self.bucket!r} does not exist at the S3 endpoint") from exc
            raise UserError(f"{self.url}: cannot {what}: {exc.code}: {exc.message}") from exc
        except (HTTPError, OSError) as exc:
            raise _Unreachable() from exc

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        digest, size = sha256_file(path), Path(path).stat().st_size
        with open(path, "rb") as fh:
            return self._put(key, fh, size, digest)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest())

    def _put(self, key: str, stream: BinaryIO, size: int, digest: str) -> ObjectInfo:
        from minio.commonconfig import ComposeSource, CopySource

        tmp = self._name(f".tmp/{uuid.uuid4().hex}")
        meta = {"sha256": digest}
        self._call(lambda: self.client.put_object(self.bucket, tmp, stream, size, metadata=meta,
                                                  part_size=PART_SIZE), f"upload {key}", rewind=lambda: stream.seek(0))
        try:
            if size > 5 * 1024**3:  # a single copy is limited to 5 GiB
                self._call(lambda: self.client.compose_object(self.bucket, self._name(key),
                                                              [ComposeSource(self.bucket, tmp)], metadata=meta),
                           f"publish {key}")
            else:
                self._call(lambda: self.client.copy_object(self.bucket, self._name(key), CopySource(self.bucket, tmp)),
                           f"publish {key}")
        finally:
            self._call(lambda: self.client.remove_object(self.bucket, tmp), f"clean up {key}")
        return ObjectInfo(key, size, digest)

    def info(self, key: str) -> ObjectInfo | None:
        from minio.error import S3Error

        try:
            stat = self.client.stat_object(self.bucket, self._name(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            return self._call(lambda: self._info_strict(key), f"stat {key}")
        except Exception:  # noqa: BLE001 (connection errors: the strict call maps them)
            return self._call(lambda: self._info_strict(key), f"stat {key}")
        return ObjectInfo(key, stat.size, _meta_sha(stat.metadata))

    def _info_strict(self, key: str) -> ObjectInfo:
        stat = self.client.stat_object(self.bucket, self._name(key))
        return ObjectInfo(key, stat.size, _meta_sha(stat.metadata))

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        response = self._call(lambda: self.client.get_object(self.bucket, self._name(key)), f"download {key}")
        try:
            yield response
        finally:
            response.close()
            response.release_conn()

    def list(self, prefix: str) -> list[str]:
        start = len(self.prefix) + 1 if self.prefix else 0
        objects = self._call(lambda: list(self.client.list_objects(self.bucket, self._name(prefix), recursive=True)),
                             f"list {prefix}")
        return sorted(o.object_name[start:] for o in objects if "/.tmp/" not in f"/{o.object_name[start:]}")

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.remove_object(self.bucket, self._name(key)), f"delete {key}")

    def presigned_put(self, key: str, expires: timedelta = timedelta(hours=2)) -> str:
        return self.client.presigned_put_object(self.bucket, self._name(key), expires=expires)

    def presigned_get(self, key: str, expires: timedelta = timedelta(hours=2)) -> str:
        return self.client.presigned_get_object(self.bucket, self._name(key), expires=expires)


def _meta_sha(metadata) -> str:
    for name, value in (metadata or {}).items():
        if name.lower() in ("x-amz-meta-sha256", "sha256"):
            return value
    return ""


def open_store(url: str) -> Store:
    """A store from its URL: s3://bucket/prefix or file:///path."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(parsed.path))
    if parsed.scheme == "s3":
        if len(parsed.netloc) < 3:
            raise InvalidArgument("store", f"{url}: bucket names have at least 3 characters")
        return S3Store(parsed.netloc, parsed.path)
    raise InvalidArgument("store", f"{url!r} must be s3://bucket/prefix or file:///path")
