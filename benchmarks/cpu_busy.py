"""CPU decode speed of the default model on a quiet machine and beside busy processes, and the server's RSS.

Each measurement runs in a fresh process on the source tree given by --trees (each tree's `packages/*/src` and
`src` on PYTHONPATH), so two checkouts (say this one and an older commit's worktree) compare on the same machine,
interleaved round by round:

    python benchmarks/cpu_busy.py                                   # this tree: quiet and one busy process, c 1, 32
    python benchmarks/cpu_busy.py --trees . /work/wt/old --rounds 2 --busy 0 --no-rss
    python benchmarks/cpu_busy.py --engine-config '{"num_threads": 1}'

A run: requests of the first --num-prompts ShareGPT pairs' input lengths (random token ids, no chat template), each
generating --new-tokens tokens (greedy, ignore_eos), --concurrency at a time, after a warm-up request. With --busy N
the worker starts N processes spinning in `while True` after the warm-up and stops them after the run. Each row is one
JSON line: output tok/s (wall), the process's CPU time per output token (user + sys: the figure to compare on a
machine that other work makes noisy), the engine's thread choice. Then, unless --no-rss, it starts `lm serve
api_server` on the default model, sends one request, and reports its resident set (VmRSS) and peak (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_DATASET = HERE / "data" / "sharegpt_lengths_1000.json"


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that runs `tree`'s packages: its sources first on PYTHONPATH."""
    tree = tree.resolve()
    paths = [str(p) for p in sorted((tree / "packages").glob("*/src"))] + [str(tree / "src")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def worker(args) -> dict:
    """One measurement in this process (the tree's packages already on sys.path)."""
    import torch

    from lm_core import GenerationConfig
    from lm_core.engine import EngineRequest
    from lm_core.resolve import resolve_model
    from lm_torch.config import TorchEngineConfig
    from lm_torch.engine import TorchEngine

    engine = TorchEngine(resolve_model(None), TorchEngineConfig(**json.loads(args.engine_config)))
    vocab = engine.runner.vocab_size
    pairs = json.loads(Path(args.dataset).read_text())["pairs"][: args.num_prompts[0]]
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(100, vocab - 100, (n,), generator=generator).tolist() for n, _ in pairs]
    concurrency, busy = args.concurrency[0], args.busy[0]
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: list[int]) -> int:
        async with semaphore:
            cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
            count = 0
            async for out in engine.generate(EngineRequest(uuid.uuid4().hex, prompt, cfg)):
                count += len(out.token_ids)
            return count

    await one(prompts[0][:16])
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
        cpu1, wall1 = cpu_seconds(), time.perf_counter()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    tuner = getattr(engine.runner, "thread_tuner", None)
    await engine.close()
    return {
        "concurrency": concurrency,
        "busy_processes": busy,
        "requests": len(prompts),
        "output_tokens": tokens,
        "seconds": round(wall1 - wall0, 2),
        "output_tok_per_s": round(tokens / (wall1 - wall0), 1),
        "cpu_ms_per_token": round(1000 * (cpu1 - cpu0) / tokens, 2),
        "threads": tuner.current if tuner is not None else torch.get_num_threads(),
        "thread_switches": tuner.switches if tuner is not None else None,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_rss(tree: Path, extra_args: list[str]) -> dict:
    """Start `lm serve api_server` of `tree` on the default model, send one request, read its memory; stop it."""
    port = free_port()
    code = "import sys; from lm_deploy.cli import main; sys.argv[0] = 'lm'; main()"
    command = [sys.executable, "-c", code, "serve", "api_server", "--server-name", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--server-port", str(port), *extra_args],
        env=tree_env(tree),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
                    model = json.load(response)["data"][0]["id"]
                break
            except OSError:
                if time.perf_counter() - start > 600:
                    raise
                time.sleep(1)
        body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 16}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":" in line
        )
        return {
            "server_rss_gb": round(int(status["VmRSS"].split()[0]) / 1e6, 3),
            "server_peak_rss_gb": round(int(status["VmHWM"].split()[0]) / 1e6, 3),
            "ready_after_s": round(time.perf_counter() - start, 1),
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=Path, nargs="+", default=[HERE.parent], help="source trees to compare")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over the trees (interleaved)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 32], help="none: only --rss")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy processes beside each run")
    parser.add_argument("--num-prompts", type=int, nargs="*", default=[8, 32], help="per concurrency value")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dataset", default=str(DEFAULT_DATASET))
    parser.add_argument("--engine-config", default="{}", help="TorchEngineConfig fields as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-rss", action="store_true", help="skip the server's RSS")
    parser.add_argument("--server-args", default="", help="extra `lm serve api_server` flags for --rss")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(asyncio.run(worker(args))), flush=True)
        return
    if len(args.num_prompts) != len(args.concurrency):
        parser.error("--num-prompts takes one value per --concurrency value")
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count()}))
    for round_index in range(args.rounds):
        for tree in args.trees:
            for concurrency, num_prompts in zip(args.concurrency, args.num_prompts, strict=True):
                for busy in args.busy:
                    command = [sys.executable, __file__, "--worker", "--concurrency", str(concurrency)]
                    command += ["--busy", str(busy), "--num-prompts", str(num_prompts)]
                    command += ["--new-tokens", str(args.new_tokens), "--dataset", args.dataset]
                    command += ["--engine-config", args.engine_config, "--seed", str(args.seed)]
                    out = subprocess.run(command, env=tree_env(tree), capture_output=True, text=True)
                    rows = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                    if out.returncode or not rows:
                        sys.exit(f"worker failed on {tree}:\n{out.stderr[-3000:]}")
                    row = {"tree": str(tree), "round": round_index, **json.loads(rows[0])}
                    print(json.dumps({**row, "load_average_1m": round(os.getloadavg()[0], 2)}), flush=True)
        if not args.no_rss and round_index == 0:
            for tree in args.trees:
                try:
                    rss = server_rss(tree, args.server_args.split())
                except RuntimeError as exc:  # an older tree whose server takes other arguments
                    rss = {"error": str(exc)[-300:]}
                print(json.dumps({"tree": str(tree), **rss}), flush=True)


if __name__ == "__main__":
    main()
