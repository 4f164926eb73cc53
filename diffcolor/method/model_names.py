"""A model as a user names it: a local folder, a hub id, or ``tiny``.

The command line, the flows and their workers, and the review application all
take a model by name. :func:`resolve_model` turns the name into what
:mod:`diffcolor.method.models` loads: ``tiny`` stands for the cached tiny random
bundle (:func:`diffcolor.method.tiny.tiny_bundle_folder`, written on first use
in whichever process names it first), any other name for itself. The name, not
the folder, goes into provenance.
"""

from __future__ import annotations

from diffcolor.method.models import Models, load_models, load_prompt_limit
from diffcolor.method.tiny import tiny_bundle_folder

TINY = "tiny"  # the name that stands for the cached tiny bundle wherever a model is named


def resolve_model(name: str) -> str:
    """The folder or hub id a model name stands for: ``tiny`` is the cached tiny bundle, anything else itself."""
    return str(tiny_bundle_folder()) if name == TINY else name


def load_named_models(name: str, **options) -> Models:
    """:func:`~diffcolor.method.models.load_models` for a model as a user names it (a folder, a hub id, ``tiny``).

    The name goes into provenance as given; ``options`` are load_models' own.
    """
    return load_models(resolve_model(name), model_id=name, **options)


def named_prompt_limit(name: str, **options):
    """:func:`~diffcolor.method.models.load_prompt_limit` for a model as a user names it (a folder, a hub id, ``tiny``)."""
    return load_prompt_limit(resolve_model(name), **options)
