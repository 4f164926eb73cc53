"""HTML pages the project writes (the run report, the eval report and comparison), from Jinja2 templates.

Every page extends one shell, ``page.html`` (document head, shared styles, the
SMOKE RUN banner), so they look alike and escape alike: autoescaping is on for
every value. Pictures are embedded as data URIs and nothing is loaded from
anywhere, so a page opens offline, from disk or a downloaded object. Templates
live beside the module that fills them (``archive/templates``,
``tools/templates``); the shell is the archive's.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from functools import lru_cache

from jinja2 import (
    ChoiceLoader,
    Environment,
    PackageLoader,
    StrictUndefined,
    select_autoescape,
)


def number(value, digits: int = 3) -> str:
    """A metric for a page: ``digits`` decimals; a dash for a missing or NaN value; infinities as words."""
    if value is None:
        return "–"
    value = float(value)
    if math.isnan(value):
        return "–"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def readable(value) -> str:
    """A value for a page: a float to 4 significant digits (whole from 1000 up), an ISO timestamp as
    "2026-12-07 03:50:09 UTC", a boolean as yes/no, a list joined with commas; anything else as text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–" if math.isnan(value) else str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(readable(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key}: {readable(item)}" for key, item in value.items()) or "–"
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value) if _ISO_TIME.match(value) else None
        except ValueError:
            moment = None
        if moment is not None:
            if moment.tzinfo is not None:
                moment = moment.astimezone(timezone.utc)
            return moment.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if moment.tzinfo is not None else "")
    return "–" if value is None else str(value)


_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}")


def flat_rows(mapping: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``mapping`` as (key, text) rows of a table, keys sorted: a nested mapping's keys dotted
    (``seconds.stage1``), each value :func:`readable`."""
    rows: list[tuple[str, str]] = []
    for key in sorted(mapping, key=str):
        value = mapping[key]
        if isinstance(value, dict) and value:
            rows.extend(flat_rows(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", readable(value)))
    return rows


@lru_cache(maxsize=None)
def _environment(package: str) -> Environment:
    loaders = [PackageLoader(package, "templates")]
    if package != "diffcolor.archive":
        loaders.append(PackageLoader("diffcolor.archive", "templates"))
    environment = Environment(loader=ChoiceLoader(loaders), autoescape=select_autoescape(default=True),
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters.update(number=number, readable=readable, flat_rows=flat_rows)
    return environment


def render_page(template: str, *, package: str = "diffcolor.archive", **context) -> str:
    """The HTML of ``template`` (found in ``package``'s ``templates/`` folder, then the archive's) with ``context``."""
    return _environment(package).get_template(template).render(**context)
