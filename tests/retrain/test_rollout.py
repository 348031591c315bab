"""publish-bundle, rollout and rollback move ROOT/CURRENT atomically and log ROOT/HISTORY."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from socialrec.serving.bundle import BundleError, copy_bundle, write_manifest
from socialrec.serving.rollout import current, history, previous, publish_bundle, versions

from socialrec.cli import main


def test_publish_rollout_rollback(base_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for v in ("v1", "v2", "v3"):
        src = copy_bundle(base_run / "bundle", tmp_path / f"src-{v}", v)
        assert main(["publish-bundle", "--bundles", str(root), "--from", str(src)]) == 0
        assert current(root) == v
    assert versions(root) == ["v1", "v2", "v3"]
    assert main(["rollback", "--bundles", str(root)]) == 0
    assert current(root) == "v2"
    assert main(["rollback", "--bundles", str(root)]) == 0
    assert current(root) == "v1"
    assert previous(root) is None
    assert main(["rollback", "--bundles", str(root)]) == 2  # nothing earlier: clear error
    assert current(root) == "v1"
    assert main(["rollout", "--bundles", str(root), "--to", "v3"]) == 0
    assert current(root) == "v3" and previous(root) == "v1"
    assert [(e["action"], e["from"], e["to"]) for e in history(root)] == [
        ("publish", None, "v1"),
        ("publish", "v1", "v2"),
        ("publish", "v2", "v3"),
        ("rollback", "v3", "v2"),
        ("rollback", "v2", "v1"),
        ("rollout", "v1", "v3"),
    ]
    assert not list(root.glob("*.tmp")) and not list(root.glob(".tmp-*"))
    assert main(["rollout", "--bundles", str(root), "--to", "nope"]) == 2
    assert current(root) == "v3"


def test_bad_bundles_are_refused_and_current_stays(base_run: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    publish_bundle(root, copy_bundle(base_run / "bundle", tmp_path / "good", "good"))
    bad = copy_bundle(base_run / "bundle", tmp_path / "bad", "bad")
    with (bad / "items.faiss").open("ab") as f:
        f.write(b"x")  # size and checksum no longer match the manifest
    assert main(["publish-bundle", "--bundles", str(root), "--from", str(bad)]) == 1
    assert current(root) == "good" and versions(root) == ["good"]
    # a version already under ROOT is immutable: different files under the same name refused
    other = copy_bundle(base_run / "bundle", tmp_path / "other", "good")
    (other / "user_ids.txt").write_text("someone\n" * 200)
    write_manifest(other, {"bundle_version": "good"})
    with pytest.raises(BundleError, match="exists with different files"):
        publish_bundle(root, other)
    # a corrupted version already under ROOT cannot be rolled out to
    shutil.copytree(bad, root / "bad")
    assert main(["rollout", "--bundles", str(root), "--to", "bad"]) == 1
    assert current(root) == "good"
