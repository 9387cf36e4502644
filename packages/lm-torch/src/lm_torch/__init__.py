"""lm-torch: the PyTorch inference engine (paged KV cache, continuous batching, prefix caching, Triton kernels, CUDA graphs; runs on CPU too)."""

__version__ = "0.1.0"
