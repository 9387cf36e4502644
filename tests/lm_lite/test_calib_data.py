"""Calibration sources: the built-in text, local .txt/.jsonl files, Hugging Face names; windows of tokens."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lm_lite.calib_data import load_texts, token_samples


def test_builtin_text_is_a_few_hundred_kb_of_documents():
    docs = load_texts(None)
    assert load_texts("builtin") == docs
    assert len(docs) > 50
    assert 200_000 < sum(len(d) for d in docs) < 400_000
    # English prose first (four public-domain excerpts), then the Python Language Reference.
    assert docs[0].startswith("Emma Woodhouse, handsome, clever, and rich")
    assert sum(len(d) for d in docs[:4]) > 50_000


def test_jsonl_records_and_their_errors(tmp_path):
    good = tmp_path / "data.jsonl"
    good.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert load_texts(str(good)) == ["first", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    with pytest.raises(ValueError, match="line 2 has no string field 'text'"):
        load_texts(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_texts(str(broken))


def test_text_file_and_missing_or_empty_ones(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("plain words")
    assert load_texts(str(text)) == ["plain words"]
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="no such file"):
        load_texts(str(tmp_path / "absent.txt"))
    with pytest.raises(ValueError, match="no such file"):
        load_texts("not-a-dataset-name")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_dataset_names_need_the_datasets_package():
    with pytest.raises(ValueError, match="pip install datasets"):
        load_texts("wikitext2")


def test_token_windows(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    docs = load_texts(None)[:5]
    samples = token_samples(tokenizer, docs, num_samples=4, seqlen=32)
    assert samples.shape == (4, 32)
    # Windows of the joined documents (EOS between them), spread evenly from its start to its end, not overlapping.
    joined = []
    for doc in docs:
        joined += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(joined) > 4 * 32 * 3  # so that the spread windows are not simply consecutive ones
    starts = [0, (len(joined) - 32) // 3, 2 * (len(joined) - 32) // 3, len(joined) - 32]
    assert samples.tolist() == [joined[start : start + 32] for start in starts]
    with pytest.warns(UserWarning, match="windows overlap"):
        overlapping = token_samples(tokenizer, ["a short text " * 20], num_samples=8, seqlen=32)
    assert overlapping.shape == (8, 32)
    with pytest.raises(ValueError, match="fewer than calib_seqlen=4096"):
        token_samples(tokenizer, ["tiny"], num_samples=1, seqlen=4096)
