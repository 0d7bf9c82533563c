"""Exceptions shared by every layer.

`UserError` and its subclasses are problems the person calling us can fix (a photo without a face,
a value out of range, a checkpoint that is not in the cache). The command line turns them into one
line on stderr and exit status 2; the UI and API turn them into a `gr.Error`. Anything else is a bug
or an infrastructure fault and is logged with its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the caller can fix; the message says what to do."""


class InvalidParameter(UserError, ValueError):
    """A request parameter is unknown or out of range."""

    def __init__(self, name: str, value: object, allowed: str) -> None:
        self.name = name
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"Invalid {name}={shown}: {allowed}.")


class ImageError(UserError):
    """An uploaded file is not an image we can use (unreadable, too large, too small)."""


class NoFaceError(UserError):
    """No usable face was found in a photo."""


class CheckpointError(UserError):
    """A checkpoint could not be resolved (missing repo or file, no network, bad contents)."""


class SettingsError(UserError):
    """An environment variable holds a value we cannot use."""


class OutOfMemoryError(UserError):
    """The request did not fit in memory even after retrying with a leaner profile."""


class BusyError(UserError):
    """The models are still loading or failed to load."""
