"""C text helpers for the code generator: arrays, struct initialisers, identifiers."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

VALUES_PER_LINE = 16


def c_array(ctype: str, name: str, values: npt.NDArray[np.integer] | Sequence[int],
            comment: str = "") -> str:
    """`static const <ctype> name[n] = {...};`, 16 values a line, deterministic."""
    flat = [int(v) for v in np.asarray(values).reshape(-1)]
    lines = [", ".join(str(v) for v in flat[i:i + VALUES_PER_LINE])
             for i in range(0, len(flat), VALUES_PER_LINE)]
    body = ",\n    ".join(lines)
    head = f"/* {comment} */\n" if comment else ""
    return f"{head}static const {ctype} {name}[{len(flat)}] = {{\n    {body}\n}};\n"


def c_struct(ctype: str, name: str, fields: Iterable[str | int]) -> str:
    """`static const <ctype> name = {a, b, ...};`."""
    return f"static const {ctype} {name} = {{{', '.join(str(f) for f in fields)}}};\n"


def c_ident(text: str) -> str:
    """A C identifier from any layer or tensor name: lower case, [a-z0-9_]."""
    ident = re.sub(r"[^0-9a-zA-Z_]", "_", text).lower().strip("_")
    return ident if ident and not ident[0].isdigit() else f"t_{ident}"


def c_comment(text: str) -> str:
    """Text safe inside a /* */ comment."""
    return text.replace("*/", "* /")
