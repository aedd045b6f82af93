"""Who is looking at the dashboard: an API token, entered once in the login form.

The session cookie (Flask's signed cookie, `tinyfleet_session`: HttpOnly, SameSite=Lax,
Secure when the request came over TLS or SESSION_COOKIE_SECURE is set) holds the token's
row id and the first characters of its hash, never the secret. Every page reads the token
row again, so revoking or expiring a token logs its sessions out at once, and the role shown
is the token's current one. A session lasts SESSION_MAX_AGE_S from login.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import Flask, abort, has_request_context, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy.orm import Session

from service.auth import authenticate
from service.models import ApiToken, Role, utcnow
from service.private_files import read_or_create_secret
from service.problems import ApiError, FieldError

F = TypeVar("F", bound=Callable[..., Any])

COOKIE_NAME = "tinyfleet_session"
SESSION_MAX_AGE_S = 12 * 3600
SECRET_FILE = "dashboard-secret"  # under VAR_DIR, 0600: shared by every worker of the stack
_HASH_CHARS = 16  # of the token's SHA-256, to tie a session to one token row


class DashboardSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions with the dashboard's cookie attributes."""

    def get_cookie_name(self, app: Flask) -> str:
        """`tinyfleet_session`."""
        return COOKIE_NAME

    def get_cookie_httponly(self, app: Flask) -> bool:
        """Always: no script ever needs the session cookie."""
        return True

    def get_cookie_samesite(self, app: Flask) -> str:
        """SESSION_COOKIE_SAMESITE, Lax by default (no cross-site POST carries the cookie)."""
        return str(app.config.get("SESSION_COOKIE_SAMESITE") or "Lax")

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure when served over TLS (or SESSION_COOKIE_SECURE forces it: behind a proxy
        that terminates TLS, unless the proxy's headers are trusted through ProxyFix)."""
        return bool(app.config.get("SESSION_COOKIE_SECURE")) or (
            has_request_context() and request.is_secure)


def install_sessions(app: Flask) -> None:
    """The secret key (SECRET_KEY, else VAR_DIR/dashboard-secret) and the session cookie."""
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = read_or_create_secret(
            Path(app.config["VAR_DIR"]) / SECRET_FILE, 32)
    app.session_interface = DashboardSessionInterface()
    # A form stays valid as long as the session that rendered it.
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", SESSION_MAX_AGE_S)


@dataclass(frozen=True)
class Viewer:
    """The token behind the current session."""

    token_id: int
    name: str
    role: Role

    def can(self, role: Role) -> bool:
        """True when the token's role includes `role`."""
        return self.role.allows(role)


def log_in(db: Session, secret: str) -> Viewer:
    """Start a session for the token `secret`; ApiError 401 naming why it is refused."""
    try:
        token = authenticate(db, f"Bearer {secret.strip()}")
    except ApiError as err:
        raise ApiError(401, err.detail, [FieldError("token", err.detail)]) from None
    session.clear()  # nothing from before the login survives it (the CSRF secret included)
    session["token_id"] = token.id
    session["token_hash"] = token.token_hash[:_HASH_CHARS]
    session["since"] = int(time.time())
    return Viewer(token.id, token.name, token.role)


def log_out() -> None:
    """End the session."""
    session.clear()


def current_viewer(db: Session) -> Viewer | None:
    """The session's token when it is still valid, else None (the session is cleared)."""
    token_id = session.get("token_id")
    if not isinstance(token_id, int):
        return None
    since = session.get("since")
    token = db.get(ApiToken, token_id)
    now = utcnow()
    valid = (token is not None and isinstance(since, int)
             and time.time() - since < SESSION_MAX_AGE_S
             and token.token_hash[:_HASH_CHARS] == session.get("token_hash")
             and token.revoked_at is None
             and (token.expires_at is None or _aware(token.expires_at) > now))
    if not valid or token is None:
        session.clear()
        return None
    return Viewer(token.id, token.name, token.role)


def _aware(moment: Any) -> Any:
    from datetime import UTC

    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def safe_next(target: str | None) -> str:
    """A path on this site to go to after login (never another origin)."""
    if not target:
        return url_for("dashboard.fleet")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") \
            or "\\" in target:
        return url_for("dashboard.fleet")
    return target


def page(role: Role = Role.VIEWER, data: bool = False) -> Callable[[F], F]:
    """View decorator: the session's token must have `role`.

    Without a valid session a page redirects to the login form (a `data` endpoint, polled
    by scripts, answers 401 problem+json); a role below `role` gets 403.
    """
    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            from flask import g

            from service.db import request_session

            viewer = current_viewer(request_session())
            if viewer is None:
                if data:
                    raise ApiError(401, "not logged in (or the session ended): log in again",
                                   [FieldError("session", "missing or expired")])
                return redirect(url_for("dashboard.login", next=request.full_path
                                        if request.query_string else request.path))
            g.viewer = viewer  # also for the error page's header
            if not viewer.can(role):
                if data:
                    raise ApiError(403, f"this needs role {role.value}; the token has role "
                                        f"{viewer.role.value}",
                                   [FieldError("session", f"role {viewer.role.value} < "
                                                          f"{role.value}")])
                abort(403, f"This needs an {role.value} token; you are logged in with "
                           f"{viewer.name!r}, a {viewer.role.value} token.")
            return view(*args, **kwargs)

        return cast(F, wrapped)

    return decorator
