"""lm-vl: image and video loading and per-model vision preprocessing (coming: the package holds no loaders yet)."""

__version__ = "0.1.0"
