"""lm-serve: the OpenAI-compatible server and the proxy."""

__version__ = "0.1.0"
