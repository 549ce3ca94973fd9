"""One error family for everything a user can get wrong.

Every message names the file or argument at fault and says what to do instead.
"""
from __future__ import annotations


class CounterlensError(Exception):
    """Base class of every error counterlens raises on purpose."""


class InputError(CounterlensError, ValueError):
    """An argument or tensor is not what the call needs (shape, channels, NaN, value)."""


class DataFileError(InputError):
    """A data file (image, mask, table) cannot be read or is not usable.

    ``path`` holds the offending file so a dataset run can record it and go on.
    """

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class ModelLoadError(CounterlensError):
    """A model cannot be loaded from what was given."""


class UntrustedModelError(ModelLoadError):
    """Loading would execute code from a file, and the user did not allow it."""


class TargetError(InputError):
    """A target class does not exist or does not fit the batch."""


class MethodError(CounterlensError):
    """An explanation method cannot run (unknown name, bad parameter, model not differentiable)."""


class RunFailedError(CounterlensError):
    """A run started but could not finish (a worker died, nothing could be read, the disk is full);
    what was written before stays and a re-run resumes. The command line exits with status 1."""
