"""Plain-text building blocks: cells, columns that fit a width, plurals."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

GAP = "  "  # between columns
MIN_SHRUNK = 6  # a shrunk column keeps at least this many characters (or its header's)


def cell(value: Any) -> str:
    """How one value shows in a table: None and '' as '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def plural(n: int, noun: str) -> str:
    """`1 uncorrected ECC error`, `2 uncorrected ECC errors`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def short_uuid(uuid: str | None) -> str | None:
    """`GPU-1a2b3c4d`: enough to tell a node's GPUs apart."""
    return uuid[:12] if uuid else uuid


def ellipsis() -> str:
    """The mark of a cut cell: '…' where stdout takes UTF-8, else '~'."""
    return "…" if "utf" in (getattr(sys.stdout, "encoding", None) or "").lower() else "~"


def elide(text: str, width: int) -> str:
    """`text` cut in the middle to `width` characters (its head and its tail,
    the end of a path included, stay readable)."""
    if len(text) <= width:
        return text
    keep = max(width - 1, 0)
    head = keep // 2
    return text[:head] + ellipsis() + text[len(text) - (keep - head) :]


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    width: int | None = None,
    shrink: Sequence[int] = (),
    paint: Mapping[int, Callable[[str], str]] | None = None,
) -> str:
    """Left-aligned columns, two spaces apart. With `width`, the columns in
    `shrink` are cut (widest first) until every line fits. `paint` colours a
    column's cells (not its header) after they are padded."""
    cells = [list(headers)] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    if width is not None:
        widths = _fit(widths, [max(len(h), MIN_SHRUNK) for h in headers], shrink, width)
    lines = []
    for n, row in enumerate(cells):
        parts = []
        for i, (text, w) in enumerate(zip(row, widths)):
            text = elide(text, w)
            pad = " " * (w - len(text))
            parts.append((paint[i](text) if n and paint and i in paint else text) + pad)
        lines.append(GAP.join(parts).rstrip())
    return "\n".join(lines)


def _fit(widths: list[int], floors: list[int], shrink: Sequence[int], width: int) -> list[int]:
    """The column widths after cutting the `shrink` columns down to fit `width`."""
    out = list(widths)
    excess = sum(out) + len(GAP) * (len(out) - 1) - width
    while excess > 0:
        cuttable = [i for i in shrink if out[i] > floors[i]]
        if not cuttable:
            break
        widest = max(cuttable, key=lambda i: out[i])
        out[widest] -= 1
        excess -= 1
    return out
