"""Attention over the paged KV cache: one metadata type, one backend interface, a backend per device."""

from lm_torch.attention.metadata import AttentionMetadata
from lm_torch.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionMetadata", "TorchAttentionBackend"]
