"""StopStringMatcher on text streamed token by token through SmolLM2's tokenizer and the incremental
detokenizer, checked against an independent reference computed on the full text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_core.detokenizer import IncrementalDetokenizer
from lm_core.stop_strings import StopStringMatcher
from lm_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smol(default_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(default_model_dir)


def reference(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Output for the whole text: cut at the stop string that completes first (ties: the longest)."""
    found = [(full.find(s) + len(s), -len(s), s) for s in stops if s in full]
    if not found:
        return full, None
    end, _, stop = min(found)
    return full[: end if include else end - len(stop)], stop


def feed_all(deltas: list[str], stops: list[str], include: bool) -> tuple[str, str | None]:
    """Run deltas through a matcher as an engine would: stop at a match, flush at the end otherwise."""
    matcher = StopStringMatcher(stops, include)
    out = []
    for delta in deltas:
        text, stop = matcher.feed(delta)
        out.append(text)
        if stop is not None:
            assert matcher.finished and matcher.matched == stop
            return "".join(out), stop
    assert not matcher.finished
    return "".join(out) + matcher.flush(), None


def token_deltas(tok: Tokenizer, text: str) -> list[str]:
    """The detokenizer's deltas for `text` encoded and generated one token at a time."""
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step([i]) for i in tok.encode(text, add_special_tokens=False)]
    return [*deltas, detok.finish()]


def tokens_spanned(tok: Tokenizer, text: str, stop: str) -> int:
    """How many of `text`'s tokens overlap the first occurrence of `stop`."""
    enc = tok.hf(text, return_offsets_mapping=True, add_special_tokens=False)
    start = text.index(stop)
    return sum(1 for a, b in enc["offset_mapping"] if a < start + len(stop) and b > start)


@pytest.mark.parametrize("include", [False, True], ids=["cut", "include"])
@pytest.mark.parametrize(
    ("text", "stop", "spanned"),
    [
        ("The result is ready. Observation: it worked.", "Observation:", 2),
        ("Thought: compute\nAction: search[Paris]\nObservation", "\nAction:", 3),
        ("first line\n\nUser: hi there", "\n\nUser:", 4),
        ("Answer: 42 ###STOP### tail", "###STOP###", 3),
        ("I love café! yes", "café!", 2),
        ("smile 😀 ok", "😀", 2),
        ("東京と日本語です", "日本語", 6),
    ],
)
def test_stop_string_across_tokens(smol, text, stop, spanned, include):
    assert tokens_spanned(smol, text, stop) == spanned
    got = feed_all(token_deltas(smol, text), [stop], include)
    expected = text[: text.find(stop)] + (stop if include else "")
    assert got == (expected, stop) == reference(text, [stop], include)


def test_prefix_that_diverges_is_released(smol):
    text = "We write <EN and then <ENDX and finally <END> trailing"
    assert tokens_spanned(smol, text, "<END>") == 3
    matcher = StopStringMatcher(["<END>"])
    released, held_seen = [], set()
    for delta in token_deltas(smol, text):
        out, stop = matcher.feed(delta)
        released.append(out)
        held_seen.add(matcher.held)
        if stop:
            break
    # "<EN" and "<END" were each held back, then released when the text went another way.
    assert {"<EN", "<END"} <= held_seen
    assert "".join(released) == "We write <EN and then <ENDX and finally "


def test_held_prefix_is_flushed_without_a_match(smol):
    text = "the output ends with <EN"
    assert feed_all(token_deltas(smol, text), ["<END>"], False) == (text, None)
    matcher = StopStringMatcher(["<END>"])
    assert matcher.feed("abc <EN") == ("abc ", None)
    assert matcher.held == "<EN" and matcher.flush() == "<EN"


@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [("Hello", False, ""), ("Hello", True, "Hello"), ("Hel", False, ""), ("Hel", True, "Hel"), ("ell", False, "H")],
)
def test_stop_string_in_the_first_token(smol, stop, include, expected):
    text = "Hello world"
    assert smol.convert_ids_to_tokens(smol.encode(text, add_special_tokens=False))[0] == "Hello"
    deltas = token_deltas(smol, text)
    assert deltas[0] == "Hello"
    matcher = StopStringMatcher([stop], include)
    assert matcher.feed(deltas[0]) == (expected, stop)
    with pytest.raises(RuntimeError):
        matcher.feed(deltas[1])


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("one two three four", ["four", "two", "three"], ("one ", "two")),
        # Same last character: the longer stop string starts earlier and wins.
        ("this is the end.", ["end", "the end"], ("this is ", "the end")),
        # "bc" completes before "abcd" could, so it wins although "abcd" starts earlier.
        ("xabcdy", ["abcd", "bc"], ("xa", "bc")),
        ("naïve 日本語 😀 stop", ["😀", "日本"], ("naïve ", "日本")),
        ("nothing to see", ["zzz", "yy"], ("nothing to see", None)),
    ],
)
def test_several_stop_strings(smol, text, stops, expected):
    assert reference(text, stops, False) == expected
    assert feed_all(token_deltas(smol, text), stops, False) == expected
    # Whatever the split, including one character at a time.
    assert feed_all(list(text), stops, False) == expected


def test_validation_and_protocol():
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher(["ok", ""])
    with pytest.raises(ValueError, match="stop"):
        StopStringMatcher([None])  # type: ignore[list-item]
    single = StopStringMatcher("END", include_stop_str_in_output=True)
    assert single.stop == ("END",)
    assert single.feed("a E") == ("a ", None)
    assert single.feed("ND b") == ("END", "END")
    assert single.finished and single.flush() == ""
    with pytest.raises(RuntimeError):
        single.feed("x")
    nothing = StopStringMatcher([])
    assert nothing.feed("anything") == ("anything", None)
    flushed = StopStringMatcher(["x"])
    assert flushed.flush() == "" and not flushed.finished
    with pytest.raises(RuntimeError):
        flushed.feed("x")


_ALPHABET = st.sampled_from(["a", "b", "ab", " ", "\n", "é", "日", "本", "😀", "END", "<", ">"])


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(_ALPHABET, max_size=25),
    stops=st.lists(st.text(st.sampled_from("ab é日本😀END<>"), min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
    data=st.data(),
)
def test_any_split_matches_the_reference(parts, stops, include, data):
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8), label="cuts"))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert feed_all(deltas, stops, include) == reference(text, stops, include)


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(_ALPHABET, min_size=1, max_size=20),
    picks=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 6)), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_tokenized_text_matches_the_reference(smol, parts, picks, include):
    # Stop strings cut out of the text itself, so most examples do match somewhere inside a token stream.
    text = "".join(parts)
    stops = [text[start % len(text) :][:size] for start, size in picks]
    assert feed_all(token_deltas(smol, text), stops, include) == reference(text, stops, include)
