"""A browser-like test client for the dashboard: logs in through the form, keeps the
session cookie, and sends each form's CSRF token."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flask.testing import FlaskClient
from werkzeug.test import TestResponse

_CSRF = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


def csrf_token(html: str) -> str:
    """The CSRF token of the first form in a page."""
    match = _CSRF.search(html)
    assert match, "the page has no CSRF token"
    return match[1]


@dataclass
class Browser:
    """A test client with a session cookie, as a browser would hold it."""

    client: FlaskClient

    def login(self, token: str, follow: bool = False) -> TestResponse:
        """Fill in and send the login form."""
        form = self.client.get("/login")
        return self.client.post("/login", data={"token": token,
                                                "csrf_token": csrf_token(form.text)},
                                follow_redirects=follow)

    def submit(self, page: str, action: str, data: dict[str, Any]) -> TestResponse:
        """POST `data` to `action` with the CSRF token of the form on `page`."""
        html = self.client.get(page).text
        return self.client.post(action, data={**data, "csrf_token": csrf_token(html)})

    def get(self, path: str, **kwargs: Any) -> TestResponse:
        """GET with the session."""
        return self.client.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> TestResponse:
        """POST with the session (and whatever data is given: no CSRF token added)."""
        return self.client.post(path, **kwargs)
