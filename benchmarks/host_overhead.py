"""The engine's host work per step: main-thread CPU time of the ShareGPT throughput workload.

On a GPU the engine's event loop (scheduling, streaming each token to its request, the requests' own coroutines)
must finish a step's host work while the device runs the step before, or the device waits. This runs
`benchmarks/throughput.py`'s workload through the engine on the CPU with a tiny random Llama (the steps and their
sizes are the GPU run's: they follow from the scheduler alone), where the model's compute runs in the engine's step
thread, and reports the main thread's CPU time per step and per streamed token: the host cost a GPU step of the same
size must hide.

    python benchmarks/host_overhead.py [--num-prompts 1000] [--concurrency 256] [--repeats 3] \\
        [--engine-config '{"overlap_steps": true}']

`overlap_steps` true runs the GPU's loop on the CPU: each step handed over with placeholder tokens before its
tokens are back, and completed after the next one is launched (`TorchEngine._run_loop`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from throughput import DEFAULT_DATASET, GcPauses, load_requests, run_engine  # benchmarks/ is the script's directory


def tiny_llama(path: Path) -> Path:
    """A 2-layer Llama config (dummy weights): its compute is negligible next to the host work measured."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=4096,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    return path


async def measure(engine, requests, concurrency: int) -> dict:
    await run_engine(engine, requests[:2], 2)  # warm-up
    steps_before = engine.step_counters["steps"]
    cpu_before, wall_before = time.thread_time(), time.perf_counter()
    with GcPauses() as gc_pauses:
        _, results = await run_engine(engine, requests, concurrency)
    cpu = time.thread_time() - cpu_before
    wall = time.perf_counter() - wall_before
    steps = engine.step_counters["steps"] - steps_before
    tokens = sum(r[3] for r in results)
    return {
        "steps": steps,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "main_thread_cpu_s": round(cpu, 2),
        "host_ms_per_step": round(cpu * 1000 / steps, 3),
        "host_us_per_token": round(cpu * 1e6 / tokens, 2),
        "gc_pauses": gc_pauses.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="runs, each on a fresh engine; the median is last")
    parser.add_argument("--engine-config", default="{}", help="extra TorchEngineConfig fields as JSON")
    args = parser.parse_args()

    from lm_torch.engine import TorchEngine

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_llama(Path(tmp))
        for i in range(args.repeats):
            config = {"load_format": "dummy", "max_batch_size": args.concurrency, **json.loads(args.engine_config)}
            engine = TorchEngine.from_pretrained(model, config)
            requests = load_requests(args.dataset, args.num_prompts, None, engine.runner.vocab_size, seed=0)

            async def run(engine=engine, requests=requests):
                try:
                    return await measure(engine, requests, args.concurrency)
                finally:
                    await engine.close()

            row = asyncio.run(run())
            rows.append(row)
            print(json.dumps({"run": i, **row}), flush=True)
    median = {k: statistics.median(r[k] for r in rows) for k in ("host_ms_per_step", "host_us_per_token")}
    print(json.dumps({"label": f"host work, {args.num_prompts} prompts at concurrency {args.concurrency}", **median}))


if __name__ == "__main__":
    main()
