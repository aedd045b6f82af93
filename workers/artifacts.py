"""Content-addressed artifact files (signed firmware images) under `var/artifacts`.

One small interface: the build job puts an image, the bridge reads its blocks. An artifact's
name is the sha256 of its bytes, so a put is idempotent and a file is never changed once
written: it appears whole (temp file + fsync + rename) or not at all. Layout:
`ROOT/ab/abcdef...` (two-hex-digit fan-out keeps directories small). An S3-compatible store
can replace it behind the same methods.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(Exception):
    """An artifact that is missing, misnamed or damaged."""


class ArtifactMissing(ArtifactError, KeyError):
    """No artifact with this sha256 in the store."""


class ArtifactStore:
    """Files named by the sha256 of their content, under one directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @classmethod
    def from_config(cls, config: dict[str, object]) -> ArtifactStore:
        """The store of the service settings: VAR_DIR/artifacts."""
        return cls(Path(str(config["VAR_DIR"])) / "artifacts")

    def path(self, sha256: str) -> Path:
        """Where the artifact `sha256` lives (whether or not it exists)."""
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise ArtifactError(f"artifact name {sha256!r} is not a lowercase sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether the artifact is stored."""
        return self.path(sha256).is_file()

    def put(self, data: bytes) -> str:
        """Store `data` (atomically; nothing to do when it is already there); its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        final = self.path(digest)
        if final.is_file():
            return digest
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".put-", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)  # atomic: a reader sees the whole file or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def read(self, sha256: str) -> bytes:
        """The artifact's bytes; ArtifactMissing, or ArtifactError if they no longer match."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise ArtifactMissing(f"no artifact {sha256} under {self.root}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ArtifactError(f"artifact {sha256} is damaged: its bytes hash to {actual}")
        return data

    def size(self, sha256: str) -> int:
        """The artifact's size in bytes."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise ArtifactMissing(f"no artifact {sha256} under {self.root}") from None

    def read_block(self, sha256: str, index: int, block_size: int) -> bytes:
        """Bytes [index * block_size, (index + 1) * block_size) of the artifact (the last block
        may be short); ArtifactError for an index past its end."""
        if index < 0 or block_size <= 0:
            raise ArtifactError(f"block {index} of size {block_size} is not a block")
        try:
            with self.path(sha256).open("rb") as f:
                f.seek(index * block_size)
                data = f.read(block_size)
        except FileNotFoundError:
            raise ArtifactMissing(f"no artifact {sha256} under {self.root}") from None
        if not data:
            raise ArtifactError(f"block {index} ({block_size} bytes each) is past the end of "
                                f"artifact {sha256}")
        return data
