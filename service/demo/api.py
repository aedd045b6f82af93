"""A minimal JSON client for the REST API, over real HTTP (the demo talks to gunicorn)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


class ApiCallError(Exception):
    """The API answered with an error status; the message carries the problem document."""


@dataclass(frozen=True)
class ApiClient:
    """Calls `base_url` + path with a Bearer token; bodies and answers are JSON."""

    base_url: str
    token: str
    timeout_s: float = 30.0

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; the decoded JSON answer, or ApiCallError naming the status."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ApiCallError(f"{method} {path} answered {exc.code}: {detail}") from exc

    def get(self, path: str) -> Any:
        """GET `path`."""
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Any:
        """POST a JSON body to `path`."""
        return self.call("POST", path, body)
