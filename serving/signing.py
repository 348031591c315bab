"""Bundle signatures: Ed25519 over the exact bytes of manifest.json, kept in manifest.sig.

The manifest lists the sha256 and size of every file, so a valid signature over it vouches
for the whole bundle. Ed25519 rather than an HMAC: the serving fleet holds only the public key,
so a compromised server cannot mint bundles, and the private key stays with the pipeline.

- pipeline: ``SOCIALREC_BUNDLE_SIGNING_KEY=/path/private.pem`` makes every bundle it writes
  signed (:func:`sign_manifest` is called by ``write_manifest``);
- server: ``serve --bundle-key public.pem`` (or ``SOCIALREC_BUNDLE_PUBLIC_KEY``) refuses any
  bundle that is unsigned or signed by another key;
- ``socialrec keygen --out DIR`` writes a key pair.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE = "manifest.sig"
SIGNING_KEY_ENV = "SOCIALREC_BUNDLE_SIGNING_KEY"
PUBLIC_KEY_ENV = "SOCIALREC_BUNDLE_PUBLIC_KEY"


class SignatureError(ValueError):
    """A signature or key that is missing, malformed or does not match."""


def generate_keypair(out_dir: str | Path) -> tuple[Path, Path]:
    """Write bundle-signing.pem (private, mode 600) and bundle-signing.pub.pem into out_dir."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    priv, pub = d / "bundle-signing.pem", d / "bundle-signing.pub.pem"
    if priv.exists():
        raise FileExistsError(f"{priv} exists; refusing to overwrite a signing key")
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def sign_manifest(bundle_dir: str | Path, key: Ed25519PrivateKey) -> Path:
    """Sign manifest.json's bytes; writes manifest.sig (base64) next to it."""
    d = Path(bundle_dir)
    sig = key.sign((d / "manifest.json").read_bytes())
    out = d / SIGNATURE
    tmp = d / (SIGNATURE + ".tmp")
    tmp.write_text(base64.b64encode(sig).decode() + "\n")
    tmp.replace(out)
    return out


def sign_if_configured(bundle_dir: str | Path) -> Path | None:
    """Sign with the key named by $SOCIALREC_BUNDLE_SIGNING_KEY, if set."""
    path = os.environ.get(SIGNING_KEY_ENV)
    return sign_manifest(bundle_dir, load_private_key(path)) if path else None


def verify_manifest(bundle_dir: str | Path, manifest_bytes: bytes, key: Ed25519PublicKey) -> None:
    """SignatureError unless manifest.sig is a valid signature of ``manifest_bytes``."""
    p = Path(bundle_dir) / SIGNATURE
    if not p.is_file():
        raise SignatureError(f"{p}: bundle is not signed (a bundle key is configured)")
    try:
        sig = base64.b64decode(p.read_bytes().strip(), validate=True)
    except ValueError:
        raise SignatureError(f"{p}: not a base64 signature") from None
    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(f"{p}: signature does not match the manifest and key") from None
