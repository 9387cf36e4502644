"""lm-torch: the PyTorch inference engine of lm-deploy.

Paged KV cache, continuous batching, prefix caching, Triton kernels and CUDA graphs; it runs on the CPU too.
"""

import time

# When lm-torch began importing (torch's import follows): the first engine's start-up summary counts from here.
IMPORT_STARTED = time.perf_counter()

__version__ = "0.1.0"
