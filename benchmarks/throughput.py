"""Offline throughput of lm-torch on ShareGPT lengths, optionally against transformers' `generate`.

Each request is a random prompt of the pair's input length and generates exactly the pair's output length
(ignore_eos; greedy, or as --sampling says), capped by --max-output-len. Requests go straight to the engine (token
ids, no chat template), at most --concurrency at a time.

    python benchmarks/throughput.py --num-prompts 64 --max-output-len 128 --concurrency 64 1 \
        --compare-transformers 1,16,64
    python benchmarks/throughput.py --model benchmarks/configs/llama3-8b --load-format dummy --num-prompts 1000 \
        --concurrency 256

Image workload (`--workload image`, a vision-language model): every request is `--images-per-request` random images
of `--image-size` (WxH) and about `--image-input-len` text tokens in one user message, generating
`--max-output-len` tokens; each request's messages go through the pipeline's preparation (template, image loading
and preprocessing, placeholder expansion) inside the timed run, in a worker thread, as `pipeline()` does.

    python benchmarks/throughput.py --model DIR --load-format dummy --workload image --image-size 1280x720 \
        --num-prompts 500 --max-output-len 128 --concurrency 64

Prints req/s, output tok/s, TTFT and TPOT (p50/p99) and the engine's step counters; exits non-zero if any request
ends short. --profile (CUDA) also prints the GPU's busy seconds by kernel class against the run's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_DATASET = HERE / "data" / "sharegpt_lengths_1000.json"


def load_requests(path: Path, num_prompts: int, max_output_len: int | None, vocab_size: int, seed: int):
    import torch

    pairs = json.loads(path.read_text())["pairs"][:num_prompts]
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for input_len, output_len in pairs:
        # Ids from the middle of the vocabulary: ordinary tokens, no specials.
        prompt = torch.randint(100, vocab_size - 100, (input_len,), generator=generator).tolist()
        requests.append((prompt, min(output_len, max_output_len) if max_output_len else output_len))
    return requests


def engine_counters(engine) -> dict:
    """The engine's cumulative step counters (steps, overlapped steps, graph and eager steps and rows)."""
    return {**engine.step_counters, **getattr(engine.runner, "counters", {})}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def image_requests(
    num_prompts: int, size: tuple[int, int], per_request: int, text_len: int, output_len: int, seed: int
):
    """(messages, output length) of the image workload: random-noise RGB images, a prompt of common words."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "image",
        "picture",
        "describe",
        "what",
    ]
    requests = []
    for _ in range(num_prompts):
        images = [Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)) for _ in range(per_request)]
        text = " ".join(rng.choice(words) for _ in range(text_len))
        parts = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": text}]
        requests.append(([{"role": "user", "content": parts}], output_len))
    return requests


async def run_engine(engine, requests, concurrency: int, sampling: dict | None = None, prepare=None):
    """Every request through `engine`, `concurrency` at a time, each to its full output length (ignore_eos);
    greedy unless `sampling` gives GenerationConfig fields (temperature, top_p, ...). `prepare(prompt, cfg)`:
    turns a request's prompt into (token ids, multimodal items) in a worker thread, inside the timed run."""
    from tqdm.auto import tqdm

    from lm_core import GenerationConfig
    from lm_core.engine import EngineRequest

    semaphore = asyncio.Semaphore(concurrency)
    results = []
    bar = tqdm(total=len(requests), desc="requests", file=sys.stderr)

    async def one(prompt, output_len):
        async with semaphore:
            cfg = GenerationConfig(max_new_tokens=output_len, ignore_eos=True, **(sampling or {}))
            start = time.perf_counter()
            first = None
            num_tokens = 0
            reason = None
            multimodal = None
            if prepare is not None:
                prompt, multimodal = await asyncio.to_thread(prepare, prompt, cfg)
            request = EngineRequest(uuid.uuid4().hex, prompt, cfg, multimodal=multimodal)
            async for out in engine.generate(request):
                if out.token_ids and first is None:
                    first = time.perf_counter()
                num_tokens += len(out.token_ids)
                reason = out.finish_reason
            end = time.perf_counter()
            results.append((start, first or end, end, num_tokens, output_len, reason))
            bar.update(1)

    start = time.perf_counter()
    await asyncio.gather(*(one(p, n) for p, n in requests))
    bar.close()
    return time.perf_counter() - start, results


async def profiled(run):
    """Await `run` under the torch profiler (CUDA kernels only); print how busy the GPU was and with what."""
    import torch
    from latency import classify  # benchmarks/ is the script's directory, hence on sys.path
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        elapsed, results = await run
    by_class: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            label = classify(event.name)
            by_class[label] = by_class.get(label, 0.0) + event.device_time_total / 1e6
            entry = by_name.setdefault(event.name[:100], [0.0, 0])
            entry[0] += event.device_time_total / 1e6
            entry[1] += 1
    busy = sum(by_class.values())
    row = {label: round(seconds, 2) for label, seconds in sorted(by_class.items(), key=lambda kv: -kv[1])}
    print(json.dumps({"gpu_busy_s": round(busy, 2), "wall_s": round(elapsed, 2), "kernel_seconds": row}))
    # The kernels themselves (seconds, launches): which GEMM shapes and which small kernels the classes hold.
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:30]
    print(json.dumps({"top_kernels": [[name, round(s, 3), n] for name, (s, n) in top]}))
    print(json.dumps({"idle": idle_gaps(prof)}))
    return elapsed, results


def idle_gaps(prof) -> dict:
    """Where the GPU waited between kernels: the gaps of the device timeline by length, and the kernels that ran
    before and after the longest-summing kinds of gap (the kernel after a gap is the one the host launched late)."""
    import torch

    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name[:60])
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    by_length = {"<10us": [0.0, 0], "10-100us": [0.0, 0], "0.1-1ms": [0.0, 0], ">=1ms": [0.0, 0]}
    by_pair: dict[str, list] = {}
    busy_until = spans[0][1] if spans else 0.0
    before = spans[0][2] if spans else ""
    for start, end, name in spans[1:]:
        gap = start - busy_until
        if gap > 0:
            label = "<10us" if gap < 10 else "10-100us" if gap < 100 else "0.1-1ms" if gap < 1000 else ">=1ms"
            by_length[label][0] += gap / 1e6
            by_length[label][1] += 1
            if gap >= 100:
                entry = by_pair.setdefault(f"{before} -> {name}", [0.0, 0])
                entry[0] += gap / 1e6
                entry[1] += 1
        if end > busy_until:
            busy_until, before = end, name
    pairs = sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "gaps_s_and_count": {k: [round(v[0], 3), v[1]] for k, v in by_length.items()},
        "gaps_over_100us_by_neighbours": [[pair, round(s, 3), n] for pair, (s, n) in pairs],
    }


def summarize_trace(trace) -> None:
    """Print where the loop's wall time went, by kind of step: decode-only steps by batch size, steps with
    prefill chunks by token count. A step's time is from its predecessor's end to its own (loop iterations)."""
    kinds: dict[str, list[float]] = {}
    for prev, row in itertools.pairwise(trace):
        _, _, end, rows, tokens, decodes = row
        if rows == 0:
            kind = "drain"
        elif tokens == decodes:
            kind = f"decode {min(256, 1 << (rows - 1).bit_length())}"
        else:
            kind = f"mixed {min(8192, 1 << (tokens - 1).bit_length())} tok"
        kinds.setdefault(kind, []).append(end - prev[2])
    table = {
        kind: {
            "steps": len(times),
            "total_s": round(sum(times), 2),
            "mean_ms": round(1000 * sum(times) / len(times), 2),
        }
        for kind, times in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))
    }
    print(json.dumps({"step_time_by_kind": table}))


class GcPauses:
    """The garbage collector's pauses while the block runs, by generation: the engine's loop stops for each (the
    engine's `gc_tuning` is meant to make them rare and short)."""

    def __enter__(self) -> GcPauses:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._start = 0.0
        gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._start)

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return {
            f"gen{g}": {"n": len(p), "total_ms": round(1000 * sum(p), 1), "max_ms": round(1000 * max(p, default=0), 1)}
            for g, p in self.pauses.items()
        }


def report(label: str, elapsed: float, results) -> dict:
    short = [r for r in results if r[3] != r[4]]
    if short:
        reasons = sorted({str(r[5]) for r in short})
        sys.exit(f"{label}: {len(short)} requests ended short of their output length (reasons: {', '.join(reasons)})")
    output_tokens = sum(r[3] for r in results)
    ttft = [(r[1] - r[0]) * 1000 for r in results]
    tpot = [(r[2] - r[1]) * 1000 / (r[3] - 1) for r in results if r[3] > 1]
    row = {
        "label": label,
        "requests": len(results),
        "seconds": round(elapsed, 2),
        "req_per_s": round(len(results) / elapsed, 2),
        "output_tok_per_s": round(output_tokens / elapsed, 1),
        "ttft_p50_ms": round(statistics.median(ttft), 1),
        "ttft_p99_ms": round(percentile(ttft, 99), 1),
        "tpot_p50_ms": round(statistics.median(tpot), 2) if tpot else None,
        "tpot_p99_ms": round(percentile(tpot, 99), 2) if tpot else None,
    }
    print(json.dumps(row))
    return row


def run_transformers(model_path: Path, requests, batch_size: int) -> dict:
    """Static batches through transformers' generate: each batch runs to its longest output."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    start = time.perf_counter()
    useful = generated = 0
    for i in tqdm(range(0, len(requests), batch_size), desc=f"transformers batch {batch_size}", file=sys.stderr):
        batch = requests[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=pad,
            )
        useful += sum(n for _, n in batch)
        generated += longest * len(batch)  # a static batch runs every row to its longest output
    elapsed = time.perf_counter() - start
    row = {
        "label": f"transformers generate, static batch {batch_size}",
        "requests": len(requests),
        "seconds": round(elapsed, 2),
        "output_tok_per_s": round(useful / elapsed, 1),
        "generated_tok_per_s_incl_padding_rows": round(generated / elapsed, 1),
    }
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir, .gguf or hub id (default: the default model)")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64])
    parser.add_argument("--load-format", default="auto", help="'dummy' for random weights from config.json")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--engine-config", default="{}", help="extra TorchEngineConfig fields as JSON")
    parser.add_argument(
        "--sampling",
        default="{}",
        help='GenerationConfig fields for every request as JSON, e.g. \'{"do_sample": true, "temperature": 0.8, '
        '"top_p": 0.95}\' (default: greedy)',
    )
    parser.add_argument("--compare-transformers", default="", help="comma-separated static batch sizes, e.g. 1,16,64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: record the timed run with the torch profiler and print GPU busy time by kernel class",
    )
    parser.add_argument("--step-trace", type=Path, help="write each engine step's times and sizes here (JSON)")
    parser.add_argument("--workload", choices=["text", "image"], default="text", help="ShareGPT text, or images")
    parser.add_argument("--image-size", default="1280x720", help="WIDTHxHEIGHT of each image")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-input-len", type=int, default=64, help="text tokens beside the images")
    args = parser.parse_args()

    from lm_core import resolve_model
    from lm_torch.engine import TorchEngine

    model_path = resolve_model(args.model)
    start = time.perf_counter()
    config = {
        "load_format": args.load_format,
        "dtype": args.dtype,
        "max_batch_size": max(args.concurrency),
        **json.loads(args.engine_config),
    }
    engine = TorchEngine.from_pretrained(model_path, config)
    print(json.dumps({"startup_s": round(time.perf_counter() - start, 2)}))
    sampling = json.loads(args.sampling)
    prepare = None
    if args.workload == "image":
        from lm_core import AsyncPipeline

        pipe = AsyncPipeline(engine, model_path)
        width, height = (int(v) for v in args.image_size.lower().split("x"))
        requests = image_requests(
            args.num_prompts,
            (width, height),
            args.images_per_request,
            args.image_input_len,
            args.max_output_len,
            args.seed,
        )

        def prepare(messages, cfg):
            prepared = pipe.prepare(messages, cfg)
            return prepared.prompt_ids, prepared.multimodal
    else:
        requests = load_requests(
            args.dataset, args.num_prompts, args.max_output_len, engine.runner.vocab_size, args.seed
        )

    async def all_runs():
        rows = []
        # One short warm-up so one-time costs (allocator, kernels) stay out of the numbers.
        await run_engine(engine, requests[:2], 2, prepare=prepare)
        if args.step_trace:
            engine.step_trace = []
        for concurrency in args.concurrency:
            before = engine_counters(engine)
            with GcPauses() as gc_pauses:
                if args.profile:
                    elapsed, results = await profiled(run_engine(engine, requests, concurrency, sampling, prepare))
                else:
                    elapsed, results = await run_engine(engine, requests, concurrency, sampling, prepare)
            label = f"lm-torch, concurrency {concurrency}" + "".join(f", {k}={v}" for k, v in sampling.items())
            rows.append(report(label, elapsed, results))
            print(json.dumps({"gc_pauses": gc_pauses.summary()}))
            # Where this run's steps went.
            counters = {k: round(v - before.get(k, 0), 2) for k, v in engine_counters(engine).items()}
            print(json.dumps({"engine_counters": counters}))
        if args.step_trace:
            summarize_trace(engine.step_trace)
            args.step_trace.write_text(json.dumps(engine.step_trace))
        await engine.close()
        return rows

    asyncio.run(all_runs())
    for batch_size in [int(b) for b in args.compare_transformers.split(",") if b and args.workload == "text"]:
        run_transformers(model_path, requests, batch_size)


if __name__ == "__main__":
    main()
