"""The server's checks of a client's uploads before it downloads them."""

from __future__ import annotations

import pytest

from protos import mixshow_pb2 as pb
from server.membership import verify
from shared.base import load_base
from shared.errors import UserError
from shared.package import PACKAGE_FILES
from shared.storage import open_store


def uploaded(store, package, prefix: str) -> pb.ConceptManifest:
    files = [store.put_file(prefix + name, package / name) for name in PACKAGE_FILES]
    return pb.ConceptManifest(files=[pb.FileEntry(key=f.key, size=f.size, sha256=f.sha256) for f in files])


def test_an_upload_over_the_limit_is_refused_before_any_download(three_packages, tiny_base, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    package = three_packages[0]
    manifest = uploaded(store, package, "rounds/r1/7/")
    sizes = {name: (package / name).stat().st_size for name in PACKAGE_FILES}
    base = load_base(tiny_base)
    limit = max(sizes.values()) - 1  # the largest file is one byte over
    with pytest.raises(UserError, match="over the round's upload limit"):
        verify(store, manifest, "rounds/r1/7/", base, tmp_path / "got", limit)
    assert not (tmp_path / "got").exists()  # nothing downloaded, not even the small files
    # a manifest that under-states a size does not get past the check: the store's own size counts
    for entry in manifest.files:
        entry.size = 1
    with pytest.raises(UserError, match="over the round's upload limit"):
        verify(store, manifest, "rounds/r1/7/", base, tmp_path / "got", limit)
    assert verify(store, uploaded(store, package, "rounds/r1/8/"), "rounds/r1/8/", base, tmp_path / "ok",
                  max(sizes.values())) == tmp_path / "ok"


def test_a_file_never_uploaded_is_named(three_packages, tiny_base, tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    manifest = uploaded(store, three_packages[0], "rounds/r1/7/")
    store.delete(manifest.files[0].key)
    with pytest.raises(UserError, match="was never uploaded"):
        verify(store, manifest, "rounds/r1/7/", load_base(tiny_base), tmp_path / "got")
