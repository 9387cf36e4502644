"""Every model family matches transformers: per-position logits within 1e-4 (max abs) of the transformers model.

Each case builds a random tiny model with transformers' own classes (float32, seeded, norm weights and biases moved
away from their init so that a misplaced or skipped one shows), saves it as safetensors and loads it with our
loader. Our model then runs the way the engine drives it: a 40-token prompt (more than two 16-token KV blocks)
prefilled in three chunks, then 32 teacher-forced one-token decode steps, through a paged cache whose block table
is shuffled and non-contiguous. Every logits row it produces is compared with transformers' full-sequence forward at
the same position.

InternLM2 has no transformers implementation: its case writes an InternLM2-layout checkpoint from a random Llama
model and compares against that Llama.

On a CUDA machine (marker `gpu`) every family also runs there the way the engine runs it on a GPU: the Triton
attention backend and the Triton norm, rotary and activation kernels. In float32 the logits must match transformers
on the same GPU within the same 1e-4; in bfloat16 they must stay within `BF16_TOLERANCE` of transformers' float32
logits, or within twice transformers' own bfloat16 error where that is larger.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lm_torch.attention import StepMetadata, TorchAttentionBackend, TritonAttentionBackend
from lm_torch.config import TorchEngineConfig
from lm_torch.loader import build_model, load_hf_config
from lm_torch.models import supported_architectures

VOCAB = 300
BLOCK_SIZE = 16
NUM_BLOCKS = 16  # room for two sequences of 72 tokens (5 blocks each), so block tables can interleave
PROMPT_CHUNKS = (17, 9, 14)  # 40 prompt tokens; the first chunk already crosses a block boundary
DECODE_STEPS = 32
SEQ_LEN = sum(PROMPT_CHUNKS) + DECODE_STEPS
TOLERANCE = 1e-4
# bfloat16 keeps 8 bits of mantissa: logits of a few units carry errors of a few hundredths after two layers.
BF16_TOLERANCE = 0.05
WINDOW = 12  # sliding windows shorter than the prompt, so that tokens actually drop out of them

# Shared by every tiny config: 4 query heads over 2 KV heads (GQA) of head_dim 16.
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.1,  # larger than the default 0.02, so that attention is far from uniform
    "attn_implementation": "eager",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: building and saving reference models, driving ours through the paged cache.


def _random_hf(model_class, config):
    """A seeded random transformers model in eval mode, with every 1-D weight (norms, biases) perturbed."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model


def _save_hf(model_class, config, path: Path):
    model = _random_hf(model_class, config)
    model.save_pretrained(path)  # safetensors
    assert list(path.glob("*.safetensors"))
    return model


def _load_ours(
    path: Path,
    hf_config=None,
    engine_config: TorchEngineConfig | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    hf_config = hf_config if hf_config is not None else load_hf_config(path)
    backend = TritonAttentionBackend() if device == "cuda" else TorchAttentionBackend()
    return build_model(path, engine_config or TorchEngineConfig(), hf_config, torch.device(device), dtype, backend)


def _paged_cache(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # NaN-filled, so that reading a slot no step has written turns the logits into NaN.
    param = next(model.parameters())
    return [
        (
            torch.full((NUM_BLOCKS, BLOCK_SIZE, h, d), float("nan"), device=param.device, dtype=param.dtype),
            torch.full((NUM_BLOCKS, BLOCK_SIZE, h, d), float("nan"), device=param.device, dtype=param.dtype),
        )
        for h, d in model.kv_cache_shape()
    ]


def _block_tables(num_seqs: int, seed: int = 0) -> list[list[int]]:
    """Disjoint, shuffled block tables: sequence i's blocks are neither contiguous nor in order."""
    blocks_per_seq = -(-SEQ_LEN // BLOCK_SIZE)
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i * blocks_per_seq : (i + 1) * blocks_per_seq] for i in range(num_seqs)]


@torch.no_grad()
def _step(model, caches, tables, pieces: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """One engine step: `pieces[i]` = (new tokens, tokens already cached) of sequence i.

    Returns each sequence's logits [num_new, vocab], one row per new token.
    """
    device = caches[0][0].device
    query_lens = [len(tokens) for tokens, _ in pieces]
    context_lens = [cached + len(tokens) for tokens, cached in pieces]
    meta = model.prepare_attention(StepMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, device))
    input_ids = torch.cat([tokens for tokens, _ in pieces]).to(device)
    positions = torch.cat([torch.arange(cached, cached + len(tokens)) for tokens, cached in pieces]).to(device)
    logits = model.compute_logits(model(input_ids, positions, caches, meta))  # [num_tokens, vocab]
    return [rows.cpu() for rows in logits.split(query_lens)]


def _schedule(length: int) -> list[tuple[int, int]]:
    """(start, end) of each step for one sequence: the prompt chunks, then one token per decode step."""
    bounds, start = [], 0
    for chunk in PROMPT_CHUNKS:
        bounds.append((start, start + chunk))
        start += chunk
    bounds += [(i, i + 1) for i in range(start, length)]
    return bounds


def _paged_logits(model, tokens: torch.Tensor, table_seed: int = 0) -> torch.Tensor:
    """Our logits [len(tokens), vocab] for one sequence, chunk-prefilled then decoded one token at a time."""
    caches, tables = _paged_cache(model), _block_tables(1, table_seed)
    rows = [_step(model, caches, tables, [(tokens[s:e], s)])[0] for s, e in _schedule(len(tokens))]
    return torch.cat(rows)


@torch.no_grad()
def _hf_logits(reference, tokens: torch.Tensor) -> torch.Tensor:
    device = next(reference.parameters()).device
    return reference(input_ids=tokens[None].to(device)).logits[0].float().cpu()


def _tokens(seed: int, length: int = SEQ_LEN) -> torch.Tensor:
    # Below 290: the multimodal Gemma 3 config reserves the top ids for image markers.
    return torch.randint(3, 290, (length,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# The families. Each case saves a checkpoint under `path` and returns (reference model, hf_config or None for
# load_hf_config's, engine config or None for the default).


def _llama3_rope(path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # original_max_position_embeddings 32: with head_dim 16 the wavelengths span ~6 to ~20000 positions, so some
    # frequencies are divided by the factor, some kept, and some smoothed between (the three llama3 regimes).
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    config = LlamaConfig(**TINY, rope_parameters=rope, tie_word_embeddings=False)
    return _save_hf(LlamaForCausalLM, config, path), None, None


def _mistral_window(path: Path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**TINY, sliding_window=WINDOW)
    return _save_hf(MistralForCausalLM, config, path), None, None


def _qwen2_bias(path: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # q/k/v carry biases (o_proj none); tied embeddings.
    config = Qwen2Config(**TINY, tie_word_embeddings=True)
    return _save_hf(Qwen2ForCausalLM, config, path), None, None


def _qwen3(path: Path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 24 is not hidden / heads (16): the explicit head_dim must win. q/k norms per head.
    config = Qwen3Config(**TINY, head_dim=24)
    return _save_hf(Qwen3ForCausalLM, config, path), None, None


def _gemma(path: Path):
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(**TINY, head_dim=16, hidden_act="gelu_pytorch_tanh")
    return _save_hf(GemmaForCausalLM, config, path), None, None


def _gemma2(path: Path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Alternating sliding (layers 0, 2) and global layers; query_pre_attn_scalar differs from head_dim; soft-caps
    # low enough to bite (scores and logits here reach a few units).
    config = Gemma2Config(
        **{**TINY, "num_hidden_layers": 4},
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=1.5,
    )
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    return _save_hf(Gemma2ForCausalLM, config, path), None, None


def _gemma3_text_config():
    from transformers import Gemma3TextConfig

    # Local layers: rope_theta 10k; global ones: 1M with linear scaling (as Gemma 3 4B and larger ship).
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    }
    return Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 3},
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters=rope,
    )


def _gemma3(path: Path):
    from transformers import Gemma3ForCausalLM

    return _save_hf(Gemma3ForCausalLM, _gemma3_text_config(), path), None, None


def _gemma3_multimodal(path: Path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=_gemma3_text_config().to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=297,
        eoi_token_index=298,
        image_token_index=299,
        attn_implementation="eager",
    )
    reference = _save_hf(Gemma3ForConditionalGeneration, config, path)
    hf_config = load_hf_config(path)  # the text_config
    # load_hf_config hands over the text config, which names no architecture; build_model needs the checkpoint's.
    hf_config.architectures = hf_config.architectures or json.loads((path / "config.json").read_text())["architectures"]
    return reference, hf_config, None


def _phi3_config(**overrides):
    from transformers import Phi3Config

    # rotary_dim 8 of head_dim 16: 4 factors each; short and long factors differ, so choosing wrongly shows.
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.1, 1.3, 1.6],
        "long_factor": [1.0, 2.0, 4.0, 8.0],
    }
    return Phi3Config(**{**TINY, **overrides}, rope_parameters=rope)


def _phi3_longrope_long(path: Path):
    from transformers import Phi3ForCausalLM

    # 72 tokens > original_max_position_embeddings 32: transformers takes the long factors; so do we, because the
    # engine's max positions (max_position_embeddings 128) exceed 32.
    config = _phi3_config(original_max_position_embeddings=32)
    return _save_hf(Phi3ForCausalLM, config, path), None, None


def _phi3_longrope_short(path: Path):
    from transformers import Phi3ForCausalLM

    # 72 tokens <= original 128: transformers takes the short factors; so do we, as session_len 128 fits the
    # original length (while max_position_embeddings 256 would not). Plus Phi-3's sliding window on every layer.
    config = _phi3_config(max_position_embeddings=256, original_max_position_embeddings=128, sliding_window=20)
    return _save_hf(Phi3ForCausalLM, config, path), None, TorchEngineConfig(session_len=128)


def _internlm2(path: Path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

    config = LlamaConfig(**TINY, attention_bias=True, tie_word_embeddings=False)
    reference = _random_hf(LlamaForCausalLM, config)
    save_file(_internlm2_state_dict(reference), str(path / "model.safetensors"))
    internlm2_config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        **{k: TINY[k] for k in TINY if k not in ("initializer_range", "attn_implementation")},
        "num_hidden_layers": config.num_hidden_layers,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "bias": True,
        "rope_theta": 10000.0,
        # As InternLM2.5 ships: dynamic NTK, which leaves the frequencies alone within max_position_embeddings.
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(internlm2_config))
    # transformers does not know model_type "internlm2" (load_hf_config raises): read config.json's keys as they are.
    return reference, PretrainedConfig.from_pretrained(path), None


def _internlm2_state_dict(llama) -> dict[str, torch.Tensor]:
    """A Llama state dict under InternLM2's names, q/k/v packed as wqkv rows [num_kv, q_per_kv + 2, head_dim]."""
    config = llama.config
    num_kv, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    q_per_kv = config.num_attention_heads // num_kv
    renames = {
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.up_proj": "feed_forward.w3",
        "mlp.down_proj": "feed_forward.w2",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = llama.state_dict()
    out = {
        "model.tok_embeddings.weight": state["model.embed_tokens.weight"],
        "model.norm.weight": state["model.norm.weight"],
    }
    out["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                if f"{prefix}{old}.{kind}" in state:
                    out[f"{prefix}{new}.{kind}"] = state[f"{prefix}{old}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = (state[f"{prefix}self_attn.{p}_proj.{kind}"] for p in "qkv")
            rest = q.shape[1:]  # (hidden,) for weights, () for biases
            packed = torch.cat(
                [
                    q.reshape(num_kv, q_per_kv, head_dim, *rest),
                    k.reshape(num_kv, 1, head_dim, *rest),
                    v.reshape(num_kv, 1, head_dim, *rest),
                ],
                dim=1,
            )  # [num_kv, q_per_kv + 2, head_dim, *rest]
            out[f"{prefix}attention.wqkv.{kind}"] = packed.reshape(-1, *rest)
    return {name: t.contiguous() for name, t in out.items()}


FAMILIES: dict[str, Callable] = {
    "llama3-rope": _llama3_rope,
    "mistral-window": _mistral_window,
    "qwen2-bias": _qwen2_bias,
    "qwen3": _qwen3,
    "internlm2": _internlm2,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gemma3-multimodal": _gemma3_multimodal,
    "phi3-longrope-long": _phi3_longrope_long,
    "phi3-longrope-short": _phi3_longrope_short,
}


# ---------------------------------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    reference, hf_config, engine_config = FAMILIES[family](tmp_path)
    model = _load_ours(tmp_path, hf_config, engine_config)
    tokens = _tokens(seed=1)
    expected = _hf_logits(reference, tokens)  # [SEQ_LEN, vocab]
    got = _paged_logits(model, tokens)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff < TOLERANCE, f"{family}: max abs logit difference {diff:.3g} over {SEQ_LEN} positions"
    # The comparison means something only if positions disagree with each other well beyond the tolerance.
    assert expected.std(dim=0).mean() > 1000 * TOLERANCE


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_float32_logits_match_transformers_on_the_gpu(family, tmp_path):
    """The Triton kernels and attention backend, fed the way the engine feeds them, against transformers on CUDA."""
    pytest.importorskip("triton")
    reference, hf_config, engine_config = FAMILIES[family](tmp_path)
    model = _load_ours(tmp_path, hf_config, engine_config, device="cuda")
    tokens = _tokens(seed=1)
    expected = _hf_logits(reference.cuda(), tokens)
    got = _paged_logits(model, tokens)
    diff = (got - expected).abs().max().item()
    assert diff < TOLERANCE, f"{family}: max abs logit difference {diff:.3g} on CUDA in float32"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gpu_bfloat16_logits_stay_close(family, tmp_path):
    """bfloat16 on CUDA against transformers' float32 logits: within BF16_TOLERANCE, or within twice the error of
    transformers' own bfloat16 forward where that is larger."""
    import copy

    pytest.importorskip("triton")
    reference, hf_config, engine_config = FAMILIES[family](tmp_path)
    tokens = _tokens(seed=1)
    reference = reference.cuda()
    expected = _hf_logits(reference, tokens)
    hf_error = (_hf_logits(copy.deepcopy(reference).to(torch.bfloat16), tokens) - expected).abs().max().item()
    model = _load_ours(tmp_path, hf_config, engine_config, device="cuda", dtype=torch.bfloat16)
    error = (_paged_logits(model, tokens) - expected).abs().max().item()
    print(f"{family}: bf16 max abs logit error {error:.4f} (transformers bf16: {hf_error:.4f})")
    assert error <= max(BF16_TOLERANCE, 2 * hf_error), f"{family}: {error:.4f} vs transformers bf16 {hf_error:.4f}"


@pytest.mark.parametrize("family", ["gemma2", "mistral-window", "qwen2-bias"])
def test_batched_step_matches_separate_runs(family, tmp_path):
    """Two sequences sharing every step (different lengths, interleaved blocks) give their separate runs' logits."""
    _, hf_config, engine_config = FAMILIES[family](tmp_path)
    model = _load_ours(tmp_path, hf_config, engine_config)
    a, b = _tokens(seed=2), _tokens(seed=3, length=SEQ_LEN - 9)  # b's steps end 9 tokens earlier
    caches, tables = _paged_cache(model), _block_tables(2, seed=4)
    sched_a, sched_b = _schedule(len(a)), _schedule(len(b))
    rows_a, rows_b = [], []
    for i in range(max(len(sched_a), len(sched_b))):
        pieces, owners = [], []
        for seq, sched, rows in ((a, sched_a, rows_a), (b, sched_b, rows_b)):
            if i < len(sched):
                s, e = sched[i]
                pieces.append((seq[s:e], s))
                owners.append(rows)
        # A sequence that has finished leaves the batch; its block table goes with it.
        step_tables = [t for t, sched in zip(tables, (sched_a, sched_b), strict=True) if i < len(sched)]
        for rows, logits in zip(owners, _step(model, caches, step_tables, pieces), strict=True):
            rows.append(logits)
    batched_a, batched_b = torch.cat(rows_a), torch.cat(rows_b)
    torch.testing.assert_close(batched_a, _paged_logits(model, a), rtol=0, atol=1e-5)
    torch.testing.assert_close(batched_b, _paged_logits(model, b, table_seed=5), rtol=0, atol=1e-5)


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _save_hf(LlamaForCausalLM, LlamaConfig(**TINY), tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config_json, "architectures": ["NotAModelForCausalLM"]}))
    with pytest.raises(ValueError, match="NotAModelForCausalLM") as excinfo:
        build_model(tmp_path, TorchEngineConfig(), load_hf_config(tmp_path), torch.device("cpu"), torch.float32)
    for name in supported_architectures():
        assert name in str(excinfo.value)
    families = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"}
    assert families | {"Phi3ForCausalLM", "InternLM2ForCausalLM"} <= set(supported_architectures())


def test_dynamic_rope_beyond_max_position_embeddings_is_refused(tmp_path):
    """Dynamic NTK is exact only up to max_position_embeddings (128 here); a longer session must not load."""
    _, hf_config, _ = _internlm2(tmp_path)
    with pytest.raises(ValueError, match="dynamic NTK"):
        _load_ours(tmp_path, hf_config, TorchEngineConfig(session_len=256))
