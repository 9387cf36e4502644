"""`TorchEngineConfig`: how the PyTorch engine loads a model, plans its memory, schedules and launches kernels.

The config is composed of frozen sub-configs, each validating its own fields: `ModelConfig`, `CacheConfig`,
`SchedulerConfig`, `CudaConfig`, `KernelConfig`, `RuntimeConfig` and `ParallelConfig`. Fields that a command line
may set carry an `OptionSpec` in their dataclass metadata; `engine_options()` lists them, and lm-core builds the
`lm chat` and `lm serve` flags from that list. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lm_torch import envs
from lm_torch.envs import DecodeSplits

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "safetensors", "bin", "dummy")
QUANT_POLICIES = (0, 4, 8)
QUANTIZATIONS = ("fp8",)  # weight quantization applied at load to a floating-point checkpoint


@dataclass(frozen=True)
class OptionSpec:
    """How one config field appears on a command line (read by lm-core, which turns it into a click option).

    kind: "str" (with `choices`), "int", "float", "bool" (a flag pair `flags` / `off_flags`, or one `flags` that
    sets True), or "int_list" (several values after one flag). `minimum` / `maximum` bound numbers (`min_open`:
    the minimum itself is refused). `choices` of an int field are offered as strings and converted back.
    """

    flags: tuple[str, ...]
    help: str
    kind: str = "str"
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    min_open: bool = False
    off_flags: tuple[str, ...] = ()
    name: str = ""  # the config field; filled in by `engine_options()`


def _option(default: Any = dataclasses.MISSING, *, option: OptionSpec | None = None, **kwargs: Any) -> Any:
    """A dataclass field with an optional command-line `OptionSpec` in its metadata."""
    metadata = {"option": option} if option is not None else {}
    return field(default=default, metadata=metadata, **kwargs)


def _fail(owner: str, name: str, requirement: str, value: Any) -> None:
    raise ValueError(f"{owner}.{name} must be {requirement}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(config: Any, name: str, minimum: int, optional: bool = False) -> None:
    value = getattr(config, name)
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        suffix = " or None" if optional else ""
        _fail(type(config).__name__, name, f"an integer >= {minimum}{suffix}", value)


def _check_bool(config: Any, name: str, optional: bool = False) -> None:
    value = getattr(config, name)
    if not (isinstance(value, bool) or (optional and value is None)):
        _fail(type(config).__name__, name, "True, False or None" if optional else "True or False", value)


def _check_choice(config: Any, name: str, allowed: tuple[Any, ...]) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or value not in allowed:
        _fail(type(config).__name__, name, f"one of {', '.join(map(str, allowed))}", value)


@dataclass(frozen=True)
class ModelConfig:
    """What model is built and how: dtype, device, weight format, seed of dummy weights, custom classes."""

    # auto: the checkpoint's dtype on CUDA, float32 on CPU
    dtype: str = _option("auto", option=OptionSpec(("--dtype",), "Weights and compute dtype.", choices=DTYPES))
    # auto: CUDA if present, else CPU
    device: str = _option("auto", option=OptionSpec(("--device",), "Where the engine runs.", choices=DEVICES))
    load_format: str = "auto"  # dummy: random weights from config.json alone (benchmarks)
    # fp8: quantize a floating-point checkpoint's decoder linears at load to 128x128 float8 blocks (`layers.quant.fp8`)
    quantization: str | None = _option(
        None,
        option=OptionSpec(
            ("--quantization",), "Quantize the weights at load (fp8: 128x128 blocks).", choices=QUANTIZATIONS
        ),
    )
    seed: int = 0  # for dummy weights and unseeded sampling
    # architecture name -> model class or "package.module:Class"
    custom_module_map: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice(self, "dtype", DTYPES)
        _check_choice(self, "device", DEVICES)
        _check_choice(self, "load_format", LOAD_FORMATS)
        if self.quantization is not None:
            _check_choice(self, "quantization", QUANTIZATIONS)
        if not _is_int(self.seed):
            _fail("ModelConfig", "seed", "an integer", self.seed)
        if not isinstance(self.custom_module_map, Mapping):
            _fail("ModelConfig", "custom_module_map", "a mapping of architecture names", self.custom_module_map)


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size, how much memory it takes, online quantization, prefix caching.

    Size: `num_kv_blocks` if given, else `kv_cache_gb` exactly, else `cache_max_entry_count` of the memory free after
    the weights (on CPU: of the available RAM, capped by `cpu_kv_cache_gb`). With none of them set, CUDA takes 0.8 of
    the free memory and the CPU a fixed number of tokens (`memory.cpu_default_kv_tokens`: one full session, at least
    8192 tokens), so its size does not depend on what else the machine holds. On CUDA the cache always leaves free the
    activation reserve measured at start-up (see `lm_torch.memory`).
    """

    block_size: int = _option(
        16,
        option=OptionSpec(("--cache-block-seq-len", "--block-size"), "Tokens per KV-cache block.", "int", minimum=1),
    )
    cache_max_entry_count: float | None = _option(
        None,
        option=OptionSpec(
            ("--cache-max-entry-count",),
            "Fraction of free memory the KV cache takes.",
            "float",
            minimum=0,
            maximum=1,
            min_open=True,
        ),
    )
    kv_cache_gb: float | None = None
    num_kv_blocks: int | None = _option(
        None, option=OptionSpec(("--num-kv-blocks",), "Exact number of KV-cache blocks.", "int", minimum=1)
    )
    cpu_kv_cache_gb: float = 4.0
    # Online KV-cache quantization, as in LMDeploy: 0 off, 8 int8, 4 int4 (asymmetric, a scale and a zero per token
    # and KV head; see `lm_torch.kv_quant`).
    quant_policy: int = _option(
        0,
        option=OptionSpec(
            ("--quant-policy",), "KV cache quantized online: 0 off, 8 int8, 4 int4.", "int", choices=QUANT_POLICIES
        ),
    )
    enable_prefix_caching: bool = _option(
        True,
        option=OptionSpec(
            ("--enable-prefix-caching",),
            "Reuse the KV blocks of prompts that share a prefix (default: on).",
            "bool",
            off_flags=("--disable-prefix-caching",),
        ),
    )
    # Vision-language models: vision-tower outputs kept by image content (rows, i.e. placeholder tokens), so that a
    # repeated image (a second turn, a preempted request) does not run the tower again. 0 keeps none.
    encoder_cache_tokens: int = _option(
        16384,
        option=OptionSpec(
            ("--encoder-cache-tokens",),
            "Vision-tower outputs kept for repeated images, in placeholder tokens (0: none).",
            "int",
            minimum=0,
        ),
    )

    def __post_init__(self) -> None:
        _check_int(self, "block_size", 1)
        _check_int(self, "encoder_cache_tokens", 0)
        value = self.cache_max_entry_count
        if value is not None and (not _is_number(value) or not 0 < value <= 1):
            _fail("CacheConfig", "cache_max_entry_count", "in (0, 1] or None", value)
        if self.kv_cache_gb is not None and (not _is_number(self.kv_cache_gb) or self.kv_cache_gb <= 0):
            _fail("CacheConfig", "kv_cache_gb", "a positive number or None", self.kv_cache_gb)
        _check_int(self, "num_kv_blocks", 1, optional=True)
        if not _is_number(self.cpu_kv_cache_gb) or self.cpu_kv_cache_gb <= 0:
            _fail("CacheConfig", "cpu_kv_cache_gb", "a positive number", self.cpu_kv_cache_gb)
        if isinstance(self.quant_policy, bool) or self.quant_policy not in QUANT_POLICIES:
            _fail("CacheConfig", "quant_policy", "0 (off), 4 (int4) or 8 (int8)", self.quant_policy)
        _check_bool(self, "enable_prefix_caching")


@dataclass(frozen=True)
class SchedulerConfig:
    """How many sequences and tokens one step takes, and how long a session may grow."""

    max_batch_size: int = _option(
        128, option=OptionSpec(("--max-batch-size",), "Most sequences decoded together.", "int", minimum=1)
    )
    # The token budget of one step (prefill chunks and decodes together).
    max_prefill_token_num: int = _option(
        4096, option=OptionSpec(("--max-prefill-token-num",), "Token budget of one engine step.", "int", minimum=1)
    )
    # Vision-language models: the most image placeholder tokens whose spans one step computes (the vision tower's
    # work per step); None: the token budget bounds it. A step's first image always goes, whatever its size.
    max_encoder_tokens: int | None = _option(
        None,
        option=OptionSpec(
            ("--max-encoder-tokens",),
            "Vision-language models: image placeholder tokens encoded per step at most (default: the token budget).",
            "int",
            minimum=1,
        ),
    )
    # CUDA: while at least half of max_batch_size sequences decode, new prompts gather for up to this many steps (or
    # half the token budget) and are prefilled together: fewer eager steps. 0: admit at once. CPU: always 0.
    prefill_interval: int = 8
    # None: the model's max_position_embeddings.
    session_len: int | None = _option(
        None,
        option=OptionSpec(
            ("--session-len",),
            "Longest prompt + generation in tokens (default and limit: the model's context length).",
            "int",
            minimum=2,
        ),
    )

    def __post_init__(self) -> None:
        _check_int(self, "max_batch_size", 1)
        _check_int(self, "max_prefill_token_num", 1)
        _check_int(self, "prefill_interval", 0)
        _check_int(self, "session_len", 2, optional=True)
        _check_int(self, "max_encoder_tokens", 1, optional=True)


@dataclass(frozen=True)
class CudaConfig:
    """CUDA graphs and overlapped steps (ignored on the CPU)."""

    eager_mode: bool = _option(
        False, option=OptionSpec(("--eager-mode",), "CUDA: no CUDA graphs.", "bool")
    )  # decode steps launch their kernels one by one
    # The decode batch sizes that get a graph (each at most max_batch_size; a batch replays the smallest one that
    # holds it, larger batches run eagerly). None: 1, 2, 4, 8, every 8 to 64, every 16 beyond, max_batch_size.
    cuda_graph_sizes: tuple[int, ...] | None = _option(
        None,
        option=OptionSpec(
            ("--cuda-graph-sizes",),
            "CUDA: decode batch sizes captured as graphs (several: --cuda-graph-sizes 1 2 4 8); larger batches run "
            "eagerly (default: 1, 2, 4, 8, every 8 to 64, every 16 beyond).",
            "int_list",
            minimum=1,
        ),
    )
    # Schedule and launch step N + 1 before step N's tokens are back, for requests whose next step does not depend on
    # them (no grammar, penalties, bad words). None: on with CUDA and triton, off on the CPU (where a step's host work
    # is a small part of it).
    overlap_steps: bool | None = None

    def __post_init__(self) -> None:
        _check_bool(self, "eager_mode")
        sizes = self.cuda_graph_sizes
        if sizes is not None:
            if not isinstance(sizes, (list, tuple)) or not sizes or any(not _is_int(v) or v < 1 for v in sizes):
                _fail("CudaConfig", "cuda_graph_sizes", "a non-empty list of batch sizes >= 1", sizes)
            object.__setattr__(self, "cuda_graph_sizes", tuple(sizes))
        _check_bool(self, "overlap_steps", optional=True)


@dataclass(frozen=True)
class KernelConfig:
    """Switches and tuning tables of the Triton kernels (the `LM_TORCH_*` variables of `lm_torch.envs`).

    A table field is None for the table shipped beside its kernel, "none" for no table, or a JSON path (which must
    exist). `KernelConfig()` is the defaults; `KernelConfig.from_env()` takes the variables that are set.
    """

    zero_padding: bool = True  # zero the padding rows of a step's inputs
    pdl: bool = True  # programmatic dependent launch on sm_90+ GPUs
    decode_tuning: str | None = None
    gemm_tuning: str | None = None
    w4a16_tuning: str | None = None
    decode_splits: DecodeSplits | None = None  # forced split plan of the CUDA-graph buckets

    def __post_init__(self) -> None:
        _check_bool(self, "zero_padding")
        _check_bool(self, "pdl")
        for name in ("decode_tuning", "gemm_tuning", "w4a16_tuning"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail("KernelConfig", name, "a JSON path, 'none' or None", value)
        if isinstance(self.decode_splits, str):
            object.__setattr__(self, "decode_splits", DecodeSplits.parse(self.decode_splits))
        if self.decode_splits is not None and not isinstance(self.decode_splits, DecodeSplits):
            _fail("KernelConfig", "decode_splits", "'S:T', a DecodeSplits or None", self.decode_splits)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **explicit: Any) -> KernelConfig:
        """The `LM_TORCH_*` variables that are set (read now, once), with `explicit` fields winning over them."""
        return cls(**{**envs.read_all(environ), **explicit})


@dataclass(frozen=True)
class RuntimeConfig:
    """Process-level settings: the garbage collector, CPU threads, grammar compile time."""

    # Once started, freeze the heap built so far (weights, modules, imports: never garbage) and raise the collector's
    # first threshold, so that no full collection walks that heap mid-step. Process-wide; undone when the last engine
    # that did it closes. See `lm_torch.gc_tuning`.
    gc_tuning: bool = True
    # CPU threads for torch. None: chosen while running (`lm_torch.cpu_threads`): each step runs on the count that was
    # fastest when last compared, up to torch's default (one per core), fewer when other work holds cores.
    num_threads: int | None = _option(
        None, option=OptionSpec(("--num-threads",), "CPU threads for torch.", "int", minimum=1)
    )
    # Seconds one response_format may take to compile before its requests fail (the compile cannot be stopped: it
    # finishes on its thread and its grammar is cached; see `lm_torch.guided.pool`).
    grammar_compile_timeout: float = _option(
        5.0,
        option=OptionSpec(
            ("--grammar-compile-timeout",),
            "Seconds a response_format's grammar may take to compile; a slower one fails that request (400).",
            "float",
            minimum=0,
            min_open=True,
        ),
    )

    def __post_init__(self) -> None:
        _check_bool(self, "gc_tuning")
        _check_int(self, "num_threads", 1, optional=True)
        timeout = self.grammar_compile_timeout
        if not _is_number(timeout) or not 0 < timeout < float("inf"):
            _fail("RuntimeConfig", "grammar_compile_timeout", "a positive number", timeout)


EXECUTOR_BACKENDS = ("uni", "mp", "ray")
DIST_BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes and devices run the model: tensor parallelism (`tp` ranks, each holding a shard of every
    layer), data parallelism (`dp` replicas behind one endpoint), and the nodes they span.

    `distributed_executor_backend`: "uni" runs the model in the engine's process (tp 1 only), "mp" in one worker
    process per rank of this node (the default when tp > 1), "ray" in Ray actors placed by a placement group.
    Several nodes without Ray: the same command on each, with `nnodes`, `node_rank` and `dist_init_addr` (rank 0's
    node, host:port; `master_addr` / `master_port` are vLLM's and torchrun's names for it); node 0 serves.
    `devices`: the CUDA devices of this node's ranks, in rank order (default 0, 1, ...); one device may be named
    twice only with `dist_backend` "gloo" (the one-GPU test mode). `dist_timeout`: seconds any rank may be waited
    for (joining, or a step's collective) before the group fails naming it.
    """

    tp: int = _option(
        1,
        option=OptionSpec(
            ("--tp", "--tensor-parallel-size"),
            "Tensor-parallel ranks (GPUs or CPU processes) per replica.",
            "int",
            minimum=1,
        ),
    )
    dp: int = _option(
        1,
        option=OptionSpec(
            ("--dp", "--data-parallel-size"),
            "Engine replicas behind one endpoint (each with --tp ranks).",
            "int",
            minimum=1,
        ),
    )
    nnodes: int = _option(1, option=OptionSpec(("--nnodes",), "Nodes the ranks span.", "int", minimum=1))
    node_rank: int = _option(
        0,
        option=OptionSpec(
            ("--node-rank",), "This node's index (0 serves; the others run ranks only).", "int", minimum=0
        ),
    )
    dist_init_addr: str | None = _option(
        None,
        option=OptionSpec(
            ("--dist-init-addr",), "host:port of node 0 where the ranks meet (default: a free local port).", "str"
        ),
    )
    master_addr: str | None = _option(
        None, option=OptionSpec(("--master-addr",), "Node 0's address (with --master-port: --dist-init-addr).")
    )
    master_port: int | None = _option(
        None,
        option=OptionSpec(("--master-port",), "Node 0's port (with --master-addr).", "int", minimum=1, maximum=65535),
    )
    distributed_executor_backend: str | None = _option(
        None,
        option=OptionSpec(
            ("--distributed-executor-backend",),
            "Where the ranks run: uni (this process, tp 1), mp (worker processes), ray (Ray actors).",
            choices=EXECUTOR_BACKENDS,
        ),
    )
    devices: tuple[int, ...] | None = _option(
        None,
        option=OptionSpec(
            ("--devices",),
            "CUDA devices of this node's ranks, in order (several: --devices 0 1).",
            "int_list",
            minimum=0,
        ),
    )
    dist_backend: str | None = _option(
        None,
        option=OptionSpec(
            ("--dist-backend",),
            "Collectives: nccl (CUDA default) or gloo (CPU; on CUDA, ranks may share a GPU).",
            choices=DIST_BACKENDS,
        ),
    )
    dist_timeout: float = _option(
        600.0,
        option=OptionSpec(
            ("--dist-timeout",),
            "Seconds a rank may be waited for before the group fails.",
            "float",
            minimum=0,
            min_open=True,
        ),
    )

    def __post_init__(self) -> None:
        for name in ("tp", "dp", "nnodes"):
            _check_int(self, name, 1)
        _check_int(self, "node_rank", 0)
        if self.node_rank >= self.nnodes:
            _fail("ParallelConfig", "node_rank", f"below nnodes ({self.nnodes})", self.node_rank)
        for name in ("dist_init_addr", "master_addr"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail("ParallelConfig", name, "a non-empty string or None", value)
        _check_int(self, "master_port", 1, optional=True)
        if self.master_port is not None and self.master_port > 65535:
            _fail("ParallelConfig", "master_port", "a port number (1-65535)", self.master_port)
        if self.dist_init_addr is None and self.master_addr is not None:
            object.__setattr__(self, "dist_init_addr", f"{self.master_addr}:{self.master_port or 29500}")
        if self.dist_init_addr is not None:
            host, sep, port = self.dist_init_addr.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                _fail("ParallelConfig", "dist_init_addr", "'host:port'", self.dist_init_addr)
        if self.distributed_executor_backend is not None:
            _check_choice(self, "distributed_executor_backend", EXECUTOR_BACKENDS)
        if self.dist_backend is not None:
            _check_choice(self, "dist_backend", DIST_BACKENDS)
        devices = self.devices
        if devices is not None:
            if not isinstance(devices, (list, tuple)) or not devices or any(not _is_int(d) or d < 0 for d in devices):
                _fail("ParallelConfig", "devices", "a non-empty list of CUDA device indices", devices)
            object.__setattr__(self, "devices", tuple(devices))
        if not _is_number(self.dist_timeout) or not 0 < self.dist_timeout < float("inf"):
            _fail("ParallelConfig", "dist_timeout", "a positive number of seconds", self.dist_timeout)
        if self.nnodes > 1 and self.dist_init_addr is None:
            _fail("ParallelConfig", "dist_init_addr", "node 0's host:port when nnodes > 1", None)
        if self.tp % self.nnodes:
            _fail(
                "ParallelConfig",
                "tp",
                f"a multiple of nnodes ({self.nnodes}): each node runs tp / nnodes ranks",
                self.tp,
            )
        if self.executor == "uni" and self.tp > 1:
            _fail(
                "ParallelConfig",
                "distributed_executor_backend",
                "mp or ray when tp > 1 ('uni' is one process)",
                self.distributed_executor_backend,
            )

    @property
    def executor(self) -> str:
        """The executor backend: as set, else uni for one rank on one node and mp otherwise."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.tp == 1 and self.nnodes == 1 else "mp"

    @property
    def ranks_per_node(self) -> int:
        """Tensor-parallel ranks each node runs."""
        return self.tp // self.nnodes


# The sub-configs of `TorchEngineConfig`, by the attribute that holds each.
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "cuda": CudaConfig,
    "kernels": KernelConfig,
    "runtime": RuntimeConfig,
    "parallel": ParallelConfig,
}
# Flat field name -> the section that holds it (field names are unique across sections).
FIELD_SECTIONS: dict[str, str] = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True, init=False)
class TorchEngineConfig:
    """Engine settings, named as in LMDeploy's PytorchEngineConfig where the concept is the same.

    Built from sub-configs (`TorchEngineConfig(cache=CacheConfig(block_size=32))`), from flat keywords as LMDeploy's
    config takes them (`TorchEngineConfig(session_len=4096, cache_max_entry_count=0.5)`), or both (flat keywords
    then replace fields of the given sub-configs). Without `kernels`, the kernel settings come from the `LM_TORCH_*`
    variables, read here once (`KernelConfig.from_env`), with flat kernel keywords winning over them.
    """

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    cuda: CudaConfig
    kernels: KernelConfig
    runtime: RuntimeConfig
    parallel: ParallelConfig

    def __init__(
        self,
        *,
        model: ModelConfig | None = None,
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        cuda: CudaConfig | None = None,
        kernels: KernelConfig | None = None,
        runtime: RuntimeConfig | None = None,
        parallel: ParallelConfig | None = None,
        **flat: Any,
    ) -> None:
        unknown = sorted(set(flat) - set(FIELD_SECTIONS))
        if unknown:
            raise ValueError(f"TorchEngineConfig has no field(s) {', '.join(unknown)}")
        given = {
            "model": model,
            "cache": cache,
            "scheduler": scheduler,
            "cuda": cuda,
            "runtime": runtime,
            "parallel": parallel,
        }
        for section, cls in SECTIONS.items():
            updates = {name: value for name, value in flat.items() if FIELD_SECTIONS[name] == section}
            current = kernels if section == "kernels" else given[section]
            if current is not None and not isinstance(current, cls):
                raise ValueError(f"TorchEngineConfig.{section} must be a {cls.__name__}, got {type(current).__name__}")
            if current is None:
                built = KernelConfig.from_env(**updates) if section == "kernels" else cls(**updates)
            else:
                built = dataclasses.replace(current, **updates) if updates else current
            object.__setattr__(self, section, built)
        self._check_across_sections()

    def _check_across_sections(self) -> None:
        sizes = self.cuda.cuda_graph_sizes
        if sizes is not None and max(sizes) > self.scheduler.max_batch_size:
            raise ValueError(
                "TorchEngineConfig.cuda_graph_sizes must be batch sizes from 1 to max_batch_size "
                f"({self.scheduler.max_batch_size}), got {list(sizes)!r}"
            )

    @classmethod
    def from_any(cls, config: Any) -> TorchEngineConfig:
        """Accept None, a TorchEngineConfig or a dict (the pipeline's `backend_config`), flat or nested by section.

        A nested dict names sections (`{"cache": {"block_size": 32}}` or `{"cache": CacheConfig(...)}`); flat names
        may sit beside them. Unknown names are a ValueError listing them.
        """
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"backend_config must be a TorchEngineConfig or a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(FIELD_SECTIONS) - set(SECTIONS))
        sections: dict[str, Any] = {}
        flat: dict[str, Any] = {}
        for name, value in config.items():
            if name in SECTIONS:
                if isinstance(value, Mapping):
                    bad = sorted(set(value) - {f.name for f in fields(SECTIONS[name])})
                    unknown += [f"{name}.{b}" for b in bad]
                    flat.update(value)  # applied to the section, after any flat name of the same field
                else:
                    sections[name] = value
            elif name in FIELD_SECTIONS:
                flat.setdefault(name, value)
        if unknown:
            raise ValueError(f"TorchEngineConfig has no field(s) {', '.join(sorted(unknown))}")
        return cls(**sections, **flat)

    def with_overrides(self, **flat: Any) -> TorchEngineConfig:
        """A copy with the named fields (flat names) replaced, each sub-config validated again."""
        return TorchEngineConfig(
            model=self.model,
            cache=self.cache,
            scheduler=self.scheduler,
            cuda=self.cuda,
            kernels=self.kernels,
            runtime=self.runtime,
            parallel=self.parallel,
            **flat,
        )

    def to_flat_dict(self) -> dict[str, Any]:
        """Every field by its flat name."""
        return {name: getattr(getattr(self, section), name) for name, section in FIELD_SECTIONS.items()}


def engine_options() -> list[OptionSpec]:
    """The command-line options this engine declares, in section order, each with its field `name` filled in."""
    return list(_iter_options())


def _iter_options() -> Iterator[OptionSpec]:
    for cls in SECTIONS.values():
        for f in fields(cls):
            spec = f.metadata.get("option")
            if spec is not None:
                yield dataclasses.replace(spec, name=f.name)
