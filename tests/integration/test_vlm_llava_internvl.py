"""LLaVA-1.5 and InternVL3 through `Pipeline` against transformers, on tiny random checkpoints (fp32, CPU).

lm-core renders the messages with the family's chat template, lm-vl preprocesses the images and expands the
placeholders, lm-torch runs the vision tower (CLIP; InternViT over every tile of the step's images in one batch) and
the paged language model. The reference is transformers' model on the same token ids with its own PIL image
processor's pixels. The loader tests check every checkpoint tensor is used or deliberately skipped, in each layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lm_core import AsyncPipeline, GenerationConfig, Pipeline

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_vl")

TOLERANCE = 1e-4
NEW_TOKENS = 16
# Tower tensors the tiny checkpoints hold but inference never reads: LLaVA selects hidden state -2 of 2 layers, so
# layer 1 and CLIP's post-norm go unused; InternViT under mean pooling has no final norm to skip.
SKIPPED_PATTERNS = {
    "llava": ("vision_tower.encoder.layers.1.", "vision_tower.post_layernorm."),
    "internvl": (),
}


@pytest.fixture(scope="module", params=["llava", "internvl"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory, tiny_vlms) -> Path:
    return getattr(tiny_vlms, f"make_{family}")(tmp_path_factory.mktemp(family))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def pipe(model_dir):
    from lm_torch.engine import TorchEngine

    engine = TorchEngine.from_pretrained(model_dir, {"block_size": 16, "num_kv_blocks": 256, "dtype": "float32"})
    with Pipeline(AsyncPipeline(engine, model_dir)) as pipe:
        yield pipe


def image_message(images, text: str) -> dict:
    return {
        "role": "user",
        "content": [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}],
    }


def run_and_compare(pipe, tiny_vlms, family, model_dir, hf_model, images, text: str) -> list[dict]:
    """Our greedy tokens and top-5 prompt logprobs against transformers'; returns our multimodal items."""
    messages = [image_message(images, text)]
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=5)
    prepared = pipe.async_pipeline.prepare(messages, cfg)
    ids = prepared.prompt_ids
    response = pipe(messages, cfg)
    inputs = getattr(tiny_vlms, f"hf_{family}_inputs")(model_dir, ids, images)
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(**inputs).logits[0].float(), -1)  # [len(ids), vocab]
        generated = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert response.token_ids == generated[0, len(ids) :].tolist()
    assert len(set(response.token_ids)) > 2  # a model that only repeats a token would check little
    assert response.prompt_logprobs is not None and len(response.prompt_logprobs) == len(ids)
    worst = 0.0
    for position, entry in enumerate(response.prompt_logprobs[1:], start=1):
        assert entry is not None and ids[position] in entry
        for token, value in entry.items():
            worst = max(worst, abs(value - logprobs[position - 1, token].item()))
    assert worst < TOLERANCE, worst
    return prepared.multimodal


def test_one_image_matches_transformers(pipe, tiny_vlms, family, model_dir, hf_model):
    image = tiny_vlms.random_image(1, (120, 90))
    items = run_and_compare(pipe, tiny_vlms, family, model_dir, hf_model, [image], "Describe the image.")
    assert [item["length"] for item in items] == [16 if family == "llava" else 4 * 5]  # InternVL: 2x2 tiles + thumb
    # The image moves the logprobs far beyond the tolerance: matching transformers means using it as it does.
    ids = pipe.async_pipeline.prepare([image_message([image], "Describe the image.")]).prompt_ids
    hf_inputs = getattr(tiny_vlms, f"hf_{family}_inputs")
    with torch.no_grad():
        seen = [hf_model(**hf_inputs(model_dir, ids, [im])).logits[0] for im in (image, image.rotate(90))]
    assert (seen[0].log_softmax(-1) - seen[1].log_softmax(-1)).abs().max() > 1000 * TOLERANCE


def test_two_images_match_transformers(pipe, tiny_vlms, family, model_dir, hf_model):
    # InternVL: 5 tiles (2x2 and the thumbnail), then a single tile (an image under half the 2x2 canvas).
    sizes = [(200, 60), (64, 140)] if family == "llava" else [(120, 90), (50, 50)]
    images = [tiny_vlms.random_image(2 + i, size) for i, size in enumerate(sizes)]
    items = run_and_compare(pipe, tiny_vlms, family, model_dir, hf_model, images, "Compare the two images.")
    if family == "internvl":
        assert [item["meta"]["num_tiles"] for item in items] == [5, 1]
        assert [item["length"] for item in items] == [20, 4]


def build(path: Path):
    from lm_torch.attention import TorchAttentionBackend
    from lm_torch.config import TorchEngineConfig
    from lm_torch.loader import build_model, load_hf_config

    cpu = torch.device("cpu")
    return build_model(path, TorchEngineConfig(), load_hf_config(path), cpu, torch.float32, TorchAttentionBackend())


def construct(path: Path):
    """Our model of the checkpoint at `path`, its parameters as built (no weights loaded, layouts unchanged)."""
    from lm_torch.layers.context import BuildContext
    from lm_torch.loader import load_hf_config
    from lm_torch.models.registry import get_model_class

    hf_config = load_hf_config(path)
    return get_model_class(hf_config.architectures[0])(hf_config, max_positions=256, ctx=BuildContext())


def test_every_checkpoint_tensor_is_loaded_or_skipped(family, model_dir):
    from safetensors.torch import load_file

    build(model_dir)  # the loader's own check: no parameter of ours is left unfilled
    model = construct(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    unfilled = {name: int(param.isnan().sum()) for name, param in model.named_parameters()}
    saved = load_file(model_dir / "model.safetensors")
    skipped = {name for name in saved if name.startswith(SKIPPED_PATTERNS[family])}
    for name, tensor in saved.items():  # one at a time: a tensor is used when it fills some of our values
        model.load_weights([(name, tensor)])
        before, unfilled = unfilled, {n: int(param.isnan().sum()) for n, param in model.named_parameters()}
        assert (unfilled != before) != (name in skipped), name
    assert not any(unfilled.values())
    assert model.vision.skipped_weights == skipped
    # Tied as the whole config says (transformers ties by it; InternVLConfig's default is True), no LM head saved.
    config = json.loads((model_dir / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings", family == "internvl"))
    assert tied == (family == "internvl")
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    assert any(name.endswith("lm_head.weight") for name in saved) != tied


def hub_name(name: str) -> str:
    """A transformers 5 `save_pretrained` name in the hub's layout (`model.` in front, the LM head at the top)."""
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    return "model." + name


def original_llava_name(name: str) -> str:
    """The same name in the original llava-hf checkpoints (CLIP's `vision_model.` level kept)."""
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1)


@pytest.mark.parametrize("layout", ["hub", "original"])
def test_other_checkpoint_layouts_load_the_same_weights(family, model_dir, tmp_path, layout):
    from safetensors.torch import load_file, save_file

    if layout == "original" and family != "llava":
        pytest.skip("InternVL's original layout is its remote-code one (not supported)")
    rename = hub_name if layout == "hub" else original_llava_name
    for file in model_dir.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, tmp_path / file.name)
    saved = load_file(model_dir / "model.safetensors")
    save_file({rename(name): tensor for name, tensor in saved.items()}, tmp_path / "model.safetensors")
    expected = dict(build(model_dir).named_parameters())
    got = dict(build(tmp_path).named_parameters())
    assert got.keys() == expected.keys()
    for name, param in got.items():
        assert torch.equal(param, expected[name]), name


def test_the_whole_config_decides_the_tying(family, model_dir, tmp_path):
    # A hub InternVL config may tie at the top (InternVLConfig's default) but not in its text config: transformers
    # ties by the top, and so must we (the checkpoint then has no LM head to load).
    from transformers import AutoModelForImageTextToText

    if family != "internvl":
        pytest.skip("LLaVA's config takes the text config's tying into its own")
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert hf.lm_head.weight is hf.get_input_embeddings().weight
    build(tmp_path)  # no LM head in the checkpoint, none missing
    model = construct(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_an_unsupported_language_model_is_refused():
    from lm_torch.models.llava import build_text_model

    config = SimpleNamespace(model_type="gemma", multimodal_config=None)
    with pytest.raises(ValueError, match="not supported"):
        build_text_model(config, 128, None, "LlavaForConditionalGeneration", ("llama", "qwen2"))  # type: ignore[arg-type]
