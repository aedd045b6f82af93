"""`tinyfleet models register|list|show`: model versions, on the database."""

from __future__ import annotations

from pathlib import Path

import click

from service.cli.context import app_session, echo_json, fail
from service.cli.ui import print_table
from service.model_versions import (
    find_model,
    list_models,
    model_json,
    register_path,
    register_upload,
)
from service.parsing import validate
from service.problems import ApiError
from service.schemas import ModelRegister, ModelUploadForm


@click.group()
def models() -> None:
    """Register, list and show model versions (families and fixed ONNX models)."""


@models.command("register")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="a label for the model")
@click.option("--no-analysis", is_flag=True,
              help="do not queue the family's contribution analysis")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def register(source: Path, name: str, no_analysis: bool, as_json: bool) -> None:
    """Register SOURCE: a family directory, a family archive (.tar.gz/.zip) or an .onnx."""
    from service.queue import enqueue

    with app_session() as (app, session), app.app_context():
        var_dir = Path(app.config["VAR_DIR"])
        queue = enqueue if app.config.get("REDIS_URL") else None
        try:
            if source.is_dir() or source.suffix.lower() == ".onnx":
                spec = validate(ModelRegister, {"name": name, "path": str(source.resolve()),
                                                "analyze": not no_analysis})
                result = register_path(session, var_dir, spec.name, spec.path, spec.analyze,
                                       queue)
            else:
                form = validate(ModelUploadForm, {"name": name, "analyze": not no_analysis})
                limit = int(app.config["MODEL_UPLOAD_MAX_BYTES"])
                data = source.read_bytes()
                if len(data) > limit:
                    raise ApiError(413, f"{source}: {len(data)} bytes, over the upload limit "
                                        f"of {limit}")
                result = register_upload(session, var_dir, form.name, source.name, data,
                                         form.analyze, queue, max_unpacked=4 * limit)
        except ApiError as err:
            fail(err, as_json)
        out = model_json(result.model)
    if as_json:
        echo_json({"model": out, "created": result.created})
        return
    verb = "registered" if result.created else "already registered"
    click.echo(f"{verb}: {out['name']} version {out['id']} ({out['kind']}, "
               f"{out['size_bytes']} bytes, analysis {out['analysis']})")
    if out["analysis"] == "queued" and queue is None:
        click.echo("  no task queue (TINYFLEET_REDIS_URL): the analysis runs once `tinyfleet "
                   "up` is running (its reconciler queues it)", err=True)


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def list_cmd(as_json: bool) -> None:
    """Every model version, newest first."""
    with app_session() as (_app, session):
        rows = [model_json(m) for m in list_models(session)]
    if as_json:
        echo_json({"items": rows})
        return
    print_table(["VERSION", "NAME", "KIND", "BYTES", "ANALYSIS", "CREATED"],
                [[r["id"], r["name"], r["kind"], str(r["size_bytes"]), r["analysis"],
                  r["created_at"] or ""] for r in rows], right={3})


@models.command("show")
@click.argument("version")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def show(version: str, as_json: bool) -> None:
    """One model version."""
    with app_session() as (_app, session):
        try:
            row = model_json(find_model(session, version))
        except ApiError as err:
            fail(err, as_json)
    if as_json:
        echo_json(row)
        return
    for key, value in row.items():
        click.echo(f"{key:<16}{value}")
