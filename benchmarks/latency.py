"""Decode latency of lm-torch: a batch of requests at a time (default one), fixed input and output lengths.

    python benchmarks/latency.py --model benchmarks/configs/llama3-8b --load-format dummy --input-len 128 \\
        --output-len 256 --num-iters 5 --profile [--batch-size 1]

Prints the start-up time (process start to a ready engine, and the engine's own), then per iteration TTFT, the
decode rate (tokens after the first over the time after the first: what "batch-1 decode tok/s" means; with
--batch-size B, B requests of random prompts sent together, and the rate counts all B) and the end-to-end rate;
medians last as one JSON line (ignore_eos, greedy). --profile adds a torch-profiler trace of one more batch and a
table of where one decode step's GPU time goes, by kernel class and by kernel, against the step's wall time.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before torch is imported: start-up counts the imports too

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

# Kernel name fragments -> class, first match wins (cuBLAS/CUTLASS GEMMs have many names).
KERNEL_CLASSES = [
    ("attention (Triton decode, splits merged in the kernel)", ("_decode_kernel",)),
    ("attention (Triton prefill)", ("_prefill_kernel",)),
    ("KV-cache store", ("_store_kv_kernel",)),
    ("add + RMSNorm", ("_rms_norm_kernel",)),
    ("rotary", ("_rotary_kernel",)),
    ("gated activation", ("_gated_activation_kernel",)),
    ("GEMM (cuBLAS/CUTLASS)", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90_", "splitkreduce", "cublas")),
    ("arg-max / sampling", ("argmax", "reduce_kernel", "_sample")),
    ("copies", ("memcpy", "memset", "copy", "fill")),
]


async def one_request(engine, prompt: list[int], output_len: int) -> tuple[float, float, float, int]:
    """(start, first token, end) perf_counter times and the number of tokens of one request."""
    from lm_core import GenerationConfig
    from lm_core.engine import EngineRequest

    cfg = GenerationConfig(max_new_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    first, count = None, 0
    async for out in engine.generate(EngineRequest(uuid.uuid4().hex, prompt, cfg)):
        if out.token_ids and first is None:
            first = time.perf_counter()
        count += len(out.token_ids)
    end = time.perf_counter()
    if count != output_len:
        sys.exit(f"the request ended after {count} of {output_len} tokens")
    return start, first, end, count


async def batch_requests(engine, prompts: list[list[int]], output_len: int) -> tuple[float, float, float, int]:
    """Send the prompts together: (start, last first token, last end, tokens per request).

    The decode rate of a batch is taken from the moment every request has its first token, so the batch's decode
    steps are all full ones."""
    results = await asyncio.gather(*(one_request(engine, p, output_len) for p in prompts))
    start = min(r[0] for r in results)
    return start, max(r[1] for r in results), max(r[2] for r in results), output_len


def run_batch(engine, prompts: list[list[int]], output_len: int) -> tuple[float, float, float, int]:
    return asyncio.run(batch_requests(engine, prompts, output_len))


def classify(name: str) -> str:
    lowered = name.lower()
    for label, fragments in KERNEL_CLASSES:
        if any(f.lower() in lowered for f in fragments):
            return label
    return "other"


def profile_decode(engine, prompts: list[list[int]], output_len: int, trace_path: Path | None) -> dict:
    """Profile `output_len` steps of one batch; GPU time per step by kernel class and by kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _, first, end, count = run_batch(engine, prompts, output_len)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    by_class: dict[str, float] = {}
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for event in kernels:
        by_class[classify(event.name)] = by_class.get(classify(event.name), 0.0) + event.device_time_total
    # Means over the request's count tokens: count - 1 decode steps, and the prefill steps, whose GEMMs weigh in
    # (little for one short prompt; a lot for --batch-size 256: read the per-launch times there).
    steps = count
    total_us = sum(by_class.values())
    wall_step_ms = (end - first) * 1000 / (count - 1)
    rows = sorted(by_class.items(), key=lambda kv: -kv[1])
    print(f"\nprofile of one batch of {len(prompts)} ({count} tokens each; times per step, mean over {steps} steps):")
    print(f"{'kernel class':42} {'ms/step':>8} {'share':>7}")
    for label, us in rows:
        print(f"{label:42} {us / steps / 1000:8.3f} {us / total_us:7.1%}")
    gpu_step_ms = total_us / steps / 1000
    print(f"{'GPU busy':42} {gpu_step_ms:8.3f}")
    print(f"{'wall time per decode step (profiled)':42} {wall_step_ms:8.3f}")
    top = sorted(kernels, key=lambda e: -e.device_time_total)
    names: dict[str, list[float]] = {}
    for event in top:
        names.setdefault(event.name, [0.0, 0])
        names[event.name][0] += event.device_time_total
        names[event.name][1] += 1
    print("\ntop kernels (us per step, launches per step):")
    for name, (us, calls) in sorted(names.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {us / steps:9.1f} us {calls / steps:6.1f}x {us / calls:8.1f} us/launch  {name[:100]}")
    return {label: round(us / steps / 1000, 4) for label, us in rows} | {
        "gpu_ms_per_step": round(gpu_step_ms, 4),
        "wall_ms_per_decode_step": round(wall_step_ms, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir, .gguf or hub id (default: the default model)")
    parser.add_argument("--load-format", default="auto", help="'dummy' for random weights from config.json")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1, help="requests sent together (default 1)")
    parser.add_argument("--engine-config", default="{}", help="extra TorchEngineConfig fields as JSON")
    parser.add_argument("--profile", action="store_true", help="profile one more request (torch profiler)")
    parser.add_argument("--trace", type=Path, default=None, help="with --profile: write a Chrome trace here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from lm_core import resolve_model
    from lm_torch.engine import TorchEngine

    model_path = resolve_model(args.model)
    engine_start = time.perf_counter()
    config = {"load_format": args.load_format, "dtype": args.dtype, **json.loads(args.engine_config)}
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.profile and not torch.cuda.is_available():
        parser.error("--profile times CUDA kernels: it needs a CUDA GPU")
    config.setdefault("max_batch_size", max(8, args.batch_size))
    engine = TorchEngine.from_pretrained(model_path, config)
    ready = time.perf_counter()
    print(
        json.dumps(
            {"startup_s": round(ready - engine_start, 2), "startup_with_imports_s": round(ready - PROCESS_START, 2)}
        ),
        flush=True,
    )
    vocab = engine.runner.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(100, vocab - 100, (args.batch_size, args.input_len), generator=gen).tolist()

    run_batch(engine, prompts, min(args.output_len, 16))  # warm-up
    rows = []
    batch = args.batch_size
    for i in range(args.num_iters):
        start, first, end, count = run_batch(engine, prompts, args.output_len)
        row = {
            "iter": i,
            "ttft_ms": round((first - start) * 1000, 2),
            "tpot_ms": round((end - first) * 1000 / (count - 1), 3),
            "decode_tok_per_s": round(batch * (count - 1) / (end - first), 1),
            "e2e_tok_per_s": round(batch * count / (end - start), 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "label": f"lm-torch batch {batch}, {args.input_len} in, {args.output_len} out",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        **{f"median_{k}": statistics.median(r[k] for r in rows) for k in rows[0] if k != "iter"},
    }
    print(json.dumps(summary), flush=True)
    if args.profile:
        print(json.dumps({"profile": profile_decode(engine, prompts, args.output_len, args.trace)}), flush=True)


if __name__ == "__main__":
    main()
