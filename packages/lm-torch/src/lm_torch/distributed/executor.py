"""`MultiProcessExecutor`: the engine's executor for tensor parallelism, one worker process per rank.

The engine's process keeps the scheduler, the block manager and the prefix cache; it never joins the process group.
It starts this node's ranks (`worker.worker_main`, spawned), talks to rank 0 through a pipe, and watches every
worker: one that exits makes the executor fail with that rank's error, stop the others, and refuse further steps,
so every request in flight or to come ends with an error instead of waiting. Other nodes start their ranks with
`run_node` (the same command with another `node_rank`); they meet rank 0 at `dist_init_addr`.

Rank r of a node runs on `devices[r]` (default: CUDA device r, or the CPU with an equal share of the cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from lm_torch.config import TorchEngineConfig
from lm_torch.distributed.sharding import check_tensor_parallel
from lm_torch.distributed.worker import WorkerSpec, worker_main
from lm_torch.executor import Executor
from lm_torch.loader import load_hf_config
from lm_torch.scheduler import ScheduledBatch, StepResult


def free_port() -> int:
    """A TCP port free on this host now (for a one-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_devices(config: TorchEngineConfig) -> list[str]:
    """The torch device of each of this node's ranks; a ValueError naming the flag when the node lacks them."""
    import torch

    par = config.parallel
    local = par.ranks_per_node
    requested = config.model.device
    on_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if not on_cuda:
        if par.devices is not None:
            raise ValueError("--devices names CUDA devices, but the engine runs on the CPU")
        return ["cpu"] * local
    visible = torch.cuda.device_count()
    devices = list(par.devices) if par.devices is not None else list(range(local))
    if len(devices) != local:
        raise ValueError(f"--devices names {len(devices)} devices for the {local} ranks of this node (--tp / --nnodes)")
    if max(devices) >= visible:
        if par.devices is None:
            raise ValueError(
                f"--tp {par.tp} needs {local} CUDA devices on this node, {visible} visible (CUDA_VISIBLE_DEVICES)"
            )
        raise ValueError(f"--devices names device {max(devices)}, but {visible} CUDA devices are visible")
    if len(set(devices)) < len(devices) and par.dist_backend != "gloo":
        raise ValueError(
            "--devices names one device for several ranks: NCCL cannot run two ranks on one GPU "
            "(--dist-backend gloo can, for tests)"
        )
    return [f"cuda:{d}" for d in devices]


def _worker_specs(model_path: Path, config: TorchEngineConfig, init_addr: str) -> list[WorkerSpec]:
    par = config.parallel
    local = par.ranks_per_node
    devices = node_devices(config)
    threads = config.runtime.num_threads or max(1, (os.cpu_count() or 1) // local)
    first = par.node_rank * local
    return [
        WorkerSpec(
            model_path, config, first + i, par.tp, init_addr, devices[i], threads if devices[i] == "cpu" else None
        )
        for i in range(local)
    ]


class _Workers:
    """This node's worker processes, started together and stopped together."""

    def __init__(self, specs: list[WorkerSpec], driver_conn: Connection | None) -> None:
        context = multiprocessing.get_context("spawn")
        self.specs = specs
        self.processes: list[Any] = []
        for spec in specs:
            conn = driver_conn if spec.rank == 0 else None
            process = context.Process(
                target=worker_main, args=(spec, conn), name=f"lm-torch-rank{spec.rank}", daemon=True
            )
            process.start()
            self.processes.append(process)

    def sentinels(self) -> list[int]:
        """Handles that become ready when a worker exits."""
        return [p.sentinel for p in self.processes]

    def exited(self) -> list[tuple[int, int | None]]:
        """(rank, exit code) of every worker that has exited."""
        return [(s.rank, p.exitcode) for s, p in zip(self.specs, self.processes, strict=True) if not p.is_alive()]

    def stop(self, grace_s: float = 10.0) -> None:
        """Wait up to `grace_s` for the workers to leave, then terminate (and at last kill) the rest."""
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()


class MultiProcessExecutor(Executor):
    """Tensor parallelism over worker processes (see the module docstring)."""

    def __init__(self, model_path: Path, config: TorchEngineConfig) -> None:
        par = config.parallel
        if par.node_rank != 0:
            raise ValueError("node_rank > 0 runs ranks only (run_node), not an engine")
        self.model_path = model_path
        self.config = config
        check_tensor_parallel(load_hf_config(model_path), par.tp)
        init_addr = par.dist_init_addr or f"127.0.0.1:{free_port()}"
        specs = _worker_specs(model_path, config, init_addr)
        self._conn, child = multiprocessing.get_context("spawn").Pipe()
        self._failure: str | None = None
        self._stopping = False
        self._workers = _Workers(specs, child)
        child.close()
        self._send_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lm-torch-send")
        self._recv_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lm-torch-recv")
        try:
            kind, info = self._receive(timeout_s=None)
        except RuntimeError as exc:  # a rank failed to start: the commands report ValueErrors in one line
            self._stop_workers()
            raise ValueError(f"the engine could not start: {exc}") from None
        except BaseException:
            self._stop_workers()
            raise
        if kind != "ready":  # pragma: no cover - _receive raises on errors
            raise RuntimeError(f"unexpected first message from rank 0: {kind!r}")
        self.num_blocks = info["num_blocks"]
        self.vocab_size = info["vocab_size"]
        self.max_position_embeddings = info["max_position_embeddings"]
        self.takes_media = info["takes_media"]
        self._summary = info["summary"]
        self._rank_map = [f"rank {s.rank}: {socket.gethostname()}:{s.device}" for s in specs]
        self._devices_cuda = info["device"].startswith("cuda")

    # -- the executor's calls --------------------------------------------------------------------------------------

    @property
    def runs_ahead(self) -> bool:
        """On CUDA the engine schedules the next step while the workers run one (they queue in the pipe)."""
        return self._devices_cuda

    async def launch(self, batch: ScheduledBatch) -> Any:
        """Send the batch (without its sequences, with its grammar masks) to rank 0."""
        self._check()
        wire = batch.for_workers(self.vocab_size)
        await asyncio.get_running_loop().run_in_executor(self._send_thread, self._send, wire)
        return None

    async def collect(self, handle: Any) -> StepResult:
        """The oldest launched step's result from rank 0 (steps answer in launch order)."""
        self._check()
        kind, value = await asyncio.get_running_loop().run_in_executor(self._recv_thread, self._receive, None)
        if kind != "result":  # pragma: no cover - _receive raises on errors
            raise RuntimeError(f"unexpected message from rank 0: {kind!r}")
        return value

    @property
    def failure(self) -> str | None:
        """The group's failure (the first rank's error or exit), None while every rank runs."""
        return self._failure

    def summary(self, wall_s: float | None = None, import_s: float | None = None) -> str:
        """Rank 0's start-up summary, the rank -> host:device map, and the engine's own start-up time."""
        lines = [self._summary, "lm-torch: ranks " + ", ".join(self._rank_map)]
        if wall_s is not None:
            total = wall_s + (import_s or 0.0)
            lines.append(f"lm-torch: engine start-up {total:.1f} s wall time (workers included)")
        return "\n".join(lines)

    def shutdown(self) -> None:
        """Stop every rank: `None` through rank 0, then wait for the processes (terminating stragglers)."""
        if self._stopping:
            return
        self._stopping = True
        if self._failure is None:
            with contextlib.suppress(OSError, RuntimeError):
                self._send(None)
        self._stop_workers()

    # -- pipes and processes ---------------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        if self._stopping:
            raise RuntimeError("the engine's workers are shut down")

    def _send(self, message: Any) -> None:
        try:
            self._conn.send(message)
        except OSError as exc:
            self._fail(f"rank 0 is gone ({exc})")
            raise RuntimeError(self._failure) from exc

    def _receive(self, timeout_s: float | None) -> tuple[str, Any]:
        """The next message from rank 0, or a RuntimeError naming the rank that failed (its error, or its exit)."""
        while True:
            ready = wait([self._conn, *self._workers.sentinels()], timeout_s)
            if not ready:
                raise TimeoutError("no answer from rank 0")
            if self._conn in ready:
                try:
                    kind, value = self._conn.recv()
                except (EOFError, OSError):
                    kind, value = "error", None
                if kind == "error":
                    # Another rank's exit is what made rank 0's collective fail: name it first.
                    others = self._exit_report(skip_rank0=True)
                    self._fail("; ".join(filter(None, [others, value])) or "rank 0 closed its pipe")
                    raise RuntimeError(self._failure)
                return kind, value
            # A worker exited: rank 0 may still have its error in flight; give it a moment to arrive.
            if self._conn.poll(1.0):
                continue
            self._fail(self._exit_report() or "a worker exited")
            raise RuntimeError(self._failure)

    def _exit_report(self, skip_rank0: bool = False) -> str:
        exited = [
            (r, c) for r, c in self._workers.exited() if (c != 0 or not self._stopping) and not (skip_rank0 and r == 0)
        ]
        return "; ".join(f"tensor-parallel rank {r} exited (code {c})" for r, c in exited)

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = f"the engine's worker group failed: {message}"
            print(f"lm-torch: {self._failure}", file=sys.stderr, flush=True)
            self._stop_workers()

    def _stop_workers(self) -> None:
        self._workers.stop(grace_s=0.0 if self._failure is not None else 10.0)
        self._conn.close()


def run_node(model_path: Path, config: TorchEngineConfig) -> int:
    """Run this node's ranks (a node other than 0: no engine, no server) until they stop; returns an exit code.

    When one rank fails the others are stopped, so the node never keeps half a group."""
    check_tensor_parallel(load_hf_config(model_path), config.parallel.tp)
    specs = _worker_specs(model_path, config, config.parallel.dist_init_addr or "")
    workers = _Workers(specs, None)
    print(
        "lm-torch: ranks " + ", ".join(f"rank {s.rank}: {socket.gethostname()}:{s.device}" for s in specs),
        file=sys.stderr,
        flush=True,
    )
    try:
        remaining = set(workers.sentinels())
        while remaining:
            for sentinel in wait(list(remaining)):
                remaining.discard(sentinel)  # type: ignore[arg-type]
            if any(code not in (0, None) for _, code in workers.exited()):
                break
    except KeyboardInterrupt:
        pass
    finally:
        failed = [(rank, code) for rank, code in workers.exited() if code not in (0, None)]
        workers.stop(grace_s=0.0 if failed else 10.0)
    for rank, code in failed:
        print(f"lm-torch: tensor-parallel rank {rank} exited (code {code})", file=sys.stderr, flush=True)
    return 1 if failed else 0
