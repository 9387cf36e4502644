"""What the tensor-parallel tests run in their rank processes.

Spawned processes import their target by module name, and the tests are imported by path (pytest's importlib
mode): so the tests put this folder on `sys.path` (which spawned processes inherit) and hand the ranks functions of
this module. `run_ranks(size, jobs)` starts `size` gloo ranks; each builds every job's model split `size` ways from
its checkpoint and runs the paged forward pass of `test_model_families`; rank 0's logits come back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import test_model_families as families
import torch
import torch.multiprocessing


def model_logits(path: Path, hf_config, engine: dict, tp=None, device: str = "cpu") -> torch.Tensor:
    """Logits [SEQ_LEN, vocab] of `families._paged_logits` for the checkpoint at `path` (split by `tp`), through a
    quantized KV cache when `engine` sets `quant_policy`; on CUDA through the Triton backend and kernels."""
    from lm_torch.attention import TorchAttentionBackend, TritonAttentionBackend
    from lm_torch.config import TorchEngineConfig
    from lm_torch.distributed.group import SINGLE
    from lm_torch.kv_quant import allocate_kv_cache
    from lm_torch.loader import build_model, load_hf_config

    config = TorchEngineConfig(**engine)
    hf = hf_config if hf_config is not None else load_hf_config(path)
    backend = TritonAttentionBackend() if device.startswith("cuda") else TorchAttentionBackend()
    model = build_model(path, config, hf, torch.device(device), torch.float32, backend, tp=tp or SINGLE)
    policy = config.cache.quant_policy
    if not policy:
        return families._paged_logits(model, families._tokens(seed=1))

    def quantized_cache(m):
        return [
            allocate_kv_cache(
                families.NUM_BLOCKS, families.BLOCK_SIZE, h, d, policy, torch.float32, torch.device("cpu")
            )
            for h, d in m.kv_cache_shape()
        ]

    original, families._paged_cache = families._paged_cache, quantized_cache
    try:
        return families._paged_logits(model, families._tokens(seed=1))
    finally:
        families._paged_cache = original


def _rank_main(rank: int, size: int, addr: str, jobs: list, out: Path, device: str) -> None:
    from lm_torch.distributed import init_tp_group
    from lm_torch.distributed.group import destroy_tp_group

    torch.set_num_threads(1)
    tp = init_tp_group(rank, size, addr, torch.device(device), "gloo", timeout_s=120)
    try:
        results = {name: model_logits(path, hf_config, engine, tp, device) for name, path, hf_config, engine in jobs}
        if rank == 0:
            torch.save(results, out)
        # Every rank leaves the group together: a rank exiting while another's gloo threads still talk to it can
        # abort that one ("terminate called without an active exception").
        tp.barrier()
    finally:
        destroy_tp_group(tp)


def run_ranks(size: int, jobs: list[tuple[str, Path, object, dict]], device: str = "cpu") -> dict[str, torch.Tensor]:
    """{job name: rank 0's logits} of `jobs` ((name, checkpoint, hf_config or None, engine config dict)) at tp
    `size`, every rank on `device` (on CUDA: gloo over CUDA tensors, all ranks sharing the GPU); a rank's exception
    fails the call with its traceback."""
    from lm_torch.distributed.executor import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.pt"
        addr = f"127.0.0.1:{free_port()}"
        torch.multiprocessing.start_processes(
            _rank_main, args=(size, addr, jobs, out, device), nprocs=size, join=True, start_method="spawn"
        )
        return torch.load(out, map_location="cpu")
