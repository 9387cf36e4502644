"""Chat templates: parity with transformers' apply_chat_template on real model templates, the built-in templates,
loading, and errors that name the problem."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from lm_core.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    builtin_template,
    load_chat_template,
)
from lm_core.chat_templates.jinja import iterates_content_parts
from lm_core.messages import InvalidMessagesError

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
FIXTURE_NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city, in °C or °F (e.g. Zürich)",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city's name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
            },
            "required": ["city"],
        },
    },
}
# What an OpenAI client sends: arguments as a JSON string. Mistral templates need 9-character alphanumeric ids.
WEATHER_CALL = {
    "id": "call12345",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "celsius"}'},
}
DOCUMENTS = [
    {"doc_id": "1", "title": "Lake Zürich", "text": "Lake Zürich is 88 km² large."},
    {"doc_id": "2", "title": "Weather", "text": "Zürich has a temperate climate."},
]
SYSTEM = {"role": "system", "content": "You are a concise assistant."}
USER = {"role": "user", "content": "Hello! Who are you?"}
TOOL_TURNS = [
    {"role": "user", "content": "What's the weather in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": "call12345", "content": '{"temperature": 21}'},
]

# name -> (messages, tools, documents)
CONVERSATIONS = {
    "user": ([USER], None, None),
    "system_user": ([SYSTEM, USER], None, None),
    "multi_turn": (
        [SYSTEM, USER, {"role": "assistant", "content": "I am a model."}, {"role": "user", "content": "Nice."}],
        None,
        None,
    ),
    "multi_turn_no_system": (
        [USER, {"role": "assistant", "content": "I am a model."}, {"role": "user", "content": "And 2+2?"}],
        None,
        None,
    ),
    "assistant_last": ([USER, {"role": "assistant", "content": "I am a model."}], None, None),
    "unicode_and_spaces": (
        [
            {"role": "user", "content": "  Grüße aus Zürich 🌍, ¿qué tal? 你好  \n"},
            {"role": "assistant", "content": "  Gut, danke!  "},
            {"role": "user", "content": 'Quote: "<b>&</b>"'},
        ],
        None,
        None,
    ),
    "tools_offered": ([SYSTEM, {"role": "user", "content": "Weather in Bern?"}], [WEATHER_TOOL], None),
    "tool_call": (TOOL_TURNS, [WEATHER_TOOL], None),
    "tool_round_trip": (
        [*TOOL_TURNS, {"role": "assistant", "content": "It is 21 °C."}, {"role": "user", "content": "Thanks!"}],
        [WEATHER_TOOL],
        None,
    ),
    "documents": ([{"role": "user", "content": "How large is Lake Zürich?"}], None, DOCUMENTS),
    "reasoning": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two plus two is four."},
            {"role": "user", "content": "And 3+3?"},
        ],
        None,
        None,
    ),
    "think_in_content": (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\nIt is 4."},
        ],
        None,
        None,
    ),
}


# Conversations that templates with these features must render (the others may refuse, as long as transformers does).
MUST_RENDER = {
    "tools_offered": ("tools",),
    "tool_call": ("tools",),
    "tool_round_trip": ("tools",),
    "documents": ("documents",),
}


@cache
def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


@cache
def _base_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@cache
def family_tokenizer(name: str, model_dir: Path):
    """The SmolLM2 tokenizer with the family's special tokens (whole tokens, so ids show the control tokens)."""
    data = fixture(name)
    tok = copy.deepcopy(_base_tokenizer(model_dir))
    named = {key: data[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token") if key in data}
    tok.add_special_tokens({**named, "additional_special_tokens": data["added_tokens"]})
    if isinstance(data["chat_template"], list):
        tok.chat_template = {entry["name"]: entry["template"] for entry in data["chat_template"]}
    else:
        tok.chat_template = data["chat_template"]
    return tok


def hf_messages(messages: list[dict], string_arguments: bool) -> list[dict]:
    """The messages as transformers' convention has them: tool call arguments as dicts, unless the template joins
    them as strings (then the same JSON string an OpenAI client sends). Assistant messages without content get "",
    as validate_messages gives them (transformers would drop a None content)."""
    out = copy.deepcopy(messages)
    for message in out:
        if message["role"] == "assistant" and message.get("content") is None:
            message["content"] = ""
        for call in message.get("tool_calls") or []:
            if not string_arguments:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


def kwarg_variants(features: list[str]) -> list[dict]:
    if "enable_thinking" in features:
        return [{}, {"enable_thinking": True}, {"enable_thinking": False}]
    if "thinking" in features:
        return [{}, {"thinking": True}, {"thinking": False}]
    return [{}]


def input_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding (dict) by default; older versions a list.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def assert_parity(
    tok, ours: ChatTemplate, messages, tools, documents, *, hf_template=None, string_arguments=False, **kwargs
):
    """Our rendering equals transformers' (string and ids), or both refuse the conversation."""
    hf_kwargs = dict(tools=tools, documents=documents, chat_template=hf_template, **kwargs)
    hf_msgs = hf_messages(messages, string_arguments)
    try:
        expected = tok.apply_chat_template(hf_msgs, tokenize=False, **hf_kwargs)
    except Exception as hf_error:  # any failure of transformers must be a failure of ours too
        with pytest.raises(ValueError):
            ours.render(messages, tools=tools, documents=documents, special_tokens=tok.special_tokens_map, **kwargs)
        return hf_error
    text = ours.render(messages, tools=tools, documents=documents, special_tokens=tok.special_tokens_map, **kwargs)
    assert text == expected
    expected_ids = input_ids(tok.apply_chat_template(hf_msgs, tokenize=True, **hf_kwargs))
    assert tok.encode(text, add_special_tokens=False) == expected_ids
    return None


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_parity_with_transformers(name, conversation, default_model_dir):
    data = fixture(name)
    features = data["features"]
    tok = family_tokenizer(name, default_model_dir)
    ours = load_chat_template(FIXTURES / f"{name}.json")
    for key in ("bos_token", "eos_token"):
        if key in data:
            assert ours.special_tokens[key] == data[key]
    hf_template = None if isinstance(data["chat_template"], list) else data["chat_template"]
    messages, tools, documents = CONVERSATIONS[conversation]
    for add_generation_prompt in (True, False):
        for kwargs in kwarg_variants(features):
            error = assert_parity(
                tok,
                ours,
                messages,
                tools,
                documents,
                hf_template=hf_template,
                string_arguments="tools_string_arguments" in features,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
            # Templates made for tools and documents must render them, not just fail alike.
            if any(feature in features for feature in MUST_RENDER.get(conversation, ())):
                assert error is None, f"{name} refused {conversation}: {error}"


def test_parity_with_transformers_smollm2_own_template(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ours = load_chat_template(model_dir=default_model_dir)
    assert ours.source == tok.chat_template
    assert ours.special_tokens == tok.special_tokens_map
    for conversation in ("user", "system_user", "multi_turn", "multi_turn_no_system", "unicode_and_spaces"):
        messages, _, _ = CONVERSATIONS[conversation]
        for add_generation_prompt in (True, False):
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            text = ours.render(messages, add_generation_prompt=add_generation_prompt)
            assert text == expected
            expected_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
            assert tok.encode(text, add_special_tokens=False) == input_ids(expected_ids)


def test_parity_named_rag_template(default_model_dir):
    tok = family_tokenizer("c4ai-command-r-plus", default_model_dir)
    ours = load_chat_template(FIXTURES / "c4ai-command-r-plus.json")
    assert set(ours.variants) == {"tool_use", "rag"}
    messages, _, documents = CONVERSATIONS["documents"]
    rag = ours.variant("rag")
    for add_generation_prompt in (True, False):
        error = assert_parity(
            tok,
            rag,
            messages,
            None,
            documents,
            hf_template="rag",
            add_generation_prompt=add_generation_prompt,
            citation_mode="accurate",
        )
        assert error is None
    assert "Lake Zürich is 88 km² large." in rag.render(messages, documents=documents)


def test_tool_use_variant_is_chosen_when_tools_are_given():
    ours = load_chat_template(FIXTURES / "c4ai-command-r-plus.json")
    with_tools = ours.render([USER], tools=[WEATHER_TOOL])
    assert "def get_weather(city: str, unit: Optional[str] = None) -> List[Dict]:" in with_tools
    assert "get_weather" not in ours.render([USER])


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct", "deepseek-v3.1", "llama-3.3-70b-instruct"])
def test_tool_call_arguments_render_the_same_from_a_json_string_or_a_dict(name):
    ours = load_chat_template(FIXTURES / f"{name}.json")
    as_dict = copy.deepcopy(TOOL_TURNS)
    as_dict[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Zürich", "unit": "celsius"}
    text = ours.render(TOOL_TURNS, tools=[WEATHER_TOOL])
    assert ours.render(as_dict, tools=[WEATHER_TOOL]) == text
    assert '{"city": "Zürich", "unit": "celsius"}' in text


def test_text_parts_are_joined_for_templates_that_expect_a_string(default_model_dir):
    tok = family_tokenizer("qwen2.5-7b-instruct", default_model_dir)
    ours = load_chat_template(FIXTURES / "qwen2.5-7b-instruct.json")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello!"}, {"type": "text", "text": "Who?"}]}]
    joined = [{"role": "user", "content": "Hello!\nWho?"}]
    assert ours.render(parts) == tok.apply_chat_template(joined, tokenize=False, add_generation_prompt=True)


def test_content_parts_are_kept_for_templates_that_iterate_them(default_model_dir):
    tok = family_tokenizer("qwen2-vl-7b-instruct", default_model_dir)
    ours = load_chat_template(FIXTURES / "qwen2-vl-7b-instruct.json")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}]},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "And this?"},
            ],
        },
    ]
    assert_parity(tok, ours, messages, None, None, hf_template=tok.chat_template, add_generation_prompt=True)
    assert ours.render(messages).count("<|vision_start|><|image_pad|><|vision_end|>") == 1


def test_only_multimodal_fixture_iterates_content_parts():
    sources = {name: load_chat_template(FIXTURES / f"{name}.json").source for name in FIXTURE_NAMES}
    found = {name for name, source in sources.items() if iterates_content_parts(source)}
    assert found == {"qwen2-vl-7b-instruct"}
    assert iterates_content_parts("{% set c = m['content'] %}{% for p in c %}{{ p.text }}{% endfor %}")
    assert not iterates_content_parts("{% for line in m.content.split('\\n') %}{{ line }}{% endfor %}")


def test_developer_role_becomes_system_unless_the_template_knows_it():
    messages = [{"role": "developer", "content": "Be terse."}, USER]
    assert (
        builtin_template("chatml")
        .render(messages, add_generation_prompt=False)
        .startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    )
    knows = ChatTemplate("{% for m in messages %}{{ m.role }};{% endfor %}{# developer #}")
    assert knows.render(messages) == "developer;user;"


def test_reasoning_given_as_thinking_reaches_reasoning_content():
    ours = load_chat_template(FIXTURES / "qwen3-0.6b.json")
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", "thinking": "Easy."},
    ]
    assert ours.render(messages, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nEasy.\n</think>\n\n4.<|im_end|>\n"
    )


def test_enable_thinking_false_closes_the_think_block():
    ours = load_chat_template(FIXTURES / "qwen3-0.6b.json")
    assert ours.render([USER], enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ours.render([USER], enable_thinking=True).endswith("<|im_start|>assistant\n")


# Built-in templates against strings written from the formats' public descriptions.
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
]
BUILTIN_EXPECTED = {
    "base": "Be brief.\nHi!\nHello.\nBye?",
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s><s>[INST] Bye? [/INST]",
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "vicuna": "<s>Be brief. USER: Hi! ASSISTANT: Hello.</s>USER: Bye? ASSISTANT:",
}


def test_builtin_names():
    assert BUILTIN_TEMPLATES == ("base", "chatml", "llama2", "llama3", "vicuna")
    assert set(BUILTIN_EXPECTED) == set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_template(name):
    template = load_chat_template(name)
    assert template.name == name
    assert template.render(CHAT) == BUILTIN_EXPECTED[name]


def test_builtins_without_generation_prompt_and_system():
    no_system = CHAT[1:3]
    assert builtin_template("chatml").render(no_system, add_generation_prompt=False) == (
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert builtin_template("llama2").render(no_system) == "<s>[INST] Hi! [/INST] Hello. </s>"
    assert builtin_template("llama3").render(no_system, add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    assert builtin_template("vicuna").render(CHAT[1:2]) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi! ASSISTANT:"
    )
    assert builtin_template("base").render(CHAT[1:2]) == "Hi!"


def test_builtins_render_tool_history():
    turns = [*TOOL_TURNS[:2], {"role": "tool", "tool_call_id": "call12345", "content": "21"}]
    assert builtin_template("chatml").render(turns) == (
        "<|im_start|>user\nWhat's the weather in Zürich?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>tool\n21<|im_end|>\n<|im_start|>assistant\n"
    )
    assert builtin_template("llama3").render(turns) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat's the weather in Zürich?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
        '{"city": "Zürich", "unit": "celsius"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n21<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_builtin_uses_the_model_directory_special_tokens(default_model_dir):
    template = load_chat_template("llama2", model_dir=default_model_dir)
    assert template.special_tokens["bos_token"] == "<|im_start|>"  # SmolLM2's, replacing the format's "<s>"
    assert template.render([USER]) == "<|im_start|>[INST] Hello! Who are you? [/INST]"


@pytest.mark.parametrize(
    ("name", "messages", "problem"),
    [
        ("llama2", [USER, USER], "alternating user/assistant"),
        ("llama2", [SYSTEM], "needs a user message"),
        ("llama2", TOOL_TURNS, "not tool messages"),
        ("vicuna", [{"role": "assistant", "content": "Hi"}], "alternating user/assistant"),
        ("base", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text content"),
        ("chatml", [{"role": "user", "content": [{"type": "image", "image": "x"}]}], "text content"),
    ],
)
def test_builtin_refusals_name_the_problem(name, messages, problem):
    with pytest.raises(ChatTemplateError, match=f"'{name}' rejected the conversation: .*{problem}"):
        builtin_template(name).render(messages)


# Loading.
def test_load_unknown_name():
    with pytest.raises(ValueError) as info:
        load_chat_template("chatgpt")
    assert str(info.value) == (
        "unknown chat template 'chatgpt': pass one of base, chatml, llama2, llama3, vicuna "
        "or a path to a .jinja/.json file"
    )


def test_load_nothing_gives_none(tmp_path):
    assert load_chat_template() is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    assert load_chat_template(model_dir=tmp_path) is None


def test_load_model_dir_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match="model directory not found"):
        load_chat_template(model_dir=tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatTemplateError, match=r"cannot read .*tokenizer_config\.json"):
        load_chat_template(model_dir=tmp_path)


def test_load_model_dir_file_precedence_and_special_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "config", "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"})
    )
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>", "eos_token": "<old>"}))
    template = load_chat_template(model_dir=tmp_path)
    assert template.source == "config"
    assert template.name == f"{tmp_path.name}/tokenizer_config.json"
    assert template.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "processor"}))
    assert load_chat_template(model_dir=tmp_path).source == "processor"
    (tmp_path / "chat_template.jinja").write_text("standalone {{ bos_token }}")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools")
    template = load_chat_template(model_dir=tmp_path)
    assert template.render([USER]) == "standalone <s>"
    assert template.render([USER], tools=[WEATHER_TOOL]) == "tools"


def test_load_named_templates(tmp_path):
    named = [{"name": "default", "template": "d"}, {"name": "rag", "template": "r"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    template = load_chat_template(model_dir=tmp_path)
    assert (template.source, template.variants) == ("d", {"rag": "r"})
    assert template.variant("rag").render([USER]) == "r"
    with pytest.raises(ChatTemplateError, match="has no variant 'tool_use' \\(variants: rag\\)"):
        template.variant("tool_use")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[1:]}))
    with pytest.raises(ChatTemplateError, match="none of the named chat templates is 'default'"):
        load_chat_template(model_dir=tmp_path)


def test_load_files(tmp_path, default_model_dir):
    jinja_file = tmp_path / "mine.jinja"
    jinja_file.write_text("{{ bos_token }}{{ messages[0].content }}")
    template = load_chat_template(jinja_file, model_dir=default_model_dir)
    assert template.name == "mine.jinja"
    assert template.render([USER]) == "<|im_start|>Hello! Who are you?"
    json_file = tmp_path / "tokenizer_config.json"
    json_file.write_text(json.dumps({"chat_template": "{{ bos_token }}!", "bos_token": "<B>"}))
    assert load_chat_template(str(json_file), model_dir=default_model_dir).render([USER]) == "<B>!"
    with pytest.raises(ChatTemplateError, match=r"chat template file not found: .*nope\.jinja"):
        load_chat_template(tmp_path / "nope.jinja")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ChatTemplateError, match=r"empty\.json has no 'chat_template' entry"):
        load_chat_template(tmp_path / "empty.json")


def test_invalid_jinja_is_reported_at_load(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ChatTemplateError, match=r"'bad\.jinja' is not valid Jinja: .*endfor"):
        load_chat_template(bad)


# Rendering errors and the sandbox.
def test_template_refusal_carries_the_template_message():
    gemma = load_chat_template(FIXTURES / "gemma-2-2b-it.json")
    with pytest.raises(
        ChatTemplateError, match=r"'gemma-2-2b-it\.json' rejected the conversation: System role not supported"
    ):
        gemma.render([SYSTEM, USER])


def test_template_failure_on_unexpected_input_is_a_chat_template_error():
    qwen = load_chat_template(FIXTURES / "qwen2.5-7b-instruct.json")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ChatTemplateError, match="cannot render this input: TypeError"):
        qwen.render(image)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]\.role: 'robot' is not one of"),
        ({"messages": []}, "messages: empty"),
        ({"messages": [USER], "tools": WEATHER_TOOL}, "tools: expected a list of dicts, got dict"),
        ({"messages": [USER], "tools": ["get_weather"]}, r"tools\[0\]: expected a dict \(a JSON schema"),
        ({"messages": [USER], "documents": ["text"]}, r"documents\[0\]: expected a dict, got str"),
    ],
)
def test_invalid_input_names_the_problem(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        builtin_template("chatml").render(**kwargs)


def test_invalid_messages_error_type():
    with pytest.raises(InvalidMessagesError):
        builtin_template("chatml").render([{"role": "user"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{% set ns = namespace(_x=1) %}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{{ dict.__class__.__subclasses__() }}",
    ],
)
def test_sandbox_refuses_unsafe_templates(source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render([USER])


def test_sandbox_hides_internals():
    assert ChatTemplate("{{ raise_exception.__globals__ }}{{ messages.__class__ }}").render([USER]) == ""


def test_template_sees_rich_objects_as_placeholders():
    class Image:
        def save(self, path):  # a method a template must never reach
            raise AssertionError("called")

    template = ChatTemplate("{% for p in messages[0].content %}{{ p.image }} {% endfor %}")
    assert template.render([{"role": "user", "content": [{"type": "image", "image": Image()}]}]) == "<Image> "


def test_globals_filters_and_variables():
    template = ChatTemplate(
        "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ dict(a=1) | tojson }}|"
        "{{ bos_token }}|{{ add_generation_prompt }}"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "{% generation %}|gen{% endgeneration %}|{{ strftime_now('%Y') | length }}",
        special_tokens={"bos_token": "<s>"},
    )
    text = template.render([USER], x={"k": "<b>é"}, special_tokens={"eos_token": "</s>"})
    assert text == '{"k": "<b>é"}|{\n  "k": "<b>é"\n}|{"a": 1}|<s>|True01|gen|4'
    # Template kwargs override special tokens, as in transformers.
    assert ChatTemplate("{{ bos_token }}", special_tokens={"bos_token": "<s>"}).render([USER], bos_token="B") == "B"


def test_trailing_newline_is_dropped_like_transformers():
    assert ChatTemplate("x\n").render([USER]) == "x"


def test_chat_template_module_does_not_import_transformers_or_torch():
    code = "import sys, lm_core.chat_template, lm_core.messages; print({'transformers', 'torch'} & set(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "set()"
