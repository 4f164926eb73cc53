"""Where DiffColor keeps its own local files: one folder of this user's, whatever the output's storage."""

from __future__ import annotations

import os


def cache_root() -> str:
    """``DIFFCOLOR_CACHE``, else ``XDG_CACHE_HOME/diffcolor``, else ``~/.cache/diffcolor``."""
    root = os.environ.get("DIFFCOLOR_CACHE")
    if root:
        return root
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "diffcolor")
