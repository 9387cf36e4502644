"""Do the values in a decode step's padding rows change its speed at the card's power limit?

A full-batch decode step of Llama-3-8B on an H100 runs at the card's power cap (`nvidia-smi` reason 0x4), so its
speed follows the energy its GEMMs spend, and tensor cores spend less on zero operands than on random-looking ones.
This replays, as one CUDA graph, the four linear layers of all 32 layers (qkv, o, gate_up, down: ~14 GB of bf16
weights, so nothing stays in L2) at `--rows` rows for `--seconds` each, with the activations:

    random     every row random (a step with no padding)
    pad_token  the rows past `--real-rows` copies of one random row (the graphs' padding rows before they were zeroed:
               token 0 at position 0, the same in every padding row)
    pad_zero   the rows past `--real-rows` zero (`cuda_graph.zero_padding_rows`)
    zeros      every row zero (the floor)

and prints the microseconds per pass, the SM clock and the power `nvidia-smi` saw meanwhile (every 100 ms). The
patterns run twice, in order, after a warm-up that brings the card to its limit, so drift shows.

    python benchmarks/gemm_power.py [--rows 256] [--real-rows 240] [--seconds 4]
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

LAYERS = 32
HIDDEN, INTERMEDIATE, QKV = 4096, 14336, 6144


def sample_power(seconds: float, run) -> tuple[float, float, float]:
    """Runs `run()` (returns us per pass) while nvidia-smi samples; (us, mean SM MHz, mean W)."""
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "100"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        us = run(seconds)
    finally:
        smi.terminate()
        out, _ = smi.communicate()
    rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
    rows = [(float(c), float(p)) for c, p in rows if c.strip().replace(".", "").isdigit()]
    rows = rows[len(rows) // 5 :]  # the first fifth is the hand-over from the previous pattern
    if not rows:
        return us, float("nan"), float("nan")
    return us, sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--real-rows", type=int, default=240)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    if not 0 < args.real_rows <= args.rows:
        raise ValueError(f"--real-rows must be in 1..--rows, got {args.real_rows}")
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    weights = [[torch.randn(n, k, device=dev, dtype=dtype) * k**-0.5 for n, k in shapes] for _ in range(LAYERS)]
    x_hidden = torch.empty(args.rows, HIDDEN, device=dev, dtype=dtype)
    x_inter = torch.empty(args.rows, INTERMEDIATE, device=dev, dtype=dtype)
    outs = [torch.empty(args.rows, n, device=dev, dtype=dtype) for n, _ in shapes]
    inputs = [x_hidden, x_hidden, x_hidden, x_inter]

    def fill(pattern: str) -> None:
        for x in (x_hidden, x_inter):
            x.normal_()
            if pattern == "pad_token":
                x[args.real_rows :] = x[args.real_rows]
            elif pattern == "pad_zero":
                x[args.real_rows :] = 0
            elif pattern == "zeros":
                x.zero_()

    def one_pass() -> None:  # the inputs stay fixed: the pattern is the same in every layer
        for layer in weights:
            for w, x, y in zip(layer, inputs, outs, strict=True):
                torch.matmul(x, w.t(), out=y)

    fill("random")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_pass()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_pass()

    def run(seconds: float) -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        passes, begin = 0, time.perf_counter()
        start.record()
        while time.perf_counter() - begin < seconds:
            for _ in range(20):
                graph.replay()
            passes += 20
            end.record()
            end.synchronize()
        return start.elapsed_time(end) * 1000 / passes

    run(3.0)  # warm-up: the card reaches its power limit
    flops = 2 * args.rows * sum(n * k for n, k in shapes) * LAYERS
    print(f"{args.rows} rows ({args.real_rows} real), {LAYERS} layers of qkv/o/gate_up/down, {args.seconds} s each")
    for round_ in (1, 2):
        for pattern in ("random", "pad_token", "pad_zero", "zeros"):
            fill(pattern)
            us, mhz, watts = sample_power(args.seconds, run)
            print(
                f"round {round_} {pattern:9s} {us:9.1f} us/pass  {flops / us / 1e6:6.1f} TFLOP/s  "
                f"SM {mhz:6.0f} MHz  {watts:5.0f} W"
            )


if __name__ == "__main__":
    main()
