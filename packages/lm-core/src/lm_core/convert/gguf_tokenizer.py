"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) rebuilt from GGUF tokenizer metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_core.convert.gguf_model import field
from lm_core.errors import GGUFConversionError

if TYPE_CHECKING:
    from gguf import GGUFReader

# llama.cpp's token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns of the pre-tokenizers llama.cpp names in `tokenizer.ggml.pre` (the same regexes the original
# tokenizer.json files use).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_GPT2 = ("default", "gpt-2", "gpt2")
_SPLIT_THEN_BYTES = {
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_THEN_BYTES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_THEN_BYTES[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = ", ".join(sorted([*_GPT2, *_DIGITS_THEN_GPT2, *_SPLIT_THEN_BYTES]))
    raise GGUFConversionError(f"GGUF pre-tokenizer {pre!r} is not supported for conversion (supported: {known})")


def write_hf_tokenizer(reader: GGUFReader, out_dir: Path, model_max_length: int) -> bool:
    """Write tokenizer files for the GGUF's tokenizer; returns False when the GGUF carries none."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = field(reader, "tokenizer.ggml.model")
    if kind is None:
        return False
    if kind != "gpt2":
        raise GGUFConversionError(
            f"GGUF tokenizer model {kind!r} is not supported for conversion yet (supported: gpt2 byte-level BPE)"
        )
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
    pre = field(reader, "tokenizer.ggml.pre", "default")

    bpe = models.BPE(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=merges,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=pre in _SPLIT_THEN_BYTES,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    # tokenizers' stubs leave the token list's type open (strict mode: partially unknown).
    tokenizer.add_tokens(  # pyright: ignore[reportUnknownMemberType]
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types)
            if t == _USER_DEFINED
        ]
    )
    tokenizer.add_special_tokens(  # pyright: ignore[reportUnknownMemberType]
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(token_types) if t == _CONTROL]
    )

    special = _special_tokens(reader, tokens)
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", False)) and "bos_token" in special
    add_eos = bool(field(reader, "tokenizer.ggml.add_eos_token", False)) and "eos_token" in special
    if add_bos or add_eos:
        # TemplateProcessing names tokens by their text, with ":1" marking the second sequence of a pair.
        bos = [special["bos_token"]] if add_bos else []
        eos = [special["eos_token"]] if add_eos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)],
            special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(bos + eos)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **special,
    }
    chat_template = field(reader, "tokenizer.chat_template")
    if chat_template:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return True


def _special_tokens(reader: GGUFReader, tokens: list[str]) -> dict[str, str]:
    special: dict[str, str] = {}
    for hf_name, gguf_name in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
    ):
        token_id = field(reader, f"tokenizer.ggml.{gguf_name}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            special[hf_name] = tokens[int(token_id)]
    return special
