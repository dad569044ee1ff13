"""The committed generated modules match protos/mixshow.proto."""

from __future__ import annotations

from pathlib import Path

from protos.generate import HERE, generate


def test_generated_code_is_fresh(tmp_path: Path):
    generate(tmp_path)
    for name in ("mixshow_pb2.py", "mixshow_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (HERE / name).read_text(), f"{name} is stale: python -m protos.generate"


def test_manifest_round_trip():
    from protos import mixshow_pb2 as pb

    manifest = pb.FusedManifest(version="v3", concepts=["a", "b"],
                                files=[pb.FileEntry(key="fused/v3/unet/x", size=3, sha256="ab" * 32)])
    again = pb.FusedManifest.FromString(manifest.SerializeToString())
    assert again == manifest and again.files[0].size == 3
