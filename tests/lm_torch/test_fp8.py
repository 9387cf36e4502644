"""Blocked FP8 checkpoints (DeepSeek-V3 / Qwen3-FP8 format) written by `lm lite fp8`, loaded by lm-torch.

Two tiny random models: "full", a Llama whose every linear dimension is a multiple of 128 (hidden 256, intermediate
512), and "partial", a Qwen2 (q/k/v biases, tied embeddings) whose dimensions all end in partial blocks (hidden 192
= 1.5 blocks, 96 KV rows, intermediate 320). The independent reference is transformers: it loads the "full"
checkpoint itself, dequantizing on this GPU-less machine with a warning. Its CPU dequantization derives the block
size from `rows // scale_rows` (transformers 5.25, `Fp8Dequantize._dequantize_one`), which misplaces partial blocks
(192 rows over 2 scale rows become 96-row blocks; 576 over 5 fails), so for "partial" the reference model holds the
weights transformers' own ceil-block dequantization (`_dequantize_fp8_weight`, its FP8Linear's backward) gives;
where both apply ("full") the two agree exactly. On our side the CPU path dequantizes at load: the dequantized
weights must equal transformers' exactly, and the paged logits (tests/lm_torch/tp_ranks.py: chunked prefill, then
one-token decodes) come within 1e-4. Also: greedy generation through the engine against the reference,
`quantization="fp8"` on the float checkpoints against loading what lm-lite wrote (identical), tensor parallelism
over 2 gloo ranks and the shards that cut a block (refused, naming the tensor).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for the rank processes: see tp_ranks
import tp_ranks

from lm_torch.attention import TorchAttentionBackend
from lm_torch.config import ModelConfig, TorchEngineConfig
from lm_torch.distributed.group import SINGLE, TPGroup
from lm_torch.layers.linear import mark_linear_shards
from lm_torch.layers.quant import Fp8BlockLinear, parse_quant_config
from lm_torch.loader import build_model, load_hf_config

transformers = pytest.importorskip("transformers")
lm_lite_fp8 = pytest.importorskip("lm_lite.fp8")

TOLERANCE = 1e-4
TIE_TOLERANCE = 1e-5  # where the reference's two best logits are closer, either token is a right greedy choice
LINEARS = {"self_attn.qkv_proj": "q_proj k_proj v_proj", "self_attn.o_proj": "o_proj"}
LINEARS |= {"mlp.gate_up_proj": "gate_proj up_proj", "mlp.down_proj": "down_proj"}
# test_model_families' vocabulary (its tokens are 3 to 290), decoded by the default model's tokenizer in the engine.
COMMON = {"vocab_size": 300, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
COMMON |= {"max_position_embeddings": 128, "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2}


@dataclass
class Checkpoint:
    float_dir: Path
    fp8_dir: Path
    reference: torch.nn.Module  # transformers' model holding the dequantized weights


def _random(model_class, config, path: Path, tokenizer_dir: Path):
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms and biases away from their init, so that a misplaced one shows
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return model


def _fp8_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def _ceil_block_reference(model, fp8_dir: Path):
    """`model` (transformers, float) with every quantized linear's weight dequantized by transformers' ceil-block
    function from the checkpoint's tensors."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    tensors = _fp8_tensors(fp8_dir)
    with torch.no_grad():
        for name, module in model.named_modules():
            if f"{name}.weight_scale_inv" in tensors:
                weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"]
                module.weight.copy_(_dequantize_fp8_weight(weight, scale, [128, 128], torch.float32))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, default_model_dir) -> dict[str, Checkpoint]:
    full = transformers.LlamaConfig(**COMMON, hidden_size=256, intermediate_size=512, tie_word_embeddings=False)
    partial = transformers.Qwen2Config(**COMMON, hidden_size=192, intermediate_size=320, tie_word_embeddings=True)
    partial.initializer_range = 0.2  # larger weights: greedy choices rarely near ties, for the generation test
    made = {}
    for name, config, model_class in (
        ("full", full, transformers.LlamaForCausalLM),
        ("partial", partial, transformers.Qwen2ForCausalLM),
    ):
        config._attn_implementation = "eager"
        float_dir = tmp_path_factory.mktemp(f"{name}-float")
        model = _random(model_class, config, float_dir, default_model_dir)
        fp8_dir = lm_lite_fp8.quantize_fp8(float_dir, tmp_path_factory.mktemp(f"{name}-fp8"), overwrite=True)
        made[name] = Checkpoint(float_dir, fp8_dir, _ceil_block_reference(model, fp8_dir))
    return made


def _ours(path: Path, tp: TPGroup = SINGLE, **engine) -> Any:
    """Our model of the checkpoint at `path` on the CPU in float32 (this rank's part of it under `tp`)."""
    config, hf = TorchEngineConfig(**engine), load_hf_config(path)
    return build_model(path, config, hf, torch.device("cpu"), torch.float32, TorchAttentionBackend(), tp=tp)


def _our_weights(model) -> dict[str, torch.Tensor]:
    """{"<layer>.<our linear>": dequantized weight [out, in]} of every decoder linear."""
    return {
        f"{i}.{name}": layer.get_submodule(name).dequantized_weight()
        for i, layer in enumerate(model.layers)
        for name in LINEARS
    }


def _reference_weights(model) -> dict[str, torch.Tensor]:
    """The same linears in transformers' model, q/k/v and gate/up concatenated as we fuse them."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for name, parts in LINEARS.items():
            block = name.split(".")[0]
            out[f"{i}.{name}"] = torch.cat([layer.get_submodule(f"{block}.{p}").weight for p in parts.split()])
    return out


@pytest.fixture(scope="module")
def transformers_loaded(checkpoints):
    """transformers' own load of the "full" checkpoint (dequantized on the CPU), and what its quantizer logged."""
    records: list[logging.LogRecord] = []

    class Records(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Records()
    quantizer_log = logging.getLogger("transformers.quantizers.quantizer_finegrained_fp8")
    quantizer_log.addHandler(handler)
    transformers.utils.logging.warning_once.cache_clear()  # the warning is logged once per process
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["full"].fp8_dir, dtype=torch.float32)
    finally:
        quantizer_log.removeHandler(handler)
    return model.eval(), [r.getMessage() for r in records]


def test_transformers_dequantizes_the_checkpoint_on_the_cpu_and_warns(transformers_loaded):
    model, messages = transformers_loaded
    assert any("requires a GPU" in m and "dequantizing" in m for m in messages), messages
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.dtype == torch.float32


def test_transformers_reads_the_full_blocks_as_its_ceil_block_function(checkpoints, transformers_loaded):
    loaded, reference = _reference_weights(transformers_loaded[0]), _reference_weights(checkpoints["full"].reference)
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)


@pytest.mark.parametrize("case", ["full", "partial"])
def test_dequantized_weights_equal_transformers(checkpoints, case):
    ours = _our_weights(_ours(checkpoints[case].fp8_dir))
    reference = _reference_weights(checkpoints[case].reference)
    assert ours.keys() == reference.keys()
    for name, weight in reference.items():
        assert torch.equal(ours[name], weight), name


@pytest.mark.parametrize("case", ["full", "partial"])
def test_paged_logits_match_transformers(checkpoints, case, transformers_loaded):
    reference = transformers_loaded[0] if case == "full" else checkpoints[case].reference
    want = tp_ranks.families._hf_logits(reference, tp_ranks.families._tokens(seed=1))
    got = tp_ranks.model_logits(checkpoints[case].fp8_dir, None, {})
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < TOLERANCE, f"{case}: {diff:.3g} from transformers"


def test_the_fp8_checkpoint_keeps_embeddings_norms_and_head_in_floating_point(checkpoints):
    model = _ours(checkpoints["full"].fp8_dir)
    assert isinstance(model.layers[0].self_attn.qkv_proj, Fp8BlockLinear)
    assert not isinstance(model.lm_head, Fp8BlockLinear)
    reference = checkpoints["full"].reference
    assert torch.equal(model.lm_head.dense_weight(), reference.lm_head.weight)
    assert torch.equal(model.embed_tokens.weight, reference.model.embed_tokens.weight)


def _engine_greedy(model_dir: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    from lm_core import AsyncPipeline, GenerationConfig, Pipeline
    from lm_core.engine import EngineRequest
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model_dir, {"block_size": 16, "num_kv_blocks": 64, "max_batch_size": 4})
    config = GenerationConfig(max_new_tokens=steps, ignore_eos=True)
    with Pipeline(AsyncPipeline(engine, model_dir)) as pipe:

        async def run(ids: list[int]) -> list[int]:
            out: list[int] = []
            async for piece in pipe.async_pipeline.engine.generate(EngineRequest(uuid.uuid4().hex, ids, config)):
                out += piece.token_ids
            return out

        return [asyncio.run_coroutine_threadsafe(run(ids), pipe._loop).result() for ids in prompts]


def test_greedy_generation_equals_the_dequantized_model(checkpoints):
    steps = 12
    prompts = [torch.randint(3, 290, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 23)]
    ours = _engine_greedy(checkpoints["partial"].fp8_dir, prompts, steps)
    reference = checkpoints["partial"].reference
    for prompt, got in zip(prompts, ours, strict=True):
        ids = list(prompt)
        for step in range(steps):
            with torch.no_grad():
                logits = reference(input_ids=torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2)
            if got[step] != int(top.indices[0]):
                gap = (top.values[0] - top.values[1]).item()
                assert gap < TIE_TOLERANCE and got[step] in top.indices.tolist(), f"step {step}: {got[step]}"
                break  # a tie: the continuations may rightly differ from here
            ids.append(got[step])
        assert len(got) == steps


@pytest.mark.parametrize("case", ["full", "partial"])
def test_quantizing_at_load_equals_loading_the_lm_lite_checkpoint(checkpoints, case):
    online, offline = _ours(checkpoints[case].float_dir, quantization="fp8"), _ours(checkpoints[case].fp8_dir)
    online_weights, offline_weights = _our_weights(online), _our_weights(offline)
    assert all(torch.equal(online_weights[name], offline_weights[name]) for name in offline_weights)
    engine = {"quantization": "fp8"}
    got = tp_ranks.model_logits(checkpoints[case].float_dir, None, engine)
    assert torch.equal(got, tp_ranks.model_logits(checkpoints[case].fp8_dir, None, {}))


def test_each_rank_holds_its_block_aligned_share(checkpoints):
    """At tp 2 (no collective runs while loading) the ranks' dequantized weights are the whole model's rows of q, k,
    v, gate and up and inputs of o and down; k and v (64 rows a rank) share one 128-row block."""
    whole = _our_weights(_ours(checkpoints["full"].fp8_dir))
    for rank in (0, 1):
        for quantization in (None, "fp8"):
            path = checkpoints["full"].float_dir if quantization else checkpoints["full"].fp8_dir
            part = _our_weights(_ours(path, TPGroup(rank=rank, size=2), quantization=quantization))
            for name, weight in whole.items():
                if name.endswith(("o_proj", "down_proj")):
                    expected = weight.chunk(2, dim=1)[rank]
                else:
                    parts = [256, 128, 128] if name.endswith("qkv_proj") else [512, 512]
                    expected = torch.cat([p.chunk(2)[rank] for p in weight.split(parts)])
                assert torch.equal(part[name], expected), (name, rank, quantization)


def test_tensor_parallel_2_gives_the_tp1_logits(checkpoints):
    full = checkpoints["full"]
    jobs = [("fp8", full.fp8_dir, None, {}), ("online", full.float_dir, None, {"quantization": "fp8"})]
    got = tp_ranks.run_ranks(2, jobs)
    whole = tp_ranks.model_logits(full.fp8_dir, None, {})
    for name, logits in got.items():
        diff = (logits - whole).abs().max().item()
        assert diff < TOLERANCE, f"{name} tp 2: {diff:.3g} from tp 1"


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_a_shard_that_cuts_a_block_is_refused_naming_the_tensor(checkpoints, quantization):
    # tp 2 leaves each rank 160 of down_proj's 320 inputs: the second 128-input block would be cut.
    path = checkpoints["partial"].float_dir if quantization else checkpoints["partial"].fp8_dir
    message = r"layers\.0\.mlp\.down_proj\.weight: tensor parallel 2 .* 160 of its 320 inputs, which cuts .* 128-wide"
    with pytest.raises(ValueError, match=message):
        _ours(path, TPGroup(rank=1, size=2), quantization=quantization)


@pytest.mark.parametrize("name", ["weight", "weight_scale_inv"])
def test_a_column_share_that_cuts_a_block_is_refused(name):
    """q_proj of 192 rows at tp 2: 96 rows a rank, the first block's rows 96-127 on rank 1."""
    layer = Fp8BlockLinear(192, 96, False)
    mark_linear_shards(layer, "column")
    weight = torch.zeros(192, 192, dtype=torch.float8_e4m3fn)
    tensor = weight if name == "weight" else torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"q_proj\.x: tensor parallel 2 gives each rank 96"):
        layer.load_part(name, tensor, 0, [96], TPGroup(rank=1, size=2), "q_proj.x")


@pytest.mark.parametrize(
    ("quantization_config", "quantization", "message"),
    [
        ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, None, "fmt 'e5m2'"),
        ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, None, "'static'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, None, "two positive integers"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, "fp8", "this one is 'awq'"),
        (None, "int4", "'int4' is not supported"),
    ],
)
def test_unsupported_fp8_configs_are_named(quantization_config, quantization, message):
    config = transformers.LlamaConfig(**COMMON, hidden_size=64, intermediate_size=128)
    config.quantization_config = quantization_config
    with pytest.raises(ValueError, match=message):
        parse_quant_config(config, quantization)


def test_fp8_configs_parse_with_their_skip_lists():
    config = transformers.LlamaConfig(**COMMON, hidden_size=64, intermediate_size=128)
    config.quantization_config = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [64, 32],
        "modules_to_not_convert": ["lm_head"],
        "ignored_layers": ["model.layers.1.mlp.down_proj"],
    }
    quant = parse_quant_config(config)
    assert quant is not None and quant.block_size == (64, 32) and not quant.online
    assert quant.modules_to_not_convert == ("lm_head", "model.layers.1.mlp.down_proj")
    config.quantization_config = None
    online = parse_quant_config(config, "fp8")
    assert online is not None and online.method == "fp8" and online.online and online.block_size == (128, 128)
    with pytest.raises(ValueError, match=r"ModelConfig\.quantization"):
        ModelConfig(quantization="int8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_give_about_the_cpu_logits(checkpoints):
    """On CUDA the activations are quantized too (1x128 groups): the logits move by about e4m3's precision."""
    pytest.importorskip("triton")
    for case in ("full", "partial"):
        cpu = tp_ranks.model_logits(checkpoints[case].fp8_dir, None, {})
        gpu = tp_ranks.model_logits(checkpoints[case].fp8_dir, None, {}, device="cuda")
        assert (gpu - cpu).abs().max() < 0.05 * cpu.abs().max(), case


def test_the_start_up_summary_names_the_fp8_path(checkpoints):
    from lm_torch.runner.startup import kernel_lines

    (line,) = kernel_lines(_ours(checkpoints["full"].fp8_dir))
    # Every decoder linear of the tiny Llama (q/k/v and gate/up fused: 4 a layer), dequantized on the CPU.
    num_layers = len(_ours(checkpoints["full"].fp8_dir).layers)
    assert f"{4 * num_layers} FP8 linear layers (128x128 weight blocks): dequantized at load (CPU)" in line
    assert kernel_lines(_ours(checkpoints["full"].float_dir)) == []
