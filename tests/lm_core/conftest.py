"""Fixtures for lm-core tests: the default model (fetched once per cache) and tiny GGUF files written from
random transformers Llama models, one per GGML tensor type."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# A tiny Llama whose dimensions are multiples of 256, the block size of the K-quants.
TINY_LLAMA = {
    "vocab_size": 384,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _ggml_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # What llama.cpp's converter does to Q and K: each head's two rotary halves become interleaved pairs.
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _random_k_quant_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """K-quant data with random quants and small, finite fp16 scales (gguf can dequantize but not quantize these)."""
    import gguf

    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    scale = lambda n: rng.uniform(0.002, 0.02, size=(rows, cols // block_elems, n)).astype(np.float16)  # noqa: E731
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin (fp16), scales[12], qs[128]
        blocks[..., 0:4] = scale(2).view(np.uint8)
    elif qtype == gguf.GGMLQuantizationType.Q6_K:  # ql[128], qh[64], scales[16] (int8), d (fp16)
        blocks[..., 208:210] = scale(1).view(np.uint8)
    else:
        raise ValueError(f"no random generator for {qtype.name}")
    return blocks.reshape(rows, -1)


def write_llama_gguf(model, path: Path, type_name: str, seed: int = 0) -> Path:
    """Write a transformers Llama model as llama.cpp would: GGUF names, permuted Q/K, matrices in `type_name`.

    Norms stay F32 (as llama.cpp keeps them); a byte-level tokenizer of 256 byte tokens plus two control tokens
    makes the file complete.
    """
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    cfg = model.config
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if hasattr(cfg, "rope_parameters") else cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)

    byte_tokens = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_end|>", *byte_tokens]
    tokens += [f"<|unused{i}|>" for i in range(cfg.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * len(byte_tokens) + [5] * (cfg.vocab_size - 2 - len(byte_tokens)))
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            gguf_name = f"blk.{idx}.{layer_names[rest]}"
        else:
            gguf_name = names[name]
        values = tensor.detach().float().numpy()
        if gguf_name.endswith("attn_q.weight"):
            values = _ggml_permute(values, cfg.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            values = _ggml_permute(values, cfg.num_key_value_heads)
        if values.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, np.ascontiguousarray(values, dtype=np.float32))
        elif type_name in ("Q4_K", "Q6_K"):
            data = _random_k_quant_blocks(*values.shape, qtype, rng)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            data = gguf.quants.quantize(values, qtype)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    """A random-init transformers Llama (fp32) with the TINY_LLAMA config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    # Random init leaves norms at 1.0: perturb them so a mix-up of norm tensors cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return os.environ


@pytest.fixture(scope="session")
def llama_gguf_writer():
    """`write_llama_gguf(model, path, type_name)` (test modules cannot import conftest under importlib mode)."""
    return write_llama_gguf


# --- Locally built tokenizers for the tokenizer / detokenizer tests (no hub access) ---

_TOKENIZER_TEXT = "hello world the naïve café 日本語 東京 😀 🚀 über straße ok été"


def _tokenizer_corpus(seed: int, lines: int = 200) -> list[str]:
    import random

    rng, words = random.Random(seed), _TOKENIZER_TEXT.split()
    return [" ".join(rng.choice(words) for _ in range(10)) for _ in range(lines)]


def _with_byte_pieces(tok):
    """Put `<0x00>`..`<0xFF>` into the BPE vocab right after the special tokens, as SentencePiece does."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    specials = [t["content"] for t in data["added_tokens"]]
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for token in [*specials, *(f"<0x{b:02X}>" for b in range(256)), *(t for t, _ in trained)]:
        vocab.setdefault(token, len(vocab))
    data["model"]["vocab"] = vocab
    for added in data["added_tokens"]:
        added["id"] = vocab[added["content"]]
    return Tokenizer.from_str(json.dumps(data))


def _llama_like_tokenizer():
    """Llama-2 style: BPE with byte fallback, '▁' for spaces, decoder Replace/ByteFallback/Fuse/Strip."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40)
    tok.train_from_iterator(_tokenizer_corpus(0), trainer)
    return _with_byte_pieces(tok), {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _metaspace_unigram_tokenizer():
    """Unigram with byte fallback and a Metaspace pre-tokenizer/decoder (prepend_scheme "first"); the pieces are
    the corpus words with and without "▁", their characters except a few (those fall back to bytes) and U+FFFD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = _TOKENIZER_TEXT.split()
    chars = sorted(set("".join(words)) - set("ßé😀"))
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), *((f"<0x{b:02X}>", 0.0) for b in range(256))]
    pieces += [("▁", -4.0), *((f"▁{w}", -2.0) for w in words), *((w, -3.0) for w in words)]
    # Replacement-character pieces: text that ends in U+FFFD without being an unfinished byte sequence.
    pieces += [(c, -5.0) for c in chars] + [("\ufffd", -5.0), ("▁\ufffd", -4.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    metaspace = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), metaspace])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _byte_level_added_tokenizer():
    """Byte-level BPE with added tokens: special ones (one with '▁' and full-width bars) and plain ones."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|bos|>", "<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_tokenizer_corpus(2), trainer)
    tok.add_special_tokens(["<|tool|>", "<｜end▁of▁sentence｜>"])
    tok.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=False), "✓done"])
    return tok, {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}


@pytest.fixture(scope="session")
def local_tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved transformers tokenizers built here: "llama" (BPE + byte fallback), "unigram" (Metaspace + byte
    fallback) and "added" (byte-level BPE with added special and plain tokens); each directory also has a
    generation_config.json whose eos_token_id is a list."""
    import json

    from transformers import PreTrainedTokenizerFast

    builders = {
        "llama": _llama_like_tokenizer,
        "unigram": _metaspace_unigram_tokenizer,
        "added": _byte_level_added_tokenizer,
    }
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {}
    for name, build in builders.items():
        tok, specials = build()
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **specials)
        path = root / name
        hf.save_pretrained(path)
        eos = [hf.convert_tokens_to_ids(specials["eos_token"]), hf.convert_tokens_to_ids(specials["bos_token"])]
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
        dirs[name] = path
    return dirs
