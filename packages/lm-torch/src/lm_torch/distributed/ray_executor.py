"""`RayExecutor`: tensor-parallel ranks as Ray actors, placed by a placement group over a Ray cluster's nodes.

For clusters that Ray already manages (`ray start --head` on one node, `ray start --address=<head>:6379` on the
others, then the engine on the head): the engine joins the running cluster (`RAY_ADDRESS`, else "auto"; with no
cluster it starts a local one), reserves one bundle per rank (a GPU and a CPU each on CUDA, a CPU each otherwise)
with the PACK strategy (as few nodes as hold them), and starts one actor per bundle. The actors meet through torch's
rendezvous at rank 0's node, exactly as the `mp` workers do, and run the same `worker.RankRunner`: rank 0's actor
takes each step from the engine (`step`) and broadcasts it, the others follow (`follow`, which returns only when the
group stops or fails). An actor that dies, or a follower that returns early, fails the group with that rank's error.

Ray is an optional dependency (`pip install lm-torch[ray]`), imported only when this executor is asked for.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from lm_torch.config import TorchEngineConfig
from lm_torch.distributed.sharding import check_tensor_parallel
from lm_torch.distributed.worker import RankRunner, WorkerSpec
from lm_torch.executor import Executor
from lm_torch.loader import load_hf_config
from lm_torch.scheduler import ScheduledBatch, StepResult


def _import_ray() -> Any:
    try:
        import ray  # pyright: ignore[reportMissingImports] - an optional dependency
    except ImportError as exc:
        raise ValueError(
            "--distributed-executor-backend ray needs Ray, which is not installed: pip install 'lm-torch[ray]'"
        ) from exc
    return ray


class _RankActor:
    """One rank in a Ray actor (wrapped with `ray.remote` when the executor starts)."""

    def __init__(self) -> None:
        self.rank: RankRunner | None = None

    def rendezvous_address(self) -> str:
        """host:port on this actor's node, free now, for the group's rendezvous (asked of rank 0's actor)."""
        import ray  # pyright: ignore[reportMissingImports] - an optional dependency

        host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return f"{host}:{sock.getsockname()[1]}"

    def start(self, spec: WorkerSpec) -> dict[str, Any]:
        """Join the group and build this rank's runner; returns what the engine plans with."""
        started = time.perf_counter()
        self.rank = RankRunner(spec)
        info = self.rank.ready_info(time.perf_counter() - started)
        info["host"] = socket.gethostname()
        return info

    def step(self, batch: ScheduledBatch | None) -> StepResult | None:
        """Rank 0: broadcast `batch` and run it (None stops every rank)."""
        assert self.rank is not None, "start first"
        return self.rank.step(batch)

    def follow(self) -> None:
        """Ranks > 0: run rank 0's steps until it stops the group."""
        assert self.rank is not None, "start first"
        while self.rank.step(None) is not None:
            pass


class RayExecutor(Executor):
    """Tensor parallelism over Ray actors (see the module docstring)."""

    def __init__(self, model_path: Path, config: TorchEngineConfig) -> None:
        ray = _import_ray()
        import torch
        from ray.util.placement_group import (  # pyright: ignore[reportMissingImports]
            placement_group,
            remove_placement_group,
        )
        from ray.util.scheduling_strategies import (  # pyright: ignore[reportMissingImports]
            PlacementGroupSchedulingStrategy,
        )

        self._ray = ray
        par = config.parallel
        if par.nnodes > 1:
            raise ValueError("--nnodes is for multi-node runs without Ray; with Ray the cluster's nodes are used")
        check_tensor_parallel(load_hf_config(model_path), par.tp)
        if not ray.is_initialized():
            try:
                ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
            except ConnectionError:  # no running cluster: a local one
                ray.init(log_to_driver=True)
        self.model_path = model_path
        on_cuda = config.model.device == "cuda" or (config.model.device == "auto" and torch.cuda.is_available())
        bundle = {"GPU": 1.0, "CPU": 1.0} if on_cuda else {"CPU": 1.0}
        self._group = placement_group([dict(bundle) for _ in range(par.tp)], strategy="PACK")
        self._failure: str | None = None
        self._stopped = False
        try:
            ray.get(self._group.ready(), timeout=par.dist_timeout)
        except ray.exceptions.GetTimeoutError as exc:
            remove_placement_group(self._group)
            raise RuntimeError(
                f"the Ray cluster did not offer {par.tp} bundles of {bundle} within {par.dist_timeout:.0f} s "
                f"(--tp {par.tp}; cluster resources: {ray.cluster_resources()})"
            ) from exc
        actor_class = ray.remote(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0))(_RankActor)
        self._actors = [
            actor_class.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=rank),
                name=None,
            ).remote()
            for rank in range(par.tp)
        ]
        try:
            addr = ray.get(self._actors[0].rendezvous_address.remote(), timeout=par.dist_timeout)
            device = "cuda:0" if on_cuda else "cpu"  # Ray gives each actor its GPU as device 0
            threads = config.runtime.num_threads or 1
            specs = [
                WorkerSpec(model_path, config, rank, par.tp, addr, device, threads if not on_cuda else None)
                for rank in range(par.tp)
            ]
            infos = ray.get([a.start.remote(s) for a, s in zip(self._actors, specs, strict=True)])
        except Exception:
            self._kill()
            raise
        first = infos[0]
        self.num_blocks = first["num_blocks"]
        self.vocab_size = first["vocab_size"]
        self.max_position_embeddings = first["max_position_embeddings"]
        self.takes_media = first["takes_media"]
        self._summary = first["summary"]
        self._rank_map = [f"rank {r}: {info['host']}:{info['device']}" for r, info in enumerate(infos)]
        self._cuda = on_cuda
        self._followers = [actor.follow.remote() for actor in self._actors[1:]]

    @property
    def runs_ahead(self) -> bool:
        """On CUDA the engine schedules the next step while the actors run one."""
        return self._cuda

    async def launch(self, batch: ScheduledBatch) -> Any:
        """Hand the batch (without its sequences) to rank 0's actor."""
        self._check()
        return self._actors[0].step.remote(batch.for_workers(self.vocab_size))

    async def collect(self, handle: Any) -> StepResult:
        """Rank 0's result for a launched step; a dead actor fails the group, naming its rank."""
        self._check()
        try:
            result = await handle
        except Exception as exc:
            self._fail(self._followers_report() or f"rank 0: {type(exc).__name__}: {exc}")
            raise RuntimeError(self._failure) from exc
        report = self._followers_report()
        if report:
            self._fail(report)
            raise RuntimeError(self._failure)
        return result

    @property
    def failure(self) -> str | None:
        """The group's failure (the first rank's error or exit), None while every rank runs."""
        return self._failure

    def summary(self, wall_s: float | None = None, import_s: float | None = None) -> str:
        """Rank 0's start-up summary and the rank -> host:device map."""
        lines = [self._summary, "lm-torch: Ray ranks " + ", ".join(self._rank_map)]
        if wall_s is not None:
            lines.append(f"lm-torch: engine start-up {wall_s + (import_s or 0.0):.1f} s wall time (actors included)")
        return "\n".join(lines)

    def shutdown(self) -> None:
        """Stop the group through rank 0, then remove the actors and their placement group."""
        if self._stopped:
            return
        self._stopped = True
        if self._failure is None:
            try:
                self._ray.get(self._actors[0].step.remote(None), timeout=30)
                self._ray.get(self._followers, timeout=30)
            except Exception:
                pass
        self._kill()

    def _check(self) -> None:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        if self._stopped:
            raise RuntimeError("the engine's Ray actors are shut down")

    def _followers_report(self) -> str:
        """The error of every follower that has returned (they return only when the group fails)."""
        ray = self._ray
        done, _ = ray.wait(self._followers, num_returns=len(self._followers), timeout=0)
        reports = []
        for ref in done:
            rank = self._followers.index(ref) + 1
            try:
                ray.get(ref)
                reports.append(f"tensor-parallel rank {rank} stopped")
            except Exception as exc:
                reports.append(f"tensor-parallel rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return "; ".join(reports)

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = f"the engine's worker group failed: {message}"
            self._kill()

    def _kill(self) -> None:
        from ray.util.placement_group import remove_placement_group  # pyright: ignore[reportMissingImports]

        for actor in self._actors:
            with contextlib.suppress(Exception):  # already dead
                self._ray.kill(actor)
        with contextlib.suppress(Exception):
            remove_placement_group(self._group)
