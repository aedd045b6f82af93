"""The Flask application factory."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask

from service import db, limits
from service.config import load_config
from service.private_files import private_dir
from service.problems import register_error_handlers

log = logging.getLogger(__name__)


def _blueprints() -> list[Blueprint]:
    """Every blueprint the app serves, one per resource. Add new resources here."""
    from service.api.campaigns import bp as campaigns_bp
    from service.api.campaigns import jobs_bp
    from service.api.devices import bp as devices_bp
    from service.api.fleets import bp as fleets_bp
    from service.api.mcus import bp as mcus_bp
    from service.api.models import bp as models_bp
    from service.api.openapi import bp as openapi_bp
    from service.api.personalization import bp as personalization_bp
    from service.api.tokens import bp as tokens_bp
    from service.dashboard import bp as dashboard_bp
    from service.metrics import bp as metrics_bp

    blueprints = [mcus_bp, fleets_bp, devices_bp, personalization_bp, tokens_bp, models_bp,
                  campaigns_bp, jobs_bp, openapi_bp, metrics_bp, dashboard_bp]
    # The stack's /healthz (service/health.py), when that module is present.
    try:
        from service.health import bp as health_bp
    except ModuleNotFoundError as err:
        if err.name != "service.health":
            raise
    else:
        blueprints.append(health_bp)
    return blueprints


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """A configured app: defaults, then TINYFLEET_* environment, then `config`."""
    app = Flask("service")
    settings = load_config(config)
    app.config.update(settings)
    private_dir(Path(settings["VAR_DIR"]))
    if settings["AUTO_MIGRATE"]:
        db.upgrade(settings["DATABASE_URL"])
    db.init_app(app, settings["DATABASE_URL"])
    register_error_handlers(app)
    limits.install(app)
    for blueprint in _blueprints():
        app.register_blueprint(blueprint)
    return app
