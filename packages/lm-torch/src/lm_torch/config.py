"""`TorchEngineConfig`: how the PyTorch engine loads a model and plans its memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "safetensors", "bin", "dummy")


@dataclass
class TorchEngineConfig:
    """Engine settings, named as in LMDeploy's PytorchEngineConfig where the concept is the same.

    KV-cache size: `num_kv_blocks` if given, else `kv_cache_gb` exactly, else `cache_max_entry_count` of the memory
    free after the weights (on CPU: of the available RAM, capped by `cpu_kv_cache_gb`). With none of them set, CUDA
    takes 0.8 of the free memory and the CPU a fixed number of tokens (`memory.cpu_default_kv_tokens`: one full
    session, at least 8192 tokens), so its size does not depend on what else the machine holds. On CUDA the cache
    always leaves free the activation reserve measured at start-up (see `lm_torch.memory`).
    """

    dtype: str = "auto"  # auto: the checkpoint's dtype on CUDA, float32 on CPU
    device: str = "auto"  # auto: CUDA if present, else CPU
    load_format: str = "auto"  # dummy: random weights from config.json alone (benchmarks)
    block_size: int = 16
    session_len: int | None = None  # default: the model's max_position_embeddings
    max_batch_size: int = 128
    max_prefill_token_num: int = 4096  # token budget of one step (prefill chunks and decodes together)
    enable_prefix_caching: bool = True
    cache_max_entry_count: float | None = None  # None: 0.8 on CUDA; on the CPU the fixed default above
    kv_cache_gb: float | None = None
    num_kv_blocks: int | None = None
    cpu_kv_cache_gb: float = 4.0
    eager_mode: bool = False  # CUDA: no CUDA graphs (decode steps launch their kernels one by one)
    # CUDA: the decode batch sizes that get a graph (each at most max_batch_size; a batch replays the smallest one
    # that holds it, larger batches run eagerly). None: 1, 2, 4, 8, every 8 to 64, every 16 beyond, max_batch_size.
    cuda_graph_sizes: list[int] | None = None
    # CUDA: while at least half of max_batch_size sequences decode, new prompts gather for up to this many steps (or
    # half the token budget) and are prefilled together: fewer eager steps. 0: admit at once. CPU: always 0.
    prefill_interval: int = 8
    # Schedule and launch step N + 1 before step N's tokens are back (placeholders filled on the device), for
    # requests whose next step does not depend on them (no grammar, penalties, bad words). None: on with CUDA and
    # triton, off on the CPU (where a step's host work is a small part of it).
    overlap_steps: bool | None = None
    # Once started, freeze the heap built so far (gc.freeze: weights, modules, imports, never garbage) and raise the
    # collector's first threshold to GC_GEN0_THRESHOLD allocations: with CPython's defaults a full collection walks
    # that whole heap (stalls of up to 0.36 s on the H100; 0.74 s of a ShareGPT run) and the young ones run every few
    # hundred allocations. Process-wide; undone when the last engine that did it closes. See `lm_torch.gc_tuning`.
    gc_tuning: bool = True
    seed: int = 0  # for dummy weights and unseeded sampling
    custom_module_map: dict[str, Any] = field(default_factory=dict)  # architecture name -> model class or "mod:Cls"
    # CPU threads for torch. None: chosen while running (`lm_torch.cpu_threads`): each step runs on the count that
    # was fastest when last compared, up to torch's default (one per core), fewer when other work holds cores.
    num_threads: int | None = None
    # Online KV-cache quantization, as in LMDeploy: 0 off, 8 int8, 4 int4 (asymmetric, a scale and a zero per token
    # and KV head; see `lm_torch.kv_quant`).
    quant_policy: int = 0
    # Seconds one response_format may take to compile before its requests fail (the compile cannot be stopped: it
    # finishes on its thread and its grammar is cached; see `lm_torch.guided.pool`).
    grammar_compile_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name, allowed in (("dtype", DTYPES), ("device", DEVICES), ("load_format", LOAD_FORMATS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TorchEngineConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if (
            isinstance(self.prefill_interval, bool)
            or not isinstance(self.prefill_interval, int)
            or self.prefill_interval < 0
        ):
            raise ValueError(
                f"TorchEngineConfig.prefill_interval must be an integer >= 0, got {self.prefill_interval!r}"
            )
        for name in ("block_size", "max_batch_size", "max_prefill_token_num"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TorchEngineConfig.{name} must be a positive integer, got {value!r}")
        if self.session_len is not None and (not isinstance(self.session_len, int) or self.session_len < 2):
            raise ValueError(f"TorchEngineConfig.session_len must be an integer >= 2, got {self.session_len!r}")
        if self.cache_max_entry_count is not None and not 0 < self.cache_max_entry_count <= 1:
            raise ValueError(
                f"TorchEngineConfig.cache_max_entry_count must be in (0, 1], got {self.cache_max_entry_count!r}"
            )
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"TorchEngineConfig.kv_cache_gb must be positive, got {self.kv_cache_gb!r}")
        for name in ("eager_mode", "gc_tuning"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TorchEngineConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.overlap_steps is not None and not isinstance(self.overlap_steps, bool):
            raise ValueError(f"TorchEngineConfig.overlap_steps must be True, False or None, got {self.overlap_steps!r}")
        if isinstance(self.quant_policy, bool) or self.quant_policy not in (0, 4, 8):
            raise ValueError(
                f"TorchEngineConfig.quant_policy must be 0 (off), 4 (int4) or 8 (int8), got {self.quant_policy!r}"
            )
        if self.cuda_graph_sizes is not None:
            sizes = self.cuda_graph_sizes
            limit = self.max_batch_size
            if (
                not isinstance(sizes, (list, tuple))
                or not sizes
                or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit for v in sizes)
            ):
                raise ValueError(
                    "TorchEngineConfig.cuda_graph_sizes must be a non-empty list of batch sizes from 1 to "
                    f"max_batch_size ({self.max_batch_size}), got {sizes!r}"
                )
        timeout = self.grammar_compile_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"TorchEngineConfig.grammar_compile_timeout must be a positive number, got {timeout!r}")
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads < 1
        ):
            raise ValueError(f"TorchEngineConfig.num_threads must be an integer >= 1 or None, got {self.num_threads!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"TorchEngineConfig.num_kv_blocks must be positive, got {self.num_kv_blocks!r}")

    @classmethod
    def from_any(cls, config: Any) -> TorchEngineConfig:
        """Accept None, a TorchEngineConfig or a dict of its fields (the pipeline's `backend_config`)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            unknown = set(config) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"TorchEngineConfig has no field(s) {', '.join(sorted(unknown))}")
            return cls(**config)
        raise ValueError(f"backend_config must be a TorchEngineConfig or a dict, got {type(config).__name__}")
