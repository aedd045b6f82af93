"""`tinyfleet tokens create|list|revoke`: API tokens, straight on the database."""

from __future__ import annotations

import click

from service.api.common import token_json
from service.auth import create_token, list_tokens, revoke_token
from service.cli.context import app_session, echo_json, fail, table
from service.models import Role
from service.problems import ApiError


@click.group()
def tokens() -> None:
    """Create, list and revoke API tokens (roles: viewer < operator < admin)."""


@tokens.command("create")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True,
              help="viewer: read; operator: register devices; admin: tokens and deletion")
@click.option("--name", default="cli", show_default=True, help="a label for the token")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def create(role: str, name: str, as_json: bool) -> None:
    """Create a token and print its secret (shown this once, stored only hashed)."""
    with app_session() as (_app, session):
        token, secret = create_token(session, Role(role), name)
        session.commit()
        if as_json:
            echo_json({"token": token_json(token), "secret": secret})
            return
        click.echo(f"created {role} token {token.id} ({name}); it is shown only now:", err=True)
        click.echo(secret)


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def list_cmd(as_json: bool) -> None:
    """List tokens (never their secrets)."""
    with app_session() as (_app, session):
        rows = [token_json(t) for t in list_tokens(session)]
    if as_json:
        echo_json({"items": rows})
        return
    click.echo(table(["ID", "NAME", "ROLE", "PREFIX", "CREATED", "REVOKED"],
                     [[str(r["id"]), r["name"], r["role"], r["prefix"] + "...",
                       r["created_at"] or "", r["revoked_at"] or "-"] for r in rows]))


@tokens.command("revoke")
@click.argument("token_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def revoke(token_id: int, as_json: bool) -> None:
    """Revoke the token with id TOKEN_ID."""
    with app_session() as (_app, session):
        try:
            token = revoke_token(session, token_id)
        except ApiError as err:
            fail(err, as_json)
        session.commit()
        data = token_json(token)
    if as_json:
        echo_json(data)
    else:
        click.echo(f"revoked token {token_id} ({data['name']}, {data['role']})")
