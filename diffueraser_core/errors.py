"""Error types. Every message starts with the node/stage name and quotes the offending values."""


class DiffuEraserError(ValueError):
    """Base class; a ValueError so hosts that catch ValueError show the message as is."""


class InputError(DiffuEraserError):
    """Bad frames, masks or widget values."""


class ModelFileError(DiffuEraserError):
    """A model file that is missing, of the wrong family, truncated, corrupt or unsafe."""


class WorkerError(DiffuEraserError):
    """A task on a Ray worker failed (the worker's own error, in one line), or a worker was lost for good."""


class Interrupted(Exception):
    """Raised by the standalone runtime when a run is cancelled (ComfyUI raises its own exception)."""
