"""Gemma 3 through `pipeline()` against transformers' `Gemma3ForConditionalGeneration`, on a tiny random checkpoint
(fp32, CPU; `tiny_gemma3.py`).

Every comparison goes through the whole toolkit: lm-core renders the messages, lm-vl preprocesses the images and
expands each `<start_of_image>`, lm-torch runs SigLIP and the projector, writes the features over the scaled token
embeddings and prefills with Gemma 3's attention rule (an image's tokens attend each other bidirectionally, sliding
layers keep their window). The reference is transformers' model on the same token ids with `token_type_ids` marking
the image tokens and its own PIL image processor's pixels: 16 greedy tokens equal, and prompt logprobs (top 5 and
the prompt's token at every position) within 1e-4.
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline
from lm_core.engine import EngineRequest

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_vl")

TOLERANCE = 1e-4
NEW_TOKENS = 16
CONFIG = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)


@pytest.fixture(scope="module")
def tiny() -> Any:
    """`tiny_gemma3.py` beside this file, loaded by path (test modules cannot import each other)."""
    spec = importlib.util.spec_from_file_location("tiny_gemma3", Path(__file__).with_name("tiny_gemma3.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory) -> Path:
    return tiny.make_gemma3(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def hf_model(model_dir) -> Any:
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None  # 16 tokens whatever they are, as `ignore_eos` asks of ours
    return model


def make_pipe(model_dir: Path, **config: Any) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(
        model_dir, {"block_size": 16, "num_kv_blocks": 64, "dtype": "float32", **config}
    )
    return Pipeline(AsyncPipeline(engine, model_dir))


@pytest.fixture(scope="module")
def pipe(model_dir):
    with make_pipe(model_dir) as pipe:
        assert type(pipe.async_pipeline.engine.executor.runner.model).__name__ == "Gemma3ForConditionalGeneration"
        yield pipe


def image_message(images: list[Any], text: str) -> dict[str, Any]:
    """A user message: the images first, then the text."""
    return {
        "role": "user",
        "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}],
    }


def reference(
    tiny: Any, model_dir: Path, hf_model: Any, ids: list[int], images: list[Any], bidirectional: bool = True
) -> tuple[torch.Tensor, list[int]]:
    """transformers' log-softmax at every prompt position [len(ids), vocab] and its 16 greedy tokens (without
    `bidirectional`: no token types, so the image tokens attend causally too)."""
    inputs = tiny.hf_inputs(model_dir, ids, images)
    if not bidirectional:
        del inputs["token_type_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(**inputs).logits[0].float(), -1)
        generated = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logprobs, generated[0, len(ids) :].tolist()


def assert_matches(response: Any, ids: list[int], logprobs: torch.Tensor, greedy: list[int]) -> None:
    """Our greedy tokens are transformers'; every prompt logprob we report is within TOLERANCE of its."""
    assert response.token_ids == greedy
    assert response.prompt_logprobs is not None and len(response.prompt_logprobs) == len(ids)
    worst = 0.0
    for position, entry in enumerate(response.prompt_logprobs[1:], start=1):
        assert entry is not None and ids[position] in entry and len(entry) >= 5
        for token, value in entry.items():
            worst = max(worst, abs(value - logprobs[position - 1, token].item()))
    assert worst < TOLERANCE, worst


def compare(pipe: Pipeline, tiny: Any, model_dir: Path, hf_model: Any, messages: Any, images: list[Any]) -> list[int]:
    """Run `messages` and compare with transformers; returns the prompt's token ids."""
    ids = pipe.async_pipeline.prepare(messages, CONFIG).prompt_ids
    assert_matches(pipe(messages, CONFIG), ids, *reference(tiny, model_dir, hf_model, ids, images))
    return ids


def test_one_image_matches_transformers(pipe, tiny, model_dir, hf_model):
    image = tiny.random_image(1, (120, 90))
    messages = [image_message([image], "Describe the image.")]
    prepared = pipe.async_pipeline.prepare(messages, CONFIG)
    (span,) = prepared.multimodal
    assert span["length"] == 4
    ids = compare(pipe, tiny, model_dir, hf_model, messages, [image])
    # The rule matters: attending causally inside the image moves the logprobs after it far beyond the tolerance.
    bidirectional, _ = reference(tiny, model_dir, hf_model, ids, [image])
    causal, _ = reference(tiny, model_dir, hf_model, ids, [image], bidirectional=False)
    assert (bidirectional - causal)[span["offset"] :].abs().max().item() > 1000 * TOLERANCE


def test_two_images_in_one_prompt(pipe, tiny, model_dir, hf_model):
    images = [tiny.random_image(2, (200, 60)), tiny.random_image(3, (64, 140))]
    messages = [image_message(images, "Compare the two images.")]
    assert len(pipe.async_pipeline.prepare(messages, CONFIG).multimodal) == 2
    compare(pipe, tiny, model_dir, hf_model, messages, images)


def test_a_text_only_prompt_matches_transformers(pipe, tiny, model_dir, hf_model):
    compare(pipe, tiny, model_dir, hf_model, [{"role": "user", "content": "What colour is the sky?"}], [])


def test_a_batch_mixing_text_and_images_matches_transformers(pipe, tiny, model_dir, hf_model):
    """Requests prefilled in the same steps: each sequence's image rows get their own limits."""
    images = [tiny.random_image(4, (80, 120)), tiny.random_image(5, (150, 70)), tiny.random_image(6, (90, 90))]
    prompts = [
        ([image_message(images[:2], "How many objects are there?")], images[:2]),
        ([{"role": "user", "content": "Describe the image in one sentence."}], []),
        ([image_message(images[2:], "What colour is the sky?")], images[2:]),
    ]
    responses = pipe([messages for messages, _ in prompts], CONFIG)
    for (messages, images_of), response in zip(prompts, responses, strict=True):
        ids = pipe.async_pipeline.prepare(messages, CONFIG).prompt_ids
        assert_matches(response, ids, *reference(tiny, model_dir, hf_model, ids, images_of))


def test_image_spans_straddling_chunk_boundaries_stay_exact(model_dir, tiny, hf_model):
    """A token budget that would end a chunk inside each image: the chunk stops before it, the next takes it whole."""
    images = [tiny.random_image(7, (100, 100)), tiny.random_image(8, (60, 120))]
    messages = [
        image_message(images[:1], "What colour is the sky?"),
        {"role": "assistant", "content": "A picture."},
        image_message(images[1:], "And this one?"),
    ]
    with make_pipe(model_dir) as probe:
        spans = probe.async_pipeline.prepare(messages, CONFIG).multimodal
    budget = spans[0]["offset"] + 2
    first, second = spans[0]["offset"], spans[1]["offset"]
    assert first < budget < first + 4  # the first chunk would end inside the first image
    # Chunks of `budget` from the first image on would end inside the second one too.
    assert any(second < first + k * budget < second + 4 for k in range(1, 8))
    with make_pipe(model_dir, max_prefill_token_num=budget) as pipe:
        compare(pipe, tiny, model_dir, hf_model, messages, images)


def _engine_run(pipe: Pipeline, messages: Any, cfg: GenerationConfig) -> tuple[list[int], list[dict[int, float]], int]:
    """(tokens, their logprobs, cached prompt tokens) of one request run on the engine directly."""
    prepared = pipe.async_pipeline.prepare(messages, cfg)
    request = EngineRequest(uuid.uuid4().hex, prepared.prompt_ids, prepared.gen_config, multimodal=prepared.multimodal)

    async def run() -> tuple[list[int], list[dict[int, float]], int]:
        tokens, logprobs, cached = [], [], 0
        async for out in pipe.async_pipeline.engine.generate(request):
            tokens += out.token_ids
            logprobs += out.logprobs or []
            cached = max(cached, out.num_cached_tokens)
        return tokens, logprobs, cached

    return asyncio.run_coroutine_threadsafe(run(), pipe._loop).result(timeout=120)


def test_a_prefix_cache_hit_over_an_image_reads_its_bidirectional_kv(model_dir, tiny, hf_model):
    """A repeated prompt takes the image's KV (computed with the image attending itself) from the prefix cache."""
    image = tiny.random_image(9, (112, 112))
    messages = [image_message([image], "Describe the image in one sentence. " * 3)]
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    with make_pipe(model_dir) as pipe:
        prepared = pipe.async_pipeline.prepare(messages, cfg)
        first, first_logprobs, cached_first = _engine_run(pipe, messages, cfg)
        again, again_logprobs, cached_again = _engine_run(pipe, messages, cfg)
    span = prepared.multimodal[0]
    assert cached_first == 0 and cached_again > span["offset"] + span["length"]
    inputs = tiny.hf_inputs(model_dir, prepared.prompt_ids, [image])
    with torch.no_grad():
        out = hf_model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert first == again == out.sequences[0, len(prepared.prompt_ids) :].tolist()
    for logprobs in (first_logprobs, again_logprobs):
        assert len(logprobs) == NEW_TOKENS
        for entry, logits in zip(logprobs, out.logits, strict=True):
            expected = torch.log_softmax(logits[0].float(), -1)
            assert max(abs(value - expected[token].item()) for token, value in entry.items()) < TOLERANCE
