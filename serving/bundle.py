"""The bundle contract between the offline pipeline and the server (no torch here).

A bundle is a directory::

    manifest.json      format + bundle version, created time, dataset/split fingerprints,
                       dims, tower I/O names, per-file sha256 and size, metrics it scored
    user_tower.onnx    raw ids in -> content and friend query vectors out
    items.faiss        item vectors (+ bias slot) for inner-product search
    users.faiss        user vectors (+ bias slot) for friend search
    item_ids.txt       external id of each item index, one per line (UTF-8)
    user_ids.txt       external id of each user index, one per line
    popular_items.npy  item indices by training popularity (cold start), int32
    popular_users.npy  user indices by training degree (cold start), int32
    fresh_prior.npz    optional fold-in prior of fresh items (socialrec.serving.fresh); listed,
                       checksummed and signed like the rest when present; without it the
                       bundle serves with fresh items off
    manifest.sig       optional Ed25519 signature of manifest.json (socialrec.serving.signing)

Nothing in it is a pickle. ``load_manifest`` verifies every checksum before anything is
used, so a corrupted or half-copied bundle is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from socialrec.serving import signing

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOWER_INPUTS = ("hist_ids", "hist_w", "friend_ids", "friend_w")
TOWER_OUTPUTS = ("content_vector", "friend_vector")
REQUIRED_FILES = (
    "user_tower.onnx",
    "items.faiss",
    "users.faiss",
    "item_ids.txt",
    "user_ids.txt",
    "popular_items.npy",
    "popular_users.npy",
)
# Listed in the manifest (so checksummed and covered by its signature) whenever present.
OPTIONAL_FILES = ("fresh_prior.npz",)


class BundleError(RuntimeError):
    """A bundle that must not be served: the message says which file and why."""


# The friend blend weight (engine: inner product + fof_weight * log1p(mutual friends)) of a
# bundle that carries none (built before runs chose one on validation) or a malformed one.
DEFAULT_FOF_WEIGHT = 1.0


def bundle_fof_weight(manifest: dict) -> tuple[float, str | None]:
    """(the friend blend weight a bundle carries in ``friends.fof_weight``, None or what was
    wrong with that block)."""
    block = manifest.get("friends")
    if block is None:
        return DEFAULT_FOF_WEIGHT, None
    w = block.get("fof_weight") if isinstance(block, dict) else None
    ok = not isinstance(w, bool) and isinstance(w, int | float) and math.isfinite(w) and w >= 0
    if not ok:
        return (
            DEFAULT_FOF_WEIGHT,
            f"manifest.json: friends.fof_weight must be a number >= 0, got {block!r}",
        )
    return float(w), None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_ids(path: Path, ids: np.ndarray | list[str]) -> None:
    """One id per line; ids must not contain line breaks (they never do in TSV input)."""
    ids = [str(s) for s in ids]
    bad = next((s for s in ids if "\n" in s or "\r" in s), None)
    if bad is not None:
        raise BundleError(f"{path.name}: id contains a line break: {bad!r}")
    path.write_text("".join(s + "\n" for s in ids), encoding="utf-8")


def read_ids(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text else []


def write_manifest(bundle_dir: str | Path, meta: dict) -> dict:
    """Checksum every required file (and every optional one present) and write manifest.json
    last (its presence = complete)."""
    d = Path(bundle_dir)
    files = {}
    optional = tuple(n for n in OPTIONAL_FILES if (d / n).is_file())
    for name in dict.fromkeys(REQUIRED_FILES + optional + tuple(meta.pop("extra_files", ()))):
        p = d / name
        if not p.exists():
            raise BundleError(f"{p}: required bundle file missing")
        files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    digest = hashlib.sha256(
        "".join(files[n]["sha256"] for n in sorted(files)).encode()
    ).hexdigest()[:12]
    manifest = {
        "format_version": FORMAT_VERSION,
        "bundle_version": meta.pop("bundle_version", None)
        or f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{digest}",
        "created": created,
        "tower": {"inputs": list(TOWER_INPUTS), "outputs": list(TOWER_OUTPUTS)},
        "files": files,
        **meta,
    }
    (d / signing.SIGNATURE).unlink(missing_ok=True)  # a signature of an older manifest
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(d / MANIFEST)
    signing.sign_if_configured(d)
    return manifest


def load_manifest(
    bundle_dir: str | Path, verify: bool = True, public_key: Ed25519PublicKey | None = None
) -> dict:
    """Read manifest.json, check its shape and (by default) the size and sha256 of every
    listed file; with ``public_key``, also its signature. BundleError for anything wrong."""
    d = Path(bundle_dir)
    mpath = d / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{mpath}: no manifest (not a bundle, or still being written)") from None
    except OSError as e:
        raise BundleError(f"{mpath}: unreadable ({e})") from None
    if public_key is not None:
        try:
            signing.verify_manifest(d, raw, public_key)
        except signing.SignatureError as e:
            raise BundleError(str(e)) from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: format_version {manifest.get('format_version')!r}, this server reads {FORMAT_VERSION}"
        )
    version = manifest.get("bundle_version")
    if not isinstance(version, str) or not version:
        raise BundleError(f"{mpath}: bundle_version missing or not a string")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{mpath}: 'files' missing or not an object")
    for name, info in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise BundleError(f"{mpath}: file name {name!r} is not a plain file name")
        ok = isinstance(info, dict) and isinstance(info.get("sha256"), str)
        if not ok or not isinstance(info.get("bytes"), int):
            raise BundleError(f"{mpath}: files[{name!r}] needs 'sha256' (str) and 'bytes' (int)")
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{mpath}: does not list required file {name}")
    if verify:
        for name, info in files.items():
            p = d / name
            if not p.is_file():
                raise BundleError(f"{p}: listed in the manifest but missing")
            size = p.stat().st_size
            if size != info["bytes"]:
                raise BundleError(f"{p}: size {size} bytes, manifest says {info['bytes']}")
            digest = sha256_file(p)
            if digest != info["sha256"]:
                raise BundleError(
                    f"{p}: sha256 {digest[:16]}... does not match the manifest ({info['sha256'][:16]}...)"
                )
    return manifest


@dataclass
class BundleFiles:
    """A verified bundle's paths and small arrays; the server builds sessions/indexes from it."""

    root: Path
    manifest: dict
    item_ids: list[str]
    user_ids: list[str]
    popular_items: np.ndarray
    popular_users: np.ndarray

    @property
    def version(self) -> str:
        return str(self.manifest["bundle_version"])

    def path(self, name: str) -> Path:
        return self.root / name


def open_bundle(
    bundle_dir: str | Path, verify: bool = True, public_key: Ed25519PublicKey | None = None
) -> BundleFiles:
    """Verify and open a bundle's id maps and cold-start lists."""
    d = Path(bundle_dir).resolve()
    manifest = load_manifest(d, verify=verify, public_key=public_key)
    item_ids = read_ids(d / "item_ids.txt")
    user_ids = read_ids(d / "user_ids.txt")
    dims = manifest.get("counts", {})
    if dims and (len(item_ids) != dims.get("items") or len(user_ids) != dims.get("users")):
        raise BundleError(
            f"{d}: id files have {len(item_ids)} items / {len(user_ids)} users, manifest counts say {dims}"
        )
    return BundleFiles(
        root=d,
        manifest=manifest,
        item_ids=item_ids,
        user_ids=user_ids,
        popular_items=np.load(d / "popular_items.npy", allow_pickle=False),
        popular_users=np.load(d / "popular_users.npy", allow_pickle=False),
    )


def copy_bundle(src: str | Path, dst: str | Path, version: str) -> Path:
    """A copy of a bundle under a new version: files copied, manifest rewritten with fresh
    checksums (tests, fault runs and demos need two distinct live versions of one model)."""
    import shutil

    dst = Path(dst)
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    drop = ("format_version", "bundle_version", "created", "tower", "files")
    write_manifest(
        dst, {**{k: v for k, v in m.items() if k not in drop}, "bundle_version": version}
    )
    return dst
