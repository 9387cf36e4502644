"""The engine's garbage-collector tuning (`lm_torch.gc_tuning`): what it changes in the interpreter, and undoes."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from lm_torch import gc_tuning

transformers = pytest.importorskip("transformers")


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def _cycle_is_collected() -> bool:
    ref = weakref.ref(_Node())
    gc.collect()
    return ref() is None


def test_tune_and_release_nest_and_restore_the_interpreter(monkeypatch):
    # Isolated from engines other tests keep alive in this process: a fresh holder count, the thresholds put back.
    monkeypatch.setattr(gc_tuning, "_holders", 0)
    monkeypatch.setattr(gc_tuning, "_saved_threshold", None)
    original = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        gc_tuning.tune()
        assert gc.get_freeze_count() > 0  # the heap built so far is frozen
        assert gc.get_threshold() == (gc_tuning.GC_GEN0_THRESHOLD, 10, 10)
        assert _cycle_is_collected()  # cycles made after the freeze are still collected
        gc_tuning.tune()
        gc_tuning.release()
        assert gc.get_threshold()[0] == gc_tuning.GC_GEN0_THRESHOLD  # one holder left: still tuned
        assert gc.get_freeze_count() > 0
        gc_tuning.release()
        assert gc.get_threshold() == (700, 10, 10)
        assert gc.get_freeze_count() == 0
        gc_tuning.release()  # an extra release is harmless
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(50_000, 10, 10)  # a higher threshold set by the user is kept
        gc_tuning.tune()
        assert gc.get_threshold()[0] == 50_000
        gc_tuning.release()
    finally:
        gc.set_threshold(*original)


def _tiny_llama(path):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    return path


def test_an_engine_holds_the_tuning_from_start_up_to_close(tmp_path):
    from lm_torch.engine import TorchEngine

    model = _tiny_llama(tmp_path)
    before = gc_tuning.holders()  # engines of other tests may be alive in this process
    engine = TorchEngine.from_pretrained(model, {"load_format": "dummy", "device": "cpu"})
    assert gc_tuning.holders() == before + 1
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] >= gc_tuning.GC_GEN0_THRESHOLD
    untuned = TorchEngine.from_pretrained(model, {"load_format": "dummy", "device": "cpu", "gc_tuning": False})
    assert gc_tuning.holders() == before + 1
    asyncio.run(untuned.close())
    assert gc_tuning.holders() == before + 1
    asyncio.run(engine.close())
    asyncio.run(engine.close())  # closing twice releases once
    assert gc_tuning.holders() == before
    with pytest.raises(ValueError, match="gc_tuning"):
        TorchEngine.from_pretrained(model, {"load_format": "dummy", "gc_tuning": "yes"})
