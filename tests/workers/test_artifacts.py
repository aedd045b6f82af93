"""ArtifactStore: content-addressed, atomic, blocks read back exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from workers.artifacts import ArtifactError, ArtifactMissing, ArtifactStore

pytestmark = pytest.mark.unit


def test_put_read_and_blocks(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = bytes(range(256)) * 41  # 10,496 bytes: 2 full 4 KiB blocks and a short one
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.exists(digest) and store.size(digest) == len(data)
    assert store.path(digest) == tmp_path / "artifacts" / digest[:2] / digest
    assert store.read(digest) == data
    blocks = [store.read_block(digest, i, 4096) for i in range(3)]
    assert b"".join(blocks) == data and len(blocks[2]) == len(data) - 8192
    with pytest.raises(ArtifactError, match="past the end"):
        store.read_block(digest, 3, 4096)
    assert store.put(data) == digest  # idempotent
    assert [p.name for p in store.path(digest).parent.iterdir()] == [digest]  # no temp left


def test_missing_misnamed_and_damaged(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    missing = "0" * 64
    assert not store.exists(missing)
    with pytest.raises(ArtifactMissing):
        store.read(missing)
    with pytest.raises(ArtifactMissing):
        store.read_block(missing, 0, 4096)
    with pytest.raises(ArtifactError, match="not a lowercase sha256"):
        store.path("../../etc/passwd")
    digest = store.put(b"image")
    store.path(digest).write_bytes(b"imagf")
    with pytest.raises(ArtifactError, match="damaged"):
        store.read(digest)
