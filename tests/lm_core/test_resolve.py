"""resolve_model: the default model, local directories, GGUF files, hub ids, and the errors for bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lm_core import DEFAULT_MODEL, ModelResolutionError, resolve_model


@pytest.mark.slow
def test_default_model_generates_paris_with_transformers(default_model_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert (default_model_dir / "config.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_default_model_is_reused(default_model_dir):
    marker = default_model_dir / ".lm-deploy-complete"
    before = marker.stat().st_mtime_ns
    assert resolve_model(None) == default_model_dir
    assert resolve_model(DEFAULT_MODEL) == default_model_dir
    assert marker.stat().st_mtime_ns == before


def test_local_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model(tmp_path) == tmp_path.resolve()
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_gguf_file_is_converted_once(default_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_DEPLOY_CACHE", str(tmp_path / "cache"))
    link = tmp_path / "model.gguf"
    link.symlink_to(default_gguf)
    first = resolve_model(link)
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    assert first.is_relative_to(tmp_path / "cache")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(link)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert not any((tmp_path / "cache" / "tmp").iterdir()), "staging directories must be cleaned up"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing-dir", "no such model file or directory"),
        (lambda p: p / "missing.gguf", "no such model file or directory"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
        (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "not a .gguf model"),
    ],
)
def test_bad_local_arguments(tmp_path, make, message):
    with pytest.raises(ModelResolutionError, match=message):
        resolve_model(make(tmp_path))


def test_truncated_gguf_argument(default_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_DEPLOY_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    with default_gguf.open("rb") as src:
        broken.write_bytes(src.read(4096))
    with pytest.raises(ModelResolutionError, match="truncated"):
        resolve_model(broken)


def test_hub_id_while_offline(offline_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelResolutionError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE is set"):
        resolve_model("lm-deploy-tests/no-such-model")


def test_hub_id_that_cannot_be_fetched(tmp_path, monkeypatch):
    # Without HF_HUB_OFFLINE the hub is tried: no network (CI) or no such repository both end in one clear error.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    with pytest.raises(ModelResolutionError, match="could not be fetched from the Hugging Face Hub"):
        resolve_model("lm-deploy-tests/no-such-model-3f9a")


@pytest.mark.slow
def test_concurrent_first_calls_share_one_cache_entry(tmp_path):
    """Three processes resolve the default model into an empty cache at once; all get the same, complete entry."""
    env = {**os.environ, "LM_DEPLOY_CACHE": str(tmp_path / "cache")}
    code = "from lm_core import resolve_model; print(resolve_model(None))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    paths = {Path(out.strip()) for out, _ in outputs}
    assert len(paths) == 1
    (path,) = paths
    check = textwrap.dedent(
        f"""
        from safetensors import safe_open
        from transformers import AutoConfig, AutoTokenizer
        AutoConfig.from_pretrained({str(path)!r}); AutoTokenizer.from_pretrained({str(path)!r})
        with safe_open({str(path / "model.safetensors")!r}, framework="numpy") as f:
            assert len(list(f.keys())) == 272, len(list(f.keys()))
        """
    )
    subprocess.run([sys.executable, "-c", check], env=env, check=True)
    assert not any((tmp_path / "cache" / "tmp").iterdir())


def test_a_converted_default_model_gets_its_recommended_sampling(tmp_path, monkeypatch):
    from lm_core.resolve import DEFAULT_MODEL_SAMPLING

    monkeypatch.setenv("LM_DEPLOY_CACHE", str(tmp_path))
    entry = tmp_path / "models" / DEFAULT_MODEL
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    (entry / ".lm-deploy-complete").write_text("ok\n")
    (entry / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.5}))
    assert resolve_model(None) == entry
    # Missing keys are added; what the entry already says is kept.
    assert json.loads((entry / "generation_config.json").read_text()) == {
        "eos_token_id": 2,
        "temperature": 0.5,
        "do_sample": DEFAULT_MODEL_SAMPLING["do_sample"],
        "top_p": DEFAULT_MODEL_SAMPLING["top_p"],
    }
