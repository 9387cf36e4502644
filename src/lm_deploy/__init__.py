"""lm-deploy: the meta-package that installs the whole toolkit and the `lm` command."""

from lm_core import DEFAULT_MODEL, resolve_model

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "__version__", "resolve_model"]
