"""The dashboard: HTML pages under `/` for the same tokens and roles as the API.

`blueprint` (the blueprint, its security set-up), `session` (login with a token, roles),
`views` (pages and the JSON they poll), `campaign_views` (campaign and personalization
pages; their data in `campaigns` and `personalization`), `fleet` (the device list behind
the fleet page),
`fit` (how a model fits a device), `assets` (plotly.min.js from the installed package).
"""

from __future__ import annotations

from service.dashboard import campaign_views as _campaign_views  # noqa: F401  (routes)
from service.dashboard import views as _views  # noqa: F401  (registers the routes)
from service.dashboard.blueprint import bp

__all__ = ["bp"]
