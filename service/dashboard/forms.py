"""The dashboard's forms (Flask-WTF: each renders and checks its CSRF token)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length


class LoginForm(FlaskForm):  # type: ignore[misc]
    """An API token, as `tinyfleet tokens create` printed it."""

    token = PasswordField("API token", validators=[DataRequired(), Length(max=200)])


class LogoutForm(FlaskForm):  # type: ignore[misc]
    """Nothing but the CSRF token: logging out is a POST, so no other site can do it."""


class TagsForm(FlaskForm):  # type: ignore[misc]
    """A device's tags, separated by spaces or commas (operators)."""

    tags = StringField("Tags", validators=[Length(max=4000)])


class ActionForm(FlaskForm):  # type: ignore[misc]
    """Only the CSRF token: a campaign's action buttons and its start form (whose fields the
    API's schema checks, naming the field)."""
