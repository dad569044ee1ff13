"""Write folders and files so a reader never sees half of them: stage beside, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shared.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_fresh_output(out: Path, what: str = "output folder") -> None:
    """Refuse an `out` that exists and is not an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{what} {out} already exists and is not empty: choose a new path or delete it")


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success rename it to `out`, on error remove it."""
    out = Path(out)
    check_fresh_output(out)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        yield stage
        if out.exists():
            out.rmdir()  # an empty folder was allowed above
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # a failed write leaves no trace, not even the folders made for it
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextlib.contextmanager
def file_beside(path: Path) -> Iterator[Path]:
    """Yield a temporary file's path beside `path`; when the block succeeds, rename it to `path` (with
    ordinary permissions: mkstemp makes 0600), when it fails, remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    with file_beside(path) as tmp:
        tmp.write_bytes(data)


def write_image_atomic(path: Path, image) -> None:
    """Save a PIL image as PNG through a temporary file and a rename."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
