"""Implementation of `lm_core.chat_template` (import from there): the Jinja sandbox, `ChatTemplate`, loading."""
