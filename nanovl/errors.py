"""User-facing errors.

Every problem a user can cause (a bad folder, a bad file, a bad request) raises `NanovlError` with a
one-line message that says what is wrong and, where it helps, what to do. The CLI prints the message
and exits non-zero; the server answers it with an HTTP 400 in OpenAI's error shape. Bugs stay
ordinary exceptions.
"""


class NanovlError(Exception):
    """A problem with the user's input: model folder, checkpoint files, prompt or request."""


class CheckpointError(NanovlError):
    """The checkpoint folder is missing, incomplete, corrupt or of an unsupported kind."""


class RequestError(NanovlError):
    """A generation request is invalid: sampling values, prompt length, stop strings."""


class DataError(NanovlError):
    """A data file (benchmark, training set, config) is missing or malformed; the message names it."""
