"""LLaVA-1.5 and Gemma 3 preprocessing equals transformers' PIL processors, and their prompt expansion its processors'.

Pixel parity: random-noise RGB images of 20 sizes per family (tiny, extreme aspect ratios, up to 1500 px) through
the published preprocessor configs, against `CLIPImageProcessorPil` / `LlavaImageProcessorPil` (do_pad) /
`Gemma3ImageProcessorPil`. Prompts: against transformers' `LlavaProcessor` and `Gemma3Processor` built on a small
BPE tokenizer trained here (no torchvision needed), then `expand_prompt` + `placeholder_spans` round trips.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor as HFGemma3Processor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor as HFLlavaProcessor

from lm_vl.processors.base import VisionItem, load_processor, placeholder_spans, processor_class
from lm_vl.processors.gemma3 import Gemma3Processor
from lm_vl.processors.llava import LlavaProcessor

# llava-hf/llava-1.5-7b-hf's preprocessor_config.json (CLIPImageProcessor) and the vision part of its config.json.
LLAVA_PRE = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
LLAVA_CONFIG = {
    "model_type": "llava",
    "image_token_index": 32000,
    "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
    "vision_feature_select_strategy": "default",
}
# google/gemma-3-4b-it's preprocessor_config.json and the vision part of its config.json.
GEMMA_PRE = {
    "do_normalize": True,
    "do_pan_and_scan": None,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_seq_length": 256,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 896, "width": 896},
}
GEMMA_CONFIG = {
    "model_type": "gemma3",
    "mm_tokens_per_image": 256,
    "vision_config": {"model_type": "siglip_vision_model", "image_size": 896, "patch_size": 14},
}
# The expansion Gemma3Processor documents (`full_image_sequence`), for 256 soft tokens.
GEMMA_SEQUENCE = "\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"


def _sizes(seed: int) -> list[tuple[int, int]]:
    """20 (height, width): tiny, square, odd, extreme aspect ratios, then random ones up to 1500 px."""
    fixed = [(20, 30), (30, 20), (1, 1), (336, 336), (337, 335), (1500, 60), (50, 1400), (1500, 1500), (12, 900)]
    rng = np.random.default_rng(seed)
    while len(fixed) < 20:
        fixed.append((int(rng.integers(16, 1500)), int(rng.integers(16, 1500))))
    return fixed


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + height * 7919 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _max_diff(ours: VisionItem, reference: object) -> float:
    ref = torch.as_tensor(np.asarray(reference["pixel_values"]))
    assert ours.pixel_values.dtype == torch.float32
    assert tuple(ours.pixel_values.shape) == tuple(ref.shape)
    return float((ours.pixel_values - ref).abs().max())


@pytest.fixture(scope="module")
def hf_clip() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(**LLAVA_PRE)


@pytest.fixture(scope="module")
def hf_gemma() -> Gemma3ImageProcessorPil:
    return Gemma3ImageProcessorPil(**GEMMA_PRE)


@pytest.mark.parametrize(("height", "width"), _sizes(1))
def test_llava_matches_clip_pil_processor(hf_clip: CLIPImageProcessorPil, height: int, width: int) -> None:
    image = _image(height, width)
    item = LlavaProcessor(LLAVA_CONFIG, LLAVA_PRE).preprocess(image)
    diff = _max_diff(item, hf_clip(images=image, return_tensors="np"))
    print(f"llava {height}x{width}: max abs diff {diff:.3g}")
    assert diff < 1e-5
    assert tuple(item.pixel_values.shape) == (1, 3, 336, 336) and item.num_tokens == 576


@pytest.mark.parametrize(("height", "width"), [(20, 30), (700, 45), (45, 700), (336, 336), (999, 1000), (1, 2)])
def test_llava_do_pad_matches_llava_pil_processor(height: int, width: int) -> None:
    pre = {**LLAVA_PRE, "do_pad": True}
    image = _image(height, width, seed=3)
    item = LlavaProcessor(LLAVA_CONFIG, pre).preprocess(image)
    diff = _max_diff(item, LlavaImageProcessorPil(**pre)(images=image, return_tensors="np"))
    print(f"llava do_pad {height}x{width}: max abs diff {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize(
    ("pre", "vision"),
    [
        # A crop larger than the resized image: transformers zero-pads it.
        ({"size": {"shortest_edge": 20}, "crop_size": {"height": 28, "width": 28}}, {"image_size": 28}),
        # Fixed-size resize without a crop; an int size (shortest edge, as get_size_dict reads it).
        ({"size": {"height": 336, "width": 336}, "do_center_crop": False}, {}),
        ({"size": 336, "crop_size": 336, "do_normalize": False}, {}),
        ({"do_rescale": False, "resample": 2}, {}),
    ],
)
def test_llava_other_clip_settings(pre: dict, vision: dict) -> None:
    pre = {**LLAVA_PRE, **pre}
    config = {**LLAVA_CONFIG, "vision_config": {**LLAVA_CONFIG["vision_config"], **vision}}
    reference = CLIPImageProcessorPil(**pre)
    for height, width in [(17, 23), (23, 17), (300, 90)]:
        image = _image(height, width, seed=5)
        assert _max_diff(LlavaProcessor(config, pre).preprocess(image), reference(images=image)) < 1e-5


def test_llava_token_count_follows_the_select_strategy() -> None:
    image = _image(40, 50)
    full = {**LLAVA_CONFIG, "vision_feature_select_strategy": "full"}
    assert LlavaProcessor(full, LLAVA_PRE).preprocess(image).num_tokens == 577
    small = {**LLAVA_CONFIG, "vision_config": {"patch_size": 14, "image_size": 224}}
    pre = {**LLAVA_PRE, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    assert LlavaProcessor(small, pre).preprocess(image).num_tokens == 256


@pytest.mark.parametrize(("height", "width"), _sizes(2))
def test_gemma3_matches_pil_processor(hf_gemma: Gemma3ImageProcessorPil, height: int, width: int) -> None:
    image = _image(height, width, seed=1)
    item = Gemma3Processor(GEMMA_CONFIG, GEMMA_PRE).preprocess(image)
    diff = _max_diff(item, hf_gemma(images=image, return_tensors="np"))
    print(f"gemma3 {height}x{width}: max abs diff {diff:.3g}")
    assert diff < 1e-5
    assert tuple(item.pixel_values.shape) == (1, 3, 896, 896) and item.num_tokens == 256


def test_inputs_device_and_hash() -> None:
    array = np.asarray(_image(30, 40))
    llava = LlavaProcessor(LLAVA_CONFIG, LLAVA_PRE)
    from_pil = llava.preprocess(Image.fromarray(array))
    from_array = llava.preprocess(array, device="cpu")
    from_tensor = llava.preprocess(torch.from_numpy(array).permute(2, 0, 1).contiguous(), device=torch.device("cpu"))
    assert torch.equal(from_pil.pixel_values, from_array.pixel_values)
    assert torch.equal(from_pil.pixel_values, from_tensor.pixel_values)
    assert from_pil.content_hash == from_array.content_hash == from_tensor.content_hash
    padded = LlavaProcessor(LLAVA_CONFIG, {**LLAVA_PRE, "do_pad": True}).preprocess(array)
    gemma = Gemma3Processor(GEMMA_CONFIG, GEMMA_PRE).preprocess(array)
    other = llava.preprocess(np.asarray(_image(30, 40, seed=9)))
    assert len({from_pil.content_hash, padded.content_hash, gemma.content_hash, other.content_hash}) == 4


def test_non_uint8_input_is_refused() -> None:
    for processor in (LlavaProcessor(LLAVA_CONFIG, LLAVA_PRE), Gemma3Processor(GEMMA_CONFIG, GEMMA_PRE)):
        with pytest.raises(ValueError, match="uint8"):
            processor.preprocess(np.zeros((20, 30, 3), dtype=np.float32))
        with pytest.raises(ValueError, match="uint8"):
            processor.preprocess(torch.zeros(3, 20, 30))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="do_pan_and_scan"):
        Gemma3Processor(GEMMA_CONFIG, {**GEMMA_PRE, "do_pan_and_scan": True})
    with pytest.raises(ValueError, match="image_seq_length"):
        Gemma3Processor(GEMMA_CONFIG, {**GEMMA_PRE, "image_seq_length": 64})
    with pytest.raises(ValueError, match="resample"):
        Gemma3Processor(GEMMA_CONFIG, {**GEMMA_PRE, "resample": 1})
    with pytest.raises(ValueError, match="crop_size"):
        LlavaProcessor(LLAVA_CONFIG, {**LLAVA_PRE, "crop_size": {"height": 224, "width": 224}})
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        LlavaProcessor({**LLAVA_CONFIG, "vision_feature_select_strategy": "cls"}, LLAVA_PRE)


def test_registered_and_loaded_from_a_checkpoint(tmp_path) -> None:
    assert processor_class("llava") is LlavaProcessor and processor_class("gemma3") is Gemma3Processor
    (tmp_path / "config.json").write_text(json.dumps(GEMMA_CONFIG))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(GEMMA_PRE))
    assert isinstance(load_processor(tmp_path), Gemma3Processor)


def _tokenizer(special: list[str], **kwargs: object) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here, with the families' special tokens added."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["USER: what is shown in this picture and that one? ASSISTANT: two cats."] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kwargs
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    return tokenizer


def _round_trip(processor: LlavaProcessor | Gemma3Processor, tokenizer: PreTrainedTokenizerFast, text: str) -> list:
    """Two images through `expand_prompt`, tokenization and `placeholder_spans`; returns the token ids."""
    images = [_image(30, 20), _image(40, 90)]
    items = [processor.preprocess(image) for image in images]
    ids = tokenizer(processor.expand_prompt(text, items), add_special_tokens=False)["input_ids"]
    placeholder = processor.placeholder_ids(tokenizer.get_vocab())
    spans = placeholder_spans(ids, items, placeholder)
    assert [length for _, length in spans] == [item.num_tokens for item in items]
    assert spans[0][0] + spans[0][1] < spans[1][0]
    for offset, length in spans:
        assert set(ids[offset : offset + length]) == {placeholder["image"]}
    assert ids.count(placeholder["image"]) == sum(item.num_tokens for item in items)
    return ids


def test_llava_prompt_matches_transformers_llava_processor() -> None:
    tokenizer = _tokenizer(["<image>"])
    reference = HFLlavaProcessor(
        image_processor=LlavaImageProcessorPil(**LLAVA_PRE),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # llava-1.5-7b-hf's processor_config.json
    )
    processor = LlavaProcessor(LLAVA_CONFIG, LLAVA_PRE)
    text = "USER: <image>\nwhat is shown in this picture and <image> that one? ASSISTANT:"
    ids = _round_trip(processor, tokenizer, text)
    expected = reference(images=[_image(30, 20), _image(40, 90)], text=text, return_tensors="np")
    assert ids == expected["input_ids"][0].tolist()
    assert processor.replacement(processor.preprocess(_image(20, 20))) == "<image>" * 576


def test_gemma3_prompt_matches_transformers_gemma3_processor() -> None:
    tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _tokenizer(list(tokens.values()), extra_special_tokens=tokens)
    reference = HFGemma3Processor(
        image_processor=Gemma3ImageProcessorPil(**GEMMA_PRE), tokenizer=tokenizer, image_seq_length=256
    )
    processor = Gemma3Processor(GEMMA_CONFIG, GEMMA_PRE)
    item = processor.preprocess(_image(20, 20))
    assert processor.replacement(item) == reference.full_image_sequence == GEMMA_SEQUENCE
    text = "<start_of_turn>user\n<start_of_image>what is shown in this picture and <start_of_image> that one?"
    ids = _round_trip(processor, tokenizer, text)
    expected = reference(images=[_image(30, 20), _image(40, 90)], text=text, return_tensors="np")
    assert ids == expected["input_ids"][0].tolist()
