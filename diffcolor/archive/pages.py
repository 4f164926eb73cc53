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


@lru_cache(maxsize=None)
def _environment(package: str) -> Environment:
    loaders = [PackageLoader(package, "templates")]
    if package != "diffcolor.archive":
        loaders.append(PackageLoader("diffcolor.archive", "templates"))
    environment = Environment(loader=ChoiceLoader(loaders), autoescape=select_autoescape(default=True),
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters["number"] = number
    return environment


def render_page(template: str, *, package: str = "diffcolor.archive", **context) -> str:
    """The HTML of ``template`` (found in ``package``'s ``templates/`` folder, then the archive's) with ``context``."""
    return _environment(package).get_template(template).render(**context)
