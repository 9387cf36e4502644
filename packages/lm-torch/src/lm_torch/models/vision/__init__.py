"""Vision towers and multi-modal projectors for vision-language models."""
