"""lm-torch: the PyTorch inference engine of lm-deploy.

Paged KV cache, continuous batching, prefix caching, Triton kernels and CUDA graphs; it runs on the CPU too.
"""

__version__ = "0.1.0"
