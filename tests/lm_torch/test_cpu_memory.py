"""The CPU engine's default KV cache (a fixed size, whatever RAM is free) and its start-up summary."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from lm_torch.config import TorchEngineConfig
from lm_torch.memory import CPU_MIN_KV_TOKENS, GIB, cpu_default_kv_tokens, plan_kv_cache

# SmolLM2-135M in float32: 30 layers, 3 KV heads of 64 features, keys and values, 16-token blocks.
SMOL_BLOCK_BYTES = 30 * 16 * 2 * 3 * 64 * 4
SMOL_WEIGHT_BYTES = int(0.61 * GIB)


def _cpu_plan(free_gib: float, session_len: int = 8192, **config):
    cfg = TorchEngineConfig(**{"block_size": 16, **config})
    sizes = (SMOL_BLOCK_BYTES, SMOL_WEIGHT_BYTES, session_len)
    return plan_kv_cache(cfg, *sizes, free=int(free_gib * GIB), activation_reserve=0, on_gpu=False)


def test_cpu_default_is_fixed_and_small():
    # The same cache whatever RAM is free (2.2-4.0 GiB and more were seen free run to run).
    plans = [_cpu_plan(free) for free in (2.2, 3.1, 4.0, 64.0)]
    assert {p.num_blocks for p in plans} == {8192 // 16}
    plan = plans[0]
    assert plan.num_tokens == 8192 == cpu_default_kv_tokens(8192)
    assert plan.kv_bytes == 8192 * 30 * 2 * 3 * 64 * 4  # 0.35 GiB: one full session of the default model
    assert plan.kv_bytes < 0.4 * GIB
    assert "KV cache 0.35 GiB (CPU default: 8192 tokens" in plan.summary()
    # One full session of a longer-context model; short sessions still get CPU_MIN_KV_TOKENS.
    assert _cpu_plan(64.0, session_len=32768).num_tokens == 32768
    assert _cpu_plan(64.0, session_len=2048).num_tokens == CPU_MIN_KV_TOKENS
    # Never more than what max_batch_size sessions can use.
    assert _cpu_plan(64.0, session_len=2048, max_batch_size=1).num_blocks == 2048 // 16 + 1


def test_cpu_default_caps():
    # Capped by cpu_kv_cache_gb, and on a machine short of RAM by half of what is available.
    capped = _cpu_plan(64.0, session_len=131072, cpu_kv_cache_gb=1.0)
    assert capped.kv_bytes <= GIB and "capped at cpu_kv_cache_gb" in capped.source
    short = _cpu_plan(0.2)
    assert short.kv_bytes <= 0.1 * GIB and "of the available RAM" in short.source


def test_cpu_overrides_still_apply():
    assert _cpu_plan(10.0, num_kv_blocks=100).num_blocks == 100
    assert _cpu_plan(10.0, kv_cache_gb=1.0).kv_bytes == pytest.approx(GIB, abs=SMOL_BLOCK_BYTES)
    # An explicit fraction is a fraction of the available RAM (capped by cpu_kv_cache_gb), as before.
    fraction = _cpu_plan(2.0, cache_max_entry_count=0.5)
    assert fraction.kv_bytes == pytest.approx(GIB, abs=SMOL_BLOCK_BYTES)
    assert "cache_max_entry_count 0.5" in fraction.source
    with pytest.raises(ValueError, match="cache_max_entry_count"):
        TorchEngineConfig(cache_max_entry_count=0.0)
    with pytest.raises(ValueError, match="num_threads"):
        TorchEngineConfig(num_threads=0)


@pytest.mark.slow
def test_default_engine_summary_states_budget_threads_and_wall_time(default_model_dir, capfd):
    from lm_torch.engine import TorchEngine

    capfd.readouterr()
    start = time.perf_counter()
    engine = TorchEngine.from_pretrained(default_model_dir)
    measured = time.perf_counter() - start
    try:
        err = capfd.readouterr().err
        assert err.lstrip().startswith("lm-torch: loading")  # printed before anything slow
        assert engine.runner.num_blocks == 8192 // 16
        assert "KV cache 0.35 GiB (CPU default: 8192 tokens" in err
        assert "CPU threads chosen per step" in err
        # The reported start-up covers the whole construction (the KV allocation and the engine's own set-up too).
        reported = float(re.search(r"start-up ([\d.]+) s wall time", err).group(1))
        assert reported >= measured - 0.1
    finally:
        asyncio.run(engine.close())
