"""`GrammarPool`: compiles response formats on worker threads, with a time limit per compile and a bounded cache.

xgrammar releases the GIL while it compiles, serialises or deserialises a grammar (a 300-level schema compiles for
5-6 s with the event loop's longest pause at 24 ms), so threads keep the event loop and every stream running. Each
compile gets a thread of its own; at most `workers` run at once, so other guided requests never queue behind one
slow compile while another slot is free.

xgrammar cannot interrupt a compile. Past the time limit the request fails with a ValueError and the compile goes on
to its end on its thread without holding a slot; its result, when it comes, is cached like any other. At most
`max_overdue` such compiles run at once: beyond that, requests whose grammar is not cached are refused until one
ends, so hostile schemas cannot pile up threads. Repeats of a schema whose compile is overdue fail at once. The
threads are not daemons: a daemon thread that comes back from xgrammar's C++ code while the interpreter shuts down
aborts the process ("terminate called without an active exception"), so the process's exit waits for the compiles
still running, as it would for a ThreadPoolExecutor's.

The cache maps a format's canonical text (see `GrammarBackend.cache_key`) to its compiled grammar or to the
ValueError message it gave, least recently used first out, bounded in entries and in xgrammar's memory estimate.
Concurrent requests for one format (n > 1 samples, a server's fixed tool schemas) share one compile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from lm_torch.guided.backend import GrammarBackend


class GrammarPool:
    """Compiled grammars for one engine, built on worker threads. `compile` runs on the engine's event loop."""

    def __init__(
        self,
        make_backend: Callable[[], GrammarBackend],
        time_limit: float,
        workers: int = 4,
        max_overdue: int = 4,
        cache_entries: int = 512,
        cache_bytes: int = 512 << 20,
    ) -> None:
        """`make_backend` builds the backend (tokenizer tables, ~0.5 s) on a worker thread at the first compile;
        `time_limit`: seconds one compile may take before its requests fail."""
        self._make_backend = make_backend
        self.time_limit = time_limit
        self.workers = workers
        self.max_overdue = max_overdue
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes
        self._backend: asyncio.Future | None = None
        self._slots: asyncio.Semaphore | None = None  # created on the engine's loop
        self._inflight: dict[str, asyncio.Future] = {}
        self._overdue: dict[str, str] = {}  # key -> the error its requests get while its compile runs on
        self._cache: OrderedDict[str, tuple[Any, int]] = OrderedDict()  # key -> (grammar or message, bytes)
        self._cached_bytes = 0
        # Counters for tests and metrics: compiles started, requests answered from the cache.
        self.num_compiles = 0
        self.num_cache_hits = 0

    async def compile(self, response_format: dict[str, Any]) -> Any:
        """The `xgrammar.CompiledGrammar` of `response_format`; ValueError naming response_format if it cannot be
        compiled, or not within the time limit."""
        backend = await self._get_backend()
        key = backend.cache_key(response_format)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
            self.num_cache_hits += 1
            if isinstance(entry[0], str):
                raise ValueError(entry[0])
            return entry[0]
        if key in self._overdue:
            raise ValueError(self._overdue[key])
        task = self._inflight.get(key)
        if task is None:
            if len(self._overdue) >= self.max_overdue:
                raise ValueError(
                    f"response_format: {len(self._overdue)} grammar compilations are still running past their time "
                    "limit; try again later or use a simpler schema"
                )
            task = self._inflight[key] = asyncio.ensure_future(self._compile(backend, key, response_format))
            task.add_done_callback(_retrieve)
        # Shielded: a request that goes away leaves the compile to the others waiting for it (and to the cache).
        return await asyncio.shield(task)

    async def _get_backend(self) -> GrammarBackend:
        if self._backend is None or (self._backend.done() and self._backend.exception() is not None):
            self._backend = _in_thread(self._make_backend)
            self._backend.add_done_callback(_retrieve)
        return await asyncio.shield(self._backend)

    async def _compile(self, backend: GrammarBackend, key: str, response_format: dict[str, Any]) -> Any:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        try:
            async with self._slots:
                self.num_compiles += 1
                future = _in_thread(backend.compile, response_format)
                done, _ = await asyncio.wait({future}, timeout=self.time_limit)
        finally:
            self._inflight.pop(key, None)
        if not done:
            message = (
                f"response_format: compiling the grammar took longer than the engine's limit of {self.time_limit:g} s "
                "(grammar_compile_timeout); use a simpler schema"
            )
            self._overdue[key] = message
            future.add_done_callback(lambda f: self._finish_overdue(key, f))
            raise ValueError(message)
        try:
            grammar = future.result()
        except ValueError as exc:
            self._store(key, str(exc), len(str(exc)))
            raise
        self._store(key, grammar, grammar.memory_size_bytes)
        return grammar

    def _finish_overdue(self, key: str, future: asyncio.Future) -> None:
        del self._overdue[key]
        if future.exception() is None:
            self._store(key, future.result(), future.result().memory_size_bytes)
        elif isinstance(future.exception(), ValueError):
            self._store(key, str(future.exception()), len(str(future.exception())))

    def _store(self, key: str, value: Any, size: int) -> None:
        if key in self._cache:
            self._cached_bytes -= self._cache.pop(key)[1]
        self._cache[key] = (value, size)
        self._cached_bytes += size
        while len(self._cache) > 1 and (len(self._cache) > self.cache_entries or self._cached_bytes > self.cache_bytes):
            self._cached_bytes -= self._cache.popitem(last=False)[1][1]


def _in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """Run `fn(*args)` on a new thread; its outcome lands in the returned future of the running loop."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as error:  # handed to the awaiting coroutine
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name="lm-torch-grammar", daemon=False).start()
    return future


def _retrieve(future: asyncio.Future) -> None:
    """Mark a shared future's exception as seen (each waiter gets it through `shield`)."""
    if not future.cancelled():
        future.exception()
