"""User-facing errors.

Every error a user can cause (a bad path, an unsupported model, a prompt that is too long)
is raised as an :class:`OffloadError` whose message names the problem and the fix in one
line. The CLI prints that line and exits with status 2; it never shows a traceback for them.
"""


class OffloadError(Exception):
    """Base class of errors caused by input: the message says what is wrong and what to do."""


class ModelLoadError(OffloadError):
    """The model path, its files or its contents cannot be used."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but its architecture or a feature of it is not supported."""


class InvalidRequestError(OffloadError):
    """A generation request is malformed (empty or too long prompt, bad sampling values)."""


class NumericalError(OffloadError):
    """The model's arithmetic broke down (NaN/inf logits): corrupt weights or a dtype that overflows."""
