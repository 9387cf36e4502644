"""Next-token sampling: per-step batch tensors (`SamplingInputs`) and the vectorised `Sampler`."""

from lm_torch.sampling.params import SamplingInputs, validate_config
from lm_torch.sampling.sampler import Sampler, SamplerOutput

__all__ = ["Sampler", "SamplerOutput", "SamplingInputs", "validate_config"]
