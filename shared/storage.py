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

import hashlib
import io
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

from shared.errors import UserError

PART_SIZE = 16 * 1024 * 1024
RETRIES = 4


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


class IntegrityError(UserError):
    """A stored object does not match its recorded sha256."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Store:
    """The storage interface; keys are '/'-separated paths below the store's root."""

    url: str

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        raise NotImplementedError

    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> ObjectInfo:
        """Download `key` to `dest` (atomically), verifying its recorded (and, if given, expected) sha256."""
        raise NotImplementedError

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
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


def _check(key: str, data_sha: str, recorded: str | None, expected: str | None, where: str) -> None:
    if recorded is not None and recorded != data_sha:
        raise IntegrityError(f"{where}/{key} is corrupt: its bytes hash to {data_sha[:12]}, recorded {recorded[:12]}")
    if expected is not None and expected != data_sha:
        raise IntegrityError(f"{where}/{key} does not match the manifest: sha256 {data_sha[:12]}, expected "
                             f"{expected[:12]}")


def _download_checked(fetch, key: str, dest: Path, meta: ObjectInfo, sha256: str | None, where: str) -> ObjectInfo:
    """fetch(tmp) writes the object to a temporary file beside `dest`; it becomes `dest` only if it verifies."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        fetch(tmp)
        _check(key, sha256_file(tmp), meta.sha256 or None, sha256, where)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return meta


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
        return ObjectInfo(key, target.stat().st_size, side.read_text().strip() if side.is_file() else "")

    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> ObjectInfo:
        meta = self.info(key)
        if meta is None:
            raise UserError(f"{self.url}/{key} does not exist")
        return _download_checked(lambda tmp: shutil.copyfile(self._path(key), tmp), key, dest, meta, sha256,
                                 self.url)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        meta = self.info(key)
        if meta is None:
            raise UserError(f"{self.url}/{key} does not exist")
        data = self._path(key).read_bytes()
        _check(key, hashlib.sha256(data).hexdigest(), meta.sha256 or None, sha256, self.url)
        return data

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
            http_client = None
            ca = os.environ.get("MIXSHOW_S3_CA_BUNDLE")
            if ca:
                import urllib3

                http_client = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca)
            client = Minio(endpoint, access_key=os.environ.get("MIXSHOW_S3_ACCESS_KEY"),
                           secret_key=os.environ.get("MIXSHOW_S3_SECRET_KEY"),
                           secure=os.environ.get("MIXSHOW_S3_SECURE", "1") not in ("0", "false", "no"),
                           region=os.environ.get("MIXSHOW_S3_REGION"), http_client=http_client)
        self.client = client
        self._retry(lambda: self._check_bucket(), "open the bucket")

    def _check_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            raise UserError(f"bucket {self.bucket!r} does not exist at the S3 endpoint; create it first")

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, action, what: str):
        """Run `action`, retrying transient failures with exponential backoff; map the rest to UserError."""
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        for attempt in range(RETRIES + 1):
            try:
                return action()
            except S3Error as exc:
                if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise UserError(f"{self.url}: cannot {what}: {exc.code} (check the S3 credentials)") from exc
                if exc.code in ("NoSuchBucket",):
                    raise UserError(f"bucket {self.bucket!r} does not exist at the S3 endpoint") from exc
                if exc.code in ("NoSuchKey",) or attempt == RETRIES or exc.code not in (
                        "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
                    raise UserError(f"{self.url}: cannot {what}: {exc.code}: {exc.message}") from exc
            except (HTTPError, OSError) as exc:
                if attempt == RETRIES:
                    raise UserError(f"{self.url}: cannot {what}: S3 endpoint unreachable ({exc})") from exc
            time.sleep(min(8.0, 0.25 * 2**attempt))
        raise AssertionError("unreachable")

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        digest, size = sha256_file(path), Path(path).stat().st_size
        with open(path, "rb") as fh:
            return self._put(key, lambda: (fh.seek(0), fh)[1], size, digest)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, lambda: io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest())

    def _put(self, key: str, stream, size: int, digest: str) -> ObjectInfo:
        from minio.commonconfig import CopySource

        tmp = self._name(f".tmp/{uuid.uuid4().hex}")
        meta = {"sha256": digest}
        self._retry(lambda: self.client.put_object(self.bucket, tmp, stream(), size, metadata=meta,
                                                   part_size=PART_SIZE), f"upload {key}")
        try:
            if size > 5 * 1024**3:  # a single copy is limited to 5 GiB
                from minio.commonconfig import ComposeSource

                self._retry(lambda: self.client.compose_object(self.bucket, self._name(key),
                                                               [ComposeSource(self.bucket, tmp)], metadata=meta),
                            f"publish {key}")
            else:
                self._retry(lambda: self.client.copy_object(self.bucket, self._name(key), CopySource(self.bucket, tmp)),
                            f"publish {key}")
        finally:
            self._retry(lambda: self.client.remove_object(self.bucket, tmp), f"clean up {key}")
        return ObjectInfo(key, size, digest)

    def info(self, key: str) -> ObjectInfo | None:
        from minio.error import S3Error

        try:
            stat = self.client.stat_object(self.bucket, self._name(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            return self._retry(lambda: self._info_strict(key), f"stat {key}")
        return ObjectInfo(key, stat.size, _meta_sha(stat.metadata))

    def _info_strict(self, key: str) -> ObjectInfo:
        stat = self.client.stat_object(self.bucket, self._name(key))
        return ObjectInfo(key, stat.size, _meta_sha(stat.metadata))

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        meta = self.info(key)
        if meta is None:
            raise UserError(f"{self.url}/{key} does not exist")

        def read() -> bytes:
            response = self.client.get_object(self.bucket, self._name(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        data = self._retry(read, f"download {key}")
        _check(key, hashlib.sha256(data).hexdigest(), meta.sha256 or None, sha256, self.url)
        return data

    def get_file(self, key: str, dest: Path, sha256: str | None = None) -> ObjectInfo:
        meta = self.info(key)
        if meta is None:
            raise UserError(f"{self.url}/{key} does not exist")
        return _download_checked(
            lambda tmp: self._retry(lambda: self.client.fget_object(self.bucket, self._name(key), str(tmp)),
                                    f"download {key}"), key, dest, meta, sha256, self.url)

    def list(self, prefix: str) -> list[str]:
        start = len(self.prefix) + 1 if self.prefix else 0
        objects = self._retry(lambda: list(self.client.list_objects(self.bucket, self._name(prefix), recursive=True)),
                              f"list {prefix}")
        return sorted(o.object_name[start:] for o in objects if "/.tmp/" not in f"/{o.object_name[start:]}")

    def delete(self, key: str) -> None:
        self._retry(lambda: self.client.remove_object(self.bucket, self._name(key)), f"delete {key}")

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
            raise UserError(f"--store {url}: bucket names have at least 3 characters")
        return S3Store(parsed.netloc, parsed.path)
    raise UserError(f"--store {url!r} must be s3://bucket/prefix or file:///path")
