"""Chat templates: a model's own Jinja template, or a built-in one, rendered from OpenAI-style messages.

Rendering matches `transformers`' ``tokenizer.apply_chat_template(..., tokenize=False)`` (same Jinja settings,
globals, ``tojson`` filter and variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the
special tokens such as ``bos_token``, and any template kwargs such as ``enable_thinking``). Encode the result without
adding special tokens: templates write them (``tokenizer.encode(text, add_special_tokens=False)``).

What we do on top of that, so OpenAI-style requests work with every template:

* messages are checked and normalized by `lm_core.messages.validate_messages`: None values dropped (as transformers
  does), tool call arguments as dicts that print as JSON text (so both ``| tojson`` and string-joining templates
  work), and ``""`` as the content of assistant messages that only call tools (transformers leaves the key out, which
  Qwen3's and DeepSeek-V3's templates cannot render);
* a content list made only of text parts is joined (with "\\n") into one string, unless the template loops over
  message content itself (multimodal templates do; they get the list);
* the "developer" role becomes "system" for templates that do not mention "developer";
* a reasoning given as ``reasoning_content``, ``thinking`` or ``reasoning`` is offered under the first two names;
* when tools are passed and the model has a template named "tool_use" besides its default one, that one is used.

Built-in templates (`BUILTIN_TEMPLATES`) are for models without one of their own:

* ``base``: no roles and no special tokens: the messages' text contents, separated by newlines (for base models,
  whose "chat" is plain text continuation; ``add_generation_prompt``, tools and documents are ignored);
* ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` turns;
* ``llama2``: ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] assistant </s>`` (alternating roles);
* ``llama3``: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`` turns after ``<|begin_of_text|>``;
* ``vicuna``: Vicuna v1.1, ``system USER: user ASSISTANT: assistant</s>USER: ...``.

The built-ins render tool calls and tool results they find in the history, but do not describe ``tools`` to the
model: use the model's own template for tool use.
"""

from lm_core.chat_templates.loading import BUILTIN_TEMPLATES, builtin_template, load_chat_template
from lm_core.chat_templates.template import SPECIAL_TOKEN_NAMES, ChatTemplate, ChatTemplateError

__all__ = [
    "BUILTIN_TEMPLATES",
    "SPECIAL_TOKEN_NAMES",
    "ChatTemplate",
    "ChatTemplateError",
    "builtin_template",
    "load_chat_template",
]
