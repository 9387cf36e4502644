"""Tokenizer: loading (eos ids from generation_config.json), special tokens, decode flags, and lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lm_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smol(default_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(default_model_dir)


def test_default_model_attributes(smol):
    hf = smol.hf
    assert smol.vocab_size == len(hf) == 49152
    assert smol.bos_token_id == hf.bos_token_id == 1
    # The tokenizer's eos (<|im_end|>) and generation_config's (also 2) collapse into one.
    assert smol.eos_token_ids == (2,)
    assert {0, 1, 2} <= smol.all_special_ids
    assert smol.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    assert isinstance(smol.chat_template, str) and "<|im_start|>" in smol.chat_template
    assert smol.byte_token_ids == frozenset()
    assert "Tokenizer(" in repr(smol) and len(smol) == 49152


def test_encode_decode_round_trip(smol):
    text = "Hello, naïve café 日本語 😀!"
    ids = smol.encode(text)
    assert ids == smol.hf.encode(text) and all(isinstance(i, int) for i in ids)
    assert smol.decode(ids) == text
    assert smol.decode(tuple(ids)) == text


def test_special_tokens_are_skipped_or_kept(smol):
    ids = [1, *smol.encode("hi", add_special_tokens=False), 2]
    assert smol.decode(ids) == "hi"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"
    # The added tokens marked special are dropped too, not only the named ones, and skipped_ids says which.
    assert smol.decode([3, *ids]) == "hi"
    assert 3 in smol.all_special_ids and 3 in smol.skipped_ids
    assert smol.skipped_ids <= smol.all_special_ids


def test_convert_ids_and_tokens(smol):
    ids = smol.encode(" world", add_special_tokens=False)
    tokens = smol.convert_ids_to_tokens(ids)
    assert tokens == ["Ġworld"]
    assert smol.convert_ids_to_tokens(ids[0]) == "Ġworld"
    assert smol.convert_tokens_to_ids(tokens) == ids
    assert smol.convert_tokens_to_ids("Ġworld") == ids[0]


def test_generation_config_eos_list_is_appended_in_order(local_tokenizer_dirs):
    # The fixture writes eos_token_id = [eos, bos] into each generation_config.json.
    tok = Tokenizer.from_pretrained(local_tokenizer_dirs["llama"])
    eos, bos = tok.convert_tokens_to_ids(["</s>", "<s>"])
    assert tok.eos_token_ids == (eos, bos)
    assert tok.bos_token_id == bos
    assert tok.chat_template is None


@pytest.mark.parametrize(
    ("config", "expected_extra"),
    [({"eos_token_id": 7}, (7,)), ({"eos_token_id": None}, ()), ({}, ()), ("not json", ()), (None, ())],
)
def test_generation_config_variants(tmp_path, local_tokenizer_dirs, config, expected_extra):
    src = Tokenizer.from_pretrained(local_tokenizer_dirs["added"])
    src.hf.save_pretrained(tmp_path)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "generation_config.json").write_text(text)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_ids == (tok.convert_tokens_to_ids("<|eos|>"), *expected_extra)


def test_wrapping_an_existing_tokenizer(smol):
    tok = Tokenizer(smol.hf, generation_eos_token_ids=[0, 2])
    assert tok.eos_token_ids == (2, 0)
    assert tok.hf is smol.hf


def test_byte_fallback_pieces_are_found(local_tokenizer_dirs):
    tok = Tokenizer.from_pretrained(local_tokenizer_dirs["unigram"])
    assert len(tok.byte_token_ids) == 256
    assert tok.convert_ids_to_tokens(sorted(tok.byte_token_ids)[:2]) == ["<0x00>", "<0x01>"]


def test_added_tokens(local_tokenizer_dirs):
    tok = Tokenizer.from_pretrained(local_tokenizer_dirs["added"])
    think, tool = tok.convert_tokens_to_ids(["<think>", "<|tool|>"])
    assert tool in tok.skipped_ids and think not in tok.all_special_ids
    ids = tok.encode("<think>ok<|tool|>")
    assert think in ids and tool in ids
    assert tok.decode(ids) == "<think>ok"
    assert tok.decode(ids, skip_special_tokens=False) == "<think>ok<|tool|>"


def test_decode_never_cleans_up_spaces(local_tokenizer_dirs):
    # clean_up_tokenization_spaces rewrites " ." into "." across tokens, which no stream could reproduce.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(local_tokenizer_dirs["unigram"], clean_up_tokenization_spaces=True)
    ids = hf.encode("hello . ok")
    assert hf.decode(ids) == "hello. ok"
    assert Tokenizer(hf).decode(ids) == "hello . ok"


def test_importing_the_text_modules_loads_neither_torch_nor_transformers():
    code = textwrap.dedent(
        """
        import sys
        import lm_core.tokenizer, lm_core.detokenizer, lm_core.stop_strings
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
