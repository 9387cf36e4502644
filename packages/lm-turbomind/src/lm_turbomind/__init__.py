"""TurboMind: the compiled (C++/CUDA) inference engine of lm-deploy.

The heavy lifting lives in the extension module ``lm_turbomind._core``; this package re-exports its entry points.
"""

from lm_turbomind._core import build_info, has_cuda, version

# Kept literal (and equal to pyproject.toml's version) so tools can read it without importing the extension.
__version__ = "0.1.0"

__all__ = ["__version__", "build_info", "has_cuda", "version"]
