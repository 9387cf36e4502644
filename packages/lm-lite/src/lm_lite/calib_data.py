"""Calibration text: where it comes from, and how it becomes `calib_samples` sequences of `calib_seqlen` tokens.

`calib_dataset` is one of
- None or "builtin": the set shipped in this package (`lm_lite/data/`, see its NOTICE): public-domain English prose
  (`calib_english.txt`) followed by the Python Language Reference (`calib_builtin.txt`);
- a local file: `.jsonl` (one JSON object per line, its "text" field) or any other file read as UTF-8 text;
- a Hugging Face datasets name, when the `datasets` package is installed and the hub is reachable: one of the
  aliases in `HF_DATASETS` (LMDeploy's names) or "org/name" with a "text" column.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path

BUILTIN = "builtin"
# The built-in set: documents separated by two blank lines. English prose first: GPTQ calibrated on the language
# reference alone fits its code and grammar notation and loses to round-to-nearest on prose (docs/quantization.md).
BUILTIN_FILES = ("calib_english.txt", "calib_builtin.txt")
# alias -> (datasets path, config name, split, text column)
HF_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "sentence"),
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
}
_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".md", ".text")


def check_calib_dataset(spec: str | None) -> None:
    """Fail fast (before any model loads) on a calibration source that cannot exist."""
    if spec is None or spec == BUILTIN or spec in HF_DATASETS:
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_file():
            raise ValueError(f"calib_dataset {spec!r} is not a file")
        return
    looks_like_file = path.suffix.lower() in _FILE_SUFFIXES or spec.startswith((".", "/", "~")) or "\\" in spec
    if looks_like_file or spec.count("/") != 1:
        raise ValueError(
            f"calib_dataset {spec!r}: no such file (pass a .txt or .jsonl file, 'builtin', "
            f"one of {', '.join(HF_DATASETS)}, or a Hugging Face dataset id org/name)"
        )


def load_texts(spec: str | None) -> list[str]:
    """The documents of a calibration source (see the module docstring)."""
    check_calib_dataset(spec)
    if spec is None or spec == BUILTIN:
        docs = []
        for name in BUILTIN_FILES:
            text = resources.files("lm_lite").joinpath(f"data/{name}").read_text(encoding="utf-8")
            docs += [doc for doc in text.split("\n\n\n") if doc.strip()]
        return docs
    path = Path(spec).expanduser()
    if path.is_file():
        return _file_texts(path)
    return _hf_texts(spec)


def _file_texts(path: Path) -> list[str]:
    if path.suffix.lower() != ".jsonl":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"calib_dataset {str(path)!r} is empty")
        return [text]
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"calib_dataset {str(path)!r} line {number} is not JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"calib_dataset {str(path)!r} line {number} has no string field 'text'")
        texts.append(record["text"])
    if not texts:
        raise ValueError(f"calib_dataset {str(path)!r} holds no records")
    return texts


def _hf_texts(name: str) -> list[str]:
    try:
        import datasets  # pyright: ignore[reportMissingImports]  (optional: not a dependency of lm-lite)
    except ImportError:
        raise ValueError(
            f"calib_dataset {name!r} names a Hugging Face dataset, which needs `pip install datasets`; "
            "or pass a local .txt/.jsonl file, or 'builtin'"
        ) from None
    path, config, split, column = HF_DATASETS.get(name, (name, None, "train", "text"))
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # offline, unknown id, gated: datasets raises many types
        raise ValueError(f"calib_dataset {name!r} could not be loaded ({type(exc).__name__}: {exc})") from None
    if column not in data.column_names:
        raise ValueError(f"calib_dataset {name!r} has no {column!r} column (columns: {data.column_names})")
    return [text for text in data[column] if text and text.strip()]


def token_samples(tokenizer, texts: list[str], num_samples: int, seqlen: int):
    """[num_samples, seqlen] token ids cut from the documents joined end to end (EOS between documents).

    The windows are spread evenly over the whole text, so that a few samples still see every part of a mixed
    source (the built-in set's prose and its language reference), not only its first documents. They do not
    overlap while the text is long enough; a shorter text gives overlapping windows (with a warning), and a text
    shorter than one window is an error.
    """
    import torch

    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokenizer.model_max_length = 1 << 62  # documents longer than the model's context are cut into windows below
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(separator)
    if len(ids) < seqlen:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than calib_seqlen={seqlen}")
    if len(ids) < num_samples * seqlen:
        warnings.warn(
            f"the calibration text has {len(ids)} tokens, fewer than calib_samples x calib_seqlen = "
            f"{num_samples * seqlen}: its windows overlap",
            stacklevel=2,
        )
    last_start = len(ids) - seqlen
    # Evenly spaced starts: at least seqlen apart (no overlap) when the text holds num_samples windows.
    starts = [(i * last_start) // max(num_samples - 1, 1) for i in range(num_samples)]
    tensor = torch.tensor(ids, dtype=torch.long)
    return torch.stack([tensor[s : s + seqlen] for s in starts])
