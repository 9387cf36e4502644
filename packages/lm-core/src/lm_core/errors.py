"""Errors that lm-deploy reports to users as one line, without a traceback."""


class LMDeployError(Exception):
    """Base of errors whose message is meant for the user as it is (the CLI prints it and exits non-zero)."""


class ModelResolutionError(LMDeployError, ValueError):
    """A model argument that names no usable model: missing path, no config.json, hub id while offline, ..."""


class GGUFConversionError(ModelResolutionError):
    """A GGUF file that cannot be read or converted (truncated, unsupported architecture or tensor type)."""
