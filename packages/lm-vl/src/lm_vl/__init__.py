"""lm-vl: image and video loading and per-model vision preprocessing."""

__version__ = "0.1.0"
