"""`Idempotency-Key` for bulk requests (draft-ietf-httpapi-idempotency-key-header).

A key is kept 24 h with the request's fingerprint and, once the request succeeded, the ids
of the devices it answered with, never their passwords. Then:

- a retry with the same key and body gets the same device list, with new passwords (the
  first answer's passwords may have been lost with it, so they are rotated, never stored);
- the same key with another body is 422;
- a retry while the first request still runs is 409 (it runs once); a claim older than
  STALE_AFTER (its process died before committing) is taken over by the next retry;
- a request that fails releases its key, so that a corrected retry may use it.

The key's row is claimed (committed) before the work starts, and completed in the work's
own transaction: the devices and the record of them are committed together or not at all.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import IdempotencyKey, IdempotencyState, utcnow
from service.problems import ApiError, FieldError
from service.schemas import IDEMPOTENCY_KEY_RE

HEADER = "Idempotency-Key"
KEEP = timedelta(hours=24)
STALE_AFTER = timedelta(minutes=5)  # > gunicorn's 120 s request timeout
_KEY = re.compile(IDEMPOTENCY_KEY_RE)


@dataclass(frozen=True)
class Claim:
    """A key this request holds (`row_id`), or the device ids of an earlier answer."""

    row_id: int | None
    replay_ids: list[str] | None


def fingerprint(data: Any) -> str:
    """SHA-256 of the request body as canonical JSON (key order and spacing do not count)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_key(key: str) -> str:
    """The header's value, or 422 when it is not 1-255 visible ASCII characters."""
    if not _KEY.fullmatch(key):
        message = "must be 1-255 visible ASCII characters (e.g. a UUID)"
        raise ApiError(422, f"{HEADER}: {message}", [FieldError(HEADER, message)])
    return key


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def claim(session: Session, scope: str, key: str, request_sha256: str) -> Claim:
    """Hold `key` for this request, or learn what an earlier request with it did."""
    now = utcnow()
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < now - KEEP))
    session.commit()
    for _attempt in range(2):
        row = session.scalar(select(IdempotencyKey).where(IdempotencyKey.scope == scope,
                                                          IdempotencyKey.key == key))
        if row is None:
            row = IdempotencyKey(scope=scope, key=key, request_sha256=request_sha256,
                                 state=IdempotencyState.IN_PROGRESS, created_at=now)
            session.add(row)
            try:
                session.commit()
            except IntegrityError:  # a concurrent request claimed it first: look again
                session.rollback()
                continue
            return Claim(row.id, None)
        if row.request_sha256 != request_sha256:
            message = ("was used with a different request body; use a new key for a new "
                       "request")
            raise ApiError(422, f"{HEADER}: {message}", [FieldError(HEADER, message)])
        if row.state is IdempotencyState.DONE:
            return Claim(None, json.loads(row.device_ids or "[]"))
        started = _aware(row.created_at)
        if now - started < STALE_AFTER:
            break
        # The request holding it died before committing: take it over, atomically.
        taken = session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.id == row.id,
                   IdempotencyKey.state == IdempotencyState.IN_PROGRESS,
                   IdempotencyKey.created_at == row.created_at)
            .values(created_at=now)).rowcount  # type: ignore[attr-defined]
        session.commit()
        if taken == 1:
            return Claim(row.id, None)
    message = "a request with this key is still being processed; retry when it has finished"
    raise ApiError(409, f"{HEADER}: {message}", [FieldError(HEADER, message)],
                   {"Retry-After": "2"})


def complete(session: Session, row_id: int, device_ids: list[str]) -> None:
    """Record the answer's device ids (in the work's transaction, before its commit)."""
    session.execute(update(IdempotencyKey).where(IdempotencyKey.id == row_id).values(
        state=IdempotencyState.DONE, device_ids=json.dumps(device_ids),
        completed_at=utcnow()))


def release(session: Session, row_id: int) -> None:
    """Forget a claim whose request failed (after its transaction was rolled back)."""
    session.rollback()
    session.execute(delete(IdempotencyKey).where(
        IdempotencyKey.id == row_id, IdempotencyKey.state == IdempotencyState.IN_PROGRESS))
    session.commit()
