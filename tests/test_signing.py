"""Signed fused versions: `pull --trust KEY.pub` refuses a version whose signature or any file does not match,
whoever wrote to the store or answered as the registry."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protos import mixshow_pb2 as pb
from shared.checkpoints import MANIFEST, publish, pull
from shared.errors import UnsafeManifest, UserError
from shared.signing import load_signing_key, load_trusted_key
from shared.storage import open_store
from tests.badinput import assert_clean_error, run_mixshow

ROOT = Path(__file__).resolve().parents[1]


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_make_certs_writes_a_version_signing_pair_that_signs_and_verifies(tmp_path):
    out = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "deploy" / "make-certs.sh"), str(out), "superlink", "1"], check=True,
                   capture_output=True)
    key, pub = load_signing_key(out / "version-signing.key"), load_trusted_key(out / "version-signing.pub")
    pub.verify(key.sign(b"a version"), b"a version")  # raises if the pair does not belong together


def test_pull_with_trust_refuses_what_the_key_did_not_sign(fused_three, tmp_path, monkeypatch, capsys):
    store = open_store(f"file://{tmp_path}/store")
    server_key, server_pub = key_pair(tmp_path, "server")
    other_key, _ = key_pair(tmp_path, "intruder")
    signed = publish(store, fused_three["gradient"], signing_key=load_signing_key(server_key))
    assert signed.signature and signed.signing_key_id
    code, out, err = run_mixshow(["pull", "--store", store.url, "--out", tmp_path / "ok", "--trust", server_pub],
                                 monkeypatch, capsys)
    assert code == 0 and "signature verified" in out, err

    # someone with write access to the store swaps a file and rewrites the manifest's sha256 to match
    version = signed.version
    forged = pb.FusedManifest()
    forged.CopyFrom(signed)
    key = f"fused/{version}/concepts.json"
    swapped = store.put_bytes(key, store.get_bytes(key).replace(b'"gradient"', b'"average"'))
    for entry in forged.files:
        if entry.key == key:
            entry.sha256, entry.size = swapped.sha256, swapped.size
    store.put_bytes(f"fused/{version}/{MANIFEST}", forged.SerializeToString())
    with pytest.raises(UnsafeManifest, match="does not match the trusted key"):
        pull(store, tmp_path / "forged", trust=load_trusted_key(server_pub))
    assert not (tmp_path / "forged").exists()
    # ... or re-signs it with a key of its own
    from shared.signing import sign_manifest

    sign_manifest(forged, load_signing_key(other_key))
    store.put_bytes(f"fused/{version}/{MANIFEST}", forged.SerializeToString())
    assert_clean_error(["pull", "--store", store.url, "--out", tmp_path / "resigned", "--trust", server_pub], tmp_path,
                       "does not match the trusted key", monkeypatch, capsys, out=tmp_path / "resigned")
    # ... or strips the signature
    forged.signature, forged.signing_key_id = b"", ""
    store.put_bytes(f"fused/{version}/{MANIFEST}", forged.SerializeToString())
    assert_clean_error(["pull", "--store", store.url, "--out", tmp_path / "stripped", "--trust", server_pub],
                       tmp_path, "is not signed", monkeypatch, capsys, out=tmp_path / "stripped")
    # without --trust the forgery is self-consistent and would be taken: that is what --trust is for
    pull(store, tmp_path / "untrusting")


def test_trust_and_signing_key_files_are_checked(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "not-a-key.pub"
    bad.write_text("hello")
    assert_clean_error(["pull", "--store", f"file://{tmp_path}/s", "--out", tmp_path / "p", "--trust", bad],
                       tmp_path, "is not a PEM public key", monkeypatch, capsys, out=tmp_path / "p")
    from server.settings import RoundSettings

    with pytest.raises(UserError, match="not an unencrypted PEM private key"):
        RoundSettings.from_config({"signing-key": str(bad)})
