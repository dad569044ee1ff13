"""Signed fused versions: the server signs each version's manifest with Ed25519, and a puller that trusts
the server's public key refuses any version whose signature (and so any file) does not match, whoever
served it. The manifest lists every file's sha256, so signing it signs the whole version."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos import mixshow_pb2 as pb
from shared.errors import UnsafeManifest, UserError


def signed_payload(manifest: pb.FusedManifest) -> bytes:
    """What the signature covers: the manifest without its signature and without download URLs (the
    registry adds those per request)."""
    copy = pb.FusedManifest()
    copy.CopyFrom(manifest)
    copy.signature, copy.signing_key_id = b"", ""
    for entry in [*copy.files, *copy.server_files]:
        entry.url = ""
    return copy.SerializeToString(deterministic=True)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The server's Ed25519 private key (PEM, unencrypted, as deploy/make-certs.sh writes it)."""
    try:
        key = serialization.load_pem_private_key(_read_pem(path, "signing key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UserError(f"signing key {path} is not an unencrypted PEM private key ({exc}); make one with "
                        "deploy/make-certs.sh") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"signing key {path} is a {type(key).__name__}, not an Ed25519 key; make one with "
                        "deploy/make-certs.sh")
    return key


def load_trusted_key(path: Path) -> Ed25519PublicKey:
    """A trusted server's Ed25519 public key (PEM)."""
    try:
        key = serialization.load_pem_public_key(_read_pem(path, "trusted key"))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UserError(f"trusted key {path} is not a PEM public key ({exc}); use the server's "
                        "version-signing.pub") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"trusted key {path} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign_manifest(manifest: pb.FusedManifest, key: Ed25519PrivateKey) -> None:
    """Sign `manifest` in place."""
    manifest.signature = key.sign(signed_payload(manifest))
    manifest.signing_key_id = key_id(key.public_key())


def verify_manifest(manifest: pb.FusedManifest, trusted: Ed25519PublicKey, where: str) -> None:
    """Refuse a manifest that is unsigned or whose signature does not match the trusted key."""
    if not manifest.signature:
        raise UnsafeManifest(f"{where}: version {manifest.version[:40]} is not signed, and a trusted key was given; "
                             "refused")
    try:
        trusted.verify(manifest.signature, signed_payload(manifest))
    except InvalidSignature:
        signer = manifest.signing_key_id[:16] or "unknown"
        raise UnsafeManifest(f"{where}: the signature of version {manifest.version[:40]} does not match the trusted "
                             f"key {key_id(trusted)} (signed by {signer!r}, or altered after signing); "
                             "refused") from None
