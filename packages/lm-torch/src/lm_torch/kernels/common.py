"""Pieces shared by several kernels: launch-size helpers and small `@triton.jit` math functions."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from lm_torch.envs import triton_interpret

LOG2E = 1.4426950408889634  # log2(e): softmax runs on exp2, and scores are pre-multiplied by this


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1) instead of compiling them (read once:
    triton fixes the mode when it is imported)."""
    return triton_interpret()


def next_power_of_2(n: int) -> int:
    """Triton block shapes are powers of two: the smallest one >= n (and >= 1)."""
    return triton.next_power_of_2(max(int(n), 1))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a nominal 8 on the CPU, where the interpreter runs kernels)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def cuda_device_name(device: torch.device) -> str | None:
    """The name of `device` if it is a CUDA device (a tuning table applies only on the card it was measured on),
    else None."""
    if device.type != "cuda":
        return None
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def read_tuning_file(path: str, setting: str, named: bool) -> dict | None:
    """The JSON of a kernel's tuning table at `path`: the file named by the `KernelConfig` field `setting` (`named`),
    else the one shipped beside the kernel. None for "none" or a shipped file that is absent; a named file that does
    not exist is an error, so that a mistyped path does not quietly fall back to the defaults."""
    if path == "none":
        return None
    if not Path(path).is_file():
        if named:
            raise ValueError(f"{setting}={path!r} is not a file (set it to 'none' for no table)")
        return None
    return json.loads(Path(path).read_text())


def check_cuda_or_interpreter(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; anything else is a caller's mistake."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"Triton kernels need CUDA tensors (got one on {t.device}); set TRITON_INTERPRET=1 for CPU"
            )


@triton.jit
def tanh(x):
    """tanh through exp2 (identical on every backend, the interpreter included)."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|) = 2^(-2 log2(e) |x|), in (0, 1]: never overflows
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def arrives_last(counter_ptr, arrivals):
    """Whether this program is the last of `arrivals` programs to count itself in at `counter_ptr` (an int32 that
    starts at zero; the last arrival stores 0 there again once its work is done). What every program stored before
    the call is visible to the last one, whose loads of it must bypass L1 (cache_modifier=".cg").

    NOTE: on the GPU the barrier puts every thread's stores before the one thread's acq_rel atomic (release is
    cumulative: it publishes what the barrier ordered before it); the program that reads arrivals - 1 has acquired
    every other program's release, and the barrier after the atomic orders its threads' loads after that acquire.
    L1 is not coherent across SMs, hence ".cg". Nothing spins, so no order of the programs can deadlock. (The
    interpreter runs programs one by one.)"""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == arrivals - 1
    tl.debug_barrier()
    return last


# Zero-filled device buffers that kernels leave zeroed again (arrival counters of "the last program finishes the
# work" reductions), by (device, name), the current buffer last. Buffers are never freed: a CUDA graph captured
# before a growth still points at the older one.
_PERSISTENT_ZEROS: dict[tuple[torch.device, str], list[torch.Tensor]] = {}


def persistent_zeros(device: torch.device, name: str, numel: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A buffer of at least `numel` zeros shared by every call of one kernel family on `device`.

    The kernels restore the zeros before they end, so the buffer is zeroed once, when allocated (no memset launch per
    call), and launches on one stream (every layer, every graph replay) run in order and may share it. It must exist
    before a CUDA graph that uses it is captured (capture cannot allocate and zero it): run the same call once eagerly
    first, as `CudaGraphRunner` does.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one key per card: "cuda" and "cuda:0" are the same buffer
        device = torch.device("cuda", torch.cuda.current_device())
    buffers = _PERSISTENT_ZEROS.setdefault((device, name), [])
    if buffers and buffers[-1].numel() >= numel and buffers[-1].dtype == dtype:
        return buffers[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{name}: a buffer of {numel} zeros is needed while capturing a CUDA graph; run the same call once "
            "eagerly before capturing"
        )
    size = next_power_of_2(max(numel, 1024, 2 * buffers[-1].numel() if buffers else 0))
    buffers.append(torch.zeros(size, dtype=dtype, device=device))
    return buffers[-1]


@contextlib.contextmanager
def compile_ahead(workers: int | None = None):
    """Inside the block, every Triton launch compiles its kernel on a pool of threads and returns without running
    it (its outputs are left as they were); on leaving, every compile has finished and sits in triton's in-memory
    cache, so the same launches afterwards run at once. For start-up: run a step once inside (on inputs whose
    indices are valid: what the skipped kernels would have written is garbage), then for real.

    Triton compiles mostly outside the GIL (MLIR and LLVM passes, ptxas), so N threads compile about N kernels at
    once; one by one, as a plain first run does, a fresh machine spends several seconds here. Nothing happens under
    the interpreter, or with a triton that has no asynchronous compile mode (it is a private module)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    if interpreting():
        yield
        return
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    workers = workers or min(16, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool:
        JITFunction.run = compile_only
        try:
            with AsyncCompileMode(pool):
                yield
        finally:
            JITFunction.run = launch


# Programmatic dependent launch (sm_90+): a kernel launched with `launch_pdl=True` may start while the kernel before
# it on the stream is still running, once every program of that one has called `pdl_trigger` (or ended). It must
# call `pdl_wait` before it reads anything the earlier kernel writes and before it writes anything at all; what it
# does before (loading weights, which nothing writes) overlaps the earlier kernel. `KernelConfig.pdl` False (the
# LM_TORCH_PDL=0 variable) turns it off: the wrappers take it as `allow_pdl`.


def pdl_enabled(device: torch.device, allowed: bool = True) -> bool:
    """Whether kernels on `device` use programmatic dependent launch: a compiled sm_90+ GPU, `allowed`."""
    if not allowed or device.type != "cuda" or interpreting():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@triton.jit
def pdl_wait(ENABLED: tl.constexpr):
    """Wait until the kernel before this one on the stream has finished and its writes are visible (a no-op for a
    kernel launched without `launch_pdl`)."""
    if ENABLED:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def pdl_trigger(ENABLED: tl.constexpr):
    """Let the next kernel on the stream, if launched with `launch_pdl`, start once every program got here."""
    if ENABLED:
        tl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


def _serialize_interpreted_launches() -> None:
    """Triton's interpreter swaps `triton.language`'s functions for interpreted ones for the duration of each launch
    and swaps them back afterwards, module-wide: two threads running interpreted kernels at once (a test's kernel and
    an engine's runner thread) can swap them back under each other, and the later launch then fails with "Cannot
    call @triton.jit'd outside of the scope of a kernel". Interpreted launches therefore take one process-wide lock.
    Compiled (CUDA) launches are untouched."""
    if not interpreting():
        return
    import threading

    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    if getattr(executor, "lm_torch_serialized", False):
        return
    lock = threading.RLock()
    launch = executor.__call__

    def serialized(self, *args, **kwargs):
        with lock:
            return launch(self, *args, **kwargs)

    executor.__call__ = serialized
    setattr(executor, "lm_torch_serialized", True)  # noqa: B010 (an attribute triton's class does not declare)


_serialize_interpreted_launches()
