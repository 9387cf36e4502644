"""A tensor-parallel worker process: one rank's `ModelRunner`, driven step by step by the engine through rank 0.

Rank 0 reads each step's `ScheduledBatch` (already stripped for other processes: `ScheduledBatch.for_workers`) from
its pipe to the engine, broadcasts it to the other ranks over the group's gloo group (one broadcast reaches every
node), runs it like every rank, and sends the `StepResult` back. `None` instead of a batch stops every rank.

Failures end the process: a rank whose step raises reports the error (rank 0 through its pipe, every rank on
stderr) and exits at once, so that the other ranks' next collective fails instead of waiting; the engine's side
(`executor.MultiProcessExecutor`) watches every local worker and fails the group when one exits. A worker whose
engine goes away (its pipe closes) exits too: no process outlives the engine.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from lm_torch.config import TorchEngineConfig


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank's process needs to start (pickled to a spawned process)."""

    model_path: Path
    config: TorchEngineConfig
    rank: int
    size: int
    init_addr: str  # host:port of the rendezvous (rank 0 hosts it)
    device: str  # "cpu" or "cuda:<index>"
    num_threads: int | None = None  # CPU: torch threads of this rank


def worker_main(spec: WorkerSpec, conn: Connection | None) -> None:
    """The process entry of one rank: join the group, build the runner, then run steps until told to stop."""
    code = 0
    try:
        code = _run(spec, conn)
    except BaseException as exc:  # report what killed the rank, then leave at once (see the module docstring)
        from lm_torch.distributed.group import RendezvousError

        if isinstance(exc, (ValueError, RendezvousError)):  # worded for users (a flag, the model): one line
            text = f"tensor-parallel rank {spec.rank}: {exc}"
            print(f"lm-torch: {text}", file=sys.stderr, flush=True)
        else:  # a bug or a crash: the traceback too
            text = f"tensor-parallel rank {spec.rank}: {type(exc).__name__}: {exc}"
            print(f"lm-torch: {text}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if conn is not None:
            with contextlib.suppress(OSError):  # the engine is gone already
                conn.send(("error", text))
        code = 1
    sys.stderr.flush()
    os._exit(code)


def _run(spec: WorkerSpec, conn: Connection | None) -> int:
    from lm_torch.distributed.group import destroy_tp_group

    started = time.perf_counter()
    rank = RankRunner(spec)
    if conn is not None:
        conn.send(("ready", rank.ready_info(time.perf_counter() - started)))
    while True:
        batch = None
        if rank.tp.is_driver:
            assert conn is not None, "rank 0 talks to the engine"
            try:
                batch = conn.recv()
            except EOFError:  # the engine went away: stop every rank
                batch = None
        result = rank.step(batch)
        if result is None:
            break
        if conn is not None:
            conn.send(("result", result))
    destroy_tp_group(rank.tp)
    return 0


class RankRunner:
    """One rank's group membership and runner, as every executor backend runs it: `step` takes rank 0's batch to
    every rank and runs it (the mp workers' loop above, and the Ray actors)."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from lm_torch.distributed.group import init_tp_group
        from lm_torch.runner import ModelRunner

        if spec.num_threads is not None:
            torch.set_num_threads(spec.num_threads)
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        par = spec.config.parallel
        self.tp = init_tp_group(spec.rank, spec.size, spec.init_addr, device, par.dist_backend, par.dist_timeout)
        self.runner = ModelRunner(spec.model_path, spec.config, self.tp, device)

    def step(self, batch: Any) -> Any:
        """Broadcast rank 0's `batch` (the others pass None) and run it; the step's `StepResult`, or None when the
        batch was None (stop)."""
        batch = self.tp.broadcast_object(batch)
        if batch is None:
            return None
        return self.runner.collect(self.runner.launch(batch))

    def ready_info(self, wall_s: float) -> dict[str, Any]:
        """What the engine plans with, and this rank's start-up summary."""
        return _ready_info(self.runner, wall_s)


def _ready_info(runner: Any, wall_s: float) -> dict[str, Any]:
    """What the engine plans with, and rank 0's start-up summary."""
    return {
        "num_blocks": runner.num_blocks,
        "vocab_size": runner.vocab_size,
        "max_position_embeddings": runner.hf_config.max_position_embeddings,
        "takes_media": runner.takes_media,
        "summary": runner.summary(wall_s),
        "device": str(runner.device),
    }
