"""The model runner: per-request state (`state`), one input layout for every device (`inputs`), launch and collect
(`runner`), CUDA graphs (`cuda_graph`) and start-up (`startup`)."""

from lm_torch.runner.runner import ModelRunner, StepHandle, log

__all__ = ["ModelRunner", "StepHandle", "log"]
