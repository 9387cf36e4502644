"""Greedy agreement of tensor parallelism with one rank: the same prompts, the same (dummy) weights, tp 1 against
tp N, token by token.

    python benchmarks/tp_agreement.py --model benchmarks/configs/llama3-8b --load-format dummy --tp 2 \\
        --engine-config '{"dist_backend": "gloo", "devices": [0, 0]}'

On one GPU, `dist_backend` gloo with `devices [0, 0]` runs both ranks on GPU 0 (NCCL refuses two ranks on one
device): the kernels run at their sharded shapes, the collectives go through the host. Dummy weights are the same
at every tp (each rank keeps its part of the unsplit model's random tensors).

Three comparisons, printed as one JSON line:
- free-running: each prompt's tp N tokens against tp 1's until the first difference (the rest of that sequence is
  not compared, since the two then continue different texts);
- teacher-forced: tp N reads each prompt followed by tp 1's tokens (its prompt logprobs), and at every position its
  arg-max is compared with tp 1's token there. Every position counts, so this is the per-token agreement.
- the control: tp 1 read the same way (one prefill of its own tokens) against its decode steps: how often rounding
  alone (other kernels, other batch shapes) flips a near-tie at this dtype.
A difference where tp 1's two best log-probabilities are within --tie-gap of each other is a near-tie (in bfloat16
the split sums round differently, and either token is a correct greedy choice); each difference is listed with its
tp 1 top-2 gap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import torch


async def _run(engine, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], list[dict[int, float]]]]:
    from lm_core import GenerationConfig
    from lm_core.engine import EngineRequest

    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, logprobs=2)

    async def one(prompt):
        ids, logprobs = [], []
        async for out in engine.generate(EngineRequest(uuid.uuid4().hex, prompt, cfg)):
            ids += out.token_ids
            logprobs += out.logprobs or []
        return ids, logprobs

    return await asyncio.gather(*(one(p) for p in prompts))


def _with_engine(model: str, config: dict, work):
    """(the result of `await work(engine)` on a fresh engine, the engine's start-up seconds); the engine is closed
    and its device memory freed before this returns, so the next one loads on a free GPU (the runs share one)."""
    import gc

    from lm_torch.engine import TorchEngine

    started = time.perf_counter()
    engine = TorchEngine.from_pretrained(model, config)
    startup = time.perf_counter() - started

    async def run(engine):
        try:
            return await work(engine)
        finally:
            await engine.close()

    result = asyncio.run(run(engine))
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, startup


def generate(model: str, config: dict, prompts: list[list[int]], new_tokens: int):
    """Every prompt's greedy tokens and top-2 logprobs from a fresh engine, and the engine's start-up seconds."""
    return _with_engine(model, config, lambda engine: _run(engine, prompts, new_tokens))


def teacher_forced(model: str, config: dict, prompts: list[list[int]], reference) -> list[list[int]]:
    """tp N's arg-max at each of tp 1's generated positions, reading prompt + tp 1's tokens in one prefill."""
    from lm_core import GenerationConfig
    from lm_core.engine import EngineRequest

    cfg = GenerationConfig(max_new_tokens=1, ignore_eos=True, prompt_logprobs=1)

    async def one(engine, prompt, generated):
        entries = None
        async for out in engine.generate(EngineRequest(uuid.uuid4().hex, prompt + generated, cfg)):
            entries = out.prompt_logprobs or entries
        assert entries is not None
        # Entry j is the distribution before input token j: the generated tokens are inputs len(prompt)... Each
        # entry holds tp 1's token there and tp N's best one: (tp N's arg-max, its margin over tp 1's token).
        picks = []
        for token, entry in zip(generated, entries[len(prompt) :], strict=True):
            best = max(entry, key=entry.get)
            picks.append((best, entry[best] - entry[token]))
        return picks

    async def work(engine):
        return await asyncio.gather(*(one(engine, p, ids) for p, (ids, _) in zip(prompts, reference, strict=True)))

    return _with_engine(model, config, work)[0]


def _top2_gap(logprobs: dict[int, float]) -> float:
    """The gap between a step's two best log-probabilities (inf with one)."""
    top = sorted(logprobs.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def compare_forced(reference, picks: list[list[tuple[int, float]]], tie_gap: float) -> dict:
    """Per-position agreement of tp N's arg-max with tp 1's token; at each difference, tp 1's top-2 gap and tp N's
    margin for its own pick (both small: the two runs see a near-tie, each rounding it its way)."""
    compared = identical = 0
    differences = []
    for (ref_ids, ref_lp), ours in zip(reference, picks, strict=True):
        for step, (a, (b, margin)) in enumerate(zip(ref_ids, ours, strict=True)):
            compared += 1
            if a == b:
                identical += 1
                continue
            gap = _top2_gap(ref_lp[step])
            differences.append((round(gap, 5), round(margin, 5)))
    return {
        "compared": compared,
        "identical": identical,
        "identical_share": identical / max(compared, 1),
        "differences_tp1_gap_tpn_margin": sorted(differences),
        "all_at_near_ties": all(gap < tie_gap and margin < tie_gap for gap, margin in differences),
    }


def compare(reference, split, tie_gap: float) -> dict:
    """Tokens compared and identical (each sequence up to its first difference), and the differences."""
    compared = identical = 0
    divergences = []
    for (ref_ids, ref_lp), (ids, _) in zip(reference, split, strict=True):
        for step, (a, b) in enumerate(zip(ref_ids, ids, strict=True)):
            compared += 1
            if a == b:
                identical += 1
                continue
            gap = _top2_gap(ref_lp[step])
            divergences.append({"step": step, "top2_gap": round(gap, 5), "near_tie": gap < tie_gap})
            break
    return {
        "compared": compared,
        "identical": identical,
        "identical_share": identical / max(compared, 1),
        "divergences": divergences,
        "all_at_near_ties": all(d["near_tie"] for d in divergences),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--engine-config", default="{}", help="extra engine config of the tp N run, as JSON")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--tie-gap", type=float, default=0.1, help="top-2 logprob gap below which tokens tie")
    args = parser.parse_args()

    from pathlib import Path

    from lm_torch.loader import load_hf_config

    vocab = load_hf_config(Path(args.model)).vocab_size
    rng = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(100, vocab - 100, (args.input_len,), generator=rng).tolist() for _ in range(args.num_prompts)
    ]
    base = {
        "load_format": args.load_format,
        "dtype": args.dtype,
        "num_kv_blocks": args.num_kv_blocks,
        "max_batch_size": args.num_prompts,
    }
    reference, startup1 = generate(args.model, base, prompts, args.new_tokens)
    split, startup_n = generate(
        args.model, {**base, "tp": args.tp, **json.loads(args.engine_config)}, prompts, args.new_tokens
    )
    split_config = {**base, "tp": args.tp, **json.loads(args.engine_config)}
    forced = teacher_forced(args.model, split_config, prompts, reference)
    # The control: tp 1 itself, reading its own tokens in one prefill (other kernels and batch shapes than its
    # decode steps): the differences that rounding alone makes at this dtype.
    control = teacher_forced(args.model, base, prompts, reference)
    result = {
        "tp": args.tp,
        "teacher_forced": compare_forced(reference, forced, args.tie_gap),
        "control_tp1_prefill_against_tp1_decode": compare_forced(reference, control, args.tie_gap),
        "free_running": compare(reference, split, args.tie_gap),
        "startup_s": {"tp1": round(startup1, 1), f"tp{args.tp}": round(startup_n, 1)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
