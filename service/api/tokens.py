"""/api/v1/tokens: API tokens (admin only)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from service.api.common import API_PREFIX, parse_body, token_json
from service.api.openapi import doc
from service.auth import create_token, list_tokens, require, revoke_token
from service.db import request_session
from service.models import Role
from service.schemas import TokenCreate, TokenCreated, TokenList, TokenOut

bp = Blueprint("tokens", __name__, url_prefix=f"{API_PREFIX}/tokens")


@bp.get("")
@doc("List API tokens (without secrets)", response=TokenList, tag="tokens")
@require(Role.ADMIN)
def list_view() -> dict[str, Any]:
    """Every token."""
    return {"items": [token_json(t) for t in list_tokens(request_session())]}


@bp.post("")
@doc("Create an API token (optionally expiring); the secret is returned once", body=TokenCreate,
     response=TokenCreated, status=201, tag="tokens")
@require(Role.ADMIN)
def create_view() -> tuple[dict[str, Any], int]:
    """Create a token."""
    spec = parse_body(TokenCreate)
    session = request_session()
    token, secret = create_token(session, spec.role, spec.name, spec.expires_in_s)
    session.commit()
    return {"token": token_json(token), "secret": secret}, 201


@bp.delete("/<int:token_id>")
@doc("Revoke an API token", response=TokenOut, tag="tokens")
@require(Role.ADMIN)
def revoke_view(token_id: int) -> dict[str, Any]:
    """Revoke a token (idempotent)."""
    session = request_session()
    token = revoke_token(session, token_id)
    session.commit()
    return token_json(token)
