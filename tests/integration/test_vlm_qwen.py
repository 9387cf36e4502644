"""Qwen2.5-VL and Qwen2-VL through `pipeline()` against transformers, on tiny random checkpoints (fp32, CPU).

Every comparison goes through the whole toolkit: lm-core renders the messages, lm-vl loads and preprocesses the
images and expands the placeholders, lm-torch runs the vision tower, M-RoPE and the paged language model. The
reference is transformers' model on the same token ids with its own PIL image processor's pixels.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline
from lm_core.engine import EngineRequest

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_vl")

TOLERANCE = 1e-4
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["2.5", "2"])
def model_dir(request, tmp_path_factory, tiny_vlms) -> Path:
    return tiny_vlms.make_qwen2_5_vl(tmp_path_factory.mktemp(f"qwen{request.param}-vl"), version=request.param)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def make_pipe(model_dir: Path, **config) -> Pipeline:
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(
        model_dir, {"block_size": 16, "num_kv_blocks": 256, "dtype": "float32", **config}
    )
    return Pipeline(AsyncPipeline(engine, model_dir))


@pytest.fixture(scope="module")
def pipe(model_dir):
    with make_pipe(model_dir) as pipe:
        yield pipe


def image_message(images, text: str) -> dict:
    return {
        "role": "user",
        "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}],
    }


def reference(tiny_vlms, model_dir, hf_model, ids: list[int], images: list) -> tuple[torch.Tensor, list[int]]:
    """transformers' log-softmax at every prompt position [len(ids), vocab] and its 16 greedy tokens."""
    inputs = tiny_vlms.hf_qwen_inputs(model_dir, ids, images)
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(**inputs).logits[0].float(), -1)
        generated = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return logprobs, generated[0, len(ids) :].tolist()


def assert_matches(response, ids: list[int], logprobs: torch.Tensor, greedy: list[int]) -> None:
    assert response.token_ids == greedy
    assert response.prompt_logprobs is not None and len(response.prompt_logprobs) == len(ids)
    worst = 0.0
    for position, entry in enumerate(response.prompt_logprobs[1:], start=1):
        assert entry is not None and ids[position] in entry
        for token, value in entry.items():
            worst = max(worst, abs(value - logprobs[position - 1, token].item()))
    assert worst < TOLERANCE, worst


def run_and_compare(pipe, tiny_vlms, model_dir, hf_model, messages, images) -> None:
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    prepared = pipe.async_pipeline.prepare(messages, cfg)
    response = pipe(messages, cfg)
    assert_matches(
        response, prepared.prompt_ids, *reference(tiny_vlms, model_dir, hf_model, prepared.prompt_ids, images)
    )


def test_one_image_matches_transformers(pipe, tiny_vlms, model_dir, hf_model):
    image = tiny_vlms.random_image(1, (120, 90))
    run_and_compare(pipe, tiny_vlms, model_dir, hf_model, [image_message([image], "Describe the image.")], [image])


def test_two_images_of_different_sizes(pipe, tiny_vlms, model_dir, hf_model):
    images = [tiny_vlms.random_image(2, (200, 60)), tiny_vlms.random_image(3, (64, 140))]
    run_and_compare(pipe, tiny_vlms, model_dir, hf_model, [image_message(images, "Compare the two images.")], images)


def test_an_image_in_the_second_turn(pipe, tiny_vlms, model_dir, hf_model):
    image = tiny_vlms.random_image(4, (100, 100))
    messages = [
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "The sky is blue."},
        image_message([image], "And in this picture?"),
    ]
    run_and_compare(pipe, tiny_vlms, model_dir, hf_model, messages, [image])


def test_a_tuple_prompt_is_one_user_message_with_its_image(pipe, tiny_vlms):
    image = tiny_vlms.random_image(5, (90, 90))
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    assert (
        pipe(("Describe the image.", image), cfg).token_ids
        == pipe([image_message([image], "Describe the image.")], cfg).token_ids
    )


def test_a_batch_mixing_text_and_images_gives_each_its_own_output(pipe, tiny_vlms):
    images = [tiny_vlms.random_image(6, (80, 120)), tiny_vlms.random_image(7, (150, 70))]
    prompts = [
        [image_message([images[0]], "Describe the image.")],
        "How many objects are there?",
        [image_message([images[1]], "What colour is the sky?")],
        [{"role": "user", "content": "Compare the two images."}],
    ]
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    together = [r.token_ids for r in pipe(prompts, cfg)]
    alone = [pipe(p, cfg).token_ids for p in prompts]
    assert together == alone


def _engine_run(pipe, messages, cfg):
    """(tokens, cached prompt tokens) of one request run on the engine directly."""
    prepared = pipe.async_pipeline.prepare(messages, cfg)
    request = EngineRequest(uuid.uuid4().hex, prepared.prompt_ids, prepared.gen_config, multimodal=prepared.multimodal)

    async def run():
        tokens, cached = [], 0
        async for out in pipe.async_pipeline.engine.generate(request):
            tokens += out.token_ids
            cached = max(cached, out.num_cached_tokens)
        return tokens, cached

    return asyncio.run_coroutine_threadsafe(run(), pipe._loop).result(timeout=120), prepared


def test_prefix_cache_hits_the_same_image_and_misses_another(model_dir, tiny_vlms):
    text = "Describe the image in one sentence. " * 3
    first, second = tiny_vlms.random_image(8, (112, 112)), tiny_vlms.random_image(9, (112, 112))
    cfg = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    with make_pipe(model_dir) as pipe:
        (tokens, cached), prepared = _engine_run(pipe, [image_message([first], text)], cfg)
        assert cached == 0
        (again, cached_same), _ = _engine_run(pipe, [image_message([first], text)], cfg)
        (other, cached_other), _ = _engine_run(pipe, [image_message([second], text)], cfg)
        reference = [pipe([image_message([second], text)], cfg).token_ids]
    span = prepared.multimodal[0]
    assert again == tokens
    # The same image: every full block before the last token hits; another image: none from the image's block on.
    assert cached_same == (len(prepared.prompt_ids) - 1) // 16 * 16 > span["offset"] + span["length"]
    assert cached_other == span["offset"] // 16 * 16
    assert other == reference[0]


def test_chunked_prefill_keeps_each_image_whole(model_dir, tiny_vlms, hf_model):
    images = [tiny_vlms.random_image(10, (224, 224)), tiny_vlms.random_image(11, (120, 200))]
    messages = [image_message(images, "Compare the two images. " * 4)]
    # Chunks of 24 tokens: smaller than each image's span (64 and 35 placeholders), which goes whole into a step.
    with make_pipe(model_dir, max_prefill_token_num=24) as pipe:
        run_and_compare(pipe, tiny_vlms, model_dir, hf_model, messages, images)
        assert all(item["length"] > 24 for item in pipe.async_pipeline.prepare(messages).multimodal)


def test_preempted_image_requests_keep_their_outputs(model_dir, tiny_vlms):
    images = [tiny_vlms.random_image(20 + i, (100 + 10 * i, 110)) for i in range(6)]
    prompts = [[image_message([im], "Describe the image in one sentence.")] for im in images]
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    with make_pipe(model_dir) as pipe:
        alone = [pipe(p, cfg).token_ids for p in prompts]
    # 14 blocks of 16 hold about three of these requests at a time: the others wait or are preempted.
    with make_pipe(model_dir, num_kv_blocks=14) as pipe:
        together = [r.token_ids for r in pipe(prompts, cfg)]
        num_preemptions = pipe.async_pipeline.engine.scheduler.num_preemptions
    assert together == alone
    assert num_preemptions > 0


def test_the_encoder_cache_runs_the_tower_once_for_a_repeated_image(model_dir, tiny_vlms):
    image = tiny_vlms.random_image(30, (96, 96))
    cfg = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    with make_pipe(model_dir, enable_prefix_caching=False) as pipe:
        media = pipe.async_pipeline.engine.executor.runner.media
        first = pipe([image_message([image], "Describe the image.")], cfg).token_ids
        second = pipe([image_message([image], "What colour is the sky?")], cfg).token_ids
        assert media.num_encoded == 1 and media.cache.hits == 1
        assert first and second
    with make_pipe(model_dir, enable_prefix_caching=False, encoder_cache_tokens=0) as pipe:
        media = pipe.async_pipeline.engine.executor.runner.media
        assert pipe([image_message([image], "Describe the image.")], cfg).token_ids == first
        pipe([image_message([image], "Describe the image.")], cfg)
        assert media.num_encoded == 2


def test_a_video_of_frames_matches_transformers(pipe, tiny_vlms, model_dir, hf_model):
    """A video given as frames: lm-vl's video patches (its own test holds them to transformers' ordering) through
    our tower and M-RoPE against transformers' model on the same patches (its video processor needs torchvision)."""
    import json

    frames = [tiny_vlms.random_image(40 + k, (112, 84)) for k in range(4)]
    messages = [
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}]}
    ]
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    prepared = pipe.async_pipeline.prepare(messages, cfg)
    (item,) = prepared.multimodal
    assert item["modality"] == "video" and item["meta"]["grid_thw"][0] == 2  # 4 frames, temporal patches of 2
    ids = prepared.prompt_ids
    video_token = json.loads((model_dir / "config.json").read_text())["video_token_id"]
    inputs = {
        "input_ids": torch.tensor([ids]),
        "mm_token_type_ids": (torch.tensor([ids]) == video_token).int() * 2,
        "pixel_values_videos": item["pixel_values"],
        "video_grid_thw": torch.tensor([item["meta"]["grid_thw"]]),
    }
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(**inputs).logits[0].float(), -1)
        greedy = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids) :].tolist()
    assert_matches(pipe(messages, cfg), ids, logprobs, greedy)


def test_two_tensor_parallel_ranks_give_the_one_rank_outputs(model_dir, pipe, tiny_vlms):
    """The text model split over 2 gloo ranks, the tower replicated on each (read whole from the lazy checkpoint)."""
    if "2.5" not in model_dir.name:
        pytest.skip("one family is enough: the split is the text model's")
    images = [tiny_vlms.random_image(50, (120, 90)), tiny_vlms.random_image(51, (90, 150))]
    prompts = [[image_message([image], "Describe the image.")] for image in images]
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    reference = [r.token_ids for r in pipe(prompts, cfg)]
    with make_pipe(model_dir, tp=2) as split:
        assert [r.token_ids for r in split(prompts, cfg)] == reference
