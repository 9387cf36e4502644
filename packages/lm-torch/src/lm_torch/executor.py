"""The boundary between the engine loop and the model: an `Executor` takes a `ScheduledBatch` and returns a
`StepResult`, both plain values (request ids, positions, token ids, block ids; tokens and logprobs back).

The engine loop, the scheduler and the model code know nothing of where the model runs. `InProcessExecutor` runs
one `ModelRunner` in this process, on one worker thread that issues every torch op (model loading included: with a
second thread issuing CPU ops, two OpenMP thread teams compete for the cores). A multi-process executor (one worker
per rank, the batch broadcast to each) implements the same three calls.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lm_torch.config import TorchEngineConfig
from lm_torch.scheduler import ScheduledBatch, StepResult


class Executor(ABC):
    """Runs the engine's steps. `launch` starts a step and returns a handle; `collect` waits for its result. Steps
    are collected in launch order; a step may be launched before the previous one is collected."""

    # What the engine plans with, known once the model is loaded.
    num_blocks: int
    vocab_size: int
    max_position_embeddings: int
    model_path: Path
    # Whether the model takes images and videos (a vision-language model: `EngineRequest.multimodal`).
    takes_media: bool = False

    @abstractmethod
    async def launch(self, batch: ScheduledBatch) -> Any:
        """Start `batch` and return a handle for `collect`; raises if the step could not start."""

    @abstractmethod
    async def collect(self, handle: Any) -> StepResult:
        """Wait for a launched step's result; raises if the step failed."""

    @property
    @abstractmethod
    def runs_ahead(self) -> bool:
        """Whether `launch` returns before the step has run (the engine may then schedule the next one meanwhile)."""

    @property
    def failure(self) -> str | None:
        """Why the executor can no longer run steps (a worker died), None while it can."""
        return None

    @abstractmethod
    def summary(self, wall_s: float | None = None, import_s: float | None = None) -> str:
        """The start-up summary lines."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers (after the last step was collected)."""


def make_executor(model_path: Path, config: TorchEngineConfig) -> Executor:
    """The executor of `config.parallel.executor`: "uni" (this process), "mp" (a worker process per rank) or "ray"."""
    backend = config.parallel.executor
    if backend == "mp":
        from lm_torch.distributed.executor import MultiProcessExecutor

        return MultiProcessExecutor(model_path, config)
    if backend == "ray":
        from lm_torch.distributed.ray_executor import RayExecutor

        return RayExecutor(model_path, config)
    return InProcessExecutor(model_path, config)


class InProcessExecutor(Executor):
    """One `ModelRunner` in this process. On CUDA with Triton a launch only queues device work, so it runs on the
    event loop and the wait for the tokens runs on the worker thread; elsewhere the whole step runs on the worker
    thread at launch, and the event loop keeps serving streams meanwhile."""

    def __init__(self, model_path: Path, config: TorchEngineConfig) -> None:
        from lm_torch.runner import ModelRunner

        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lm-torch-step")
        device = None
        if config.parallel.devices is not None:  # --devices N: this process's one rank runs on CUDA device N
            import torch

            device = torch.device(f"cuda:{config.parallel.devices[0]}")
        self.runner = self._thread.submit(ModelRunner, model_path, config, device=device).result()
        self.num_blocks = self.runner.num_blocks
        self.vocab_size = self.runner.vocab_size
        self.max_position_embeddings = self.runner.hf_config.max_position_embeddings
        self.takes_media = self.runner.takes_media
        self.model_path = model_path

    @property
    def runs_ahead(self) -> bool:
        """Whether `launch` returns before the step has run (CUDA with Triton)."""
        return self.runner.is_async

    async def launch(self, batch: ScheduledBatch) -> Any:
        """Queue (CUDA) or compute (elsewhere) `batch`'s step."""
        if self.runner.is_async:
            return self.runner.launch(batch)
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.runner.launch, batch)

    async def collect(self, handle: Any) -> StepResult:
        """The step's result, waiting on the worker thread for the device if it is not ready."""
        if handle.result is not None:  # computed at launch: no trip to the worker thread
            return handle.result
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.runner.collect, handle)

    def summary(self, wall_s: float | None = None, import_s: float | None = None) -> str:
        """The runner's start-up summary."""
        return self.runner.summary(wall_s, import_s)

    def shutdown(self) -> None:
        """Stop the worker thread once its last step is done."""
        self._thread.shutdown(wait=True)
