"""`tinyfleet tokens create|list|revoke`: API tokens, straight on the database."""

from __future__ import annotations

import re
from typing import Any

import click

from service.api.common import token_json
from service.auth import create_token, list_tokens, revoke_token
from service.cli.context import app_session, echo_json, fail
from service.cli.ui import print_table
from service.models import Role
from service.problems import ApiError
from service.schemas import MAX_TOKEN_LIFETIME_S, MIN_TOKEN_LIFETIME_S

_UNITS_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Duration(click.ParamType[int, Any]):
    """A duration: 3600, 90s, 45m, 12h, 30d or 2w (as seconds)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"([0-9]{1,9})([smhdw]?)", str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a duration such as 3600, 45m, 12h, 30d or 2w",
                      param, ctx)
        seconds = int(match[1]) * _UNITS_S[match[2]]
        if not MIN_TOKEN_LIFETIME_S <= seconds <= MAX_TOKEN_LIFETIME_S:
            self.fail(f"{value!r} is {seconds} s; allowed {MIN_TOKEN_LIFETIME_S} s to "
                      f"{MAX_TOKEN_LIFETIME_S // 86400} days", param, ctx)
        return seconds


@click.group()
def tokens() -> None:
    """Create, list and revoke API tokens (roles: viewer < operator < admin)."""


@tokens.command("create")
@click.option("--role", type=click.Choice([r.value for r in Role]), required=True,
              help="viewer: read; operator: register devices; admin: tokens and deletion")
@click.option("--name", default="cli", show_default=True, help="a label for the token")
@click.option("--expires-in", type=Duration(), default=None,
              help="refuse the token after this long: 3600, 45m, 12h, 30d, 2w (default: never)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def create(role: str, name: str, expires_in: int | None, as_json: bool) -> None:
    """Create a token and print its secret (shown this once, stored only hashed)."""
    with app_session() as (_app, session):
        token, secret = create_token(session, Role(role), name, expires_in)
        session.commit()
        if as_json:
            echo_json({"token": token_json(token), "secret": secret})
            return
        until = f", expires {token_json(token)['expires_at']}" if expires_in else ""
        click.echo(f"created {role} token {token.id} ({name}{until}); it is shown only now:",
                   err=True)
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
    print_table(["ID", "NAME", "ROLE", "PREFIX", "CREATED", "EXPIRES", "REVOKED"],
                [[str(r["id"]), r["name"], r["role"], r["prefix"] + "...",
                  r["created_at"] or "", r["expires_at"] or "never", r["revoked_at"] or "-"]
                 for r in rows], right={0})


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
