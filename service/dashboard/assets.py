"""plotly.min.js, served from the installed plotly package (never a CDN, never a copy).

The file (about 4.8 MB) is read once per process, gzipped once for clients that accept it
(about 1.4 MB), and served under its version with a year-long immutable cache and an ETag,
so a browser fetches it once per plotly upgrade.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources

from flask import Response, request
from werkzeug.wrappers import Response as BaseResponse

PACKAGE_FILE = ("plotly", "package_data/plotly.min.js")


@dataclass(frozen=True)
class Asset:
    """A file's bytes, its gzip form and its ETag."""

    body: bytes
    gzipped: bytes
    etag: str


@functools.cache
def plotly_js() -> Asset:
    """plotly.min.js of the installed plotly package."""
    package, name = PACKAGE_FILE
    body = resources.files(package).joinpath(name).read_bytes()
    return Asset(body, gzip.compress(body, compresslevel=6, mtime=0),
                 hashlib.sha256(body).hexdigest()[:32])


@functools.cache
def plotly_version() -> str:
    """The installed plotly package's version (part of the script's URL)."""
    from importlib.metadata import version

    return version("plotly")


def asset_response(asset: Asset, mimetype: str) -> BaseResponse:
    """The asset, gzipped when the client accepts it; 304 when its ETag matches."""
    use_gzip = request.accept_encodings.quality("gzip") > 0
    response = Response(asset.gzipped if use_gzip else asset.body, mimetype=mimetype)
    if use_gzip:
        response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept-Encoding"
    response.set_etag(asset.etag + ("-gz" if use_gzip else ""))
    response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    return response.make_conditional(request)
