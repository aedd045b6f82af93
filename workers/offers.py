"""The OTA offer of a stored artifact, its summary read once per artifact per process.

An offer's summary (manifest fields, size, sha256, signature, block count) is the same for
every device a signed artifact goes to; reading, re-hashing and parsing a half-megabyte image
for each of a thousand offers was most of an `offer` task. Only the update id and the
deadlines differ per job.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from device_agent import protocol as p
from service.models import ClassBuild, DeploymentJob, SignedArtifact
from workers.artifacts import ArtifactStore

CACHED_OFFERS = 64  # (artifact, block size) summaries kept per process

_summaries: OrderedDict[tuple[str, int], p.OtaOffer] = OrderedDict()
_lock = threading.Lock()


def offer_for(store: ArtifactStore, sha256: str, update_id: str, *, block_size: int,
              offer_deadline_s: float, install_deadline_s: float) -> p.OtaOffer:
    """The offer of artifact `sha256` as update `update_id`, its deadlines from now (unix
    times: the offer's, then the install's after it); ArtifactError for a damaged one."""
    key = (sha256, block_size)
    with _lock:
        summary = _summaries.get(key)
        if summary is not None:
            _summaries.move_to_end(key)
    if summary is None:
        summary = p.make_offer(update_id, store.read(sha256), block_size=block_size)
        with _lock:
            _summaries[key] = summary
            while len(_summaries) > CACHED_OFFERS:
                _summaries.popitem(last=False)
    now = time.time()
    return summary.model_copy(update={
        "update_id": update_id, "offer_deadline": now + offer_deadline_s,
        "install_deadline": now + offer_deadline_s + install_deadline_s})


class NoArtifactForBackend(Exception):
    """The device's backend runs images the job's build has none of (the reason)."""


def artifact_for_backend(session: Session, job: DeploymentJob, backend: str | None) -> str:
    """The signed artifact of the job's build for a device whose backend is `backend` (its
    presence's: "qemu" or None for the MCU image, "host-<machine>" for the host library);
    NoArtifactForBackend, naming both, when the build has no image for it."""
    sha = job.artifact_sha256
    assert sha is not None
    signed = session.scalar(select(SignedArtifact).where(
        or_(SignedArtifact.sha256 == sha, SignedArtifact.host_sha256 == sha)).limit(1))
    if signed is None:
        return sha  # not a class build's (a test's hand-made artifact): as it is
    if backend is None or backend == "qemu":
        return signed.sha256
    build = session.get(ClassBuild, signed.build_id)
    assert build is not None
    if build.host_target == backend and signed.host_sha256 is not None:
        return signed.host_sha256
    has = (f"only a {build.host_target} host image" if build.host_target else
           f"no host image ({build.host_reason or 'built before host images'})")
    raise NoArtifactForBackend(
        f"device {job.device_id} runs {backend} images (its agent's host backend); the build "
        f"of class {job.hw_class} has {has}")
