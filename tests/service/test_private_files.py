"""Secrets shared by the stack's processes: made once, never read half-written."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from service.private_files import read_or_create_secret

pytestmark = pytest.mark.unit


def _racer(path: str, start: object, out: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    out.put(read_or_create_secret(Path(path)))  # type: ignore[attr-defined]


def test_processes_racing_to_create_the_secret_all_get_the_same_whole_one(
        tmp_path: Path) -> None:
    # Before: the loser of O_EXCL could read the winner's file before it was written, and
    # its gunicorn worker got an empty SECRET_KEY (every form a 500).
    ctx = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = tmp_path / f"secret-{attempt}"
        start, out = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(str(path), start, out)) for _ in range(8)]
        for proc in procs:
            proc.start()
        got = {out.get(timeout=30) for _ in procs}
        for proc in procs:
            proc.join(30)
        assert len(got) == 1 and len(got.pop()) >= 32
        assert (path.stat().st_mode & 0o777) == 0o600
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_empty_secret_file_is_refused_not_used(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("")
    with pytest.raises(RuntimeError, match="exists but is empty"):
        read_or_create_secret(path)
