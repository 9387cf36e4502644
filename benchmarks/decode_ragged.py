"""Decode attention on the context lengths of real throughput steps (ragged batches), with launch-shape sweeps.

`benchmarks/kernel_times.py` times equal contexts; a ShareGPT step mixes contexts of a few tokens with ones of 2,000.
This takes a decode-only step of the throughput workload replayed through the scheduler
(`schedule_replay.decode_contexts`) at each batch size, builds a shuffled paged cache of the Llama-3-8B attention
shape (32 query heads, 8 kv heads, head_dim 128, 16-token blocks) and times `decode_attention` as CUDA-graph replays:
the sequences in arrival order and longest context first (the engine's order from 32 decodes on), the same batch
with every context at the mean (what the imbalance costs), and with --sweep every (block_n, num_warps, num_stages,
conversion of quantized codes) and split count. GB/s counts the cache bytes read (codes,
scales and zeros).

    python benchmarks/decode_ragged.py [--batches 64 256] [--kv-quant 0 8] [--sweep | --splits-sweep]
    python benchmarks/decode_ragged.py --tune FILE [--batches ...]   # the engine's per-batch plans (bf16 cache)

With --tune each batch's calls rotate over copies of its cache (small batches' contexts would stay in L2 between
calls otherwise), and the fastest plan (launch shape, split-K, order) goes to the table
`lm_torch.kernels.decode_attention.tuned_decode_plan` reads.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def _inputs(contexts: list[int], policy: int, seed: int) -> dict:
    """A shuffled paged cache holding `contexts`, its queries and the call's other arguments, from one seed."""
    from lm_torch.kv_quant import quantize_kv, scales_dtype

    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [-(-c // BLOCK_SIZE) for c in contexts]
    num_blocks = sum(blocks_per_seq)
    k = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(k.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    extra = {}
    if policy:
        k, k_sz = quantize_kv(k, policy, scales_dtype(torch.bfloat16))
        v, v_sz = quantize_kv(v, policy, scales_dtype(torch.bfloat16))
        extra = {"k_scales_zeros": k_sz, "v_scales_zeros": v_sz}
    order = torch.randperm(num_blocks, device="cuda", generator=gen)
    tables = torch.zeros(len(contexts), max(blocks_per_seq), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[used : used + n]
        used += n
    per_token = k[0, 0].numel() * k.element_size()
    if policy:
        per_token += extra["k_scales_zeros"][0, 0].numel() * extra["k_scales_zeros"].element_size()
    batch = len(contexts)
    return {
        "args": (
            torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen),
            k,
            v,
            tables,
            torch.arange(batch + 1, device="cuda", dtype=torch.int32),
            torch.tensor(contexts, device="cuda", dtype=torch.int32),
            1 / math.sqrt(HEAD_DIM),
        ),
        "kwargs": {"max_context_len": max(contexts), **extra},
        "bytes": 2 * per_token * sum(contexts),
    }


def _time(inputs: dict | list[dict], rep: int = 100, **launch) -> tuple[float, float, torch.Tensor]:
    """(microseconds, GB/s, output of the first) of one decode_attention call on `_inputs`; given several (copies of
    one step's cache, so that a small batch's context does not stay in L2 from one call to the next), the calls
    take them in turn and the time is per call."""
    import triton.testing

    from lm_torch.kernels.decode_attention import decode_attention

    copies = inputs if isinstance(inputs, list) else [inputs]
    calls = []
    for each in copies:
        q, lens = each["args"][0], each["args"][5]
        kwargs = dict(launch)
        if kwargs.pop("sort", False):  # what the engine does for large batches, once per step (not timed here)
            kwargs["seq_order"] = torch.argsort(lens, descending=True).to(torch.int32)
        calls.append((each, torch.empty_like(q), kwargs))

    def call():
        for each, out, kwargs in calls:
            decode_attention(*each["args"], out=out, **each["kwargs"], **kwargs)

    call()
    torch.cuda.synchronize()
    result = calls[0][1].clone()
    us = triton.testing.do_bench_cudagraph(call, rep=rep, return_mode="median") * 1000.0 / len(calls)
    return us, copies[0]["bytes"] / us / 1e3, result


class _Rows:
    """The rows of one (cache policy, batch): every call sees the same cache and queries (built once), so each output
    is compared with the first row's."""

    def __init__(self, contexts: list[int], policy: int) -> None:
        self.contexts, self.policy = contexts, policy
        mean = round(sum(contexts) / len(contexts))
        label = f"int{policy}" if policy else "bf16"
        self.head = f"| {label} | {len(contexts)} | {mean} / {max(contexts)}"
        self.inputs = _inputs(contexts, policy, seed=len(contexts))
        self.first: torch.Tensor | None = None

    def row(self, name: str, lens: list[int] | None = None, **launch) -> float:
        """Time one launch over the step's contexts, or over `lens` (other inputs, not compared)."""
        inputs = self.inputs if lens is None else _inputs(lens, self.policy, seed=len(lens))
        us, gbs, out = _time(inputs, **launch)
        diff = 0.0
        if lens is None:
            if self.first is None:
                self.first = out
            diff = (out.float() - self.first.float()).abs().max().item()
        print(f"{self.head} | {name} | {us:.1f} | {gbs:.0f} | {diff:.1e} |", flush=True)
        return us


def _splits_table(contexts: list[int], policy: int) -> None:
    """Split counts against the fewest tokens a split covers (each sequence takes min(splits, context / that)),
    longest context first: one compiled kernel for all of them (neither is a compile-time constant)."""
    rows = _Rows(contexts, policy)
    for splits, split_tokens in itertools.product((1, 2, 4, 8), (64, 128, 256, 512)):
        if splits == 1 and split_tokens > 64:
            continue  # one split whatever the length
        rows.row(
            f"splits {splits}, split_tokens {split_tokens}, longest first",
            num_splits=splits,
            split_tokens=split_tokens,
            sort=True,
        )


def _table(contexts: list[int], policy: int, sweep: bool) -> None:
    from lm_torch.kernels.decode_attention import choose_num_splits

    rows = _Rows(contexts, policy)
    batch, mean = len(contexts), round(sum(contexts) / len(contexts))
    splits = choose_num_splits(batch, NUM_KV_HEADS, 1024, torch.device("cuda"))  # what a graph bucket takes
    if policy:  # the plain conversion is the reference of the others
        rows.row(f"convert 0 (splits {splits})", num_splits=splits, convert=0)
    rows.row(f"arrival order (splits {splits})", num_splits=splits)
    rows.row(f"engine: longest context first (splits {splits})", num_splits=splits, sort=True)
    rows.row(f"every context {mean}", [mean] * batch, num_splits=splits)
    if not sweep:
        return
    results = []
    converts = (0, 1, 2) if policy else (0,)
    # bf16 tiles also at 128 keys and 4 stages (the int8 sweep, three conversions each, keeps its earlier grid).
    block_ns, stage_counts = ((32, 64), (1, 2, 3)) if policy else ((32, 64, 128), (1, 2, 3, 4))
    for block_n, warps, stages, convert in itertools.product(block_ns, (4, 8), stage_counts, converts):
        launch = dict(block_n=block_n, num_warps=warps, num_stages=stages, convert=convert)
        try:
            results.append((rows.row(str(launch), num_splits=splits, **launch), launch))
        except Exception as exc:  # a shape that does not compile (shared memory): skip it
            print(f"{rows.head} | {launch} | failed: {type(exc).__name__} |", flush=True)
    _, best = min(results, key=lambda r: r[0])
    for n in (1, 2, 4):
        rows.row(f"{best}, longest first, splits {n}", num_splits=n, sort=True, **best)


def _tune(steps, path: str, batches: list[int]) -> None:
    """For each batch (default: every CUDA-graph bucket of a 256-sequence engine), the fastest decode plan on that
    batch's real contexts: first the launch shape (block_n x warps x stages; from 64 decodes also longest first) at
    the engine's split count, then split counts x split_tokens with the winner. A plan enters the table only where it
    beats the engine's default plan by 2% (else the default is written): the table `tuned_decode_plan` reads."""
    import json

    from gemv import L2_BYTES
    from schedule_replay import decode_contexts

    from lm_torch.attention.triton_backend import SORT_MIN_DECODES
    from lm_torch.kernels.decode_attention import (
        DEFAULT_LAUNCH,
        GRAPH_SPLIT_CONTEXT,
        MIN_TOKENS_PER_SPLIT,
        choose_num_splits,
    )
    from lm_torch.runner.cuda_graph import graph_buckets

    launches = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2)]
    table: dict[str, dict] = {}
    # Powers of two from the largest down first: a sweep cut short by its time limit then still has a row within 2x
    # above every batch (the lookup takes the fewest decodes at or above), and the full steps' rows come first.
    todo = batches or graph_buckets(256)
    firsts = sorted((b for b in todo if b & (b - 1) == 0), reverse=True)
    for batch in firsts + [b for b in todo if b not in firsts]:
        contexts = decode_contexts(batch, steps)
        per_copy = sum(contexts) * NUM_KV_HEADS * HEAD_DIM * 2 * 2
        copies = min(16, max(1, -(-3 * L2_BYTES // per_copy)))
        inputs = [_inputs(contexts, 0, seed=batch + i) for i in range(copies)]
        splits0 = choose_num_splits(batch, NUM_KV_HEADS, GRAPH_SPLIT_CONTEXT, torch.device("cuda"))
        default = {**DEFAULT_LAUNCH, "num_splits": splits0, "split_tokens": MIN_TOKENS_PER_SPLIT}
        default["sort"] = batch >= SORT_MIN_DECODES
        reference = None

        def measure(plan: dict, inputs: list[dict] = inputs, batch: int = batch) -> float:
            nonlocal reference
            try:
                us, _, out = _time(inputs, rep=15, **plan)
            except Exception as exc:  # a shape that does not compile (shared memory): never chosen
                print(f"| {batch} | {plan} | failed: {type(exc).__name__} |", flush=True)
                return float("inf")
            if reference is None:
                reference = out.float()
            elif (out.float() - reference).abs().max().item() > 2e-2:
                raise AssertionError(f"{plan} disagrees with the default plan at batch {batch}")
            return us

        base = measure(default)
        best, best_us = default, base
        for (block_n, warps, stages), sort in itertools.product(launches, (False, True) if batch >= 64 else (False,)):
            plan = {**default, "block_n": block_n, "num_warps": warps, "num_stages": stages, "sort": sort}
            us = measure(plan)
            if us < best_us:
                best, best_us = plan, us
        split_counts = sorted({max(1, splits0 // 4), max(1, splits0 // 2), splits0, 2 * splits0, 4 * splits0})
        for splits, tokens in itertools.product(split_counts, (32, 64, 128, 256)):
            if splits > 32 or (splits == 1 and tokens != MIN_TOKENS_PER_SPLIT):
                continue
            plan = {**best, "num_splits": splits, "split_tokens": tokens}
            us = measure(plan)
            if us < best_us:
                best, best_us = plan, us
        chosen = best if best_us < 0.98 * base else default
        table[str(batch)] = chosen
        mean = round(sum(contexts) / batch)
        print(
            f"| {batch} | {mean} / {max(contexts)} | {copies} | {base:.1f} | {best_us:.1f} | {base / best_us:.3f} | "
            f"{json.dumps(chosen)} |",
            flush=True,
        )
        with open(path, "w") as f:  # after every batch: a sweep cut short still leaves its table
            device = torch.cuda.get_device_name()
            header = {"device": device, "torch": torch.__version__, "head_dim": HEAD_DIM, "kv_bytes": 2}
            json.dump({**header, "configs": table}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--kv-quant", type=int, nargs="+", default=[0, 8], choices=[0, 4, 8])
    parser.add_argument("--sweep", action="store_true", help="every launch shape (and conversion) and split count")
    parser.add_argument(
        "--splits-sweep", action="store_true", help="only split counts x split_tokens (longest first), nothing else"
    )
    parser.add_argument(
        "--tune",
        metavar="FILE",
        help="write the fastest plan of each batch (every graph bucket unless --batches is given) to FILE",
    )
    args = parser.parse_args()

    from schedule_replay import decode_contexts, replay

    steps = replay()
    print(f"device: {torch.cuda.get_device_name()}")
    if args.tune:
        print("| batch | contexts (mean / max) | cache copies | default us | best us | speed-up | plan written |")
        print("|---|---|---|---|---|---|---|")
        batches = [] if args.batches == parser.get_default("batches") else args.batches
        _tune(steps, args.tune, batches)
        return
    print("| KV cache | batch | contexts (mean / max) | launch | us | GB/s | max abs diff to the first row |")
    print("|---|---|---|---|---|---|---|")
    for policy, batch in itertools.product(args.kv_quant, args.batches):
        if args.splits_sweep:
            _splits_table(decode_contexts(batch, steps), policy)
        else:
            _table(decode_contexts(batch, steps), policy, args.sweep)


if __name__ == "__main__":
    main()
