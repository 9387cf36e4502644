"""`TorchEngineConfig`: frozen sub-configs that validate their own fields, flat and nested construction, the flat
reads kept for older code, and the command-line options the config declares."""

from __future__ import annotations

import dataclasses

import pytest

from lm_torch.config import (
    CacheConfig,
    CudaConfig,
    KernelConfig,
    ModelConfig,
    RuntimeConfig,
    SchedulerConfig,
    TorchEngineConfig,
    engine_options,
)


def test_flat_and_nested_construction_agree():
    flat = TorchEngineConfig(session_len=4096, cache_max_entry_count=0.5, block_size=32, eager_mode=True)
    nested = TorchEngineConfig(
        scheduler=SchedulerConfig(session_len=4096),
        cache=CacheConfig(cache_max_entry_count=0.5, block_size=32),
        cuda=CudaConfig(eager_mode=True),
    )
    assert flat == nested
    assert flat.cache.block_size == 32 and flat.scheduler.session_len == 4096 and flat.cuda.eager_mode is True
    # Flat keywords replace fields of a given sub-config.
    mixed = TorchEngineConfig(cache=CacheConfig(block_size=32), quant_policy=8)
    assert (mixed.cache.block_size, mixed.cache.quant_policy) == (32, 8)


def test_flat_keywords_land_in_their_sections():
    config = TorchEngineConfig(max_batch_size=7, num_threads=3, dtype="float16", num_kv_blocks=9)
    assert (config.scheduler.max_batch_size, config.runtime.num_threads) == (7, 3)
    assert (config.model.dtype, config.cache.num_kv_blocks) == ("float16", 9)
    assert config.to_flat_dict()["num_kv_blocks"] == 9 and not hasattr(config, "num_kv_blocks")


def test_configs_are_frozen():
    config = TorchEngineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache = CacheConfig()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.block_size = 8  # type: ignore[misc]
    assert config.with_overrides(block_size=8).cache.block_size == 8 and config.cache.block_size == 16


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CacheConfig(block_size=0), "CacheConfig.block_size must be an integer >= 1"),
        (lambda: CacheConfig(cache_max_entry_count=1.5), "CacheConfig.cache_max_entry_count must be in"),
        (lambda: CacheConfig(quant_policy=3), "CacheConfig.quant_policy must be 0"),
        (lambda: CacheConfig(quant_policy=True), "CacheConfig.quant_policy"),
        (lambda: CacheConfig(kv_cache_gb=0), "CacheConfig.kv_cache_gb"),
        (lambda: SchedulerConfig(session_len=1), "SchedulerConfig.session_len must be an integer >= 2"),
        (lambda: SchedulerConfig(prefill_interval=-1), "SchedulerConfig.prefill_interval"),
        (lambda: SchedulerConfig(max_batch_size=True), "SchedulerConfig.max_batch_size"),
        (lambda: CudaConfig(cuda_graph_sizes=[]), "CudaConfig.cuda_graph_sizes"),
        (lambda: CudaConfig(overlap_steps="yes"), "CudaConfig.overlap_steps"),
        (lambda: ModelConfig(dtype="int8"), "ModelConfig.dtype must be one of"),
        (lambda: ModelConfig(device="tpu"), "ModelConfig.device"),
        (lambda: KernelConfig(decode_splits="3"), "KernelConfig.decode_splits must be 'S:T'"),
        (lambda: KernelConfig(pdl=1), "KernelConfig.pdl"),
        (lambda: RuntimeConfig(grammar_compile_timeout=0), "RuntimeConfig.grammar_compile_timeout"),
        (lambda: RuntimeConfig(num_threads=0), "RuntimeConfig.num_threads"),
        (lambda: TorchEngineConfig(cuda_graph_sizes=[1, 200]), "TorchEngineConfig.cuda_graph_sizes"),
        (lambda: TorchEngineConfig(nosuch=1, other=2), "no field.*nosuch, other"),
        (lambda: TorchEngineConfig(cache=SchedulerConfig()), "TorchEngineConfig.cache must be a CacheConfig"),
    ],
)
def test_bad_values_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_from_any_takes_flat_and_nested_dicts():
    assert TorchEngineConfig.from_any(None) == TorchEngineConfig()
    config = TorchEngineConfig(block_size=32)
    assert TorchEngineConfig.from_any(config) is config
    nested = TorchEngineConfig.from_any({"cache": {"block_size": 32}, "max_batch_size": 4})
    assert (nested.cache.block_size, nested.scheduler.max_batch_size) == (32, 4)
    assert TorchEngineConfig.from_any({"cache": CacheConfig(block_size=64)}).cache.block_size == 64
    with pytest.raises(ValueError, match=r"no field\(s\) cache\.nosuch, nosuch"):
        TorchEngineConfig.from_any({"nosuch": 1, "cache": {"nosuch": 2}})
    with pytest.raises(ValueError, match="must be a TorchEngineConfig or a dict"):
        TorchEngineConfig.from_any([1])


def test_declared_options_are_fields_with_their_flags():
    options = {spec.name: spec for spec in engine_options()}
    assert options["block_size"].flags == ("--cache-block-seq-len", "--block-size")
    assert options["enable_prefix_caching"].off_flags == ("--disable-prefix-caching",)
    assert options["quant_policy"].choices == (0, 4, 8)
    assert options["cuda_graph_sizes"].kind == "int_list"
    flat = TorchEngineConfig().to_flat_dict()
    assert set(options) <= set(flat)
