"""The model runner's start-up: the attention backend, the memory profile, the KV cache, GEMM warm-up, CUDA-graph
capture, and the summary the engine prints (each phase timed in `runner.phases`)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch

from lm_torch.attention import AttentionBackend, TorchAttentionBackend, TritonAttentionBackend
from lm_torch.kv_quant import kv_dtype_name
from lm_torch.layers.attention import PagedAttention
from lm_torch.memory import MemoryPlan, free_memory, plan_kv_cache
from lm_torch.sampling import SamplingInputs
from lm_torch.scheduler import NewRequest, ScheduledBatch

if TYPE_CHECKING:
    from lm_torch.kernels.tuning import TuningTables
    from lm_torch.runner.runner import ModelRunner


def load_tuning(runner: ModelRunner) -> TuningTables | None:
    """The kernels' tuning tables for the runner's GPU (None off the Triton path)."""
    if not runner.is_async:
        return None
    from lm_torch.kernels.common import cuda_device_name
    from lm_torch.kernels.tuning import TuningTables

    return TuningTables.load(runner.config.kernels, cuda_device_name(runner.device))


def make_attention_backend(runner: ModelRunner) -> AttentionBackend:
    """Triton on CUDA when triton is installed, plain torch elsewhere."""
    if not runner.is_async:
        return TorchAttentionBackend()
    return TritonAttentionBackend(
        kernels=runner.config.kernels, tuning=runner.tuning, max_context_len=runner.session_len
    )


def plan_and_allocate(runner: ModelRunner) -> None:
    """Size and allocate the KV cache (on CUDA with Triton: after the memory profile, then warm up and capture)."""
    if runner.is_async:
        _init_cuda(runner)
        return
    start = time.perf_counter()
    plan = runner.plan = plan_kv_cache(
        runner.config,
        runner.kv_bytes_per_block(),
        runner.weight_bytes(),
        runner.session_len,
        free=free_memory(runner.device),
        activation_reserve=0,
        on_gpu=False,
    )
    plan = runner.plan = agree_on_blocks(runner, plan)
    runner.kv_caches = runner.allocate_kv(plan.num_blocks)
    runner.phases["KV allocation"] = time.perf_counter() - start


def agree_on_blocks(runner: ModelRunner, plan: MemoryPlan) -> MemoryPlan:
    """The plan with the fewest blocks any tensor-parallel rank can hold: every rank's cache holds the same blocks
    (of its own heads), so the scheduler plans with the smallest."""
    num_blocks = runner.tp.min_int(plan.num_blocks)
    if num_blocks == plan.num_blocks:
        return plan
    return dataclasses.replace(plan, num_blocks=num_blocks, source=f"{plan.source}; the smallest over the ranks")


def _init_cuda(runner: ModelRunner) -> None:
    """The Triton path: GEMV linears, input staging, the activation reserve measured, the KV cache planned and
    allocated, GEMMs warmed up, the decode graphs captured."""
    from lm_torch.kernels.prefill_attention import tokens_per_tile
    from lm_torch.layers.cuda_linear import warm_up_gemms
    from lm_torch.runner.inputs import EagerInputs, GraphInputs, PinnedStaging, eager_token_bucket

    cfg = runner.config
    layers = runner.model.attention_layers()
    first = layers[0]
    assert isinstance(first, PagedAttention), "every model's attention layers are PagedAttention"
    runner.tokens_per_tile = tokens_per_tile(first.num_heads // first.num_kv_heads, first.head_dim)
    max_blocks_per_seq = -(-runner.session_len // runner.block_size)
    runner.eager_inputs = EagerInputs(
        cfg.scheduler.max_prefill_token_num, cfg.scheduler.max_batch_size, max_blocks_per_seq, runner.device
    )
    runner.token_staging = PinnedStaging(cfg.scheduler.max_batch_size, depth=3, dtype=torch.int64)

    start = time.perf_counter()
    reserve = measure_activation_reserve(runner)  # also times the Triton compiles ("Triton compile")
    runner.phases["memory profile"] = time.perf_counter() - start - runner.phases["Triton compile"]
    start = time.perf_counter()
    buckets = sorted({eager_token_bucket(n) for n in range(1, cfg.scheduler.max_prefill_token_num + 1)})
    warm_up_gemms(runner.model, buckets)
    runner.phases["GEMM warm-up"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = runner.plan = plan_kv_cache(
        cfg,
        runner.kv_bytes_per_block(),
        runner.weight_bytes(),
        runner.session_len,
        free=free_memory(runner.device),
        activation_reserve=reserve,
        on_gpu=True,
    )
    plan = runner.plan = agree_on_blocks(runner, plan)
    runner.kv_caches = runner.allocate_kv(plan.num_blocks)
    if isinstance(runner.backend, TritonAttentionBackend):
        runner.backend.k_cache = runner.kv_caches[0][0]
    torch.cuda.synchronize()
    runner.phases["KV allocation"] = time.perf_counter() - start
    if not cfg.cuda.eager_mode and runner.tp.graphs_capturable:
        from lm_torch.runner.cuda_graph import CudaGraphRunner

        graph_inputs = runner.graph_inputs = GraphInputs(
            cfg.scheduler.max_batch_size, max_blocks_per_seq, runner.device
        )
        graphs = runner.graphs = CudaGraphRunner(
            runner.model,
            runner.backend,
            runner.kv_caches,
            graph_inputs,
            runner.token_buffer,
            runner.block_size,
            runner.session_len,
            cfg.scheduler.max_batch_size,
            cfg.cuda.cuda_graph_sizes,
            zero_padding=runner.zero_padding,
        )
        runner.phases["graph capture"] = graphs.capture()


@torch.inference_mode()
def measure_activation_reserve(runner: ModelRunner) -> int:
    """Peak device memory of the largest steps, measured by running them: a `max_prefill_token_num`-token prompt
    with its prompt logprobs, logits and a sampler run with every stage on over `max_batch_size` rows, and a decode
    of `max_batch_size` rows (about what the CUDA graphs' pool holds). Compiles the kernels on the way. The profile's
    requests go through the runner like real ones and are dropped at the end."""
    from lm_core.generation_config import GenerationConfig
    from lm_torch.kernels.common import compile_ahead
    from lm_torch.sequence import Sequence

    cfg = runner.config
    num_tokens = min(cfg.scheduler.max_prefill_token_num, runner.session_len)
    num_blocks = -(-num_tokens // runner.block_size) + 1
    runner.kv_caches = runner.allocate_kv(num_blocks)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(runner.device)
    baseline = torch.cuda.memory_allocated(runner.device)
    worst = GenerationConfig(
        do_sample=True,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        repetition_penalty=1.1,
        frequency_penalty=0.5,
        logprobs=20,
        prompt_logprobs=20,
    )
    prompt = Sequence("profile-prefill", [1] * num_tokens, num_tokens, worst)
    prompt.block_table = list(range(num_blocks - 1))
    decodes = []
    for i in range(cfg.scheduler.max_batch_size):
        seq = Sequence(f"profile-decode-{i}", [1, 1], 1, GenerationConfig())
        seq.num_computed_tokens, seq.block_table = 1, [i % (num_blocks - 1)]
        decodes.append(seq)
    n = len(decodes)

    def announce(seqs: list[Sequence]) -> list[NewRequest]:
        return [NewRequest(s.request_id, s.prompt_token_ids, s.gen_config) for s in seqs]

    def prefill() -> ScheduledBatch:
        return ScheduledBatch([prompt], [num_tokens], [1], new_requests=announce([prompt]))

    def decode() -> ScheduledBatch:
        return ScheduledBatch(decodes, [1] * n, [1] * n, new_requests=announce(decodes))

    def run(batch: ScheduledBatch) -> None:
        runner.collect(runner.launch(batch))
        # Forget the profile's requests: the next run announces them again.
        runner.requests.apply(ScheduledBatch(finished_request_ids=[r.request_id for r in batch.new_requests]))

    graphs, runner.graphs = runner.graphs, None  # eager steps only
    start = time.perf_counter()
    with compile_ahead():  # both steps' Triton kernels compiled at once, not one by one as the runs meet them
        run(prefill())
        run(decode())
    runner.phases["Triton compile"] = time.perf_counter() - start
    run(prefill())
    # The sampler with every stage on over max_batch_size rows (the prefill above sampled one).
    rows = min(cfg.scheduler.max_batch_size, num_tokens)
    hidden = torch.zeros(rows, runner.hf_config.hidden_size, dtype=runner.dtype, device=runner.device)
    logits = runner.model.compute_logits(hidden)
    inputs = SamplingInputs.build(
        [worst] * rows, [[1]] * rows, [[2]] * rows, None, runner.vocab_size, runner.device, [None] * rows
    )
    runner.sampler(logits, inputs)
    del hidden, logits, inputs
    run(decode())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(runner.device) - baseline
    runner.graphs = graphs
    runner.kv_caches = []
    runner.token_buffer.zero_()
    torch.cuda.empty_cache()
    return peak


def parallelism(runner: ModelRunner) -> str:
    """'1 process (tensor parallel 1)', or the group's size, backend and this rank."""
    tp = runner.tp
    if tp.size == 1:
        return "1 process (tensor parallel 1)"
    return f"{tp.size} processes (tensor parallel {tp.size} over {tp.backend}; this is rank {tp.rank})"


def kernel_lines(model: torch.nn.Module) -> list[str]:
    """Start-up lines naming the mixture-of-experts and FP8 code paths the model's layers chose (none for others)."""
    from lm_torch.layers.moe import SparseMoeBlock
    from lm_torch.layers.quant.fp8 import Fp8BlockLinear

    lines = []
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    if blocks:
        experts = blocks[0].experts
        path = "the Triton fused-MoE kernel" if experts.use_triton else "torch, per expert"
        lines.append(
            f"lm-torch: {len(blocks)} mixture-of-experts layers, {experts.num_experts} experts, top "
            f"{blocks[0].top_k}, intermediate {experts.intermediate} a rank: {path}"
        )
    fp8 = [m for m in model.modules() if isinstance(m, Fp8BlockLinear)]
    if fp8:
        block = "x".join(map(str, fp8[0].block))
        path = "the Triton blocked-FP8 GEMM" if fp8[0].runs_triton else "dequantized at load (CPU)"
        lines.append(f"lm-torch: {len(fp8)} FP8 linear layers ({block} weight blocks): {path}")
    return lines


def summary(runner: ModelRunner, wall_s: float | None = None, import_s: float | None = None) -> str:
    """The start-up lines: model, dtype, device and load time; the engine, attention backend and parallelism; the
    memory plan; the CPU threads; the start-up's wall time (`wall_s`, the engine's whole construction, plus
    `import_s` when given: lm-torch's import) and each phase's seconds ("other": the part no phase covers)."""
    plan_text = runner.plan.summary() if runner.plan is not None else "no memory plan"
    lines = [
        f"lm-torch: {runner.model_path.name} ({runner.hf_config.architectures[0]}), "
        f"{str(runner.dtype).removeprefix('torch.')} on {runner.device}, "
        f"weights {runner.weight_bytes() / 1024**3:.2f} GiB loaded in {runner.phases['load']:.1f} s",
        f"lm-torch: engine torch, {type(runner.backend).__name__.removesuffix('AttentionBackend').lower()} attention, "
        + parallelism(runner),
        f"lm-torch: {plan_text}, KV {kv_dtype_name(runner.config.cache.quant_policy, runner.dtype)}"
        + (" (each rank's cache: its KV heads of every block)" if runner.tp.size > 1 else ""),
    ]
    if runner.media is not None:
        vision: Any = runner.model.vision  # a vision-language model's tower and projector
        num_params = sum(p.numel() for p in vision.parameters())
        scheduler = runner.config.scheduler
        per_step = scheduler.max_encoder_tokens or scheduler.max_prefill_token_num
        lines.append(
            f"lm-torch: vision tower {num_params / 1e6:.1f}M parameters"
            + (" on every rank" if runner.tp.size > 1 else "")
            + f", up to {per_step} image tokens encoded per step, encoder cache "
            f"{runner.config.cache.encoder_cache_tokens} tokens"
        )
    lines += kernel_lines(runner.model)
    if runner.graphs is not None:
        buckets = runner.graphs.buckets
        lines.append(f"lm-torch: CUDA graphs for {len(buckets)} decode batch sizes ({buckets[0]}-{buckets[-1]})")
    elif runner.device.type == "cuda":
        why = "eager_mode" if runner.is_async else "triton is not installed: torch attention, no Triton kernels"
        if runner.is_async and not runner.config.cuda.eager_mode and not runner.tp.graphs_capturable:
            why = f"tensor parallel over {runner.tp.backend}, whose collectives run on the host"
        lines.append(f"lm-torch: no CUDA graphs ({why})")
    if runner.device.type == "cpu":
        tuner = runner.thread_tuner
        if tuner is not None:
            counts = tuner.candidates
            lines.append(
                f"lm-torch: CPU threads chosen per step by timing ({counts[0]}-{counts[-1]}; fewer when other "
                f"work holds cores; --num-threads fixes the count), starting at {tuner.current}"
            )
        else:
            lines.append(f"lm-torch: CPU threads {torch.get_num_threads()} (num_threads)")
    phases = dict(runner.phases)
    if import_s is not None:
        phases = {"import": import_s, **phases}
    total = sum(phases.values())
    if wall_s is not None:
        total = wall_s + (import_s or 0.0)
        phases["other"] = max(total - sum(phases.values()), 0.0)
    text = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
    lines.append(f"lm-torch: start-up {total:.1f} s wall time ({text})")
    return "\n".join(lines)
