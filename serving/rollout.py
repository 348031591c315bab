"""Versioned bundle roots: publish, roll out and roll back by moving one pointer file.

A bundle root looks like::

    ROOT/<bundle_version>/   immutable bundle directories (manifest.json + files)
    ROOT/CURRENT             the live version's directory name; servers watching ROOT swap
    ROOT/HISTORY             one JSON line per pointer move: time, action, from, to

Every pointer move writes ``CURRENT.tmp`` and ``os.replace``s it (atomic on POSIX), under an
exclusive lock on ``ROOT/.lock`` so two jobs cannot interleave their HISTORY lines. No torch
here: the serving image can run rollout and rollback itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from socialrec.serving.bundle import MANIFEST, BundleError, load_manifest

POINTER = "CURRENT"  # the same name the server watches (socialrec.serving.config)
HISTORY = "HISTORY"


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current(root: str | Path) -> str | None:
    """The live version named by ROOT/CURRENT, or None before the first publish."""
    p = Path(root) / POINTER
    return p.read_text().strip() or None if p.is_file() else None


def versions(root: str | Path) -> list[str]:
    """Bundle versions present under ROOT (directories holding a manifest), sorted by name."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(d.name for d in r.iterdir() if d.is_dir() and (d / MANIFEST).is_file())


def history(root: str | Path) -> list[dict]:
    """Every pointer move so far, oldest first."""
    p = Path(root) / HISTORY
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _point(root: Path, version: str, action: str) -> dict:
    """Verify ROOT/version, then move CURRENT to it and log the move (caller holds the lock)."""
    if not version or "/" in version or version.startswith("."):
        raise ValueError(f"not a bundle version name: {version!r}")
    load_manifest(root / version, verify=True)  # refuse to point servers at a bad bundle
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "action": action,
        "from": current(root),
        "to": version,
    }
    tmp = root / (POINTER + ".tmp")
    tmp.write_text(version + "\n")
    os.replace(tmp, root / POINTER)
    with (root / HISTORY).open("a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def rollout(root: str | Path, version: str, action: str = "rollout") -> dict:
    """Point CURRENT at an existing bundle version; returns the HISTORY entry."""
    r = Path(root)
    if not (r / version).is_dir():
        raise FileNotFoundError(f"{r / version}: no such bundle (have: {versions(r)})")
    with _locked(r):
        return _point(r, version, action)


def previous(root: str | Path) -> str | None:
    """The version a rollback returns to: replay HISTORY as a stack (moves push, rollbacks pop)."""
    stack: list[str] = []
    for e in history(root):
        if e["action"] == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != e["to"]:
                stack.append(e["to"])
        else:
            stack.append(e["to"])
    return stack[-2] if len(stack) >= 2 else None


def rollback(root: str | Path) -> dict:
    """Move CURRENT back to the version live before the current one (repeatable)."""
    r = Path(root)
    with _locked(r):
        target = previous(r)
        if target is None:
            raise ValueError(f"{r}/{HISTORY}: no earlier version to roll back to")
        return _point(r, target, "rollback")


def publish_bundle(root: str | Path, src: str | Path, action: str = "publish") -> dict:
    """Copy a verified bundle into ROOT/<bundle_version>/ and point CURRENT at it.

    The copy lands in a temporary directory, is verified again, then renamed into place, so a
    reader never sees a half-copied version. A version already present must be identical
    (bundles are immutable); it is not copied again.
    """
    r = Path(root)
    manifest = load_manifest(src, verify=True)
    version = str(manifest["bundle_version"])
    dst = r / version
    r.mkdir(parents=True, exist_ok=True)
    with _locked(r):
        if dst.exists():
            have = load_manifest(dst, verify=True)
            if have["files"] != manifest["files"]:
                raise BundleError(f"{dst}: version {version} exists with different files")
        else:
            tmp = r / f".tmp-{version}-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
            load_manifest(tmp, verify=True)
            os.rename(tmp, dst)
        return _point(r, version, action)
