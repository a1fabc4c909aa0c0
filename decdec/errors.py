"""The errors a user can see. Each carries one message that names the problem and what is allowed.

Every user-facing entry point (CLI verbs, `runtime.compile`, loaders, artifact store) raises one of
these for bad input; the CLI prints the message alone, without a traceback.
"""


class DecDECError(Exception):
    """Base class: a user-facing failure with one clear message."""


class ConfigError(DecDECError, ValueError):
    """A config field has a bad value: the message names the field, the value and what is allowed."""


class ModelFileError(DecDECError):
    """A model file or folder is missing, truncated, corrupt, or disagrees with its own config."""


class UnsupportedModelError(DecDECError):
    """A well-formed model that uses an architecture or tensor type we do not implement."""


class ArtifactError(DecDECError):
    """Prepared artifacts are missing, corrupt, or were made from another model or config."""


class DeviceError(DecDECError):
    """The requested device is absent, or pinned memory cannot be had."""


class InputError(DecDECError, ValueError):
    """An argument of a call or a command-line flag is out of range: a token id outside the
    vocabulary, an empty prompt, a negative or zero count. The message names it and what is allowed."""
