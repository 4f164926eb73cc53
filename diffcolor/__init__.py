"""DiffColor Archive: text-guided colourisation of archival photographs."""

__version__ = "0.1.0"

