"""The dashboard's blueprint and what it installs: sessions, CSRF checks, security headers.

Security, in one place:
- Content-Security-Policy on every response of the app (`CSP`): scripts only from this
  origin (no inline script, no eval), images, fonts and fetches only from here, no plugins,
  no framing, forms post only here. Inline *styles* are allowed: plotly.js adds <style>
  elements and style attributes as it draws (the browser test sees every violation
  otherwise); since nothing may load from another origin, injected CSS could not send
  anything anywhere.
- Every state-changing request to the dashboard (POST ...) carries a CSRF token of
  Flask-WTF (a per-session secret, HMAC-signed with SECRET_KEY, time-limited) in its form;
  without a valid one it is refused with 400 before the view runs. The API is not affected:
  it authenticates by an Authorization header, which no browser adds on its own.
- The session cookie: see `service.dashboard.session`.
"""

from __future__ import annotations

from typing import Any, cast

from flask import Blueprint, Flask, Response, g, render_template, request
from flask.blueprints import BlueprintSetupState
from flask_wtf.csrf import CSRFError, validate_csrf
from werkzeug.exceptions import HTTPException
from wtforms import ValidationError

from service.dashboard.assets import plotly_version
from service.dashboard.forms import LogoutForm
from service.dashboard.session import install_sessions
from service.problems import ApiError, problem_response

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static",
               static_url_path="/dashboard/static")

CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
POLL_MS = 2000  # how often pages ask for news (with their last ETag)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Endpoints polled by scripts: their errors are problem+json, not pages.
DATA_ENDPOINTS: set[str] = set()


def render_page(template: str, status: int = 200, **context: Any) -> Response:
    """A page (never cached: it holds a CSRF token and live data)."""
    response = Response(render_template(template, logout_form=LogoutForm(),
                                        viewer=g.get("viewer"), poll_ms=POLL_MS,
                                        plotly_version=plotly_version(), **context),
                        status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    return response


def security_headers(response: Response) -> Response:
    """The security headers (a view may set its own first)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@bp.record_once
def _install(state: BlueprintSetupState) -> None:
    app = cast(Flask, state.app)
    install_sessions(app)
    app.after_request(security_headers)


@bp.before_request
def _check_csrf() -> None:
    if request.method in SAFE_METHODS:
        return
    try:
        validate_csrf(request.form.get("csrf_token"))
    except ValidationError as err:
        raise CSRFError(f"{err.args[0] if err.args else 'invalid CSRF token'} The form did "
                        "not come from this page, or it expired: reload and try again.") \
            from None


def _wants_data() -> bool:
    return request.endpoint in DATA_ENDPOINTS


@bp.errorhandler(ApiError)
def _api_error(err: ApiError) -> Response:
    if _wants_data():
        return problem_response(err.status, err.detail, err.errors, err.headers)
    return render_page("dashboard/error.html", err.status, code=err.status, detail=err.detail)


@bp.errorhandler(HTTPException)
def _http_error(err: HTTPException) -> Response:
    status = err.code or 500
    detail = err.description or err.name
    if _wants_data():
        return problem_response(status, detail)
    return render_page("dashboard/error.html", status, code=status, detail=detail)
