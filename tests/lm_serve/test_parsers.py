"""Output parsers: the reasoning table, the API contract, and properties over arbitrary text and chunkings.

The core property: for any text and any chunking, the streamed deltas accumulate to exactly what `parse` returns.
"""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_serve.parsers import (
    REASONING_PARSERS,
    TOOL_PARSERS,
    DeltaMessage,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
    accumulate,
    make_output_parser,
)

TOOLS = [{"type": "function", "function": {"name": name}} for name in ("get_weather", "get_time")]
QWEN3_THINKING_OFF_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
R1_PROMPT = "<｜User｜>What is 2+2?<｜Assistant｜><think>\n"
R1_OLD_PROMPT = "<｜User｜>What is 2+2?<｜Assistant｜>"
W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def counting_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def msg(content=None, reasoning=None, calls=()) -> ParsedMessage:
    tool_calls = [ToolCall(f"call_{i}", name, arguments) for i, (name, arguments) in enumerate(calls)]
    return ParsedMessage(content=content, reasoning_content=reasoning, tool_calls=tool_calls)


def stream(text: str, chunks: list[str], **kwargs) -> ParsedMessage:
    parser = make_output_parser(id_factory=counting_ids(), **kwargs)
    return accumulate([parser.feed(chunk) for chunk in chunks] + [parser.finish()])


def chunkings(text: str, count: int = 25):
    """Whole, 1-character pieces, every 2-way split, and `count` random chunkings (seeded by the text)."""
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    rng = random.Random(zlib.crc32(text.encode()))
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


def check(text: str, expected: ParsedMessage, **kwargs) -> None:
    assert make_output_parser(id_factory=counting_ids(), **kwargs).parse(text) == expected
    for chunks in chunkings(text):
        assert stream(text, chunks, **kwargs) == expected, f"chunks: {chunks!r}"


# (name, parser, prompt, chat_template_kwargs, text, expected)
REASONING_CASES = [
    ("qwen3-think", "qwen3", QWEN3_PROMPT, None, "<think>\nLet me add.\n</think>\n\n4.", msg("4.", "Let me add.")),
    ("qwen3-no-think", "qwen3", QWEN3_PROMPT, None, "Just 4.", msg("Just 4.")),
    (
        "qwen3-off-kwarg",
        "qwen3",
        QWEN3_PROMPT,
        {"enable_thinking": False},
        "<think>x</think>y",
        msg("<think>x</think>y"),
    ),
    (
        "qwen3-off-prompt",
        "qwen3",
        QWEN3_THINKING_OFF_PROMPT,
        None,
        "Hello! <think> is a tag.",
        msg("Hello! <think> is a tag."),
    ),
    ("qwen3-on-kwarg", "qwen3", QWEN3_PROMPT, {"enable_thinking": True}, "<think>a</think>b", msg("b", "a")),
    ("qwen3-no-prompt", "qwen3", None, None, "<think>a</think>b", msg("b", "a")),
    ("qwen3-leading-ws", "qwen3", QWEN3_PROMPT, None, "\n\n<think>a</think>b", msg("b", "a")),
    ("qwen3-ends-in-reasoning", "qwen3", QWEN3_PROMPT, None, "<think>\nhmm, let me", msg(None, "hmm, let me")),
    ("qwen3-ends-at-partial-end", "qwen3", QWEN3_PROMPT, None, "<think>\nhmm\n</thi", msg(None, "hmm\n</thi")),
    ("qwen3-empty-reasoning", "qwen3", QWEN3_PROMPT, None, "<think>\n\n</think>\n\nHi", msg("Hi")),
    ("qwen3-only-reasoning", "qwen3", QWEN3_PROMPT, None, "<think>a</think>", msg(None, "a")),
    (
        "qwen3-think-later-is-content",
        "qwen3",
        QWEN3_PROMPT,
        None,
        "Use <think>x</think> tags.",
        msg("Use <think>x</think> tags."),
    ),
    ("qwen3-second-end-tag", "qwen3", QWEN3_PROMPT, None, "<think>a</think>b</think>c", msg("b</think>c", "a")),
    (
        "qwen3-lookalike-end",
        "qwen3",
        QWEN3_PROMPT,
        None,
        "<think>x </thinking> y</think>z",
        msg("z", "x </thinking> y"),
    ),
    ("qwen3-lookalike-start", "qwen3", QWEN3_PROMPT, None, "<thinker> said hi", msg("<thinker> said hi")),
    ("qwen3-partial-start-only", "qwen3", QWEN3_PROMPT, None, "<thi", msg("<thi")),
    ("qwen3-whitespace-only", "qwen3", QWEN3_PROMPT, None, "\n\n", msg("\n\n")),
    ("qwen3-empty", "qwen3", QWEN3_PROMPT, None, "", msg()),
    ("qwen3-unicode", "qwen3", QWEN3_PROMPT, None, "<think>日本語 😀 é</think>\n答え", msg("答え", "日本語 😀 é")),
    ("qwen3-inner-whitespace-kept", "qwen3", None, None, "<think> a \n\n b </think>  c  d ", msg("c  d ", "a \n\n b")),
    ("think-alias", "think", None, None, "<think>a</think>b", msg("b", "a")),
    (
        "r1-prompt-think",
        "deepseek-r1",
        R1_PROMPT,
        None,
        "2 plus 2 is 4.\n</think>\n\nThe answer is 4.",
        msg("The answer is 4.", "2 plus 2 is 4."),
    ),
    ("r1-old-prompt-tag", "deepseek-r1", R1_OLD_PROMPT, None, "<think>\nadd\n</think>\n\n4", msg("4", "add")),
    ("r1-no-tag-no-prompt", "deepseek-r1", None, None, "reasoning</think>answer", msg("answer", "reasoning")),
    ("r1-repeated-tag", "deepseek_r1", R1_PROMPT, None, "<think>\nadd\n</think>4", msg("4", "add")),
    (
        "r1-ends-in-reasoning",
        "deepseek-r1",
        R1_PROMPT,
        None,
        "still thinking about it",
        msg(None, "still thinking about it"),
    ),
    ("r1-empty-reasoning", "deepseek-r1", R1_PROMPT, None, "</think>\n\n4", msg("4")),
    ("r1-whitespace-only", "deepseek-r1", R1_PROMPT, None, "\n \n", msg()),
    ("r1-partial-tag-only", "deepseek-r1", None, None, "<thi", msg(None, "<thi")),
    ("r1-prompt-closed", "deepseek-r1", "<｜Assistant｜><think>\n\n</think>", None, "4 <think>", msg("4 <think>")),
    ("r1-thinking-false", "deepseek-r1", None, {"thinking": False}, "4</think>", msg("4</think>")),
    ("qwq-alias", "qwen-qwq", "<|im_start|>assistant\n<think>\n", None, "hmm</think>ok", msg("ok", "hmm")),
]


@pytest.mark.parametrize(
    ("parser", "prompt", "kwargs", "text", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in REASONING_CASES],
)
def test_reasoning(parser, prompt, kwargs, text, expected):
    check(text, expected, reasoning_parser=parser, prompt_text=prompt, chat_template_kwargs=kwargs)


REASONING_WITH_TOOLS = [
    (
        "qwen3-think-then-call",
        "qwen3",
        "hermes",
        "<think>\nNeed weather.\n</think>\n\n<tool_call>\n" + W + "\n</tool_call>",
        msg(None, "Need weather.", [("get_weather", '{"city": "Paris"}')]),
    ),
    (
        "qwen3-think-text-call",
        "qwen3",
        "hermes",
        "<think>x</think>\n\nChecking.\n<tool_call>" + W + "</tool_call>",
        msg("Checking.", "x", [("get_weather", '{"city": "Paris"}')]),
    ),
    (
        "r1-call-inside-reasoning",
        "deepseek-r1",
        "hermes",
        "<tool_call>" + W + "</tool_call></think>Fine.",
        msg("Fine.", "<tool_call>" + W + "</tool_call>"),
    ),
    (
        "r1-then-llama3",
        "deepseek-r1",
        "llama3",
        'plan</think>\n{"name": "get_time", "parameters": {}}',
        msg(None, "plan", [("get_time", "{}")]),
    ),
    (
        "qwen3-ends-mid-call",
        "qwen3",
        "hermes",
        '<think>a</think><tool_call>{"name": "get_weather", "arguments": {"ci',
        msg(None, "a", [("get_weather", '{"ci')]),
    ),
]


@pytest.mark.parametrize(
    ("reasoning_parser", "tool_parser", "text", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in REASONING_WITH_TOOLS],
)
def test_reasoning_with_tool_calls(reasoning_parser, tool_parser, text, expected):
    check(text, expected, reasoning_parser=reasoning_parser, tool_parser=tool_parser, tools=TOOLS)


def test_reasoning_streams_before_the_end_tag():
    """`<think>` never leaks into content, and reasoning is sent as it comes, not at `</think>`."""
    parser = make_output_parser(reasoning_parser="qwen3", prompt_text=QWEN3_PROMPT)
    assert parser.feed("<thi") == DeltaMessage()
    assert parser.feed("nk>\nStep one") == DeltaMessage(reasoning_content="Step one")
    assert parser.feed(", two.\n</th") == DeltaMessage(reasoning_content=", two.")
    assert parser.feed("ink>\n\nDone") == DeltaMessage(content="Done")
    assert parser.finish() == DeltaMessage()


# -- the API contract -------------------------------------------------------------------------------------


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"reasoning_parser.*'nope'.*deepseek-r1.*qwen3"):
        make_output_parser(reasoning_parser="nope")
    with pytest.raises(ValueError, match=r"tool_parser.*'hermes2'.*hermes.*internlm2.*llama3.*mistral"):
        make_output_parser(tool_parser="hermes2", tools=TOOLS)


def test_names_accept_underscores_and_case():
    parser = make_output_parser(reasoning_parser="DeepSeek_R1", tool_parser="LLAMA3_JSON", tools=TOOLS)
    assert parser.parse('a</think>{"name": "get_time", "parameters": {}}').tool_calls[0].name == "get_time"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": ["x"]}, "tools"),
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
        ({"id_factory": "call_1"}, "id_factory"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_output_parser(tool_parser="hermes", **kwargs)


def test_registries_cover_the_issue_families():
    assert {"deepseek-r1", "qwen3"} <= set(REASONING_PARSERS)
    assert {"hermes", "qwen2.5", "qwen3", "llama3", "mistral", "internlm2"} <= set(TOOL_PARSERS)


def test_parser_is_single_use():
    parser = make_output_parser()
    parser.feed("a")
    with pytest.raises(RuntimeError, match="fresh"):
        parser.parse("b")
    parser.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("c")


def test_no_parsers_is_plain_content():
    assert make_output_parser().parse("<think>x</think><tool_call>{}</tool_call>") == msg(
        "<think>x</think><tool_call>{}</tool_call>"
    )


def test_accumulate_joins_pieces_by_index():
    deltas = [
        DeltaMessage(content="Hi", tool_calls=[ToolCallDelta(0, "c0", "f", '{"a"')]),
        DeltaMessage(tool_calls=[ToolCallDelta(1, "c1", "g", ""), ToolCallDelta(0, arguments=": 1}")]),
        DeltaMessage(reasoning_content="r", tool_calls=[ToolCallDelta(1, arguments="{}")]),
    ]
    assert accumulate(deltas) == ParsedMessage("Hi", "r", [ToolCall("c0", "f", '{"a": 1}'), ToolCall("c1", "g", "{}")])
    with pytest.raises(ValueError, match="tool call 0 has no id"):
        accumulate([DeltaMessage(tool_calls=[ToolCallDelta(0, arguments="{}")])])


# -- properties over arbitrary text -----------------------------------------------------------------------

# Pieces of every family's markup, JSON and text, so random texts hit partial tags, valid calls and near-misses.
FRAGMENTS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<|action_start|><|plugin|>",
    "<|action_end|>",
    "<|python_tag|>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "[CALL_ID]",
    "abc123XYZ",
    "get_weather",
    "get_time",
    '{"name": "get_weather", "arguments": ',
    '{"name": "get_time", "parameters": ',
    '{"city": "Paris"}',
    "{}",
    "{",
    "}",
    "[",
    "]",
    '"',
    "\\",
    ",",
    ";",
    ":",
    " ",
    "\n",
    "<",
    "</",
    "tool_",
    "think",
    "é",
    "😀",
    "null",
    "1.5e3",
    '"name"',
    '"arguments"',
    "text ",
]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join) | st.text(max_size=40)
PARSER_SETUPS = [
    {"reasoning_parser": None, "tool_parser": "hermes"},
    {"reasoning_parser": "qwen3", "tool_parser": "hermes"},
    {"reasoning_parser": "deepseek-r1", "tool_parser": "llama3"},
    {"reasoning_parser": None, "tool_parser": "mistral"},
    {"reasoning_parser": "qwen3", "tool_parser": "internlm2"},
    {"reasoning_parser": None, "tool_parser": "llama3"},
]


@settings(max_examples=400, deadline=None)
@given(text=texts, setup=st.sampled_from(PARSER_SETUPS), data=st.data())
def test_any_chunking_gives_the_non_streamed_result(text, setup, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=len(text))))
    chunks = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    whole = make_output_parser(tools=TOOLS, id_factory=counting_ids(), **setup).parse(text)
    assert stream(text, chunks, tools=TOOLS, **setup) == whole
    assert stream(text, list(text), tools=TOOLS, **setup) == whole


@settings(max_examples=300, deadline=None)
@given(text=texts, tool_parser=st.sampled_from(sorted(set(TOOL_PARSERS))))
def test_text_without_calls_comes_back_unchanged(text, tool_parser):
    """Whatever the text, if no call was recognised, nothing was dropped or changed."""
    parsed = make_output_parser(tool_parser=tool_parser, tools=TOOLS).parse(text)
    if not parsed.tool_calls:
        assert parsed.content == (text or None)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_characters="<[{"), max_size=60))
def test_text_without_markup_is_content(text):
    for setup in PARSER_SETUPS:
        if setup["reasoning_parser"] == "deepseek-r1":
            continue  # that one reads untagged output as reasoning, by design
        assert make_output_parser(tools=TOOLS, **setup).parse(text) == msg(text or None)


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_reasoning_plus_content_is_the_text_minus_tags_and_their_whitespace(text):
    parsed = make_output_parser(reasoning_parser="qwen3").parse(text)
    if parsed.reasoning_content is None and not text.lstrip().startswith("<think>"):
        assert parsed.content == (text or None)
    for part in (parsed.reasoning_content or "", parsed.content or ""):
        assert part in text
