"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers, on the CPU in float32.

- Logits: each family's random tiny model, saved by transformers (per-expert tensors; one case stacked, as
  `save_original_format=False` writes), run through the paged cache as in `test_model_families`: within 1e-4 of
  transformers at every position. Qwen2-MoE has a shared expert and a dense layer (`mlp_only_layers`).
- Routing: our router's weights and expert ids equal transformers' routers' exactly, on tokens with tied scores (two
  experts with the same router row, and all-zero tokens where every expert ties); the experts' sum matches
  transformers' experts when some experts receive no token.
- The engine: greedy generations equal transformers' `generate`; a batch under a KV budget that forces preemption and
  a prompt that hits the prefix cache give the same tokens as the prompts alone.
- Tensor parallelism: Qwen2-MoE split over 2 gloo ranks gives the unsplit logits, from the checkpoint and from dummy
  weights.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))  # for the rank processes: see tp_ranks
import tp_ranks
from test_model_families import TINY, TOLERANCE, _hf_logits, _load_ours, _paged_logits, _random_hf, _tokens

from lm_torch.layers.moe import FusedMoE, SparseMoeBlock, moe_torch, softmax_topk

transformers = pytest.importorskip("transformers")

# Per family: the transformers classes and the MoE arguments of its tiny config.
FAMILIES = {
    "qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 8,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "head_dim": 16,
        },
    ),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_hidden_layers": 3,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,  # not intermediate_size (128): the dense layer's MLP differs
            "mlp_only_layers": [1],
        },
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8, "num_experts_per_tok": 2}),
}
# Cases of the logits test: (family, whether the checkpoint holds the experts stacked).
CASES = {"qwen3-moe": ("qwen3-moe", False), "qwen2-moe": ("qwen2-moe", False), "mixtral": ("mixtral", False)}
CASES["mixtral-stacked"] = ("mixtral", True)
CASES["qwen3-moe-stacked"] = ("qwen3-moe", True)
TIE_TOLERANCE = 1e-5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _config(family: str, **overrides):
    config_name, class_name, moe = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**TINY, **moe, **overrides})
    return config, getattr(transformers, class_name)


def _save(family: str, path: Path, stacked: bool = False):
    config, model_class = _config(family)
    reference = _random_hf(model_class, config)
    reference.save_pretrained(path, save_original_format=not stacked)
    return reference


# ---------------------------------------------------------------------------------------------------------------------
# Logits against transformers.


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, stacked = CASES[case]
    reference = _save(family, tmp_path, stacked)
    names = load_file(tmp_path / "model.safetensors").keys()
    assert any("experts.gate_up_proj" in n for n in names) == stacked
    model = _load_ours(tmp_path)
    tokens = _tokens(seed=1)
    expected = _hf_logits(reference, tokens)
    diff = (_paged_logits(model, tokens) - expected).abs().max().item()
    print(f"{case}: max abs logit difference {diff:.3g}")
    assert diff < TOLERANCE, f"{case}: max abs logit difference {diff:.3g}"
    assert expected.std(dim=0).mean() > 1000 * TOLERANCE


def test_qwen2_moe_layers_follow_mlp_only_layers_and_the_shared_expert(tmp_path):
    _save("qwen2-moe", tmp_path)
    model: Any = _load_ours(tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["SparseMoeBlock", "LlamaMLP", "SparseMoeBlock"]
    assert model.layers[0].mlp.shared_expert is not None
    assert model.layers[0].self_attn.qkv_proj.bias is not None and model.layers[0].self_attn.o_proj.bias is None


def test_a_missing_expert_tensor_fails_the_load(tmp_path):
    _save("qwen3-moe", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 weights.*layers\.1\.mlp\.experts\.w13"):
        _load_ours(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Routing and the experts' sum against transformers' modules.


def _blocks(family: str, seed: int = 0):
    """(transformers' sparse block, ours with its weights) for `family`'s tiny config."""
    config, model_class = _config(family)
    block_class = getattr(
        sys.modules[model_class.__module__], model_class.__name__.replace("ForCausalLM", "SparseMoeBlock")
    )
    torch.manual_seed(seed)
    reference = block_class(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0.0, 0.1)
        weight = reference.gate.weight
        weight[3] = weight[1]  # experts 1 and 3 always tie; so do 2 and 6
        weight[6] = weight[2]
    qwen = family.startswith("qwen")
    ours = SparseMoeBlock(
        config.hidden_size,
        config.num_experts if qwen else config.num_local_experts,
        config.num_experts_per_tok,
        config.moe_intermediate_size if qwen else config.intermediate_size,
        bool(getattr(config, "norm_topk_prob", True)),
        config.hidden_act,
        layer_idx=0,
        round_weights=qwen,
        shared_intermediate=getattr(config, "shared_expert_intermediate_size", 0) if family == "qwen2-moe" else 0,
    )
    loaded = set()
    for name, tensor in reference.state_dict().items():  # transformers' stacked layout: experts.gate_up_proj
        loaded |= ours.load_weight(name, tensor)
    assert loaded == {n for n, _ in ours.named_parameters()}
    return reference, ours


def _hidden(seed: int) -> torch.Tensor:
    x = torch.randn(64, TINY["hidden_size"], generator=torch.Generator().manual_seed(seed))
    x[::8] = 0.0  # router logits all zero: every expert ties
    return x


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routing_equals_transformers_routers_with_ties(family):
    reference, ours = _blocks(family)
    x = _hidden(seed=1)
    with torch.no_grad():
        _, hf_weights, hf_ids = reference.gate(x)
        weights, ids = ours.route(x)
    assert torch.equal(ids, hf_ids)
    assert weights.dtype == torch.float32 and torch.equal(weights, hf_weights.float())
    # The ties really decided something: tokens where 1 and 3 (or 2 and 6) straddle the top-k boundary.
    chosen = [set(row) for row in ids.tolist()]
    assert any((1 in c) != (3 in c) or (2 in c) != (6 in c) for c in chosen)
    assert ids[0].tolist() == hf_ids[0].tolist()  # an all-tied token: the same experts, in the same order


@pytest.mark.parametrize("family", list(FAMILIES))
def test_block_output_matches_transformers(family):
    reference, ours = _blocks(family, seed=2)
    x = _hidden(seed=3)
    with torch.no_grad():
        expected = reference(x[None])[0]
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_experts_with_no_tokens_match_transformers_experts():
    reference, ours = _blocks("qwen3-moe", seed=4)
    x = _hidden(seed=5)[:9]
    gen = torch.Generator().manual_seed(6)
    # Experts 0, 4 and 7 receive no token; expert 5 receives one.
    ids = torch.stack([torch.tensor([1, 2, 3, 6])[torch.randperm(4, generator=gen)] for _ in range(9)])
    ids[4, 2] = 5
    weights = torch.softmax(torch.randn(9, 4, generator=gen), dim=-1)
    assert torch.bincount(ids.flatten(), minlength=8)[[0, 4, 7]].tolist() == [0, 0, 0]
    with torch.no_grad():
        expected = reference.experts(x, ids, weights)
        got = ours.experts(x, weights, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_softmax_topk_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    plain, ids = softmax_topk(logits, 2, renormalize=False)
    normed, ids_normed = softmax_topk(logits, 2, renormalize=True)
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(ids, ids_normed) and ids[0].tolist() == [0, 1]
    torch.testing.assert_close(plain, probs.gather(1, ids))
    torch.testing.assert_close(normed.sum(-1), torch.ones(2))


def test_cpu_experts_match_the_kernel_reference():
    """Our torch path against the fused-MoE kernel module's own torch reference (when that module is present)."""
    kernel = pytest.importorskip("lm_torch.kernels.fused_moe")
    gen = torch.Generator().manual_seed(7)
    experts, hidden, inter, tokens, top_k = 8, 64, 32, 37, 2
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.1
    x = torch.randn(tokens, hidden, generator=gen)
    weights, ids = softmax_topk(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    expected = kernel.fused_moe_reference(x, w13, w2, weights, ids.to(torch.int32), activation="silu")
    torch.testing.assert_close(moe_torch(x, w13, w2, weights, ids), expected, rtol=0, atol=1e-5)


def test_fused_moe_rejects_bad_shapes_and_activations():
    layer = FusedMoE(4, 64, 32)
    with pytest.raises(ValueError, match="expected"):
        layer.load_expert(0, "gate", torch.zeros(64, 32))
    with pytest.raises(ValueError, match="not supported"):
        FusedMoE(4, 64, 32, act="relu2")


# ---------------------------------------------------------------------------------------------------------------------
# The engine.


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory, default_model_dir):
    """`engine_model(family)`: (checkpoint, transformers model) of a tiny `family` model over the default model's
    tokenizer, with weights large enough that greedy steps rarely tie; built once per family."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    built = {}

    def get(family: str):
        if family not in built:
            path = tmp_path_factory.mktemp(f"{family}-engine")
            config, model_class = _config(
                family,
                vocab_size=len(tokenizer),
                max_position_embeddings=1024,
                initializer_range=0.2,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=False,
            )
            reference = _random_hf(model_class, config)
            reference.save_pretrained(path)
            for name in TOKENIZER_FILES:
                if (default_model_dir / name).is_file():
                    shutil.copy(default_model_dir / name, path / name)
            built[family] = path, reference
        return built[family]

    return get


def _pipe(path: Path, **config):
    from lm_core import AsyncPipeline, Pipeline
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(path, {"block_size": 16, **config})
    return Pipeline(AsyncPipeline(engine, path))


def _token_ids(pipe, prompts: list[list[int]], cfg) -> list[list[int]]:
    """The generated ids of each prompt, the prompts run as one batch."""
    return [response.token_ids for response in cast(list, pipe(prompts, cfg))]


def _prompts(count: int, seed: int, low: int = 4, high: int = 40) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=rng).tolist()
    return [torch.randint(100, 40000, (n,), generator=rng).tolist() for n in lengths]


def _greedy_reference(reference, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,  # as ignore_eos: all the new tokens, whatever they are
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[0, len(prompt) :].tolist(), list(out.logits)


def _assert_same_greedy(ours: list[int], reference: list[int], step_logits: list[torch.Tensor]) -> None:
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        if a != b:  # only a tie between transformers' two best logits lets the continuations differ
            top2 = torch.topk(step_logits[step][0], 2)
            gap = (top2.values[0] - top2.values[1]).item()
            assert gap < TIE_TOLERANCE and a in top2.indices.tolist(), f"step {step}: {a} != {b} (gap {gap:.2e})"
            return


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_greedy_matches_transformers_generate(family, engine_model):
    from lm_core import GenerationConfig

    path, reference = engine_model(family)
    prompts = _prompts(2, seed=11)
    with _pipe(path, num_kv_blocks=64, max_batch_size=8) as pipe:
        responses = _token_ids(pipe, prompts, GenerationConfig(max_new_tokens=16, ignore_eos=True))
    for prompt, ids in zip(prompts, responses, strict=True):
        expected, logits = _greedy_reference(reference, prompt, 16)
        assert len(ids) == 16
        _assert_same_greedy(ids, expected, logits)


def _engine_generate(pipe, prompt_ids: list[int], cfg) -> tuple[list[int], int]:
    """Drive the engine directly: (generated ids, prompt tokens the prefix cache supplied)."""
    from lm_core.engine import EngineRequest

    async def run():
        ids, cached = [], 0
        async for out in pipe.async_pipeline.engine.generate(EngineRequest(uuid.uuid4().hex, prompt_ids, cfg)):
            ids += out.token_ids
            cached = max(cached, out.num_cached_tokens)
        return ids, cached

    return asyncio.run_coroutine_threadsafe(run(), pipe._loop).result()


@pytest.mark.slow
def test_a_preempted_batch_gives_the_outputs_alone(engine_model):
    from lm_core import GenerationConfig

    path, _ = engine_model("qwen2-moe")
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    prompts = _prompts(10, seed=12, low=8, high=40)
    with _pipe(path, num_kv_blocks=128, max_batch_size=16) as roomy:
        alone = [_token_ids(roomy, [prompt], cfg)[0] for prompt in prompts]
    with _pipe(path, num_kv_blocks=8, max_batch_size=16) as small:  # 8 blocks of 16: about two sequences at once
        assert _token_ids(small, prompts, cfg) == alone
        engine: Any = small.async_pipeline.engine
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.slow
def test_prefix_cache_hits_give_the_outputs_alone(engine_model):
    from lm_core import GenerationConfig

    path, _ = engine_model("qwen2-moe")
    cfg = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    prefix = _prompts(1, seed=13, low=70, high=71)[0]
    first, second = [*prefix, 101, 102, 103], [*prefix, 201, 202]
    with _pipe(path, num_kv_blocks=64) as pipe:
        ids_first, _ = _engine_generate(pipe, first, cfg)
        assert _engine_generate(pipe, first, cfg) == (ids_first, 64)  # repeated: its 4 full blocks from the cache
        ids_second, cached = _engine_generate(pipe, second, cfg)
        assert cached == 64  # the 4 full blocks of the shared prefix
    with _pipe(path, num_kv_blocks=64, enable_prefix_caching=False) as uncached:
        assert _engine_generate(uncached, second, cfg) == (ids_second, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Tensor parallelism.


def test_tensor_parallel_2_gives_the_unsplit_logits(tmp_path):
    path = tmp_path / "qwen2-moe"
    reference = _save("qwen2-moe", path)
    jobs = [("checkpoint", path, None, {}), ("dummy", path, None, {"load_format": "dummy"})]
    expected = {name: tp_ranks.model_logits(p, cfg, engine) for name, p, cfg, engine in jobs}
    got = tp_ranks.run_ranks(2, jobs)
    for name in expected:
        diff = (got[name] - expected[name]).abs().max().item()
        print(f"tp 2 {name}: max abs logit difference from tp 1 {diff:.3g}")
        assert diff < TOLERANCE, f"{name}: {diff:.3g} from tp 1"
    assert (got["checkpoint"] - _hf_logits(reference, _tokens(seed=1))).abs().max().item() < TOLERANCE
    assert expected["dummy"].std(dim=0).mean() > 1000 * TOLERANCE


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: the Triton fused-MoE kernel in the model.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_float32_logits_match_transformers(case, tmp_path):
    pytest.importorskip("triton")
    family, stacked = CASES[case]
    reference = _save(family, tmp_path, stacked).cuda()
    model = _load_ours(tmp_path, device="cuda")
    tokens = _tokens(seed=1)
    diff = (_paged_logits(model, tokens) - _hf_logits(reference, tokens)).abs().max().item()
    assert diff < TOLERANCE, f"{case} on CUDA: {diff:.3g}"


def test_the_start_up_summary_names_the_moe_path(engine_model):
    path, reference = engine_model("mixtral")
    with _pipe(path, num_kv_blocks=16) as pipe:
        summary = pipe.async_pipeline.engine.executor.summary()
    config = reference.config
    expected = (
        f"{config.num_hidden_layers} mixture-of-experts layers, {config.num_local_experts} experts, top "
        f"{config.num_experts_per_tok}, intermediate {config.intermediate_size} a rank: torch, per expert"
    )
    assert expected in summary, summary
