"""`DataParallelEngine`: several replicas of one model behind one `Engine`, each request served by one replica.

An engine's `from_pretrained` builds the replicas (lm-torch does for `dp` > 1) and wraps them here; lm-core and
lm-serve then see one engine. A `Router` picks each request's replica: the least busy one, or the one that recently
served the same prompt prefix while it is not much busier (its prefix cache likely holds that prefix). This class is
never an engine of the registry: it loads nothing itself.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from lm_core.engine import Engine, EngineOutput, EngineRequest, EngineStats
from lm_core.routing import Router, RouterConfig


class DataParallelEngine(Engine):
    """One engine over `replicas` (each a whole engine of the same model); see the module docstring.

    Invariant: a request id is in `_owners` exactly while its stream runs on that replica, so `abort` reaches the
    replica that holds it, and each routed request is released from the router once, when its stream ends. A replica
    that reports a `failure` gets no new request while another can still take it.
    """

    def __init__(self, replicas: Sequence[Engine], router_config: RouterConfig | None = None) -> None:
        replicas = list(replicas)
        if not replicas:
            raise ValueError("replicas must name at least one engine")
        if not all(_is_engine(replica) for replica in replicas):
            raise TypeError(f"replicas must all be lm_core Engines, got {replicas!r}")
        self.replicas: list[Engine] = replicas
        self.router = Router(len(replicas), router_config)
        # Request id -> the index of the replica running it.
        self._owners: dict[str, int] = {}

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike[str], config: Any = None) -> Engine:
        """Not a way to build one: an engine's own `from_pretrained` builds the replicas and wraps them."""
        raise NotImplementedError(
            "DataParallelEngine loads no model itself: ask an engine for replicas, e.g. "
            "TorchEngine.from_pretrained(path, {'dp': 2}) or `--dp 2`"
        )

    @classmethod
    def supports(cls, model_path: str | os.PathLike[str]) -> bool:
        """Never: `backend="auto"` must not pick a wrapper that cannot load a model."""
        return False

    @property
    def session_len(self) -> int | None:
        """The shortest limit of any replica (None when none has one): every request must fit wherever it lands."""
        limits = [replica.session_len for replica in self.replicas if replica.session_len is not None]
        return min(limits) if limits else None

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream `request` from the replica the router picks; closing this stream closes the replica's (an
        unfinished request is aborted there)."""
        request_id = request.request_id
        if request_id in self._owners:
            yield EngineOutput(request_id, [], "error", error=f"request id {request_id!r} is in use")
            return
        index = self.router.route(request.prompt_token_ids, self._failed_replicas())
        self._owners[request_id] = index
        try:
            stream = self.replicas[index].generate(request)
            try:
                async for output in stream:
                    yield output
            finally:
                await _close(stream)
        finally:
            del self._owners[request_id]
            self.router.release(index)

    async def embed(self, prompt_token_ids: list[int], pooling: str = "mean", normalize: bool = True) -> list[float]:
        """The embedding from the least busy replica (by load alone: embeddings never reuse the prefix cache)."""
        index = self.router.route(None, self._failed_replicas())
        try:
            return await self.replicas[index].embed(prompt_token_ids, pooling, normalize)
        finally:
            self.router.release(index)

    async def abort(self, request_id: str) -> None:
        """Abort `request_id` on the replica running it; nothing when no stream of that id is running."""
        index = self._owners.get(request_id)
        if index is not None:
            await self.replicas[index].abort(request_id)

    @property
    def failure(self) -> str | None:
        """Why no replica can generate any more (each one's reason), or None while one can: requests go only to the
        replicas that still can."""
        failures = [replica.failure for replica in self.replicas]
        if any(reason is None for reason in failures):
            return None
        return "; ".join(f"replica {index}: {reason}" for index, reason in enumerate(failures))

    def _failed_replicas(self) -> set[int]:
        """The replicas the router must skip: those that cannot generate, unless that is all of them (then every
        request ends with its replica's error, as it would without data parallelism)."""
        failed = {index for index, replica in enumerate(self.replicas) if replica.failure is not None}
        return failed if len(failed) < len(self.replicas) else set()

    def stats(self) -> EngineStats:
        """The replicas' load together: running and waiting summed, KV usage and prefix-cache hit rate averaged.

        `extra["replicas"]` holds each replica's own `EngineStats` (index = replica number), `extra["num_routed"]`
        the requests routed to each since start, `extra["num_in_flight"]` those routed and not ended yet.
        """
        per_replica = [replica.stats() for replica in self.replicas]
        count = len(per_replica)
        return EngineStats(
            num_running=sum(s.num_running for s in per_replica),
            num_waiting=sum(s.num_waiting for s in per_replica),
            kv_usage=sum(s.kv_usage for s in per_replica) / count,
            prefix_cache_hit_rate=sum(s.prefix_cache_hit_rate for s in per_replica) / count,
            extra={
                "replicas": per_replica,
                "num_routed": self.router.num_routed,
                "num_in_flight": self.router.in_flight,
            },
        )

    async def close(self) -> None:
        """Close every replica (all of them, even when one fails; the first failure is raised afterwards)."""
        results = await asyncio.gather(*(replica.close() for replica in self.replicas), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


async def _close(stream: AsyncIterator[EngineOutput]) -> None:
    """Close `stream` when it can be closed (an async generator): an engine's generator aborts an unfinished request
    in its `finally`, which runs now rather than whenever the generator is collected."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _is_engine(value: object) -> bool:
    """Whether `value` is an `Engine` (callers need not be type-checked)."""
    return isinstance(value, Engine)
