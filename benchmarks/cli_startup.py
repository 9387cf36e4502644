"""Start-up time of the `lm` command: how long `lm --help` (and each group's --help) takes, wall clock.

Usage: python benchmarks/cli_startup.py [--runs 20]

Runs each command once to warm the OS file cache, then `--runs` times, and prints min / median / max in ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def time_command(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, check=True)  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    lm = shutil.which("lm")
    if lm is None:
        sys.exit("the lm script is not on PATH: install the meta-package first (see the README)")
    commands = [
        [sys.executable, "-c", "pass"],
        [sys.executable, "-c", "import lm_core"],
        [lm, "--help"],
        [lm, "model", "--help"],
        [lm, "serve", "--help"],
        [lm, "lite", "--help"],
    ]
    print(f"{'command':<40} {'min ms':>8} {'median ms':>10} {'max ms':>8}")
    for cmd in commands:
        samples = time_command(cmd, args.runs)
        label = " ".join(["python" if c == sys.executable else ("lm" if c == lm else c) for c in cmd])
        print(f"{label:<40} {min(samples):>8.0f} {statistics.median(samples):>10.0f} {max(samples):>8.0f}")


if __name__ == "__main__":
    main()
