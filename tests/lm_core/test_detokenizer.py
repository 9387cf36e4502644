"""IncrementalDetokenizer: streamed deltas add up to the full decode of the generated ids, for byte-level BPE
(SmolLM2), SentencePiece-style byte-fallback tokenizers (BPE and Unigram) and one with added tokens, and each
step decodes only a bounded window."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm_core.detokenizer import IncrementalDetokenizer
from lm_core.tokenizer import Tokenizer

KINDS = ["smol", "llama", "unigram", "added"]


@pytest.fixture(scope="module")
def tokenizers(default_model_dir, local_tokenizer_dirs) -> dict[str, Tokenizer]:
    found = {"smol": Tokenizer.from_pretrained(default_model_dir)}
    found.update({name: Tokenizer.from_pretrained(path) for name, path in local_tokenizer_dirs.items()})
    return found


@pytest.fixture(scope="module")
def tricky_ids(tokenizers) -> dict[str, list[int]]:
    """Per tokenizer, the ids that make streaming hard: specials, added tokens, byte-fallback pieces, and the
    byte-level tokens that hold only part of a UTF-8 character (they decode to U+FFFD on their own)."""
    found = {}
    for name, tok in tokenizers.items():
        alone = tok.hf.batch_decode([[i] for i in range(tok.vocab_size)])
        partial = {i for i, text in enumerate(alone) if "\ufffd" in text}
        found[name] = sorted(partial | tok.all_special_ids | tok.byte_token_ids | set(tok.hf.added_tokens_decoder))
    return found


def stream(tok: Tokenizer, ids: list[int], chunks: list[int] | None = None, **flags) -> list[str]:
    """Deltas of `ids` fed `chunks[i]` at a time (one by one by default), then finish(); checks on the way that
    the text so far is always a prefix of the full decode."""
    full = tok.decode(ids, **flags)
    detok = IncrementalDetokenizer(tok, **flags)
    deltas, pos = [], 0
    for size in chunks or [1] * len(ids):
        if pos >= len(ids):
            break
        deltas.append(detok.step(ids[pos : pos + size]))
        pos += size
        assert full.startswith(detok.text), (ids, deltas, full)
        assert detok.token_ids == ids[:pos]
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "keep"])
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_deltas_add_up_to_the_full_decode(tokenizers, tricky_ids, kind, skip, data):
    tok = tokenizers[kind]
    token = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(tricky_ids[kind]))
    ids = data.draw(st.lists(token, max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=len(ids), max_size=len(ids)), label="chunks")
    flags = {"skip_special_tokens": skip}
    assert "".join(stream(tok, ids, chunks, **flags)) == tok.decode(ids, **flags)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, as char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL_DECODER = _byte_level_alphabet()

# Valid characters of 1-4 bytes, or 1-3 arbitrary bytes (truncated or invalid sequences).
_BYTE_PIECES = st.one_of(
    st.characters().map(lambda c: c.encode("utf-8", "surrogatepass")), st.binary(min_size=1, max_size=3)
)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_BYTE_PIECES, max_size=30))
def test_random_bytes_one_token_each(tokenizers, pieces):
    # One byte per token is the hardest split for byte-level BPE: characters (and invalid runs) span many tokens.
    tok = tokenizers["smol"]
    by_byte = {b: tok.convert_tokens_to_ids(c) for c, b in _BYTE_LEVEL_DECODER.items()}
    ids = [by_byte[b] for b in b"".join(pieces) if by_byte[b] != tok.hf.unk_token_id]
    assert "".join(stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize("orphans", range(4, 12))
def test_open_character_behind_many_replacement_characters(tokenizers, orphans):
    # Orphan continuation bytes keep the text ending in U+FFFD, so a boundary is searched for while 😀 arrives
    # one byte per token; whatever the alignment, a boundary inside 😀 must not be taken.
    tok = tokenizers["smol"]
    orphan, *emoji = tok.convert_tokens_to_ids(["Ģ", "ð", "Ł", "ĺ", "Ģ"])
    ids = [orphan] * orphans + emoji
    assert tok.decode(ids) == "\ufffd" * orphans + "😀"
    assert "".join(stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_real_text_streams_token_by_token(tokenizers, kind):
    tok = tokenizers[kind]
    text = "hello world, naïve café 日本語 東京 😀🚀 über straße Ω ∑ \ufffd ok\n  indented"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert "\ufffd" not in "".join(deltas).replace(text[text.index("\ufffd")], "")


def test_multibyte_character_waits_for_its_last_token(tokenizers):
    tok = tokenizers["smol"]
    ids = tok.encode("Hi 😀", add_special_tokens=False)
    assert len(ids) == 3 and tok.decode(ids[-1:]) == "\ufffd"  # "Hi", " " + 3 bytes of 😀, its last byte
    # The space is final at once; the character's first bytes show as a trailing U+FFFD, which is held back.
    assert stream(tok, ids) == ["Hi", " ", "😀", ""]


def test_byte_fallback_run_waits_for_its_end(tokenizers):
    tok = tokenizers["llama"]
    ids = tok.encode("Ω ok", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["▁", "<0xCE>", "<0xA9>", "▁", "ok"]
    # The whole "Ω" run waits: a later invalid byte would turn all of it into U+FFFDs.
    assert stream(tok, ids) == ["", "", "", "Ω ", "ok", ""]
    bad = [
        tok.convert_tokens_to_ids("<0xCE>"),
        tok.convert_tokens_to_ids("<0xA9>"),
        tok.convert_tokens_to_ids("<0xFF>"),
    ]
    assert tok.decode(bad) == "\ufffd" * 3
    assert stream(tok, [*bad, tok.convert_tokens_to_ids("ok")]) == ["", "", "", "\ufffd\ufffd\ufffdok", ""]


def test_invalid_bytes_are_released_once_they_cannot_complete(tokenizers):
    tok = tokenizers["smol"]
    lead, ascii_a = tok.convert_tokens_to_ids(["æ", "a"])  # 0xE6 starts a 3-byte character
    assert stream(tok, [lead, ascii_a, lead]) == ["", "\ufffda", "", "\ufffd"]
    # A truncated character at the very end is in the full decode, so finish() hands it over.
    ids = [*tok.encode("ok", add_special_tokens=False), lead]
    assert stream(tok, ids) == ["ok", "", "\ufffd"]


@pytest.mark.parametrize("kind", ["llama", "unigram"])
def test_first_token_loses_its_sentencepiece_space_as_in_the_full_decode(tokenizers, kind):
    tok = tokenizers[kind]
    ids = tok.encode("hello world hello", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    expected = stream(tok, ids)
    assert "".join(expected) == "hello world hello"
    # The prompt is not decode context: with it, the first "▁hello" would gain a space the full decode lacks.
    prompt = tok.encode("say hello", add_special_tokens=True)
    detok = IncrementalDetokenizer(tok, prompt)
    assert [detok.step([i]) for i in ids] + [detok.finish()] == expected


@pytest.mark.parametrize("kind", ["llama", "unigram"])
def test_space_survives_behind_skipped_special_tokens(tokenizers, kind):
    tok = tokenizers[kind]
    hello, world = tok.encode("hello world", add_special_tokens=False)[-2:]
    bos, eos = tok.convert_tokens_to_ids(["<s>", "</s>"])
    ids = [bos, hello, eos, bos, world, eos]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == "hello world"
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)


def test_special_and_added_tokens(tokenizers):
    tok = tokenizers["added"]
    ids = tok.encode("<|bos|>hello<think>✓done<｜end▁of▁sentence｜> world<|tool|>")
    assert "".join(stream(tok, ids)) == "hello<think>✓done world"
    kept = "".join(stream(tok, ids, skip_special_tokens=False))
    assert kept == "<|bos|>hello<think>✓done<｜end▁of▁sentence｜> world<|tool|>"


def test_step_and_finish_protocol(tokenizers):
    tok = tokenizers["smol"]
    detok = IncrementalDetokenizer(tok)
    assert detok.step([]) == "" and detok.text == ""
    assert detok.step(tok.encode("Hello world")) == "Hello world"
    assert detok.finish() == "" and detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.step([1])
    assert detok.text == "Hello world" and detok.token_ids == tok.encode("Hello world")


def _decode_sizes(tok: Tokenizer, monkeypatch, ids: list[int], **flags) -> list[int]:
    """Lengths of every id list the detokenizer hands to the transformers tokenizer while streaming `ids`."""
    sizes = []
    original = tok.hf.decode

    def recording(token_ids, **kwargs):
        sizes.append(len(token_ids))
        return original(token_ids, **kwargs)

    tok.skipped_ids  # noqa: B018 - computed once per tokenizer, not part of streaming
    monkeypatch.setattr(tok.hf, "decode", recording)
    detok = IncrementalDetokenizer(tok, **flags)
    text = "".join(detok.step([i]) for i in ids) + detok.finish()
    monkeypatch.undo()
    assert text == tok.decode(ids, **flags)
    return sizes


@pytest.mark.parametrize("kind", KINDS)
def test_each_step_decodes_a_bounded_window(tokenizers, monkeypatch, kind):
    tok = tokenizers[kind]
    text = "Streaming text with émojis 😀🚀, 日本語 and Ω ∑, naïve café. " * 120
    ids = tok.encode(text, add_special_tokens=False)[:5000]
    short, long = _decode_sizes(tok, monkeypatch, ids[:500]), _decode_sizes(tok, monkeypatch, ids)
    # Byte-fallback runs ("Ω" is three byte pieces) are decoded once, when they end, so windows stay small.
    assert max(long) <= 8 and max(short) <= 8
    assert sum(long) <= 4 * len(ids) and len(long) <= 3 * len(ids)


@pytest.mark.parametrize(
    ("kind", "build"),
    [
        ("smol", lambda tok: [tok.convert_tokens_to_ids("Ģ")] * 3000),  # orphan continuation bytes: U+FFFD each
        ("smol", lambda tok: tok.encode("\ufffd" * 3000)),
        ("smol", lambda tok: [*tok.encode("hi"), *[tok.convert_tokens_to_ids("<|im_end|>")] * 3000, 218]),
        ("llama", lambda tok: [tok.convert_tokens_to_ids("</s>")] * 3000),
        ("unigram", lambda tok: tok.encode("hello" + " " * 3000)),
        ("unigram", lambda tok: tok.encode("hello" + " \ufffd" * 3000)),
    ],
    ids=["orphan-bytes", "replacement-chars", "skipped-specials", "only-specials", "spaces", "replacement-pieces"],
)
def test_pathological_streams_stay_bounded(tokenizers, monkeypatch, kind, build):
    tok = tokenizers[kind]
    sizes = _decode_sizes(tok, monkeypatch, build(tok))
    assert max(sizes) <= 12


def test_long_byte_run_is_decoded_once(tokenizers, monkeypatch):
    tok = tokenizers["llama"]
    ids = tok.encode("Ω" * 1000 + " ok", add_special_tokens=False)
    sizes = _decode_sizes(tok, monkeypatch, ids)
    assert sum(sizes) <= 3 * len(ids)
