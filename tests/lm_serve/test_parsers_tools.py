"""Tool-call parser tables: each case parsed whole, then streamed in many chunkings, with identical results.

Expected messages are written out by hand from the model formats (see the chat templates in
tests/lm_core/fixtures/chat_templates); arguments are the exact text the model wrote.
"""

from __future__ import annotations

import itertools
import json
import random
import zlib

import pytest

from lm_serve.parsers import ParsedMessage, ToolCall, accumulate, make_output_parser


def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


TOOLS = [_tool("get_weather"), _tool("get_time"), _tool("search")]


def counting_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def msg(content=None, calls=(), reasoning=None) -> ParsedMessage:
    """The expected message; calls are (name, arguments) or (id, name, arguments), ids default to call_0, ..."""
    tool_calls = []
    for i, call in enumerate(calls):
        call_id, name, arguments = call if len(call) == 3 else (f"call_{i}", *call)
        tool_calls.append(ToolCall(call_id, name, arguments))
    return ParsedMessage(content=content, reasoning_content=reasoning, tool_calls=tool_calls)


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
    """Non-streamed equals `expected`; every chunking streams to the identical message."""
    kwargs.setdefault("tools", TOOLS)
    assert make_output_parser(id_factory=counting_ids(), **kwargs).parse(text) == expected
    for chunks in chunkings(text):
        parser = make_output_parser(id_factory=counting_ids(), **kwargs)
        deltas = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
        assert accumulate(deltas) == expected, f"chunks: {chunks!r}"
        for delta in deltas:  # a chunk names each call once; id and name come together
            assert len({d.index for d in delta.tool_calls}) == len(delta.tool_calls)
            assert all((d.id is None) == (d.name is None) for d in delta.tool_calls)


W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
T = '{"name": "get_time", "arguments": {}}'
W_CALL = ("get_weather", '{"city": "Paris"}')
T_CALL = ("get_time", "{}")
TRICKY_ARGS = (
    r'{"q": "a } b </tool_call> [TOOL_CALLS] <|action_end|> \"quoted\" 日本語 😀 \u00e9 \\", "n": [1, {"x": null}]}'
)
NESTED_ARGS = '{"filter": {"range": [1, 2.5, -3e-2, {"deep": [true, false, null]}], "ok": true}, "limit": 0}'


def tagged_cases(open_tag: str, close_tag: str, key: str = "arguments") -> list:
    """Cases shared by the `<open>{json}<close>` families (Hermes/Qwen, InternLM2)."""

    def block(body: str, sep: str = "\n") -> str:
        return f"{open_tag}{sep}{body}{sep}{close_tag}"

    w = W.replace('"arguments"', f'"{key}"')
    t = T.replace('"arguments"', f'"{key}"')
    return [
        ("plain", "Hello, world! 1 < 2 and {braces}.", msg("Hello, world! 1 < 2 and {braces}.")),
        ("empty", "", msg()),
        ("whitespace-only", " \n\t\n", msg(" \n\t\n")),
        ("one-call", block(w), msg(None, [W_CALL])),
        ("text-before", "Let me check that.\n\n" + block(w), msg("Let me check that.", [W_CALL])),
        ("text-after", block(w) + "\nIt is sunny.", msg("It is sunny.", [W_CALL])),
        ("two-calls", block(w) + "\n" + block(t), msg(None, [W_CALL, T_CALL])),
        ("three-calls-compact", block(w, "") + block(t, "") + block(w, ""), msg(None, [W_CALL, T_CALL, W_CALL])),
        ("text-between", block(w) + "\nand then\n" + block(t), msg("and then", [W_CALL, T_CALL])),
        ("two-objects-one-block", f"{open_tag}\n{w}\n{t}\n{close_tag}", msg(None, [W_CALL, T_CALL])),
        ("nested-args", block(f'{{"name": "search", "{key}": {NESTED_ARGS}}}'), msg(None, [("search", NESTED_ARGS)])),
        (
            "tricky-strings",
            block(f'{{"name": "search", "{key}": {TRICKY_ARGS}}}'),
            msg(None, [("search", TRICKY_ARGS)]),
        ),
        ("empty-args", block(t), msg(None, [T_CALL])),
        ("missing-args", block('{"name": "get_time"}'), msg(None, [("get_time", "{}")])),
        (
            "parameters-key",
            block('{"name": "get_time", "parameters": {"tz": "UTC"}}'),
            msg(None, [("get_time", '{"tz": "UTC"}')]),
        ),
        (
            "args-before-name",
            block('{"arguments": {"city": "Oslo"}, "name": "get_weather"}'),
            msg(None, [("get_weather", '{"city": "Oslo"}')]),
        ),
        (
            "quoted-args",
            block('{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}'),
            msg(None, [("get_weather", '{"city": "Rome"}')]),
        ),
        (
            "extra-keys",
            block('{"id": "x1", "name": "get_time", "arguments": {"a": 1}, "type": "function"}'),
            msg(None, [("get_time", '{"a": 1}')]),
        ),
        ("escaped-name", block('{"name": "get_\\u0074ime", "arguments": {}}'), msg(None, [T_CALL])),
        ("whitespace-around", "\n\n" + block(w) + "\n\n", msg(None, [W_CALL])),
        ("not-json", block("not json at all"), msg(block("not json at all"))),
        ("name-not-string", block('{"name": 5, "arguments": {}}'), msg(block('{"name": 5, "arguments": {}}'))),
        ("empty-name", block('{"name": "", "arguments": {}}'), msg(block('{"name": "", "arguments": {}}'))),
        (
            "args-not-object",
            block('{"name": "get_time", "arguments": [1, 2]}'),
            msg(block('{"name": "get_time", "arguments": [1, 2]}')),
        ),
        (
            "quoted-args-not-object",
            block('{"name": "get_time", "arguments": "[1]"}'),
            msg(block('{"name": "get_time", "arguments": "[1]"}')),
        ),
        ("no-name", block('{"arguments": {"a": 1}}'), msg(block('{"arguments": {"a": 1}}'))),
        ("truncated-before-name", f'{open_tag}\n{{"name": "get_wea', msg(f'{open_tag}\n{{"name": "get_wea')),
        (
            "truncated-in-args",
            f'{open_tag}\n{{"name": "get_weather", "{key}": {{"city": "Par',
            msg(None, [("get_weather", '{"city": "Par')]),
        ),
        (
            "invalid-after-commit",
            block('{"name": "get_weather", "arguments": {"city": "Paris" "x"}}'),
            msg('"x"}}\n' + close_tag, [("get_weather", '{"city": "Paris" ')]),
        ),
        ("open-tag-only", open_tag, msg(open_tag)),
        ("partial-open-tag", "Hello " + open_tag[:-2], msg("Hello " + open_tag[:-2])),
        ("missing-close-tag", f"{open_tag}\n{w}", msg(None, [W_CALL])),
        ("missing-close-then-text", f"{open_tag}\n{w} and more", msg("and more", [W_CALL])),
        ("partial-close-tag-at-end", f"{open_tag}\n{w}\n{close_tag[:-3]}", msg(close_tag[:-3], [W_CALL])),
        ("repeated-open-tag", open_tag + block(w), msg(open_tag, [W_CALL])),
        ("call-then-malformed", block(w) + "\n" + block("oops"), msg(block("oops"), [W_CALL])),
        ("close-tag-in-content", f"text {close_tag} more", msg(f"text {close_tag} more")),
    ]


def _ids(cases):
    return [pytest.param(text, expected, id=name) for name, text, expected in cases]


@pytest.mark.parametrize(("text", "expected"), _ids(tagged_cases("<tool_call>", "</tool_call>")))
def test_hermes(text, expected):
    check(text, expected, tool_parser="hermes")


@pytest.mark.parametrize(
    ("text", "expected"), _ids(tagged_cases("<|action_start|><|plugin|>", "<|action_end|>", "parameters"))
)
def test_internlm2(text, expected):
    check(text, expected, tool_parser="internlm2")


INTERNLM2_EXTRA = [
    (
        "interpreter-action",
        "<|action_start|><|interpreter|>\nprint(1)<|action_end|>",
        msg("<|action_start|><|interpreter|>\nprint(1)<|action_end|>"),
    ),
    (
        "real-format",
        'I will look it up.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|action_end|>\n",
        msg("I will look it up.", [W_CALL]),
    ),
    ("lone-action-start", "<|action_start|>", msg("<|action_start|>")),
]


@pytest.mark.parametrize(("text", "expected"), _ids(INTERNLM2_EXTRA))
def test_internlm2_actions(text, expected):
    check(text, expected, tool_parser="internlm2")


def test_hermes_inside_qwen3_thinking():
    thought = f"The user wants weather; maybe <tool_call>{T}</tool_call>?"
    text = f"<think>\n{thought}\n</think>\n\n<tool_call>\n{W}\n</tool_call>"
    expected = msg(None, [W_CALL], reasoning=thought)
    check(text, expected, tool_parser="qwen3", reasoning_parser="qwen3")


L = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LT = '{"name": "get_time", "parameters": {}}'

LLAMA3_CASES = [
    ("plain", "The weather in Paris is sunny.", msg("The weather in Paris is sunny.")),
    ("empty", "", msg()),
    ("whitespace-only", "  \n", msg("  \n")),
    ("one-call", L, msg(None, [W_CALL])),
    ("python-tag", "<|python_tag|>" + L, msg(None, [W_CALL])),
    ("python-tag-space", "<|python_tag|> " + L, msg(None, [W_CALL])),
    ("leading-whitespace", "\n " + L, msg(None, [W_CALL])),
    ("two-calls", f"{L}; {LT}", msg(None, [W_CALL, T_CALL])),
    ("three-calls-tight", f"<|python_tag|>{L};{LT};{L}", msg(None, [W_CALL, T_CALL, W_CALL])),
    ("newline-separated", f"{L}\n{LT}", msg(None, [W_CALL, T_CALL])),
    ("arguments-key", '{"name": "get_time", "arguments": {"tz": "UTC"}}', msg(None, [("get_time", '{"tz": "UTC"}')])),
    ("nested-args", f'{{"name": "search", "parameters": {NESTED_ARGS}}}', msg(None, [("search", NESTED_ARGS)])),
    ("tricky-strings", f'{{"name": "search", "parameters": {TRICKY_ARGS}}}', msg(None, [("search", TRICKY_ARGS)])),
    ("empty-params", LT, msg(None, [T_CALL])),
    ("missing-params", '{"name": "get_time"}', msg(None, [("get_time", "{}")])),
    (
        "params-before-name",
        '{"parameters": {"city": "Oslo"}, "name": "get_weather"}',
        msg(None, [("get_weather", '{"city": "Oslo"}')]),
    ),
    (
        "quoted-params",
        '{"name": "get_weather", "parameters": "{\\"city\\": \\"Rome\\"}"}',
        msg(None, [("get_weather", '{"city": "Rome"}')]),
    ),
    ("text-after-call", L + "\nHope this helps!", msg("Hope this helps!", [W_CALL])),
    ("text-before-json", "Sure: " + L, msg("Sure: " + L)),
    ("unknown-name", '{"name": "Ada", "parameters": {"age": 36}}', msg('{"name": "Ada", "parameters": {"age": 36}}')),
    ("plain-json-answer", '{"answer": 42, "unit": "km"}', msg('{"answer": 42, "unit": "km"}')),
    ("name-is-object", '{"name": {"first": "Ada"}}', msg('{"name": {"first": "Ada"}}')),
    ("json-list", f"[{L}]", msg(f"[{L}]")),
    ("malformed-before-name", '{"name" "get_weather"}', msg('{"name" "get_weather"}')),
    ("truncated-before-name", '{"name": "get_wea', msg('{"name": "get_wea')),
    (
        "truncated-in-params",
        '{"name": "get_weather", "parameters": {"city": "Pa',
        msg(None, [("get_weather", '{"city": "Pa')]),
    ),
    (
        "invalid-after-commit",
        '{"name": "get_weather", "parameters": {"city": }}',
        msg("}}", [("get_weather", '{"city": ')]),
    ),
    ("partial-python-tag", "<|python_", msg("<|python_")),
    ("python-tag-alone", "<|python_tag|>", msg("<|python_tag|>")),
    (
        "python-tag-code",
        '<|python_tag|>brave_search.call(query="paris")',
        msg('<|python_tag|>brave_search.call(query="paris")'),
    ),
    ("separator-then-text", f"{L}; bye", msg("; bye", [W_CALL])),
    ("trailing-separator", f"{L};", msg(";", [W_CALL])),
    ("second-not-a-call", f'{L}; {{"foo": 1}}', msg('; {"foo": 1}', [W_CALL])),
    (
        "second-unknown-name",
        f'{L}; {{"name": "nope", "parameters": {{}}}}',
        msg('; {"name": "nope", "parameters": {}}', [W_CALL]),
    ),
    (
        "later-json-stays-content",
        'Result: {"name": "get_time", "parameters": {}}',
        msg('Result: {"name": "get_time", "parameters": {}}'),
    ),
]


@pytest.mark.parametrize(("text", "expected"), _ids(LLAMA3_CASES))
def test_llama3(text, expected):
    check(text, expected, tool_parser="llama3")


def test_llama3_any_name_when_tools_have_no_names():
    check(
        '{"name": "Ada", "parameters": {}}',
        msg(None, [("Ada", "{}")]),
        tool_parser="llama3",
        tools=[{"type": "function"}],
    )


M = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
MT = '{"name": "get_time", "arguments": {}}'

MISTRAL_CASES = [
    ("plain", "Paris is sunny [today] {really}.", msg("Paris is sunny [today] {really}.")),
    ("empty", "", msg()),
    ("list-one", f"[TOOL_CALLS][{M}]", msg(None, [W_CALL])),
    ("list-two", f"[TOOL_CALLS][{M}, {MT}]", msg(None, [W_CALL, T_CALL])),
    ("list-spaced", f"[TOOL_CALLS] [ {M} ,\n {MT} ] ", msg(None, [W_CALL, T_CALL])),
    ("text-before", f"Checking.\n[TOOL_CALLS][{M}]", msg("Checking.", [W_CALL])),
    ("text-after", f"[TOOL_CALLS][{M}]\nDone.", msg("Done.", [W_CALL])),
    ("bare-object", f"[TOOL_CALLS]{M}", msg(None, [W_CALL])),
    ("name-args", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', msg(None, [W_CALL])),
    (
        "name-args-two",
        '[TOOL_CALLS]get_time[ARGS]{}[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        msg(None, [T_CALL, W_CALL]),
    ),
    (
        "call-id",
        '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}',
        msg(None, [("a1b2c3d4e", *W_CALL)]),
    ),
    (
        "nested-args",
        f'[TOOL_CALLS][{{"name": "search", "arguments": {NESTED_ARGS}}}]',
        msg(None, [("search", NESTED_ARGS)]),
    ),
    (
        "tricky-strings",
        f'[TOOL_CALLS][{{"name": "search", "arguments": {TRICKY_ARGS}}}]',
        msg(None, [("search", TRICKY_ARGS)]),
    ),
    ("tricky-name-args", f"[TOOL_CALLS]search[ARGS]{TRICKY_ARGS}", msg(None, [("search", TRICKY_ARGS)])),
    ("empty-args", f"[TOOL_CALLS][{MT}]", msg(None, [T_CALL])),
    ("id-key-ignored", '[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "abcdefghi"}]', msg(None, [T_CALL])),
    (
        "quoted-args",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]',
        msg(None, [("get_weather", '{"city": "Rome"}')]),
    ),
    ("not-a-call", "[TOOL_CALLS]not a call", msg("[TOOL_CALLS]not a call")),
    ("list-of-numbers", "[TOOL_CALLS][1, 2]", msg("[TOOL_CALLS][1, 2]")),
    ("empty-list", "[TOOL_CALLS][]", msg("[TOOL_CALLS][]")),
    ("args-not-object", '[TOOL_CALLS]get_time[ARGS]"x"', msg('[TOOL_CALLS]get_time[ARGS]"x"')),
    ("name-with-space", "[TOOL_CALLS]get time[ARGS]{}", msg("[TOOL_CALLS]get time[ARGS]{}")),
    ("empty-call-id", "[TOOL_CALLS]get_time[CALL_ID][ARGS]{}", msg("[TOOL_CALLS]get_time[CALL_ID][ARGS]{}")),
    ("args-without-name", "[TOOL_CALLS][ARGS]{}", msg("[TOOL_CALLS][ARGS]{}")),
    ("truncated-before-name", '[TOOL_CALLS][{"name": "get_', msg('[TOOL_CALLS][{"name": "get_')),
    ("truncated-in-args", f"[TOOL_CALLS][{M[:-7]}", msg(None, [("get_weather", '{"city": "P')])),
    ("truncated-name-args", '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa', msg(None, [("get_weather", '{"city": "Pa')])),
    ("truncated-in-name", "[TOOL_CALLS]get_wea", msg("[TOOL_CALLS]get_wea")),
    ("truncated-at-args-tag", "[TOOL_CALLS]get_weather[AR", msg("[TOOL_CALLS]get_weather[AR")),
    ("partial-tag", "Hello [TOOL_CA", msg("Hello [TOOL_CA")),
    ("tag-alone", "[TOOL_CALLS]", msg("[TOOL_CALLS]")),
    ("lookalike-tag", "[TOOL_CALL][{}]", msg("[TOOL_CALL][{}]")),
    ("list-never-closed", f"[TOOL_CALLS][{M}", msg(None, [W_CALL])),
    ("second-item-malformed", f'[TOOL_CALLS][{M}, {{"bad": 1}}]', msg(', {"bad": 1}]', [W_CALL])),
    ("invalid-after-commit", '[TOOL_CALLS]get_time[ARGS]{"a": tru}', msg("}", [("get_time", '{"a": tru')])),
]


@pytest.mark.parametrize(("text", "expected"), _ids(MISTRAL_CASES))
def test_mistral(text, expected):
    check(text, expected, tool_parser="mistral")


def test_mistral_default_ids_are_nine_alphanumerics():
    parsed = make_output_parser(tool_parser="mistral", tools=TOOLS).parse(f"[TOOL_CALLS][{M}, {MT}]")
    ids = [call.id for call in parsed.tool_calls]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and len(set(ids)) == 2


def test_default_ids_are_openai_style_and_unique():
    parsed = make_output_parser(tool_parser="hermes", tools=TOOLS).parse(
        f"<tool_call>{W}</tool_call><tool_call>{T}</tool_call>"
    )
    ids = [call.id for call in parsed.tool_calls]
    assert all(i.startswith("call_") and len(i) > 10 for i in ids) and len(set(ids)) == 2


@pytest.mark.parametrize(
    ("tool_parser", "text"),
    [
        ("hermes", f'<tool_call>\n{{"name": "search", "arguments": {NESTED_ARGS}}}\n</tool_call>'),
        ("internlm2", f'<|action_start|><|plugin|>\n{{"name": "search", "parameters": {NESTED_ARGS}}}<|action_end|>'),
        ("llama3", f'{{"name": "search", "parameters": {NESTED_ARGS}}}'),
        ("mistral", f'[TOOL_CALLS][{{"name": "search", "arguments": {NESTED_ARGS}}}]'),
        ("mistral", f"[TOOL_CALLS]search[ARGS]{NESTED_ARGS}"),
    ],
)
def test_arguments_stream_incrementally(tool_parser, text):
    """Token by token: the name arrives before the arguments are complete, then the arguments come in pieces."""
    parser = make_output_parser(tool_parser=tool_parser, tools=TOOLS, id_factory=counting_ids())
    deltas = [parser.feed(text[i : i + 3]) for i in range(0, len(text), 3)] + [parser.finish()]
    pieces = [d for delta in deltas for d in delta.tool_calls]
    assert pieces[0].name == "search" and pieces[0].id == "call_0"
    argument_pieces = [d.arguments for d in pieces if d.arguments]
    assert len(argument_pieces) > 10
    assert "".join(argument_pieces) == NESTED_ARGS and json.loads(NESTED_ARGS)
    first_args = next(i for i, delta in enumerate(deltas) if any(d.arguments for d in delta.tool_calls))
    named = next(i for i, delta in enumerate(deltas) if any(d.name for d in delta.tool_calls))
    assert named <= first_args < len(deltas) - 5


def test_held_text_is_only_a_possible_tag_start():
    """Content is released as soon as it cannot begin the markup: only `\\n<tool_` waits."""
    parser = make_output_parser(tool_parser="hermes", tools=TOOLS)
    assert parser.feed("Sure, 1 < 2.").content == "Sure, 1 < 2."
    assert parser.feed(" Checking\n<tool_").content == " Checking"
    assert parser.feed("box> is not a tag").content == "\n<tool_box> is not a tag"


def test_tools_none_means_everything_is_content():
    text = f"<tool_call>\n{W}\n</tool_call>"
    for tools in (None, []):
        assert make_output_parser(tool_parser="hermes", tools=tools).parse(text) == msg(text)
    assert make_output_parser(tool_parser=None, tools=TOOLS).parse(text) == msg(text)
