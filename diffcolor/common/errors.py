"""Exception classes of DiffColor Archive.

The orchestration layer decides whether to retry an item from the class of the
exception alone, so every error raised on purpose is either *permanent* (the
same input will fail again: bad image, bad manifest row, bad colour map) or
*transient* (storage hiccup, lost worker, out of memory). Each carries a short
``error_class`` string that goes into result records.
"""

from __future__ import annotations


class DiffColorError(Exception):
    """Base class for every error DiffColor raises on purpose."""

    error_class = "error"


class PermanentError(DiffColorError):
    """Retrying cannot help: the input or the configuration is wrong."""

    error_class = "permanent"


class UserError(PermanentError, ValueError):
    """Something the user can fix: a bad argument, option or ``--set``, a manifest or targets problem, a colour
    word the caption lacks, a missing file, an unusable model folder. The command line prints its first line
    and exits 2, without a traceback. A ValueError too, so that ``except ValueError`` still catches it; a plain
    ValueError is not one: the command line shows it as a bug, with its traceback.
    """

    error_class = "bad_input"


class TransientError(DiffColorError):
    """Retrying may help: storage, worker or memory trouble."""

    error_class = "transient"


class ModelNotFoundError(PermanentError):
    """A model folder or hub id could not be resolved without the network."""

    error_class = "model_not_found"


class BadImageError(PermanentError):
    """An input image is truncated, corrupt, too large or of a disallowed format."""

    error_class = "bad_image"


class InputUnavailableError(PermanentError):
    """An input object is missing or cannot be read (permission denied)."""

    error_class = "input_unavailable"


class MissingObjectError(InputUnavailableError):
    """The object does not exist (an input missing, or one another worker removed meanwhile)."""


class NotGrayscaleError(PermanentError):
    """A colour photograph was given where a gray one is expected."""

    error_class = "not_grayscale"


class PromptError(PermanentError):
    """A caption, target prompt or colour map cannot be used as given."""

    error_class = "bad_prompt"


class StateError(PermanentError):
    """A stored colour state or checkpoint is missing, corrupt or incompatible."""

    error_class = "bad_state"


class StorageError(TransientError):
    """A read or write on the storage backend failed in a way worth retrying."""

    error_class = "storage"


class StorageConfigError(PermanentError):
    """The store refuses a request as malformed (an invalid bucket name, a bad argument, a wrong region)."""

    error_class = "storage_config"


class WorkerLostError(TransientError):
    """The worker process running an item died (killed, crashed, node lost)."""

    error_class = "worker_lost"


class DeviceOutOfMemoryError(TransientError):
    """The device ran out of memory; a retry on a freshly started worker may fit."""

    error_class = "out_of_memory"
