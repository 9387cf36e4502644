"""Next-token sampling: per-step batch tensors (`SamplingInputs`) and the vectorised `Sampler`."""

from lm_torch.sampling.params import SamplingInputs, is_plain_greedy, validate_config
from lm_torch.sampling.sampler import PendingLogprobs, Sampler, SamplerOutput

__all__ = ["PendingLogprobs", "Sampler", "SamplerOutput", "SamplingInputs", "is_plain_greedy", "validate_config"]
