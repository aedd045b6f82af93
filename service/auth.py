"""API tokens: created with a role, stored as SHA-256, checked on every /api/v1 request."""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, timedelta
from typing import Any, TypeVar, cast

from flask import g, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import request_session
from service.models import ApiToken, Role, utcnow
from service.problems import ApiError, FieldError

TOKEN_PREFIX = "tf_"
# Refreshing last_used_at on every request would turn reads into writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)

F = TypeVar("F", bound=Callable[..., Any])


def hash_token(secret: str) -> str:
    """SHA-256 hex of a token (a 256-bit random secret needs no slow hash)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, role: Role, name: str = "api",
                 expires_in_s: int | None = None) -> tuple[ApiToken, str]:
    """A new token row (added, not committed) and its secret, which is not stored.

    With `expires_in_s`, the token is refused from that many seconds after now.
    """
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    expires_at = None if expires_in_s is None else now + timedelta(seconds=expires_in_s)
    token = ApiToken(name=name, role=role, token_hash=hash_token(secret),
                     prefix=secret[:10], created_at=now, expires_at=expires_at)
    session.add(token)
    return token, secret


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, revoked ones included, by id."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


MAX_TOKEN_ID = 2**31 - 1  # ids are 32-bit integers on every database


def revoke_token(session: Session, token_id: int) -> ApiToken:
    """Mark a token revoked (not committed); 404 when there is none with that id."""
    # Checked before the query: PostgreSQL rejects an integer parameter out of range.
    token = session.get(ApiToken, token_id) if 1 <= token_id <= MAX_TOKEN_ID else None
    if token is None:
        raise ApiError(404, f"no API token with id {token_id}",
                       [FieldError("id", f"no API token with id {token_id}")])
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def authenticate(session: Session, header: str | None) -> ApiToken:
    """The valid token named by an `Authorization: Bearer` header, or ApiError 401."""
    challenge = {"WWW-Authenticate": 'Bearer realm="tinyfleet"'}
    if not header:
        raise ApiError(401, "missing Authorization: Bearer token",
                       [FieldError("Authorization", "missing")], challenge)
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "Authorization must be 'Bearer <token>'",
                       [FieldError("Authorization", "must be 'Bearer <token>'")], challenge)
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(
        secret.strip())))
    now = utcnow()
    why = ("unknown" if token is None else "revoked" if token.revoked_at is not None else
           "expired" if token.expires_at is not None and _aware(token.expires_at) <= now
           else None)
    if why is not None or token is None:
        raise ApiError(401, f"{why} API token", [FieldError("Authorization", f"{why} token")],
                       challenge)
    last = token.last_used_at
    if last is None or now - _aware(last) > LAST_USED_RESOLUTION:
        token.last_used_at = now
        session.commit()
    return token


def _aware(moment: Any) -> Any:
    # SQLite hands back naive datetimes even for timezone=True columns.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def require(role: Role) -> Callable[[F], F]:
    """View decorator: 401 without a valid token, 403 when its role is below `role`."""
    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            token = authenticate(request_session(), request.headers.get("Authorization"))
            if not token.role.allows(role):
                raise ApiError(403, f"this needs role {role.value}; the token has role "
                                    f"{token.role.value}",
                               [FieldError("Authorization", f"role {token.role.value} < "
                                                            f"{role.value}")])
            g.api_token = token
            return view(*args, **kwargs)

        wrapped.required_role = role  # type: ignore[attr-defined]  # read by the OpenAPI doc
        return cast(F, wrapped)

    return decorator
