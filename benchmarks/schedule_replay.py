"""Replay the ShareGPT throughput workload through lm-torch's real scheduler, with no model, on the CPU.

`benchmarks/throughput.py` keeps --concurrency requests in flight and sends the next one as one finishes, with
ignore_eos: so which sequences run in each step follows from the scheduler alone, whatever the GPU. This replays
that loop (`Scheduler` and `BlockManager`, the engine's defaults, each step's tokens "sampled" at once, a finished
request replaced `--arrival-lag` steps later as the overlapped engine does) and prints the number of steps, their
sizes, and the work they hold: decode rows, prompt tokens, and the KV-cache bytes decode attention must read. With
the bandwidth and FLOP rates given it prints the floor of the run's GPU time, the figure issue #6's 45 req/s is
measured against. `decode_contexts(batch)` hands the decode kernel benchmark the context lengths of real steps.

    python benchmarks/schedule_replay.py [--num-prompts 1000] [--concurrency 256] [--kv-bytes-per-token 131072]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_DATASET = HERE / "data" / "sharegpt_lengths_1000.json"


@dataclass
class Step:
    tokens: int  # tokens computed: prompt chunks and decodes
    decode_contexts: list[int] = field(default_factory=list)  # context length of each one-token row, itself included

    @property
    def prefill_tokens(self) -> int:
        return self.tokens - len(self.decode_contexts)


def replay(
    dataset: Path = DEFAULT_DATASET,
    num_prompts: int = 1000,
    concurrency: int = 256,
    max_num_batched_tokens: int = 4096,
    prefill_interval: int = 8,
    num_blocks: int = 25_996,
    block_size: int = 16,
    arrival_lag: int = 2,
) -> list[Step]:
    """The steps of one throughput run (the defaults: the H100 run of 8B bf16, whose KV cache held 25,996 blocks)."""
    from lm_core import GenerationConfig
    from lm_torch.block_manager import BlockManager
    from lm_torch.scheduler import Scheduler
    from lm_torch.sequence import Sequence

    pairs = json.loads(dataset.read_text())["pairs"][:num_prompts]
    rng = random.Random(0)
    scheduler = Scheduler(
        BlockManager(num_blocks, block_size),
        max_batch_size=concurrency,
        max_num_batched_tokens=max_num_batched_tokens,
        prefill_interval=prefill_interval,
    )
    sent = 0
    arrivals: list[int] = []  # steps at which a replacement request arrives

    def send() -> None:
        nonlocal sent
        input_len, output_len = pairs[sent]
        prompt = [rng.randrange(100, 100_000) for _ in range(input_len)]  # random ids: no prefix hits
        config = GenerationConfig(max_new_tokens=output_len, ignore_eos=True)
        scheduler.add(Sequence(request_id=str(sent), token_ids=prompt, num_prompt_tokens=input_len, gen_config=config))
        sent += 1

    while sent < min(concurrency, len(pairs)):
        send()
    steps: list[Step] = []
    index = 0
    while scheduler.has_unfinished_requests or sent < len(pairs):
        for _ in range(sum(1 for a in arrivals if a <= index)):
            if sent < len(pairs):
                send()
        arrivals = [a for a in arrivals if a > index]
        if scheduler.has_unfinished_requests:
            batch = scheduler.schedule()
            contexts = [
                s.num_computed_tokens + 1 for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True) if n == 1
            ]
            steps.append(Step(batch.num_tokens, contexts))
            scheduler.update(batch, [0 if sample else None for sample in batch.sample])
            arrivals += [index + arrival_lag] * sum(1 for s in batch.seqs if s.is_finished)
        index += 1
    return steps


def decode_contexts(batch: int, steps: list[Step] | None = None, seed: int = 0) -> list[int]:
    """The context lengths of a decode-only step of the replay with `batch` rows (the one nearest in size, padded
    with its own rows or cut to `batch`)."""
    steps = steps if steps is not None else replay()
    decode_only = [s for s in steps if s.prefill_tokens == 0]
    nearest = min(decode_only, key=lambda s: (abs(len(s.decode_contexts) - batch), -len(s.decode_contexts)))
    contexts = list(nearest.decode_contexts)
    rng = random.Random(seed)
    while len(contexts) < batch:
        contexts.append(rng.choice(nearest.decode_contexts))
    return contexts[:batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--prefill-interval", type=int, default=8)
    parser.add_argument("--arrival-lag", type=int, default=2)
    parser.add_argument(
        "--kv-bytes-per-token", type=int, default=131_072, help="all layers, K and V (8B bf16: 128 KiB)"
    )
    parser.add_argument("--weight-bytes", type=float, default=16.06e9, help="bytes read per step (8B bf16)")
    parser.add_argument("--flops-per-token", type=float, default=16.06e9, help="2 x parameters")
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s the GPU reads")
    parser.add_argument("--flops", type=float, default=700e12, help="dense FLOP/s of the GEMMs")
    args = parser.parse_args()
    steps = replay(
        args.dataset,
        args.num_prompts,
        args.concurrency,
        args.max_num_batched_tokens,
        args.prefill_interval,
        arrival_lag=args.arrival_lag,
    )
    rows = sum(len(s.decode_contexts) for s in steps)
    prefill = sum(s.prefill_tokens for s in steps)
    kv_bytes = sum(sum(s.decode_contexts) for s in steps) * args.kv_bytes_per_token
    # Each step reads the weights once and computes its tokens' products, whichever is slower.
    gemm_s = sum(max(args.weight_bytes / args.bandwidth, s.tokens * args.flops_per_token / args.flops) for s in steps)
    attention_s = kv_bytes / args.bandwidth
    sizes = [len(s.decode_contexts) for s in steps]
    print(f"steps: {len(steps)} ({sum(1 for s in steps if s.prefill_tokens)} with prompt tokens)")
    print(f"decode rows: {rows}, prompt tokens: {prefill}, KV read by decode attention: {kv_bytes / 1e12:.2f} TB")
    for low, high in ((0, 1), (2, 8), (9, 32), (33, 64), (65, 128), (129, 192), (193, args.concurrency)):
        print(f"  steps with {low}-{high} decode rows: {sum(1 for n in sizes if low <= n <= high)}")
    print(
        f"floor: GEMMs {gemm_s:.2f} s + decode attention {attention_s:.2f} s = {gemm_s + attention_s:.2f} s "
        f"= {args.num_prompts / (gemm_s + attention_s):.1f} req/s (at {args.bandwidth / 1e12:.1f} TB/s, "
        f"{args.flops / 1e12:.0f} TFLOP/s, nothing else)"
    )


if __name__ == "__main__":
    main()
