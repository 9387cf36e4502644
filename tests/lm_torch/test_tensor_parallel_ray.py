"""Tensor parallelism over a Ray cluster of two nodes on this machine (`ray start --head`, then a second node that
joins it), one CPU each: the placement group puts one rank on each node, and the outputs equal the one-process
engine's. Needs Ray (`lm-torch[ray]`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline

pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")


def _ray(*args: str) -> subprocess.CompletedProcess:
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node on loopback, one CPU each; `ray stop` at the end."""
    from lm_torch.distributed.executor import free_port

    port = free_port()
    # Ray's socket paths live under its temp dir and must fit AF_UNIX's 107 bytes: not under pytest's long tmp paths.
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    head = _ray(
        "start",
        "--head",
        "--port",
        str(port),
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
        "--include-dashboard",
        "false",
        "--temp-dir",
        str(temp),
        "--node-ip-address",
        "127.0.0.1",
    )
    assert head.returncode == 0, head.stdout + head.stderr
    address = f"127.0.0.1:{port}"
    try:
        second = _ray(
            "start", "--address", address, "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1"
        )
        assert second.returncode == 0, second.stdout + second.stderr
        yield address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _ray("stop", "--force")
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, default_model_dir, tiny_models) -> Path:
    """A random 2-layer Llama over the default model's tokenizer (`tiny_models.make_engine_llama`)."""
    return tiny_models.make_engine_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir, 512)


def _pipe(model: Path, **config) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model, {"block_size": 16, "num_kv_blocks": 256, **config})
    return Pipeline(AsyncPipeline(engine, model))


def test_two_ray_nodes_give_the_tp1_outputs(cluster, tiny_model, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", cluster)
    rng = torch.Generator().manual_seed(9)
    prompts = [torch.randint(100, 40000, (int(n),), generator=rng).tolist() for n in (7, 23, 41)]
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    with _pipe(tiny_model) as single:
        reference = [r.token_ids for r in single(prompts, cfg)]
    with _pipe(tiny_model, tp=2, distributed_executor_backend="ray") as split:
        summary = split.async_pipeline.engine.executor.summary()
        assert [r.token_ids for r in split(prompts, cfg)] == reference
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(nodes) == 2
    assert "Ray ranks rank 0:" in summary and "rank 1:" in summary
    assert os.environ["RAY_ADDRESS"] == cluster
